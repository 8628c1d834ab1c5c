"""Lightning DataModules: offline data in a chunk replay, sampled as an endless stream of batches.

Both modules hold one ``ChunkReplay`` that ``fit`` samples from and ``finetune`` appends online
episodes to, dataset statistics that checkpoints carry, and the ``EnvSpec`` of the matching
simulator. When the default dataset file is absent a small one is generated there once. Sizes and
shares out of range raise ``SettingError`` naming their ``data.`` key when a module is built, before any
file is read or written; checkpoints record the dataset file as an absolute path (``info["path"]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from manip.checkpoint import gather_rank_states, rank_state
from manip.data.errors import DatasetError
from manip.cli_args import raise_if_interrupted
from manip.data.replay import ChunkReplay, Transitions
from manip.envs import EnvSpec, check_dims
from manip.logs import LOG
from manip.settings import SettingError, check_int, check_known_keys, check_real, find_class

# Evaluation horizons QC uses with the MH datasets (QC's envs/robomimic_utils.py).
ROBOMIMIC_HORIZONS = {"Lift": 300, "PickPlaceCan": 300, "NutAssemblySquare": 400}
ROBOMIMIC_TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
DEFAULT_ROBOMIMIC_HORIZON = 400  # another env's, unless data.env_horizon sets it (a note says so)


def transitions_digest(t: Transitions) -> str:
    """A BLAKE2b digest (hex) of the observations, actions, rewards, masks and episode ends a run trains on."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (t.observations, t.actions, t.rewards, t.masks, t.terminals):
        digest.update(np.ascontiguousarray(array).data)  # the buffer itself, no copy
    return digest.hexdigest()


@contextlib.contextmanager
def _stand_in_written():
    """A stand-in dataset that cannot be written where ``data.path`` points: a ``DatasetError``, before generating."""
    from manip.data.generate.files import CannotWriteError

    try:
        yield
    except CannotWriteError as err:
        raise DatasetError(f"{err}, so no stand-in dataset can be generated there") from None


@dataclass
class DatasetStats:
    """Per-dimension statistics of the offline data (lists of floats, JSON- and checkpoint-friendly)."""

    obs_mean: list[float]
    obs_std: list[float]
    obs_min: list[float]
    obs_max: list[float]
    action_mean: list[float]
    action_std: list[float]
    action_min: list[float]
    action_max: list[float]

    @classmethod
    def from_transitions(cls, t: Transitions) -> "DatasetStats":
        def f(x: np.ndarray) -> list[float]:
            return [float(v) for v in x]

        obs, act = t.observations.astype(np.float64), t.actions.astype(np.float64)
        return cls(f(obs.mean(0)), f(obs.std(0)), f(obs.min(0)), f(obs.max(0)),
                   f(act.mean(0)), f(act.std(0)), f(act.min(0)), f(act.max(0)))

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


class _ReplayStream(IterableDataset):
    """Endless batches from a replay, drawn in the training process (num_workers=0), so online appends reach the
    batches drawn after them: Lightning fetches a batch ahead, so episodes that end in update k are sampled from
    update k + 2 on.

    Notes the sampler state after each draw: the state to checkpoint is the one after the batch the training loop
    has taken, not the current one.
    """

    def __init__(self, dm: "ReplayDataModule") -> None:
        self.dm = dm

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dm = self.dm
        while True:
            batch = dm.replay.sample(dm.batch_size, dm.generator, dm.offline_fraction)
            dm._states_after_draw.append(dm.generator.get_state())
            yield batch


def instantiate(data_cfg) -> "ReplayDataModule":
    """``hydra.utils.instantiate`` of a ``data`` config (nothing is loaded yet). A key the module does not take is a
    ``SettingError``; a ``SettingError`` or ``DatasetError`` of the module's constructor is raised as itself, not
    inside Hydra's ``InstantiationException``."""
    import hydra
    from hydra.errors import InstantiationException

    if data_cfg.get("_target_"):  # a key the module does not take (+data.batchsize=64) is named, not a traceback
        check_known_keys(find_class(data_cfg["_target_"], "data._target_"), data_cfg, "data")
    try:
        return hydra.utils.instantiate(data_cfg)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (SettingError, DatasetError)):
            raise exc.__cause__ from None
        raise


