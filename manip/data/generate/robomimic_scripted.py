"""Scripted robosuite demonstrations written in Robomimic's v1.5 low-dim HDF5 layout.

Tasks ``lift`` (Lift), ``can`` (PickPlaceCan) and ``square`` (NutAssemblySquare) with one Panda arm under
robosuite's BASIC composite controller (OSC_POSE deltas, 20 Hz). Actions are 7-D in [-1, 1]: end-effector
position delta (x 5 cm), axis-angle rotation delta (x 0.5 rad) in the robot base frame, and gripper (-1 open,
+1 close).

Each episode is driven by a state-machine policy that reads privileged simulator state (object and site poses).
A per-episode "operator style" varies speed, gains, correlated action noise, approach offsets, grasp choices
and pauses, so the data is multimodal like Robomimic's multi-human (MH) sets. Only successful episodes are
kept, and an episode ends once success has held for ``SUCCESS_HOLD_STEPS`` consecutive steps, the convention
of robosuite's demonstration collector.

File layout (see Robomimic's ``dataset_states_to_obs.py``), N = transitions of one demo:
    data.attrs: total (int), env_args (JSON: env_name, env_version, type=1, env_kwargs), manip_generated (JSON:
        generator, task, demos, seed; released files lack it, so manip can say a run used a stand-in)
    data/demo_<i>.attrs: num_samples (N), model_file (MJCF XML of the episode), ep_meta (JSON)
    data/demo_<i>/obs/<key>, next_obs/<key>: (N, k) float64, next_obs[t] == obs[t + 1]
    data/demo_<i>/actions (N, 7) float64; rewards (N,) float64, 1.0 where the state after the step is a success;
    data/demo_<i>/dones (N,) int64, done_mode 2 (1 at success states and at the last step);
    data/demo_<i>/states (N, D) float64 flat MuJoCo states before each step (D = 32 / 71 / 45).
    mask/train, mask/valid: demo names (dtype S), a 90/10 split (at least one valid demo if there are two).

The end-effector velocity keys follow robosuite 1.4's definition, which robosuite 1.5 dropped (see
``manip.envs.robosuite_env.add_eef_velocity_observables``).

``obs[t]`` is exactly what ``env.step`` returned at step t - 1 (at t = 0: the observation after restoring
``states[0]``), so training data matches what a policy sees at evaluation time. Every random draw comes from
one ``numpy.random.Generator`` seeded by ``seed``, and each episode starts exactly as
``RobosuiteEnv.reset_to(states[0], model_xml=model_file)`` does, so replaying ``actions`` after it reproduces
the demo bit for bit. Evaluation starts with robosuite's plain reset instead, whose controller posture target
differs slightly (``manip.envs.robosuite_env``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial.transform import Rotation

from manip.data.errors import GENERATED_MARKER
from manip.data.generate.files import make_room_for, temp_file_next_to
from manip.envs.robosuite_env import make_robosuite, quiet_robosuite, restore_state, seed_placement

TASKS: dict[str, dict] = {
    "lift": {"env_name": "Lift", "horizon": 300},
    "can": {"env_name": "PickPlaceCan", "horizon": 300},
    "square": {"env_name": "NutAssemblySquare", "horizon": 400},
}

# Low-dim keys of the released Robomimic v1.5 files; ``object`` is robosuite's ``object-state``.
OBS_KEYS: tuple[str, ...] = (
    "object",
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_eef_vel_ang",
    "robot0_eef_vel_lin",
    "robot0_gripper_qpos",
    "robot0_gripper_qvel",
    "robot0_joint_pos",
    "robot0_joint_pos_cos",
    "robot0_joint_pos_sin",
    "robot0_joint_vel",
)

# Accepted endings of a generated file's name.
SUFFIXES = (".hdf5", ".h5")

SUCCESS_HOLD_STEPS = 10
VALID_FRACTION = 0.1

OPEN, CLOSE = -1.0, 1.0
_POS_SCALE = 0.05  # metres per unit translation action (OSC output_max)
_ROT_SCALE = 0.5  # radians per unit rotation action


def env_args(task: str) -> dict:
    """``env_args`` stored in the file: everything ``robosuite.make`` needs to rebuild the task's env."""
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(controller="BASIC", robot="Panda")
    # The Panda only has a right arm; robosuite drops the other parts with a warning on every reset.
    controller["body_parts"] = {"right": controller["body_parts"]["right"]}
    return {
        "env_name": TASKS[task]["env_name"],
        "env_version": robosuite.__version__,
        "type": 1,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": controller,
            "control_freq": 20,
            "lite_physics": True,
            "reward_shaping": False,
            "reward_scale": 1.0,
            "has_renderer": False,
            "has_offscreen_renderer": False,
            "ignore_done": True,
            "use_object_obs": True,
            "use_camera_obs": False,
            "camera_names": ["agentview", "robot0_eye_in_hand"],
            "camera_heights": 84,
            "camera_widths": 84,
            "camera_depths": False,
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Scripted policies
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """Per-episode operator variation."""

    speed: float  # cap on the horizontal and the vertical translation action (and on the rotation action)
    gain: float  # translation action per unit of position error (in 5 cm units)
    rot_gain: float  # rotation action per unit of orientation error (in 0.5 rad units)
    noise: float  # std of the AR(1) noise added to the 6 arm dims in free-space moves
    pause_prob: float  # chance of a pause at each phase boundary
    alt_grasp_prob: float  # chance of taking the second-nearest symmetric grasp yaw

    @staticmethod
    def sample(rng: np.random.Generator) -> _Style:
        return _Style(
            speed=rng.uniform(0.5, 1.0),
            gain=rng.uniform(0.8, 1.6),
            rot_gain=rng.uniform(0.8, 1.5),
            noise=rng.uniform(0.0, 0.08),
            pause_prob=rng.uniform(0.0, 0.3),
            alt_grasp_prob=rng.uniform(0.0, 0.5),
        )


def _wrap(angle: float, period: float = 2 * np.pi) -> float:
    """Wrap ``angle`` into [-period / 2, period / 2)."""
    return (angle + period / 2) % period - period / 2


def _yaw(rot: np.ndarray) -> float:
    """Heading of a (3, 3) rotation's x axis in the world xy plane."""
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def _top_down(yaw: float) -> np.ndarray:
    """Gripper orientation pointing straight down with the finger axis (site x axis) at ``yaw``. Shape (3, 3)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


Target = Callable[[], np.ndarray] | np.ndarray
Yaw = Callable[[], float] | float


class _Script:
    """Base of the task scripts: closed-loop moves towards targets, expressed as generators of actions.

    ``actions()`` yields one action (7,) per env step forever (the last phase holds still); it reads the
    simulator state afresh after every yield, i.e. after the runner has stepped the env. A failed grasp or a
    dropped object sends the script back to a new grasp, as an operator would do.
    """

    def __init__(self, env, style: _Style, rng: np.random.Generator, obj):
        self.env = env
        self.style = style
        self.rng = rng
        self.obj = obj  # robosuite MujocoObject to pick
        self.obj_id = env.sim.model.body_name2id(obj.root_body)
        robot = env.robots[0]
        self._site = robot.eef_site_id["right"]
        model = env.sim.model
        self._finger_dofs = [model.jnt_dofadr[model.joint_name2id(j)] for j in robot.gripper["right"].joints]
        self._base = np.array(robot.base_pos)
        self._noise = np.zeros(6)
        self.tilt = 0.0  # radians the gripper leans away from the robot base (extends the reach)

    # -- state --------------------------------------------------------------------------------------------------
    def eef_pos(self) -> np.ndarray:
        return np.array(self.env.sim.data.site_xpos[self._site])

    def eef_rot(self) -> np.ndarray:
        return np.array(self.env.sim.data.site_xmat[self._site]).reshape(3, 3)

    def obj_pos(self) -> np.ndarray:
        return np.array(self.env.sim.data.body_xpos[self.obj_id])

    def obj_yaw(self) -> float:
        return _yaw(np.array(self.env.sim.data.body_xmat[self.obj_id]).reshape(3, 3))

    def grasped(self) -> bool:
        return bool(self.env._check_grasp(gripper=self.env.robots[0].gripper["right"], object_geoms=self.obj))

    def dropped(self) -> bool:
        return not self.grasped()

    def grasp_yaw(self, object_yaw: float, symmetry: float) -> float:
        """Finger yaw ``object_yaw + k * symmetry`` closest to the current one (or the second closest)."""
        current = _yaw(self.eef_rot())
        offset = _wrap(object_yaw - current, symmetry)
        if self.rng.random() < self.style.alt_grasp_prob and symmetry < np.pi:
            offset -= np.sign(offset) * symmetry
        return current + offset

    # -- actions ------------------------------------------------------------------------------------------------
    def target_rot(self, target: np.ndarray, yaw: float) -> np.ndarray:
        """Gripper orientation (3, 3) at ``target``: pointing down, finger axis at ``yaw``, leaning by ``tilt``."""
        rot = _top_down(yaw)
        if self.tilt:
            reach = (target - self._base)[:2] / np.linalg.norm((target - self._base)[:2])
            lean = Rotation.from_rotvec(self.tilt * np.array([reach[1], -reach[0], 0.0])).as_matrix()
            rot = lean @ rot
        return rot

    def rot_error(self, target: np.ndarray, yaw: float) -> np.ndarray:
        """World-frame rotation vector (3,) from the current gripper orientation to ``target_rot``."""
        return Rotation.from_matrix(self.target_rot(target, yaw) @ self.eef_rot().T).as_rotvec()

    def action(self, target: np.ndarray, yaw: float, grip: float, noisy: bool, speed: float) -> np.ndarray:
        """OSC delta action (7,) moving the gripper towards ``target`` (3,) and ``target_rot(target, yaw)``."""
        move = self.style.gain * (target - self.eef_pos()) / _POS_SCALE
        cap = speed * self.style.speed
        # Height is capped separately from the horizontal motion so that long moves do not sag.
        if np.abs(move[:2]).max() > cap:
            move[:2] *= cap / np.abs(move[:2]).max()
        move[2] = np.clip(move[2], -cap, cap)
        rotvec = self.rot_error(target, yaw)
        turn = np.clip(self.style.rot_gain * rotvec / _ROT_SCALE, -self.style.speed, self.style.speed)
        arm = np.concatenate([move, turn])
        self._noise = 0.7 * self._noise + self.rng.normal(0.0, self.style.noise, 6)
        if noisy:
            arm = arm + self._noise
        return np.clip(np.concatenate([arm, [grip]]), -1.0, 1.0)

    def move(
        self,
        target: Target,
        yaw: Yaw,
        grip: float,
        tol: float,
        rot_tol: float = 0.08,
        noisy: bool = True,
        speed: float = 1.0,
        max_steps: int = 150,
        settle: int = 1,
        abort: Callable[[], bool] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield actions until the gripper is within ``tol`` (m) of ``target`` and ``rot_tol`` (rad) of its target
        orientation for ``settle`` consecutive steps.

        Stops early after ``max_steps`` or when ``abort()`` becomes true; returns False in the latter case.
        """
        inside = 0
        for _ in range(max_steps):
            if abort is not None and abort():
                return False
            goal = target() if callable(target) else target
            heading = yaw() if callable(yaw) else yaw
            close = np.linalg.norm(goal - self.eef_pos()) < tol
            inside = inside + 1 if close and np.linalg.norm(self.rot_error(goal, heading)) < rot_tol else 0
            if inside >= settle:
                return True
            yield self.action(goal, heading, grip, noisy, speed)
        return True

    def hold(self, steps: int, yaw: float, grip: float) -> Iterator[np.ndarray]:
        """Stay in place for ``steps`` steps while commanding ``grip``."""
        anchor = self.eef_pos()
        for _ in range(steps):
            yield self.action(anchor, yaw, grip, noisy=False, speed=1.0)

    def actuate(self, yaw: float, grip: float) -> Iterator[np.ndarray]:
        """Close (or open) the gripper in place until the fingers stop, plus 1-3 steps (4 to 25 steps)."""
        anchor = self.eef_pos()
        extra = int(self.rng.integers(1, 4))
        for step in range(25):
            yield self.action(anchor, yaw, grip, noisy=False, speed=1.0)
            if step >= 3 and np.abs(self.env.sim.data.qvel[self._finger_dofs]).max() < 0.01:
                extra -= 1
                if extra == 0:
                    return

    def maybe_pause(self, yaw: float, grip: float) -> Iterator[np.ndarray]:
        """With the style's probability, pause for 3-14 steps (an operator hesitating)."""
        if self.rng.random() < self.style.pause_prob:
            yield from self.hold(int(self.rng.integers(3, 15)), yaw, grip)

    def pick(self, point: Callable[[], np.ndarray], yaw: float, tol: float, speed: float) -> Iterator[np.ndarray]:
        """Hover above ``point()``, descend onto it, close; returns whether the object is grasped.

        On a miss the gripper opens and backs up to the hover height.
        """
        hover = np.array([*self.rng.uniform(-0.03, 0.03, 2), self.rng.uniform(0.05, 0.12)])
        yield from self.move(lambda: point() + hover, yaw, OPEN, tol=0.02)
        yield from self.maybe_pause(yaw, OPEN)
        yield from self.move(point, yaw, OPEN, tol=tol, noisy=False, speed=speed)
        yield from self.actuate(yaw, CLOSE)
        if self.grasped():
            return True
        yield from self.actuate(yaw, OPEN)
        yield from self.move(self.eef_pos() + np.array([0.0, 0.0, hover[2]]), yaw, OPEN, tol=0.02)
        return False

    def finish(self, target: np.ndarray, yaw: float, grip: float) -> Iterator[np.ndarray]:
        """Final phase: go to ``target`` and stay there forever."""
        while True:
            yield self.action(target, yaw, grip, noisy=False, speed=0.6)

    def actions(self) -> Iterator[np.ndarray]:
        raise NotImplementedError


class _LiftScript(_Script):
    """Lift: hover over the cube, descend, close, lift 10-20 cm."""

    def __init__(self, env, style: _Style, rng: np.random.Generator):
        super().__init__(env, style, rng, env.cube)

    def actions(self) -> Iterator[np.ndarray]:
        rng = self.rng
        while True:
            yaw = self.grasp_yaw(self.obj_yaw(), np.pi / 2)
            grasp = np.array([0.0, 0.0, rng.uniform(-0.01, 0.0)])
            if (yield from self.pick(lambda: self.obj_pos() + grasp, yaw, tol=0.006, speed=0.6)):
                break
        yield from self.maybe_pause(yaw, CLOSE)
        lift = self.eef_pos() + np.array([*rng.uniform(-0.05, 0.05, 2), rng.uniform(0.10, 0.20)])
        yield from self.finish(lift, yaw, CLOSE)


class _CanScript(_Script):
    """PickPlaceCan: grasp the can from above, carry it over the bin walls, drop it into its bin quadrant."""

    def __init__(self, env, style: _Style, rng: np.random.Generator):
        super().__init__(env, style, rng, env.objects[env.object_id])

    def actions(self) -> Iterator[np.ndarray]:
        rng = self.rng
        while True:
            self.tilt = 0.0
            yaw = _yaw(self.eef_rot()) + rng.uniform(-0.5, 0.5)  # a cylinder: any finger yaw works
            grasp = np.array([0.0, 0.0, rng.uniform(0.0, 0.02)])
            if not (yield from self.pick(lambda: self.obj_pos() + grasp, yaw, tol=0.006, speed=0.6)):
                continue
            carry_z = rng.uniform(1.04, 1.10)
            # The can's bin quadrant spans x in (0.1, 0.295), y in (0.28, 0.525) behind 10 cm walls and lies at
            # the edge of the Panda's reach: the can is dropped from above the walls, near the quadrant's inner
            # corner, with the gripper leaning outwards.
            drop_xy = rng.uniform([0.15, 0.33], [0.22, 0.42])
            drop_z = rng.uniform(0.98, 1.02)
            lift = np.array([*self.eef_pos()[:2], carry_z])
            if not (yield from self.move(lift, yaw, CLOSE, tol=0.015, abort=self.dropped)):
                continue
            yield from self.maybe_pause(yaw, CLOSE)
            self.tilt = rng.uniform(0.35, 0.6)
            if rng.random() < 0.5:  # detour through a random via point instead of the straight line
                via = np.array([*(self.eef_pos()[:2] + drop_xy) / 2 + rng.uniform(-0.08, 0.08, 2), carry_z])
                if not (yield from self.move(via, yaw, CLOSE, tol=0.04, abort=self.dropped)):
                    continue
            if not (yield from self.move(np.array([*drop_xy, carry_z]), yaw, CLOSE, tol=0.02, abort=self.dropped)):
                continue
            if (yield from self.move(np.array([*drop_xy, drop_z]), yaw, CLOSE, 0.015, speed=0.7, abort=self.dropped)):
                break
        yield from self.actuate(yaw, OPEN)
        yield from self.maybe_pause(yaw, OPEN)
        yield from self.finish(np.array([*drop_xy, drop_z + rng.uniform(0.08, 0.15)]), yaw, OPEN)


class _SquareScript(_Script):
    """NutAssemblySquare: grasp the nut's handle, align the nut square to the peg, slide it down, release."""

    def __init__(self, env, style: _Style, rng: np.random.Generator):
        super().__init__(env, style, rng, env.nuts[env.nut_id])
        self.handle = env.object_site_ids[env.nut_id]
        self.peg = np.array(env.sim.data.body_xpos[env.peg1_body_id])

    def handle_point(self, slide: float) -> np.ndarray:
        """Point on the handle's centre line, ``slide`` metres outwards from the handle site. Shape (3,)."""
        yaw = self.obj_yaw()
        return np.array(self.env.sim.data.site_xpos[self.handle]) + slide * np.array([np.cos(yaw), np.sin(yaw), 0])

    def placement_yaw(self) -> float:
        """Nut yaw to insert with: sides parallel to the square peg, handle towards the robot or sideways.

        With the handle pointing away from the robot the gripper would have to reach beyond the Panda's workspace.
        Among the remaining headings, prefer the handle towards the robot and small turns that keep the last
        wrist joint (which turns opposite to the gripper's yaw) inside its +-2.9 rad range.
        """
        sim = self.env.sim
        wrist = sim.data.qpos[sim.model.jnt_qposadr[self.env.robots[0].joint_indexes[-1]]]
        best, best_cost = np.pi, np.inf
        for heading, preference in ((np.pi, 0.0), (np.pi / 2, 0.5), (-np.pi / 2, 0.5)):
            turn = _wrap(heading - self.obj_yaw())
            cost = abs(turn) + preference + (10.0 if abs(wrist - turn) > 2.6 else 0.0)
            if cost < best_cost:
                best, best_cost = heading, cost
        return best

    def aligned_yaw(self, heading: float) -> Callable[[], float]:
        """Gripper yaw target (at most 1 rad ahead of the current one) that turns the nut towards ``heading``."""
        return lambda: _yaw(self.eef_rot()) + float(np.clip(_wrap(heading - self.obj_yaw()), -1.0, 1.0))

    def over_peg(self, z: float) -> Callable[[], np.ndarray]:
        """Gripper target that puts the nut centre above the peg with the gripper at height ``z``."""
        return lambda: np.array([*(self.eef_pos()[:2] + self.peg[:2] - self.obj_pos()[:2]), z])

    def pick_nut(self) -> Iterator[np.ndarray]:
        """Grasp the handle and lift the nut above the peg's height; returns whether the nut is held."""
        rng = self.rng
        # Fingers close across the handle: the finger axis is perpendicular to the handle direction. The
        # handle sticks out 1 cm inside the site, so the grasp slides outwards only (fingers clear the ring),
        # and the fingertips reach ~1.2 cm below the grip site, so it stays above the handle's centre.
        yaw = self.grasp_yaw(self.obj_yaw() + np.pi / 2, np.pi)
        slide, dz = rng.uniform(0.0, 0.012), rng.uniform(0.004, 0.01)

        def point() -> np.ndarray:
            return self.handle_point(slide) + np.array([0.0, 0.0, dz])

        if not (yield from self.pick(point, yaw, tol=0.004, speed=0.5)):
            return False
        lift = np.array([*self.eef_pos()[:2], rng.uniform(1.03, 1.08)])  # the nut must clear the 0.95 m peg top
        if not (yield from self.move(lift, yaw, CLOSE, tol=0.015, abort=self.dropped)):
            return False
        yield from self.maybe_pause(yaw, CLOSE)
        return True

    def insert(self) -> Iterator[np.ndarray]:
        """Carry the held nut over the peg, align it, lower it; returns whether it went down the peg.

        The nut swings about the finger axis, so the alignment must hold for several steps before descending;
        if the nut catches on the peg top the gripper rises and aligns again (up to 3 tries).
        """
        carry_z = self.eef_pos()[2]
        aligned = self.aligned_yaw(self.placement_yaw())
        on_peg_z = self.env.table_offset[2] + 0.04
        for _ in range(3):
            if not (yield from self.move(self.over_peg(carry_z), aligned, CLOSE, 0.02, abort=self.dropped)):
                return False
            fine = dict(tol=0.003, rot_tol=0.04, noisy=False, speed=0.4, settle=4, abort=self.dropped)
            if not (yield from self.move(self.over_peg(carry_z), aligned, CLOSE, **fine)):
                return False
            # Lower until the nut centre would be 1.5 cm above the table (it slides down the peg).
            drop_z = self.eef_pos()[2] - (self.obj_pos()[2] - (self.env.table_offset[2] + 0.015))
            yield from self.move(self.over_peg(drop_z), aligned, CLOSE, tol=0.01, noisy=False, speed=0.5, max_steps=60)
            if self.obj_pos()[2] < on_peg_z:
                return True
        return False

    def actions(self) -> Iterator[np.ndarray]:
        while True:
            if (yield from self.pick_nut()) and (yield from self.insert()):
                break
        yaw = _yaw(self.eef_rot())
        yield from self.actuate(yaw, OPEN)
        yield from self.maybe_pause(yaw, OPEN)
        yield from self.finish(self.eef_pos() + np.array([0.0, 0.0, self.rng.uniform(0.08, 0.15)]), yaw, OPEN)


_SCRIPTS: dict[str, type[_Script]] = {"lift": _LiftScript, "can": _CanScript, "square": _SquareScript}


# --------------------------------------------------------------------------------------------------------------
# Episodes and file writing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Demo:
    """One successful episode of N transitions."""

    obs: dict[str, np.ndarray]  # key -> (N, k)
    next_obs: dict[str, np.ndarray]  # key -> (N, k)
    actions: np.ndarray  # (N, 7)
    rewards: np.ndarray  # (N,)
    dones: np.ndarray  # (N,)
    states: np.ndarray  # (N, D)
    model_file: str
    ep_meta: str


def _select(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.array(obs["object-state" if key == "object" else key], dtype=np.float64) for key in OBS_KEYS}


def _run_episode(env, task: str, horizon: int, rng: np.random.Generator) -> _Demo | None:
    """Roll out one scripted episode; returns the demo if success held for ``SUCCESS_HOLD_STEPS`` steps."""
    seed_placement(env, int(rng.integers(2**63)))
    with quiet_robosuite():
        env.reset()
        model_file = env.sim.model.get_xml()
        start = np.array(env.sim.get_state().flatten())
        # Rebuilding from the saved MJCF makes the episode's model exactly the one a replay rebuilds.
        obs = _select(restore_state(env, start, model_file))
    script = _SCRIPTS[task](env, _Style.sample(rng), rng).actions()

    rows: dict[str, list] = {"obs": [], "next_obs": [], "actions": [], "rewards": [], "states": []}
    streak = 0
    for _ in range(horizon):
        state = np.array(env.sim.get_state().flatten())
        action = next(script)
        next_obs = _select(env.step(action)[0])
        success = bool(env._check_success())
        for name, value in zip(rows, (obs, next_obs, action, float(success), state)):
            rows[name].append(value)
        obs = next_obs
        streak = streak + 1 if success else 0
        if streak == SUCCESS_HOLD_STEPS:
            rewards = np.array(rows["rewards"], dtype=np.float64)
            dones = rewards.astype(np.int64)
            dones[-1] = 1
            return _Demo(
                obs={key: np.stack([o[key] for o in rows["obs"]]) for key in OBS_KEYS},
                next_obs={key: np.stack([o[key] for o in rows["next_obs"]]) for key in OBS_KEYS},
                actions=np.array(rows["actions"], dtype=np.float64),
                rewards=rewards,
                dones=dones,
                states=np.array(rows["states"], dtype=np.float64),
                model_file=model_file,
                ep_meta=json.dumps(env.get_ep_meta()),
            )
    return None


def _write(path: Path, demos: list[_Demo], args: dict, rng: np.random.Generator, origin: dict) -> None:
    """Write ``demos`` to ``path`` in Robomimic's layout (see module docstring), marked as generated (``origin``)."""
    names = [f"demo_{i}" for i in range(len(demos))]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, demo in zip(names, demos):
            group = data.create_group(name)
            group.attrs["num_samples"] = len(demo.actions)
            group.attrs["model_file"] = demo.model_file
            group.attrs["ep_meta"] = demo.ep_meta
            for key in OBS_KEYS:
                group.create_dataset(f"obs/{key}", data=demo.obs[key])
                group.create_dataset(f"next_obs/{key}", data=demo.next_obs[key])
            group.create_dataset("actions", data=demo.actions)
            group.create_dataset("rewards", data=demo.rewards)
            group.create_dataset("dones", data=demo.dones)
            group.create_dataset("states", data=demo.states)
        data.attrs["total"] = sum(len(demo.actions) for demo in demos)
        data.attrs["env_args"] = json.dumps(args)
        data.attrs[GENERATED_MARKER] = json.dumps(origin)

        num_valid = max(1, round(VALID_FRACTION * len(names))) if len(names) > 1 else 0
        valid = set(rng.choice(len(names), size=num_valid, replace=False).tolist())
        f.create_dataset("mask/train", data=np.array([n for i, n in enumerate(names) if i not in valid], dtype="S"))
        f.create_dataset("mask/valid", data=np.array([n for i, n in enumerate(names) if i in valid], dtype="S"))


def generate(
    task: str,
    path: str | Path,
    num_demos: int,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Generate ``num_demos`` successful scripted demos of ``task`` into the HDF5 file ``path`` (``.hdf5`` or ``.h5``).

    The file is written to a temporary file next to ``path`` and moved into place at the end, so an interrupted
    run leaves no partial file. Raises FileExistsError if ``path`` exists and ``overwrite`` is False, and
    RuntimeError if the scripted policy fails too often to collect ``num_demos`` demos.

    Returns {"task", "path", "num_demos", "num_attempts", "success_rate" (successes / attempts),
    "num_transitions", "seconds", "bytes"}.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if num_demos < 1:
        raise ValueError(f"num_demos must be >= 1, got {num_demos}")
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"dataset path must end in {' or '.join(SUFFIXES)}, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    make_room_for(path)  # before the episodes, not after them

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    args = env_args(task)
    env = make_robosuite(args)
    max_attempts = 2 * num_demos + 20
    demos: list[_Demo] = []
    attempts = 0
    try:
        while len(demos) < num_demos:
            if attempts == max_attempts:
                raise RuntimeError(
                    f"{task}: only {len(demos)} of {attempts} scripted episodes succeeded; "
                    f"could not collect {num_demos} demos"
                )
            attempts += 1
            demo = _run_episode(env, task, TASKS[task]["horizon"], rng)
            if demo is not None:
                demos.append(demo)
                if verbose and (len(demos) % max(1, num_demos // 10) == 0 or len(demos) == num_demos):
                    print(f"{task}: {len(demos)}/{num_demos} demos ({attempts} episodes, "
                          f"{time.perf_counter() - start:.0f} s)", flush=True)
    except BaseException:
        # Ctrl-C can land inside robosuite's own close (a reset rebuilds the sim), leaving a half-freed sim that a
        # second close fails on: the error that stopped the run is the one to report.
        with contextlib.suppress(Exception):
            env.close()
        raise
    env.close()

    tmp = temp_file_next_to(path)
    try:
        _write(tmp, demos, args, rng, {"generator": "manip scripted robosuite demos", "task": task,
                                       "demos": len(demos), "seed": seed})
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    info = {
        "task": task,
        "path": str(path),
        "num_demos": len(demos),
        "num_attempts": attempts,
        "success_rate": len(demos) / attempts,
        "num_transitions": int(sum(len(demo.actions) for demo in demos)),
        "seconds": time.perf_counter() - start,
        "bytes": path.stat().st_size,
    }
    if verbose:
        print(
            f"{task}: scripted success {len(demos)}/{attempts} = {info['success_rate']:.0%}, "
            f"{info['num_transitions']} transitions, {info['seconds']:.1f} s, {info['bytes'] / 1e6:.2f} MB -> {path}"
        )
    return info
