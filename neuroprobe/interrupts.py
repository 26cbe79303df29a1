"""Ctrl-C: one flag for the process, checked between modules, and forward passes it can end.

The ``neuroprobe`` command (:func:`neuroprobe.cli.entry`) handles SIGINT itself: the
first Ctrl-C sets :data:`state` ``.requested`` and raises ``KeyboardInterrupt`` in the
main thread; the electrodes (the one hook mechanism, :mod:`neuroprobe.electrodes`)
call :func:`check` at every module on the way to a site, so a forward pass that is
still running stops at its next module.

Python runs a signal handler only between bytecodes of the main thread, so a single
long operator (a big matmul on a CPU can take tens of seconds) would hold Ctrl-C up
until it returns.  When the process ends right after an interrupt (the command sets
:data:`state` ``.process_ends``), :func:`run_forward` therefore runs the forward pass in
a worker thread: the main thread waits where a signal reaches it at once, cleans up
(the recording stays valid and resumable) and the process exits, leaving the
operator unfinished.  Anywhere else (the library, tests calling the CLI in-process)
the pass runs in the calling thread as before, so no pass ever outlives its caller.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class _State:
    """What the process knows about Ctrl-C (module-level singleton :data:`state`)."""

    def __init__(self) -> None:
        #: A Ctrl-C was received: every forward pass stops at its next module.
        self.requested = False
        #: The process ends right after an interrupt (set by ``neuroprobe.cli.entry``).
        self.process_ends = False
        #: ``neuroprobe: interrupted`` has been printed (so it is printed once).
        self.announced = False


state = _State()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C was received (called by the electrodes' hooks)."""
    if state.requested:
        raise KeyboardInterrupt


def run_forward(fn: Callable[[], T]) -> T:
    """Run ``fn`` (a forward pass) so that Ctrl-C ends the wait for it at once.

    In a process that ends after an interrupt, ``fn`` runs in a daemon thread and the
    calling (main) thread waits for it; a ``KeyboardInterrupt`` then leaves the thread
    behind (it stops at its next module, or when the process exits).  Elsewhere
    ``fn`` simply runs here.
    """
    if not state.process_ends or threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}
    torch = sys.modules.get("torch")
    device = None
    if torch is not None and torch.cuda.is_initialized():
        device = torch.cuda.current_device()  # the current CUDA device is per thread

    def work() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller (or dropped after an interrupt)
            box["error"] = err

    worker = threading.Thread(target=work, name="neuroprobe-forward", daemon=True)
    worker.start()
    try:
        worker.join()  # a signal interrupts this wait (not so a long operator in this thread)
    except KeyboardInterrupt:
        state.requested = True  # the worker stops at its next module
        raise
    if "error" in box:
        err = box.pop("error")
        raise err
    return box["value"]
