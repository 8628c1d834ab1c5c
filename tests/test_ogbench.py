"""OGBench play-data generation, the singletask reader and the env adapter, against real ogbench."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium
import numpy as np
import torch
import ogbench
import pytest

from manip.data.datamodule import OGBenchDataModule
from manip.data.errors import DatasetError
from manip.data.generate.ogbench_play import DATASETS, generate
from manip.data.ogbench import load_ogbench, split_singletask_name
from manip.data.replay import Transitions
from manip.envs.ogbench_env import OGBenchEnv

from entry_points import warnings_logged

# ogbench builds float32 Boxes from float64 bounds; gymnasium warns about the harmless cast.
pytestmark = pytest.mark.filterwarnings("ignore:.*precision lowered by casting to float32")

EPISODES, LENGTH = 4, 101  # tiny datasets: 4 train + 1 val episodes of 101 steps
OBS_DIMS = {"cube-single": 28, "cube-double": 37, "cube-triple": 46, "scene": 40, "puzzle-3x3": 55}


@pytest.fixture(scope="module")
def play_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny cube-single and cube-double play datasets."""
    root = tmp_path_factory.mktemp("ogbench")
    paths = {}
    for family in ("cube-single", "cube-double"):
        result = generate(f"{family}-play-v0", root / f"{family}-play-v0.npz", EPISODES, LENGTH, verbose=False)
        paths[family] = Path(result["path"])
    return paths


def _cube_single_oracle_rollout(task: int, seed: int, steps: int):
    """Run OGBench's CubePlanOracle (noise 0) on the singletask env for ``steps`` steps, past success.

    Returns the recorded rows (pre-step observation, action, qpos, qvel), the env rewards and success flags.
    """
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

    env = OGBenchEnv(f"cube-single-singletask-task{task}-v0", horizon=steps)
    sim = env.ogbench_env

    def oracle_info() -> dict:
        # The singletask env has no data-collection target info; the target is the task's goal mocap.
        info = sim.compute_ob_info()
        info["privileged/target_block"] = 0
        info["privileged/target_block_pos"] = sim._data.mocap_pos[sim._cube_target_mocap_ids[0]].copy()
        info["privileged/target_block_yaw"] = np.zeros(1)
        return info

    ob, _ = env.reset(seed=seed)
    oracle = CubePlanOracle(env=sim, noise=0.0)
    global_state = np.random.get_state()  # the oracle draws from NumPy's global generator
    np.random.seed(seed)
    oracle.reset(ob, oracle_info())
    np.random.set_state(global_state)
    rows = {"observations": [], "actions": [], "qpos": [], "qvel": []}
    rewards, successes, terminated_at = [], [], None
    for t in range(steps):
        action = oracle.select_action(ob, oracle_info())
        rows["qpos"].append(sim._data.qpos.copy())
        rows["qvel"].append(sim._data.qvel.copy())
        rows["observations"].append(ob)
        rows["actions"].append(action)
        ob, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        successes.append(info["success"])
        if terminated and terminated_at is None:
            terminated_at = t
    env.close()
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in rows.items()}
    arrays["terminals"] = np.zeros(steps, dtype=bool)
    arrays["terminals"][-1] = True
    return arrays, np.asarray(rewards), np.asarray(successes), terminated_at


# --------------------------------------------------------------------------- generation


def test_generated_file_layout(play_files):
    with np.load(play_files["cube-single"]) as f:
        data = {k: f[k] for k in f.files}
    assert set(data) == {"observations", "actions", "terminals", "qpos", "qvel", "manip_generated"}
    assert json.loads(data["manip_generated"].item()) == {
        "generator": "manip OGBench oracle play data", "dataset": "cube-single-play-v0", "task_id": None,
        "episodes": EPISODES, "episode_length": LENGTH, "seed": 0}
    n = EPISODES * LENGTH
    assert data["observations"].shape == (n, 28) and data["observations"].dtype == np.float32
    assert data["actions"].shape == (n, 5) and data["actions"].dtype == np.float32
    assert np.abs(data["actions"]).max() <= 1.0
    assert data["terminals"].dtype == bool
    episode_ends = np.arange(1, EPISODES + 1) * LENGTH - 1
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"]), episode_ends)
    assert data["qpos"].dtype == np.float32 and data["qpos"].shape[0] == n
    # qpos is the pre-step state aligned with the observation: cube xyz in both.
    cube_xyz = (data["qpos"][:, 14:17] - [0.425, 0.0, 0.0]) * 10.0
    np.testing.assert_allclose(cube_xyz, data["observations"][:, 19:22], atol=1e-4)
    with np.load(str(play_files["cube-single"]).replace(".npz", "-val.npz")) as f:
        assert f["observations"].shape == (LENGTH, 28)  # max(1, 4 // 10) = 1 episode


