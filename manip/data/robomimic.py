"""Robomimic low-dim HDF5 reader (h5py only; robomimic itself is not required).

Layout read (robomimic v1.5 files and the files written by ``manip.data.generate``)::

    data                 attrs: env_args (JSON), total
    data/demo_<i>/obs/<key>, data/demo_<i>/next_obs/<key>   (N_i, key_dim)
    data/demo_<i>/actions (N_i, A), rewards (N_i,), dones (N_i,)
    mask/<filter>        demo names as bytes (train, valid, 20_percent, ...)

Rewards follow a configurable convention; the default ``"r-1"`` is QC's: ``r - 1`` (so -1 per step
and 0 on success) with the bootstrap cut at every ``done`` (robomimic's done_mode 2 marks success
states and the last step). ``terminals`` mark the end of each demo and every ``done`` step, as QC
treats them, so action chunks never run past a success state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from manip.data.errors import GENERATED_MARKER, DatasetError, check_action_range, generated_description
from manip.data.replay import Transitions

DEFAULT_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
REWARD_MODES = ("r-1", "r")
ROBOSUITE_ENV_TYPE = 1  # env_args["type"] of robosuite datasets (robomimic EnvType.ROBOSUITE_TYPE)


@dataclass
class RobomimicData:
    """What a Robomimic file holds, in the order the policy sees it.

    ``obs_key_dims`` records the width of every concatenated key in ``obs_keys`` order.
    """

    transitions: Transitions
    env_args: dict
    obs_keys: tuple[str, ...]
    obs_key_dims: dict[str, int]
    demos: list[str] = field(default_factory=list)
    path: str = ""
    generated: dict | None = None  # the marker of a file manip generated (None: a released file)

    @property
    def env_name(self) -> str:
        return self.env_args["env_name"]


_DEMO_NAME = re.compile(r"demo_\d+")


def _sorted_demos(path: Path, names, where: str) -> list[str]:
    """Demo names in robomimic's order (``int(name[5:])``); every name must be ``demo_<int>``."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    odd = [n for n in names if not _DEMO_NAME.fullmatch(n)]
    if odd:
        raise DatasetError(f"{path}: {where} holds {odd[:5]}{' ...' if len(odd) > 5 else ''}, "
                           f"not named 'demo_<int>' as robomimic demos are")
    return sorted(names, key=lambda n: int(n[5:]))


def _open(path: Path):
    """The file opened read-only with h5py; anything h5py cannot open is a DatasetError."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path} is not a readable HDF5 file: {err}") from err


def _env_args(path: Path, f) -> dict:
    """``data.attrs["env_args"]`` parsed; it must name the env (``env_name``)."""
    if "data" not in f:
        raise DatasetError(f"{path}: missing HDF5 group 'data'")
    if "env_args" not in f["data"].attrs:
        raise DatasetError(f"{path}: missing attribute data.attrs['env_args']")
    raw = f["data"].attrs["env_args"]
    try:
        env_args = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: data.attrs['env_args'] is not valid JSON ({err}): {str(raw)[:80]!r}") from err
    if not isinstance(env_args, dict) or "env_name" not in env_args:
        raise DatasetError(f"{path}: data.attrs['env_args'] has no 'env_name': {str(raw)[:80]!r}")
    if env_args.get("type", ROBOSUITE_ENV_TYPE) != ROBOSUITE_ENV_TYPE:
        raise DatasetError(f"{path}: data.attrs['env_args'] has type {env_args['type']!r}; only robosuite datasets "
                           f"(type {ROBOSUITE_ENV_TYPE}) are supported")
    return env_args


def read_env_args(path: str | Path) -> dict:
    """The ``data.attrs["env_args"]`` JSON of a Robomimic file."""
    path = _existing(path)
    with _open(path) as f:
        return _env_args(path, f)


def _finite(path: Path, key: str, values: np.ndarray) -> np.ndarray:
    """``values`` (rows first) if all are finite; a DatasetError naming ``key`` and the first bad row otherwise."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise DatasetError(f"{path}: NaN or inf in '{key}' (first bad row {int(np.argwhere(bad)[0][0])})")
    return values


