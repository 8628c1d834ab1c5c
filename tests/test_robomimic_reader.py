"""Robomimic reader and DataModule on a generated file: layout, conventions, every bad input."""

import hashlib
import re
import shutil

import h5py
import numpy as np
import pytest

from manip.data.datamodule import RobomimicDataModule
from manip.data.errors import DatasetError
from manip.data.robomimic import DEFAULT_OBS_KEYS, load_robomimic, read_env_args
from manip.envs import EnvMismatchError

from entry_points import warnings_logged


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def lift_copy(lift_hdf5, tmp_path):
    path = tmp_path / "lift.hdf5"
    shutil.copy(lift_hdf5, path)
    return path


def replace(f, key, change):
    """Rewrite dataset ``key`` of an open file as ``change(old values)`` (shapes may differ)."""
    values = change(f[key][()])
    del f[key]
    f[key] = values


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


def test_a_generated_file_says_so_and_a_released_one_does_not(lift_hdf5, lift_copy, caplog):
    """The generator's marker reaches the DataModule's info (and so the checkpoints) and a line on every load."""
    assert load_robomimic(lift_hdf5).generated == {"generator": "manip scripted robosuite demos", "task": "lift",
                                                   "demos": 6, "seed": 0}
    dm = RobomimicDataModule(path=str(lift_hdf5))
    dm.setup()
    assert dm.info["generated"]["demos"] == 6
    assert (f"{lift_hdf5} is a stand-in manip generated (generator manip scripted robosuite demos, task lift, demos 6, "
            f"seed 0), not the released dataset") in warnings_logged(caplog)
    caplog.clear()
    with h5py.File(lift_copy, "a") as f:
        del f["data"].attrs["manip_generated"]
    assert load_robomimic(lift_copy).generated is None
    dm = RobomimicDataModule(path=str(lift_copy))
    dm.setup()
    assert "generated" not in dm.info and "stand-in" not in caplog.text


def test_missing_file_names_path_and_where_data_goes(tmp_path):
    with pytest.raises(DatasetError, match="not found.*nothing.hdf5.*generate.*--task {lift,can,square}"):
        load_robomimic(tmp_path / "nothing.hdf5")
    square = tmp_path / "square" / "mh" / "low_dim_v15.hdf5"  # the release's layout names the task
    with pytest.raises(DatasetError, match=re.escape(f"(e.g. data/robomimic/square/mh/low_dim_v15.hdf5 from robomimic's "
                                                     f"v1.5 release) or generate one with `python -m manip.data."
                                                     f"generate robomimic --task square --out {square}`")):
        load_robomimic(square)


def test_unknown_obs_key_lists_available(lift_hdf5):
    with pytest.raises(DatasetError, match=r"unknown observation key 'robot0_eef_pose'.*available: \[.*robot0_eef_pos"):
        load_robomimic(lift_hdf5, obs_keys=["robot0_eef_pose"])


def test_one_observation_key_given_as_a_string_is_named(lift_hdf5):
    """``data.obs_keys=object`` would otherwise be read letter by letter ("unknown observation key 'o'")."""
    from manip.settings import SettingError

    with pytest.raises(DatasetError, match="obs_keys must be a sequence of observation keys, got the string 'object'"):
        load_robomimic(lift_hdf5, obs_keys="object")
    with pytest.raises(SettingError, match=re.escape("data.obs_keys must be a list of observation keys, got the "
                                                     "string 'object' (data.obs_keys=[object])")):
        RobomimicDataModule(str(lift_hdf5), obs_keys="object")


def test_missing_key_named(lift_copy):
    with h5py.File(lift_copy, "a") as f:
        del f["data/demo_1/actions"]
    before = digest(lift_copy)
    with pytest.raises(DatasetError, match="missing key 'data/demo_1/actions'"):
        load_robomimic(lift_copy)
    assert digest(lift_copy) == before


def test_a_file_without_next_obs_names_the_extraction_flag(lift_copy):
    with h5py.File(lift_copy, "a") as f:
        for demo in f["data"]:
            del f[f"data/{demo}/next_obs"]
    with pytest.raises(DatasetError, match=re.escape(f"{lift_copy}: missing key 'data/demo_0/next_obs'; the file was "
                                                     f"extracted without next observations (robomimic's "
                                                     f"dataset_states_to_obs.py --exclude-next-obs)")):
        load_robomimic(lift_copy)