def test_generate_is_seeded_and_refuses_overwrite(tmp_path):
    a = generate("cube-single-play-v0", tmp_path / "a.npz", 1, 41, seed=3, verbose=False)
    b = generate("cube-single-play-v0", tmp_path / "b.npz", 1, 41, seed=3, verbose=False)
    c = generate("cube-single-play-v0", tmp_path / "c.npz", 1, 41, seed=4, verbose=False)
    assert a["num_transitions"] == 40 and a["bytes"] > 0 and a["val_bytes"] > 0
    with np.load(a["path"]) as fa, np.load(b["path"]) as fb, np.load(c["path"]) as fc:
        for key in fa.files:
            np.testing.assert_array_equal(fa[key], fb[key])
        assert not np.array_equal(fa["actions"], fc["actions"])
    with pytest.raises(FileExistsError, match="a.npz"):
        generate("cube-single-play-v0", tmp_path / "a.npz", 1, 41, verbose=False)
    with pytest.raises(ValueError, match="supported"):
        generate("cube-single-noisy-v0", tmp_path / "d.npz", 1, 41, verbose=False)
    from manip.data.generate.__main__ import main as generate_cli

    before = (tmp_path / "a.npz").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # the command line says it in one line and keeps the file
        generate_cli(["ogbench", "--episodes", "1", "--episode-length", "41", "--out", str(tmp_path / "a.npz")])
    assert exit_info.value.code == (f"manip.data.generate: {tmp_path / 'a.npz'} already exists; "
                                    f"pass --overwrite to replace it")
    assert (tmp_path / "a.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}{suffix}" for s in "abc" for suffix in (".npz", "-val.npz")
    )  # no temporary files left behind


@pytest.mark.parametrize(("family", "task"), [("cube-single", 1), ("cube-single", 5), ("cube-double", 2)])
def test_ogbench_loads_generated_files(play_files, family, task):
    env, train, val = ogbench.make_env_and_datasets(
        f"{family}-play-singletask-task{task}-v0", dataset_path=str(play_files[family])
    )
    env.close()
    n = EPISODES * (LENGTH - 1)
    assert set(train) == {"observations", "actions", "terminals", "next_observations", "rewards", "masks"}
    assert train["observations"].shape == (n, OBS_DIMS[family])
    assert train["next_observations"].shape == (n, OBS_DIMS[family])
    assert train["actions"].shape == (n, 5)
    assert val["observations"].shape == (LENGTH - 1, OBS_DIMS[family])


@pytest.mark.parametrize("task", [1, 3])
def test_task_demos_reach_the_evaluation_goal(tmp_path, task):
    """Task demonstrations start from the task's initial state and the oracle carries the cube to its goal:
    the singletask relabelling (independent of the generator) marks success within the first 100 steps."""
    result = generate("cube-single-play-v0", tmp_path / "demos.npz", 2, 120, seed=0, verbose=False, task_id=task)
    data = load_ogbench(f"cube-single-play-singletask-task{task}-v0", result["path"])
    rewards = data.train.rewards.reshape(2, 119)
    assert np.all(rewards[:, :10] == -1)  # the cube starts away from the goal
    first_success = [int(np.argmax(r == 0)) if (r == 0).any() else None for r in rewards]
    assert all(step is not None and step < 100 for step in first_success), first_success
    with pytest.raises(ValueError, match="cube-single only"):
        generate("cube-double-play-v0", tmp_path / "x.npz", 1, 20, verbose=False, task_id=1)
    with pytest.raises(ValueError, match="task_id"):
        generate("cube-single-play-v0", tmp_path / "x.npz", 1, 20, verbose=False, task_id=7)


