"""argparse value types shared by the command-line tools (``manip.bench``, ``manip.bench_envs``,
``manip.data.bench``, ``manip.data.generate``): a value out of range is a usage error naming the flag,
``argument --batch-size: must be >= 1, got 0``, raised while the command line is parsed. Also how every command
recognises a Ctrl-C (:func:`interrupted_by_ctrl_c`, :func:`raise_if_interrupted`) and keeps one from being lost
inside an import or a destructor (:func:`defer_ctrl_c_during_imports`, :func:`ctrl_c_in_destructors_still_stops`,
installed by ``manip/__init__.py`` for ``python -m manip.<command>``)."""

from __future__ import annotations

import _thread
import argparse
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator


def at_least(minimum: float, kind: type = int, strict: bool = False) -> Callable[[str], float]:
    """A type converting with ``kind`` and requiring a finite value >= ``minimum`` (> with ``strict``)."""

    def convert(text: str):
        value = kind(text)
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):  # NaN fails both
            finite = "a finite number " if kind is float else ""
            raise argparse.ArgumentTypeError(f"must be {finite}{'>' if strict else '>='} {minimum:g}, got {value}")
        return value

    convert.__name__ = kind.__name__  # argparse names a value kind(text) cannot convert by it: "invalid int value"
    return convert


def new_file(path: str) -> str:
    """A type for an output file: new (an existing file is kept), in a directory that exists (the result is written
    after the work)."""
    from manip.settings import cannot_write_in

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory} does not exist")
    if os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is kept; name a new file")
    if (refused := cannot_write_in(directory)) is not None:
        raise argparse.ArgumentTypeError(f"cannot write in {directory} ({refused})")
    return path


# ctypes reports an exception raised while it converts a foreign call's argument as ArgumentError, by name only
# (no __cause__): Ctrl-C inside PyOpenGL's first calls, during ``import robosuite``.
_CTYPES_INTERRUPTED = re.compile(r"argument \d+: KeyboardInterrupt\b")


def interrupted_by_ctrl_c(err: BaseException) -> bool:
    """Whether ``err`` is a Ctrl-C (KeyboardInterrupt) or was raised because of one. A C extension interrupted while
    it initialises raises its own error from the interrupt: Ctrl-C during ``import robosuite`` surfaces as mujoco's
    ``ImportError: initialization failed``, or as ctypes' ``ArgumentError: argument 1: KeyboardInterrupt``."""
    import ctypes

    return any(isinstance(error, KeyboardInterrupt)
               or isinstance(error, ctypes.ArgumentError) and _CTYPES_INTERRUPTED.match(str(error))
               for error in exception_chain(err))


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then the exception it was raised from or while handling (``__cause__``, else ``__context__``), and
    so on, each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def raise_if_interrupted(err: BaseException) -> None:
    """A KeyboardInterrupt (from ``err``) where :func:`interrupted_by_ctrl_c` says ``err`` came from a Ctrl-C: for
    code that turns a library's errors into a user error, which would otherwise blame the user's setting or file."""
    if interrupted_by_ctrl_c(err) and not isinstance(err, KeyboardInterrupt):
        raise KeyboardInterrupt from err


def ctrl_c_in_destructors_still_stops() -> None:
    """Python drops an exception raised inside a ``__del__`` ("Exception ignored in ..."), a Ctrl-C too: one that
    lands while robosuite frees a simulation (``MjData.__del__``) would be lost, and the command would go on. This
    hook delivers such an interrupt again, to the main thread's SIGINT handler (10 ms later, from a timer thread),
    instead of printing it; other unraisable errors are printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "delivers_ctrl_c", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) or unraisable.exc_type is KeyboardInterrupt:
            # From another thread, a moment later: raised in this hook, the interrupt would be dropped again.
            threading.Timer(0.01, _thread.interrupt_main).start()
            return
        previous(unraisable)

    hook.delivers_ctrl_c = True
    sys.unraisablehook = hook


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def defer_ctrl_c_during_imports() -> None:
    """SIGINT as Python's own handler, except while the main thread imports a module: then the KeyboardInterrupt
    waits until the import is done. Raised inside an import it can land in a C++ callback (torch's start-up), where
    pybind11 aborts the process, or inside an extension's initialisation, which reports it as its own error. Imports
    take seconds, so the interrupt still comes promptly. Nothing changes where SIGINT is ignored (a background job)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    main = threading.main_thread().ident
    waiting = threading.Event()

    def deliver_after_the_import() -> None:
        while _importing(sys._current_frames().get(main)):
            time.sleep(0.02)
        waiting.clear()
        _thread.interrupt_main()  # the handler again, outside the import: it raises there

    def handler(signum, frame) -> None:
        if not _importing(frame):
            raise KeyboardInterrupt
        if not waiting.is_set():
            waiting.set()
            threading.Thread(target=deliver_after_the_import, name="ctrl-c-after-import", daemon=True).start()

    signal.signal(signal.SIGINT, handler)