@pytest.mark.parametrize(("missing", "holder"), [("demo_1", "demo_0"), ("demo_0", "demo_1")])
def test_an_observation_key_missing_from_one_demo_is_named_as_missing(lift_copy, missing, holder):
    with h5py.File(lift_copy, "a") as f:
        del f[f"data/{missing}/obs/object"]
    with pytest.raises(DatasetError, match=re.escape(f"{lift_copy}: missing key 'data/{missing}/obs/object' "
                                                     f"(data/{holder}/obs/object has it)")):
        load_robomimic(lift_copy)


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
    with pytest.raises(DatasetError, match=r"NaN or inf in 'data/demo_2/obs/object' \(first bad row 3\)"):
        load_robomimic(lift_copy)


@pytest.mark.parametrize("value", [np.nan, 2.0])
def test_dones_that_are_not_flags_are_refused(lift_copy, value):
    """A NaN done would otherwise read as True (a spurious terminal with mask 0)."""
    with h5py.File(lift_copy, "a") as f:
        replace(f, "data/demo_1/dones", lambda d: np.where(np.arange(len(d)) == 4, value, d).astype(np.float64))
    with pytest.raises(DatasetError, match=rf"'data/demo_1/dones' holds {value!r} at row 4; dones must be 0 or 1"):
        load_robomimic(lift_copy)


def test_a_file_its_simulator_cannot_play_fails_when_loaded(lift_copy, tmp_path):
    """env_args naming no robosuite env, a non-robosuite env type, or actions narrower than the simulator's: the
    DataModule refuses the file at setup (before training), naming it."""
    import json

    def with_env_args(change):
        with h5py.File(lift_copy, "a") as f:
            env_args = json.loads(f["data"].attrs["env_args"])
            change(env_args)
            f["data"].attrs["env_args"] = json.dumps(env_args)

    original = read_env_args(lift_copy)
    with_env_args(lambda args: args.update(env_name="Lfit"))
    with pytest.raises(DatasetError, match=rf"{lift_copy}: the simulator its data.attrs\['env_args'\] describe "
                                           rf"\(env_name 'Lfit'\) cannot be built: .*Lfit"):
        RobomimicDataModule(path=str(lift_copy)).setup()
    with_env_args(lambda args: args.update(original, type=2))
    with pytest.raises(DatasetError, match=r"env_args'\] has type 2; only robosuite datasets \(type 1\)"):
        RobomimicDataModule(path=str(lift_copy)).setup()
    with_env_args(lambda args: args.update(original))
    with h5py.File(lift_copy, "a") as f:
        for demo in f["data"]:
            replace(f, f"data/{demo}/actions", lambda a: a[:, :6])
    with pytest.raises(EnvMismatchError, match=rf"action dimension mismatch: the dataset {lift_copy} has 6, "
                                               rf"the simulator .* has 7"):
        RobomimicDataModule(path=str(lift_copy)).setup()


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


def test_absent_default_file_is_generated_once(tmp_path, capsys, caplog):
    path = tmp_path / "lift" / "mh" / "low_dim_v15.hdf5"
    dm = RobomimicDataModule(path=str(path), generate_demos=2, batch_size=8)
    dm.prepare_data()
    assert path.exists() and caplog.text.count("not found: generating 2 scripted lift demos") == 1
    assert "lift: 2/2 demos" in capsys.readouterr().out  # the generator's progress
    caplog.clear()
    before = digest(path)
    RobomimicDataModule(path=str(path), generate_demos=2).prepare_data()
    assert digest(path) == before and "generating" not in caplog.text
    # a config that would have generated another size, or another task, uses the file and says so
    RobomimicDataModule(path=str(path), generate_demos=3, task="can").setup()
    out = caplog.text
    assert f"note: {path} was generated with 2 demos, this config generates 3 (data.generate_demos)" in out
    assert f"note: {path} holds Lift episodes, not PickPlaceCan (data.task=can only chooses what to generate)" in out


def test_an_env_without_a_known_horizon_is_noted(tmp_path):
    """QC's horizons cover lift, can and square; another robosuite env (a ToolHang file, say) runs episodes of the
    default length, and the run says so unless data.env_horizon is set."""
    path = tmp_path / "tool_hang" / "mh" / "low_dim_v15.hdf5"
    notes = RobomimicDataModule(path=str(path))._notes("ToolHang", None)
    assert [note for note in notes if "no evaluation horizon is known for ToolHang" in note and "400" in note]
    assert not any("horizon" in note for note in RobomimicDataModule(path=str(path))._notes("Lift", None))
    assert not any("horizon" in note for note in RobomimicDataModule(path=str(path), env_horizon=700)._notes(
        "ToolHang", None))


