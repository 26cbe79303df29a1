"""The ``neuroprobe`` command.

Each command is one call of the public API.  Commands live next to the code they
drive and register themselves here through a ``register(app)`` function, so this
file only wires them together and turns every way a run can end into an exit code:

* a user mistake (:class:`~neuroprobe.errors.NeuroprobeError`, or a usage error such
  as a missing option, an unknown option or command, a value of the wrong type) prints
  one line ``neuroprobe: error: ...`` on stderr and exits 2, never a traceback;
* ``neuroprobe`` alone prints the help on stdout, then that one line, and exits 2;
* Ctrl-C (at start-up or mid-run) prints ``neuroprobe: interrupted`` and exits 130:
  the first one raises ``KeyboardInterrupt`` (a recording closes its file, still
  resumable), any further one ends the process at once with the same line and code
  (the file is then as after a kill: valid up to its committed progress, resumable).
  Run as a program (:func:`entry`), the process exits without the interpreter's slow
  teardown once it is interrupted, and forward passes run where Ctrl-C reaches them
  (:mod:`neuroprobe.interrupts`).
* a full disk that no command turned into its own sentence is still one line, exit 2.

This module imports nothing heavy: typer and the command modules load inside
:func:`main` (so a Ctrl-C while they load is handled too), and the command modules
import torch, pandas and the rest only inside the command bodies, which keeps
``neuroprobe --help`` fast.  Usage errors are recognised whether typer uses the
standalone ``click`` (typer < 0.26) or the copy it vendors as ``typer._click``.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

from neuroprobe.errors import NeuroprobeError, cli_spelling

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


INTERRUPTED = "neuroprobe: interrupted"


def _interrupted() -> None:
    from neuroprobe.interrupts import state

    if not state.announced:
        state.announced = True
        print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)


def _on_sigint(signum: int, frame: Any) -> None:
    """First Ctrl-C: raise ``KeyboardInterrupt``; any later one: say so and end the process now."""
    from neuroprobe.interrupts import state

    if not state.requested:
        state.requested = True
        raise KeyboardInterrupt
    # cleanup of the first one is under way: end like a kill (every recording stays resumable)
    if not state.announced:
        state.announced = True
        os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


def _default_sigint() -> bool:
    """Whether SIGINT still has Python's own handler (not ignored as under ``nohup``, not handled already)."""
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


@contextlib.contextmanager
def _sigint_handled() -> Iterator[None]:
    """Handle SIGINT with :func:`_on_sigint` inside the block (main thread only; restored after it)."""
    from neuroprobe.interrupts import state

    if threading.current_thread() is not threading.main_thread() or not _default_sigint():
        yield  # not ours to change: another thread, a handler already set (ours), or SIGINT ignored (nohup)
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        state.requested = state.announced = False  # an in-process caller may run the command again


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
        with cli_spelling():  # messages name options as flags (--resume), not as keywords (resume=True)
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


def _disk_full(err: OSError) -> None:
    """A full disk met where no command expected it: still one line (the commands' own writes say more)."""
    where = f"{err.filename} could not be written" if getattr(err, "filename", None) else "a file could not be written"
    _fail(f"the disk is full: {where}; free some space and rerun.")


def _unclosable() -> int:
    """How many HDF5 objects failed writes have left unclosable so far in this process."""
    output = sys.modules.get("neuroprobe.output")
    return len(output.UNCLOSABLE) if output is not None else 0


def main(argv: list[str] | None = None) -> None:
    """Run the command (in-process: raises ``SystemExit``); user and usage errors end in one line and exit 2."""
    unclosable = _unclosable()
    with _sigint_handled():
        try:
            try:
                _run(list(sys.argv[1:] if argv is None else argv))
            except KeyboardInterrupt:
                _interrupted()
            except OSError as err:
                from neuroprobe.output import is_disk_full

                if not is_disk_full(err):
                    raise
                _disk_full(err)
        except SystemExit:
            # after an HDF5 write that failed half-way in this run, HDF5's own exit handler would crash on the
            # objects it could not close: end the process here, after the message (neuroprobe/output.py, UNCLOSABLE)
            if _unclosable() > unclosable:
                code = sys.exc_info()[1].code
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
            raise


def entry() -> None:
    """The ``neuroprobe`` program (console script, ``python -m neuroprobe``): :func:`main`, and then the exit.

    After an interrupt the recording is closed already, so the process ends at once
    (``atexit`` handlers run, the interpreter's teardown of torch and friends — seconds
    — is skipped); after any other end Ctrl-C is ignored during that teardown, so it
    cannot turn a finished run into a death by signal.
    """
    from neuroprobe.interrupts import state

    if _default_sigint():
        signal.signal(signal.SIGINT, _on_sigint)
    state.process_ends = True
    try:
        main()
    except SystemExit as exc:
        if exc.code == 130:
            try:
                atexit._run_exitfuncs()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(130)
        _ignore_sigint()
        raise
    _ignore_sigint()


def _ignore_sigint() -> None:
    """Ignore Ctrl-C from here on (the interpreter's teardown) unless it was never ours to handle."""
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    entry()
