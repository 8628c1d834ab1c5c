"""Gymnasium adapter for robosuite 1.5 environments described by a Robomimic dataset's ``env_args``.

The module also holds the few low-level helpers that dataset generation shares with the adapter
(building the robosuite env, seeding its placement randomness, restoring a flat MuJoCo state).

Episode starts: ``reset(seed)`` is robosuite's own reset, as Robomimic's rollouts (and the human demonstrations
of the released files) start. The scripted generator records each demo after ``restore_state`` of that reset's
state, so that ``reset_to(states[0], model_file)`` replays it exactly; the simulator state is the same, but the
deterministic reset leaves the OSC controller's null-space posture target at the robot's home pose instead of the
noisy initial one. Rollouts from the same state then drift apart (observations differ by 1.6e-3 after one step
and by up to 0.05 after 30 random actions); on the lift preset's checkpoint (seed 0, 50 episodes, one simulator)
success is the same either way: 1.00 / 1.00 noise-free, 0.60 / 0.60 best-of-32 from unit noise (plain reset /
restored start).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from manip.cli_args import raise_if_interrupted

REWARD_MODES = ("r-1", "r")

# Settings every adapter env uses regardless of what the dataset recorded (Robomimic's EnvRobosuite does the same).
_FORCED_KWARGS = {
    "has_renderer": False,
    "use_camera_obs": False,
    "ignore_done": True,
    "use_object_obs": True,
}


_RENDER_HINT = (
    "set MUJOCO_GL=egl with EGL_PLATFORM=surfaceless (or MUJOCO_GL=osmesa with PYOPENGL_PLATFORM=osmesa) "
    "before importing robosuite"
)


@contextlib.contextmanager
def quiet_robosuite() -> Iterator[None]:
    """Silence robosuite's per-reset controller warnings (e.g. config parts the robot lacks) inside the block."""
    logger = logging.getLogger("robosuite_logs")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def robosuite_kwargs(env_args: dict, render_size: tuple[int, int] | None = None) -> dict:
    """Keyword arguments for ``robosuite.make`` from a dataset's ``env_args``.

    Forces ``has_renderer=False``, ``use_camera_obs=False``, ``ignore_done=True``, ``use_object_obs=True`` and
    ``has_offscreen_renderer = render_size is not None``. A flat robosuite <= 1.4 controller config
    (``{"type": "OSC_POSE", ...}`` without ``body_parts``) is converted to the 1.5 composite form, and such files
    get ``lite_physics=False`` unless they say otherwise (robosuite's advice for data recorded before 1.5).
    """
    from robosuite.controllers.composite.composite_controller_factory import (
        refactor_composite_controller_config,
    )

    kwargs = copy.deepcopy(dict(env_args.get("env_kwargs", {})))
    kwargs.pop("env_name", None)
    robots = kwargs.get("robots", ["Panda"])
    robot = robots if isinstance(robots, str) else robots[0]
    controller = kwargs.get("controller_configs")
    if isinstance(controller, dict) and "body_parts" not in controller:
        kwargs["controller_configs"] = refactor_composite_controller_config(controller, robot, ["right"])
    if "lite_physics" not in kwargs and _version_tuple(env_args.get("env_version", "1.5")) < (1, 5):
        kwargs["lite_physics"] = False
    kwargs.update(_FORCED_KWARGS)
    kwargs["has_offscreen_renderer"] = render_size is not None
    return kwargs


