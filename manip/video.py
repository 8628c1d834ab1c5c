"""Rollout videos: render a policy's episodes offscreen and write them as mp4 (gif without ffmpeg).

Each episode runs in one render-enabled env (``EnvSpec.make(render_size=...)``) with the same
``ChunkPolicy`` queue as evaluation, one frame per env step plus the first observation. The
outcome is drawn on every frame as a coloured border (green: success, red: failure) and the last
frame is held for a second, so a thumbnail or a glance at any frame tells the result.

Rendering needs an offscreen OpenGL context: ``manip`` selects EGL (``MUJOCO_GL=egl``,
``EGL_PLATFORM=surfaceless``) unless the user set ``MUJOCO_GL``; ``open_render_env`` turns a
failure into ``RendererUnavailable`` with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from manip.cli_args import raise_if_interrupted
from manip.evaluation import ChunkPolicy
from manip.logs import LOG
from manip.settings import publish_new

SUCCESS_RGB = (40, 180, 70)
FAILURE_RGB = (215, 45, 40)
# Both simulators act at 20 Hz (robosuite control_freq, OGBench control timestep 0.05 s).
DEFAULT_FPS = 20


class RendererUnavailable(RuntimeError):
    """No offscreen renderer could be started (headless machine without a working EGL/OSMesa)."""


@dataclass
class Video:
    """One recorded episode: where it was written and what happened in it."""

    path: str
    seed: int
    success: bool
    length: int
    size_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _unavailable(kind: str, err: BaseException) -> RendererUnavailable:
    """One line: the backend, the root error's first line and what to set instead."""
    root = err.__cause__ or err
    first = (str(root).strip().splitlines() or [""])[0]
    return RendererUnavailable(
        f"no offscreen renderer for {kind} (MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')}): "
        f"{type(root).__name__}: {first}; set MUJOCO_GL=egl with EGL_PLATFORM=surfaceless (Mesa libEGL), "
        "or MUJOCO_GL=osmesa with PYOPENGL_PLATFORM=osmesa (needs libosmesa6), before Python starts")


def open_render_env(spec, size: tuple[int, int]):
    """A render-enabled env of ``spec`` whose first frame rendered; raises ``RendererUnavailable``.

    Building the env and rendering one frame up front makes a missing renderer fail before a
    long evaluation starts.
    """
    try:
        env = spec.make(render_size=tuple(size))
    except (RuntimeError, ImportError, AttributeError, OSError) as err:
        # the adapters' own renderer errors, and a GL backend that cannot load (MUJOCO_GL=osmesa without
        # libOSMesa: PyOpenGL fails inside mujoco's import with an AttributeError)
        raise_if_interrupted(err)
        raise _unavailable(spec.kind, err) from err
    try:
        env.reset(seed=0)
        env.render()
    except Exception as err:
        env.close()
        raise_if_interrupted(err)
        raise _unavailable(spec.kind, err) from err
    return env


def record_episode(env, predict_chunks: Callable[..., np.ndarray],
                   seed: int) -> tuple[list[np.ndarray], bool, int]:
    """Run one episode from ``env.reset(seed=seed)``, its noise drawn from a stream seeded with ``seed`` (as an
    evaluation's episode from that seed draws it); returns (frames, success, length)."""
    policy = ChunkPolicy(predict_chunks, num_envs=1, noise_seed=seed)
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    success, length = False, 0
    while True:
        action = policy.select_action(obs[None])[0]
        obs, _, terminated, truncated, info = env.step(action)
        frames.append(env.render())
        success |= bool(info["success"])
        length += 1
        if terminated or truncated:
            return frames, success, length


def mark_outcome(frames: list[np.ndarray], success: bool, hold_frames: int = DEFAULT_FPS) -> list[np.ndarray]:
    """Frames (H, W, 3) uint8 with a green (success) or red (failure) border; the last one repeated
    ``hold_frames`` more times. The frame size is unchanged."""
    color = np.array(SUCCESS_RGB if success else FAILURE_RGB, dtype=np.uint8)
    height, width = frames[0].shape[:2]
    edge = max(2, min(height, width) // 32)
    marked = []
    for frame in frames:
        frame = np.array(frame, dtype=np.uint8, copy=True)
        frame[:edge], frame[-edge:], frame[:, :edge], frame[:, -edge:] = color, color, color, color
        marked.append(frame)
    return marked + [marked[-1]] * hold_frames


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = DEFAULT_FPS) -> Path:
    """Write ``frames`` as H.264 mp4 through imageio-ffmpeg, or as a gif next to ``path`` when
    ffmpeg is unavailable; returns the written path. The video is written under a temporary name and then given
    its own: an interrupted one leaves nothing, and an existing video of that name (an earlier evaluation's, or one
    running beside this one) is kept, the new one taking the first free ``<stem>.<k>.mp4``."""
    import imageio.v2 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mp4 = path.with_suffix(".mp4")
    partial = mp4.with_name(f".{mp4.stem}.{os.getpid()}.partial.mp4")  # ffmpeg picks the container by suffix
    try:
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's FFMPEG plugin runs)

        # yuv420p needs even sizes: macro_block_size=2 lets ffmpeg scale an odd size up by one pixel.
        with iio.get_writer(partial, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=2, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
        return publish_new(partial, mp4)
    except (ImportError, OSError, RuntimeError) as err:
        partial.unlink(missing_ok=True)
        raise_if_interrupted(err)
        import imageio.v3 as iio3

        gif = path.with_suffix(".gif")
        partial = gif.with_name(f".{gif.stem}.{os.getpid()}.partial.gif")
        LOG.warning(f"no mp4 ({type(err).__name__}: {err}; the imageio-ffmpeg package provides ffmpeg): writing {gif}")
        try:
            iio3.imwrite(partial, np.stack(frames), plugin="pillow", duration=1000 / fps, loop=0)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return publish_new(partial, gif)
    except BaseException:  # Ctrl-C while encoding
        partial.unlink(missing_ok=True)
        raise


def record_videos(env, predict_chunks: Callable[..., np.ndarray], episodes: int, seed: int,
                  out_dir: str | Path, stem: str, fps: int = DEFAULT_FPS, verbose: bool = False) -> list[Video]:
    """Record ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) of a render-enabled env
    into ``<out_dir>/<stem>_ep<i>.mp4`` (``verbose``: a line as each one starts; rendering is slow on a CPU).
    Video i replays episode i of an evaluation from the same ``seed`` (its simulator seed and its noise)."""
    videos = []
    for i in range(episodes):
        if verbose:
            LOG.info(f"rendering video {i + 1}/{episodes} (seed {seed + i})")
        frames, success, length = record_episode(env, predict_chunks, seed + i)
        path = write_video(Path(out_dir) / f"{stem}_ep{i}.mp4", mark_outcome(frames, success, fps), fps)
        videos.append(Video(str(path), seed + i, success, length, path.stat().st_size))
    return videos
