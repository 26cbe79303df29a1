"""The ``neuroprobe`` command.

Each command is one call of the public API.  Commands live next to the code they
drive and register themselves here through a ``register(app)`` function, so this
file only wires them together and turns every way a run can end into an exit code:

* a user mistake (:class:`~neuroprobe.errors.NeuroprobeError`, or a usage error such
  as a missing option, an unknown option or command, a value of the wrong type) prints
  one line ``neuroprobe: error: ...`` on stderr and exits 2, never a traceback;
* ``neuroprobe`` alone prints the help on stdout, then that one line, and exits 2;
* Ctrl-C (at start-up or mid-run) prints ``neuroprobe: interrupted`` and exits 130.

This module imports nothing heavy: typer and the command modules load inside
:func:`main` (so a Ctrl-C while they load is handled too), and the command modules
import torch, pandas and the rest only inside the command bodies, which keeps
``neuroprobe --help`` fast.  Usage errors are recognised whether typer uses the
standalone ``click`` (typer < 0.26) or the copy it vendors as ``typer._click``.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from neuroprobe.errors import NeuroprobeError

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
    "neuroprobe.sae.commands",           # sae train, sae info
)

_APP = None


def build_app() -> Any:
    """The typer application with every command registered (built once)."""
    global _APP
    if _APP is None:
        import typer

        app = typer.Typer(
            name="neuroprobe",
            help="Record every unit of a network, find concept cells, lesion them.",
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
            rich_markup_mode=None,  # plain click help: no rich import (fast --help), nothing cut off
        )
        for name in COMMAND_MODULES:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as err:
                if name.startswith(err.name or "\0"):  # a command module not written yet
                    continue
                raise
            module.register(app)
        command_class = _usage_command_class()
        commands = list(app.registered_commands)
        for group in app.registered_groups:  # command groups (``sae train``)
            commands += group.typer_instance.registered_commands if group.typer_instance is not None else []
        for info in commands:
            if info.cls is None or info.cls is command_class.__base__:  # typer's default class
                info.cls = command_class
        _APP = app
    return _APP


def _usage_command_class() -> type:
    """typer's command class with plain argument names in the usage line.

    Recent typer writes a required argument as ``{recording}`` in ``Usage:``, which reads
    like an unfilled template; this shows the argument's metavar (``RECORDING``) instead.
    """
    from typer.core import TyperCommand

    class Command(TyperCommand):
        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            return [p[1:-1] if p.startswith("{") and p.endswith("}") else p
                    for p in super().collect_usage_pieces(ctx)]

    return Command


def __getattr__(name: str) -> Any:
    if name == "app":  # ``from neuroprobe.cli import app`` (typer.testing) builds it on first use
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _usage_error_types() -> tuple[type, ...]:
    """``ClickException`` of the click that typer uses, and of standalone click if it is loaded."""
    import typer

    types = [c for c in type.mro(typer.BadParameter) if c.__name__ == "ClickException"]
    click = sys.modules.get("click")
    if click is not None and hasattr(click, "ClickException"):
        types.append(click.ClickException)
    return tuple(types)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = 2) -> None:
    print(f"neuroprobe: error: {_one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _interrupted() -> None:
    print("neuroprobe: interrupted", file=sys.stderr)
    sys.exit(130)


def _usage_error(err: Exception) -> None:
    """One line for a click/typer usage error, with the command's ``--help`` to look at."""
    ctx = getattr(err, "ctx", None)
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    hint = ""
    if ctx is not None and getattr(ctx, "command_path", None):
        hint = f" (see '{ctx.command_path} --help')"
    _fail(_one_line(message).rstrip() + hint)


def _run(args: list[str]) -> None:
    import typer

    app = build_app()
    if not args:
        # the help (on stdout, where it can be paged), then the usage error in one line
        app(args=["--help"], prog_name="neuroprobe", standalone_mode=False)
        sys.stdout.flush()
        _fail("no command given; pick one of the commands above (neuroprobe COMMAND --help).")
    try:
        rv = app(args=args, prog_name="neuroprobe", standalone_mode=False)
    except NeuroprobeError as err:
        _fail(str(err))
    except typer.Abort:  # click (typer < 0.26) turns Ctrl-C into Abort outside standalone mode
        _interrupted()
    except typer.Exit as err:
        sys.exit(getattr(err, "exit_code", 0))
    except _usage_error_types() as err:
        _usage_error(err)
    # outside standalone mode typer returns an Exit's code (Ctrl-C is Exit(130) in typer >= 0.26)
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        if rv == 130:
            _interrupted()
        sys.exit(rv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; user errors and usage errors end in one line and exit 2."""
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        _interrupted()


if __name__ == "__main__":
    main()
