"""Robomimic reader and DataModule on a generated file: layout, conventions, every bad input."""

import hashlib
import shutil

import h5py
import numpy as np
import pytest

from manip.data.datamodule import RobomimicDataModule
from manip.data.errors import DatasetError
from manip.data.robomimic import DEFAULT_OBS_KEYS, load_robomimic


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def lift_copy(lift_hdf5, tmp_path):
    path = tmp_path / "lift.hdf5"
    shutil.copy(lift_hdf5, path)
    return path


def test_load_shapes_dtypes_and_reward_convention(lift_hdf5):
    data = load_robomimic(lift_hdf5)
    t = data.transitions
    assert data.obs_keys == DEFAULT_OBS_KEYS
    assert data.obs_key_dims == {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
    assert t.observations.shape[1] == 19 and t.actions.shape[1] == 7
    assert t.observations.dtype == np.float32 and np.abs(t.actions).max() < 1
    with h5py.File(lift_hdf5) as f:
        demo = f["data/demo_0"]
        n0 = len(demo["actions"])
        obs0 = np.concatenate([demo["obs"][k][:] for k in DEFAULT_OBS_KEYS], 1)
        dones, rewards = demo["dones"][:].astype(bool), demo["rewards"][:]
    np.testing.assert_allclose(t.observations[:n0], obs0, rtol=1e-6)
    np.testing.assert_allclose(t.rewards[:n0], rewards - 1)          # QC: r - 1
    np.testing.assert_array_equal(t.masks[:n0], (~dones).astype(np.float32))
    assert t.terminals[n0 - 1] and t.terminals[:n0][dones].all()      # demo end + every done
    assert set(np.unique(t.rewards)) <= {-1.0, 0.0}
    assert t.num_episodes >= len(data.demos)
    raw = load_robomimic(lift_hdf5, reward_mode="r").transitions
    np.testing.assert_allclose(raw.rewards, t.rewards + 1)


def test_custom_obs_keys_and_filter(lift_hdf5):
    data = load_robomimic(lift_hdf5, obs_keys=["object", "robot0_eef_pos"], filter_key="valid")
    assert data.transitions.obs_dim == 13 and data.obs_keys == ("object", "robot0_eef_pos")
    with h5py.File(lift_hdf5) as f:
        valid = sorted(d.decode() for d in f["mask/valid"][()])
    assert data.demos == sorted(valid, key=lambda d: int(d[5:]))


def test_missing_file_names_path_and_where_data_goes(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nothing.hdf5.*generate"):
        load_robomimic(tmp_path / "nothing.hdf5")


def test_unknown_obs_key_lists_available(lift_hdf5):
    with pytest.raises(DatasetError, match=r"unknown observation key 'robot0_eef_pose'.*available: \[.*robot0_eef_pos"):
        load_robomimic(lift_hdf5, obs_keys=["robot0_eef_pose"])


def test_missing_key_named(lift_copy):
    with h5py.File(lift_copy, "a") as f:
        del f["data/demo_1/actions"]
    before = digest(lift_copy)
    with pytest.raises(DatasetError, match="missing key 'data/demo_1/actions'"):
        load_robomimic(lift_copy)
    assert digest(lift_copy) == before


def test_missing_env_args_and_group(lift_copy, tmp_path):
    with h5py.File(lift_copy, "a") as f:
        del f["data"].attrs["env_args"]
    with pytest.raises(DatasetError, match=r"env_args"):
        load_robomimic(lift_copy)
    empty = tmp_path / "empty.hdf5"
    h5py.File(empty, "w").close()
    with pytest.raises(DatasetError, match="missing HDF5 group 'data'"):
        load_robomimic(empty)


def test_nan_names_the_demo(lift_copy):
    with h5py.File(lift_copy, "a") as f:
        obs = f["data/demo_2/obs/object"]
        values = obs[:]
        values[3, 0] = np.nan
        obs[...] = values
    with pytest.raises(DatasetError, match=r"NaN or inf in 'data/demo_2/obs'.*row 3"):
        load_robomimic(lift_copy)


def test_empty_and_unknown_filter_key(lift_copy):
    with h5py.File(lift_copy, "a") as f:
        f.create_dataset("mask/empty", data=np.array([], dtype="S8"))
    with pytest.raises(DatasetError, match="mask/empty' selects no demos"):
        load_robomimic(lift_copy, filter_key="empty")
    with pytest.raises(DatasetError, match=r"mask/20_percent' not found; available: \['empty', 'train', 'valid'\]"):
        load_robomimic(lift_copy, filter_key="20_percent")


def test_datamodule_stats_env_spec_and_batches(lift_hdf5):
    dm = RobomimicDataModule(path=str(lift_hdf5), batch_size=32, horizon=5, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.obs_dim == 19 and dm.action_dim == 7
    assert dm.env_spec.kind == "robosuite" and dm.env_spec.horizon == 300
    assert len(dm.stats.obs_mean) == 19 and min(dm.stats.obs_std) >= 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["actions"].shape == (32, 5, 7) and batch["valid"].shape == (32, 5)
    state = dm.state_dict()
    again = next(iter(dm.train_dataloader()))
    dm.load_state_dict(state)
    assert np.array_equal(next(iter(dm.train_dataloader()))["observations"], again["observations"])


def test_absent_default_file_is_generated_once(tmp_path, capsys):
    path = tmp_path / "lift" / "mh" / "low_dim_v15.hdf5"
    dm = RobomimicDataModule(path=str(path), generate_demos=2, batch_size=8)
    dm.prepare_data()
    out = capsys.readouterr().out
    assert path.exists() and out.count("not found: generating 2 scripted lift demos") == 1
    before = digest(path)
    RobomimicDataModule(path=str(path), generate_demos=2).prepare_data()
    assert digest(path) == before and "generating" not in capsys.readouterr().out


def test_absent_custom_path_is_an_error(tmp_path):
    dm = RobomimicDataModule(path=str(tmp_path / "my_demos.hdf5"), generate_demos=5)
    dm.prepare_data()
    with pytest.raises(DatasetError, match="my_demos.hdf5"):
        dm.setup("fit")
    assert not (tmp_path / "my_demos.hdf5").exists()
