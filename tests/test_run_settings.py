"""Run settings of ``fit`` / ``finetune``: ``last.ckpt`` at the final step (also when the final evaluation fails),
and out-of-range settings refused by their config key before any data is loaded or any update is made.

Runs are in-process builds of the entry points (``fit.build`` / ``finetune.build`` on the Hydra configs they
compose) with tiny networks on the session's small cube-single file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import manip
import manip.envs
from manip.checkpoint import CheckpointError, load_checkpoint
from manip.settings import SettingError

from manip import finetune, fit, run_lock
from manip.run import train

from entry_points import config, run_finetune, run_fit, warnings_logged

SMALL = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
         "trainer.accelerator=cpu", "eval.every_n_steps=0", "eval.final_episodes=0", "data.env_horizon=10",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
EVERY = 10  # checkpoint.every_n_steps of every run here
OFFLINE_STEPS = 15  # not a multiple of EVERY


def fit_overrides(npz: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["data=ogbench", f"data.path={npz}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            f"checkpoint.every_n_steps={EVERY}", *SMALL, *extra]


def finetune_overrides(ckpt: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"ckpt={ckpt}", f"run_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={EVERY}",
            "eval.every_n_steps=0", "eval.final_episodes=0", "finetune.start_training=20",
            "finetune.target_samples=4", *extra]


def last_step(run_dir: Path) -> int:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]


def logged_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (actor loss, critic loss) from metrics.csv (a later row for the same step wins)."""
    losses = {}
    with open(run_dir / "offline" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/actor_loss"):
                losses[int(row["step"])] = (float(row["train/actor_loss"]), float(row["train/critic_loss"]))
    return losses


@pytest.fixture(scope="module")
def offline_run(cube_single_npz, tmp_path_factory) -> tuple[Path, Path]:
    """(run directory of a 15-update fit with checkpoints every 10 updates, a copy of its last.ckpt then)."""
    run_dir = tmp_path_factory.mktemp("offline") / "run"
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, OFFLINE_STEPS))
    assert trainer.global_step == OFFLINE_STEPS
    kept = run_dir.parent / "kept" / "last.ckpt"
    kept.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", kept)
    return run_dir, kept


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails a test whose entry point starts preparing or reading the dataset; the attempts are listed."""
    from manip.data.datamodule import OGBenchDataModule

    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(self)
        raise AssertionError("data loading started before the settings were checked")

    monkeypatch.setattr(OGBenchDataModule, "prepare_data", refuse)
    monkeypatch.setattr(OGBenchDataModule, "setup", refuse)
    return calls


# ------------------------------------------------------------------------------------ last.ckpt at the end
def test_fit_leaves_last_checkpoint_at_the_final_step_and_resumes_from_it(offline_run, cube_single_npz, tmp_path,
                                                                          caplog):
    run_dir, _ = offline_run
    checkpoints = run_dir / "checkpoints"
    assert last_step(run_dir) == OFFLINE_STEPS
    assert load_checkpoint(checkpoints / f"step{EVERY}.ckpt")["global_step"] == EVERY  # the interval saves stay
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", f"step{EVERY}.ckpt"]

    # The same command with more updates continues from step 15, exactly as an uninterrupted run does.
    steps = 25
    caplog.clear()
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, steps))
    assert f"resuming from {checkpoints / 'last.ckpt'} at step {OFFLINE_STEPS}" in caplog.text
    assert trainer.global_step == steps and last_step(run_dir) == steps
    assert not list(checkpoints.glob("last-v*.ckpt"))
    run_fit(fit_overrides(cube_single_npz, tmp_path / "straight", steps))
    assert logged_losses(run_dir) == logged_losses(tmp_path / "straight")
    assert sorted(logged_losses(run_dir)) == list(range(1, steps + 1))
    # Another checkpoint interval (a callback state the run did not save) still continues last.ckpt, not last-v1;
    # 0 saves last.ckpt at the end only.
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, steps + 5, "checkpoint.every_n_steps=0"))
    assert last_step(run_dir) == steps + 5 and not list(checkpoints.glob("last-v*.ckpt"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", f"step{EVERY}.ckpt", f"step{2 * EVERY}.ckpt"]
    # A smaller budget than the run's step is refused, before anything is written.
    with pytest.raises(SettingError, match=rf"trainer.max_steps=5 but .*last.ckpt is already at step {steps + 5}: "
                                           rf"nothing to train"):
        run_fit(fit_overrides(cube_single_npz, run_dir, 5))
    assert last_step(run_dir) == steps + 5
    # A resumed run trains with the learning rate it is given, not the one its restored optimizer held.
    assert {g["lr"] for g in load_checkpoint(checkpoints / "last.ckpt")["optimizer_states"][0]["param_groups"]} == {3e-4}
    run_fit(fit_overrides(cube_single_npz, run_dir, steps + 7, "module.lr=1e-4"))
    assert {g["lr"] for g in load_checkpoint(checkpoints / "last.ckpt")["optimizer_states"][0]["param_groups"]} == {1e-4}
    # An optimizer state saved by an unfused Adam (checkpoints of earlier versions) resumes into the fused one.
    unfused = load_checkpoint(checkpoints / "last.ckpt")
    assert [g["fused"] for g in unfused["optimizer_states"][0]["param_groups"]] == [True, True]
    for group in unfused["optimizer_states"][0]["param_groups"]:
        group.update(fused=None, foreach=None)
    torch.save(unfused, checkpoints / "last.ckpt")
    run_fit(fit_overrides(cube_single_npz, run_dir, steps + 8, "module.lr=1e-4"))
    assert [g["fused"] for g in load_checkpoint(checkpoints / "last.ckpt")["optimizer_states"][0]["param_groups"]] \
        == [True, True]


def test_checkpoint_state_keeps_model_checkpoints_key():
    """Checkpoints written with Lightning's plain ModelCheckpoint restore LastCheckpoint's state (last_model_path)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from manip.run import LastCheckpoint

    settings = {"every_n_train_steps": 10, "save_last": True, "save_top_k": -1}
    assert LastCheckpoint(**settings).state_key == ModelCheckpoint(**settings).state_key


