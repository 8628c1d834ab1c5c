"""OGBench 'play' datasets generated locally with the oracles shipped in the ``ogbench`` wheel.

Follows OGBench's ``data_gen_scripts/generate_manipspace.py`` with ``--dataset_type=play``:

* the goal-conditioned env (``cube-single-v0`` for ``cube-single-play-v0``, ...) is built with
  ``gymnasium.make(env, terminate_at_goal=False, mode='data_collection', max_episode_steps=L)``,
  so every episode is exactly ``L`` steps long and ends by truncation;
* non-Markovian plan oracles with ``noise=0.1, noise_smoothing=0.5`` act: ``CubePlanOracle`` for
  cubes; cube / button / drawer / window plan oracles for scene; ``ButtonPlanOracle`` with the
  gripper always closed for puzzles;
* whenever the current oracle finishes its plan, the env draws a new target with
  ``set_new_target(p_stack=...)`` (p_stack per episode: single 0, double U(0, 0.25),
  triple U(0.05, 0.35), scene 0.5) and the oracle for that target's task is reset;
* scene episodes in which the cube leaves the visible area (outside the drawer) are discarded and
  re-collected, as in the official script.

Each step records the pre-step observation, the clipped action, ``terminals`` (1 at the last step
of each episode) and the pre-step simulator state ``qpos``/``qvel`` (``info['prev_qpos']``), plus
``button_states`` (``info['prev_button_states']``) for scene and puzzle. Arrays are float32
(``terminals`` bool, ``button_states`` int64) and written with ``np.savez_compressed`` to
``<name>.npz`` (``num_episodes`` episodes) and ``<name>-val.npz`` (``max(1, num_episodes // 10)``
episodes), the layout ``ogbench.make_env_and_datasets(..., dataset_path=...)`` reads, plus a
``manip_generated`` array (JSON: generator, dataset, size, seed) that OGBench's loader ignores and manip's
reports.

Episode length: the official datasets use 1001 steps (1000 transitions after the loader drops each
episode's last state) and 1000 episodes (3000 for cube-triple). A shorter length such as 501 keeps
small local files small while each episode still contains several complete oracle tasks (a
pick-and-place plan lasts roughly 80-110 steps); the loader and the singletask relabelling do not
depend on the length.

Randomness: OGBench's oracles draw from NumPy's global generator and the env from its own
``np_random``; both are seeded from ``seed`` (the global generator's previous state is restored
afterwards), so a given ``(dataset, num_episodes, episode_length, seed)`` always produces the same
file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import gymnasium
import numpy as np

from manip.data.errors import GENERATED_MARKER
from manip.data.generate.files import make_room_for, temp_file_next_to
from manip.envs.ogbench_env import quiet_space_casts

DATASETS = (
    "cube-single-play-v0",
    "cube-double-play-v0",
    "cube-triple-play-v0",
    "scene-play-v0",
    "puzzle-3x3-play-v0",
)

# Datasets whose env can record oracle demonstrations of an evaluation task (``task_id``), and the task ids.
TASK_DEMO_DATASETS = ("cube-single-play-v0",)
TASK_IDS = range(1, 6)

ORACLE_NOISE = 0.1
ORACLE_NOISE_SMOOTHING = 0.5


def env_name_for(dataset: str) -> str:
    """Goal-conditioned env of a play dataset: ``cube-double-play-v0`` -> ``cube-double-v0``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown OGBench play dataset {dataset!r}; supported: {', '.join(DATASETS)}")
    return dataset.replace("-play-", "-")


def val_path_for(path: str | Path) -> Path:
    """Validation-split sibling of a dataset file: ``x/name.npz`` -> ``x/name-val.npz``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-val.npz")


def _draw_p_stack(env_name: str) -> float:
    """Per-episode probability that a new cube target sits on top of another cube."""
    if env_name.startswith("cube-single"):
        return 0.0
    if env_name.startswith("cube-double"):
        return float(np.random.uniform(0.0, 0.25))
    if env_name.startswith("cube-triple"):
        return float(np.random.uniform(0.05, 0.35))
    return 0.5


def _make_oracles(env: gymnasium.Env, env_name: str) -> dict:
    """Plan oracles keyed by the env's ``info['privileged/target_task']``."""
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    noise = dict(noise=ORACLE_NOISE, noise_smoothing=ORACLE_NOISE_SMOOTHING)
    if env_name.startswith("cube"):
        return {"cube": CubePlanOracle(env=env, **noise)}
    if env_name.startswith("scene"):
        return {
            "cube": CubePlanOracle(env=env, **noise),
            "button": ButtonPlanOracle(env=env, **noise),
            "drawer": DrawerPlanOracle(env=env, **noise),
            "window": WindowPlanOracle(env=env, **noise),
        }
    return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **noise)}