@pytest.mark.parametrize("family", ["cube-triple", "scene", "puzzle-3x3"])
def test_smoke_generate_other_datasets(tmp_path, family):
    assert f"{family}-play-v0" in DATASETS
    result = generate(f"{family}-play-v0", tmp_path / f"{family}-play-v0.npz", 1, 51, verbose=False)
    with np.load(result["path"]) as f:
        assert f["observations"].shape == (51, OBS_DIMS[family])
        if family != "cube-triple":
            assert f["button_states"].dtype == np.int64
    env, train, val = ogbench.make_env_and_datasets(
        f"{family}-play-singletask-task1-v0", dataset_path=result["path"]
    )
    assert train["observations"].shape == (50, OBS_DIMS[family]) and train["rewards"].shape == (50,)
    assert val["observations"].shape == (50, OBS_DIMS[family])
    env.close()


# --------------------------------------------------------------------------- reader


def test_split_singletask_name():
    assert split_singletask_name("cube-double-play-singletask-task2-v0") == (
        "cube-double-singletask-task2-v0",
        "cube-double-play-v0",
        2,
    )
    assert split_singletask_name("puzzle-3x3-play-singletask-v0") == (
        "puzzle-3x3-singletask-v0",
        "puzzle-3x3-play-v0",
        4,  # the default task
    )


def test_load_ogbench_cube_single(play_files):
    data = load_ogbench("cube-single-play-singletask-task1-v0", play_files["cube-single"])
    assert data.env_name == "cube-single-singletask-task1-v0"
    assert (data.obs_dim, data.action_dim) == (28, 5)
    train = data.train
    assert isinstance(train, Transitions) and len(train) == EPISODES * (LENGTH - 1)
    assert train.observations.dtype == np.float32 and train.actions.dtype == np.float32
    assert train.terminals.dtype == bool
    episode_ends = np.arange(1, EPISODES + 1) * (LENGTH - 1) - 1
    np.testing.assert_array_equal(np.flatnonzero(train.terminals), episode_ends)
    assert set(np.unique(train.rewards)) <= {-1.0, 0.0}
    np.testing.assert_array_equal(train.masks == 0, train.rewards == 0)
    assert np.abs(train.actions).max() <= 1 - 1e-5
    # next_observations are the following observations inside an episode; observations are the file's
    # rows without each episode's last state.
    inner = ~train.terminals[:-1]
    np.testing.assert_array_equal(train.next_observations[:-1][inner], train.observations[1:][inner])
    with np.load(play_files["cube-single"]) as f:
        file_obs = f["observations"].reshape(EPISODES, LENGTH, 28)
    np.testing.assert_array_equal(train.observations, file_obs[:, :-1].reshape(-1, 28))
    np.testing.assert_array_equal(train.next_observations, file_obs[:, 1:].reshape(-1, 28))
    assert data.val is not None and len(data.val) == LENGTH - 1


def test_load_ogbench_cube_double_masks(play_files):
    data = load_ogbench("cube-double-play-singletask-task2-v0", play_files["cube-double"])
    assert (data.obs_dim, data.action_dim) == (37, 5)
    assert set(np.unique(data.train.rewards)) <= {-2.0, -1.0, 0.0}
    np.testing.assert_array_equal(data.train.masks == 0, data.train.rewards == 0)


def test_relabelled_rewards_match_env_rewards(tmp_path):
    """Rewards relabelled from a recorded rollout equal the singletask env's own rewards (same convention)."""
    arrays, env_rewards, successes, terminated_at = _cube_single_oracle_rollout(task=1, seed=0, steps=90)
    assert terminated_at is not None and terminated_at < 89  # the oracle solves the task, then keeps acting
    path = tmp_path / "cube-single-play-v0.npz"
    np.savez_compressed(path, **arrays)
    np.savez_compressed(tmp_path / "cube-single-play-v0-val.npz", **arrays)
    data = load_ogbench("cube-single-play-singletask-task1-v0", path)
    np.testing.assert_array_equal(data.train.rewards, env_rewards[:-1])
    np.testing.assert_array_equal(data.train.masks == 0, successes[:-1])
    assert data.train.rewards[terminated_at] == 0.0 and (data.train.rewards[:terminated_at] == -1.0).all()