def test_finetune_leaves_last_checkpoint_at_the_final_step(offline_run, tmp_path, caplog):
    _, offline_ckpt = offline_run
    start, updates = load_checkpoint(offline_ckpt)["global_step"], 12
    assert (start + updates) % EVERY  # global steps 15 -> 27: the interval saves at 20 only
    trainer, module = run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates))
    assert trainer.global_step == start + updates
    # a new fine-tuning run draws from its own seed, not from the offline run's random states
    assert not module.restore_random_states and not trainer.datamodule.restore_sampler
    last = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == start + updates
    assert module.env_steps == 20 + updates  # finetune.start_training, then one per update (utd 1)
    caplog.clear()  # the finished command again: it says so, and no line announces updates
    trainer, _ = run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates))
    assert trainer.global_step == start + updates and "nothing left to train" in caplog.text
    assert "online updates ->" not in caplog.text and "resuming fine-tuning" not in caplog.text
    # a new run from this run's last.ckpt continues its env steps and collects its own finetune.start_training
    # steps, then one per update; the checkpoint counts the steps of finished episodes only, which its replay holds
    # (the episode in progress is not saved)
    online = last["manip"]["online_replay"]
    assert last["manip"]["env_steps"] == len(online["terminals"])
    _, chained = run_finetune(finetune_overrides(tmp_path / "ft" / "checkpoints" / "last.ckpt", tmp_path / "ft3", 5))
    assert chained.online.start_env_steps == last["manip"]["env_steps"]
    assert chained.run_env_steps == chained.env_steps - last["manip"]["env_steps"] == 20 + 5
    # a new run from a step checkpoint of this one: no online episodes come with it, and it says so
    step_ckpt = tmp_path / "ft" / "checkpoints" / "step20.ckpt"
    run_finetune(finetune_overrides(step_ckpt, tmp_path / "ft2", 2))
    assert f"{step_ckpt} is a step checkpoint of a fine-tuning run: only last.ckpt keeps the online episodes" \
        in warnings_logged(caplog)

    # Without a run_dir: an offline run's checkpoint fine-tunes into <run>/finetune_<target>, a fine-tuning run's
    # beside that run (not inside it), and a checkpoint kept outside a run directory beside itself.
    def default_dir(ckpt: Path, target: str, *more: str) -> Path:
        items = [f"ckpt={ckpt}", f"finetune.target={target}", *more]
        return Path(finetune.compose(config("finetune", items), items)[0].run_dir)

    offline_dir = offline_run[0]
    assert default_dir(offline_dir / "checkpoints" / "last.ckpt", "som") == offline_dir / "finetune_som"
    assert default_dir(step_ckpt, "som") == tmp_path / "ft_then_som"
    # a seed other than the checkpoint's is another run: a --multirun +seed=0,1,2 needs no run_dir
    seed = load_checkpoint(offline_dir / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]["seed"]
    assert default_dir(offline_dir / "checkpoints" / "last.ckpt", "som", f"+seed={seed + 5}") == \
        offline_dir / f"finetune_som_s{seed + 5}"
    assert default_dir(offline_dir / "checkpoints" / "last.ckpt", "som", f"+seed={seed}") == offline_dir / "finetune_som"
    assert default_dir(step_ckpt, "som", f"+seed={seed + 5}") == tmp_path / f"ft_then_som_s{seed + 5}"
    assert default_dir(tmp_path / "ft" / "checkpoints" / "last.ckpt", "bon") == tmp_path / "ft_then_bon"
    assert default_dir(offline_ckpt, "rfm") == offline_ckpt.parent / "last_finetune_rfm"  # a copy in <dir>/kept
    link = tmp_path / "models" / "best.ckpt"  # a link to a run's checkpoint: beside the link
    link.parent.mkdir()
    link.symlink_to(step_ckpt)
    assert default_dir(link, "bon") == tmp_path / "models" / "best_finetune_bon"
    # a run that an earlier version nested inside the fine-tuning run is continued where it is
    nested = tmp_path / "ft" / "finetune_rfm" / "checkpoints" / "last.ckpt"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"")
    ft_cfg = load_checkpoint(step_ckpt)["hyper_parameters"]["cfg"]
    assert finetune.default_run_dir(step_ckpt, ft_cfg, "rfm") == tmp_path / "ft" / "finetune_rfm"
    assert finetune.default_run_dir(step_ckpt, ft_cfg, "som") == tmp_path / "ft_then_som"
    shutil.rmtree(tmp_path / "ft" / "finetune_rfm")

    # The same command again with other fine-tuning settings is another run: refused, its record untouched.
    record = (tmp_path / "ft" / "hydra" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'ft'} holds a mvp fine-tuning run with finetune.alpha=10.0 (this command: 3), "
            f"finetune.target_samples=4 (this command: 8); continue it")):
        run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates + 5, "finetune.alpha=3",
                                        "finetune.target_samples=8"))
    # ... as is a budget the run already passed; the simulator count is free
    with pytest.raises(SettingError, match=re.escape(
            f"trainer.max_steps={updates - 2} (online updates after step {start}) but "
            f"{tmp_path / 'ft' / 'checkpoints' / 'last.ckpt'} is already at step {start + updates}: nothing to train")):
        run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates - 2))
    assert (tmp_path / "ft" / "hydra" / "config.yaml").read_text() == record
    trainer, _ = run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates + 3, "finetune.num_envs=2"))
    assert trainer.global_step == start + updates + 3
    # the continued run's record is this command's; the first command's is kept beside it
    hydra_dir = tmp_path / "ft" / "hydra"
    assert (hydra_dir / "config.1.yaml").read_text() == record and not (hydra_dir / "config.2.yaml").exists()
    assert OmegaConf.load(hydra_dir / "config.yaml").trainer.max_steps == updates + 3
    assert "finetune.num_envs=2" in OmegaConf.load(hydra_dir / "overrides.yaml")
    assert "finetune.num_envs=2" not in OmegaConf.load(hydra_dir / "overrides.1.yaml")


