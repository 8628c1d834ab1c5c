"""Checks of user settings, with errors that name the setting by its config key.

Pure Python, so that modules needing only torch (the agents, ``manip.bench``) can use them.
"""

from __future__ import annotations

import importlib
import math
import numbers


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



def find_class(target, key: str) -> type:
    """The class a config's ``_target_`` names (``package.module.Class``); a SettingError naming ``key`` when it
    cannot be imported (Hydra's own lookup would end the command in a traceback)."""
    module_name, _, class_name = str(target).rpartition(".")
    if not module_name:
        raise SettingError(f"{key} must be a dotted path package.module.Class, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SettingError(f"{key}={target}: cannot import {module_name} ({err})") from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise SettingError(f"{key}={target}: {module_name} has no class {class_name}")
    return found