def test_load_ogbench_without_val_file(tmp_path, play_files):
    path = tmp_path / "cube-single-play-v0.npz"
    path.write_bytes(play_files["cube-single"].read_bytes())
    data = load_ogbench("cube-single-play-singletask-task3-v0", path)
    assert data.val is None and len(data.train) == EPISODES * (LENGTH - 1)


def test_load_ogbench_bad_inputs(tmp_path, play_files):
    missing = tmp_path / "cube-single-play-v0.npz"
    with pytest.raises(DatasetError, match="not found.*cube-single-play-v0.npz"):
        load_ogbench("cube-single-play-singletask-task1-v0", missing)
    with pytest.raises(DatasetError, match="cube-double-play-singletask-task2-v0"):
        load_ogbench("cube-single-play-singletask-task9-v0", play_files["cube-single"])

    with np.load(play_files["cube-single"]) as f:
        arrays = {k: f[k].copy() for k in f.files}
    for key, row, episode in (("observations", LENGTH + 7, 1), ("actions", 2 * LENGTH + 3, 2)):
        corrupted = {k: v.copy() for k, v in arrays.items()}
        corrupted[key][row, 0] = np.nan
        path = tmp_path / f"nan-{key}.npz"
        np.savez_compressed(path, **corrupted)
        with pytest.raises(DatasetError, match=rf"'{key}'.*episode {episode}\b"):
            load_ogbench("cube-single-play-singletask-task1-v0", path)

    no_qpos = tmp_path / "no-qpos.npz"
    np.savez_compressed(no_qpos, **{k: v for k, v in arrays.items() if k != "qpos"})
    with pytest.raises(DatasetError, match="'qpos'"):
        load_ogbench("cube-single-play-singletask-task1-v0", no_qpos)
    with pytest.raises(DatasetError, match="'observations'.*37"):
        load_ogbench("cube-double-play-singletask-task1-v0", play_files["cube-single"])


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k].copy() for k in f.files}


def _write_changed(tmp_path: Path, source: Path, change) -> Path:
    """Save ``change(arrays of source)`` as a cube-single file and return its path."""
    path = tmp_path / "cube-single-play-v0.npz"
    np.savez_compressed(path, **change(_npz_arrays(source)))
    return path


def _drop_rows(keys, count):
    return lambda arrays: {k: v[:-count] if k in keys else v for k, v in arrays.items()}


@pytest.mark.parametrize("change", [
    lambda a: {**a, "actions": a["actions"][:, :4]},
    lambda a: {**a, "actions": np.concatenate([a["actions"], a["actions"][:, :1]], 1)},
    lambda a: {**a, "actions": a["actions"][:, 0]},
], ids=["4-dims", "6-dims", "1-d"])
def test_action_width_must_match_env(tmp_path, play_files, change):
    path = _write_changed(tmp_path, play_files["cube-single"], change)
    shape = _npz_arrays(path)["actions"].shape  # the file's, not the loader's (which drops each episode's last row)
    message = rf"{re.escape(str(path))}: key 'actions' has shape {re.escape(str(shape))}, but .*task1-v0 actions have 5 dims"
    with pytest.raises(DatasetError, match=message):
        load_ogbench("cube-single-play-singletask-task1-v0", path)


def test_unnormalised_actions_are_refused(tmp_path, play_files):
    path = _write_changed(tmp_path, play_files["cube-single"], lambda a: {**a, "actions": 3.0 * a["actions"]})
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}: key 'actions' holds actions outside \[-1, 1\]"):
        load_ogbench("cube-single-play-singletask-task1-v0", path)