SCRIPTED_TASKS = ("lift", "can", "square")  # the tasks manip.data.generate robomimic writes demos for


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise DatasetError(f"Robomimic dataset {path} is a directory; data.path names the .hdf5 file "
                           f"(e.g. data/robomimic/lift/mh/low_dim_v15.hdf5)")
    if not path.is_file():
        # the task from the release's layout <task>/<mh|ph>/low_dim_v15.hdf5, for the advice below
        task = next((part for part in reversed(path.parts[:-1]) if part in SCRIPTED_TASKS), None)
        raise DatasetError(
            f"Robomimic dataset not found: {path}. Put the real file there (e.g. "
            f"data/robomimic/{task or 'lift'}/mh/low_dim_v15.hdf5 from robomimic's v1.5 release) or generate "
            f"one with `python -m manip.data.generate robomimic --task {task or '{lift,can,square}'} --out {path}`.")
    return path


def _same_width(path: Path, name: str, shape: tuple, ref_name: str, ref_shape: tuple) -> None:
    """Raise unless ``name`` has as many values per row as ``ref_name``."""
    if int(np.prod(shape[1:])) != int(np.prod(ref_shape[1:])):
        raise DatasetError(f"{path}: '{name}' has shape {shape}, but '{ref_name}' has shape {ref_shape}; "
                           f"their widths must match")