def test_progress_goes_to_lines_where_standard_output_is_not_a_terminal(cube_single_npz, offline_run, tmp_path,
                                                                         caplog, monkeypatch):
    """In a log file (a SLURM job's output) Lightning's bar would write a carriage return per update: there the
    run logs a progress line every minute (here every update) instead; a terminal keeps the bar."""
    import sys

    from manip import fit, run_lock
    from manip.run import ProgressBar, ProgressLines, train

    overrides = [o for o in fit_overrides(cube_single_npz, tmp_path / "run", 5) if "enable_progress_bar" not in o]
    module, dm, trainer, _ = fit.build(config("fit", overrides))
    lines = [c for c in trainer.callbacks if isinstance(c, ProgressLines)]
    assert len(lines) == 1 and not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    lines[0].every_s = 0.0
    try:
        train(trainer, module, dm, None)
    finally:
        run_lock.release()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in logged if "updates/s" in line] == [f"step {k}/5 ({20 * k}%)"
                                                                           for k in range(1, 6)]
    assert re.fullmatch(r"step 3/5 \(60%\): [\d.e+]+ updates/s, loss [-\d.e+]+, about 1 min left",
                        [line for line in logged if line.startswith("step 3/5")][0])
    # fine-tuning's lines also count the simulator's steps
    caplog.clear()
    items = [o for o in finetune_overrides(offline_run[1], tmp_path / "ft", 2) if "enable_progress_bar" not in o]
    module, dm, trainer, ckpt_path = finetune.build(config("finetune", items), items)
    next(c for c in trainer.callbacks if isinstance(c, ProgressLines)).every_s = 0.0
    try:
        train(trainer, module, dm, ckpt_path)
    finally:
        run_lock.release()
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 17/17 (100%): ")]
    assert len(last) == 1 and last[0].endswith(f", {module.env_steps} env steps"), last
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _, _, trainer, _ = fit.build(config("fit", [*overrides, f"run_dir={tmp_path / 'in_a_terminal'}"]))
    run_lock.release()
    assert any(isinstance(c, ProgressBar) for c in trainer.callbacks)


