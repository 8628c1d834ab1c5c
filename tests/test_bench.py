"""manip.bench's figures: the act() FLOP count matches the networks' matrix products."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manip import bench

ROOT = Path(__file__).resolve().parents[1]

QUICK = dict(device="cpu", threads=1, batch_size=16, act_calls=3, actor_calls=1, update_warmup=1,
             min_update_iters=1, update_seconds=0.0, fast_act=False, compile=None, matmul_precision="high")


def _products(dims: list[int]) -> int:
    """Multiply-adds of an MLP with these layer sizes, per input row."""
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


@pytest.mark.parametrize(("algo", "horizon", "n"), [("mvp", 5, 32), ("mvp_noivc", 5, 32), ("qc", 5, 32),
                                                    ("bfn", 1, 4)])
def test_act_flops_match_the_networks(algo, horizon, n):
    hidden = [32, 16]
    result = bench.measure(algo, argparse.Namespace(hidden=hidden, **QUICK))
    obs, chunk = bench.OBS_DIM, bench.ACTION_DIM * horizon
    critic = 2 * _products([obs + chunk, *hidden, 1])  # two ensemble members
    if algo.startswith("mvp"):  # one mean-velocity pass: [obs, x, emb(t), emb(r - t)] with 64 time features
        actor = _products([obs + chunk + 64, *hidden, chunk])
        assert result["actor_update_ms"] > 0 and result["fm_update_ms"] > 0
    else:  # ten Euler steps of the velocity net: [obs, x, emb(t)] with 32 time features
        actor = 10 * _products([obs + chunk + 32, *hidden, chunk])
    assert result["act_mflop"] == pytest.approx(2 * n * (actor + critic) / 1e6)
    assert result["act_ms_per_action"] == pytest.approx(result["act_ms"] / horizon)
    assert result["act_gflops"] == pytest.approx(result["act_mflop"] / result["act_ms"])
    assert result["update_its"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_request_without_a_device_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--out", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "b.json").exists()
    assert f"--device cuda: torch {torch.__version__} sees no CUDA device" in capsys.readouterr().err


def test_fast_act_figures(tmp_path):
    """``--fast-act`` times the compiled frozen copy; in float32 every seeded chunk equals the agent's. The
    command ends cleanly: its worker releases what inductor's compilation held (no resource-tracker warning)."""
    done = subprocess.run(
        [sys.executable, "-m", "manip.bench", "--algos", "mvp", "--hidden", "32", "16", "--batch-size", "16",
         "--act-calls", "3", "--actor-calls", "1", "--update-warmup", "1", "--min-update-iters", "1",
         "--update-seconds", "0", "--fast-act", "--fast-act-dtype", "float32", "--out", str(tmp_path / "b.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    mvp = json.loads((tmp_path / "b.json").read_text())["mvp"]
    assert mvp["fast_act_ms"] > 0 and mvp["fast_act_agree"] == 1.0
    assert "leaked" not in done.stderr and "resource_tracker" not in done.stderr, done.stderr[-2000:]


def test_compiled_update_figures(tmp_path):
    """``--compile`` times the update with both losses compiled (as ``module.compile`` trains), the compilation
    apart: the warm-up that compiles takes many times an update."""
    report = bench.main(["--algos", "mvp", "--hidden", "16", "16", "--batch-size", "16", "--act-calls", "3",
                         "--actor-calls", "1", "--update-warmup", "2", "--min-update-iters", "3",
                         "--update-seconds", "0", "--compile", "--out", str(tmp_path / "b.json")])
    mvp = report["mvp"]
    assert mvp["update_its"] > 0 and mvp["compile_s"] > 20 / mvp["update_its"], mvp
    assert report["config"]["compile"] == "default" and report["config"]["matmul_precision"] == "high"
    assert bench.parse_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert bench.parse_args([]).compile is None


def test_algos_cover_conf_and_keep_the_default_set():
    """Every conf/algo agent but qc_fql has its name (the bench's fql runs qc_fql's h = 5); the default set is
    the one the speed figures were made with."""
    assert set(bench.AGENTS) == {"mvp", "mvp_noivc", "qc", "bfn", "fql"}
    assert bench.parse_args([]).algos == ["mvp", "qc", "fql"]
    assert bench.build_agent("mvp_noivc", (8,)).lambda_ivc == 0.0
    assert bench.build_agent("fql", (8,)).horizon == bench.build_agent("qc", (8,)).horizon == bench.HORIZON
    bfn = bench.build_agent("bfn", (8,))
    assert (bfn.horizon, bfn.num_samples) == (1, 4)


def _one_error_line(stderr: str, prog: str, flag: str) -> str:
    """The single error line of an argparse usage error (usage lines before it, nothing after)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and "Traceback" not in stderr, stderr
    assert lines[-1].startswith(f"{prog}: error: argument {flag}: "), stderr
    return lines[-1]


def _must_not_run(*args, **kwargs):
    pytest.fail("a bad value was accepted: the measurement started")


# The rest of each command line is a tiny, valid benchmark, so a value that is wrongly accepted fails fast.
TINY = ["--algos", "fql", "--hidden", "8", "--batch-size", "4", "--act-calls", "2", "--actor-calls", "1",
        "--update-warmup", "0", "--min-update-iters", "1", "--update-seconds", "0"]


@pytest.mark.parametrize(("args", "flag", "accepted"), [
    (["--batch-size", "0"], "--batch-size", ">= 1, got 0"),
    (["--act-calls", "0"], "--act-calls", ">= 1, got 0"),
    (["--actor-calls", "0"], "--actor-calls", ">= 1, got 0"),
    (["--hidden", "8", "0"], "--hidden", ">= 1, got 0"),
    (["--threads", "0"], "--threads", ">= 1, got 0"),
    (["--update-warmup", "-1"], "--update-warmup", ">= 0, got -1"),
    (["--min-update-iters", "0"], "--min-update-iters", ">= 1, got 0"),
    (["--update-seconds", "-1"], "--update-seconds", ">= 0, got -1.0"),
    (["--update-seconds", "nan"], "--update-seconds", ">= 0, got nan"),
    (["--out", "missing/b.json"], "--out", "does not exist"),
])
def test_bad_values_are_one_usage_error(tmp_path, monkeypatch, capsys, args, flag, accepted):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--out", "b.json", *args])
    assert exit_info.value.code == 2
    assert accepted in _one_error_line(capsys.readouterr().err, "python -m manip.bench", flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("module", "measure", "args", "flag", "accepted"), [
    ("manip.data.bench", "synthetic", ["--batch-size", "0"], "--batch-size", ">= 1, got 0"),
    ("manip.data.bench", "synthetic", ["--horizon", "0"], "--horizon", ">= 1, got 0"),
    ("manip.data.bench", "synthetic", ["--seconds", "0"], "--seconds", "> 0, got 0.0"),
    ("manip.data.bench", "synthetic", ["--seconds", "nan"], "--seconds", "> 0, got nan"),
    ("manip.data.bench", "synthetic", ["--path", "missing.hdf5"], "--path", "no file missing.hdf5"),
    ("manip.bench_envs", "measure", ["--workers", "1", "0"], "--workers", ">= 1, got 0"),
    ("manip.bench_envs", "measure", ["--steps", "0"], "--steps", ">= 1, got 0"),
    ("manip.bench_envs", "measure", ["--warmup", "-1"], "--warmup", ">= 0, got -1"),
    ("manip.bench_envs", "measure", ["--out", "missing/e.json"], "--out", "does not exist"),
    ("manip.bench_trainer", "measure", ["--steps", "1"], "--steps", ">= 2, got 1"),
    ("manip.bench_trainer", "measure", ["--steps", "5", "--warmup", "5"], "--warmup", "less than --steps (5), got 5"),
    ("manip.bench_trainer", "measure", ["--grad-clip", "0"], "--grad-clip", "> 0, got 0.0"),
    ("manip.bench_trainer", "measure", ["--precision", "bf16-true"], "--precision", "invalid choice: 'bf16-true'"),
    ("manip.bench_trainer", "measure", ["--out", "missing/t.json"], "--out", "does not exist"),
])
def test_other_benchmarks_bad_values_are_one_usage_error(tmp_path, monkeypatch, capsys, module, measure, args, flag,
                                                         accepted):
    """manip.data.bench (chunk sampling), manip.bench_envs (simulator throughput) and manip.bench_trainer (updates
    through Lightning's loop) check their flags before measuring anything."""
    import importlib

    bench_module = importlib.import_module(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_module, measure, _must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        bench_module.main(args)
    assert exit_info.value.code == 2
    assert accepted in _one_error_line(capsys.readouterr().err, f"python -m {module}", flag)


def test_the_benchmark_needs_only_torch_and_numpy():
    """``.ci/device_check`` runs on a GPU machine whose Python has PyTorch (and NumPy) but nothing this project
    installs: importing the benchmark must not pull in Lightning, torchmetrics, Hydra or the simulators."""
    code = ("import sys, manip.bench; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                 .stdout.split())
    assert "manip" in loaded and "torch" in loaded
    heavy = {"lightning", "pytorch_lightning", "lightning_utilities", "torchmetrics", "hydra", "omegaconf",
             "gymnasium", "mujoco", "robosuite", "ogbench", "h5py", "pandas"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_the_trainer_benchmark_trains_through_lightning_with_what_a_gpu_machine_has(tmp_path):
    """``manip.bench_trainer`` times real ``trainer.fit`` runs (float32 and bf16-mixed, gradient clipping, the weight
    average) and, like the bare benchmark, pulls in nothing a GPU machine's Python lacks beyond Lightning and
    torchmetrics: no Hydra, no simulators."""
    out = tmp_path / "trainer.json"
    code = ("import sys\n"
            "from manip import bench_trainer\n"
            f"bench_trainer.main(['--algos', 'mvp', 'fql', '--precision', '32-true', 'bf16-mixed', '--hidden', '32',"
            f" '32', '--steps', '8', '--warmup', '2', '--log-every', '3', '--grad-clip', '1.0', '--out', r'{out}'])\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    # (Lightning's CSV logger imports omegaconf where it is installed, and does without it)
    heavy = {"hydra", "gymnasium", "mujoco", "robosuite", "ogbench", "h5py", "pandas"}
    assert "lightning" in loaded and not loaded & heavy, sorted(loaded & heavy)
    report = json.loads(out.read_text())
    for algo in ("mvp", "fql"):
        for precision in ("32-true", "bf16-mixed"):
            result = report[algo][precision]
            assert result["updates"] == 6 and result["updates_per_s"] == pytest.approx(6 / result["seconds"])
    assert report["config"]["actor_ema"] == 0.999 and report["config"]["lightning"]


def test_device_check_runs_its_stages_within_the_budget_and_returns_what_the_device_tool_brings_back(tmp_path):
    """A dry run of ``.ci/device_check`` on this CPU: the first stage's figures, the stages whose time no longer fits
    skipped and said so, and at most 8 files in $OUT (what a device command's $OUT brings back)."""
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "ALGOS": "mvp", "BUDGET": "80", "OUT": str(out),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "device_check")], env=env, capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (out / "device.txt").read_text()
    assert "bench: exit status 0 after" in report and "trainer: exit status 0 after" in report, report
    for name in ("bench_compile", "bench_cudagraphs", "bench_fast"):
        assert re.search(rf"{name}: skipped, \d+ s of the budget left", report), report
    assert "mvp" in json.loads((out / "bench.json").read_text())
    trainer = json.loads((out / "trainer.json").read_text())
    assert set(trainer["mvp"]) == {"32-true", "bf16-mixed"} and trainer["config"]["grad_clip"] == 1.0
    log = (out / "device.log").read_text()
    assert "== bench: manip.bench --algos mvp" in log and "== trainer: manip.bench_trainer --algos mvp qc" in log
    assert len(list(out.iterdir())) <= 8


def test_an_existing_out_is_kept_and_the_default_takes_the_first_free_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench.json").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--out", "bench.json"])
    assert exit_info.value.code == 2
    assert "bench.json exists and is kept" in _one_error_line(capsys.readouterr().err, "python -m manip.bench", "--out")
    assert bench.parse_args([]).out == "bench.1.json"
    assert [p.read_text() for p in tmp_path.iterdir()] == ["kept"]


def test_data_bench_names_a_bad_dataset_in_one_line(tmp_path):
    """The loader's message, without a traceback."""
    from manip.data import bench as data_bench

    bad = tmp_path / "demos.hdf5"
    bad.write_text("not an HDF5 file")
    with pytest.raises(SystemExit) as exit_info:
        data_bench.main(["--path", str(bad)])
    assert str(exit_info.value.code).startswith(f"manip.data.bench: {bad}")
