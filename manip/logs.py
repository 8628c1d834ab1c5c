"""manip's log: the lines a run reports (``[manip] step 5000: success 0.92 ...``) go to the ``manip`` logger.

The entry points configure Python logging through Hydra (``conf/hydra/job_logging/manip.yaml``: ``[name] message``
on stdout) and keep the whole report in ``<run_dir>/<entry point>.log`` (:class:`RunLog`), timestamped, with
Lightning's own lines. Used as a library, ``manip`` configures no handler: INFO lines appear where the application
routes them (``logging.basicConfig(level=logging.INFO)``), warnings (a stand-in dataset) reach stderr regardless.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from pathlib import Path

LOG = logging.getLogger("manip")
LOG.setLevel(logging.INFO)

FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"

# Loggers that do not propagate to the root logger but whose lines belong in a run's log.
_OWN_HANDLER_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1: ``counted(1, "episode")`` is "1 episode"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class _DropAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... try installing ..." lines advertise services, they say nothing about the run; its
    "TPU available: False, using: 0 TPU cores" kind of line lists hardware the machine does not have (the lines
    for hardware it has stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("💡 Tip") or re.match(r"[GTH]PU available: False", message))


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdverts())


class _RunLogFile(logging.FileHandler):
    """The run's log file. A write that fails (a full disk) leaves the file alone from then on, with one line on
    stderr, where logging would print a traceback for every later record; the console keeps every line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the lines still buffered cannot be written either
            if not self.failed:
                self.handleError(None)

    def handleError(self, record: logging.LogRecord | None) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or error
        print(f"[manip] cannot write {self.baseFilename} ({reason}): the rest of the log is on the console only",
              file=sys.stderr)


class RunLog:
    """The log of one command, ``<run_dir>/<name>.log``: a context manager around the command.

    It keeps what is logged (root logger, Lightning's) while the block runs. The run directory is known, and may be
    written, only once a command's checks passed (``finetune`` reads it from the checkpoint), so the lines logged
    before (the dataset, the resume target) wait in memory until :meth:`keep_in` names it; a command refused before
    writes no log. The file is appended to (a resumed run continues its log), and the handlers are removed when the
    block ends (``--multirun`` jobs share one process)."""

    def __init__(self, name: str, enabled: bool = True):
        self.name, self.enabled = name, enabled  # enabled=False (DDP ranks > 0): keeps and writes nothing
        self.buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1,
                                                     flushOnClose=False)
        self.loggers = [logging.getLogger(), *(logger for logger in map(logging.getLogger, _OWN_HANDLER_LOGGERS)
                                               if not logger.propagate)]
        self.file: _RunLogFile | None = None

    def keep_in(self, run_dir: str | Path) -> None:
        if self.file is not None or not self.enabled:
            return
        self.file = _RunLogFile(Path(run_dir) / f"{self.name}.log", encoding="utf-8")
        self.file.setFormatter(logging.Formatter(FILE_FORMAT))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self.buffer.capacity = 0  # from now on every record is written as it comes

    def file_only(self, message: str, level: int = logging.INFO, exc_info=None) -> None:
        """``message`` in the log file only (the command line that starts a run's segment; an error the command
        reports on stderr itself; ``exc_info``: a traceback to keep with it)."""
        if self.enabled:
            self.buffer.handle(LOG.makeRecord(LOG.name, level, __file__, 0, message, None, exc_info))

    def __enter__(self) -> "RunLog":
        for logger in self.loggers if self.enabled else ():
            logger.addHandler(self.buffer)
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None and not issubclass(kind, SystemExit):  # a bug's traceback, kept with the run's lines
            self.file_only("the command failed", logging.ERROR, (kind, error, trace))
        for logger in self.loggers:
            logger.removeHandler(self.buffer)
        if self.file is not None:
            self.buffer.flush()
            self.file.close()
        self.buffer.close()