@pytest.mark.parametrize("name", ["my_demos.hdf5", "lift/mh/low_dim.hdf5", "can/mh/low_dim_v15.hdf5",
                                  "lift/ph/low_dim_v15.hdf5"])
def test_absent_path_off_the_tasks_layout_is_an_error_not_a_stand_in(tmp_path, name):
    """A typo in data.path, or another task's file, is reported: a stand-in lift dataset is generated only at
    <dir>/lift/mh/low_dim_v15.hdf5."""
    dm = RobomimicDataModule(path=str(tmp_path / name), generate_demos=5, task="lift")
    dm.prepare_data()
    with pytest.raises(DatasetError, match=re.escape(f"Robomimic dataset not found: {tmp_path / name}. A stand-in is "
                                                     "generated only at <dir>/lift/mh/low_dim_v15.hdf5")):
        dm.setup("fit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("group", ["obs", "next_obs"])
@pytest.mark.parametrize("change", [
    lambda a: a.reshape(-1, 5),  # (2N, 5) has the size of (N, 10): a reshape alone would accept it
    lambda a: np.concatenate([a, a[:1]]),
], ids=["2N-rows-of-5", "N+1-rows"])
def test_obs_rows_must_match_actions(lift_copy, group, change):
    with h5py.File(lift_copy, "a") as f:
        n = len(f["data/demo_1/actions"])
        replace(f, f"data/demo_1/{group}/object", change)
        shape = f[f"data/demo_1/{group}/object"].shape
    before = digest(lift_copy)
    with pytest.raises(DatasetError) as err:
        load_robomimic(lift_copy)
    assert str(lift_copy) in str(err.value) and f"'data/demo_1/{group}/object' has shape {shape}" in str(err.value)
    assert f"expected ({n}, ...)" in str(err.value)
    assert digest(lift_copy) == before


def _shift_rewards(f):
    # demo_0 one short, demo_1 one long: the totals agree, every step after demo_0 would be misaligned
    replace(f, "data/demo_0/rewards", lambda r: r[:-1])
    replace(f, "data/demo_1/rewards", lambda r: np.concatenate([r, r[-1:]]))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: [replace(f, f"data/{d}/actions", lambda a: a[:, 0]) for d in f["data"]],
     r"'data/demo_0/actions' has shape \(\d+,\); expected \(N, action_dim\)"),
    (_shift_rewards, r"'data/demo_0/rewards' has shape \(\d+,\); expected \(\d+,\) like 'data/demo_0/actions'"),
    (lambda f: replace(f, "data/demo_2/dones", lambda d: d[:-1]),
     r"'data/demo_2/dones' has shape \(\d+,\); expected"),
    (lambda f: replace(f, "data/demo_3/actions", lambda a: a[:, :6]),
     r"'data/demo_3/actions' has shape \(\d+, 6\), but 'data/demo_0/actions' has shape \(\d+, 7\)"),
    (lambda f: [replace(f, f"data/demo_1/{g}/object", lambda a: a[:, :9]) for g in ("obs", "next_obs")],
     r"'data/demo_1/obs/object' has shape \(\d+, 9\), but 'data/demo_0/obs/object' has shape \(\d+, 10\)"),
    (lambda f: replace(f, "data/demo_0/next_obs/object", lambda a: a[:, :9]),
     r"'data/demo_0/next_obs/object' has shape \(\d+, 9\), but 'data/demo_0/obs/object' has shape \(\d+, 10\)"),
    (lambda f: replace(f, "data/demo_1/actions", lambda a: 5.0 * a),
     r"'data/demo_1/actions' holds actions outside \[-1, 1\] \(max \|a\| = [\d.]+, \d+ rows, first row \d+\)"),
    (lambda f: [replace(f, f"data/{d}/{g}/object", lambda a: a.reshape(len(a), 2, 5)) for d in f["data"]
                for g in ("obs", "next_obs")],
     r"'data/demo_0/obs/object' has shape \(\d+, 2, 5\), an image per step; manip reads low-dim"),
], ids=["actions-1d", "rewards-shifted", "dones-short", "action-width", "obs-width", "next-obs-width",
        "actions-unnormalised", "image-key"])
