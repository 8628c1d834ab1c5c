"""OGBench single-task manipulation envs behind the manip Env contract.

The env is built with ``ogbench.make_env_and_datasets(..., env_only=True)``, so it has OGBench's
singletask semantics: reward = ``#solved subtasks - #subtasks`` (the dataset convention),
``info["success"]`` when every subtask is solved, termination at success, and success computed
from the state *before* the action (``success_timing='pre'``), i.e. reported one step after the
goal state is reached. Episodes are truncated at ``horizon`` steps.

Observations are float32; ``info`` keeps only ``success`` (OGBench's info also carries the full
simulator state and privileged object poses).

Rendering is offscreen through ``mujoco.Renderer``, created on the first ``render()`` call. On a
machine without a display set ``MUJOCO_GL=egl`` (with Mesa's libEGL and no GPU also
``EGL_PLATFORM=surfaceless``) before anything imports mujoco.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import gymnasium
import numpy as np

from manip.cli_args import raise_if_interrupted

# Episode length of every singletask env family (OGBench registration).
MAX_EPISODE_STEPS = {
    "cube-single": 200,
    "cube-double": 500,
    "cube-triple": 1000,
    "cube-quadruple": 1000,
    "scene": 750,
    "puzzle-3x3": 500,
    "puzzle-4x4": 500,
    "puzzle-4x5": 1000,
    "puzzle-4x6": 1000,
}


@contextlib.contextmanager
def quiet_space_casts() -> Iterator[None]:
    """Silence gymnasium's harmless float64 -> float32 Box warnings, raised when OGBench builds spaces."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
        yield


def singletask_env_name(name: str) -> str:
    """Env name of a singletask env or dataset name.

    ``cube-single-singletask-task1-v0`` is returned as is; the dataset-style
    ``cube-single-play-singletask-task1-v0`` maps to it.
    """
    splits = name.split("-")
    if "singletask" not in splits:
        raise ValueError(f"{name!r} is not an OGBench singletask name, e.g. cube-single-singletask-task1-v0")
    pos = splits.index("singletask")
    family = "-".join(splits[:pos])
    if family not in MAX_EPISODE_STEPS:
        family = "-".join(splits[: pos - 1])
        splits = splits[: pos - 1] + splits[pos:]
    if family not in MAX_EPISODE_STEPS:
        families = ", ".join(MAX_EPISODE_STEPS)
        raise ValueError(f"unknown OGBench singletask env {name!r}; env families: {families}")
    return "-".join(splits)


class OGBenchEnv(gymnasium.Env):
    """An OGBench singletask env with float32 observations and ``info["success"]``.

    Args:
        env_name: singletask env name (``"cube-single-singletask-task1-v0"``) or the matching
            dataset-style name (``"cube-single-play-singletask-task1-v0"``).
        horizon: truncate after this many steps; default the env's own episode length
            (cube-single 200, cube-double 500, cube-triple 1000, scene 750, puzzle-3x3 500).
        render_size: ``(height, width)`` of the frames ``render()`` returns; None disables rendering.

    Spaces: observation Box(float32, (obs_dim,)) (cube-single 28, cube-double 37,
    cube-triple 46, scene 40, puzzle-3x3 55); action Box(-1, 1, (5,), float32) = relative
    end-effector xyz, yaw, gripper.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_name: str, horizon: int | None = None, render_size: tuple[int, int] | None = None):
        import ogbench

        self.env_name = singletask_env_name(env_name)
        family = self.env_name.split("-singletask")[0]
        self.horizon = int(horizon) if horizon is not None else MAX_EPISODE_STEPS[family]
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.render_size = None if render_size is None else (int(render_size[0]), int(render_size[1]))
        self.render_mode = "rgb_array" if render_size is not None else None

        kwargs: dict[str, Any] = {"max_episode_steps": self.horizon}
        if self.render_size is not None:
            kwargs["height"], kwargs["width"] = self.render_size
        # make_env_and_datasets expects a dataset-style singletask name; the dataset type does not matter.
        dataset_style = self.env_name.replace("-singletask", "-play-singletask", 1)
        with quiet_space_casts():
            self._env = ogbench.make_env_and_datasets(dataset_style, env_only=True, **kwargs)
            obs_dim = self._env.observation_space.shape[0]
            action_dim = self._env.action_space.shape[0]
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)

    @property
    def ogbench_env(self):
        """The underlying OGBench env (``ManipSpaceEnv``), e.g. for scripted oracles."""
        return self._env.unwrapped

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode; returns (obs (O,) float32, info).

        The same ``seed`` gives the same episode. OGBench's reset also takes a few unseeded random
        actions to record a goal observation, but restores the state afterwards, so they do not
        change the observations (seeded rollouts are bit-identical).
        """
        super().reset(seed=seed)
        with quiet_space_casts():
            ob, _ = self._env.reset(seed=seed, options=options)
        return np.asarray(ob, dtype=np.float32), {"success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Apply an action (5,) in [-1, 1]; returns (obs (O,) float32, reward, terminated, truncated, info).

        ``info`` is ``{"success": bool}``; the reward follows the dataset convention (module docstring).
        """
        ob, reward, terminated, truncated, info = self._env.step(np.asarray(action, dtype=np.float32))
        return (
            np.asarray(ob, dtype=np.float32),
            float(reward),
            bool(terminated),
            bool(truncated),
            {"success": bool(info["success"])},
        )

    def render(self) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 of the current state from OGBench's front camera."""
        if self.render_size is None:
            raise RuntimeError(f"{type(self).__name__}({self.env_name!r}) was built without render_size")
        try:
            frame = self._env.unwrapped.render()
        except Exception as err:
            raise_if_interrupted(err)
            raise RuntimeError(
                f"offscreen rendering of {self.env_name} failed ({type(err).__name__}: {err}). Without a "
                "display set MUJOCO_GL=egl (and EGL_PLATFORM=surfaceless on a machine without a GPU) or "
                "MUJOCO_GL=osmesa with PYOPENGL_PLATFORM=osmesa before mujoco is imported."
            ) from err
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        """Release the offscreen renderer (if one was created) and the env."""
        sim = self._env.unwrapped
        if sim._renderer is not None:
            sim._renderer.close()
            sim._renderer = None
        self._env.close()
