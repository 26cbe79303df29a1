"""The options every experiment script takes, parsed one way."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence


def experiment_args(
    name: str,
    doc: str | None,
    *,
    model: str = "organism",
    add: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parse an experiment script's command line.

    Every script takes ``--model`` (a registry name or ``hf:...``), ``--out DIR``
    (default ``figures/analyses/<name>/``), ``--quick`` (a reduced run, for tests),
    ``--seed``, ``--device``, ``--cache DIR`` (where recordings are reused) and ``--quiet``.
    A usage mistake ends in one line on stderr and exit code 2 (argparse's rule).

    Parameters
    ----------
    name
        The experiment's name (the script's stem).
    doc
        The script's docstring; its first line is the help's description.
    model
        Default subject.
    add
        Adds the script's own options to the parser.
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        With ``out`` as a :class:`~pathlib.Path`, created, and ``name`` set.
    """
    first = (doc or name).strip().splitlines()[0]
    ap = argparse.ArgumentParser(prog=f"analyses/{name}.py", description=first, epilog=None)
    ap.add_argument("--model", default=model, help=f"subject (registry name or hf:...; default {model})")
    ap.add_argument("--out", type=Path, default=Path("figures") / "analyses" / name,
                    help=f"output folder (default figures/analyses/{name}/)")
    ap.add_argument("--quick", action="store_true", help="a reduced run (tests; under a minute here)")
    ap.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--cache", type=Path, default=Path("recordings") / "cache",
                    help="folder where recordings are kept and reused by provenance (default recordings/cache)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--gallery", type=Path, default=None, metavar="DIR",
                    help="also write a thumbnail of the main figure as DIR/<name>.png (the gallery's: docs/figures/analyses)")
    if add is not None:
        add(ap)
    args = ap.parse_args(argv)
    args.name = name
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        ap.exit(2, f"{ap.prog}: error: cannot create --out {args.out}: {err.strerror or err}\n")
    return args


def run_main(main: Callable[[], None]) -> None:
    """Run an experiment's ``main``, turning a user error into one line and exit code 2."""
    from neuroprobe.errors import NeuroprobeError

    try:
        main()
    except NeuroprobeError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
