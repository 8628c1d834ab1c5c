"""Scripted Robomimic-format generation and the robosuite adapter, on the real simulator and real HDF5 files."""

from __future__ import annotations

import json
import os
import stat

import gymnasium as gym
import h5py
import numpy as np
import pytest

from manip.data.generate.__main__ import main as generate_cli
from manip.data.generate.robomimic_scripted import OBS_KEYS, SUCCESS_HOLD_STEPS, TASKS, generate
from manip.envs.robosuite_env import RobosuiteEnv

LOW_DIM_KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
# task -> (number of demos in the test file, obs dim of the four standard keys, MuJoCo state dim)
EXPECTED = {"lift": (6, 19, 32), "can": (2, 23, 71), "square": (2, 23, 45)}
KEY_DIMS = {
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_eef_vel_ang": 3,
    "robot0_eef_vel_lin": 3,
    "robot0_gripper_qpos": 2,
    "robot0_gripper_qvel": 2,
    "robot0_joint_pos": 7,
    "robot0_joint_pos_cos": 7,
    "robot0_joint_pos_sin": 7,
    "robot0_joint_vel": 7,
}
TASK_PARAMS = [
    pytest.param("lift"),
    pytest.param("can", marks=pytest.mark.slow),
    pytest.param("square", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def generated(request, tmp_path_factory):
    """Lazily generated small file per task (seed 0): task -> path. Lift is the session's ``lift_hdf5``."""
    root = tmp_path_factory.mktemp("robomimic")
    cache: dict[str, object] = {}

    def get(task: str):
        if task not in cache:
            if task == "lift":
                cache[task] = request.getfixturevalue("lift_hdf5")
            else:
                cache[task] = root / f"{task}.hdf5"
                generate(task, cache[task], num_demos=EXPECTED[task][0], seed=0, verbose=False)
        return cache[task]

    return get


def read_env_args(path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f["data"].attrs["env_args"])


def concat(group, keys=LOW_DIM_KEYS) -> np.ndarray:
    """(N, obs_dim) concatenation of ``keys`` from an obs / next_obs group."""
    return np.concatenate([group[key][()] for key in keys], axis=1)


@pytest.mark.parametrize("task", TASK_PARAMS)
def test_layout(task, generated):
    path = generated(task)
    num_demos, obs_dim, state_dim = EXPECTED[task]

    with h5py.File(path, "r") as f:
        data = f["data"]
        names = sorted(data.keys(), key=lambda name: int(name[5:]))
        assert names == [f"demo_{i}" for i in range(num_demos)]
        args = json.loads(data.attrs["env_args"])
        assert args["env_name"] == TASKS[task]["env_name"] and args["type"] == 1
        kwargs = args["env_kwargs"]
        assert kwargs["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        assert kwargs["control_freq"] == 20 and kwargs["robots"] == ["Panda"] and kwargs["reward_shaping"] is False

        total = 0
        for name in names:
            demo = data[name]
            n = int(demo.attrs["num_samples"])
            total += n
            assert demo.attrs["model_file"].startswith("<mujoco")
            assert isinstance(json.loads(demo.attrs["ep_meta"]), dict)
            assert set(demo["obs"].keys()) == set(OBS_KEYS) == set(demo["next_obs"].keys())
            for key in OBS_KEYS:
                dim = KEY_DIMS.get(key, obs_dim - 9)
                assert demo["obs"][key].shape == (n, dim) and demo["obs"][key].dtype == np.float64
                np.testing.assert_array_equal(demo["obs"][key][1:], demo["next_obs"][key][:-1])
            assert concat(demo["obs"]).shape == (n, obs_dim)
            assert demo["actions"].shape == (n, 7) and np.abs(demo["actions"][()]).max() <= 1.0
            assert demo["states"].shape == (n, state_dim) and demo["states"].dtype == np.float64
            rewards, dones = demo["rewards"][()], demo["dones"][()]
            assert rewards.shape == dones.shape == (n,) and np.issubdtype(dones.dtype, np.integer)
            assert set(np.unique(rewards)) <= {0.0, 1.0} and rewards[0] == 0.0
            assert np.all(rewards[-SUCCESS_HOLD_STEPS:] == 1.0)  # episode ends once success held
            np.testing.assert_array_equal(dones[:-1], rewards[:-1].astype(int))  # done_mode 2
            assert dones[-1] == 1
        assert data.attrs["total"] == total

        train, valid = f["mask/train"][()], f["mask/valid"][()]
        assert train.dtype.kind == "S" and valid.dtype.kind == "S" and len(valid) >= 1
        assert sorted(n.decode() for n in np.concatenate([train, valid])) == sorted(names)
        assert not set(train) & set(valid)


def test_loads_in_robomimic_sequence_dataset(generated):
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    path = generated("lift")
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": LOW_DIM_KEYS, "rgb": []}})
    dataset = SequenceDataset(
        hdf5_path=str(path),
        obs_keys=LOW_DIM_KEYS,
        dataset_keys=("actions", "rewards", "dones"),
        seq_length=5,
        hdf5_cache_mode="all",
        hdf5_use_swmr=True,
        filter_by_attribute="train",
    )
    with h5py.File(path, "r") as f:
        num_train = len(f["mask/train"])
        expected = sum(int(f[f"data/{n.decode()}"].attrs["num_samples"]) for n in f["mask/train"][()])
    assert dataset.n_demos == num_train and len(dataset) == expected
    sample = dataset[3]
    assert sample["actions"].shape == (5, 7) and sample["rewards"].shape == (5,)
    assert sample["obs"]["object"].shape == (5, 10) and sample["obs"]["robot0_eef_quat"].shape == (5, 4)
    assert sample["next_obs"]["robot0_gripper_qpos"].shape == (5, 2)


@pytest.mark.parametrize("task", TASK_PARAMS)
def test_replay_reproduces_demo(task, generated):
    """reset_to(states[0], model_file) + the recorded actions retrace the demo exactly and end in success."""
    path = generated(task)
    env = RobosuiteEnv(read_env_args(path), list(OBS_KEYS), horizon=TASKS[task]["horizon"])
    try:
        with h5py.File(path, "r") as f:
            demo = f[f"data/demo_{EXPECTED[task][0] - 1}"]
            obs, next_obs = concat(demo["obs"], OBS_KEYS), concat(demo["next_obs"], OBS_KEYS)
            actions, states, rewards = demo["actions"][()], demo["states"][()], demo["rewards"][()]
            model_file = demo.attrs["model_file"]
        if task != "lift":  # no per-episode model randomness: the flat state alone restores the first obs
            np.testing.assert_allclose(env.reset_to(states[0]), obs[0], rtol=0, atol=1e-6)
        first = env.reset_to(states[0], model_xml=model_file)
        assert first.dtype == np.float32 and first.shape == env.observation_space.shape
        np.testing.assert_array_equal(first, obs[0].astype(np.float32))
        for t, action in enumerate(actions):
            ob, reward, terminated, truncated, info = env.step(action)
            np.testing.assert_array_equal(ob, next_obs[t].astype(np.float32))
            if t + 1 < len(states):
                np.testing.assert_array_equal(env.sim_env.sim.get_state().flatten(), states[t + 1])
            assert reward == rewards[t] - 1.0 and terminated == info["success"] == bool(rewards[t])
            assert not truncated
        assert info["success"]
    finally:
        env.close()


@pytest.fixture
def umask_027():
    """Run with umask 027 (new files rw-r-----), restoring the previous mask afterwards."""
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_refuses_to_overwrite_and_is_reproducible(generated, tmp_path, umask_027):
    path = tmp_path / "lift.hdf5"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=str(path)):
        generate("lift", path, num_demos=1, verbose=False)
    assert path.read_bytes() == b"keep me"

    info = generate("lift", path, num_demos=1, seed=0, overwrite=True, verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["lift.hdf5"]  # no temp file left
    assert mode(path) == 0o640  # what the umask gives a new file, not the temporary file's owner-only 0o600
    assert info["task"] == "lift" and info["path"] == str(path) and info["num_demos"] == 1
    assert info["num_attempts"] >= 1 and info["success_rate"] == 1 / info["num_attempts"]
    assert info["bytes"] == os.path.getsize(path) and info["seconds"] > 0
    reference = generated("lift")  # seed 0 as well: its first demo must be the same
    with h5py.File(path, "r") as f, h5py.File(reference, "r") as ref:
        for name in ("actions", "states", "obs/object"):
            np.testing.assert_array_equal(f[f"data/demo_0/{name}"][()], ref[f"data/demo_0/{name}"][()])
        assert len(f["mask/train"]) == 1 and len(f["mask/valid"]) == 0
        assert f["data"].attrs["total"] == info["num_transitions"] == len(f["data/demo_0/actions"])


def test_temporary_files_get_the_umask_mode(tmp_path, umask_027):
    """Both generators write through temp_file_next_to: the file moved into place has the umask's mode."""
    from manip.data.generate.files import new_file_mode, temp_file_next_to
    from manip.data.generate.ogbench_play import _write_npz_to_temp

    assert new_file_mode() == 0o640 and os.umask(0o027) == 0o027  # reading the mask leaves it as it was
    tmp = temp_file_next_to(tmp_path / "data.hdf5")
    assert tmp.parent == tmp_path and tmp.name.startswith(".data.hdf5.") and tmp.stat().st_size == 0
    assert mode(tmp) == 0o640
    npz = _write_npz_to_temp(tmp_path / "play.npz", {"x": np.zeros(3)})
    assert mode(npz) == 0o640
    with np.load(npz) as f:
        assert f["x"].shape == (3,)


def test_generate_requires_an_hdf5_path(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.hdf5 or \.h5, got .*lift\.npz"):
        generate("lift", tmp_path / "lift.npz", num_demos=1, verbose=False)
    assert list(tmp_path.iterdir()) == []


# Each command line is otherwise small and writes under tmp_path, so a value that is wrongly accepted fails fast.
@pytest.mark.parametrize(("argv", "flag", "accepted"), [
    (["robomimic", "--demos", "0", "--out", "x.hdf5"], "--demos", "must be >= 1, got 0"),
    (["robomimic", "--demos", "1", "--out", "x.npz"], "--out", "must end in .hdf5 or .h5, got x.npz"),
    (["robomimic", "--demos", "1", "--seed", "-1", "--out", "x.hdf5"], "--seed", "must be >= 0, got -1"),
    (["robomimic", "--task", "stack", "--demos", "1", "--out", "x.hdf5"], "--task", "'lift', 'can', 'square'"),
    (["ogbench", "--episodes", "0", "--out", "x.npz"], "--episodes", "must be >= 1, got 0"),
    (["ogbench", "--episodes", "1", "--episode-length", "1", "--out", "x.npz"], "--episode-length",
     "must be >= 2, got 1"),
    (["ogbench", "--episodes", "1", "--episode-length", "5", "--task-demos", "9", "--out", "x.npz"],
     "--task-demos", "invalid choice: 9 (choose from 1, 2, 3, 4, 5)"),
    (["ogbench", "--dataset", "cube-double-play-v0", "--task-demos", "1", "--episodes", "1", "--episode-length",
      "5", "--out", "x.npz"], "--task-demos", "needs --dataset cube-single-play-v0, got --dataset cube-double-play-v0"),
    (["ogbench", "--dataset", "cube-single", "--episodes", "1", "--episode-length", "5", "--out", "x.npz"],
     "--dataset", "'cube-single-play-v0', 'cube-double-play-v0', 'cube-triple-play-v0', 'scene-play-v0', "
                  "'puzzle-3x3-play-v0'"),
    (["ogbench", "--episodes", "1", "--episode-length", "5", "--out", "x.hdf5"], "--out",
     "must end in .npz, got x.hdf5"),
    (["ogbench", "--episodes", "1", "--episode-length", "5", "--seed", "-1", "--out", "x.npz"], "--seed",
     "must be >= 0, got -1"),
])
def test_cli_rejects_bad_values_in_one_line(tmp_path, monkeypatch, capsys, argv, flag, accepted):
    """A bad flag value is argparse's usage error: exit status 2 and one line naming the flag, before any file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: python -m manip.data.generate {argv[0]} ") and "Traceback" not in err
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert lines[-1].startswith(f"python -m manip.data.generate {argv[0]}: error: argument {flag}: ")
    assert accepted in lines[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def lift_args(generated):
    return read_env_args(generated("lift"))


def test_env_spaces_seeding_and_errors(lift_args):
    env = RobosuiteEnv(lift_args, LOW_DIM_KEYS, horizon=3, reward_mode="r")
    try:
        assert env.observation_space.shape == (19,) and env.observation_space.dtype == np.float32
        assert env.action_space.shape == (7,) and env.action_space.low.min() == -1.0
        first, info = env.reset(seed=7)
        assert first.dtype == np.float32 and info["success"] is False
        again, _ = env.reset(seed=7)
        other, _ = env.reset(seed=8)
        np.testing.assert_array_equal(first, again)
        assert np.abs(first - other).max() > 1e-3

        for step in range(3):
            _, reward, terminated, truncated, info = env.step(np.zeros(7))
            assert reward == 0.0 and terminated is False and truncated == (step == 2)
            assert isinstance(info["success"], bool)
        with pytest.raises(ValueError, match="expects 7"):
            env.step(np.zeros(6))
        with pytest.raises(RuntimeError, match="render_size"):
            env.render()
    finally:
        env.close()

    with pytest.raises(ValueError, match="robot0_eef_pos") as err:
        RobosuiteEnv(lift_args, [*LOW_DIM_KEYS, "bogus"], horizon=10)
    assert "bogus" in str(err.value) and "object" in str(err.value)
    with pytest.raises(ValueError, match="reward_mode"):
        RobosuiteEnv(lift_args, LOW_DIM_KEYS, horizon=10, reward_mode="dense")


def test_env_converts_flat_v14_controller_config(lift_args):
    arm = dict(lift_args["env_kwargs"]["controller_configs"]["body_parts"]["right"])
    arm.pop("gripper")
    arm.update(type="OSC_POSE", control_delta=True)
    old = {**lift_args, "env_version": "1.4.1", "env_kwargs": {**lift_args["env_kwargs"], "controller_configs": arm}}
    env = RobosuiteEnv(old, LOW_DIM_KEYS, horizon=5)
    try:
        env.reset(seed=0)
        obs, reward, *_ = env.step(np.zeros(7))
        assert obs.shape == (19,) and reward == -1.0
        assert "body_parts" in env.sim_env.robots[0].composite_controller_config
    finally:
        env.close()


def test_env_runs_in_async_vector_env(lift_args):
    envs = gym.vector.AsyncVectorEnv(
        [lambda: RobosuiteEnv(lift_args, LOW_DIM_KEYS, horizon=50) for _ in range(2)]
    )
    try:
        obs, _ = envs.reset(seed=[0, 1])
        assert obs.shape == (2, 19) and obs.dtype == np.float32 and np.abs(obs[0] - obs[1]).max() > 1e-3
        again, _ = envs.reset(seed=[0, 1])
        np.testing.assert_array_equal(obs, again)
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs, rewards, terminated, truncated, infos = envs.step(rng.uniform(-1, 1, (2, 7)).astype(np.float32))
        assert obs.shape == (2, 19) and np.all(rewards == -1.0) and not terminated.any() and not truncated.any()
        assert infos["success"].shape == (2,)
    finally:
        envs.close()


def test_render(lift_args, monkeypatch):
    monkeypatch.setenv("EGL_PLATFORM", os.environ.get("EGL_PLATFORM", "surfaceless"))
    try:
        env = RobosuiteEnv(lift_args, LOW_DIM_KEYS, horizon=5, render_size=(48, 64))
    except RuntimeError as err:
        pytest.skip(f"no offscreen rendering here: {err}")
    try:
        env.reset(seed=0)
        image = env.render()
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image.std() > 0
    finally:
        env.close()
