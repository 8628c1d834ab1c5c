"""manip: offline-to-online robot-manipulation policies (MVP, QC, FQL) in PyTorch Lightning."""

__version__ = "0.1.0"
