"""Checkpoint evaluation (success statistics, JSON output, rollout videos) on tiny real ``fit`` runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import imageio.v2 as iio
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import manip
from manip.evaluate import evaluate_checkpoint, main, summary
from manip.evaluation import ChunkPolicy, wilson_interval
from manip.video import DEFAULT_FPS, FAILURE_RGB, SUCCESS_RGB, mark_outcome, write_video

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*precision lowered by casting to float32")]

CONF = Path(manip.__file__).resolve().parent.parent / "conf"
HORIZON = 10  # evaluation episodes are truncated after 10 steps
TINY = ["trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "eval.every_n_steps=0", "eval.final_episodes=0", "data.batch_size=32", f"data.env_horizon={HORIZON}",
        "algo.agent.hidden_dims=[32,32]"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cube_single_npz, lift_hdf5) -> dict[str, Path]:
    """``last.ckpt`` of 2-update fits: MVP and FQL on OGBench cube-single (one multirun), MVP on Robomimic lift."""
    root = tmp_path_factory.mktemp("eval_runs")
    commands = [
        ["--multirun", "data=ogbench", f"data.path={cube_single_npz}", "algo=mvp,fql",
         f"run_dir={root}/${{algo.name}}", f"hydra.sweep.dir={root}/sweep"],
        ["data=robomimic", f"data.path={lift_hdf5}", "algo=mvp", f"run_dir={root}/lift"],
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "manip.fit", *args, *TINY], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in commands]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"fit failed:\n{output[-3000:]}"
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("mvp", "fql", "lift")}


def _check_statistics(result: dict, episodes: int) -> None:
    assert result["episodes"] == episodes == len(result["outcomes"]) == len(result["lengths"])
    assert all(1 <= length <= HORIZON for length in result["lengths"])
    assert result["mean_length"] == pytest.approx(np.mean(result["lengths"]))
    successes = sum(result["outcomes"])
    assert result["success_rate"] == pytest.approx(successes / episodes)
    low, high = wilson_interval(successes, episodes)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high))
    assert result["ci_low"] <= result["success_rate"] <= result["ci_high"]
    assert result["action_latency_ms"] > 0 and result["env_steps"] >= sum(result["lengths"])


def _check_video(video: dict, size: tuple[int, int]) -> None:
    path = Path(video["path"])
    assert path.suffix == ".mp4" and path.stat().st_size == video["size_bytes"] > 1000
    frames = iio.mimread(path)
    assert len(frames) == video["length"] + 1 + DEFAULT_FPS  # first observation, one per step, held last
    assert frames[0].shape == (*size, 3)
    border = frames[len(frames) // 2][:2].reshape(-1, 3).mean(0)
    expected = SUCCESS_RGB if video["success"] else FAILURE_RGB
    assert np.abs(border - np.array(expected)).max() < 40  # H.264 colour error is a few levels


def test_ogbench_mvp_two_envs_with_video(checkpoints, tmp_path):
    result = evaluate_checkpoint(checkpoints["mvp"], episodes=4, num_envs=2, seed=3, video_episodes=1,
                                 video_size=(64, 80), video_prefix=tmp_path / "last")
    _check_statistics(result, 4)
    assert (result["algo"], result["env"], result["num_envs"], result["num_samples"]) == ("mvp", "ogbench", 2, 32)
    assert result["noise_scale"] == 1.0  # the run's eval.noise_scale
    assert result["task"] == "cube-single-singletask-task1-v0"
    [video] = result["videos"]
    assert Path(video["path"]) == tmp_path / "last_ep0.mp4" and video["seed"] == 3
    _check_video(video, (64, 80))


def test_robosuite_lift_with_video(checkpoints, tmp_path):
    result = evaluate_checkpoint(checkpoints["lift"], episodes=2, video_episodes=1, video_size=(64, 64),
                                 video_prefix=tmp_path / "lift")
    _check_statistics(result, 2)
    assert (result["env"], result["task"]) == ("robosuite", "Lift")
    _check_video(result["videos"][0], (64, 64))


def _cli(*overrides: str) -> None:
    """``python -m manip.evaluate OVERRIDES`` in this process (Hydra's compose API, same config)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    main.__wrapped__(cfg)


def test_cli_writes_json_next_to_the_run(checkpoints, capsys):
    ckpt = checkpoints["fql"]
    results = ckpt.parent.parent / "eval"
    earlier = set(results.glob("*.json")) if results.is_dir() else set()
    _cli(f"ckpt={ckpt}", "episodes=3", "seed=5", "num_samples=1", "noise_scale=0.5")
    [path] = set(results.glob("*.json")) - earlier
    assert path.name == ("last.json" if not earlier else f"last.{len(earlier)}.json")
    result = json.loads(path.read_text())
    _check_statistics(result, 3)
    assert (result["algo"], result["seed"], result["videos"], result["noise_scale"]) == ("fql", 5, [], 0.5)
    assert result["step"] == 2 and result["total_seconds"] > result["seconds"] > 0  # TINY: trainer.max_steps=2
    assert result["trained_on_stand_in"]["generator"] == "manip OGBench oracle play data"
    stdout = capsys.readouterr().out
    assert "over 3 episodes of cube-single-singletask-task1-v0 (fql, step 2)" in stdout and str(path) in stdout
    assert "trained on a stand-in dataset manip generated" in stdout
    first = path.read_text()
    _cli(f"ckpt={ckpt}", "episodes=1")  # another evaluation of the checkpoint keeps this one
    assert path.read_text() == first and len(set(results.glob("*.json")) - earlier) == 2


def test_cli_sample_steps_override(checkpoints, tmp_path, monkeypatch):
    """``sample_steps=2`` makes every MVP candidate two mean-velocity jumps; other agents refuse it by name."""
    import manip.algos.mvp as mvp

    calls = []
    original = mvp.sample_few_step
    monkeypatch.setattr(mvp, "sample_few_step", lambda *a: calls.append(a[3]) or original(*a))
    _cli(f"ckpt={checkpoints['mvp']}", "episodes=1", "sample_steps=2", f"out={tmp_path / 'two.json'}")
    assert json.loads((tmp_path / "two.json").read_text())["sample_steps"] == 2
    assert calls and set(calls) == {2}
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['fql']}", "sample_steps=2", f"out={tmp_path / 'fql.json'}")
    assert exit_info.value.code == ("manip.evaluate: sample_steps=2: fql checkpoints have no mean-velocity sampler "
                                    "(MVP only)")
    assert not (tmp_path / "fql.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['mvp']}", "sample_steps=0", f"out={tmp_path / 'zero.json'}")
    assert exit_info.value.code == "manip.evaluate: sample_steps must be >= 1, got 0"
    assert not (tmp_path / "zero.json").exists()