def make_robosuite(env_args: dict, render_size: tuple[int, int] | None = None):
    """Build the robosuite env described by ``env_args`` (see ``robosuite_kwargs``).

    Like Robomimic's EnvRobosuite, all joint-position observables are active. robosuite 1.5 no longer defines the
    end-effector velocity observables that the released low-dim files contain, so ``robot0_eef_vel_lin`` and
    ``robot0_eef_vel_ang`` are added back with robosuite 1.4's definition (see ``add_eef_velocity_observables``).
    Raises RuntimeError with a hint about ``MUJOCO_GL``/``EGL_PLATFORM`` if the offscreen renderer cannot start.
    """
    import robosuite

    kwargs = robosuite_kwargs(env_args, render_size)
    try:
        with quiet_robosuite():
            env = robosuite.make(env_args["env_name"], **kwargs)
    except Exception as err:
        if render_size is None:
            raise
        raise_if_interrupted(err)
        raise RuntimeError(
            f"could not create the offscreen renderer ({type(err).__name__}: {err}); {_RENDER_HINT}"
        ) from err
    add_eef_velocity_observables(env)
    for name in env.observation_names:
        if "joint_pos" in name or "eef_vel" in name:
            env.modify_observable(observable_name=name, attribute="active", modifier=True)
    return env


def add_eef_velocity_observables(env) -> None:
    """Add ``<robot>eef_vel_lin`` and ``<robot>eef_vel_ang`` (3,) observables if the env lacks them.

    As in robosuite 1.4: world-frame linear / angular velocity of the end-effector body (``get_body_xvelp`` /
    ``get_body_xvelr``), sampled at the control frequency, in the robot's proprio modality.
    """
    from robosuite.utils.observables import Observable, sensor

    def make_sensors(body: str, modality: str):
        @sensor(modality=modality)
        def eef_vel_lin(obs_cache):
            return np.array(env.sim.data.get_body_xvelp(body))

        @sensor(modality=modality)
        def eef_vel_ang(obs_cache):
            return np.array(env.sim.data.get_body_xvelr(body))

        return {"eef_vel_lin": eef_vel_lin, "eef_vel_ang": eef_vel_ang}

    for robot in env.robots:
        prefix = robot.robot_model.naming_prefix
        for arm in robot.arms:
            arm_prefix = prefix + (f"{arm}_" if len(robot.arms) > 1 else "")
            sensors = make_sensors(robot.robot_model.eef_name[arm], f"{prefix}proprio")
            for suffix, fn in sensors.items():
                name = arm_prefix + suffix
                if name not in env.observation_names:
                    env.add_observable(Observable(name=name, sensor=fn, sampling_rate=env.control_freq))


def seed_placement(env, seed: int) -> None:
    """Re-seed robosuite's episode randomness (object sizes and placements, joint noise) in place.

    robosuite 1.5 draws all of it from ``env.rng``, which the placement samplers and objects share by reference,
    so its generator state is overwritten rather than replaced.
    """
    env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state


def restore_state(env, state: np.ndarray, model_xml: str | None = None) -> dict[str, np.ndarray]:
    """Start an episode from a flat MuJoCo state (time, qpos, qvel) and return the observation dict.

    ``model_xml`` (a demo's ``model_file``) first rebuilds the simulator from that MJCF, which reproduces
    episode-specific model parameters such as Lift's random cube size; without it the current model is kept.
    Then a deterministic reset (no re-sampling; controllers, gripper command and observables start fresh),
    ``state`` is written, ``mj_forward`` runs and the observation is computed from the restored state.
    """
    if model_xml is not None:
        env.reset_from_xml_string(env.edit_model_xml(model_xml))
    env.deterministic_reset = True
    try:
        env.reset()
    finally:
        env.deterministic_reset = False
    env.sim.set_state_from_flattened(np.asarray(state, dtype=np.float64))
    env.sim.forward()
    return env._get_observations(force_update=True)


