"""The ``neuroprobe`` command.

Each command is one call of the public API.  Commands live next to the code they
drive and register themselves here through a ``register(app)`` function, so this
file only wires them together and turns :class:`~neuroprobe.errors.NeuroprobeError`
into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import importlib
import sys

import typer

from neuroprobe.errors import NeuroprobeError

app = typer.Typer(
    name="neuroprobe",
    help="Record every unit of a network, find concept cells, lesion them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules that contribute commands; each defines ``register(app: typer.Typer)``.
COMMAND_MODULES = (
    "neuroprobe.subjects.commands",      # subjects
    "neuroprobe.recording.commands",     # record, inspect
    "neuroprobe.analysis.commands",      # cells, figures
    "neuroprobe.lesions.commands",       # lesion
    "neuroprobe.steering.commands",      # steer
    "neuroprobe.subjects.organism.commands",  # train-organism
    "neuroprobe.atlas.commands",         # atlas
    "neuroprobe.export.commands",        # export
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if name.startswith(err.name or "\0"):  # a command module not written yet
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr."""
    try:
        app(standalone_mode=False)
    except NeuroprobeError as err:
        print(f"neuroprobe: error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        print("neuroprobe: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("neuroprobe: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
