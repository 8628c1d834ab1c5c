"""manip: offline-to-online robot-manipulation policies (MVP, QC, FQL) in PyTorch Lightning."""

import logging
import os
import sys

# Headless offscreen rendering by default (robosuite forces EGL anyway; Mesa's EGL needs the
# surfaceless platform without a display). Set before mujoco / dm_control are imported; an
# explicit user setting wins.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")


class _DropImportNotices(logging.Filter):
    """robosuite announces at every import (each simulator worker process too) that it found no private macro
    file and no optional robot packages, and at every env it builds where its controller file lies; none of it
    matters to manip's tasks."""

    NOTICES = ("No private macro file found", "It is recommended to use a private macro file", "To setup, run:",
               "Could not import robosuite_models", "Could not load the mink-based whole-body IK",
               "Loading controller configuration from")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


_robosuite_log = logging.getLogger("robosuite_logs")
_robosuite_log.addFilter(_DropImportNotices())
_robosuite_log.propagate = False  # robosuite prints its lines with its own handler (twice otherwise)


def _ctrl_c_before_the_command_starts(kind, value, trace, _print_error=sys.excepthook) -> None:
    """``python -m manip.<command>``: a Ctrl-C during the first seconds, while Python imports torch and Lightning
    and before the command handles Ctrl-C itself, ends with the commands' one line instead of an import traceback
    (Python then still ends the process by SIGINT, status 130 in a shell)."""
    if issubclass(kind, KeyboardInterrupt):
        print(f"{_command()}: interrupted", file=sys.stderr)
        return
    _print_error(kind, value, trace)


def _command() -> str | None:
    """``manip.fit`` for ``python [options] -m manip.fit ...``; None when manip is imported otherwise."""
    args = iter(sys.orig_argv[1:])
    for arg in args:
        if arg == "-m":
            module = next(args, "")
            return module if module.startswith("manip.") else None
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # options with a separate value
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None
    return None


if _command() is not None:
    sys.excepthook = _ctrl_c_before_the_command_starts
    from manip.cli_args import ctrl_c_in_destructors_still_stops, defer_ctrl_c_during_imports

    ctrl_c_in_destructors_still_stops()
    defer_ctrl_c_during_imports()

__version__ = "0.1.0"