@pytest.mark.parametrize(("change", "message"), [
    (_drop_rows({"observations", "actions", "terminals", "qpos", "qvel"}, 5),
     "'terminals'.*last episode is incomplete"),
    (lambda a: {**a, "terminals": np.zeros_like(a["terminals"])}, "'terminals'.*last episode is incomplete"),
    (_drop_rows({"qpos"}, 3), rf"'qpos' has shape \({EPISODES * LENGTH - 3}, \d+\).*{EPISODES * LENGTH} rows"),
    (_drop_rows({"actions"}, 3), rf"'actions' has shape \({EPISODES * LENGTH - 3}, 5\).*{EPISODES * LENGTH} rows"),
    (_drop_rows({"qvel"}, 1), rf"'qvel' has shape \({EPISODES * LENGTH - 1}, \d+\)"),
    (lambda a: {**a, "terminals": np.ones_like(a["terminals"])}, "'terminals' is true in every row.*no transitions"),
    (lambda a: {**a, "terminals": 2.0 * a["terminals"]}, "'terminals' holds 2.0; expected 0 or 1"),
], ids=["truncated", "no-terminal-flags", "qpos-short", "actions-short", "qvel-short", "one-step-episodes",
        "terminal-twos"])
def test_row_counts_and_last_terminal_are_checked(tmp_path, play_files, change, message):
    path = _write_changed(tmp_path, play_files["cube-single"], change)
    before = path.read_bytes()
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}: key {message}"):
        load_ogbench("cube-single-play-singletask-task1-v0", path)
    assert path.read_bytes() == before


def test_a_member_that_fails_its_checksum_is_named_with_the_file(tmp_path, play_files):
    """A flipped byte inside the observations (the header, which the key check reads, intact)."""
    path = tmp_path / "cube-single-play-v0.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # stored: the member's bytes are the array's
        for key, array in _npz_arrays(play_files["cube-single"]).items():
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(array))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("observations.npy")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} is not a readable .npz file: Bad CRC-32"):
        load_ogbench("cube-single-play-singletask-task1-v0", path)


def test_npy_under_npz_name(tmp_path):
    path = tmp_path / "cube-single-play-v0.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros((3, 28), np.float32))
    message = rf"{re.escape(str(path))} holds a single .npy array of shape \(3, 28\), not an .npz archive"
    with pytest.raises(DatasetError, match=message):
        load_ogbench("cube-single-play-singletask-task1-v0", path)


@pytest.mark.parametrize("key, step", [("qpos", 3), ("button_states", 3), ("observations", LENGTH - 1)])
def test_nan_in_relabelling_state(tmp_path, play_files, key, step):
    """qpos/button_states feed the reward relabelling, where NaN would silently read as "not solved"; the message
    names the file's row (an episode's last observation too, which only next_observations holds once loaded)."""

    def change(arrays):
        if key == "button_states":  # optional key: checked whenever the file has it
            arrays[key] = np.zeros((len(arrays["observations"]), 2))
        arrays[key][2 * LENGTH + step, 0] = np.nan
        return arrays

    path = _write_changed(tmp_path, play_files["cube-single"], change)
    message = rf"^{re.escape(str(path))}: key '{key}' contains NaN/inf, first at row {2 * LENGTH + step} \(episode 2\)$"
    with pytest.raises(DatasetError, match=message):
        load_ogbench("cube-single-play-singletask-task1-v0", path)


def test_a_generated_file_says_so_and_a_released_one_does_not(tmp_path, play_files, caplog):
    """The generator's marker reaches the DataModule's info (and so the checkpoints) and a line on every load."""
    name = "cube-single-play-singletask-task1-v0"
    dm = OGBenchDataModule(dataset_name=name, path=str(play_files["cube-single"]))
    dm.setup()
    assert dm.info["generated"]["generator"] == "manip OGBench oracle play data"
    assert "is a stand-in manip generated (generator manip OGBench oracle play data, dataset cube-single-play-v0, " \
           f"episodes {EPISODES}, episode_length {LENGTH}, seed 0), not the released dataset" in warnings_logged(caplog)
    caplog.clear()
    released = _write_changed(tmp_path, play_files["cube-single"],
                              lambda a: {k: v for k, v in a.items() if k != "manip_generated"})
    assert load_ogbench(name, released).generated is None
    dm = OGBenchDataModule(dataset_name=name, path=str(released))
    dm.setup()
    assert "generated" not in dm.info and "stand-in" not in caplog.text


