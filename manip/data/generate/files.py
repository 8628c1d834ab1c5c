"""Temporary files that generated datasets are written to before they are moved into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class CannotWriteError(OSError):
    """A generated dataset's directory cannot be made, or a file written in it (permissions, a read-only file
    system): raised before the episodes are generated, not after."""


def make_room_for(path: str | Path) -> None:
    """Makes ``path``'s directory and checks that a file can be created there (one is made and removed at once);
    ``CannotWriteError`` naming ``path`` and the system's reason otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_file_next_to(path).unlink()
    except OSError as err:
        raise CannotWriteError(f"cannot write {path} ({err.strerror or err})") from None


def new_file_mode() -> int:
    """Permission bits a newly created file gets from the process umask (``0o644`` under the usual ``022``)."""
    umask = os.umask(0o022)  # os.umask only reads the mask by replacing it; the old mask is put back at once
    os.umask(umask)
    return 0o666 & ~umask


def temp_file_next_to(path: str | Path) -> Path:
    """Create an empty temporary file in ``path``'s directory, to be written and then moved onto ``path``.

    ``tempfile.mkstemp`` creates it readable by the owner only; its mode is set to :func:`new_file_mode`, so the
    file moved into place has the permissions a plain ``open(path, "w")`` would have given it.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    os.close(fd)
    return Path(name)
