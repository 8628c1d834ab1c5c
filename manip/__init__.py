"""manip: offline-to-online robot-manipulation policies (MVP, QC, FQL) in PyTorch Lightning."""

import os

# Headless offscreen rendering by default (robosuite forces EGL anyway; Mesa's EGL needs the
# surfaceless platform without a display). Set before mujoco / dm_control are imported; an
# explicit user setting wins.
os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")

__version__ = "0.1.0"