def _scene_episode_is_healthy(qpos: np.ndarray) -> bool:
    """Official scene check: the cube never leaves the visible area except inside the drawer.

    qpos: (L, nq) pre-step states of one episode; the cube position is ``qpos[:, 14:17]``.
    """
    xyz = qpos[:, 14:17]
    too_far_right = (xyz[:, 1] >= 0.29).any()
    too_far_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_far_right or too_far_left)


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator (used by the oracles) and restore its state on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _task_goal_info(env: gymnasium.Env) -> dict:
    """The privileged target entries a cube plan oracle reads, pointed at the current task's goal.

    In ``mode='task'`` the env keeps the goal in ``cur_task_info['goal_xyzs']`` (goal cubes are upright,
    yaw 0) and does not report a target; single-cube envs only.
    """
    goal = np.asarray(env.unwrapped.cur_task_info["goal_xyzs"][0], dtype=np.float64)
    return {
        "privileged/target_task": "cube",
        "privileged/target_block": 0,
        "privileged/target_block_pos": goal.copy(),
        "privileged/target_block_yaw": np.zeros(1),
    }


def _collect_episode(
    env: gymnasium.Env,
    env_name: str,
    oracles: dict,
    has_buttons: bool,
    seed: int | None = None,
    task_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Run one episode until truncation; returns arrays of shape (L, ...) for one episode.

    ``task_id=None``: play (a new random target whenever the oracle finishes). Otherwise the episode starts
    from evaluation task ``task_id``'s initial state and the oracle carries the cube to that task's goal once,
    then holds its final pose until the episode ends.
    """
    if task_id is None:
        ob, info = env.reset(seed=seed)
    else:
        ob, info = env.reset(seed=seed, options={"task_id": task_id})
        info = {**info, **_task_goal_info(env)}
    p_stack = _draw_p_stack(env_name)
    oracle = oracles[info["privileged/target_task"]]
    oracle.reset(ob, info)

    keys = ["observations", "actions", "terminals", "qpos", "qvel"]
    episode = {k: [] for k in keys + (["button_states"] if has_buttons else [])}
    done = False
    while not done:
        action = np.clip(np.asarray(oracle.select_action(ob, info)), -1.0, 1.0)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if oracle.done and task_id is None:
            target_ob, target_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle = oracles[target_info["privileged/target_task"]]
            oracle.reset(target_ob, target_info)

        episode["observations"].append(ob)
        episode["actions"].append(action)
        episode["terminals"].append(done)
        episode["qpos"].append(info["prev_qpos"])
        episode["qvel"].append(info["prev_qvel"])
        if has_buttons:
            episode["button_states"].append(info["prev_button_states"])
        ob = next_ob

    dtypes = {"terminals": bool, "button_states": np.int64}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in episode.items()}


def _write_npz_to_temp(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Compress ``arrays`` into a temporary file next to ``path`` (to be moved there); returns its path."""
    tmp = temp_file_next_to(path)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def generate(
    dataset: str,
    path: str | Path,
    num_episodes: int,
    episode_length: int = 1001,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
    task_id: int | None = None,
) -> dict:
    """Generate an OGBench play dataset with the shipped plan oracles (or task demonstrations).

    Args:
        dataset: one of ``DATASETS``, e.g. ``"cube-single-play-v0"``.
        path: training file, must end in ``.npz``; the validation split goes to ``<stem>-val.npz``
            next to it.
        num_episodes: training episodes; the validation file gets ``max(1, num_episodes // 10)``.
        episode_length: steps per episode (official: 1001; see the module docstring).
        seed: seeds every random draw (env and oracles).
        overwrite: replace existing files; otherwise an existing file raises ``FileExistsError``.
        verbose: print progress and a summary.
        task_id: None for play data. For ``cube-single-play-v0`` an evaluation task id (1-5) instead records
            noisy oracle demonstrations of that task (env in ``mode='task'``, one pick-and-place to the
            task's goal per episode, then holding): the same file format, for small offline-to-online
            studies where play data is too scarce to learn the task from.

    Each file holds ``observations`` (E*L, obs_dim) float32, ``actions`` (E*L, 5) float32,
    ``terminals`` (E*L,) bool, ``qpos`` (E*L, nq) and ``qvel`` (E*L, nv) float32 and, for scene
    and puzzle, ``button_states`` (E*L, num_buttons) int64, with E episodes of L steps. Both files
    are written to temporary names first and moved into place only when complete.

    Returns:
        ``{"dataset", "path", "val_path", "num_episodes", "num_transitions", "seconds", "bytes",
        "val_bytes"}``; ``num_transitions`` counts the training file's ``(s, a, s')`` transitions as
        OGBench's loader yields them, ``num_episodes * (episode_length - 1)``.
    """
    env_name = env_name_for(dataset)
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"dataset path must end in .npz, got {path}")
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    if episode_length < 2:
        raise ValueError(f"episode_length must be >= 2 (one transition per episode), got {episode_length}")
    if task_id is not None and dataset not in TASK_DEMO_DATASETS:
        raise ValueError(f"task demonstrations are implemented for cube-single only, got dataset {dataset!r}")
    if task_id is not None and task_id not in TASK_IDS:
        raise ValueError(f"task_id must be in {TASK_IDS[0]}..{TASK_IDS[-1]}, got {task_id}")
    val_path = val_path_for(path)
    if not overwrite:
        for p in (path, val_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists; pass overwrite=True to replace it")
    make_room_for(path)  # before the episodes, not after them

    import ogbench  # noqa: F401  (registers the ogbench envs with gymnasium)

    num_val_episodes = max(1, num_episodes // 10)
    env_seed, oracle_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    mode = "data_collection" if task_id is None else "task"
    with quiet_space_casts():
        env = gymnasium.make(env_name, terminate_at_goal=False, mode=mode, max_episode_steps=episode_length)
    has_buttons = hasattr(env.unwrapped, "_cur_button_states")
    oracles = _make_oracles(env, env_name)

    start = time.perf_counter()
    episodes = []
    total = num_episodes + num_val_episodes
    episode_seed = env_seed  # only the first reset seeds the env; later resets continue its generator
    with _seeded_global_numpy(oracle_seed):
        try:
            while len(episodes) < total:
                episode = _collect_episode(env, env_name, oracles, has_buttons, seed=episode_seed, task_id=task_id)
                episode_seed = None
                if env_name.startswith("scene") and not _scene_episode_is_healthy(episode["qpos"]):
                    continue
                episodes.append(episode)
                if verbose and (len(episodes) % max(1, total // 10) == 0 or len(episodes) == total):
                    rate = len(episodes) * episode_length / (time.perf_counter() - start)
                    print(f"{dataset}: {len(episodes)}/{total} episodes ({rate:.0f} env steps/s)", flush=True)
        finally:
            env.close()

    splits = {path: episodes[:num_episodes], val_path: episodes[num_episodes:]}
    tmp_files = {}
    try:
        for p, eps in splits.items():
            origin = {"generator": "manip OGBench oracle " + ("play data" if task_id is None else "task demos"),
                      "dataset": dataset, "task_id": task_id, "episodes": len(eps), "episode_length": episode_length,
                      "seed": seed}
            arrays = {k: np.concatenate([e[k] for e in eps]) for k in eps[0]}
            tmp_files[p] = _write_npz_to_temp(p, {**arrays, GENERATED_MARKER: np.array(json.dumps(origin))})
        # The validation file goes into place first, so a present training file implies a complete pair.
        for p in (val_path, path):
            os.replace(tmp_files.pop(p), p)
    finally:
        for tmp in tmp_files.values():
            tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start

    result = {
        "dataset": dataset,
        "path": str(path),
        "val_path": str(val_path),
        "num_episodes": num_episodes,
        "num_transitions": num_episodes * (episode_length - 1),
        "seconds": seconds,
        "bytes": path.stat().st_size,
        "val_bytes": val_path.stat().st_size,
    }
    if verbose:
        print(
            f"{dataset}: wrote {path} ({result['bytes'] / 1e6:.2f} MB, {num_episodes} episodes of "
            f"{episode_length} steps) and {val_path} ({result['val_bytes'] / 1e6:.2f} MB, "
            f"{num_val_episodes} episodes) in {seconds:.1f} s",
            flush=True,
        )
    return result