def test_failing_final_evaluation_keeps_the_final_checkpoint(cube_single_npz, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulator crashed")

    monkeypatch.setattr(manip.envs, "make_vector_env", crash)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulator crashed"):
        run_fit(fit_overrides(cube_single_npz, run_dir, OFFLINE_STEPS, "eval.final_episodes=2"))
    assert last_step(run_dir) == OFFLINE_STEPS


def test_a_finished_command_run_again_trains_nothing_and_runs_only_a_missing_final_evaluation(cube_single_npz,
                                                                                             tmp_path, caplog):
    """A relaunched sweep: the finished run says so, and Lightning's loop runs nothing (no second final
    evaluation). Where ``eval.jsonl`` lacks the final evaluation (the first command was stopped during it, or asked
    for fewer episodes), the command runs it on the final weights, as the first command would have."""
    run_dir = tmp_path / "run"
    overrides = fit_overrides(cube_single_npz, run_dir, 5, "eval.final_episodes=1")
    run_fit(overrides)
    records = (run_dir / "eval.jsonl").read_text()
    assert len(records.splitlines()) == 1
    caplog.clear()
    trainer, _ = run_fit(overrides)
    assert trainer.global_step == 5 and (run_dir / "eval.jsonl").read_text() == records
    assert f"{run_dir / 'checkpoints' / 'last.ckpt'} is already at step 5 (trainer.max_steps=5): nothing left to " \
           f"train" in caplog.text
    assert "resuming from" not in caplog.text and "up to step" not in caplog.text  # no line says otherwise

    def outcome(record: dict) -> dict:  # what the policy did: not the time it took
        return {k: v for k, v in record.items() if k not in ("wall_s", "seconds", "chunk_latency_ms",
                                                             "action_latency_ms")}

    # its final evaluation was stopped after the last save: the same command runs it, with the same outcome
    (run_dir / "eval.jsonl").write_text("")
    caplog.clear()
    module, dm, trainer, resume = fit.build(config("fit", overrides))
    assert str(run_dir) in run_lock._HELD  # the command holds run_dir while it evaluates, as one that trains does
    try:
        train(trainer, module, dm, resume)
    finally:
        run_lock.release()
    assert f"{run_dir / 'eval.jsonl'} lacks its final evaluation (eval.final_episodes=1), which runs now" \
        in caplog.text
    assert trainer.global_step == 5 and "step 5: evaluating 1 episode (eval.final_episodes)" in caplog.text
    again = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [outcome(r) for r in again] == [outcome(json.loads(records))]
    final = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(final[k], v) for k, v in module.state_dict().items())
    assert eval_rows(run_dir) == [5, 5]  # metrics.csv: the first command's row and this one's
    # more final episodes than the run had: evaluated again; a second time, nothing
    run_fit(fit_overrides(cube_single_npz, run_dir, 5, "eval.final_episodes=2"))
    run_fit(fit_overrides(cube_single_npz, run_dir, 5, "eval.final_episodes=2"))
    assert [r["episodes"] for r in map(json.loads, (run_dir / "eval.jsonl").read_text().splitlines())] == [1, 2]


def eval_rows(run_dir: Path) -> list[int]:
    """The steps of metrics.csv's rows that hold a success rate."""
    with open(run_dir / "offline" / "metrics.csv", newline="") as f:
        return [int(float(row["step"])) for row in csv.DictReader(f) if row.get("eval/success_rate")]