def test_max_transitions_keeps_whole_first_episodes_and_the_info_says_how_many(play_files):
    """``data.max_transitions`` keeps the first episodes that fit in it (a chunk never ends in a cut episode); the
    info keeps the file's count, which a resumed run compares, and records the count trained on."""
    name = "cube-single-play-singletask-task1-v0"
    full = OGBenchDataModule(dataset_name=name, path=str(play_files["cube-single"]))
    full.setup()
    per_episode = full.info["num_transitions"] // EPISODES
    dm = OGBenchDataModule(dataset_name=name, path=str(play_files["cube-single"]), max_transitions=2 * per_episode + 50)
    dm.setup()
    assert dm.info["num_transitions"] == full.info["num_transitions"] == EPISODES * per_episode
    assert dm.info["transitions_used"] == dm.replay.size == 2 * per_episode
    assert "transitions_used" not in full.info and dm.info["digest"] != full.info["digest"]
    size = dm.replay.size
    assert torch.equal(dm.replay._data["observations"][:size], full.replay._data["observations"][:size])


def test_datamodule_sums_chunk_rewards_with_its_discount(play_files):
    """``data.discount`` reaches the replay: a chunk's reward is sum_i discount^i r_i with the data module's
    discount (the critic bootstraps with discount^h of the same value)."""
    dm = OGBenchDataModule(dataset_name="cube-single-play-singletask-task1-v0", path=str(play_files["cube-single"]),
                           horizon=3, discount=0.5)
    dm.setup()
    rewards = dm.replay._data["rewards"]
    assert dm.replay.discount == 0.5
    torch.testing.assert_close(dm.replay.gather(torch.tensor([0]))["rewards"],
                               (rewards[0] + 0.5 * rewards[1] + 0.25 * rewards[2])[None])


def test_datamodule_generates_only_where_data_dir_leads(tmp_path):
    """An explicit data.path that does not exist is reported (a typo is never filled with a stand-in)."""
    path = tmp_path / "typo" / "cube-single-play-v0.npz"
    dm = OGBenchDataModule("cube-single-play-singletask-task1-v0", path=str(path), generate_episodes=2)
    dm.prepare_data()
    with pytest.raises(DatasetError, match=re.escape(f"OGBench dataset file not found: {path}")):
        dm.setup("fit")
    assert list(tmp_path.iterdir()) == []


def test_a_validation_split_without_its_training_file_is_named(tmp_path, play_files):
    """Where data_dir leads to a -val.npz alone (a download that stopped), nothing is generated beside it."""
    data_dir = tmp_path / "ogbench"
    data_dir.mkdir()
    val = data_dir / "cube-single-play-v0-val.npz"
    shutil.copy(play_files["cube-single"].parent / "cube-single-play-v0-val.npz", val)
    dm = OGBenchDataModule("cube-single-play-singletask-task1-v0", data_dir=str(data_dir), generate_episodes=2)
    with pytest.raises(DatasetError, match=re.escape(f"{data_dir / 'cube-single-play-v0.npz'} not found, but its "
                                                     f"validation split {val} is there")):
        dm.prepare_data()
    assert sorted(data_dir.iterdir()) == [val]


@pytest.mark.parametrize("dataset_name", ["cube-double-noisy-singletask-task2-v0",
                                          "puzzle-4x4-play-singletask-v0"])
def test_datamodule_does_not_generate_unsupported_datasets(tmp_path, caplog, dataset_name):
    from manip.data.datamodule import OGBenchDataModule

    data_dir = tmp_path / "ogbench"
    dm = OGBenchDataModule(dataset_name, data_dir=str(data_dir), generate_episodes=2)
    dm.prepare_data()
    assert "generating" not in caplog.text and not data_dir.exists()
    message = rf"not found: {re.escape(str(dm.path))}.*only .*cube-single-play-v0.* can be generated"
    with pytest.raises(DatasetError, match=message):
        dm.setup("fit")


# --------------------------------------------------------------------------- env


