"""Scale and reliability: DDP gradient averaging, resume after SIGKILL (fit and finetune), atomic and
safe checkpoints, determinism, torch.compile, and the env-throughput benchmark.

Every training run uses tiny networks on the session's small cube-single file; runs that must be
killed or that launch DDP ranks are real subprocesses, the others run in-process from the same
Hydra configs the entry points compose.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from manip import finetune, fit, run_lock
from manip.checkpoint import AtomicCheckpointIO, CheckpointError, check_compatible, load_checkpoint
from manip.run import train

from entry_points import (CONF, SLURM_JOB_ENV, SUBPROCESS_ENV, config, run_dir_held, run_finetune, run_fit,
                          slurm_job_with_scontrol)

SMALL = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
         "trainer.accelerator=cpu", "eval.every_n_steps=0", "eval.final_episodes=0",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
STEPS = 100


def fit_overrides(npz: Path, run_dir: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["data=ogbench", f"data.path={npz}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            "checkpoint.every_n_steps=10", *SMALL, *extra]


def finetune_overrides(ckpt: Path, run_dir: Path) -> list[str]:
    return [f"ckpt={ckpt}", f"run_dir={run_dir}", "trainer.max_steps=60", "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=10",
            "eval.every_n_steps=0", "eval.final_episodes=0", "finetune.start_training=20",
            "finetune.target_samples=4", "+data.env_horizon=10"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a DDP rendezvous)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def wait_until_training(run_dir: Path, procs: list[subprocess.Popen], seconds: float = 180) -> None:
    """Returns once the offline run in ``run_dir`` logged its first metrics, and a second more (well inside training);
    fails where one of ``procs`` ended first or ``seconds`` passed."""
    deadline = time.time() + seconds
    while not (run_dir / "offline" / "metrics.csv").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.returncode for p in procs]
        time.sleep(0.2)
    time.sleep(1.0)


def logged_losses(run_dir: Path, phase: str = "offline") -> dict[int, tuple[float, float]]:
    """step -> (actor loss, critic loss) from metrics.csv (a later row for the same step wins)."""
    losses = {}
    with open(run_dir / phase / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/actor_loss"):
                losses[int(row["step"])] = (float(row["train/actor_loss"]), float(row["train/critic_loss"]))
    return losses


def adam_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def kill_after_checkpoint(cmd: list[str], last: Path, min_step: int, log: Path, timeout: float = 240) -> dict:
    """Start ``cmd``, SIGKILL it once ``last`` holds step >= min_step; the checkpoint it left behind."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc={proc.returncode}) before it was killed:\n{log.read_text()[-3000:]}")
            # Atomic checkpoint writes: whenever last.ckpt exists it is complete.
            if last.exists() and load_checkpoint(last)["global_step"] >= min_step:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint at step >= {min_step} within {timeout}s:\n{log.read_text()[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return load_checkpoint(last)


@pytest.fixture(scope="module")
def offline_run(cube_single_npz, tmp_path_factory) -> Path:
    """A 100-update offline run (checkpoints every 10 updates, losses logged at every update)."""
    run_dir = tmp_path_factory.mktemp("offline")
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    return run_dir


# ----------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_losses(offline_run, cube_single_npz, tmp_path):
    run_fit(fit_overrides(cube_single_npz, tmp_path / "again"))
    first, again = logged_losses(offline_run), logged_losses(tmp_path / "again")
    assert sorted(first) == list(range(1, STEPS + 1))  # a row's step is the number of updates done, as in eval rows
    assert again == first
    run_fit(fit_overrides(cube_single_npz, tmp_path / "seed1", 3, "seed=1"))
    other = logged_losses(tmp_path / "seed1")
    assert all(other[s] != first[s] for s in range(1, 4))


# --------------------------------------------------------------------------------------------- resume
def test_fit_resumes_after_sigkill(offline_run, cube_single_npz, tmp_path, caplog):
    run_dir = tmp_path / "run"
    overrides = fit_overrides(cube_single_npz, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = kill_after_checkpoint([sys.executable, "-m", "manip.fit", *overrides], last, 10, tmp_path / "fit.log")
    k = killed["global_step"]
    assert 10 <= k < STEPS and adam_steps(killed) == {k}

    trainer, _ = run_fit(overrides)  # the same command again
    assert f"resuming from {last} at step {k}" in caplog.text
    assert trainer.global_step == STEPS
    final = load_checkpoint(last)
    assert final["global_step"] == STEPS and adam_steps(final) == {STEPS}
    # Rows before the kill are kept, the resumed run continues at step k without a gap, and its
    # losses are those of the uninterrupted run (same batches, noise and optimizer state).
    assert logged_losses(run_dir) == logged_losses(offline_run)


def test_finetune_resumes_after_sigkill(offline_run, tmp_path, caplog):
    start = load_checkpoint(offline_run / "checkpoints" / "last.ckpt")["global_step"]
    run_dir = tmp_path / "ft"
    overrides = finetune_overrides(offline_run / "checkpoints" / "last.ckpt", run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = kill_after_checkpoint([sys.executable, "-m", "manip.finetune", *overrides], last, start + 10,
                                   tmp_path / "finetune.log")
    k, killed_replay = killed["global_step"], killed["manip"]["online_replay"]
    assert killed_replay["terminals"].any() and adam_steps(killed) == {k}

    module, dm, trainer, ckpt_path = finetune.build(config("finetune", overrides), overrides)
    assert ckpt_path == str(last)
    assert module.restore_random_states and dm.restore_sampler  # the resumed run continues its random states
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    assert f"resuming fine-tuning from {last}" in caplog.text
    final = load_checkpoint(last)
    assert final["global_step"] == start + 60 and adam_steps(final) == {start + 60}
    # metrics.csv's training rows count updates like the checkpoints, offline steps included.
    online_steps = sorted(logged_losses(run_dir, "online"))
    assert online_steps[-1] == start + 60 and online_steps[0] > start
    assert len(online_steps) == len(set(online_steps))
    with open(run_dir / "online" / "metrics.csv", newline="") as f:
        episode_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("online/episode_success")]
    # the first update's batch collects the finetune.start_training steps first: its episodes are rows of update 1
    assert episode_steps[0] == start + 1 and all(start < step <= start + 60 for step in episode_steps)
    # The online buffer continues where the killed run's checkpoint left it, and env steps keep
    # pace with online updates (utd = 1) from the killed run's count on.
    replay = final["manip"]["online_replay"]
    n = len(killed_replay["terminals"])
    assert len(replay["terminals"]) > n
    for key, value in killed_replay.items():
        assert torch.equal(replay[key][:n], value), key
    # A checkpoint counts the env steps of the episodes it holds: the episodes in progress are collected again.
    assert killed["manip"]["env_steps"] == n and final["manip"]["env_steps"] == len(replay["terminals"])
    assert module.env_steps >= 60 and final["manip"]["env_steps"] > n
    assert dm.replay.size == dm.replay.num_offline + len(replay["terminals"])
    # the running episode count continues from the checkpoint's, in step with the replay's episodes
    assert killed["manip"]["episodes"] == int(killed_replay["terminals"].sum())
    assert final["manip"]["episodes"] == int(replay["terminals"].sum()) > killed["manip"]["episodes"]
    # The step checkpoints leave the growing buffer to last.ckpt, which a resumed run reads.
    steps = sorted(run_dir.glob("checkpoints/step*.ckpt"))
    assert steps and all("online_replay" not in load_checkpoint(p)["manip"] for p in steps)


# ------------------------------------------------------------------------------------------------ DDP
DDP_PROBE = '''
"""Runs manip.fit's module/data/trainer under the given overrides and saves, per rank, the batches,
gradients (after DDP's all-reduce), logged losses and the weights before and after training."""
import sys

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from manip import fit

conf_dir, out_dir, *overrides = sys.argv[1:]


class Probe(L.Callback):
    def __init__(self):
        self.record = {"batches": [], "grads": [], "losses": []}

    def on_train_start(self, trainer, module):
        self.record["initial"] = {k: v.clone() for k, v in module.state_dict().items()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.record["grads"].append({n: p.grad.clone() for n, p in module.named_parameters()
                                     if p.grad is not None})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.record["batches"].append(batch["observations"].clone())
        self.record["losses"].append(float(trainer.callback_metrics["loss"]))

    def on_train_end(self, trainer, module):
        self.record["final"] = {k: v.clone() for k, v in module.state_dict().items()}
        torch.save(self.record, f"{out_dir}/rank{trainer.global_rank}.pt")


with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
    cfg = compose("fit", overrides=overrides)
module, dm, trainer, _ = fit.build(cfg)
trainer.callbacks.append(Probe())
trainer.fit(module, datamodule=dm)
'''


def test_ddp_averages_gradients_like_one_process(cube_single_npz, tmp_path):
    """2 gloo ranks vs. one process that averages the losses of both ranks' batches and noise."""
    steps = 20
    overrides = fit_overrides(cube_single_npz, tmp_path / "ddp", steps, "data.batch_size=16")
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    result = subprocess.run([sys.executable, str(probe), str(CONF), str(tmp_path), *overrides,
                             "trainer.strategy=ddp", "trainer.devices=2"],
                            capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Ranks draw different batches, end with identical weights, and the loss goes down.
    assert not torch.equal(ranks[0]["batches"][0], ranks[1]["batches"][0])
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), key
    losses = ranks[0]["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    # The checkpoints hold both ranks' sampler and noise states.
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    generators = ckpt["OGBenchDataModule"]["generators"]
    noise = ckpt["manip"]["rng"]
    assert len(generators) == len(noise) == 2
    assert not torch.equal(generators[0]["state"], generators[1]["state"])
    assert not torch.equal(noise[0]["generator"], noise[1]["generator"])

    # One process: rank r's batches and loss noise come from generators seeded with seed + r.
    cfg = config("fit", [*overrides, f"run_dir={tmp_path / 'single'}"])
    module, dm, _, _ = fit.build(cfg)
    module.load_state_dict(ranks[0]["initial"])
    opt = module.configure_optimizers()
    samplers = [torch.Generator().manual_seed(cfg.seed + r) for r in range(2)]
    noises = [torch.Generator().manual_seed(cfg.seed + r) for r in range(2)]
    for step in range(steps):
        loss = 0.0
        for r in range(2):
            batch = dm.replay.sample(dm.batch_size, samplers[r])
            assert torch.equal(batch["observations"], ranks[r]["batches"][step])
            actor_loss, critic_loss, _ = module.losses(batch, noises[r])
            loss = loss + (actor_loss + critic_loss) / 2
        opt.zero_grad()
        loss.backward()
        for name, param in module.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(ranks[0]["grads"][step][name], param.grad, rtol=1e-4, atol=1e-6)
        opt.step()
        module.agent.soft_update(module.tau)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(ranks[0]["final"][key], value, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints
def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "w": torch.ones(3)}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot save {path} at step 20 (disk full): the run stopped; "
                                                        f"{path} is kept, and the same command continues from it")):
        io.save_checkpoint({"global_step": 20, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    previous = torch.load(path, weights_only=True)
    assert previous["global_step"] == 10 and torch.equal(previous["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_incompatible_checkpoint_is_refused(offline_run, cube_single_npz):
    last = offline_run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)  # weights_only=True
    obs_dim, action_dim = ckpt["hyper_parameters"]["obs_dim"], ckpt["hyper_parameters"]["action_dim"]
    check_compatible(ckpt, last, obs_dim, action_dim, None, 5)
    with pytest.raises(CheckpointError, match=f"{last} has obs_dim={obs_dim} but the dataset x has obs_dim=29"):
        check_compatible(ckpt, last, 29, action_dim, None, 5, where="dataset x")
    # Resuming a run with a different chunk length stops before training, naming both lengths.
    with pytest.raises(CheckpointError, match=r"holds a mvp run with algo.horizon=5 \(this command: 4\)"):
        fit.build(config("fit", fit_overrides(cube_single_npz, offline_run, STEPS, "algo.horizon=4")))


# -------------------------------------------------------------------------------------------- compile
def test_compile_builds_and_runs_one_step(cube_single_npz, tmp_path):
    """module.compile with the aot_eager backend: Dynamo + AOTAutograd capture of the actor loss (JVP
    included) and of acting. Inductor's CPU code generation (module.compile=true) takes about a
    minute here for these two functions, so it is left to GPU runs."""
    trainer, module = run_fit(fit_overrides(cube_single_npz, tmp_path, 1, "module.compile=aot_eager"))
    assert trainer.global_step == 1
    chunks = module.predict_chunks(torch.zeros(2, module.obs_dim))
    assert chunks.shape == (2, 5, module.action_dim)
    obs = torch.randn(2, module.obs_dim)  # seeded noise streams (evaluation's, one per state) pass through

    def seeded(batch: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(3 + i) for i in range(batch)]

    first, again = (module.predict_chunks(obs, generator=seeded(2)) for _ in range(2))
    assert np.array_equal(first, again)
    for batch in (1, 3, 4):  # other batch sizes (envs refilling their queues) compile graphs of their own
        chunks = module.predict_chunks(torch.randn(batch, module.obs_dim), generator=seeded(batch))
        assert chunks.shape == (batch, 5, module.action_dim)
        assert module.predict_chunks(torch.randn(batch, module.obs_dim)).shape == (batch, 5, module.action_dim)


# ------------------------------------------------------------------------------------ env throughput
def test_bench_envs_measures_steps_per_second():
    from manip.bench_envs import env_spec, measure

    row = measure(env_spec("ogbench-cube-single"), workers=1, asynchronous=False, steps=5, warmup=1)
    assert row["env_steps"] == 5 and row["env_steps_per_s"] > 0


def test_ddp_fit_evaluates_on_rank_zero_and_logs_once(cube_single_npz, tmp_path):
    """``python -m manip.fit trainer.strategy=ddp trainer.devices=2`` with periodic and final evaluations: rank 0
    evaluates alone (its success metric must not wait for the other rank), and fit.log holds each line once; so it
    does when the same command runs the final evaluation a finished run lacks."""
    run_dir = tmp_path / "ddp"
    overrides = fit_overrides(cube_single_npz, run_dir, 20, "eval.every_n_steps=10", "eval.episodes=1",
                              "eval.final_episodes=2", "trainer.strategy=ddp", "trainer.devices=2")
    result = subprocess.run([sys.executable, "-m", "manip.fit", *overrides], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes"]) for r in records] == [(10, 1), (20, 1), (20, 2)]
    log = (run_dir / "fit.log").read_text()
    assert log.count("[manip][INFO] step 20: success") == 2 and log.count("training mvp on") == 1
    assert "GLOBAL_RANK: 1" not in log  # rank 1 keeps no log
    # the same command once the final evaluation is lost: nothing to train, rank 0 alone evaluates, once
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    again = subprocess.run([sys.executable, "-m", "manip.fit", *overrides], capture_output=True, text=True,
                           env=SUBPROCESS_ENV, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes"]) for r in records] == [(10, 1), (20, 1), (20, 2)]


@pytest.mark.parametrize("to", ["every process", "rank 1 alone"])
def test_sigterm_to_a_ddp_run_stops_every_process_after_the_same_update_and_saves_it(cube_single_npz, tmp_path, to):
    """A scheduler's SIGTERM reaches every process of the job, ``kill <pid>`` one: either way all DDP processes stop
    after the same update, last.ckpt holds it, and the command ends with one line and status 143 (Lightning's own
    handling ended in a gloo traceback, with nothing saved)."""
    run_dir = tmp_path / "ddp"
    overrides = fit_overrides(cube_single_npz, run_dir, 100000, "checkpoint.every_n_steps=0",
                              "trainer.strategy=ddp", "trainer.devices=2")
    proc = subprocess.Popen([sys.executable, "-m", "manip.fit", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, start_new_session=True)
    try:
        wait_until_training(run_dir, [proc])
        if to == "every process":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "manip.fit"], capture_output=True,
                                   text=True).stdout.split()
            assert len(ranks) == 1, ranks
            os.kill(int(ranks[0]), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.startswith("manip.fit: ")]
    assert len(lines) == 1 and proc.returncode == 143, stderr[-3000:]
    match = re.fullmatch(r"manip\.fit: stopped by SIGTERM at step (\d+); (.+) holds it, and the same command "
                         r"continues the run", lines[0])
    assert match and Path(match.group(2)) == run_dir / "checkpoints" / "last.ckpt", lines
    assert 0 < int(match.group(1)) == load_checkpoint(match.group(2))["global_step"]
    assert "Traceback" not in stderr


@contextlib.contextmanager
def two_task_ddp_job(npz: Path, tmp_path: Path, steps: int, *extra: str, stdout: int = subprocess.DEVNULL):
    """``manip.fit`` as a DDP job of two SLURM tasks, started as srun starts them: (the tasks, the run directory, the
    file of ``scontrol`` calls); tasks still running at the end are killed."""
    env, scontrol_calls = slurm_job_with_scontrol(tmp_path / "bin")
    env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run_dir = tmp_path / "ddp"
    overrides = fit_overrides(npz, run_dir, steps, *extra, "trainer.strategy=ddp", "trainer.devices=2")
    tasks = [subprocess.Popen([sys.executable, "-m", "manip.fit", *overrides], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
             for rank in (0, 1)]
    try:
        yield tasks, run_dir, scontrol_calls
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()


def signal_and_wait(tasks: list[subprocess.Popen], signum: int) -> list[str]:
    """Sends ``signum`` to every task; their standard error once they ended."""
    for task in tasks:
        task.send_signal(signum)
    return [task.communicate(timeout=120)[1] for task in tasks]


def test_slurm_s_warning_to_a_two_task_ddp_job_saves_the_step_and_requeues_it_once(cube_single_npz, tmp_path):
    """A DDP job of two SLURM tasks (started as srun starts them): SIGUSR1 to both stops them after the same update;
    rank 0 saves last.ckpt, requeues the job once and prints the line; both end with status 0."""
    with two_task_ddp_job(cube_single_npz, tmp_path, 100000, "checkpoint.every_n_steps=0") as (tasks, run_dir,
                                                                                                scontrol_calls):
        wait_until_training(run_dir, tasks)
        stderr = signal_and_wait(tasks, signal.SIGUSR1)
    assert [t.returncode for t in tasks] == [0, 0], [e[-2000:] for e in stderr]
    match = re.fullmatch(r"manip\.fit: stopped by SIGUSR1 at step (\d+); (.+) holds it, and SLURM job 4242 is "
                         r"requeued: its same command continues the run", stderr[0].strip().splitlines()[-1])
    assert match and int(match.group(1)) == load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert "manip.fit: " not in stderr[1] and "Traceback" not in stderr[0] + stderr[1]
    assert scontrol_calls.read_text() == "requeue 4242\n" and not list(run_dir.glob("hpc_ckpt*"))


def test_slurm_s_warning_during_a_ddp_job_s_final_evaluation_requeues_the_job_once(cube_single_npz, tmp_path):
    """Rank 0 alone evaluates after training: SIGUSR1 to both tasks then ends its evaluation (its line names the
    final checkpoint, the job is requeued once); the other task, its training done, ignores the signal. Both end
    with status 0."""
    with two_task_ddp_job(cube_single_npz, tmp_path, 5, "eval.final_episodes=150", "data.env_horizon=20",
                          stdout=subprocess.PIPE) as (tasks, run_dir, scontrol_calls):
        for line in tasks[0].stdout:
            if "step 5: evaluating 150 episodes (eval.final_episodes)" in line:
                break
        time.sleep(0.5)
        alive = [task.poll() is None for task in tasks]
        stderr = signal_and_wait(tasks, signal.SIGUSR1)
    assert [t.returncode for t in tasks] == [0, 0], [e[-2000:] for e in stderr]
    assert alive == [True, True]  # rank 1 waits for rank 0 to end
    last = run_dir / "checkpoints" / "last.ckpt"
    assert stderr[0].strip().splitlines()[-1] == (f"manip.fit: stopped by SIGUSR1 during the final evaluation; {last} "
                                                  f"holds the run's final step 5, and SLURM job 4242 is requeued: its "
                                                  f"same command runs that evaluation"), stderr[0][-2000:]
    assert "manip.fit: " not in stderr[1] and "Traceback" not in stderr[0] + stderr[1]
    assert scontrol_calls.read_text() == "requeue 4242\n" and not (run_dir / "eval.jsonl").exists()


# ----------------------------------------------------------------------------------------- divergence
def test_training_that_diverges_stops_before_saving_or_evaluating_nan_weights(cube_single_npz, tmp_path):
    """A learning rate that blows the losses up: the run stops at the first NaN / infinite loss, naming the update,
    and every checkpoint and evaluation (one per update) precedes that update."""
    from manip.module import TrainingDiverged

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged: update (\d+) had actor loss .* and critic loss "
                                               r".*; the run stopped") as diverged:
        run_fit(fit_overrides(cube_single_npz, run_dir, 50, "module.lr=1e6", "checkpoint.every_n_steps=1",
                              "eval.every_n_steps=1", "eval.episodes=1", "eval.final_episodes=1"))
    update = int(re.search(r"update (\d+)", str(diverged.value)).group(1))
    saved = sorted(int(p.stem.removeprefix("step")) for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert 1 < update < 50 and saved == list(range(1, update)), (update, saved)
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == update - 1
    evaluated = [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert evaluated == list(range(1, update))
    # without a checkpoint or an evaluation due, it stops at that update too, not at the end of training
    with pytest.raises(TrainingDiverged, match=rf"update {update} had"):
        run_fit(fit_overrides(cube_single_npz, tmp_path / "run2", 50, "module.lr=1e6", "checkpoint.every_n_steps=0"))
    assert max(logged_losses(tmp_path / "run2")) == update - 1
    # as on a GPU, the losses checked at logging steps and before saves only: the same first update is named, training
    # went on to the next check, and no checkpoint holds weights trained on its loss
    overrides = [o for o in fit_overrides(cube_single_npz, tmp_path / "run3", 50, "module.lr=1e6",
                                          "checkpoint.every_n_steps=3") if o != "trainer.log_every_n_steps=1"]
    module, dm, trainer, _ = fit.build(config("fit", [*overrides, "trainer.log_every_n_steps=7"]))
    module.check_losses_every_update = False
    try:
        with pytest.raises(TrainingDiverged, match=rf"update {update} had"):
            train(trainer, module, dm, None)
    finally:
        run_lock.release()
    # the first check at or after that update: a logging step's, before its update, or a checkpoint's, after it
    checked = next(step - 1 if step % 7 == 0 else step for step in range(update, 50) if step % 7 == 0 or step % 3 == 0)
    assert trainer.global_step == checked >= update, (update, trainer.global_step)  # trained past the bad update
    saved = sorted(int(p.stem.removeprefix("step")) for p in (tmp_path / "run3" / "checkpoints").glob("step*.ckpt"))
    assert saved == [step for step in range(3, update, 3)]


def test_a_run_that_fails_leaves_no_simulator_workers(cube_single_npz, offline_run, tmp_path):
    """The periodic evaluation's and the online collection's simulator processes are closed when the run fails
    (here: it diverges after evaluating, or after collecting), before the error leaves ``fit`` / ``finetune``: a
    --multirun sweep's next jobs do not run beside them."""
    import multiprocessing

    from manip.module import TrainingDiverged

    before = set(multiprocessing.active_children())
    with pytest.raises(TrainingDiverged):
        run_fit(fit_overrides(cube_single_npz, tmp_path / "run", 50, "module.lr=1e6", "checkpoint.every_n_steps=0",
                              "eval.every_n_steps=1", "eval.episodes=1", "eval.num_envs=2"))
    assert (tmp_path / "run" / "eval.jsonl").exists()  # it did evaluate
    left = [process for process in multiprocessing.active_children() if process not in before]
    assert not left, left
    # fine-tuning that fails after collecting: its collection simulators are closed too
    with pytest.raises(TrainingDiverged):
        run_finetune([*finetune_overrides(offline_run / "checkpoints" / "last.ckpt", tmp_path / "ft"),
                      "+module.lr=1e6", "env.num_envs=2", "finetune.start_training=2"])
    assert logged_losses(tmp_path / "ft", "online")  # it did collect and train
    left = [process for process in multiprocessing.active_children() if process not in before]
    assert not left, left


def _tiny_module():
    """A ManipModule (MVP, one 8-unit layer) whose losses the divergence check reads without training."""
    from functools import partial

    from manip.algos.mvp import MVPAgent
    from manip.module import ManipModule

    return ManipModule(partial(MVPAgent, hidden_dims=(8,)), obs_dim=3, action_dim=2, horizon=1,
                       stats={"obs_mean": [0.0] * 3, "obs_std": [1.0] * 3})


def test_losses_checked_later_still_name_the_first_non_finite_update():
    """On a GPU the losses wait on the device for a logging step, a checkpoint or an evaluation: the check then names
    the first bad update among them, and clears them."""
    from manip.module import TrainingDiverged

    module = _tiny_module()
    finite = torch.tensor(1.0)
    module._unchecked_losses = [(4, finite, finite), (5, finite, torch.tensor(float("inf"))),
                                (6, torch.tensor(float("nan")), finite)]
    with pytest.raises(TrainingDiverged, match="update 5 had actor loss 1 and critic loss inf"):
        module.raise_if_diverged()
    module._unchecked_losses = [(7, finite, finite)]
    module.raise_if_diverged()  # finite: no error, and nothing left to check
    assert module._unchecked_losses == []


def _diverged_on_one_rank(rank: int, port: int, results) -> None:
    """A DDP process of :func:`test_a_loss_that_diverges_in_one_ddp_process_stops_every_process`."""
    import torch.distributed as dist

    from manip.module import TrainingDiverged

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = _tiny_module()
        ok, bad = torch.tensor(1.0), torch.tensor(float("nan"))
        module._unchecked_losses = [(8, ok, ok), (9, ok, bad if rank == 1 else ok), (10, ok, ok)]
        try:
            module.raise_if_diverged()
            results.put((rank, None))
        except TrainingDiverged as err:
            results.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_a_loss_that_diverges_in_one_ddp_process_stops_every_process():
    """Under DDP a NaN in one process's loss (its own batch) stops every process at the same update, so that none
    waits for the others in the next gradient all-reduce; the other process says where the loss went bad."""
    import multiprocessing

    port = free_port()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_diverged_on_one_rank, args=(rank, port, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        messages = dict(results.get(timeout=120) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=60)
    assert messages[1].startswith("training diverged: update 9 had actor loss 1 and critic loss nan; ")
    assert messages[0].startswith("training diverged: update 9 had a NaN or infinite loss in another process; ")


# ------------------------------------------------------------------------------------------- full disk
def _file_size_limit(limit: int):
    """For a subprocess: files it writes end at ``limit`` bytes (writes past it fail with EFBIG, as a full disk or a
    quota fails them with ENOSPC / EDQUOT); Python ignores the SIGXFSZ that comes with it."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_and_keeps_the_last_one(cube_single_npz,
                                                                                              tmp_path):
    """A full disk (here: a file size limit) when a checkpoint is saved: the temporary file is removed, the previous
    last.ckpt is kept and still loads, and the command ends with one line naming the file, the step and the
    reason, status 1, instead of a traceback."""
    run_dir = tmp_path / "run"
    run_fit(fit_overrides(cube_single_npz, run_dir, 10))
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    done = subprocess.run([sys.executable, "-m", "manip.fit", *fit_overrides(cube_single_npz, run_dir, 30)],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300,
                          preexec_fn=_file_size_limit(len(saved) // 2))
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and re.fullmatch(
        rf"manip\.fit: cannot save {re.escape(str(run_dir / 'checkpoints'))}/step20\.ckpt at step 20 \(File too "
        rf"large\): the run stopped; {re.escape(str(last))} is kept, and the same command continues from it",
        line), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert last.read_bytes() == saved and load_checkpoint(last)["global_step"] == 10
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []


def test_run_files_that_cannot_be_written_end_the_command_in_one_line(cube_single_npz, tmp_path):
    """The run's records (dataset statistics, config, metrics) on a full disk: one line with the system's reason,
    status 1, no traceback."""
    done = subprocess.run([sys.executable, "-m", "manip.fit", *fit_overrides(cube_single_npz, tmp_path / "run", 30)],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300,
                          preexec_fn=_file_size_limit(1000))
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "manip.fit: cannot write the run's files (File too large); the checkpoints saved before, if any, are kept"
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if os.path.exists("/dev/full"):  # a real full disk under the metrics, during training
        metrics = tmp_path / "full" / "offline" / "metrics.csv"
        metrics.parent.mkdir(parents=True)
        metrics.symlink_to("/dev/full")
        done = subprocess.run([sys.executable, "-m", "manip.fit", *fit_overrides(cube_single_npz, tmp_path / "full",
                                                                                   30)],
                              capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
            f"manip.fit: cannot write the run's files in {tmp_path / 'full'} (No space left on device); the "
            f"checkpoints saved before, if any, are kept"), done.stderr[-3000:]
        assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------ one command per run_dir
def test_a_second_fit_in_a_running_run_s_directory_is_refused_and_changes_nothing(cube_single_npz, tmp_path):
    """The same command twice on one run_dir (two jobs started in the same second, a resume while the run still
    runs): the second ends with one line naming the process that holds the directory, and writes nothing there;
    once the first is gone (SIGKILL: no clean-up of its own) the run continues from its last checkpoint."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "manip.fit", *fit_overrides(cube_single_npz, run_dir, 100000)]
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
        try:
            deadline = time.time() + 120
            while not last.exists():
                assert first.poll() is None and time.time() < deadline, (tmp_path / "first.out").read_text()
                time.sleep(0.2)
            recorded = sorted(p.name for p in (run_dir / "hydra").iterdir())
            second = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
            log = (run_dir / "fit.log").read_text()
        finally:
            first.kill()
            first.wait()
    expected = (rf"manip\.fit: {re.escape(str(run_dir))} is in use by another run \(pid {first.pid} on \S+ since "
                rf"[-\d: ]+: python -m manip\.fit data=ogbench data\.path={re.escape(str(cube_single_npz))} .*\); "
                r"wait for it to end, or give this command another run_dir")
    assert second.returncode == 1 and re.fullmatch(expected, second.stderr.strip().splitlines()[-1]), second.stderr
    assert "Traceback" not in second.stderr and log.count("python -m manip.fit ") == 1  # nothing logged there
    assert "resuming" not in second.stdout  # refused before it read the run's checkpoint
    assert sorted(p.name for p in (run_dir / "hydra").iterdir()) == recorded  # no config.1.yaml of a "resume"
    step = load_checkpoint(last)["global_step"]
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, step + 5))
    assert trainer.global_step == step + 5  # the killed run's lock went with it


def test_a_second_fine_tuning_of_a_checkpoint_without_its_own_run_dir_is_refused_before_it_reads(offline_run,
                                                                                                  caplog):
    """Fine-tuning's default run_dir, ``<run>/finetune_<target>``, is the same for every command with the checkpoint's
    seed: while one runs there, another (other settings) is refused before it reads that directory or the dataset,
    and creates nothing. Another seed (``+seed=1``) has a directory of its own, ``finetune_<target>_s1``."""
    from manip.run_lock import RunDirInUse

    run_dir = offline_run / "finetune_bon"
    overrides = [o for o in finetune_overrides(offline_run / "checkpoints" / "last.ckpt", run_dir)
                 if not o.startswith("run_dir=")] + ["finetune.bc_weight=0.5"]
    with run_dir_held(run_dir, "python -m manip.finetune ckpt=last.ckpt") as holder:
        with pytest.raises(RunDirInUse, match=rf"{re.escape(str(run_dir))} is in use by another run \(pid "
                                              rf"{holder.pid} .*: python -m manip\.finetune ckpt=last\.ckpt\)"):
            finetune.build(config("finetune", overrides), overrides)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        other_seed = overrides + ["+seed=1"]
        assert finetune.compose(config("finetune", other_seed), other_seed)[0].run_dir == f"{run_dir}_s1"
    assert "fine-tuning" not in caplog.text and "transitions" not in caplog.text, caplog.text  # no data read
    shutil.rmtree(run_dir)


# ------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize(("signum", "status", "how"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_ctrl_c_during_training_saves_the_step_and_the_same_command_continues(cube_single_npz, tmp_path, signum,
                                                                              status, how):
    """The first Ctrl-C (or a scheduler's SIGTERM) ends training after the update in progress: last.ckpt at that
    step, no final evaluation, one line naming the step and status 130 (143); running the command again resumes
    from there."""
    _signal_during_fit_saves_the_step_and_resumes(cube_single_npz, tmp_path, signum, status,
                                                  rf"{how} at step (\d+); (.+) holds it, and the same command "
                                                  r"continues the run", SUBPROCESS_ENV)


def test_slurm_s_warning_signal_saves_the_step_and_requeues_the_job(cube_single_npz, tmp_path):
    """In a SLURM job, SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) stops training as SIGTERM does, then ``scontrol
    requeue <job>`` (an executable on PATH standing in for SLURM's) and status 0; Lightning's auto-requeue, which
    saves ``hpc_ckpt_1.ckpt`` from inside its signal handler, stays out."""
    env, scontrol_calls = slurm_job_with_scontrol(tmp_path / "bin")
    _signal_during_fit_saves_the_step_and_resumes(cube_single_npz, tmp_path, signal.SIGUSR1, 0,
                                                  r"stopped by SIGUSR1 at step (\d+); (.+) holds it, and SLURM job "
                                                  r"4242 is requeued: its same command continues the run", env)
    assert scontrol_calls.read_text() == "requeue 4242\n"
    assert not list((tmp_path / "run").glob("hpc_ckpt*"))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGUSR1"])
def test_a_signal_during_the_final_evaluation_leaves_it_to_the_same_command(cube_single_npz, tmp_path, signame):
    """Ctrl-C (in a SLURM job, SIGUSR1) during the final evaluation, which runs after the last save, ends it with
    one line naming the final checkpoint; SIGUSR1 also requeues the job (status 0). The same command then trains
    nothing and runs that evaluation."""
    signum = getattr(signal, signame)
    env, scontrol_calls = (slurm_job_with_scontrol(tmp_path / "bin") if signum == signal.SIGUSR1 else
                           (SUBPROCESS_ENV, None))
    run_dir = tmp_path / "run"
    overrides = fit_overrides(cube_single_npz, run_dir, 5, "eval.final_episodes=150", "data.env_horizon=20")
    proc = subprocess.Popen([sys.executable, "-m", "manip.fit", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if "step 5: evaluating 150 episodes (eval.final_episodes)" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    last = run_dir / "checkpoints" / "last.ckpt"
    how, then, status = (("interrupted", "the same command runs that evaluation", 130) if signum == signal.SIGINT else
                         ("stopped by SIGUSR1", "SLURM job 4242 is requeued: its same command runs that evaluation", 0))
    assert stderr.strip().splitlines()[-1] == (f"manip.fit: {how} during the final evaluation; {last} holds the "
                                               f"run's final step 5, and {then}"), stderr[-3000:]
    assert proc.returncode == status and "Traceback" not in stderr
    assert scontrol_calls is None or scontrol_calls.read_text() == "requeue 4242\n"
    assert not (run_dir / "eval.jsonl").exists() and load_checkpoint(last)["global_step"] == 5
    done = subprocess.run([sys.executable, "-m", "manip.fit", *overrides], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episodes"]) for r in records] == [(5, 150)]
    assert load_checkpoint(last)["global_step"] == 5 and "nothing left to train" in done.stdout


_SIGUSR1_AFTER_TRAINING = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from entry_points import run_fit
run_fit(sys.argv[2:])
os.kill(os.getpid(), signal.SIGUSR1)
print("still running")
"""


def test_slurm_s_warning_signal_after_training_has_its_default_action(cube_single_npz, tmp_path):
    """Lightning restores, after training, the SIGUSR1 handler it found when training started, which is manip's:
    that handler then acts as the signal's default (the process ends), not as a request to a finished run."""
    done = subprocess.run([sys.executable, "-c", _SIGUSR1_AFTER_TRAINING, str(Path(__file__).parent),
                           *fit_overrides(cube_single_npz, tmp_path / "run", 2)],
                          capture_output=True, text=True, env=SLURM_JOB_ENV, timeout=300)
    assert done.returncode == -signal.SIGUSR1 and "still running" not in done.stdout, done.stderr[-2000:]


def _signal_during_fit_saves_the_step_and_resumes(npz: Path, tmp_path: Path, signum: int, status: int, line: str,
                                                  env: dict) -> None:
    """``signum`` to a training ``manip.fit``: ``last.ckpt`` at the step it names in its last line (``manip.fit: `` +
    ``line``, groups: step and checkpoint), ``status``, no final evaluation; the same command then resumes."""
    run_dir = tmp_path / "run"
    overrides = fit_overrides(npz, run_dir, 100000, "eval.final_episodes=2", "checkpoint.every_n_steps=0")
    log_path = tmp_path / "fit.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "manip.fit", *overrides], stdout=log, stderr=subprocess.PIPE,
                                text=True, env=env)
        wait_until_training(run_dir, [proc], seconds=120)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    match = re.fullmatch(rf"manip\.fit: {line}", stderr.strip().splitlines()[-1])
    assert proc.returncode == status and match, stderr
    step = int(match.group(1))
    assert Path(match.group(2)) == run_dir / "checkpoints" / "last.ckpt"
    assert 0 < step < 100000 and torch.load(match.group(2), weights_only=False)["global_step"] == step
    assert "eval.final_episodes" not in log_path.read_text() and "Traceback" not in stderr
    trainer, _ = run_fit(fit_overrides(npz, run_dir, step + 5, "checkpoint.every_n_steps=0"))
    assert trainer.global_step == step + 5  # resumed, not restarted


def test_sigterm_to_the_whole_job_stops_finetuning_with_simulator_workers_and_saves(offline_run, tmp_path):
    """A scheduler's SIGTERM reaches every process of the job: the simulator workers (env.num_envs=2) leave it to
    the main process, which saves last.ckpt at the step it stopped and ends with status 143."""
    run_dir = tmp_path / "ft"
    overrides = [*finetune_overrides(offline_run / "checkpoints" / "last.ckpt", run_dir), "trainer.max_steps=100000",
                 "env.num_envs=2", "checkpoint.every_n_steps=0"]
    with open(tmp_path / "finetune.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "manip.finetune", *overrides], stdout=out,
                                stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, start_new_session=True)
        deadline = time.time() + 180
        while len(logged_losses(run_dir, "online") if (run_dir / "online" / "metrics.csv").exists() else ()) < 5:
            assert proc.poll() is None and time.time() < deadline, "fine-tuning did not start"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers, as a scheduler does
        _, stderr = proc.communicate(timeout=120)
    match = re.fullmatch(r"manip\.finetune: stopped by SIGTERM at step (\d+); (.+) holds it, and the same command "
                         r"continues the run", stderr.strip().splitlines()[-1])
    assert proc.returncode == 143 and match, stderr[-3000:]
    saved = load_checkpoint(Path(match.group(2)))
    assert saved["global_step"] == int(match.group(1)) and len(saved["manip"]["online_replay"]["terminals"]) > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_request_stops_at_the_current_batch_and_an_ignored_sigint_stays_ignored(signum):
    """The handler sets should_stop itself (a Ctrl-C during a periodic evaluation stops at that step, not one later)
    and records the signal; a process started with the signal ignored (a background job) keeps ignoring it; the
    handlers are restored."""
    import lightning as L

    from manip.run import StopOnCtrlC, stop_signal

    before = {s: signal.getsignal(s) for s in StopOnCtrlC.SIGNALS}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[callback := StopOnCtrlC()])
    callback.on_train_start(trainer, None)
    try:
        assert not trainer.should_stop and stop_signal(trainer) is None
        os.kill(os.getpid(), signum)
        time.sleep(0.1)  # the handler runs in the main thread at the next bytecode
        assert callback.requested == signum and stop_signal(trainer) == signum and trainer.should_stop
        at_once = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        assert signal.getsignal(signum) is at_once  # the next one stops at once
    finally:
        callback.teardown(trainer, None, "fit")
    assert {s: signal.getsignal(s) for s in StopOnCtrlC.SIGNALS} == before

    signal.signal(signum, signal.SIG_IGN)
    try:
        ignoring = StopOnCtrlC()
        ignoring.on_train_start(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False), None)
        assert signal.getsignal(signum) is signal.SIG_IGN
        ignoring.teardown(None, None, "fit")
    finally:
        signal.signal(signum, before[signum])


def test_ctrl_c_during_the_final_evaluation_is_recorded_after_the_last_save(tmp_path, monkeypatch):
    """The final evaluation runs after last.ckpt is saved: Ctrl-C there ends it (run_command names the checkpoint,
    and the same command runs the evaluation), and its simulators are closed."""
    from manip.run import PeriodicEvaluation, final_evaluation_interrupted

    class Env:
        closed = False

        def close(self, **kwargs):  # a vector env's close(timeout=...)
            Env.closed = True

    evaluation = PeriodicEvaluation(str(tmp_path), 0, 1, final_episodes=5)
    evaluation.env = Env()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "_evaluate", interrupted)

    class Trainer:
        checkpoint_callbacks, callbacks, world_size = [], [evaluation], 1

    evaluation.on_train_end(Trainer(), None)
    assert evaluation.final_interrupted == final_evaluation_interrupted(Trainer()) == signal.SIGINT and Env.closed