def load_robomimic(path: str | Path, obs_keys: Sequence[str] = DEFAULT_OBS_KEYS,
                   filter_key: str | None = None, reward_mode: str = "r-1",
                   action_clip: float = 1 - 1e-5) -> RobomimicData:
    """Read a Robomimic low-dim file into flat transitions.

    obs_keys: observation keys concatenated in this order (default: the 4 standard low-dim keys).
    filter_key: a ``mask/<filter_key>`` subset of demos (None: every demo).
    reward_mode: ``"r-1"`` (QC, default) or ``"r"`` (the file's sparse 0/1 reward).
    action_clip: dataset actions are clipped to +-action_clip (FQL/QC use 1 - 1e-5).
    """
    if reward_mode not in REWARD_MODES:
        raise DatasetError(f"unknown reward_mode {reward_mode!r}; expected one of {REWARD_MODES}")
    if isinstance(obs_keys, str):
        raise DatasetError(f"obs_keys must be a sequence of observation keys, got the string {obs_keys!r}")
    obs_keys = tuple(obs_keys)
    if not obs_keys:
        raise DatasetError("obs_keys is empty")
    path = _existing(path)
    with _open(path) as f:
        env_args = _env_args(path, f)
        data = f["data"]
        generated = generated_description(data.attrs.get(GENERATED_MARKER))
        if filter_key is None:
            demos = _sorted_demos(path, data.keys(), "group 'data'")
        else:
            masks = f.get("mask")
            if masks is None or filter_key not in masks:
                available = sorted(masks.keys()) if masks is not None else []
                raise DatasetError(f"{path}: filter key 'mask/{filter_key}' not found; available: {available}")
            demos = _sorted_demos(path, masks[filter_key][()], f"filter key 'mask/{filter_key}'")
        if not demos:
            where = f"filter key 'mask/{filter_key}'" if filter_key else "group 'data'"
            raise DatasetError(f"{path}: {where} selects no demos")

        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("obs", "next_obs", "actions", "rewards", "dones", "ends")}
        key_dims: dict[str, int] = {}
        # every demo must be as wide as the first one, or the concatenated columns would not line up
        first: dict[str, tuple[str, tuple]] = {}
        for demo in demos:
            if demo not in data:
                raise DatasetError(f"{path}: filter key 'mask/{filter_key}' names {demo}, which is not in 'data'")
            g = data[demo]
            for name in ("actions", "rewards", "dones", "obs", "next_obs"):
                if name not in g:
                    hint = ("; the file was extracted without next observations (robomimic's "
                            "dataset_states_to_obs.py --exclude-next-obs): extract it again without that flag"
                            if name == "next_obs" else "")
                    raise DatasetError(f"{path}: missing key 'data/{demo}/{name}'{hint}")
            actions = np.asarray(g["actions"], dtype=np.float32)
            if actions.ndim != 2 or len(actions) == 0:
                raise DatasetError(f"{path}: 'data/{demo}/actions' has shape {actions.shape}; "
                                   f"expected (N, action_dim) with N >= 1")
            n = len(actions)
            check_action_range(path, f"'data/{demo}/actions'", actions)
            _same_width(path, f"data/{demo}/actions", actions.shape,
                        *first.setdefault("actions", (f"data/{demo}/actions", actions.shape)))
            # rewards/dones are per step; a length off by one would misalign every later demo
            for name in ("rewards", "dones"):
                shape = g[name].shape
                if shape[:1] != (n,) or int(np.prod(shape)) != n:
                    raise DatasetError(f"{path}: 'data/{demo}/{name}' has shape {shape}; expected ({n},) "
                                       f"like 'data/{demo}/actions' {actions.shape}")
            obs, next_obs = [], []
            for key in obs_keys:
                if key not in g["obs"]:
                    holder = first[key][0] if key in first else next(
                        (f"data/{d}/obs/{key}" for d in demos if d in data and key in data[d].get("obs", {})), None)
                    if holder is not None:  # other demos have it: not a wrong key, a damaged demo
                        raise DatasetError(f"{path}: missing key 'data/{demo}/obs/{key}' ({holder} has it)")
                    raise DatasetError(
                        f"{path}: unknown observation key {key!r} in 'data/{demo}/obs'; "
                        f"available: {sorted(g['obs'].keys())}")
                if key not in g["next_obs"]:
                    raise DatasetError(f"{path}: missing key 'data/{demo}/next_obs/{key}'")
                shapes = {}
                for group, out in (("obs", obs), ("next_obs", next_obs)):
                    name, shape = f"data/{demo}/{group}/{key}", g[group][key].shape
                    if shape[:1] != (n,):
                        raise DatasetError(f"{path}: '{name}' has shape {shape}; expected ({n}, ...), "
                                           f"one row per step of 'data/{demo}/actions' {actions.shape}")
                    if len(shape) > 2:
                        raise DatasetError(f"{path}: '{name}' has shape {shape}, an image per step; manip reads "
                                           f"low-dim observation keys (one vector per step)")
                    shapes[group] = shape
                    out.append(_finite(path, name, np.asarray(g[group][key], dtype=np.float32).reshape(n, -1)))
                _same_width(path, f"data/{demo}/obs/{key}", shapes["obs"],
                            *first.setdefault(key, (f"data/{demo}/obs/{key}", shapes["obs"])))
                _same_width(path, f"data/{demo}/next_obs/{key}", shapes["next_obs"],
                            f"data/{demo}/obs/{key}", shapes["obs"])
                key_dims.setdefault(key, obs[-1].shape[1])
            dones = np.asarray(g["dones"]).reshape(-1)
            not_flag = ~np.isin(dones, (0, 1))  # NaN included: a cast to bool would read it as done
            if not_flag.any():
                row = int(np.argwhere(not_flag)[0][0])
                raise DatasetError(f"{path}: 'data/{demo}/dones' holds {dones[row]!r} at row {row}; dones must be "
                                   f"0 or 1")
            arrays = {"obs": np.concatenate(obs, 1), "next_obs": np.concatenate(next_obs, 1),
                      "actions": _finite(path, f"data/{demo}/actions", actions),
                      "rewards": _finite(path, f"data/{demo}/rewards",
                                         np.asarray(g["rewards"], dtype=np.float32).reshape(-1)),
                      "dones": dones.astype(bool)}
            for name, value in arrays.items():
                parts[name].append(value)
            ends = np.zeros(len(arrays["actions"]), dtype=bool)
            ends[-1] = True
            parts["ends"].append(ends)

    cat = {k: np.concatenate(v) for k, v in parts.items()}
    rewards = cat["rewards"] - 1.0 if reward_mode == "r-1" else cat["rewards"]
    transitions = Transitions(
        observations=cat["obs"], actions=np.clip(cat["actions"], -action_clip, action_clip),
        rewards=rewards.astype(np.float32), masks=(~cat["dones"]).astype(np.float32),
        terminals=cat["dones"] | cat["ends"], next_observations=cat["next_obs"])
    return RobomimicData(transitions, env_args, obs_keys, key_dims, demos, str(path), generated)
