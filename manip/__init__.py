"""manip: offline-to-online robot-manipulation policies (MVP, QC, FQL) in PyTorch Lightning."""

import logging
import os

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

__version__ = "0.1.0"
