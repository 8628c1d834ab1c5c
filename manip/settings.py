"""Checks of user settings, with errors that name the setting by its config key.

Pure Python, so that modules needing only torch (the agents, ``manip.bench``) can use them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import IO

from manip.cli_args import raise_if_interrupted


# The project's Hydra configs (conf/ beside the package), whose files declare the settings the commands read.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


class SettingError(ValueError):
    """A user setting (evaluation, checkpointing, fine-tuning, agent) is out of range or does not apply to the
    checkpoint; the message names it by its config key."""


def check_int(value, key: str, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a float with an integer value, such as Hydra's
    ``1e5``, counts); a SettingError naming ``key`` otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SettingError(f"{key} must be >= {minimum}, got {value}")
    return int(value)


def check_real(value, key: str, minimum: float, strict: bool = False, maximum: float | None = None) -> float:
    """``value`` if it is a finite number >= ``minimum`` (> with ``strict``) and <= ``maximum`` (when given); a
    SettingError naming ``key`` otherwise."""
    if strict:
        bound = f"> {minimum}" if maximum is None else f"in ({minimum}, {maximum}]"
    else:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(f"{key} must be a number {bound}, got {value!r}")
    low_ok = value > minimum if strict else value >= minimum
    if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
        raise SettingError(f"{key} must be {bound}, got {value}")
    return float(value)


def check_bool(value, key: str) -> bool:
    """``value`` if it is true or false; a SettingError naming ``key`` otherwise (``act_compile=no`` is a string,
    which Python would take as true)."""
    if not isinstance(value, bool):
        raise SettingError(f"{key} must be true or false, got {value!r}")
    return value


def check_threads(value, key: str = "threads") -> int | None:
    """``value`` if it is null (torch's default number of CPU threads) or a count >= 1; a SettingError naming
    ``key`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SettingError(f"{key} must be an integer >= 1 or null (torch's default), got {value!r}")
    return int(value)


def find_class(target, key: str) -> type:
    """The class a config's ``_target_`` names (``package.module.Class``); a SettingError naming ``key`` when it
    cannot be imported (Hydra's own lookup would end the command in a traceback)."""
    module_name, _, class_name = str(target).rpartition(".")
    if not module_name:
        raise SettingError(f"{key} must be a dotted path package.module.Class, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise_if_interrupted(err)
        raise SettingError(f"{key}={target}: cannot import {module_name} ({err})") from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise SettingError(f"{key}={target}: {module_name} has no class {class_name}")
    return found


def unknown_key_error(key: str, known, section: str = "", owner: str | None = None) -> SettingError:
    """``unknown <section>.<key>; did you mean <section>.<closest>?``, else naming the keys ``section`` has (or
    ``owner``, the class whose constructor takes them, takes)."""
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    listed = ", ".join(sorted(str(k) for k in known))
    hint = (f"did you mean {prefix}{close[0]}?" if close
            else f"{owner} takes {listed}" if owner else f"{section or 'the config'} has {listed}")
    return SettingError(f"unknown {prefix}{key}; {hint}")


def check_known_keys(target: type, settings, section: str, given: tuple[str, ...] = ()) -> None:
    """``SettingError`` naming the first key of ``settings`` (``_``-keys such as ``_target_`` aside) that
    ``target``'s constructor does not take; keys in ``given`` are passed by the entry points, not by the config.
    Hydra would end the command in a traceback instead."""
    arguments = constructor_arguments(target)
    if arguments is None:
        return
    takes = [name for name in arguments if name not in given]
    unknown = sorted(str(k) for k in settings if not str(k).startswith("_") and k not in takes)
    if unknown:
        raise unknown_key_error(unknown[0], takes, section, owner=target.__name__)


def check_declared_settings(cfg, config_name: str) -> None:
    """Every key of a single-file command's config (``evaluate``, ``export``) is one ``conf/<config_name>.yaml``
    declares: ``+episode=2`` is refused by name (``SettingError``), not ignored; and a key declared true or false
    is given true or false (:func:`check_bool`)."""
    from omegaconf import OmegaConf

    declared = {key: value for key, value in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")
                                                                     ).items() if key not in ("defaults", "hydra")}
    for key in cfg:
        if key not in declared:
            raise unknown_key_error(key, list(declared))
        if isinstance(declared[key], bool):
            check_bool(cfg[key], key)


def first_free_path(path: Path) -> Path:
    """``path`` itself if it does not exist, else the first free ``<stem>.<k><suffix>`` (k = 1, 2, ...) beside it."""
    free, k = path, 0
    while free.exists():
        k += 1
        free = path.with_name(f"{path.stem}.{k}{path.suffix}")
    return free


def run_folder(file: str | Path, name: str) -> Path:
    """The folder ``name`` of the run a checkpoint or exported program belongs to: ``<run_dir>/<name>`` for a file in
    ``<run_dir>/checkpoints/`` or ``<run_dir>/export/``, ``<its directory>/<name>`` for a file kept elsewhere."""
    file = Path(file).resolve()
    return (file.parent.parent if file.parent.name in ("checkpoints", "export") else file.parent) / name


def publish_new(written: Path, path: Path) -> Path:
    """Gives the finished file ``written`` (in ``path``'s directory) the name ``path``, or, where a file of that
    name exists (an earlier command's, another command's running beside this one), the first free
    ``<stem>.<k><suffix>``; that file is kept, with a warning naming both. A hard link, so no file is ever replaced.
    Returns the name given."""
    target, links = path, True
    while True:
        try:
            if links:
                os.link(written, target)
            else:  # a file system without hard links: the name taken by an exclusive create, then moved onto
                open(target, "xb").close()
        except FileExistsError:
            target = first_free_path(path)
            continue
        except OSError:
            if not links:
                raise
            links = False
            continue
        break
    if links:
        written.unlink()
    else:
        os.replace(written, target)
    if target != path:
        logging.getLogger("manip").warning("%s exists and is kept; writing %s instead", path, target)
    return target


def open_new(path: str | Path, binary: bool = False) -> tuple[IO, Path]:
    """``path`` created and opened for writing, its directories made; where a file appeared there after the
    command's checks, that file is kept and the first free ``<stem>.<k><suffix>`` beside it is opened instead (with
    a warning naming both). Returns (open file, the path it writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path
    while True:
        try:
            handle = open(target, "xb" if binary else "x")  # exclusive: never replaces a file
        except FileExistsError:
            target = first_free_path(path)
            continue
        if target != path:
            logging.getLogger("manip").warning("%s appeared while the command ran and is kept; writing %s instead",
                                               path, target)
        return handle, target


def write_result(path: str | Path, text: str, command: str, printed: bool = False) -> Path:
    """``text`` in a new file at ``path``, or at the first free ``<stem>.<k><suffix>`` where a file of that name
    appeared meanwhile (:func:`publish_new`); returns the path written. The text goes to a temporary file first, so a
    reader never sees half a result. On a full or read-only disk no file is left, ``text`` goes to stdout (unless the
    command ``printed`` it already) and the command ends with one line naming the file: the work is not lost."""
    path = Path(path)
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = temp_file_next_to(path)  # a reader never sees half a result
        partial.write_text(text)
        return publish_new(partial, path)
    except BaseException as err:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        if not printed:
            print(text)
        raise SystemExit(f"{command}: cannot write {path} ({err.strerror}); the result is printed above") from None


def check_output(out: str | Path, example: str = "result.json", what: str = "the result", kind: str = "JSON file"
                 ) -> Path:
    """``out`` if ``what`` can be written there once the command's work is done; a ``SettingError`` naming
    ``out`` when it is a directory, an existing file (kept: a command writes a new file), lies under a file, or its
    nearest existing directory is not writable."""
    out = Path(out).expanduser()
    path = Path(os.path.abspath(out))
    if path.is_dir():
        raise SettingError(f"out={out} is a directory; name the {kind} to write (e.g. out={out / example})")
    if path.exists():
        raise SettingError(f"out={out} exists and is kept; name a new file (or leave out unset: the default path "
                           f"never replaces a file)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SettingError(f"out={out}: {parent} is a file, so no directory can be made for {what}")
    if (refused := cannot_write_in(parent)) is not None:
        raise SettingError(f"out={out}: cannot write in {parent} ({refused})")
    return out


def cannot_write_in(directory: str | Path) -> str | None:
    """None where ``directory`` takes new entries (a directory is made in it and removed at once), else the
    system's reason ("Permission denied", "Read-only file system"). Asked before a command's work, so that its result
    or run is not lost at the end; ``os.access`` says yes to root even where the file system refuses."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".manip-", dir=directory))
    except OSError as err:
        return err.strerror or str(err)
    return None


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


def constructor_parameters(target: type) -> tuple[list[inspect.Parameter], bool]:
    """The keyword parameters ``target(...)`` takes, following ``**kwargs`` handed on to the base classes'
    constructors (a subclass's first), and whether some constructor takes any keyword (then they are not all)."""
    found = []
    for cls in inspect.getmro(target):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        found += [p for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return found, False
    return found, True


def constructor_arguments(target: type) -> list[str] | None:
    """The keyword arguments ``target(...)`` takes (:func:`constructor_parameters`); None when some constructor
    takes any keyword."""
    parameters, any_keyword = constructor_parameters(target)
    return None if any_keyword else [p.name for p in parameters]