def test_env_api_and_seeded_reset():
    env_a = OGBenchEnv("cube-single-singletask-task1-v0", horizon=5)
    env_b = OGBenchEnv("cube-single-play-singletask-task1-v0", horizon=5)
    assert env_b.env_name == "cube-single-singletask-task1-v0"
    assert env_a.observation_space.shape == (28,) and env_a.observation_space.dtype == np.float32
    assert env_a.action_space.shape == (5,) and env_a.action_space.dtype == np.float32
    actions = np.random.default_rng(0).uniform(-1, 1, (5, 5)).astype(np.float32)
    trajectories = []
    for env, seed in ((env_a, 7), (env_b, 7), (env_a, 8)):
        ob, info = env.reset(seed=seed)
        assert ob.dtype == np.float32 and info == {"success": False}
        obs = [ob]
        for t, action in enumerate(actions):
            ob, reward, terminated, truncated, info = env.step(action)
            assert ob.dtype == np.float32 and ob.shape == (28,)
            assert type(reward) is float and reward == -1.0
            assert type(info["success"]) is bool and set(info) == {"success"}
            assert terminated is False and truncated is (t == len(actions) - 1)
            obs.append(ob)
        trajectories.append(np.stack(obs))
    np.testing.assert_array_equal(trajectories[0], trajectories[1])
    assert not np.array_equal(trajectories[0][0], trajectories[2][0])
    assert OGBenchEnv("cube-double-singletask-task2-v0").horizon == 500
    with pytest.raises(RuntimeError, match="render_size"):
        env_a.render()
    with pytest.raises(ValueError, match="singletask"):
        OGBenchEnv("cube-single-v0")


def test_env_oracle_reaches_success():
    arrays, rewards, successes, terminated_at = _cube_single_oracle_rollout(task=1, seed=1, steps=200)
    assert terminated_at is not None and successes[terminated_at] and not successes[:terminated_at].any()
    assert rewards[terminated_at] == 0.0


def test_env_in_async_vector_env():
    make = functools.partial(OGBenchEnv, "cube-double-singletask-task2-v0", horizon=3)
    envs = gymnasium.vector.AsyncVectorEnv([make, make], context="spawn")
    try:
        obs, _ = envs.reset(seed=[0, 1])
        assert obs.shape == (2, 37) and obs.dtype == np.float32
        assert not np.array_equal(obs[0], obs[1])
        for t in range(3):
            obs, rewards, terminated, truncated, infos = envs.step(np.zeros((2, 5), np.float32))
        assert truncated.all() and not terminated.any()
        assert infos["success"].dtype == bool and rewards.tolist() == [-2.0, -2.0]
    finally:
        envs.close()


def test_env_render_offscreen():
    """Render in a fresh process with headless EGL; without a working EGL the error must name MUJOCO_GL."""
    code = (
        "from manip.envs.ogbench_env import OGBenchEnv\n"
        "env = OGBenchEnv('cube-single-singletask-task1-v0', render_size=(48, 64))\n"
        "env.reset(seed=0)\n"
        "try:\n"
        "    frame = env.render()\n"
        "    print('FRAME', frame.shape, frame.dtype, int(frame.max()))\n"
        "except RuntimeError as err:\n"
        "    print('ERROR', err)\n"
        "env.close()\n"
    )
    env_vars = dict(os.environ, MUJOCO_GL="egl", EGL_PLATFORM="surfaceless")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, timeout=120
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith(("FRAME", "ERROR")))
    if line.startswith("FRAME"):
        assert line.split(" ", 1)[1].startswith("(48, 64, 3) uint8") and int(line.split()[-1]) > 0
    else:
        assert "MUJOCO_GL" in line


def test_a_success_inside_an_episode_is_not_a_terminal(tmp_path):
    """OGBench terminals mark trajectory ends only: the step that solves the task has mask 0 (no bootstrap) but the
    episode goes on, so chunks starting before it still run past it."""
    arrays, _, successes, terminated_at = _cube_single_oracle_rollout(task=1, seed=0, steps=90)
    path = tmp_path / "cube-single-play-v0.npz"
    np.savez_compressed(path, **arrays)
    train = load_ogbench("cube-single-play-singletask-task1-v0", path).train
    assert train.masks[terminated_at] == 0.0 and not train.terminals[terminated_at]
    assert np.flatnonzero(train.terminals).tolist() == [len(train) - 1]
