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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from manip.data.errors import DatasetError
from manip.data.replay import Transitions

DEFAULT_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
REWARD_MODES = ("r-1", "r")


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

    @property
    def env_name(self) -> str:
        return self.env_args["env_name"]


def _demo_sort_key(name: str) -> int:
    return int(name.split("_")[-1])


def read_env_args(path: str | Path) -> dict:
    """The ``data.attrs["env_args"]`` JSON of a Robomimic file."""
    import h5py

    path = _existing(path)
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise DatasetError(f"{path}: missing HDF5 group 'data'")
        if "env_args" not in f["data"].attrs:
            raise DatasetError(f"{path}: missing attribute data.attrs['env_args']")
        return json.loads(f["data"].attrs["env_args"])


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"Robomimic dataset not found: {path}. Put the real file there (e.g. "
            f"data/robomimic/lift/mh/low_dim_v15.hdf5 from robomimic's v1.5 release) or generate "
            f"one with `python -m manip.data.generate robomimic --task lift --out {path}`.")
    return path


def load_robomimic(path: str | Path, obs_keys: Sequence[str] = DEFAULT_OBS_KEYS,
                   filter_key: str | None = None, reward_mode: str = "r-1",
                   action_clip: float = 1 - 1e-5) -> RobomimicData:
    """Read a Robomimic low-dim file into flat transitions.

    obs_keys: observation keys concatenated in this order (default: the 4 standard low-dim keys).
    filter_key: a ``mask/<filter_key>`` subset of demos (None: every demo).
    reward_mode: ``"r-1"`` (QC, default) or ``"r"`` (the file's sparse 0/1 reward).
    action_clip: dataset actions are clipped to +-action_clip (FQL/QC use 1 - 1e-5).
    """
    import h5py

    if reward_mode not in REWARD_MODES:
        raise DatasetError(f"unknown reward_mode {reward_mode!r}; expected one of {REWARD_MODES}")
    obs_keys = tuple(obs_keys)
    if not obs_keys:
        raise DatasetError("obs_keys is empty")
    path = _existing(path)
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise DatasetError(f"{path}: missing HDF5 group 'data'")
        data = f["data"]
        if "env_args" not in data.attrs:
            raise DatasetError(f"{path}: missing attribute data.attrs['env_args']")
        env_args = json.loads(data.attrs["env_args"])
        demos = sorted((k for k in data.keys() if k.startswith("demo_")), key=_demo_sort_key)
        if filter_key is not None:
            masks = f.get("mask")
            if masks is None or filter_key not in masks:
                available = sorted(masks.keys()) if masks is not None else []
                raise DatasetError(f"{path}: filter key 'mask/{filter_key}' not found; available: {available}")
            demos = sorted((d.decode() if isinstance(d, bytes) else str(d) for d in masks[filter_key][()]),
                           key=_demo_sort_key)
        if not demos:
            where = f"filter key 'mask/{filter_key}'" if filter_key else "group 'data'"
            raise DatasetError(f"{path}: {where} selects no demos")

        parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                              ("obs", "next_obs", "actions", "rewards", "dones", "ends")}
        key_dims: dict[str, int] = {}
        for demo in demos:
            if demo not in data:
                raise DatasetError(f"{path}: filter key 'mask/{filter_key}' names {demo}, which is not in 'data'")
            g = data[demo]
            for name in ("actions", "rewards", "dones", "obs", "next_obs"):
                if name not in g:
                    raise DatasetError(f"{path}: missing key 'data/{demo}/{name}'")
            obs, next_obs = [], []
            for key in obs_keys:
                if key not in g["obs"]:
                    raise DatasetError(
                        f"{path}: unknown observation key {key!r} in 'data/{demo}/obs'; "
                        f"available: {sorted(g['obs'].keys())}")
                if key not in g["next_obs"]:
                    raise DatasetError(f"{path}: missing key 'data/{demo}/next_obs/{key}'")
                o = np.asarray(g["obs"][key], dtype=np.float32).reshape(len(g["actions"]), -1)
                key_dims.setdefault(key, o.shape[1])
                obs.append(o)
                next_obs.append(np.asarray(g["next_obs"][key], dtype=np.float32).reshape(len(o), -1))
            arrays = {"obs": np.concatenate(obs, 1), "next_obs": np.concatenate(next_obs, 1),
                      "actions": np.asarray(g["actions"], dtype=np.float32),
                      "rewards": np.asarray(g["rewards"], dtype=np.float32).reshape(-1),
                      "dones": np.asarray(g["dones"]).astype(bool).reshape(-1)}
            for name, value in arrays.items():
                if not np.isfinite(value).all():
                    raise DatasetError(f"{path}: NaN or inf in 'data/{demo}/{name}' "
                                       f"(first bad row {int(np.argwhere(~np.isfinite(value))[0][0])})")
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
    return RobomimicData(transitions, env_args, obs_keys, key_dims, demos, str(path))
