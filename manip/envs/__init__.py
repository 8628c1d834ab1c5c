"""Simulator adapters with one Gymnasium interface, built from what the dataset says.

Every adapter returns float32 observations in the dataset's key order, takes actions in [-1, 1],
terminates on success, truncates at the task horizon and reports ``info["success"]``.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

ENV_KINDS = ("robosuite", "ogbench")


@dataclass(frozen=True)
class EnvSpec:
    """A picklable recipe for one environment (so vector-env workers can build it).

    kind: "robosuite" (kwargs of ``RobosuiteEnv``) or "ogbench" (kwargs of ``OGBenchEnv``).
    """

    kind: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def make(self, **overrides: Any) -> gym.Env:
        kwargs = {**self.kwargs, **overrides}
        if self.kind == "robosuite":
            from manip.envs.robosuite_env import RobosuiteEnv

            return RobosuiteEnv(**kwargs)
        if self.kind == "ogbench":
            from manip.envs.ogbench_env import OGBenchEnv

            return OGBenchEnv(**kwargs)
        raise ValueError(f"unknown env kind {self.kind!r}; expected one of {ENV_KINDS}")

    @property
    def horizon(self) -> int | None:
        return self.kwargs.get("horizon")


class EnvMismatchError(ValueError):
    """The simulator's observation or action size differs from the dataset's / checkpoint's."""


def check_dims(env: gym.Env | gym.vector.VectorEnv, obs_dim: int | None, action_dim: int | None,
               source: str = "dataset") -> None:
    """Raise ``EnvMismatchError`` naming both sides when the env's dims differ from ``source``'s."""
    obs_space = getattr(env, "single_observation_space", env.observation_space)
    act_space = getattr(env, "single_action_space", env.action_space)
    for name, want, have in (("observation", obs_dim, obs_space.shape[-1]),
                             ("action", action_dim, act_space.shape[-1])):
        if want is not None and want != have:
            raise EnvMismatchError(f"{name} dimension mismatch: the {source} has {want}, "
                                   f"the simulator ({getattr(env, 'spec', None) or type(env).__name__}) has {have}")


class EpisodeSeeds(gym.Wrapper):
    """Seeds every episode of one env of a vector env: after ``reset(seed=s)``, its j-th reset without a seed (the
    vector env's autoreset) uses ``s + j * stride``.

    With ``stride = num_envs`` and the vector env's ``reset(seed=S)`` (env i gets ``S + i``), env i's episodes are
    the vector env's episodes ``k = i, i + E, i + 2E, ...`` and episode k starts from seed ``S + k``, whatever
    ``num_envs``: an evaluation meets the same initial states with one simulator process or eight.
    """

    def __init__(self, env: gym.Env, stride: int):
        super().__init__(env)
        self.stride = stride
        self._next_seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed = self._next_seed
        if seed is not None:
            self._next_seed = int(seed) + self.stride
        return self.env.reset(seed=seed, options=options)


def _leaving_signals_to_the_parent(make_env: Callable[[], gym.Env], parent_pid: int) -> gym.Env:
    if os.getpid() != parent_pid:  # a worker (AsyncVectorEnv also makes one env in the parent)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: SLURM's time-limit warning
            signal.signal(signum, signal.SIG_IGN)
    return make_env()


# Vector envs whose worker processes may still run. At exit they are closed before multiprocessing's own exit
# handler, which would stop the workers with a SIGTERM they ignore and then wait for them. The hook is registered
# once workers exist, after multiprocessing's, so that it runs first.
_OPEN_WORKERS: weakref.WeakSet = weakref.WeakSet()


def close_vector_env(env: gym.vector.VectorEnv) -> None:
    """The workers' own close (quiet), after a step in flight ends; a worker stuck for 10 s is killed."""
    env.close(timeout=10)


def _close_open_workers() -> None:
    for env in list(_OPEN_WORKERS):
        if not env.closed:
            close_vector_env(env)


def make_vector_env(spec: EnvSpec, num_envs: int = 1, asynchronous: bool | None = None,
                    obs_dim: int | None = None, action_dim: int | None = None,
                    **overrides: Any) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``spec`` in one vector env (a process per env when asynchronous).

    Uses same-step autoreset: an episode's last observation is in ``info["final_obs"]`` and the
    returned observation is already the next episode's first one. After ``reset(seed=S)`` episode k (env
    ``k % num_envs``'s ``k // num_envs``-th) starts from seed ``S + k`` (:class:`EpisodeSeeds`). ``obs_dim`` /
    ``action_dim``, when given, are checked against the simulator (``EnvMismatchError`` on a difference).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    fns = [lambda: EpisodeSeeds(spec.make(**overrides), num_envs) for _ in range(num_envs)]
    asynchronous = num_envs > 1 if asynchronous is None else asynchronous
    mode = gym.vector.AutoresetMode.SAME_STEP
    if asynchronous:
        # Ctrl-C in a terminal, a scheduler's SIGTERM and SLURM's SIGUSR1 reach the whole job: the workers leave them to
        # the main process, which decides what stops (see manip.run.StopOnCtrlC) and closes them.
        fns = [functools.partial(_leaving_signals_to_the_parent, fn, os.getpid()) for fn in fns]
        env = gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="spawn")
        for process in env.processes:
            # A forced close (a close timeout, or the env's __del__) terminates the workers and waits for them: they
            # ignore SIGTERM, so one stuck in a step would be waited for forever, and idle ones end only on reading
            # their closed pipe, with a traceback. SIGKILL ends both.
            process.terminate = process.kill
        if not _OPEN_WORKERS:
            atexit.unregister(_close_open_workers)  # registered again: after any exit handler added since
            atexit.register(_close_open_workers)
        _OPEN_WORKERS.add(env)
    else:
        env = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        check_dims(env, obs_dim, action_dim)
    except EnvMismatchError:
        env.close()
        raise
    return env