class RobosuiteEnv(gym.Env):
    """Robomimic-style robosuite task as a ``gymnasium.Env`` with flat float32 observations.

    Args:
        env_args: a dataset's ``env_args`` ({"env_name", "env_version", "type", "env_kwargs"}).
        obs_keys: observation keys concatenated in this order; ``object`` is robosuite's ``object-state``.
        horizon: episode length; ``truncated`` becomes True at this step count.
        reward_mode: ``"r-1"`` gives ``float(success) - 1`` (QC convention), ``"r"`` gives ``float(success)``.
        render_size: (height, width) of ``render()`` images; None disables rendering.
        camera: camera used by ``render()``.

    Spaces: observation Box(float32, (obs_dim,)); action Box(-1, 1, (act_dim,), float32) (7 for one Panda arm:
    OSC delta pose + gripper). ``step`` returns terminated = success and ``info["success"]`` (bool).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        env_args: dict,
        obs_keys: Sequence[str],
        horizon: int,
        reward_mode: str = "r-1",
        render_size: tuple[int, int] | None = None,
        camera: str = "agentview",
    ):
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.env_args = copy.deepcopy(env_args)
        self.obs_keys = list(obs_keys)
        self.horizon = int(horizon)
        self.reward_mode = reward_mode
        self.render_size = None if render_size is None else (int(render_size[0]), int(render_size[1]))
        self.camera = camera
        self.render_mode = "rgb_array" if render_size is not None else None

        self._env = make_robosuite(self.env_args, self.render_size)
        available = self._env._get_observations()
        missing = [key for key in self.obs_keys if self._robosuite_key(key) not in available]
        if missing:
            names = sorted(["object", *available.keys()])
            raise ValueError(f"unknown observation key(s) {missing}; available keys: {names}")
        obs_dim = sum(int(np.prod(np.shape(available[self._robosuite_key(key)]))) for key in self.obs_keys)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self._env.action_dim,), np.float32)
        self._steps = 0

    @staticmethod
    def _robosuite_key(key: str) -> str:
        return "object-state" if key == "object" else key

    @property
    def sim_env(self):
        """The underlying robosuite environment."""
        return self._env

    def _flatten(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        parts = [np.asarray(obs[self._robosuite_key(key)], dtype=np.float32).reshape(-1) for key in self.obs_keys]
        return np.concatenate(parts)

    def success(self) -> bool:
        """Whether the current simulator state solves the task."""
        return bool(self._env._check_success())

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a new episode; ``seed`` fixes robosuite's object placement and joint noise. Returns (obs, info)."""
        super().reset(seed=seed)
        if seed is not None:
            seed_placement(self._env, seed)
        with quiet_robosuite():
            obs = self._env.reset()
        self._steps = 0
        return self._flatten(obs), {"success": self.success()}

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> np.ndarray:
        """Start an episode from a flat MuJoCo state (a dataset's ``states[t]``, shape (D,)); returns obs (obs_dim,).

        ``model_xml`` (a demo's ``model_file``) first rebuilds the simulator from that MJCF, which reproduces
        episode-specific model parameters such as Lift's random cube size (see ``restore_state``).
        """
        with quiet_robosuite():
            obs = restore_state(self._env, state, model_xml)
        self._steps = 0
        return self._flatten(obs)

    def step(self, action):
        """Apply one action of shape (act_dim,); returns (obs, reward, terminated, truncated, info)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"action has {action.shape[0]} dims, {self.env_args['env_name']} expects {self.action_space.shape[0]}"
            )
        obs, _, _, _ = self._env.step(action)
        self._steps += 1
        success = self.success()
        reward = float(success) - 1.0 if self.reward_mode == "r-1" else float(success)
        truncated = self._steps >= self.horizon
        return self._flatten(obs), reward, success, truncated, {"success": success}

    def render(self) -> np.ndarray:
        """RGB image (H, W, 3) uint8 from ``camera``; requires ``render_size``."""
        if self.render_size is None:
            raise RuntimeError("rendering is disabled: create RobosuiteEnv with render_size=(height, width)")
        height, width = self.render_size
        try:
            image = self._env.sim.render(width=width, height=height, camera_name=self.camera)
        except Exception as err:
            raise_if_interrupted(err)
            raise RuntimeError(f"offscreen rendering failed ({type(err).__name__}: {err}); {_RENDER_HINT}") from err
        return np.ascontiguousarray(image[::-1], dtype=np.uint8)

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None
