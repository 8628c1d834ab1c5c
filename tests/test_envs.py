"""EnvSpec / vector-env construction and the dataset-vs-simulator dimension check."""

import numpy as np
import pytest

from manip.envs import EnvMismatchError, EnvSpec, make_vector_env


def test_action_and_obs_dim_mismatch_named():
    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0"})
    with pytest.raises(EnvMismatchError, match="action dimension mismatch: the dataset has 7, the simulator .* has 5"):
        make_vector_env(spec, 1, asynchronous=False, obs_dim=28, action_dim=7)
    with pytest.raises(EnvMismatchError, match="observation dimension mismatch: the dataset has 19"):
        make_vector_env(spec, 1, asynchronous=False, obs_dim=19)


def test_same_step_autoreset_reports_final_observation():
    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 3})
    env = make_vector_env(spec, 1, asynchronous=False, obs_dim=28, action_dim=5)
    obs, _ = env.reset(seed=0)
    for step in range(3):
        obs, _, terminated, truncated, info = env.step(np.zeros((1, 5), np.float32))
    assert truncated[0] and not terminated[0]
    assert info["final_obs"][0].shape == (28,)
    env.close()


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown env kind 'isaac'"):
        EnvSpec("isaac").make()