def test_per_demo_shapes_are_checked(lift_copy, mutate, message):
    with h5py.File(lift_copy, "a") as f:
        mutate(f)
    before = digest(lift_copy)
    with pytest.raises(DatasetError, match=message) as err:
        load_robomimic(lift_copy)
    assert str(lift_copy) in str(err.value)
    assert digest(lift_copy) == before


def _set_env_args(value):
    def mutate(f):
        f["data"].attrs["env_args"] = value
    return mutate


@pytest.mark.parametrize(("mutate", "filter_key", "message"), [
    (_set_env_args("{not json"), None, r"data.attrs\['env_args'\] is not valid JSON"),
    (_set_env_args('{"type": 1}'), None, r"data.attrs\['env_args'\] has no 'env_name'"),
    (lambda f: f["data"].create_group("demo_extra"), None, r"group 'data' holds \['demo_extra'\].*demo_<int>"),
    (lambda f: f.create_dataset("mask/odd", data=np.array([b"demo_1", b"traj_a"])), "odd",
     r"'mask/odd' holds \['traj_a'\].*demo_<int>"),
], ids=["bad-json", "no-env-name", "odd-demo-group", "odd-mask-entry"])
def test_bad_metadata_names_file_and_key(lift_copy, mutate, filter_key, message):
    with h5py.File(lift_copy, "a") as f:
        mutate(f)
    with pytest.raises(DatasetError, match=message) as err:
        load_robomimic(lift_copy, filter_key=filter_key)
    assert str(lift_copy) in str(err.value)


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "low_dim_v15.hdf5"
    path.write_text("not hdf5")
    for read in (load_robomimic, read_env_args):
        with pytest.raises(DatasetError, match="low_dim_v15.hdf5 is not a readable HDF5 file"):
            read(path)
    assert path.read_text() == "not hdf5"


def test_next_observations_concatenate_the_keys_in_the_same_order(lift_hdf5):
    """obs and next_obs columns line up: next_observations of a step are the file's next_obs keys in obs_keys order."""
    keys = ("object", "robot0_eef_pos", "robot0_gripper_qpos")
    t = load_robomimic(lift_hdf5, obs_keys=keys).transitions
    with h5py.File(lift_hdf5) as f:
        demo = f["data/demo_0"]
        n0 = len(demo["actions"])
        next0 = np.concatenate([demo["next_obs"][k][:] for k in keys], 1)
    np.testing.assert_allclose(t.next_observations[:n0], next0, rtol=1e-6)
    # inside a demo, a step's next observation is the following step's observation
    np.testing.assert_allclose(t.next_observations[:n0 - 1], t.observations[1:n0], rtol=1e-6)


def test_demos_are_read_in_numeric_order(lift_copy):
    """robomimic's order is int(name[5:]): demo_9 before demo_10 (a string sort would put demo_10 after demo_1)."""
    with h5py.File(lift_copy, "a") as f:
        f.move("data/demo_5", "data/demo_10")
        f.move("data/demo_4", "data/demo_9")
        last = np.concatenate([f["data/demo_10/obs"][k][:] for k in DEFAULT_OBS_KEYS], 1)
    data = load_robomimic(lift_copy)
    assert data.demos == ["demo_0", "demo_1", "demo_2", "demo_3", "demo_9", "demo_10"]
    np.testing.assert_allclose(data.transitions.observations[-len(last):], last, rtol=1e-6)


def test_datamodule_stats_are_the_training_transitions_mean_and_std(lift_hdf5):
    """The statistics the checkpoint carries (and the policy standardises with) are those of the transitions the run
    trains on: with max_transitions, of the first episodes kept, not of the whole file."""
    dm = RobomimicDataModule(path=str(lift_hdf5), batch_size=8, horizon=5, seed=0, generate_demos=0)
    dm.setup("fit")
    transitions = load_robomimic(lift_hdf5).transitions
    obs = transitions.observations.astype(np.float64)
    np.testing.assert_allclose(dm.stats.obs_mean, obs.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dm.stats.obs_std, obs.std(0), rtol=1e-6, atol=1e-9)
    first = int(np.flatnonzero(transitions.terminals)[0]) + 1
    cut = RobomimicDataModule(path=str(lift_hdf5), batch_size=8, horizon=5, seed=0, generate_demos=0,
                              max_transitions=first)
    cut.setup("fit")
    assert cut.replay.size == first
    np.testing.assert_allclose(cut.stats.obs_mean, obs[:first].mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cut.stats.obs_std, obs[:first].std(0), rtol=1e-6, atol=1e-9)
