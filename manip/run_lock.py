"""One command at a time per run directory.

Two ``fit`` or ``finetune`` commands writing into the same ``run_dir`` (two jobs started in the same second with a
timestamped default, two fine-tuning seeds from one checkpoint without a ``run_dir`` each, a resume started while
the run still runs) would interleave their checkpoints and ``metrics.csv``. The main process of a run therefore holds
an exclusive lock (``flock``) on ``<run_dir>/.lock`` while it runs; the kernel drops it when the process ends, however
it ends (Ctrl-C, SIGKILL, a crash), so a run directory is never left locked by a run that is gone. The file itself
stays, and holds the pid, host, start time and command of the run that holds it, for the refusal message.

:func:`check_free` runs first, before the command reads the run directory (it only opens a lock file that is
already there); :func:`claim` runs where the run starts writing, after its checks passed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from manip.logs import LOG
from manip.settings import SettingError

LOCK_NAME = ".lock"

# absolute run directory -> the open lock file this process holds its lock through
_HELD: dict[str, int] = {}


class RunDirInUse(SettingError):
    """Another live process holds the run directory's lock."""


def _key(run_dir: str | Path) -> str:
    return os.path.abspath(Path(run_dir).expanduser())


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f" ({text[:200]}{'...' if len(text) > 200 else ''})" if text else ""


def _lock(fd: int, lock_path: Path, run_dir: str | Path) -> bool:
    """Takes the lock on ``fd`` (closed on failure). False where the file system has no locks (the run goes on
    unlocked, with a warning); ``RunDirInUse`` where another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        os.close(fd)
        raise RunDirInUse(f"{run_dir} is in use by another run{_holder(lock_path)}; wait for it to end, or give "
                          f"this command another run_dir") from None
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            LOG.warning(f"{lock_path}: the file system offers no file locks ({err.strerror}), so nothing stops a "
                        f"second command from writing into {run_dir} while this one runs")
            return False
        raise SettingError(f"{lock_path}: cannot lock the run directory ({err.strerror})") from None


def _record(fd: int, command: str) -> None:
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)


def check_free(run_dir: str | Path, command: str) -> None:
    """``RunDirInUse`` when a live process holds ``run_dir``'s lock; otherwise, where the lock file exists, this
    process takes the lock (and holds it until :func:`release`), recording ``command`` as its holder. Creates
    nothing: a refused command leaves the directory as it was."""
    key = _key(run_dir)
    if key in _HELD:
        return
    lock_path = Path(key) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        raise SettingError(f"{lock_path}: cannot open the run directory's lock file ({err.strerror})") from None
    if _lock(fd, lock_path, run_dir):
        _HELD[key] = fd
        _record(fd, command)


def claim(run_dir: str | Path, command: str) -> None:
    """Makes ``run_dir`` and holds its lock until :func:`release` or the end of the process, recording ``command``
    (the command line) as its holder. ``RunDirInUse`` when another live process holds it."""
    key = _key(run_dir)
    if key not in _HELD:
        try:
            Path(key).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SettingError(f"cannot make the run directory {run_dir} ({err.strerror})") from None
        lock_path = Path(key) / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise SettingError(f"{lock_path}: cannot create the run directory's lock file ({err.strerror})") from None
        if not _lock(fd, lock_path, run_dir):
            return
        _HELD[key] = fd
        _record(fd, command)


def release() -> None:
    """Drops every run-directory lock this process holds (the end of a command; process exit does it too)."""
    while _HELD:
        _, fd = _HELD.popitem()
        try:
            os.ftruncate(fd, 0)  # no stale holder in the file
        except OSError:
            pass
        os.close(fd)


def held() -> list[str]:
    """The run directories whose lock this process holds (absolute paths)."""
    return sorted(_HELD)