@pytest.mark.parametrize("value, message", [("-0.5", "noise_scale must be >= 0, got -0.5"),
                                            ("nan", "noise_scale must be >= 0, got nan")])
def test_cli_bad_noise_scale_is_one_line_error(checkpoints, tmp_path, value, message):
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['fql']}", f"noise_scale={value}", f"out={tmp_path / 'r.json'}")
    assert exit_info.value.code == f"manip.evaluate: {message}"
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("setting, message", [
    ("num_samples=0", "num_samples must be >= 1, got 0"),
    ("episodes=0", "episodes must be >= 1, got 0"),
    ("num_envs=0", "num_envs must be >= 1, got 0"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("act_dtype=float16", "act_dtype='float16': expected one of float32, bfloat16"),
    ("video=true video_size=[0,0]", "video_size must be >= 16, got 0"),  # ffmpeg would fail after the episodes
    ("video=true video_size=[64]", "video_size must be [height, width], got [64]"),
    ("video=true video_episodes=-1", "video_episodes must be >= 0, got -1"),
    ("video=true video_fps=0", "video_fps must be >= 1, got 0"),
])
def test_cli_settings_out_of_range_are_one_line_errors(tmp_path, setting, message):
    """Checked before the checkpoint is read: the (absent) checkpoint is never reached."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={tmp_path / 'nope.ckpt'}", *setting.split(), f"out={tmp_path / 'r.json'}")
    assert exit_info.value.code == f"manip.evaluate: {message}"
    assert not (tmp_path / "r.json").exists()


def test_cli_keeps_the_traceback_of_an_internal_error(checkpoints, tmp_path, monkeypatch):
    """Only user errors become one-line exits; a ValueError from inside the evaluation propagates."""
    import manip.evaluate as evaluate

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(evaluate, "evaluate_policy", broken)
    with pytest.raises(ValueError, match="broadcast"):
        _cli(f"ckpt={checkpoints['fql']}", "episodes=1", f"out={tmp_path / 'r.json'}")
    assert not (tmp_path / "r.json").exists()


def test_cli_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={tmp_path / 'nope.ckpt'}")
    assert exit_info.value.code == f"manip.evaluate: checkpoint not found: {tmp_path / 'nope.ckpt'}"
    with pytest.raises(SystemExit) as exit_info:
        _cli("episodes=1")
    assert exit_info.value.code == "manip.evaluate: ckpt=PATH is required, e.g. ckpt=runs/<run>/checkpoints/last.ckpt"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={run}")
    assert exit_info.value.code == (f"manip.evaluate: ckpt={run} is a directory; pass a checkpoint file "
                                    f"(runs/<run>/checkpoints/last.ckpt)")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={run}")
    assert exit_info.value.code == (f"manip.evaluate: ckpt={run} is a directory; its run's last checkpoint is "
                                    f"{run / 'checkpoints' / 'last.ckpt'}")


@pytest.mark.parametrize("where", ["existing directory", "path under a file", "existing file"])
def test_cli_checks_the_output_path_before_evaluating(checkpoints, tmp_path, monkeypatch, where):
    """An ``out`` the result could not be written to is refused by name before any episode runs."""
    import manip.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_policy", lambda *args, **kwargs: pytest.fail("the evaluation ran"))
    (tmp_path / "file.json").write_text("{}")
    out, message = {
        "existing directory": (tmp_path, f"out={tmp_path} is a directory; name the JSON file to write"),
        "path under a file": (tmp_path / "file.json" / "x.json",
                              f"out={tmp_path / 'file.json' / 'x.json'}: {tmp_path / 'file.json'} is a file"),
        "existing file": (tmp_path / "file.json", f"out={tmp_path / 'file.json'} exists and is kept; name a new file"),
    }[where]
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['fql']}", "episodes=1", f"out={out}")
    assert exit_info.value.code.startswith(f"manip.evaluate: {message}")
    assert (tmp_path / "file.json").read_text() == "{}"


@pytest.mark.parametrize(("setting", "message"), [
    ("act_compile=no", "act_compile must be true or false, got 'no'"),
    ("video=maybe", "video must be true or false, got 'maybe'"),
    ("threads=-1", "threads must be an integer >= 1 or null (torch's default), got -1"),
    ("threads=0", "threads must be an integer >= 1 or null (torch's default), got 0"),
])
def test_cli_refuses_a_setting_of_the_wrong_kind_in_one_line(checkpoints, tmp_path, setting, message):
    """A string for a true / false setting would read as true (``act_compile=no`` compiled)."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['fql']}", "episodes=1", setting, f"out={tmp_path / 'r.json'}")
    assert exit_info.value.code == f"manip.evaluate: {message}"
    assert list(tmp_path.iterdir()) == []


