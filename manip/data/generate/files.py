"""Where generated datasets are written: their directory checked before the episodes, and the temporary files
(:func:`manip.settings.temp_file_next_to`) they are written to before they are moved into place."""

from __future__ import annotations

from pathlib import Path

from manip.settings import cannot_write_in, new_file_mode, temp_file_next_to

__all__ = ["CannotWriteError", "make_room_for", "new_file_mode", "temp_file_next_to"]


class CannotWriteError(OSError):
    """A generated dataset's directory cannot be made, or a file written in it (permissions, a read-only file
    system): raised before the episodes are generated, not after."""


def make_room_for(path: str | Path) -> None:
    """Makes ``path``'s directory and checks that it can be written (:func:`~manip.settings.cannot_write_in`);
    ``CannotWriteError`` naming ``path`` and the system's reason otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CannotWriteError(f"cannot write {path} ({err.strerror or err})") from None
    if (refused := cannot_write_in(path.parent)) is not None:
        raise CannotWriteError(f"cannot write {path} ({refused})")
