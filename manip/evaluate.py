"""Evaluate a checkpoint: ``python -m manip.evaluate ckpt=PATH episodes=50 num_envs=2 [video=true] [seed=...]``.

Rolls the policy out in the simulator the checkpoint was trained against (robosuite or OGBench,
rebuilt from the checkpoint alone) and reports the success rate with its Wilson 95% interval, the
mean episode length, every episode's outcome and length, and the policy's time per call (one chunk for the envs
that need one) and per executed action.
The result goes to ``<run_dir>/eval/<ckpt name>.json`` (``<ckpt name>.1.json``, ... next to earlier results, which
are kept; or ``out=...``); with ``video=true``,
``video_episodes`` extra episodes (seeds ``seed``, ``seed + 1``, ...) are rendered offscreen to
``<json name>_ep<i>.mp4`` next to it, each framed green (success) or red (failure). ``act_dtype=bfloat16
act_compile=true`` acts through a frozen, compiled bfloat16 copy of the networks (``ManipModule.fast_acting``),
compiled before the episodes (its time is the result's ``compile_seconds``, apart from the policy's).
``ckpt=<run_dir>/export/<name>.pt2`` evaluates a ``manip.export`` program (or its ``.aoti.pt2`` package) instead, in
the simulator its metadata names, with its baked-in sampling; the result goes to ``eval/<name>.export.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from manip import sweep
from manip.algos.acting import padded_batch
from manip.algos.base import NoiseStreams
from manip.checkpoint import (CheckpointError, check_acting_settings, checkpoint_command, env_spec_of,
                              load_acting_module)
from manip.cli_args import interrupted_by_ctrl_c
from manip.envs import EnvMismatchError, close_vector_env, make_vector_env
from manip.evaluation import evaluate_policy
from manip.logs import counted
from manip.settings import SettingError, check_bool, check_int, first_free_path, run_folder, write_result
from manip.video import DEFAULT_FPS, RendererUnavailable, open_render_env, record_videos


def default_output(ckpt: str | Path) -> Path:
    """``<run_dir>/eval/<ckpt name>.json`` for ``<run_dir>/checkpoints/<ckpt name>.ckpt`` (``<name>.export.json``
    for an exported ``<run_dir>/export/<name>.pt2``; ``eval/`` beside a file kept elsewhere), or, where earlier
    evaluations left their results, the first free ``<ckpt name>.<k>.json`` (k = 1, 2, ...): none is replaced."""
    ckpt = Path(ckpt)
    name = f"{ckpt.name[:-len('.pt2')]}.export" if ckpt.name.endswith(".pt2") else ckpt.stem
    return first_free_path(run_folder(ckpt, "eval") / f"{name}.json")


def check_settings(episodes: int, num_envs: int, num_samples: int | None = None, noise_scale: float | None = None,
                   sample_steps: int | None = None, seed: int = 0, act_dtype: str = "float32") -> None:
    """Raise ``SettingError`` naming the first setting out of range (None: the checkpoint's own value)."""
    check_int(episodes, "episodes", 1)
    check_int(num_envs, "num_envs", 1)
    check_acting_settings(num_samples, noise_scale, sample_steps, act_dtype)
    check_int(seed, "seed", 0)


def evaluate_checkpoint(ckpt: str | Path, episodes: int = 50, num_envs: int = 1, seed: int = 1000,
                        num_samples: int | None = None, noise_scale: float | None = None,
                        sample_steps: int | None = None, video_episodes: int = 0,
                        video_size: tuple[int, int] = (256, 256), video_prefix: str | Path | None = None,
                        video_fps: int = DEFAULT_FPS, act_dtype: str = "float32", act_compile: bool = False) -> dict:
    """Success statistics of a checkpoint over ``episodes`` episodes in ``num_envs`` parallel envs.

    num_samples: best-of-N candidates per action chunk (None: the agent's own N). noise_scale: std of
    the candidates' initial noise (None: the run's ``eval.noise_scale``, 1.0 when it has none).
    sample_steps: mean-velocity jumps per MVP sample (None: the run's ``algo.agent.sample_steps``). A setting out of
    range, or ``sample_steps`` for a checkpoint whose agent has no such setting, raises ``SettingError``. With
    ``video_episodes > 0`` the renderer is checked before the evaluation starts (raising
    ``RendererUnavailable``) and the videos are written to ``<video_prefix>_ep<i>.mp4``. A simulator
    whose observation / action sizes differ from the checkpoint's raises ``EnvMismatchError``. ``act_dtype``
    ("float32" or "bfloat16") and ``act_compile`` choose the acting path: the defaults run the checkpoint's networks
    as trained; anything else acts with ``ManipModule.fast_acting`` (a frozen copy in that dtype, compiled or not).
    ``seed`` seeds the simulators' resets and the policy's noise: episode k (and video k) starts from ``seed + k``
    and draws its noise from a stream seeded with ``seed + k``, whatever ``num_envs`` and the device. ``ckpt`` may
    also be a ``manip.export`` program (``.pt2`` or ``.aoti.pt2``): it acts with its own baked-in sampling
    (``num_samples``, ``noise_scale``, ``sample_steps``, ``act_dtype`` and ``act_compile`` are refused for it) and
    the noise its checkpoint would draw. Returns a JSON-ready dict (see ``EvalResult`` for the statistics, plus
    ``videos``).
    """
    started = time.perf_counter()
    # before the checkpoint is loaded
    check_settings(episodes, num_envs, num_samples, noise_scale, sample_steps, seed, act_dtype)
    check_bool(act_compile, "act_compile")
    check_int(video_episodes, "video_episodes", 0)
    if video_episodes:
        if video_prefix is None:
            raise SettingError("video_episodes > 0 needs a video_prefix for the files")
        if len(video_size) != 2:
            raise SettingError(f"video_size must be [height, width], got {list(video_size)}")
        for side in video_size:
            check_int(side, "video_size", 16)
        check_int(video_fps, "video_fps", 1)
    if str(ckpt).endswith(".pt2"):
        predict, spec, dims, info = _exported_policy(ckpt, num_samples, noise_scale, sample_steps, act_dtype,
                                                     act_compile)
        acting = contextlib.nullcontext()
    else:
        module, cfg, noise_scale = load_acting_module(ckpt, noise_scale, sample_steps)
        spec, dims = env_spec_of(cfg), (module.obs_dim, module.action_dim)
        fast = act_dtype != "float32" or act_compile
        acting = module.fast_acting(act_dtype, act_compile) if fast else contextlib.nullcontext()
        predict = partial(module.predict_chunks, num_samples=num_samples, noise_scale=noise_scale)
        data_info = cfg["data_info"]
        info = {"step": module.checkpoint_step, "algo": cfg["algo"]["name"], "task": data_info.get("env_name"),
                "num_samples": module.agent.num_samples if num_samples is None else num_samples,
                "noise_scale": noise_scale, "sample_steps": getattr(module.agent, "sample_steps", None),
                "act_dtype": act_dtype, "act_compile": act_compile, "trained_on": data_info.get("path"),
                "trained_on_stand_in": data_info.get("generated")}
    render_env = open_render_env(spec, video_size) if video_episodes else None
    try:
        with acting:
            info["compile_seconds"] = _compile_ahead(predict, dims[0], num_envs) if info["act_compile"] else None
            env = make_vector_env(spec, num_envs, obs_dim=dims[0], action_dim=dims[1])
            try:
                result = evaluate_policy(env, predict, episodes, seed)
            finally:
                close_vector_env(env)
            videos = []
            if render_env is not None:
                prefix = Path(video_prefix)
                videos = record_videos(render_env, predict, video_episodes, seed, prefix.parent, prefix.name,
                                       video_fps, verbose=True)
    finally:
        if render_env is not None:
            render_env.close()
    first = {key: info.pop(key) for key in ("step", "algo")}
    return {"ckpt": str(Path(ckpt).resolve()), **first, "env": spec.kind, "task": info.pop("task"), "seed": seed,
            "num_envs": num_envs, **info, **result.to_dict(), "videos": [video.to_dict() for video in videos],
            "total_seconds": time.perf_counter() - started}


def _exported_policy(path: str | Path, num_samples: int | None, noise_scale: float | None,
                     sample_steps: int | None, act_dtype: str, act_compile: bool):
    """(predict_chunks, env spec, (obs_dim, action_dim), result fields) of a ``manip.export`` file. Evaluation gives
    each episode its noise stream as it gives a checkpoint's (``predict_chunks(obs, generator=...)``), so an
    exported program and its checkpoint act alike episode by episode. Sampling settings are refused: the program
    has its own."""
    from manip.envs import EnvSpec
    from manip.export import load_exported

    policy = load_exported(path)  # first: the file is an export
    given = {"num_samples": num_samples, "noise_scale": noise_scale, "sample_steps": sample_steps,
             "act_dtype": None if act_dtype == "float32" else act_dtype}
    for key, value in given.items():
        if value is not None:
            raise SettingError(f"{key}={value}: {path} is an exported program, its sampling fixed at export "
                               f"(python -m manip.export ... {key}=... exports another)")
    if act_compile:
        raise SettingError(f"act_compile=true: {path} is an exported program (python -m manip.export ... aoti=true "
                           f"compiles one ahead of time)")
    meta = policy.meta

    def predict(obs, generator: NoiseStreams = None) -> np.ndarray:
        return policy(torch.as_tensor(np.asarray(obs), dtype=torch.float32), generator=generator).numpy()

    spec = EnvSpec(meta["env_spec"]["kind"], dict(meta["env_spec"]["kwargs"]))
    info = {key: meta[key] for key in ("step", "algo", "task", "num_samples", "noise_scale", "sample_steps",
                                       "act_dtype")}
    return predict, spec, (meta["obs_shape"][0], meta["chunk_shape"][1]), {
        **info, "act_compile": False, "trained_on": meta["trained_on"],
        "trained_on_stand_in": meta["trained_on_stand_in"], "exported_from": meta["ckpt"]}


def _compile_ahead(predict: Callable[..., np.ndarray], obs_dim: int, num_envs: int) -> float:
    """Seconds to compile the fast sampler for every padded batch the episodes can hand it (1 to ``num_envs``
    states), so that the timed calls are compiled ones."""
    start = time.perf_counter()
    for size in sorted({padded_batch(states) for states in range(1, num_envs + 1)}):
        predict(np.zeros((size, obs_dim), np.float32))
    return time.perf_counter() - start


def summary(result: dict, out: Path) -> str:
    """The lines ``main`` prints for a result written to ``out``."""
    lines = [
        f"success rate {result['success_rate']:.3f}  95% CI [{result['ci_low']:.3f}, {result['ci_high']:.3f}]  "
        f"over {counted(result['episodes'], 'episode')} of {result['task']} ({result['algo']}, "
        f"step {result['step']})",
        f"mean episode length {result['mean_length']:.1f}  policy {result['chunk_latency_ms']:.2f} ms per call, "
        f"{result['action_latency_ms']:.2f} ms per action"
        + (f" (compiled before, in {result['compile_seconds']:.1f} s)" if result.get("compile_seconds") else "")
        + f"  episodes {result['seconds']:.1f} s of {result['total_seconds']:.1f} s  -> {out}",
    ]
    if result.get("trained_on_stand_in"):
        lines.append(f"trained on a stand-in dataset manip generated ({result['trained_on']}), not the released one")
    for video in result["videos"]:
        outcome = "success" if video["success"] else "failure"
        lines.append(f"video {video['path']} ({outcome}, {video['length']} steps, {video['size_bytes'] / 1024:.0f} KiB)")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        ckpt, out = checkpoint_command(cfg, "evaluate", default_output)  # out checked first: keeps the result
        result = evaluate_checkpoint(ckpt, cfg.episodes, cfg.num_envs, cfg.seed, cfg.num_samples,
                                     noise_scale=cfg.noise_scale, sample_steps=cfg.sample_steps,
                                     video_episodes=cfg.video_episodes if cfg.video else 0,
                                     video_size=tuple(cfg.video_size), video_prefix=out.with_suffix(""),
                                     video_fps=cfg.video_fps, act_dtype=cfg.act_dtype, act_compile=cfg.act_compile)
    except (Exception, KeyboardInterrupt) as err:
        if isinstance(err, (CheckpointError, EnvMismatchError, RendererUnavailable, SettingError)):
            sweep.refuse("evaluate", str(err))  # user errors in one line
            return
        from manip.run import compile_error

        compiler = compile_error(err, "act_compile", "the same command with act_compile=false evaluates without it")
        if compiler:
            sweep.refuse("evaluate", compiler)
            return
        if not interrupted_by_ctrl_c(err):
            raise  # a bug: its traceback
        from manip.run import quiet_finalizers

        quiet_finalizers()
        print("manip.evaluate: interrupted (no result written)", file=sys.stderr)
        sys.exit(130)
    out = write_result(out, json.dumps(result, indent=1), "manip.evaluate")  # a full disk: the result on stdout
    print(summary(result, out))


if __name__ == "__main__":
    from manip.run import check_command_line

    check_command_line("evaluate")
    with sweep.summary("evaluate"):
        main()