def test_cli_names_a_file_that_is_not_a_checkpoint(checkpoints, tmp_path):
    stats = checkpoints["mvp"].parents[1] / "dataset_stats.json"
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={stats}", f"out={tmp_path / 'r.json'}")
    assert exit_info.value.code.startswith(f"manip.evaluate: {stats} is not a PyTorch checkpoint (")
    assert "weights_only" not in exit_info.value.code and not (tmp_path / "r.json").exists()


def test_multirun_jobs_record_their_config_in_their_run_dir(checkpoints):
    """``fit --multirun``: each job's composed config lands in its own run_dir; the sweep directory keeps only
    Hydra's multirun.yaml."""
    root = checkpoints["mvp"].parents[2]
    for algo in ("mvp", "fql"):
        assert OmegaConf.load(root / algo / "hydra" / "config.yaml").algo.name == algo
        assert f"algo={algo}" in OmegaConf.load(root / algo / "hydra" / "overrides.yaml")
        assert (root / algo / "dataset_stats.json").exists()
    assert sorted(p.name for p in (root / "sweep").iterdir()) == ["multirun.yaml"]


def test_cli_without_renderer_fails_in_one_line(checkpoints, tmp_path):
    """A fresh process where MuJoCo has no GL backend: video=true stops before evaluating, in one line."""
    env = dict(os.environ, MUJOCO_GL="disable")
    out = subprocess.run([sys.executable, "-m", "manip.evaluate", f"ckpt={checkpoints['mvp']}", "episodes=1",
                          "video=true", f"out={tmp_path / 'r.json'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("manip.evaluate: no offscreen renderer for ogbench (MUJOCO_GL=disable)")
    assert "EGL_PLATFORM=surfaceless" in last and not (tmp_path / "r.json").exists()


def test_a_result_that_cannot_be_written_is_printed_instead(checkpoints, tmp_path):
    """A full disk when the episodes are done (here: a file size limit smaller than the JSON): the result goes to
    stdout, no half-written file is left, and one line says where it could not go."""
    import resource

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "manip.evaluate", f"ckpt={checkpoints['mvp']}", "episodes=2",
                           f"out={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"manip.evaluate: cannot write {out} (File too large); the result is printed above"), done.stderr[-2000:]
    _check_statistics(json.loads(done.stdout[done.stdout.index("{\n"):]), 2)
    assert list(tmp_path.iterdir()) == []


def test_a_gl_backend_that_cannot_load_is_a_renderer_error(monkeypatch):
    """MUJOCO_GL=osmesa without libOSMesa: PyOpenGL fails inside the simulator's import with an AttributeError,
    which must reach the user as the renderer advice, not as a traceback."""
    from manip.envs import EnvSpec
    from manip.video import RendererUnavailable, open_render_env

    def broken_import(self, **overrides):
        raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    monkeypatch.setattr(EnvSpec, "make", broken_import)
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    with pytest.raises(RendererUnavailable, match=r"no offscreen renderer for robosuite \(MUJOCO_GL=osmesa\): "
                                                  r"AttributeError: 'NoneType' object has no attribute 'glGetError'"):
        open_render_env(EnvSpec("robosuite", {"env_name": "Lift"}), (64, 64))


def test_mark_outcome_draws_border_and_holds_last_frame():
    frames = [np.full((40, 60, 3), i, dtype=np.uint8) for i in range(3)]
    marked = mark_outcome(frames, success=True, hold_frames=5)
    assert len(marked) == 8 and all(f.shape == (40, 60, 3) for f in marked)
    assert (marked[0][0, 0] == SUCCESS_RGB).all() and (marked[0][-1, 30] == SUCCESS_RGB).all()
    assert (marked[1][20, 30] == 1).all() and (marked[-1] == marked[2]).all()
    assert (mark_outcome(frames, success=False)[0][20, 0] == FAILURE_RGB).all()
    assert (frames[0] == 0).all()  # inputs untouched


def test_write_video_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch, caplog):
    frames = [np.full((32, 48, 3), 50 * i, dtype=np.uint8) for i in range(4)]
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with caplog.at_level(logging.WARNING, logger="manip"):
        path = write_video(tmp_path / "episode.mp4", mark_outcome(frames, success=False, hold_frames=2), fps=10)
    assert path == tmp_path / "episode.gif" and not (tmp_path / "episode.mp4").exists()
    assert "no mp4 (ModuleNotFoundError" in caplog.text and f"writing {path}" in caplog.text  # says why: a gif
    gif = iio.mimread(path)  # the held copies of the last frame merge into one longer gif frame
    assert len(gif) == 4 and gif[0].shape[:2] == (32, 48)


def test_a_video_never_replaces_one_that_exists(tmp_path, caplog):
    """Two evaluations of one checkpoint side by side name their videos alike (``last_ep0.mp4``): the second keeps
    the first's and takes the next free name; no partial file is left."""
    frames = [np.full((32, 48, 3), 50 * i, dtype=np.uint8) for i in range(4)]
    kept = tmp_path / "last_ep0.mp4"
    kept.write_bytes(b"the other evaluation's video")
    with caplog.at_level(logging.WARNING, logger="manip"):
        path = write_video(kept, frames, fps=10)
    assert path == tmp_path / "last_ep0.1.mp4" and kept.read_bytes() == b"the other evaluation's video"
    assert len(iio.mimread(path)) == 4 and f"{kept} exists and is kept; writing {path} instead" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_ep0.1.mp4", "last_ep0.mp4"]
    assert write_video(tmp_path / "new.mp4", frames, fps=10) == tmp_path / "new.mp4"


def _record_chunks(monkeypatch) -> list[np.ndarray]:
    """A list that receives a copy of every chunk ``evaluate_checkpoint``'s policy returns from now on."""
    chunks: list[np.ndarray] = []
    _spy_on_policy(monkeypatch, lambda chunk, streams: chunks.append(chunk.copy()))
    return chunks


def _spy_on_policy(monkeypatch, record: Callable[[np.ndarray, list], None]) -> None:
    """``record(chunks, noise streams)`` for every call of ``evaluate_checkpoint``'s policy, in its evaluation and
    in its videos, from now on."""
    import manip.evaluate as evaluate_module

    def spying(real):
        def run(env, predict, *args, **kwargs):
            def spy(obs, generator=None):
                chunk = predict(obs, generator=generator)
                record(chunk, generator)
                return chunk
            return real(env, spy, *args, **kwargs)
        return run

    monkeypatch.setattr(evaluate_module, "evaluate_policy", spying(evaluate_module.evaluate_policy))
    monkeypatch.setattr(evaluate_module, "record_videos", spying(evaluate_module.record_videos))


def test_evaluation_noise_is_seeded(checkpoints, monkeypatch):
    """The candidates' noise comes from the evaluation seed: one seed gives the same chunks whatever ran before,
    another seed other chunks (simulator resets and the policy's noise are both seeded)."""
    import torch

    chunks = _record_chunks(monkeypatch)
    runs = []
    for seed in (5, 5, 6):
        chunks.clear()
        torch.manual_seed(len(runs))  # the global stream differs between calls
        evaluate_checkpoint(checkpoints["mvp"], episodes=2, num_envs=1, seed=seed, noise_scale=1.0)
        runs.append(np.concatenate(chunks))
    assert runs[0].shape == runs[1].shape and np.array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0][: len(runs[2])], runs[2][: len(runs[0])])


