"""EnvSpec / vector-env construction and the dataset-vs-simulator dimension check."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from manip.envs import EnvMismatchError, EnvSpec, EpisodeSeeds, make_vector_env


def test_action_and_obs_dim_mismatch_named():
    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0"})
    with pytest.raises(EnvMismatchError, match="action dimension mismatch: the dataset has 7, the simulator .* has 5"):
        make_vector_env(spec, 1, asynchronous=False, obs_dim=28, action_dim=7)
    with pytest.raises(EnvMismatchError, match="observation dimension mismatch: the dataset has 19"):
        make_vector_env(spec, 1, asynchronous=False, obs_dim=19)


def _short_episodes(kind: str) -> tuple[EnvSpec, int, int]:
    """(a spec whose episodes end after 3 steps, obs_dim, action_dim)."""
    if kind == "ogbench":
        return EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 3}), 28, 5
    from manip.data.generate.robomimic_scripted import env_args
    from manip.data.robomimic import DEFAULT_OBS_KEYS

    return EnvSpec("robosuite", {"env_args": env_args("lift"), "obs_keys": list(DEFAULT_OBS_KEYS), "horizon": 3}), 19, 7


@pytest.mark.parametrize("kind", ["ogbench", "robosuite"])
def test_same_step_autoreset_reports_final_observation(kind):
    """An episode is truncated at its horizon's step, not a step earlier or later."""
    spec, obs_dim, action_dim = _short_episodes(kind)
    env = make_vector_env(spec, 1, asynchronous=False, obs_dim=obs_dim, action_dim=action_dim)
    obs, _ = env.reset(seed=0)
    ends = []
    for step in range(3):
        obs, _, terminated, truncated, info = env.step(np.zeros((1, action_dim), np.float32))
        ends.append(bool(truncated[0] or terminated[0]))
    assert ends == [False, False, True]
    assert truncated[0] and not terminated[0]
    assert info["final_obs"][0].shape == (obs_dim,)
    env.close()


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown env kind 'isaac'"):
        EnvSpec("isaac").make()


class _SeedRecorder(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self):
        self.seeds = []

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        return np.zeros(1, np.float32), {}


def test_episode_seeds_continue_from_the_last_explicit_seed():
    env = EpisodeSeeds(_SeedRecorder(), stride=3)
    env.reset()  # nothing to continue from: unseeded
    env.reset(seed=10)
    env.reset()
    env.reset()
    env.reset(seed=4)
    env.reset()
    assert env.unwrapped.seeds == [None, 10, 13, 16, 4, 7]


def _episode_starts(num_envs: int, episodes: int) -> list[np.ndarray]:
    """First observation of each episode k = 0..episodes-1 of a vector env reset with seed 7 (3-step episodes)."""
    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 3})
    env = make_vector_env(spec, num_envs, asynchronous=False)
    obs, _ = env.reset(seed=7)
    starts, started = {}, [0] * num_envs  # started[i]: episodes env i has begun
    for i in range(num_envs):
        starts[i] = obs[i]
    while len(starts) < episodes + num_envs:
        obs, _, terminated, truncated, _ = env.step(np.zeros((num_envs, 5), np.float32))
        for i in np.flatnonzero(terminated | truncated):
            started[i] += 1
            starts[i + started[i] * num_envs] = obs[i]
    env.close()
    return [starts[k] for k in range(episodes)]


def test_episode_k_starts_from_the_same_state_whatever_the_number_of_envs():
    one = _episode_starts(1, 6)
    assert not np.allclose(one[0], one[1])  # episodes differ
    for num_envs in (2, 3):
        for k, (a, b) in enumerate(zip(one, _episode_starts(num_envs, 6))):
            np.testing.assert_array_equal(a, b, err_msg=f"episode {k} with {num_envs} envs")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_env_workers_leave_ctrl_c_to_the_main_process(signame):
    """A terminal's Ctrl-C (or a scheduler's SIGTERM, or SLURM's SIGUSR1 warning, to the job's processes) reaches
    the workers too: they ignore
    it (the main process stops training and closes them), and building the vector env (which makes one env in the
    main process) keeps the main's handler; closing the env ends its workers."""
    import os
    import signal

    signum = getattr(signal, signame)
    before = signal.getsignal(signum)
    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 5})
    env = make_vector_env(spec, 2, asynchronous=True)
    try:
        assert signal.getsignal(signum) is before
        env.reset(seed=0)
        for process in env.processes:
            os.kill(process.pid, signum)
        try:
            obs, *_ = env.step(np.zeros((2, 5), np.float32))
        except KeyboardInterrupt:  # a worker's KeyboardInterrupt, raised again here
            pytest.fail("an env worker was interrupted by Ctrl-C")
        assert obs.shape == (2, 28) and all(process.is_alive() for process in env.processes)
    finally:
        env.close()
    assert not any(process.is_alive() for process in env.processes)


UNCLOSED = """
import numpy as np
from manip.envs import EnvSpec, make_vector_env

if __name__ == "__main__":
    env = make_vector_env(EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 5}), 2)
    env.reset(seed=0)
    print(*(process.pid for process in env.processes), flush=True)
    env.step_async(np.zeros((2, 5), np.float32))
    raise SystemExit(3)  # a crash, with a step in flight and the env never closed
"""


def test_a_process_that_exits_without_closing_its_envs_ends_with_its_workers(tmp_path):
    """The workers ignore SIGTERM, which is how multiprocessing stops them at exit: the envs are closed first, with
    the workers' own close once the step in flight has ended."""
    import os

    script = tmp_path / "unclosed.py"
    script.write_text(UNCLOSED)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-2000:]  # closed quietly
    for pid in map(int, done.stdout.split()):
        with pytest.raises(ProcessLookupError):  # the worker is gone (and reaped)
            os.kill(pid, 0)


def test_a_forced_close_ends_a_worker_stuck_in_a_step():
    """A worker that never answers (a hung simulator or renderer call; here a stopped process) is killed when
    ``close(timeout=...)`` runs out: the workers ignore SIGTERM, which is how gymnasium ends them then."""
    import os
    import signal
    import threading

    env = make_vector_env(EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 5}), 2)
    env.reset(seed=0)
    stuck = env.processes[0]
    os.kill(stuck.pid, signal.SIGSTOP)
    env.step_async(np.zeros((2, 5), np.float32))
    closing = threading.Thread(target=env.close, kwargs={"timeout": 1})
    closing.start()
    closing.join(30)
    hung = closing.is_alive()
    if hung:  # end the test's own worker
        os.kill(stuck.pid, signal.SIGKILL)
        closing.join()
    assert not hung, "close(timeout=1) still waits for the stuck worker after 30 s"
    assert not any(process.is_alive() for process in env.processes)


def _sigint_handler_after_building_envs(queue) -> None:
    import signal

    spec = EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0", "horizon": 5})
    make_vector_env(spec, 2, asynchronous=True).close()
    queue.put(signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def test_a_process_that_is_itself_a_child_keeps_its_ctrl_c_when_it_builds_workers():
    """Only the env workers ignore SIGINT, not a caller that is itself a multiprocessing child (ddp_spawn ranks)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_sigint_handler_after_building_envs, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=120) is True
    finally:
        child.join(timeout=60)