# ------------------------------------------------------------------------------- settings out of range
BAD_RUN_SETTINGS = [
    ("eval.num_envs=0", "eval.num_envs must be >= 1, got 0"),
    ("eval.every_n_steps=-1", "eval.every_n_steps must be >= 0, got -1"),
    ("eval.episodes=0", "eval.episodes must be >= 1, got 0"),  # with periodic evaluation on
    ("eval.final_episodes=-1", "eval.final_episodes must be >= 0, got -1"),
    ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps must be >= 0, got -1"),
    ("algo.agent.num_samples=0", "algo.agent.num_samples must be >= 1, got 0"),
    ("algo.agent.num_samples=-2", "algo.agent.num_samples must be >= 1, got -2"),
    ("algo.horizon=0", "algo.horizon must be >= 1, got 0"),
    ("algo.agent.hidden_dims=[]", "algo.agent.hidden_dims must be a non-empty list of layer sizes, got []"),
    ("algo.agent.hidden_dims=[64,0]", "algo.agent.hidden_dims[1] must be >= 1, got 0"),
    ("algo.agent.sample_steps=0", "algo.agent.sample_steps must be >= 1, got 0"),
    ("algo.agent.boundary_fraction=1.5", "algo.agent.boundary_fraction must be in [0.0, 1.0], got 1.5"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("module.obs_norm=foo", "module.obs_norm must be standard or none, got 'foo'"),
    ("module.actor_ema=2", "module.actor_ema must be in (0, 1) or null, got 2"),
    ("module.lr=0", "module.lr must be > 0.0, got 0"),
    ("module.tau=1.5", "module.tau must be in (0.0, 1.0], got 1.5"),
    ("data.horizon=3", "data.horizon=3 but algo.horizon=5: the replay's chunks are the agent's chunks"),
    ("data.discount=0.9", "data.discount=0.9 but algo.agent.discount=0.99: the replay sums a chunk's rewards with "
                          "the discount the critic bootstraps with"),
    ("algo.agent.discount=0.9", "data.discount=0.99 but algo.agent.discount=0.9"),
    ("trainer.precision=bf16-true", "trainer.precision=bf16-true keeps the weights in half precision, which manip "
                                    "does not train (MVP's total derivative runs in float32); use "
                                    "trainer.precision=bf16-mixed: float32 weights, half-precision compute"),
]


@pytest.mark.parametrize("setting,message", BAD_RUN_SETTINGS, ids=[s for s, _ in BAD_RUN_SETTINGS])
def test_fit_refuses_a_bad_setting_by_key_before_loading_data(setting, message, cube_single_npz, tmp_path,
                                                              no_data_loading):
    run_dir = tmp_path / "run"
    periodic = ["eval.every_n_steps=2"] if setting.startswith("eval.episodes") else []
    overrides = fit_overrides(cube_single_npz, run_dir, 3, "eval.final_episodes=1", *periodic, setting)
    with pytest.raises(SettingError, match=re.escape(message)):
        run_fit(overrides)
    assert not no_data_loading and not (run_dir / "checkpoints").exists()


def test_mixed_precision_trains_with_float32_weights(cube_single_npz, tmp_path, monkeypatch):
    """``trainer.precision=bf16-mixed`` (the fast setting on a GPU): the updates compute in bfloat16 where autocast
    applies, the JVP in float32, and the weights, losses and checkpoint stay float32 and finite."""
    from manip.algos import mvp

    autocast, jvp_dtypes = [], []
    actor_loss, jvp = mvp.MVPAgent.actor_loss, mvp.mean_velocity_and_derivative

    def recording_actor_loss(self, *args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return actor_loss(self, *args, **kwargs)

    def recording_jvp(*args):
        u, dudt = jvp(*args)
        jvp_dtypes.append((u.dtype, dudt.dtype))
        return u, dudt

    monkeypatch.setattr(mvp.MVPAgent, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(mvp, "mean_velocity_and_derivative", recording_jvp)
    run_dir = tmp_path / "run"
    trainer, module = run_fit(fit_overrides(cube_single_npz, run_dir, 5, "trainer.precision=bf16-mixed"))
    assert autocast == [True] * 5 and set(jvp_dtypes) == {(torch.float32, torch.float32)}
    assert trainer.global_step == 5 and trainer.precision == "bf16-mixed"
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    losses = logged_losses(run_dir)
    assert len(losses) == 5 and all(math.isfinite(v) for pair in losses.values() for v in pair)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("algo,setting,message", [
    ("qc", "algo.agent.flow_steps=0", "algo.agent.flow_steps must be >= 1, got 0"),
    ("fql", "algo.agent.flow_steps=-1", "algo.agent.flow_steps must be >= 1, got -1"),
    ("bfn", "algo.agent.num_samples=0", "algo.agent.num_samples must be >= 1, got 0"),
])
def test_other_agents_refuse_bad_settings_by_key(algo, setting, message, cube_single_npz, tmp_path, no_data_loading):
    overrides = fit_overrides(cube_single_npz, tmp_path, 3, f"algo={algo}", setting)
    if algo == "fql":  # FQL acts with its one-step student: its agent has no num_samples
        overrides.remove("algo.agent.num_samples=4")
    with pytest.raises(SettingError, match=re.escape(message)):
        run_fit(overrides)
    assert not no_data_loading


BAD_FINETUNE_SETTINGS = [
    ("finetune.utd=0", "finetune.utd must be > 0.0, got 0"),
    ("finetune.utd=-1", "finetune.utd must be > 0.0, got -1"),
    ("finetune.target_samples=0", "finetune.target_samples must be >= 1, got 0"),
    ("finetune.offline_fraction=1.5", "finetune.offline_fraction must be in [0.0, 1.0], got 1.5"),
    ("finetune.alpha=-1", "finetune.alpha must be >= 0.0, got -1"),
    ("finetune.alpha_final=-2", "finetune.alpha_final must be >= 0.0, got -2"),
    ("finetune.start_training=-1", "finetune.start_training must be >= 0, got -1"),
    ("finetune.num_envs=0", "finetune.num_envs must be >= 1, got 0"),
    ("finetune.alpha_steps=0", "finetune.alpha_steps must be >= 1, got 0"),
    ("finetune.bc_weight=-0.5", "finetune.bc_weight must be >= 0.0, got -0.5"),
    ("finetune.prior_std=0", "finetune.prior_std must be > 0.0, got 0"),
    ("finetune.bound_std=0", "finetune.bound_std must be > 0.0, got 0"),
    ("finetune.rfm_eta=best", "finetune.rfm_eta must be a number or 'optimal', got 'best'"),
    ("+finetune.utd_ratio=2", "utd_ratio"),
    ("eval.num_envs=0", "eval.num_envs must be >= 1, got 0"),
    ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps must be >= 0, got -1"),
    ("+algo.agent.num_samples=0", "algo.agent.num_samples must be >= 1, got 0"),  # applied to the checkpoint's config
    ("trainer.precision=16-true", "use trainer.precision=16-mixed"),
]


@pytest.mark.parametrize("setting,message", BAD_FINETUNE_SETTINGS, ids=[s for s, _ in BAD_FINETUNE_SETTINGS])
def test_finetune_refuses_a_bad_setting_by_key_before_loading_data(setting, message, offline_run, tmp_path,
                                                                   no_data_loading):
    _, offline_ckpt = offline_run
    run_dir = tmp_path / "ft"
    overrides = finetune_overrides(offline_ckpt, run_dir, 5, setting)
    with pytest.raises(SettingError, match=re.escape(message)):
        run_finetune(overrides)
    assert not no_data_loading and not (run_dir / "checkpoints").exists()


# ------------------------------------------------------------------------------ the objects themselves
@pytest.mark.parametrize("kwargs,message", [
    ({"num_samples": 0}, "algo.agent.num_samples must be >= 1, got 0"),
    ({"horizon": 0}, "algo.horizon must be >= 1, got 0"),
    ({"hidden_dims": ()}, "algo.agent.hidden_dims must be a non-empty list"),
    ({"sample_steps": 0}, "algo.agent.sample_steps must be >= 1, got 0"),
    ({"num_critics": 0}, "algo.agent.num_critics must be >= 1, got 0"),
    ({"num_samples": 2.5}, "algo.agent.num_samples must be an integer >= 1, got 2.5"),
])
def test_agent_constructor_names_the_bad_key(kwargs, message):
    from manip.algos import MVPAgent

    with pytest.raises(SettingError, match=re.escape(message)):
        MVPAgent(**{"obs_dim": 3, "action_dim": 2, "horizon": 2, "hidden_dims": (8,), **kwargs})


@pytest.mark.parametrize("agent", ["FlowBoNAgent", "FQLAgent"])
def test_flow_agents_name_flow_steps(agent):
    import manip.algos

    with pytest.raises(SettingError, match="algo.agent.flow_steps must be >= 1, got 0"):
        getattr(manip.algos, agent)(obs_dim=3, action_dim=2, horizon=1, hidden_dims=(8,), flow_steps=0)


@pytest.mark.parametrize("online,message", [
    ({"utd": 0}, "finetune.utd must be > 0.0, got 0"),
    ({"target_samples": 0}, "finetune.target_samples must be >= 1, got 0"),
    ({"bound_std": -0.1}, "finetune.bound_std must be > 0.0, got -0.1"),
    ({"target": "best"}, "unknown finetune.target 'best'"),
    ({"offline_fraction": 0.5}, "unknown finetune.offline_fraction"),  # the datamodule's, not the module's
])
def test_module_online_settings_name_the_bad_key(online, message):
    from functools import partial

    from manip.algos import MVPAgent
    from manip.module import ManipModule

    agent = partial(MVPAgent, hidden_dims=(8,), num_samples=2)
    stats = {"obs_mean": [0.0] * 3, "obs_std": [1.0] * 3}
    with pytest.raises(SettingError, match=re.escape(message)):
        ManipModule(agent, obs_dim=3, action_dim=2, horizon=2, stats=stats, online=online)


def test_each_fine_tuning_target_draws_its_own_number_of_samples_unless_told(offline_run):
    """``finetune.target_samples=null`` (the default) is the target's own count: best-of-N's 32 candidates, SOM's K =
    100 score proposals, RFM's 32; the run records the number, and a number given on the command line wins."""
    from manip.module import OnlineConfig

    assert {t: OnlineConfig.from_settings({"target": t}).target_samples for t in ("bon", "som", "rfm")} == \
        {"bon": 32, "som": 100, "rfm": 32}
    assert OnlineConfig.from_settings({"target": "som", "target_samples": 8}).target_samples == 8
    ckpt = offline_run[0] / "checkpoints" / "last.ckpt"

    def recorded(*items: str) -> int:
        items = [f"ckpt={ckpt}", *items]
        return finetune.compose(config("finetune", items), items)[0].finetune.target_samples

    assert recorded("finetune.target=som") == 100 and recorded() == 32
    assert recorded("finetune.target=som", "finetune.target_samples=16") == 16


def test_integer_settings_take_integral_floats():
    """Hydra reads ``finetune.alpha_steps=1e5`` as a float: an integral one is that integer, 2.5 is not."""
    from manip.settings import check_int
    from manip.module import OnlineConfig

    config = OnlineConfig.from_settings({"alpha_steps": 1e5, "start_training": 1e3})
    assert (config.alpha_steps, config.start_training) == (100_000, 1000)
    assert isinstance(config.alpha_steps, int)
    with pytest.raises(SettingError, match=re.escape("finetune.alpha_steps must be an integer >= 1, got 2.5")):
        check_int(2.5, "finetune.alpha_steps", 1)


def test_critic_warmup_trains_the_critic_alone_for_its_first_online_updates(offline_run, tmp_path):
    """finetune.critic_warmup=N: the first N online updates leave the policy, its weight average and their Adam
    state as the checkpoint had them, while the critic learns; after them the policy trains too."""
    _, offline_ckpt = offline_run
    start = load_checkpoint(offline_ckpt)
    updates = 12

    def changed(run_dir: Path) -> dict[str, bool]:
        state, before = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"], start["state_dict"]
        # the average starts from the checkpoint's policy (which had none)
        average = {key.replace("ema_actor.module.", "agent.actor."): value for key, value in state.items()
                   if key.startswith("ema_actor.module.")}
        return {"actor": any(not torch.equal(state[key], before[key]) for key in before if key.startswith("agent.actor.")),
                "critic": any(not torch.equal(state[key], before[key]) for key in before
                              if key.startswith("agent.critic.")),
                "average": any(not torch.equal(value, before[key]) for key, value in average.items())}

    run_finetune(finetune_overrides(offline_ckpt, tmp_path / "warm", updates, f"finetune.critic_warmup={updates}",
                                    "+module.actor_ema=0.9"))
    assert changed(tmp_path / "warm") == {"actor": False, "critic": True, "average": False}
    # Adam: the actor group's parameters took no step (no momentum drift), the critic group's took one per update
    before_opt = start["optimizer_states"][0]
    after_opt = load_checkpoint(tmp_path / "warm" / "checkpoints" / "last.ckpt")["optimizer_states"][0]
    steps = [{float(after_opt["state"][i]["step"] - before_opt["state"][i]["step"]) for i in group["params"]}
             for group in after_opt["param_groups"]]
    assert {frozenset(group_steps) for group_steps in steps} == {frozenset({0.0}), frozenset({float(updates)})}
    warm = load_checkpoint(tmp_path / "warm" / "checkpoints" / "last.ckpt")["state_dict"]
    assert int(warm["ema_actor.n_averaged"]) == 1  # the checkpoint's policy only: no average update while warming
    run_finetune(finetune_overrides(offline_ckpt, tmp_path / "after", updates, f"finetune.critic_warmup={updates - 2}",
                                    "+module.actor_ema=0.9"))
    assert changed(tmp_path / "after") == {"actor": True, "critic": True, "average": True}
    after = load_checkpoint(tmp_path / "after" / "checkpoints" / "last.ckpt")
    after_opt = after["optimizer_states"][0]
    steps = [{float(after_opt["state"][i]["step"] - before_opt["state"][i]["step"]) for i in group["params"]}
             for group in after_opt["param_groups"]]
    assert {frozenset(group_steps) for group_steps in steps} == {frozenset({2.0}), frozenset({float(updates)})}
    assert int(after["state_dict"]["ema_actor.n_averaged"]) == 1 + 2  # the two updates after the warm-up
    with pytest.raises(SettingError, match=re.escape("finetune.critic_warmup must be >= 0, got -1")):
        run_finetune(finetune_overrides(offline_ckpt, tmp_path / "bad", updates, "finetune.critic_warmup=-1"))


def test_open_new_never_replaces_a_file(tmp_path, caplog):
    """A result is written to its path when that is free; where a file is there, the file is kept and the result
    goes to the first free ``<stem>.<k><suffix>``, with a warning naming both."""
    from manip.settings import open_new

    handle, path = open_new(tmp_path / "new" / "r.json")
    with handle:
        handle.write("first")
    assert path == tmp_path / "new" / "r.json" and path.read_text() == "first"
    (tmp_path / "new" / "r.1.json").write_text("also kept")
    with caplog.at_level("WARNING", logger="manip"):
        handle, second = open_new(path, binary=True)
    with handle:
        handle.write(b"second")
    assert second == tmp_path / "new" / "r.2.json" and second.read_bytes() == b"second"
    assert path.read_text() == "first" and (tmp_path / "new" / "r.1.json").read_text() == "also kept"
    assert caplog.messages == [f"{path} appeared while the command ran and is kept; writing {second} instead"]


def test_write_result_gives_a_finished_file_its_name_and_never_replaces_one(tmp_path, caplog):
    """A result appears whole under its name (written beside it first), with the permissions a plain ``open`` gives;
    a file already there is kept and the result takes the next free name."""
    from manip.settings import write_result

    first = write_result(tmp_path / "out" / "r.json", '{"a": 1}', "manip.evaluate")
    with caplog.at_level("WARNING", logger="manip"):
        second = write_result(first, '{"a": 2}', "manip.evaluate")
    assert (first, second) == (tmp_path / "out" / "r.json", tmp_path / "out" / "r.1.json")
    assert (first.read_text(), second.read_text()) == ('{"a": 1}', '{"a": 2}')
    assert sorted(p.name for p in first.parent.iterdir()) == ["r.1.json", "r.json"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~umask
    assert caplog.messages == [f"{first} exists and is kept; writing {second} instead"]


def test_fine_tuning_collects_one_env_step_per_utd_updates(offline_run, tmp_path):
    """finetune.utd=u: after finetune.start_training env steps, an env step every u updates (0.5: two per update)."""
    _, offline_ckpt = offline_run
    updates = 6
    _, module = run_finetune(finetune_overrides(offline_ckpt, tmp_path / "ft", updates, "finetune.utd=0.5"))
    assert module.env_steps == 20 + updates * 2


def test_fine_tuning_settings_reach_the_data_the_agent_and_the_evaluation(offline_run, tmp_path):
    """finetune.offline_fraction reaches the sampler, eval.seed / eval.noise_scale the evaluation, and +discount=x
    both the replay's chunk rewards (data.discount) and the agent's TD discount."""
    from manip.run import PeriodicEvaluation

    _, offline_ckpt = offline_run
    items = finetune_overrides(offline_ckpt, tmp_path / "ft", 4, "finetune.offline_fraction=0.25", "eval.seed=7",
                               "eval.noise_scale=0.5", "+discount=0.9")
    try:
        module, dm, trainer, _ = finetune.build(config("finetune", items), items)
    finally:
        run_lock.release()
    assert dm.offline_fraction == 0.25
    evaluation = next(c for c in trainer.callbacks if isinstance(c, PeriodicEvaluation))
    assert (evaluation.seed, evaluation.noise_scale) == (7, 0.5)
    assert dm.discount == module.agent.discount == 0.9


def test_module_tau_reaches_the_target_critic(cube_single_npz, tmp_path):
    """module.tau=1: after every update the target critic is a copy of the critic."""
    run_fit(fit_overrides(cube_single_npz, tmp_path / "run", 3, "module.tau=1.0"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    critic = {k.removeprefix("agent.critic."): v for k, v in state.items() if k.startswith("agent.critic.")}
    target = {k.removeprefix("agent.target_critic."): v for k, v in state.items()
              if k.startswith("agent.target_critic.")}
    assert critic and critic.keys() == target.keys()
    assert all(torch.equal(critic[k], target[k]) for k in critic)


def test_the_final_evaluation_follows_a_smaller_periodic_one_at_the_last_step(cube_single_npz, tmp_path):
    """A periodic evaluation at the last step with fewer episodes than eval.final_episodes does not stand in for
    the final one: both run."""
    run_dir = tmp_path / "run"
    run_fit(fit_overrides(cube_single_npz, run_dir, 4, "eval.every_n_steps=4", "eval.episodes=1",
                          "eval.final_episodes=2"))
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes"]) for r in records] == [(4, 1), (4, 2)]
