"""manip.bench's figures: the act() FLOP count matches the networks' matrix products."""

from __future__ import annotations

import argparse

import pytest
import torch

from manip import bench

QUICK = dict(device="cpu", threads=1, batch_size=16, act_calls=3, actor_calls=1, update_warmup=1,
             min_update_iters=1, update_seconds=0.0, fast_act=False)


def _products(dims: list[int]) -> int:
    """Multiply-adds of an MLP with these layer sizes, per input row."""
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


@pytest.mark.parametrize("algo", ["mvp", "qc"])
def test_act_flops_match_the_networks(algo):
    hidden = [32, 16]
    result = bench.measure(algo, argparse.Namespace(hidden=hidden, **QUICK))
    obs, chunk, n = bench.OBS_DIM, bench.ACTION_DIM * bench.HORIZON, 32
    critic = 2 * _products([obs + chunk, *hidden, 1])  # two ensemble members
    if algo == "mvp":  # one mean-velocity pass: [obs, x, emb(t), emb(r - t)] with 64 time features
        actor = _products([obs + chunk + 64, *hidden, chunk])
    else:  # ten Euler steps of the velocity net: [obs, x, emb(t)] with 32 time features
        actor = 10 * _products([obs + chunk + 32, *hidden, chunk])
    assert result["act_mflop"] == pytest.approx(2 * n * (actor + critic) / 1e6)
    assert result["act_ms_per_action"] == pytest.approx(result["act_ms"] / bench.HORIZON)
    assert result["act_gflops"] == pytest.approx(result["act_mflop"] / result["act_ms"])
    assert result["update_its"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_request_without_a_device_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--out", str(tmp_path / "b.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "b.json").exists()
    assert f"--device cuda: torch {torch.__version__} sees no CUDA device" in capsys.readouterr().err


def test_fast_act_figures(tmp_path):
    """``--fast-act`` times the compiled frozen copy; in float32 every seeded chunk equals the agent's."""
    report = bench.main(["--algos", "mvp", "--hidden", "32", "16", "--batch-size", "16", "--act-calls", "3",
                         "--actor-calls", "1", "--update-warmup", "1", "--min-update-iters", "1",
                         "--update-seconds", "0", "--fast-act", "--fast-act-dtype", "float32",
                         "--out", str(tmp_path / "b.json")])
    mvp = report["mvp"]
    assert mvp["fast_act_ms"] > 0 and mvp["fast_act_agree"] == 1.0
    assert (tmp_path / "b.json").exists()