def test_an_episode_acts_alike_whatever_the_number_of_envs_and_in_its_video(checkpoints, monkeypatch, tmp_path):
    """Episode k draws its candidates from its own noise stream (seed + k): sampling from unit noise, every episode
    executes the same chunks with one simulator or three, and video k replays episode k's."""
    runs = []
    for num_envs, videos in ((1, 0), (3, 2)):
        by_episode: dict[int, list[np.ndarray]] = {}

        def record(chunks, streams):
            for chunk, stream in zip(chunks, streams):
                by_episode.setdefault(stream.initial_seed(), []).append(chunk)

        by_episode_in_videos = {}
        with monkeypatch.context() as patch:
            _spy_on_policy(patch, record)
            result = evaluate_checkpoint(checkpoints["mvp"], episodes=4, num_envs=num_envs, seed=20,
                                         noise_scale=1.0, video_episodes=videos, video_size=(32, 32),
                                         video_prefix=tmp_path / "v")
        if videos:  # the video calls came last: each episode's chunks are listed twice, the video's after
            by_episode_in_videos = {k: by_episode[k][len(by_episode[k]) // 2:] for k in (20, 21)}
            for k in (20, 21):
                by_episode[k] = by_episode[k][:len(by_episode[k]) // 2]
            assert [v["length"] for v in result["videos"]] == result["lengths"][:2]
        runs.append(({k: np.stack(by_episode[k]) for k in range(20, 24)}, by_episode_in_videos, result))
    (alone, _, one), (beside, in_videos, three) = runs
    assert one["lengths"] == three["lengths"] and one["outcomes"] == three["outcomes"]
    for k in range(20, 24):
        assert alone[k].shape == beside[k].shape == (HORIZON // 5, 5, 5)
        np.testing.assert_allclose(alone[k], beside[k], atol=1e-5)
    for k in (20, 21):
        np.testing.assert_allclose(np.stack(in_videos[k]), alone[k], atol=1e-5)
    assert not np.allclose(alone[20], alone[21])  # each episode its own noise


def test_a_failing_compiler_is_one_line_naming_act_compile(checkpoints, tmp_path):
    """``act_compile=true`` where inductor finds no C++ compiler (and no cached program): one line, no result."""
    import torch._inductor.config as inductor_config

    out = tmp_path / "compiled.json"
    no_compiler = {"cpp.cxx": (None, str(tmp_path / "nowhere" / "g++")), "force_disable_caches": True}
    with inductor_config.patch(no_compiler), pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['mvp']}", "episodes=1", "act_compile=true", f"out={out}")
    message = str(exit_info.value.code)
    assert message.startswith("manip.evaluate: act_compile: the compiler failed on this machine (")
    assert "InvalidCxxCompiler: No working C++ compiler found" in message
    assert message.endswith("; the same command with act_compile=false evaluates without it") and not out.exists()


def test_fast_acting_evaluation(checkpoints, tmp_path, monkeypatch):
    """``act_compile=true`` acts through the frozen compiled copy with the chunks of the eager networks (same seed);
    ``act_dtype=bfloat16`` is recorded and evaluates."""
    chunks = _record_chunks(monkeypatch)
    runs = {}
    for name, settings in {"eager": {}, "compiled": {"act_compile": True}}.items():
        chunks.clear()
        result = evaluate_checkpoint(checkpoints["mvp"], episodes=2, seed=5, noise_scale=1.0, **settings)
        runs[name] = np.concatenate(chunks)
        assert (result["act_dtype"], result["act_compile"]) == ("float32", bool(settings))
        # compiled before the episodes, apart from the policy's time (all its calls take less than compiling)
        if settings:
            assert 0 < result["action_latency_ms"] * result["env_steps"] < 1e3 * result["compile_seconds"]
        else:
            assert result["compile_seconds"] is None
        assert ("compiled before, in" in summary(result, tmp_path / "r.json")) == bool(settings)
    assert runs["eager"].shape == runs["compiled"].shape
    np.testing.assert_allclose(runs["compiled"], runs["eager"], atol=1e-3)
    _cli(f"ckpt={checkpoints['mvp']}", "episodes=2", "act_dtype=bfloat16", f"out={tmp_path / 'bf16.json'}")
    result = json.loads((tmp_path / "bf16.json").read_text())
    _check_statistics(result, 2)
    assert (result["act_dtype"], result["act_compile"]) == ("bfloat16", False)


@pytest.mark.parametrize("num_envs", [1, 4])
def test_policy_time_is_per_call_and_per_executed_action(num_envs):
    """A call that takes 20 ms is 20 ms per call whatever the number of envs it serves; per executed action
    the time is the calls' total over all actions the envs took (chunks of 5: 20 / 5 / num_envs ms)."""
    import time

    def predict(obs):
        time.sleep(0.02)
        return np.zeros((len(obs), 5, 2), dtype=np.float32)

    policy = ChunkPolicy(predict, num_envs)
    for _ in range(10):
        policy.select_action(np.zeros((num_envs, 3), dtype=np.float32))
    assert len(policy.latencies) == 2 and policy.actions == 10 * num_envs
    assert 0.02 <= np.median(policy.latencies) < 0.03
    per_action = sum(policy.latencies) / policy.actions
    assert 0.02 / 5 / num_envs <= per_action < 0.03 / 5 / num_envs


def test_an_evaluation_stopped_while_a_worker_hangs_in_a_step_ends(checkpoints, monkeypatch):
    """Ctrl-C while a simulator worker hangs in a step (here a stopped process): the evaluation's close gives the
    step 10 s and then kills the worker, instead of waiting for it forever."""
    import signal
    import threading

    import manip.evaluate as evaluate_module

    workers = []

    def hang_then_ctrl_c(env, predict, episodes, seed):
        env.reset(seed=seed)
        workers.extend(env.processes)
        os.kill(env.processes[0].pid, signal.SIGSTOP)
        env.step_async(np.zeros((env.num_envs, *env.single_action_space.shape), np.float32))
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate_policy", hang_then_ctrl_c)
    raised = []

    def run() -> None:
        try:
            evaluate_checkpoint(checkpoints["mvp"], episodes=2, num_envs=2)
        except KeyboardInterrupt as err:
            raised.append(err)

    evaluating = threading.Thread(target=run)
    evaluating.start()
    evaluating.join(60)
    hung = evaluating.is_alive()
    if hung:  # end the test's own worker
        os.kill(workers[0].pid, signal.SIGKILL)
        evaluating.join()
    assert not hung, "the evaluation still waits for the stopped worker after 60 s"
    assert raised and not any(process.is_alive() for process in workers)


def test_a_fit_job_refused_by_its_checks_does_not_stop_the_sweep(cube_single_npz, tmp_path):
    """``fit --multirun``: a job that a user error refuses (here, a dataset that is not there) prints its line and
    leaves nothing behind, the sweep trains the next job, and the command ends with status 1 and a line per refused
    job, naming its overrides as typed."""
    missing = tmp_path / "missing.npz"
    out = subprocess.run([sys.executable, "-m", "manip.fit", "--multirun", "data=ogbench",
                          f"data.path={missing},{cube_single_npz}", "algo=mvp", "run_dir=run_${hydra:job.num}",
                          f"hydra.sweep.dir={tmp_path}/sweep", *TINY],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert (tmp_path / "run_1" / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_1", "sweep"]
    refusal = f"OGBench dataset file not found: {missing}."
    assert f"manip.fit: {refusal}" in out.stderr
    summary = out.stderr[out.stderr.index("manip.fit: 1 --multirun job was refused (the sweep ran the others):"):]
    assert summary.splitlines()[1].startswith(f"  #0 (data=ogbench data.path={missing} algo=mvp "
                                              f"run_dir=run_${{hydra:job.num}} ")
    assert refusal in summary.splitlines()[1] and len(summary.strip().splitlines()) == 2


_SWEEP_WITH_A_BUG = """
import runpy, sys
import manip.run
from manip.settings import SettingError
build_trainer = manip.run.build_trainer
def build_with_a_bug(cfg, *args, **kwargs):
    if cfg.seed == 0:
        raise SettingError("seed 0 is refused here")
    if cfg.seed == 1:
        raise RuntimeError("a bug in job 1")
    return build_trainer(cfg, *args, **kwargs)
manip.run.build_trainer = build_with_a_bug
sys.argv[0] = "manip.fit"
runpy.run_module("manip.fit", run_name="__main__", alter_sys=True)
"""


def test_the_refused_jobs_of_a_sweep_that_hit_a_bug_are_listed_after_its_traceback(cube_single_npz, tmp_path):
    """A job's bug is Hydra's to report: the sweep runs the other jobs, then Hydra prints the bug's traceback and
    ends with status 1; the refused jobs' lines follow it, as they would end a sweep without the bug."""
    out = subprocess.run([sys.executable, "-c", _SWEEP_WITH_A_BUG, "--multirun", "data=ogbench",
                          f"data.path={cube_single_npz}", "seed=0,1,2", "run_dir=run_${seed}",
                          f"hydra.sweep.dir={tmp_path}/sweep", *TINY],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert (tmp_path / "run_2" / "checkpoints" / "last.ckpt").exists()  # the job after the bug ran
    lines = out.stderr.strip().splitlines()
    assert "RuntimeError: a bug in job 1" in out.stderr and "manip.fit: seed 0 is refused here" in lines
    assert lines[-2] == "manip.fit: 1 --multirun job was refused (the sweep ran the others):", out.stderr[-3000:]
    assert lines[-1].startswith("  #0 (data=ogbench ") and lines[-1].endswith("): seed 0 is refused here")
    assert out.stderr.index("RuntimeError: a bug in job 1") < out.stderr.index(lines[-2])


def test_an_evaluation_job_refused_by_its_checks_does_not_stop_the_sweep(checkpoints, tmp_path):
    """``evaluate --multirun`` over checkpoints: a missing one ends its own job only; the sweep leaves no empty job
    folders behind, only Hydra's multirun.yaml."""
    missing = tmp_path / "gone.ckpt"
    out = subprocess.run([sys.executable, "-m", "manip.evaluate", "--multirun", f"ckpt={missing},{checkpoints['fql']}",
                          "episodes=1", "out=r${hydra:job.num}.json", f"hydra.sweep.dir={tmp_path}/sweep"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert json.loads((tmp_path / "r1.json").read_text())["episodes"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.json", "sweep"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["multirun.yaml"]
    assert out.stderr.strip().splitlines()[-2:] == [
        "manip.evaluate: 1 --multirun job was refused (the sweep ran the others):",
        f"  #0 (ckpt={missing} episodes=1 out=r${{hydra:job.num}}.json): checkpoint not found: {missing}"]
