"""argparse value types shared by the command-line tools (``manip.bench``, ``manip.bench_envs``,
``manip.data.bench``, ``manip.data.generate``): a value out of range is a usage error naming the flag,
``argument --batch-size: must be >= 1, got 0``, raised while the command line is parsed. Also how every command
recognises a Ctrl-C (:func:`interrupted_by_ctrl_c`, :func:`raise_if_interrupted`)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable


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
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory} does not exist")
    if os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is kept; name a new file")
    return path


def interrupted_by_ctrl_c(err: BaseException) -> bool:
    """Whether ``err`` is a Ctrl-C (KeyboardInterrupt) or was raised because of one. A C extension interrupted while
    it initialises raises its own error from the interrupt: Ctrl-C during ``import robosuite`` surfaces as mujoco's
    ``ImportError: initialization failed``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def raise_if_interrupted(err: BaseException) -> None:
    """A KeyboardInterrupt (from ``err``) where :func:`interrupted_by_ctrl_c` says ``err`` came from a Ctrl-C: for
    code that turns a library's errors into a user error, which would otherwise blame the user's setting or file."""
    if interrupted_by_ctrl_c(err) and not isinstance(err, KeyboardInterrupt):
        raise KeyboardInterrupt from err
