"""OGBench single-task datasets (local ``.npz`` files) as ``Transitions``.

A singletask dataset name such as ``cube-double-play-singletask-task2-v0`` names the env
(``cube-double-singletask-task2-v0``), the data file (``cube-double-play-v0.npz`` plus its
``cube-double-play-v0-val.npz`` validation split) and the task whose rewards are used. Loading uses
OGBench's own pieces: ``ogbench.utils.load_dataset`` (drops each episode's last state and builds
``next_observations``) and ``ogbench.relabel_utils.relabel_dataset`` (rewards and masks of the
fixed task from the stored ``qpos``/``button_states``), exactly what
``ogbench.make_env_and_datasets`` does for singletask names. Rewards are
``#solved subtasks - #subtasks`` (cube-single: {-1, 0}); masks are 0 only where every subtask is
solved; ``terminals`` mark trajectory ends, not successes. Dataset actions are clipped to
``+-(1 - 1e-5)`` as FQL and QC do.

Unlike ``make_env_and_datasets``, which requires the ``-val.npz`` sibling, a missing validation
file gives ``val=None``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manip.data.errors import GENERATED_MARKER, DatasetError, check_action_range, generated_description
from manip.data.generate.ogbench_play import DATASETS, val_path_for
from manip.data.replay import Transitions
from manip.envs.ogbench_env import quiet_space_casts

log = logging.getLogger(__name__)

ENV_FAMILIES = (
    "cube-single",
    "cube-double",
    "cube-triple",
    "cube-quadruple",
    "scene",
    "puzzle-3x3",
    "puzzle-4x4",
    "puzzle-4x5",
    "puzzle-4x6",
)
DATASET_TYPES = ("play", "noisy")
# Task used by a singletask name without ``-taskN`` (OGBench README; set in each env's ``set_tasks``).
DEFAULT_TASKS = {
    "cube-single": 2,
    "cube-double": 2,
    "cube-triple": 2,
    "cube-quadruple": 2,
    "scene": 2,
    "puzzle-3x3": 4,
    "puzzle-4x4": 4,
    "puzzle-4x5": 2,
    "puzzle-4x6": 2,
}
ACTION_CLIP = 1.0 - 1e-5

_NAME = re.compile(
    rf"^(?P<env>{'|'.join(ENV_FAMILIES)})-(?P<type>{'|'.join(DATASET_TYPES)})"
    r"-singletask(?P<task>-task(?P<id>[1-5]))?-v0$"
)


@dataclass
class OGBenchData:
    """Training and validation transitions of one OGBench singletask dataset.

    ``val`` is None when the ``-val.npz`` sibling does not exist. ``env_name`` is the singletask
    env (``cube-double-singletask-task2-v0``), ``dataset_name`` the singletask dataset name that
    was loaded (``cube-double-play-singletask-task2-v0``).
    """

    train: Transitions
    val: Transitions | None
    env_name: str
    dataset_name: str
    obs_dim: int
    action_dim: int
    generated: dict | None = None  # the marker of a file manip generated (None: a released file)


def _valid_names_message() -> str:
    return (
        f"expected '<env>-<type>-singletask[-task<1..5>]-v0' with env in {', '.join(ENV_FAMILIES)} "
        f"and type in {', '.join(DATASET_TYPES)}, e.g. 'cube-double-play-singletask-task2-v0'"
    )


def split_singletask_name(name: str) -> tuple[str, str, int]:
    """Split a singletask dataset name into (env name, dataset file stem, task id).

    ``"cube-double-play-singletask-task2-v0"`` -> ``("cube-double-singletask-task2-v0",
    "cube-double-play-v0", 2)``. Without ``-taskN`` the env's default task id is returned
    (cube and scene 2, puzzle-3x3/4x4 4, puzzle-4x5/4x6 2).
    """
    match = _NAME.match(name)
    if match is None:
        raise DatasetError(f"unknown OGBench singletask dataset {name!r}: {_valid_names_message()}")
    env, dataset_type, task = match["env"], match["type"], match["task"] or ""
    task_id = int(match["id"]) if match["id"] else DEFAULT_TASKS[env]
    return f"{env}-singletask{task}-v0", f"{env}-{dataset_type}-v0", task_id


def _missing_file_message(path: Path, stem: str) -> str:
    message = (
        f"OGBench dataset file not found: {path}. Put the official '{stem}.npz' and '{stem}-val.npz' "
        "(https://rail.eecs.berkeley.edu/datasets/ogbench, by default kept in ~/.ogbench/data) at that path"
    )
    if stem in DATASETS:
        command = f"python -m manip.data.generate ogbench --dataset {stem} --out {path}"
        return f"{message}, or generate a local one: {command}"
    return f"{message}; only {', '.join(DATASETS)} can be generated locally."


def _member_shape(file: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    """Shape of one npz member read from its .npy header, without decompressing the array."""
    name = key if key in file.zip.namelist() else f"{key}.npy"
    with file.zip.open(name) as member:
        major, _ = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read_header(member)[0]


def _check_keys(path: Path, env_name: str) -> tuple[dict[str, tuple], np.ndarray]:
    """Raise DatasetError unless ``path`` is an npz holding every key the singletask loader needs; returns the
    file's shape of each key it checked (``load_dataset`` then drops each episode's last row) and its terminals
    (rows,) as stored.

    ogbench's ``load_dataset`` indexes every key with a mask built from ``terminals``, so all keys
    need one row per observation and the last row must end an episode.
    """
    required = ["observations", "actions", "terminals", "qpos"]
    if env_name.startswith(("scene", "puzzle")):
        required.append("button_states")
    try:
        file = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path} is not a readable .npz file: {err}") from err
    if not isinstance(file, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} holds a single .npy array of shape {np.shape(file)}, not an .npz archive "
                           f"with keys {', '.join(required)}")
    with file:
        keys = set(file.files)
        for key in required:
            if key not in keys:
                raise DatasetError(
                    f"{path} has no key {key!r} (keys: {', '.join(sorted(keys))}); "
                    f"OGBench singletask relabelling of {env_name} needs {', '.join(required)}"
                )
        try:
            shapes = {key: _member_shape(file, key) for key in (*required, "qvel", "button_states") if key in keys}
            terminals = np.asarray(file["terminals"])
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DatasetError(f"{path} is not a readable .npz file: {err}") from err
    rows = shapes["observations"][:1]
    if rows in ((), (0,)):
        raise DatasetError(
            f"{path}: key 'observations' has shape {shapes['observations']}; expected (rows, obs_dim)"
        )
    for key, shape in shapes.items():
        if shape[:1] != rows:
            raise DatasetError(
                f"{path}: key {key!r} has shape {shape}, but 'observations' has {rows[0]} rows "
                f"(shape {shapes['observations']}); every key needs one row per step"
            )
    other = np.setdiff1d(np.unique(terminals), [0, 1])  # NaN too
    if len(other):
        raise DatasetError(f"{path}: key 'terminals' holds {other[0].item()}; expected 0 or 1 in every row (1 ends an "
                           f"episode)")
    if not terminals.reshape(len(terminals), -1)[-1].all():
        raise DatasetError(
            f"{path}: key 'terminals' is false in the last row ({int(np.count_nonzero(terminals))} set of "
            f"{len(terminals)}): the last episode is incomplete"
        )
    if terminals.all():  # each episode's last row only ends the one before it
        raise DatasetError(f"{path}: key 'terminals' is true in every row: every episode is one step long, which "
                           f"leaves no transitions")
    return shapes, terminals.reshape(len(terminals), -1)[:, 0]


def _check_finite(path: Path, data: dict[str, np.ndarray], file_terminals: np.ndarray) -> None:
    """Raise DatasetError naming the key, the file's row and its episode at the first NaN/inf in the observations,
    actions or the ``qpos``/``button_states`` the rewards are relabelled from (NaN there would read as "not solved").

    ``data`` is ``load_dataset``'s, which drops each episode's last row (its observation is kept as the previous
    row's next observation); ``file_terminals`` (rows,), the file's, maps its rows back to the file's."""
    ends = file_terminals.astype(bool)  # 0 / 1 (_check_keys)
    kept = np.flatnonzero(~ends)  # the file's row of each loaded row
    episode_of_row = np.cumsum(ends) - ends
    checked = [("observations", (("observations", kept), ("next_observations", kept + 1))),
               ("actions", (("actions", kept),)), ("qpos", (("qpos", kept),))]
    if "button_states" in data:
        checked.append(("button_states", (("button_states", kept),)))
    for key, arrays in checked:
        bad_rows = [rows[~np.isfinite(data[name].reshape(len(rows), -1)).all(axis=1)] for name, rows in arrays]
        bad_rows = np.concatenate(bad_rows)
        if len(bad_rows):
            row = int(bad_rows.min())
            raise DatasetError(f"{path}: key {key!r} contains NaN/inf, first at row {row} "
                               f"(episode {int(episode_of_row[row])})")


def _load_split(path: Path, env_name: str, env) -> Transitions:
    """One npz file -> relabelled Transitions; ``env`` is the singletask env used for relabelling."""
    from ogbench.relabel_utils import relabel_dataset
    from ogbench.utils import load_dataset

    shapes, terminals = _check_keys(path, env_name)
    try:
        data = load_dataset(str(path), compact_dataset=False, add_info=True)
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # a member that fails its CRC, a truncated array
        raise DatasetError(f"{path} is not a readable .npz file: {err}") from err
    obs_dim = env.observation_space.shape[0]
    if data["observations"].ndim != 2 or data["observations"].shape[1] != obs_dim:
        raise DatasetError(
            f"{path}: key 'observations' has shape {shapes['observations']}, "
            f"but {env_name} observations have {obs_dim} dims (is this the right dataset file?)"
        )
    action_dim = env.action_space.shape[0]
    if data["actions"].ndim != 2 or data["actions"].shape[1] != action_dim:
        raise DatasetError(
            f"{path}: key 'actions' has shape {shapes['actions']}, "
            f"but {env_name} actions have {action_dim} dims (is this the right dataset file?)"
        )
    _check_finite(path, data, terminals)
    check_action_range(path, "key 'actions'", data["actions"])
    relabel_dataset(env_name, env, data)
    return Transitions(
        observations=data["observations"],
        actions=np.clip(data["actions"], -ACTION_CLIP, ACTION_CLIP),
        rewards=data["rewards"],
        masks=data["masks"],
        terminals=data["terminals"].astype(bool),
        next_observations=data["next_observations"],
    )


def load_ogbench(dataset_name: str, path: str | Path) -> OGBenchData:
    """Load an OGBench singletask dataset from a local file.

    Args:
        dataset_name: singletask dataset name, e.g. ``"cube-double-play-singletask-task2-v0"``.
        path: the training ``.npz`` (e.g. ``.../cube-double-play-v0.npz``); its ``<stem>-val.npz``
            sibling, if present, is the validation split.

    Returns:
        OGBenchData whose ``train``/``val`` Transitions have observations (N, obs_dim) float32,
        actions (N, 5) float32 clipped to +-(1 - 1e-5), rewards (N,) float32 from OGBench's
        singletask relabelling, masks (N,) float32, terminals (N,) bool (episode ends),
        next_observations (N, obs_dim) float32; N = episodes * (steps per episode - 1).

    Raises:
        DatasetError: unknown dataset name, missing file or key, keys of different lengths, an
            incomplete last episode, wrong observation or action size, or NaN/inf in observations,
            actions, qpos or button_states.
    """
    import ogbench

    env_name, stem, _ = split_singletask_name(dataset_name)
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise DatasetError(f"OGBench dataset path must be a .npz file, got {path}")
    if not path.is_file():
        raise DatasetError(_missing_file_message(path, stem))
    val_path = val_path_for(path)

    with quiet_space_casts():
        env = ogbench.make_env_and_datasets(dataset_name, env_only=True)
        try:
            train = _load_split(path, env_name, env)
            if val_path.is_file():
                val = _load_split(val_path, env_name, env)
            else:
                log.warning("no validation split %s; loading %s without validation data", val_path, path)
                val = None
        finally:
            env.close()
    return OGBenchData(
        train=train,
        val=val,
        env_name=env_name,
        dataset_name=dataset_name,
        obs_dim=train.obs_dim,
        action_dim=train.action_dim,
        generated=_generated(path),
    )


def _generated(path: Path) -> dict | None:
    """The ``manip_generated`` marker of a file manip generated; None for a released file."""
    with np.load(path) as file:
        return generated_description(file[GENERATED_MARKER]) if GENERATED_MARKER in file.files else None