def absolute(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute against the current directory (symlinks kept)."""
    return Path(os.path.abspath(Path(path).expanduser()))


class ReplayDataModule(L.LightningDataModule):
    """Offline transitions in a ``ChunkReplay`` plus the simulator they came from.

    Subclasses implement ``_load() -> (Transitions, EnvSpec, info dict)``. ``batch_size``, ``horizon`` and
    ``max_transitions`` must be >= 1, ``discount`` and ``offline_fraction`` in [0, 1] (``SettingError`` naming
    ``data.<key>`` otherwise).
    """

    def __init__(self, batch_size: int = 256, horizon: int = 5, discount: float = 0.99,
                 offline_fraction: float | None = None, seed: int = 0,
                 max_transitions: int | None = None) -> None:
        super().__init__()
        check_int(batch_size, "data.batch_size", 1)
        check_int(horizon, "data.horizon", 1)
        check_real(discount, "data.discount", 0.0, maximum=1.0)
        if offline_fraction is not None:
            check_real(offline_fraction, "data.offline_fraction", 0.0, maximum=1.0)
        if max_transitions is not None:
            check_int(max_transitions, "data.max_transitions", 1)
        self.batch_size, self.horizon, self.discount = batch_size, horizon, discount
        self.offline_fraction, self.seed = offline_fraction, seed
        self.max_transitions = max_transitions
        self.generator = torch.Generator().manual_seed(seed)
        # Sampler states after batches drawn but not yet taken by the loop (bounded for use outside
        # Lightning), and the state after the batch last taken.
        self._states_after_draw: deque[torch.Tensor] = deque(maxlen=64)
        self._resume_state: torch.Tensor | None = None
        self.replay: ChunkReplay | None = None
        # False: a checkpoint's sampler state is not restored (fine-tuning started from an offline checkpoint
        # samples from its own seed)
        self.restore_sampler = True
        self.stats: DatasetStats | None = None
        self.env_spec: EnvSpec | None = None
        self.info: dict = {}

    def setup(self, stage: str | None = None) -> None:
        """Loads the data once; under a trainer, seeds the sampler with ``seed + global_rank`` so
        that every rank draws its own batches (a checkpoint restored afterwards overrides it)."""
        if self.trainer is not None:
            self._set_sampler_state(torch.Generator().manual_seed(self.seed + self.trainer.global_rank).get_state())
        if self.replay is not None:
            return
        transitions, self.env_spec, self.info = self._load()
        if self.info.get("generated") and rank_zero_only.rank == 0:
            LOG.warning(f"{self.info['path']} is a stand-in manip generated ({_describe(self.info['generated'])}), "
                        f"not the released dataset: results on it are not comparable with published ones.")
        if self.max_transitions is not None and len(transitions) > self.max_transitions:
            transitions = _first_episodes(transitions, self.max_transitions)
            self.info["transitions_used"] = len(transitions)  # num_transitions stays the file's count
        self.info["digest"] = transitions_digest(transitions)  # a checkpoint knows its data by it, not by path
        self.stats = DatasetStats.from_transitions(transitions)
        self.replay = ChunkReplay.from_transitions(transitions, self.horizon, self.discount)

    def _load(self) -> tuple[Transitions, EnvSpec, dict]:
        raise NotImplementedError

    @property
    def obs_dim(self) -> int:
        return self.replay.obs_dim

    @property
    def action_dim(self) -> int:
        return self.replay.action_dim

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_ReplayStream(self), batch_size=None, num_workers=0)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        """The training loop takes the oldest fetched batch now; remember the sampler state after it."""
        if self._states_after_draw:
            self._resume_state = self._states_after_draw.popleft()
        return batch

    def _set_sampler_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
        self._states_after_draw.clear()
        self._resume_state = None

    # Every rank's sampler RNG travels with checkpoints so a resumed run draws the same batches.
    def state_dict(self) -> dict:
        state = self.generator.get_state() if self._resume_state is None else self._resume_state
        return {"generators": gather_rank_states(self.trainer, {"state": state})}

    def load_state_dict(self, state: dict) -> None:
        if not self.restore_sampler:
            return
        mine = rank_state(state.get("generators"), self.trainer)
        if mine is not None:
            self._set_sampler_state(mine["state"])


def _describe(generated: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in generated.items() if value is not None)


def _first_episodes(t: Transitions, max_transitions: int) -> Transitions:
    ends = np.flatnonzero(t.terminals)
    keep = ends[ends < max_transitions]
    if len(keep) == 0:
        raise DatasetError(f"max_transitions={max_transitions} is shorter than the first episode ({ends[0] + 1})")
    n = int(keep[-1]) + 1
    return Transitions(**{k: getattr(t, k)[:n] for k in t.__dataclass_fields__})


class RobomimicDataModule(ReplayDataModule):
    """Robomimic low-dim HDF5 (``data/robomimic/<task>/mh/low_dim_v15.hdf5`` by default).

    obs_keys: keys concatenated in this order; filter_key: ``mask/<filter_key>`` demo subset.
    generate_demos: when ``path`` is absent and at the released layout for ``task``
    (``<dir>/<task>/mh/low_dim_v15.hdf5``), a scripted dataset of this many demos of ``task`` is generated there
    first (0 disables it); a ``task`` the generator does not know then raises ``SettingError`` at once, before any
    directory is made. Any other absent path is a ``DatasetError``.
    env_horizon: rollout length in the simulator (None: QC's per-task value).
    """

    def __init__(self, path: str, task: str = "lift",
                 obs_keys: Sequence[str] = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"),
                 filter_key: str | None = None, reward_mode: str = "r-1", generate_demos: int = 100,
                 env_horizon: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path, self.task = Path(path).expanduser(), task
        if isinstance(obs_keys, str):  # tuple() would split it into letters, each an unknown key
            raise SettingError(f"data.obs_keys must be a list of observation keys, got the string {obs_keys!r} "
                               f"(data.obs_keys=[{obs_keys}])")
        self.obs_keys, self.filter_key, self.reward_mode = tuple(obs_keys), filter_key, reward_mode
        self.generate_demos, self.env_horizon = check_int(generate_demos, "data.generate_demos", 0), env_horizon
        if env_horizon is not None:
            check_int(env_horizon, "data.env_horizon", 1)
        if self._generates() and task not in ROBOMIMIC_TASKS:
            raise SettingError(f"data.task={task!r}: {self.path} does not exist and the scripted generator "
                               f"knows only {', '.join(ROBOMIMIC_TASKS)}")

    def _generates(self) -> bool:
        """Whether ``prepare_data`` generates the file: absent, generation on, and at the released layout for
        ``task`` (``<dir>/<task>/mh/low_dim_v15.hdf5``, the preset's default): any other absent path (a typo, another
        task's file) is reported, never filled with a stand-in."""
        return bool(self.generate_demos) and not self.path.exists() and self._at_task_layout()

    def _at_task_layout(self) -> bool:
        return self.path.parts[-3:] == (self.task, "mh", "low_dim_v15.hdf5")

    def prepare_data(self) -> None:
        if not self._generates():
            return  # present, or a custom path that does not exist: _load reports it
        from manip.data.generate.robomimic_scripted import generate

        LOG.info(f"{self.path} not found: generating {self.generate_demos} scripted {self.task} demos "
                 f"there (put the real robomimic low_dim_v15.hdf5 at this path to use it instead).")
        with _stand_in_written():
            generate(self.task, self.path, self.generate_demos, seed=self.seed, verbose=rank_zero_only.rank == 0)

    def _load(self) -> tuple[Transitions, EnvSpec, dict]:
        from manip.data.robomimic import load_robomimic

        if self.generate_demos and not self.path.exists() and not self._at_task_layout():
            raise DatasetError(f"Robomimic dataset not found: {self.path}. A stand-in is generated only at "
                               f"<dir>/{self.task}/mh/low_dim_v15.hdf5 (data.task={self.task}, the preset's default "
                               f"path); point data.path at a real file, or leave it to the preset")
        data = load_robomimic(self.path, self.obs_keys, self.filter_key, self.reward_mode)
        env_name = data.env_name
        horizon = self.env_horizon or ROBOMIMIC_HORIZONS.get(env_name, DEFAULT_ROBOMIMIC_HORIZON)
        spec = EnvSpec("robosuite", {"env_args": data.env_args, "obs_keys": list(data.obs_keys),
                                     "horizon": horizon, "reward_mode": self.reward_mode})
        info = {"source": "robomimic", "path": str(absolute(self.path)), "env_name": env_name,
                "obs_keys": list(data.obs_keys), "obs_key_dims": data.obs_key_dims,
                "num_demos": len(data.demos), "num_transitions": len(data.transitions)}
        if data.generated:
            info["generated"] = data.generated
        self._check_simulator(spec, data.transitions)
        if rank_zero_only.rank == 0:
            for note in self._notes(env_name, data.generated):
                LOG.info(f"note: {note}")
        return data.transitions, spec, info

    def _notes(self, env_name: str, generated: dict | None) -> list[str]:
        """Where the file differs from what ``data.task`` / ``data.generate_demos`` would have generated."""
        notes = []
        if ROBOMIMIC_TASKS.get(self.task, env_name) != env_name:
            notes.append(f"{self.path} holds {env_name} episodes, not {ROBOMIMIC_TASKS[self.task]} (data.task="
                         f"{self.task} only chooses what to generate): the run trains and evaluates {env_name}")
        if self.env_horizon is None and env_name not in ROBOMIMIC_HORIZONS:
            notes.append(f"no evaluation horizon is known for {env_name} (QC's: {', '.join(ROBOMIMIC_HORIZONS)}): "
                         f"its episodes end after {DEFAULT_ROBOMIMIC_HORIZON} steps; data.env_horizon=... sets it")
        if generated and self.generate_demos and generated.get("demos") not in (None, self.generate_demos):
            notes.append(f"{self.path} was generated with {generated['demos']} demos, this config generates "
                         f"{self.generate_demos} (data.generate_demos); remove the file to generate it anew")
        return notes

    def _check_simulator(self, spec: EnvSpec, transitions: Transitions) -> None:
        """Build the simulator the file's ``env_args`` describe once and compare its observation / action sizes
        with the data's, so that a file the simulator cannot play fails before training rather than at the first
        evaluation. Raises ``DatasetError`` (robosuite refused the env) or ``EnvMismatchError`` naming the file."""
        try:
            env = spec.make()
        except Exception as err:  # robosuite's own words: unknown env name, controller, robot or observation key
            raise_if_interrupted(err)  # Ctrl-C inside mujoco's import is an ImportError, not the file's fault
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DatasetError(f"{self.path}: the simulator its data.attrs['env_args'] describe (env_name "
                               f"{spec.kwargs['env_args'].get('env_name')!r}) cannot be built: {first_line}") from err
        try:
            check_dims(env, transitions.observations.shape[1], transitions.actions.shape[1],
                       source=f"dataset {self.path}")
        finally:
            env.close()


class OGBenchDataModule(ReplayDataModule):
    """OGBench singletask data (``data/ogbench/<dataset>.npz`` + ``-val.npz``) relabelled by ogbench.

    dataset_name: e.g. ``cube-double-play-singletask-task2-v0``; path defaults to
    ``data/ogbench/cube-double-play-v0.npz``. generate_episodes: episodes generated with the
    shipped oracles when the file ``data_dir`` leads to is absent and ``manip.data.generate`` supports the
    dataset (0 disables it); an absent ``path`` given explicitly is a ``DatasetError``.
    """

    def __init__(self, dataset_name: str, path: str | None = None, data_dir: str = "data/ogbench",
                 generate_episodes: int = 100, generate_episode_length: int = 501,
                 env_horizon: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        from manip.data.ogbench import split_singletask_name

        self.dataset_name = dataset_name
        self.env_name, stem, self.task_id = split_singletask_name(dataset_name)
        self.path = Path(path).expanduser() if path else Path(data_dir) / f"{stem}.npz"
        self.path_given = bool(path)
        self.stem = stem
        self.generate_episodes = check_int(generate_episodes, "data.generate_episodes", 0)
        self.generate_episode_length = check_int(generate_episode_length, "data.generate_episode_length", 2)
        if env_horizon is not None:
            check_int(env_horizon, "data.env_horizon", 1)
        self.env_horizon = env_horizon
        self.val: Transitions | None = None

    def prepare_data(self) -> None:
        # Generated only where ``data_dir`` leads (as OGBench downloads into its dataset_dir); a data.path the user
        # names must exist.
        if self.path.exists() or not self.generate_episodes or self.path_given:
            return
        from manip.data.generate.ogbench_play import DATASETS, generate, val_path_for

        if val_path_for(self.path).exists():  # a download that stopped half-way: a stand-in beside it would mix them
            raise DatasetError(f"{self.path} not found, but its validation split {val_path_for(self.path)} is there: "
                               f"put the training file beside it (or remove the -val.npz to generate a stand-in pair)")

        if self.stem not in DATASETS:
            return  # no oracle generator for this dataset: _load reports the missing file

        LOG.info(f"{self.path} not found: generating {self.generate_episodes} oracle play episodes "
                 f"there (put the real OGBench {self.stem}.npz and -val.npz at this path to use them instead).")
        with _stand_in_written():
            generate(self.stem, self.path, self.generate_episodes, episode_length=self.generate_episode_length,
                     seed=self.seed, verbose=rank_zero_only.rank == 0)

    def _load(self) -> tuple[Transitions, EnvSpec, dict]:
        from manip.data.ogbench import load_ogbench

        data = load_ogbench(self.dataset_name, self.path)
        self.val = data.val
        spec = EnvSpec("ogbench", {"env_name": data.env_name, "horizon": self.env_horizon})
        info = {"source": "ogbench", "path": str(absolute(self.path)), "env_name": data.env_name,
                "dataset_name": self.dataset_name, "num_transitions": len(data.train)}
        if data.generated:
            info["generated"] = data.generated
        return data.train, spec, info
