"""The real entry points end to end: Hydra composition, fit -> checkpoint -> finetune -> evaluate."""

from __future__ import annotations

import copy
import csv
import json
import logging
import logging.handlers
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import manip
from entry_points import slurm_job_with_scontrol, warnings_logged
from manip import finetune, fit
from manip.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_module
from manip.data.errors import DatasetError
from manip.data.robomimic import DEFAULT_OBS_KEYS
from manip.logs import LOG, RunLog
from manip.run import check_command_line, run_differences
from manip.settings import SettingError

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10"]


def run(module: str, *overrides: str, timeout: int = 600) -> tuple[str, str]:
    """``python -m MODULE OVERRIDES``'s (stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, *overrides], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout, proc.stderr


def test_presets_compose():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        lift = compose("fit", overrides=["conf=robomimic_lift"])
        assert lift.data.path == "data/robomimic/lift/mh/low_dim_v15.hdf5" and lift.algo.name == "mvp"
        qc = compose("fit", overrides=["conf=robomimic_lift", "algo=qc", "trainer.max_steps=7"])
        assert qc.algo.agent._target_ == "manip.algos.flow.FlowBoNAgent" and qc.trainer.max_steps == 7
        assert qc.data.horizon == 5
        bfn = compose("fit", overrides=["conf=robomimic_can", "algo=bfn"])
        assert bfn.data.horizon == 1 and bfn.algo.agent.num_samples == 4 and bfn.data.task == "can"
        noivc = compose("fit", overrides=["algo=mvp_noivc"])
        assert noivc.algo.agent.lambda_ivc == 0.0 and noivc.algo.agent.boundary_fraction == 0.0
        for task in ("double", "triple"):
            for n in (2, 3, 4):
                cfg = compose("fit", overrides=[f"conf=ogbench_cube_{task}_task{n}"])
                assert cfg.data.dataset_name == f"cube-{task}-play-singletask-task{n}-v0"
                assert cfg.trainer.max_steps == 1_000_000


def _build_agent(cfg):
    """The composed ``cfg.algo.agent`` built with 8-unit networks for a 3-dim observation and 2-dim actions."""
    import hydra

    cfg.algo.agent.hidden_dims = [8]
    return hydra.utils.instantiate(cfg.algo.agent)(obs_dim=3, action_dim=2, horizon=cfg.algo.horizon)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONF) / "conf").glob("*.yaml")))
def test_every_algo_builds_under_every_preset(preset):
    """``conf=<preset> algo=<algo>`` gives each agent only keys it takes (a preset's algorithm-specific settings
    live in conf/tuning/<preset>_<algo>.yaml)."""
    algos = sorted(p.stem for p in (Path(CONF) / "algo").glob("*.yaml"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for algo in algos:
            cfg = compose("fit", overrides=[f"conf={preset}", f"algo={algo}"])
            assert _build_agent(cfg).act_dim_flat == 2 * cfg.algo.horizon, (preset, algo)
        for algo in ("mvp", "mvp_noivc"):  # the ablation differs from MVP in lambda_ivc alone
            lift = compose("fit", overrides=["conf=robomimic_lift", f"algo={algo}"]).algo.agent
            assert (lift.full_interval_fraction, lift.adaptive_p) == (0.5, 0.5), algo
        lift_mvp = compose("fit", overrides=["conf=robomimic_lift"])
        assert lift_mvp.algo.agent.lambda_ivc == 1.0 and "tuning" not in lift_mvp
        can = compose("fit", overrides=["conf=robomimic_can"]).algo.agent
        assert (can.full_interval_fraction, can.adaptive_p) == (0.0, None)


def test_readme_paper_loop_composes():
    """The README's paper loop (its ``paper_lift`` overrides, each algorithm it names) composes and builds."""
    import re
    import shlex

    readme = (Path(CONF).parent / "README.md").read_text()
    paper_lift = shlex.split(re.search(r"paper_lift=\(([^)]*)\)", readme).group(1))
    algos = re.search(r"for algo in ([\w ]+); do", readme).group(1).split()
    assert "mvp" in algos and len(algos) >= 4
    # MVP fine-tunes with its best-of-N target, the baselines (no critic-driven target) on the replay
    assert "target=bon; [ $algo = mvp ] || target=replay" in readme and "finetune.target=$target" in readme
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for algo in algos:
            cfg = compose("fit", overrides=["conf=robomimic_lift", f"algo={algo}", *paper_lift])
            assert cfg.trainer.max_steps == 1_000_000 and cfg.algo.agent.get("full_interval_fraction", 0.0) == 0.0
            assert cfg.algo.agent.get("adaptive_p") is None and list(cfg.algo.agent.hidden_dims) == [512] * 4
            _build_agent(cfg)


def _fit(tmp_path: Path, data: list[str], steps: int = 200) -> Path:
    run_dir = tmp_path / "run"
    out = run("manip.fit", *data, *TINY, f"run_dir={run_dir}", f"trainer.max_steps={steps}",
              "eval.every_n_steps=0", "eval.final_episodes=2", "eval.num_envs=1", f"checkpoint.every_n_steps={steps}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    _check_logs(out, run_dir / "fit.log", steps)
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and records[-1]["episodes"] == 2 and records[-1]["phase"] == "offline"
    return ckpt


def _check_logs(output: tuple[str, str], log_file: Path, step: int) -> None:
    """The run's "[manip]" lines reach stdout and, timestamped with Lightning's, its log file; import-time notices
    and advertisements do not."""
    stdout, stderr = output
    assert f"[manip] step {step}: success " in stdout and f"[manip] checkpoints in {log_file.parent}" in stdout
    log = log_file.read_text()
    assert f"[manip][INFO] step {step}: success " in log and "[manip][INFO] checkpoints in" in log
    assert "[lightning.pytorch.utilities.rank_zero][INFO] `Trainer.fit` stopped" in log
    assert f"[manip][INFO] python -m manip.{log_file.stem} " in log.splitlines()[0]  # the segment's command line
    for noise in ("No private macro file", "robosuite_models", "OpenGL_accelerate", "💡"):
        assert noise not in stdout + stderr and noise not in log, noise


def _finetune_and_check(ckpt: Path, target: str, env_steps: int, updates: int, action_dim: int,
                        noise_scale: float = 1.0) -> Path:
    out = run("manip.finetune", f"ckpt={ckpt}", f"finetune.target={target}", f"trainer.max_steps={updates}",
        f"finetune.start_training={env_steps}", "finetune.target_samples=8", "eval.every_n_steps=0",
        "eval.final_episodes=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=1000", "trainer.log_every_n_steps=10")
    run_dir = ckpt.parent.parent / f"finetune_{target}"
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    offline_step = load_checkpoint(ckpt)["global_step"]
    assert last["global_step"] == offline_step + updates
    _check_logs(out, run_dir / "finetune.log", offline_step + updates)
    log = (run_dir / "finetune.log").read_text()
    assert f"[manip][INFO] collecting {env_steps} env steps (finetune.start_training)" in log
    online = last["manip"]["online_replay"]
    # QC schedule: start_training env steps, then one env step per update; only whole episodes enter the buffer,
    # and the checkpoint counts their steps (a resumed run collects the episodes in progress again).
    assert 0 < len(online["observations"]) == last["manip"]["env_steps"] and bool(online["terminals"][-1])
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert records[-1]["phase"] == "online" and records[-1]["env_steps"] >= env_steps + updates
    assert records[-1]["noise_scale"] == noise_scale  # evaluates as the offline run did
    assert records[-1]["wall_s"] > records[-1]["seconds"] > 0
    with open(run_dir / "online" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["online/env_steps_per_s"]) for row in rows if row.get("online/env_steps_per_s")]
    assert rates and all(rate > 0 for rate in rates)
    # running totals of the online episodes: every episode that entered the replay, in the rows and the checkpoint
    totals = [(float(row["online/episodes"]), float(row["online/successes"])) for row in rows
              if row.get("online/episodes")]
    episodes = int(online["terminals"].sum())
    assert totals[-1][0] == last["manip"]["episodes"] == episodes >= 1 and 0 <= totals[-1][1] <= episodes
    assert totals[-1][1] == last["manip"]["successes"] and totals == sorted(totals)
    # Episodes are rows of their own at the update in which they ended (one simulator: the replay's k-th step is env
    # step k, and update u collects up to env step start_training + u), never repeated in other rows.
    ended_at = [offline_step + max(1, int(k) - env_steps) for k in np.flatnonzero(online["terminals"]) + 1]
    episode_rows = {int(float(row["step"])): float(row["online/episode_success"]) for row in rows
                    if row.get("online/episode_success")}
    assert sorted(episode_rows) == sorted(set(ended_at))
    assert sum(ended_at.count(step) * rate for step, rate in episode_rows.items()) == pytest.approx(totals[-1][1])
    # like fit's run directories: the dataset statistics and the composed config
    assert json.loads((run_dir / "dataset_stats.json").read_text()) == last["hyper_parameters"]["stats"]
    recorded = OmegaConf.load(run_dir / "hydra" / "config.yaml")
    assert recorded.finetune.target == target and recorded.offline_ckpt == str(ckpt.resolve())
    assert f"finetune.target={target}" in OmegaConf.load(run_dir / "hydra" / "overrides.yaml")
    module, _ = load_module(run_dir / "checkpoints" / "last.ckpt")
    chunks = module.predict_chunks(np.zeros((3, module.obs_dim), np.float32))
    assert chunks.shape == (3, module.horizon, action_dim) and np.abs(chunks).max() <= 1
    return run_dir


@pytest.mark.slow
def test_fit_finetune_robomimic_lift(lift_hdf5, tmp_path):
    ckpt = _fit(tmp_path, ["data=robomimic", f"data.path={lift_hdf5}", "eval.noise_scale=0.5"])
    fit_records = [json.loads(line) for line in (ckpt.parent.parent / "eval.jsonl").read_text().splitlines()]
    assert fit_records[-1]["noise_scale"] == 0.5
    module, cfg = load_module(ckpt)
    assert cfg["data_info"]["obs_keys"] == ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    assert cfg["env_spec"]["kind"] == "robosuite" and cfg["env_spec"]["kwargs"]["horizon"] == 300
    assert module.predict_chunks(np.zeros((2, 19), np.float32)).shape == (2, 5, 7)
    # Stats travel with the checkpoint and normalise observations.
    assert torch.allclose(module.obs_mean, torch.tensor(cfg and load_checkpoint(ckpt)["hyper_parameters"]["stats"]["obs_mean"]))
    _finetune_and_check(ckpt, "bon", env_steps=300, updates=60, action_dim=7, noise_scale=0.5)


# An extra Lightning logger from the `logger` group (as logger=wandb adds one), here one that needs no account.
EXTRA_LOGGER = ["+logger.extra._target_=lightning.pytorch.loggers.CSVLogger", "+logger.extra.save_dir=null",
                "+logger.extra.name=extra", "+logger.extra.version=0"]


def _logged_columns(run_dir: Path) -> set[str]:
    with open(run_dir / "extra" / "version_0" / "metrics.csv") as f:
        return {key for row in csv.DictReader(f) for key, value in row.items() if value}


@pytest.fixture(scope="module")
def cube_ckpt(cube_single_npz, tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("cube"), ["data=ogbench", f"data.path={cube_single_npz}", *EXTRA_LOGGER],
                steps=100)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["bon", "som", "rfm", "replay"])
def test_fit_finetune_ogbench_cube_single(cube_ckpt, target):
    run_dir = _finetune_and_check(cube_ckpt, target, env_steps=250, updates=40, action_dim=5)
    # fine-tuning keeps the checkpoint's loggers, writing into its own run directory
    assert {"train/critic_loss", "eval/success_rate", "online/env_steps_per_s"} <= _logged_columns(run_dir)


def test_logger_group_adds_loggers_that_receive_training_and_evaluation(cube_ckpt, tmp_path):
    """The `logger` entries are built next to CSV / TensorBoard with the run directory as their save_dir;
    fine-tuning inherits them from the checkpoint unless `logger=...` replaces them."""
    from manip import finetune

    fit_dir = cube_ckpt.parent.parent
    assert {"train/critic_loss", "train/actor_loss", "eval/success_rate"} <= _logged_columns(fit_dir)
    command = [f"ckpt={cube_ckpt}", f"run_dir={tmp_path / 'ft'}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        inherited = finetune.compose(compose("finetune", overrides=command), command)[0]
        dropped = finetune.compose(compose("finetune", overrides=[*command, "logger=none"]),
                                   [*command, "logger=none"])[0]
    assert inherited.logger.extra._target_ == "lightning.pytorch.loggers.CSVLogger" and not dropped.logger


def test_logger_entry_must_be_a_lightning_logger(tmp_path):
    from manip.run import build_trainer

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("fit", overrides=["+logger.bad._target_=collections.OrderedDict"])
    with pytest.raises(TypeError, match="logger.bad builds a OrderedDict, not a Lightning Logger"):
        build_trainer(cfg, tmp_path, phase="offline")


def test_wandb_logger_records_offline_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from manip.run import KeepWandbRunId, build_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("fit", overrides=["conf=robomimic_lift", "logger=wandb"])

    def wandb_logger(run_dir: Path) -> WandbLogger:
        trainer = build_trainer(cfg, run_dir, phase="offline")
        for callback in trainer.callbacks:  # a new run's id is kept once training starts
            if isinstance(callback, KeepWandbRunId):
                callback.setup(trainer, None, "fit")
        return next(logger for logger in trainer.loggers if isinstance(logger, WandbLogger))

    first = wandb_logger(tmp_path / "a")
    first.log_metrics({"eval/success_rate": 0.5}, step=1)
    assert first.save_dir == str(tmp_path / "a") and list((tmp_path / "a" / "wandb").glob("offline-run-*"))
    first.experiment.finish()
    # a resumed run (same run directory) continues the same W&B run; another run directory starts its own
    assert wandb_logger(tmp_path / "a").version == first.version == (tmp_path / "a" / "wandb_run_id").read_text()
    assert wandb_logger(tmp_path / "b").version != first.version


def test_negative_eval_noise_scale_is_rejected_by_name(tmp_path):
    from manip.run import PeriodicEvaluation

    with pytest.raises(ValueError, match=r"eval.noise_scale must be >= 0, got -1.0"):
        PeriodicEvaluation(str(tmp_path), every_n_steps=0, episodes=1, noise_scale=-1.0)


def _readme_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m manip.{fit,finetune,evaluate,export}`` command of the README's bash blocks as (module,
    overrides): continuation lines joined, ``$common`` / ``$target`` / ``<run>`` substituted, ``--multirun`` comma lists
    expanded; commands of the paper loop (``$task``, ``$algo``, ...) are left to the test above."""
    import itertools
    import re
    import shlex

    readme = (Path(CONF).parent / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        variables = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M)) | {"target": "bon"}
        for line in text.splitlines():
            match = re.match(r"\s*python -m manip\.(fit|finetune|evaluate|export) (.*)", line)
            if not match:
                continue
            args = re.sub(r"\$(common|target)\b", lambda m: variables[m.group(1)].replace("\n", " "), match.group(2))
            args = args.replace("<run>", "RUN")  # the placeholder a reader fills in
            if re.search(r"\$\w", args):
                continue
            args = [arg for arg in shlex.split(args, comments=True) if arg != "--multirun"]
            choices = [[f"{arg.split('=')[0]}={v}" for v in arg.split("=", 1)[1].split(",")]
                       if "=" in arg and "," in arg and "[" not in arg and "$" not in arg else [arg] for arg in args]
            commands += [(match.group(1), list(combo)) for combo in itertools.product(*choices)]
    return commands


def test_readme_commands_compose():
    """Each README command names keys its config has: fit's compose and build an agent, evaluate's compose, and
    finetune's own keys compose while its ``+key`` overrides of the checkpoint's config name keys fit writes."""
    from omegaconf import OmegaConf

    from manip.finetune import _COMMAND_KEYS, _OWN

    commands = _readme_commands()
    assert {module for module, _ in commands} == {"fit", "finetune", "evaluate", "export"} and len(commands) >= 15
    absent = object()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        fit_keys = compose("fit", overrides=["conf=robomimic_lift"])
        for module, overrides in commands:
            if module == "fit":
                _build_agent(compose("fit", overrides=overrides))
            elif module in ("evaluate", "export"):
                compose(module, overrides=overrides)
            else:
                own = [o for o in overrides if o.split("=")[0] in _COMMAND_KEYS or o.split(".")[0] in _OWN]
                compose("finetune", overrides=own)
                for item in set(overrides) - set(own):
                    key = item.split("=")[0].lstrip("+")
                    assert OmegaConf.select(fit_keys, key, default=absent) is not absent, (item, overrides)


def test_python_m_manip_lists_runnable_entry_points():
    import importlib.util
    import re

    out = subprocess.run([sys.executable, "-m", "manip"], capture_output=True, text=True, timeout=120, check=True).stdout
    modules = re.findall(r"python -m (manip[\w.]*)", out)
    assert {"manip.fit", "manip.finetune", "manip.evaluate", "manip.export", "manip.data.generate",
            "manip.bench"} <= set(modules)
    assert all(importlib.util.find_spec(module) is not None for module in modules), modules


# ------------------------------------------------------------------------------- user errors and run records
QUICK = [*TINY, "trainer.max_steps=2", "eval.every_n_steps=0", "eval.final_episodes=0", "checkpoint.every_n_steps=2"]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def _finetune_config(ckpt: Path, *overrides: str):
    """``finetune.compose`` of ``python -m manip.finetune ckpt=CKPT OVERRIDES`` (the config fine-tuning would run)."""
    items = [f"ckpt={ckpt}", *overrides]
    return finetune.compose(_compose("finetune", items), items)[0]


@pytest.fixture(scope="module")
def lift_run(lift_hdf5, tmp_path_factory) -> Path:
    """The run directory of a 2-update MVP fit on the lift file, started from the data root with a relative
    ``data.path``."""
    run_dir = tmp_path_factory.mktemp("lift_run") / "run"
    cwd = os.getcwd()
    os.chdir(lift_hdf5.parents[2])
    try:
        module, dm, trainer, resume = fit.build(_compose(
            "fit", ["data=robomimic", "data.path=lift/mh/low_dim_v15.hdf5", f"run_dir={run_dir}", *QUICK]))
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    finally:
        os.chdir(cwd)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    return run_dir


def test_presets_leave_eval_num_envs_to_env_num_envs():
    """``env.num_envs`` on the command line sets the evaluation's simulator processes under every preset."""
    for preset in sorted(p.stem for p in (Path(CONF) / "conf").glob("*.yaml")):
        cfg = _compose("fit", [f"conf={preset}"])
        assert OmegaConf.to_container(cfg.eval)["num_envs"] == "${env.num_envs}", preset
        assert _compose("fit", [f"conf={preset}", "env.num_envs=3"]).eval.num_envs == 3, preset
    assert _compose("fit", ["conf=robomimic_lift"]).eval.num_envs == 2
    assert _compose("fit", ["conf=ogbench_cube_single"]).eval.num_envs == 2


def test_fit_and_finetune_report_user_errors_in_one_line(tmp_path):
    """The entry points exit with status 1 and one line naming the problem; a refused fit leaves no run
    directory behind (here its default, timestamped one, nor the runs/ Hydra made above it)."""
    commands = {"fit": ["data.batch_size=0", "trainer.accelerator=cpu"],
                "finetune": [f"ckpt={tmp_path / 'missing.ckpt'}"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", f"manip.{name}", *args], cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    expected = {"fit": "manip.fit: data.batch_size must be >= 1, got 0",
                "finetune": f"manip.finetune: checkpoint not found: {tmp_path / 'missing.ckpt'}"}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, stderr
        assert stderr.strip().splitlines()[-1] == expected[name] and "Traceback" not in stderr, stderr
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(("signame", "signal_after", "ddp_rank"), [
    ("SIGINT", "import", None), ("SIGINT", "demos", None), ("SIGUSR1", "import", None), ("SIGUSR1", "demos", None),
    ("SIGUSR1", "import", 1)])
def test_ctrl_c_while_the_dataset_is_generated_ends_in_one_line_and_leaves_nothing(tmp_path, signame, signal_after,
                                                                                   ddp_rank):
    """Ctrl-C just after generation starts lands inside ``import robosuite``, where mujoco turns it into an
    ImportError; later it lands inside the scripted episodes. Either way: one line, status 130, no file. In a SLURM
    job, SIGUSR1 (its warning before the time limit) does the same, then requeues the job (status 0); in a DDP job
    every task ends, and rank 0 alone requeues it and prints the line (``ddp_rank=1``: the other task, status 0)."""
    data = tmp_path / "lift" / "mh" / "low_dim_v15.hdf5"
    env, scontrol_calls = (slurm_job_with_scontrol(tmp_path.parent / f"{tmp_path.name}_bin") if signame == "SIGUSR1"
                           else (os.environ, None))
    if ddp_rank is not None:
        env = {**env, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(ddp_rank),
               "SLURM_LOCALID": str(ddp_rank)}
    proc = subprocess.Popen([sys.executable, "-m", "manip.fit", "conf=robomimic_lift", f"data.path={data}",
                             "data.generate_demos=30", f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started = "not found: generating 30 scripted lift demos" if signal_after == "import" else "lift: 3/30 demos"
    for line in proc.stdout:
        if started in line:
            break
    time.sleep(0.3)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=120)
    expected = ((130, "manip.fit: interrupted") if signame == "SIGINT" else
                (0, "manip.fit: stopped by SIGUSR1 before training; SLURM job 4242 is requeued: its same command "
                    "starts the run"))
    if ddp_rank:
        assert proc.returncode == 0 and "manip.fit: " not in stderr, stderr
    else:
        assert (proc.returncode, stderr.strip().splitlines()[-1]) == expected, stderr
    assert "Traceback" not in stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no partial dataset, no run directory files
    assert not (tmp_path / "run").exists() or ddp_rank  # (rank 0 removes the job's empty run directory)
    if ddp_rank:
        assert not scontrol_calls.exists()  # never called
    else:
        assert scontrol_calls is None or scontrol_calls.read_text() == "requeue 4242\n"


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_ctrl_c_while_python_imports_the_command_ends_in_one_line(tmp_path, delay):
    """The first seconds of a command go to Python importing torch and Lightning, before the command handles
    Ctrl-C itself: the same one line (Python then ends the process by SIGINT, 130 in a shell), no traceback."""
    proc = subprocess.Popen([sys.executable, "-X", "utf8", "-m", "manip.fit", "conf=robomimic_lift",
                             f"data.path={tmp_path / 'lift.hdf5'}", f"run_dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 130) and stderr == "manip.fit: interrupted\n", (proc.returncode,
                                                                                               stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_during_an_import_waits_for_the_import_to_finish(tmp_path):
    """Raised inside an import, an interrupt can land in a C++ callback (torch's start-up: pybind11 aborts the
    process) or in an extension's initialisation; the commands' handler lets the import finish and raises it just
    after. Outside imports it raises at once, as Python's own handler does."""
    (tmp_path / "slow_module.py").write_text(textwrap.dedent("""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGINT)
        start = time.monotonic()
        while time.monotonic() - start < 0.3:  # still importing
            pass
        finished = True
    """))
    code = textwrap.dedent("""
        import os, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from manip.cli_args import defer_ctrl_c_during_imports
        defer_ctrl_c_during_imports()
        try:
            import slow_module
            start = time.monotonic()
            while time.monotonic() - start < 5:
                pass
            print("lost")
        except KeyboardInterrupt:
            print("after the import" if "slow_module" in sys.modules else "inside the import")
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("lost")
        except KeyboardInterrupt:
            print("at once")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.stdout.split("\n")[:2] == ["after the import", "at once"], done.stdout + done.stderr


def test_ctrl_c_in_the_generate_command_ends_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "lift.hdf5"
    proc = subprocess.Popen([sys.executable, "-m", "manip.data.generate", "robomimic", "--demos", "30",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "lift: 3/30 demos" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (130, "manip.data.generate: interrupted (no file written)\n")
    assert list(tmp_path.iterdir()) == []


def test_an_error_raised_because_of_a_ctrl_c_counts_as_the_ctrl_c():
    """mujoco's ``ImportError: initialization failed`` from an interrupted import is the interrupt, so a command
    neither blames the user's file or setting for it nor prints its traceback."""
    from manip.cli_args import interrupted_by_ctrl_c, raise_if_interrupted

    def interrupted_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ImportError("initialization failed") from err

    with pytest.raises(ImportError) as info:
        interrupted_import()
    assert interrupted_by_ctrl_c(info.value) and interrupted_by_ctrl_c(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as stopped:
        raise_if_interrupted(info.value)
    assert stopped.value.__cause__ is info.value
    plain = ImportError("no module named tvm")
    assert not interrupted_by_ctrl_c(plain)
    raise_if_interrupted(plain)  # not an interrupt: the caller reports it


def test_a_ctrl_c_in_a_foreign_call_s_argument_counts_as_the_ctrl_c():
    """ctypes reports an interrupt that lands while it converts an argument (PyOpenGL's first calls, inside
    ``import robosuite``) as ``ArgumentError: argument 1: KeyboardInterrupt``, without the interrupt chained."""
    import ctypes

    from manip.cli_args import interrupted_by_ctrl_c

    class Interrupted:
        @classmethod
        def from_param(cls, value):
            raise KeyboardInterrupt

    class Refused:
        @classmethod
        def from_param(cls, value):
            raise TypeError("KeyboardInterrupt is not a pointer")

    errors = []
    for kind in (Interrupted, Refused):
        call = ctypes.CFUNCTYPE(None, ctypes.c_int)(lambda value: None)
        call.argtypes = [kind]
        with pytest.raises(ctypes.ArgumentError) as info:
            call(1)
        errors.append(info.value)
    assert errors[0].__cause__ is None and errors[0].__context__ is None
    assert interrupted_by_ctrl_c(errors[0]) and not interrupted_by_ctrl_c(errors[1])


def test_a_ctrl_c_dropped_inside_a_destructor_still_stops_the_command():
    """A KeyboardInterrupt raised in ``__del__`` (robosuite's ``MjData.__del__``) is dropped by Python; the
    commands' hook delivers it again, without the "Exception ignored" traceback. Other such errors still print."""
    code = textwrap.dedent("""
        import signal, sys, time
        from manip.cli_args import ctrl_c_in_destructors_still_stops
        signal.signal(signal.SIGINT, signal.default_int_handler)
        class Simulation:
            def __init__(self, error): self.error = error
            def __del__(self): raise self.error
        ctrl_c_in_destructors_still_stops()
        ctrl_c_in_destructors_still_stops()  # once is enough: no second delivery
        Simulation(ValueError("freed twice"))
        start = time.monotonic()
        try:
            Simulation(KeyboardInterrupt())
            while time.monotonic() - start < 10:
                pass
            print("lost")
        except KeyboardInterrupt:
            print(f"stopped after {time.monotonic() - start:.3f} s")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("stopped after 0.0"), done.stdout + done.stderr
    assert "ValueError: freed twice" in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


def test_a_run_log_that_cannot_be_written_says_so_once(tmp_path, capfd):
    """``fit.log`` on a full disk (a link to /dev/full): one line on stderr, then the console alone; no logging
    traceback for each record, none when the log closes."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    (tmp_path / "fit.log").symlink_to("/dev/full")
    with RunLog("fit") as log:
        LOG.info("dataset line")
        log.keep_in(tmp_path)
        for step in range(3):
            LOG.info(f"step {step}")
    err = capfd.readouterr().err
    assert err == (f"[manip] cannot write {tmp_path / 'fit.log'} (No space left on device): the rest of the log is "
                   f"on the console only\n"), err


def test_run_log_keeps_the_lines_logged_before_the_run_directory_is_known(tmp_path):
    with RunLog("fit") as log:
        LOG.info("dataset line")
        assert list(tmp_path.iterdir()) == []  # nothing written before keep_in
        log.keep_in(tmp_path)
        LOG.info("evaluation line")
        log.file_only("manip.fit: an error the command reports on stderr", logging.ERROR)
    LOG.info("after the command")
    lines = (tmp_path / "fit.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "dataset line", "evaluation line", "manip.fit: an error the command reports on stderr"]
    assert lines[2].endswith("[manip][ERROR] manip.fit: an error the command reports on stderr")

    with pytest.raises(ZeroDivisionError), RunLog("fit") as log:  # a bug: its traceback joins the run's log
        log.keep_in(tmp_path)
        _ = 1 / 0
    assert "the command failed\nTraceback" in (tmp_path / "fit.log").read_text()
    with pytest.raises(SystemExit), RunLog("refused"):  # refused before the run directory: no log
        LOG.info("dataset line")
        sys.exit("manip.fit: refused")
    assert not (tmp_path / "refused.log").exists()
    root = logging.getLogger()
    assert not [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    with RunLog("rank1", enabled=False) as log:  # DDP ranks > 0 keep nothing
        assert not [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]
        log.keep_in(tmp_path)
        LOG.info("a line")
    assert not (tmp_path / "rank1.log").exists()


@pytest.mark.parametrize("overrides, error, message", [
    (["data.path=/nope/x.hdf5"], DatasetError, "Robomimic dataset not found: /nope/x.hdf5"),
    (["data.obs_keys=[robot0_eef_pos,objectt]"], DatasetError, "objectt"),
    (["data.reward_mode=foo"], DatasetError, "unknown reward_mode 'foo'"),
    (["eval.noise_scale=-1"], SettingError, "eval.noise_scale must be >= 0"),
    (["resume=maybe"], SettingError, "resume must be auto, true or false, got 'maybe'"),
    (["resume=true"], CheckpointError, "resume=true but {run_dir}/checkpoints/last.ckpt does not exist"),
    (["data.batch_size=0"], SettingError, "data.batch_size must be >= 1, got 0"),
    (["data.batch_size=-4"], SettingError, "data.batch_size must be >= 1, got -4"),
    (["data.discount=1.5"], SettingError, "data.discount must be in [0.0, 1.0], got 1.5"),
    (["algo.horizon=0"], SettingError, "algo.horizon must be >= 1, got 0"),
    (["+algo.agent.num_sample=4"], SettingError, "unknown algo.agent.num_sample; did you mean algo.agent.num_samples?"),
    (["+trainer.max_step=5"], SettingError, "unknown trainer.max_step; did you mean trainer.max_steps?"),
    (["+eval.episode=2"], SettingError, "unknown eval.episode; did you mean eval.episodes?"),
    (["+module.actor_emma=0.9"], SettingError, "unknown module.actor_emma; did you mean module.actor_ema?"),
    (["+data.batchsize=64"], SettingError, "unknown data.batchsize; did you mean data.batch_size?"),
    (["+checkpoint.every=3"], SettingError, "unknown checkpoint.every; checkpoint has every_n_steps"),
    (["+foo=1"], SettingError, "unknown foo; the config has algo, checkpoint, conf, data, discount"),
    (["env.num_envs=0"], SettingError, "env.num_envs must be >= 1, got 0"),  # the key typed, not eval.num_envs
    (["algo.agent._target_=manip.algos.mvp.MVPAgnt"], SettingError,
     "algo.agent._target_=manip.algos.mvp.MVPAgnt: manip.algos.mvp has no class MVPAgnt"),
    (["algo.agent._target_=manip.algos.mvq.MVPAgent"], SettingError,
     "algo.agent._target_=manip.algos.mvq.MVPAgent: cannot import manip.algos.mvq (No module named 'manip.algos.mvq')"),
    (["trainer._target_=Trainer"], SettingError,
     "trainer._target_ must be a dotted path package.module.Class, got 'Trainer'"),
    (["trainer.max_steps=-5"], SettingError, "trainer.max_steps must be >= -1, got -5"),
    (["trainer.max_steps=abc"], SettingError, "trainer.max_steps must be an integer >= -1, got 'abc'"),
    (["threads=-1"], SettingError, "threads must be an integer >= 1 or null (torch's default), got -1"),
    (["module.compile=no"], SettingError, "module.compile must be true, false, a torch.compile mode (default, "
                                          "reduce-overhead, max-autotune, max-autotune-no-cudagraphs) or a backend "
                                          "such as inductor, got 'no'"),
    (["module.compile=tvm"], SettingError, "module.compile=tvm: the backend does not run here ("),
    (["module.compile=3"], SettingError, "module.compile must be true, false, a torch.compile mode or a backend name, got 3"),
    (["+algo.agent.time_dim=30"], SettingError,
     "algo.agent.time_dim must be a multiple of 4 (sinusoidal features of t and of r - t), got 30"),
    (["algo=qc", "algo.agent.time_dim=3"], SettingError,
     "algo.agent.time_dim must be 1 (t itself) or an even number of sinusoidal features, got 3"),
    (["data.path={tmp}"], DatasetError, "Robomimic dataset {tmp} is a directory; data.path names the .hdf5 file"),
    (["data.task=lfit", "data.path={tmp}/lfit/mh/low_dim_v15.hdf5"], SettingError,
     "data.task='lfit': {tmp}/lfit/mh/low_dim_v15.hdf5 does not exist and the scripted generator knows only lift, "
     "can, square"),
])
def test_fit_user_errors_are_raised_before_anything_is_written(lift_hdf5, tmp_path, overrides, error, message):
    run_dir = tmp_path / "run"
    overrides = [item.format(tmp=tmp_path) for item in overrides]
    with pytest.raises(error, match=re.escape(message.format(tmp=tmp_path, run_dir=run_dir))):
        fit.build(_compose("fit", ["data=robomimic", f"data.path={lift_hdf5}", f"run_dir={run_dir}", *QUICK,
                                   *overrides]))
    assert list(tmp_path.iterdir()) == []  # no run directory, no data directory


@pytest.mark.parametrize("command, phase, args, message", [
    ("fit", "offline", ["conf=robomimic_lift", "eval.episode=2"], "unknown eval.episode; did you mean eval.episodes?"),
    ("fit", "offline", ["trainer.max_step=5"], "unknown trainer.max_step; did you mean trainer.max_steps?"),
    ("fit", "offline", ["data.batchsize=3"], "unknown data.batchsize; did you mean data.batch_size?"),
    ("fit", "offline", ["algo=qc", "algo.agent.num_sample=2"],
     "unknown algo.agent.num_sample; did you mean algo.agent.num_samples?"),
    ("fit", "offline", ["algo.agent.time_dim=32"],  # a key the agent takes that its config leaves out
     "algo.agent.time_dim is not in the config yet: set it with +algo.agent.time_dim=32"),
    ("finetune", "online", ["ckpt=x", "algo.agent.num_samples=1"],  # no run directory recorded next to x
     "algo.agent.num_samples is not a fine-tuning setting; a setting of the checkpoint's config takes a leading +: "
     "+algo.agent.num_samples=1"),
    ("finetune", "online", ["ckpt=x", "finetune.alpah=3"], "unknown finetune.alpah; did you mean finetune.alpha?"),
    ("evaluate", None, ["ckpt=x", "episode=2"], "unknown episode; did you mean episodes?"),
    ("evaluate", None, ["runs/a/checkpoints/last.ckpt"],
     "settings are key=value: for the checkpoint, ckpt=runs/a/checkpoints/last.ckpt"),
    ("finetune", "online", ["runs/a/checkpoints/last.ckpt", "finetune.target=som"],
     "settings are key=value: for the checkpoint, ckpt=runs/a/checkpoints/last.ckpt"),
    ("fit", "offline", ["robomimic_lift"], "settings are key=value (e.g. conf=robomimic_lift), got 'robomimic_lift'"),
    ("fit", "offline", ["algo=qcc"],
     "algo=qcc: conf/algo/ has no qcc.yaml; did you mean algo=qc? algo is one of bfn, fql, mvp, mvp_noivc, qc, qc_fql"),
    ("finetune", "online", ["ckpt=x", "trainer=gpu"], "trainer=gpu: conf/trainer/ has no gpu.yaml; did you mean "
                                                      "trainer=cpu? trainer is one of cpu, default"),
    ("fit", "offline", ["eval.episodes=[1"], "cannot read 'eval.episodes=[1': no viable alternative at input '[1' "
                                              "(quote a value with brackets, commas or spaces: key='[1, 2]')"),
    ("finetune", "online", ["ckpt=x", "+finetune.alpha=3"],
     "finetune.alpha is in the config already: set it without the +, finetune.alpha=3"),
    ("evaluate", None, ["ckpt=x", "+episodes=3"], "episodes is in the config already: set it without the +, episodes=3"),
    ("fit", "offline", ["seed=0,1"], "seed=0,1 is a sweep, which needs --multirun; a list is seed=[0,1], a string "
                                     "seed='0,1'"),
    ("fit", "offline", ["conf=robomimic_lift", "+module.actor_ema=0.9"],
     "module.actor_ema is in the config already: set it without the +, module.actor_ema=0.9"),
    # --multirun: every value of every sweep is checked before the first job
    ("fit", "offline", ["--multirun", "seed=0,1", "eval.episode=2"], "unknown eval.episode; did you mean eval.episodes?"),
    ("fit", "offline", ["-m", "algo=mvp,qcc", "seed=0,1"],
     "algo=qcc: conf/algo/ has no qcc.yaml; did you mean algo=qc? algo is one of bfn, fql, mvp, mvp_noivc, qc, qc_fql"),
    ("fit", "offline", ["--multirun", "seed=0,1", "trainer=default,gpu"], "trainer=gpu: conf/trainer/ has no gpu.yaml; "
                                                                        "did you mean trainer=cpu? trainer is one of cpu, default"),
    ("finetune", "online", ["--multirun", "ckpt=x,y", "finetune.target=bon,som", "finetune.alpah=3"],
     "unknown finetune.alpah; did you mean finetune.alpha?"),
    ("evaluate", None, ["--multirun", "ckpt=x,y", "+episodes=3"],
     "episodes is in the config already: set it without the +, episodes=3"),
    # --multirun: two jobs writing into one run directory (file) are refused before the first job, not after it
    ("fit", "offline", ["--multirun", "run_dir=runs/x", "data.batch_size=32,64", "seed=0,1"],
     "--multirun jobs #0 and #1 would both write to run_dir=runs/x (they differ in seed=1); give each job its own "
     "run_dir, e.g. run_dir='runs/x_${data.batch_size}_${seed}'"),
    ("fit", "offline", ["-m", "run_dir=runs/x_${seed}", "algo=mvp,qc", "seed=0,1"],
     "--multirun jobs #0 and #2 would both write to run_dir=runs/x_0 (they differ in algo=qc); give each job its own "
     "run_dir, e.g. run_dir='runs/x_${seed}_${algo.name}'"),
    # 5 x 5 x 5 jobs: more than are composed one by one; each value of each sweep is, at its number in the sweep
    ("fit", "offline", ["-m", "run_dir=runs/x_${seed}_${module.lr}", "seed=0,1,2,3,4", "data.batch_size=8,16,32,64,128",
                        "module.lr=1,2,3,4,5"],
     "--multirun jobs #0 and #5 would both write to run_dir=runs/x_0_1 (they differ in data.batch_size=16); give each "
     "job its own run_dir, e.g. run_dir='runs/x_${seed}_${module.lr}_${data.batch_size}'"),
    ("finetune", "online", ["--multirun", "ckpt=/ckpts/run/checkpoints/last.ckpt", "finetune.alpha=1,10"],
     "--multirun jobs #0 and #1 would both write to the default run_dir of ckpt=/ckpts/run/checkpoints/last.ckpt "
     "finetune.target=bon (they differ in finetune.alpha=10); give each job its own run_dir, e.g. "
     "run_dir='/ckpts/run/finetune_bon_${finetune.alpha}'"),
    ("finetune", "online", ["-m", "ckpt=/ckpts/run/checkpoints/step5000.ckpt,/ckpts/run/checkpoints/last.ckpt"],
     "--multirun jobs #0 and #1 would both write to the default run_dir of ckpt=/ckpts/run/checkpoints/last.ckpt "
     "finetune.target=bon (they differ in ckpt=/ckpts/run/checkpoints/last.ckpt); give each job its own run_dir"),
    ("finetune", "online", ["--multirun", "finetune.alpha=1,2"],
     "ckpt=PATH is required, e.g. ckpt=runs/<run>/checkpoints/last.ckpt"),
    ("evaluate", None, ["-m", "episodes=1,2"], "ckpt=PATH is required, e.g. ckpt=runs/<run>/checkpoints/last.ckpt"),
    ("evaluate", None, ["--multirun", "ckpt=x", "episodes=1,2", "out=r.json"],
     "--multirun jobs #0 and #1 would both write to out=r.json (they differ in episodes=2); give each job its own "
     "out, e.g. out='r_${episodes}.json'"),
])
def test_a_key_the_config_lacks_is_one_line_naming_the_closest_key(command, phase, args, message):
    """Hydra's own answer ("To append to your config use +eval.episode=2") would make the typo a key nothing reads."""
    with pytest.raises(SystemExit) as exit_info:
        check_command_line(command, phase, args)
    assert str(exit_info.value.code) == f"manip.{command}: {message}"


def test_finetune_answers_a_checkpoint_key_from_the_runs_recorded_config(tmp_path):
    """The checkpoint's run records its config (hydra/config.yaml): a key there takes a leading +, a typo of one is
    named with the closest key (following the + advice would be refused)."""
    (tmp_path / "hydra").mkdir()
    OmegaConf.save({"module": {"actor_ema": None, "lr": 3e-4}, "algo": {"agent": {"num_samples": 32}}},
                   tmp_path / "hydra" / "config.yaml")
    ckpt = f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}"
    for item, message in (("algo.agent.num_samples=1", "algo.agent.num_samples comes from the checkpoint's config: "
                                                      "override it with +algo.agent.num_samples=1"),
                          ("module.actorema=0.9", "unknown module.actorema; did you mean module.actor_ema?")):
        with pytest.raises(SystemExit) as exit_info:
            check_command_line("finetune", "online", [ckpt, item])
        assert str(exit_info.value.code) == f"manip.finetune: {message}"
    assert check_command_line("finetune", "online", [ckpt, "hydra.job.foo=3"]) is None  # Hydra's own key: Hydra's


@pytest.mark.parametrize("args", [["conf=robomimic_lift", "eval.episodes=2", "+algo.agent.time_dim=8"],
                                  ["hydra/job_logging=defalt"], ["--help"], ["-m", "seed=1,2"],
                                  ["--multirun", "algo=glob(*)", "seed=range(0,3)"], ["-m", "--cfg", "job", "x=1"]])
def test_command_lines_without_unknown_keys_are_left_to_hydra(args):
    assert check_command_line("fit", "offline", args) is None


@pytest.mark.parametrize(("command", "phase", "args"), [
    ("fit", "offline", ["--multirun", "data.batch_size=32,64", "seed=0,1"]),  # the default run_dir has the time in it
    ("fit", "offline", ["--multirun", "run_dir=runs/x_${hydra:job.num}", "seed=0,1"]),  # resolved by each job
    ("finetune", "online", ["--multirun", "ckpt=/c/run/checkpoints/last.ckpt", "finetune.target=bon,som"]),
    ("finetune", "online", ["--multirun", "ckpt=/c/run/checkpoints/last.ckpt", "+seed=0,1"]),
    ("finetune", "online", ["--multirun", "ckpt=/c/a/checkpoints/last.ckpt,/c/b/checkpoints/last.ckpt"]),
    ("evaluate", None, ["--multirun", "ckpt=x", "episodes=1,2"]),  # each result gets the first free name
])
def test_sweeps_whose_jobs_write_to_their_own_places_pass(command, phase, args):
    assert check_command_line(command, phase, args) is None


def test_a_refused_sweep_job_removes_only_the_directories_made_for_it(tmp_path):
    """``--multirun`` over run directories: a refused job removes the empty directories Hydra made for its own
    run_dir, up to the one that existed before the command, and never an empty directory that existed before."""
    from manip.fit import discard_if_empty

    existing = tmp_path / "kept_empty"
    existing.mkdir()
    check_command_line("fit", "offline", ["--multirun", f"run_dir={existing / 'b'},{tmp_path / 'new' / 'a'}"])
    for run_dir in (existing / "b", tmp_path / "new" / "a"):  # as Hydra makes each job's directory
        run_dir.mkdir(parents=True)
        discard_if_empty(run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept_empty"] and not any(existing.iterdir())
    # a run_dir with the time in it can name a later second by the time Hydra makes it: its new parent still goes
    check_command_line("fit", "offline", [f"run_dir={tmp_path / 'runs' / 'second_1'}"])
    (tmp_path / "runs" / "second_2").mkdir(parents=True)
    discard_if_empty(tmp_path / "runs" / "second_2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept_empty"]


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    """Hydra would stop in a traceback when it makes the run directory."""
    kept = tmp_path / "kept.txt"
    kept.write_text("kept")
    for run_dir, message in ((kept, f"run_dir={kept} is a file; name a directory for the run"),
                             (kept / "run", f"run_dir={kept / 'run'}: {kept} is a file, so the run's directory "
                                            f"cannot be made")):
        with pytest.raises(SystemExit) as exit_info:
            check_command_line("fit", "offline", [f"run_dir={run_dir}"])
        assert str(exit_info.value.code) == f"manip.fit: {message}"
    assert kept.read_text() == "kept"


def _unwritable_dir() -> Path:
    """A directory no one may make directories in, root included (sysfs refuses them)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys/kernel"))
    except OSError:
        return Path("/sys/kernel")
    pytest.skip("no directory here refuses new directories")


def test_a_run_dir_that_cannot_be_made_or_written_is_one_line(tmp_path):
    """Hydra (fit) or the run's start (finetune's default run_dir, beside its checkpoint) would stop in a
    traceback; the check leaves nothing behind where the directory can be made."""
    from manip import run_lock

    locked = _unwritable_dir()
    for command, phase, extra in (("fit", "offline", []), ("finetune", "online", ["ckpt=x.ckpt"])):
        with pytest.raises(SystemExit) as exit_info:
            check_command_line(command, phase, [f"run_dir={locked / 'a' / 'run'}", *extra])
        assert str(exit_info.value.code) == (f"manip.{command}: run_dir={locked / 'a' / 'run'}: cannot write in "
                                             f"{locked} (Operation not permitted)")
    check_command_line("fit", "offline", [f"run_dir={tmp_path / 'a' / 'run'}"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SettingError, match=re.escape(f"cannot make the run directory {locked / 'ft'} (Operation "
                                                     f"not permitted)")):
        run_lock.claim(locked / "ft", "python -m manip.finetune ckpt=x.ckpt")
    assert run_lock.held() == []


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path):
    """A result file, a benchmark's --out or a generated dataset in a directory that refuses new files: one error
    naming the path, raised before the episodes or the measurement (which would otherwise be lost at the end)."""
    import argparse

    from manip.cli_args import new_file
    from manip.data.datamodule import instantiate as instantiate_data
    from manip.data.generate import ogbench_play, robomimic_scripted
    from manip.data.generate.files import CannotWriteError
    from manip.settings import check_output

    locked = _unwritable_dir()
    reason = r"\((Operation not permitted|Permission denied)\)"
    with pytest.raises(SettingError, match=rf"^out={locked / 'r.json'}: cannot write in {locked} {reason}$"):
        check_output(locked / "r.json")
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^cannot write in {locked} {reason}$"):
        new_file(str(locked / "bench.json"))
    start = time.perf_counter()
    for generate in (lambda out: robomimic_scripted.generate("lift", out / "x.hdf5", 50, verbose=False),
                     lambda out: ogbench_play.generate("cube-single-play-v0", out / "x.npz", 50, verbose=False)):
        with pytest.raises(CannotWriteError, match=rf"^cannot write {locked / 'd'}/x\.(hdf5|npz) {reason}$"):
            generate(locked / "d")
    assert time.perf_counter() - start < 30  # refused at once, not after 50 episodes
    data = instantiate_data(_compose("fit", ["conf=robomimic_lift",
                                             f"data.path={locked}/lift/mh/low_dim_v15.hdf5"]).data)
    with pytest.raises(DatasetError, match=rf"^cannot write {locked}/lift/mh/low_dim_v15\.hdf5 {reason}, so no "
                                           r"stand-in dataset can be generated there$"):
        data.prepare_data()
    check_output(tmp_path / "r.json")  # writable: nothing left behind by the check
    new_file(str(tmp_path / "bench.json"))
    assert list(tmp_path.iterdir()) == []
    done = subprocess.run([sys.executable, "-m", "manip.data.generate", "robomimic", "--demos", "1", "--out",
                           str(locked / "x.hdf5")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and re.fullmatch(rf"manip\.data\.generate: cannot write {locked}/x\.hdf5 "
                                                 rf"{reason}\n", done.stderr), done.stderr


def test_resuming_on_another_file_at_the_runs_data_path_is_refused(lift_hdf5, tmp_path, caplog):
    """The run's checkpoint knows its data by transition count and statistics, not only by path; fine-tuning on
    other data says so."""
    import h5py

    data = tmp_path / "lift.hdf5"
    shutil.copy(lift_hdf5, data)
    command = ["data=robomimic", f"data.path={data}", f"run_dir={tmp_path / 'run'}", *QUICK]
    module, dm, trainer, resume = fit.build(_compose("fit", command))
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with h5py.File(data, "r+") as f:  # as many transitions, one reward changed
        f["data/demo_0/rewards"][0] += 1.0
    with pytest.raises(CheckpointError) as info:
        fit.build(_compose("fit", [*command, "trainer.max_steps=4"]))
    assert str(info.value) == (f"{data} is not the file {tmp_path / 'run'}'s run trained on: it has other transitions "
                               f"(observations, actions, rewards or episode ends); continue the run with its own "
                               f"data, or give this command another run_dir")
    with h5py.File(data, "r+") as f:
        n = len(f["data/demo_0/actions"])
        del f["data/demo_0"]
    with pytest.raises(CheckpointError, match=re.escape(f"it has {dm.info['num_transitions'] - n} transitions (the "
                                                        f"run's: {dm.info['num_transitions']})")):
        fit.build(_compose("fit", [*command, "trainer.max_steps=4"]))
    assert last.read_bytes() == before
    caplog.set_level(logging.WARNING)
    finetune.build(_compose("finetune", items := [f"ckpt={last}", f"+data.path={data}", "trainer.max_steps=2",
                                                  "finetune.start_training=2"]), items)
    assert (f"the replay starts from {data}, which is not the data {last} was trained on "
            f"({dm.info['num_transitions'] - n} transitions (the run's: {dm.info['num_transitions']}))"
            in warnings_logged(caplog))


@pytest.mark.parametrize("command, args", [("fit", ["conf=robomimic_lift", "eval.episode=2"]),
                                           ("finetune", ["ckpt=x", "eval.episode=2"]),
                                           ("evaluate", ["ckpt=x", "eval.episode=2"]),
                                           ("export", ["ckpt=x", "num_sample=2"])])
def test_entry_points_check_their_command_line_before_hydra(command, args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"manip.{command}", *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(manip.__file__).parent.parent)})
    expected = {"evaluate": "unknown eval.episode; did you mean episodes?",
                "export": "unknown num_sample; did you mean num_samples?"}.get(
        command, "unknown eval.episode; did you mean eval.episodes?")
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"manip.{command}: {expected}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("command", "key"), [("evaluate", "episodes"), ("export", "num_samples")])
def test_single_file_commands_refuse_an_added_key_they_do_not_read(command, key):
    from manip.settings import check_declared_settings

    with pytest.raises(SettingError, match=re.escape(f"unknown {key[:-1]}; did you mean {key}?")):
        check_declared_settings(_compose(command, ["ckpt=x", f"+{key[:-1]}=2"]), command)
    check_declared_settings(_compose(command, ["ckpt=x", f"{key}=2"]), command)


def test_a_run_dir_under_home_is_one_directory(lift_hdf5, tmp_path, monkeypatch):
    """run_dir=~/...: the run's records and Lightning's checkpoints share the expanded directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    module, dm, trainer, resume = fit.build(_compose("fit", ["data=robomimic", f"data.path={lift_hdf5}",
                                                             "run_dir='~/runs/a'", *QUICK]))
    assert trainer.default_root_dir == str(tmp_path / "runs" / "a")
    assert (tmp_path / "runs" / "a" / "dataset_stats.json").is_file() and not Path("~").exists()


def test_finetune_refuses_what_it_cannot_continue(lift_run, tmp_path):
    ckpt = lift_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(f"{lift_run} holds an offline (fit) run, not a fine-tuning "
                                                        f"run; give finetune another run_dir")):
        _finetune_config(ckpt, f"run_dir={lift_run}")
    with pytest.raises(SettingError, match=re.escape("trainer.max_steps must be >= 0, got -1")):
        _finetune_config(ckpt, f"run_dir={tmp_path / 'ft'}", "trainer.max_steps=-1")
    # step checkpoints without the last.ckpt every save writes with them: a fresh run would write over them
    (tmp_path / "ft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ft" / "checkpoints" / "step10.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'ft' / 'checkpoints'} holds step10.ckpt but no "
                                                        f"last.ckpt")):
        _finetune_config(ckpt, f"run_dir={tmp_path / 'ft'}")


def test_finetuning_an_agent_without_a_policy_target_says_what_it_trains(lift_hdf5, tmp_path, caplog):
    """QC keeps its own actor loss online whatever finetune.target says: a target given on the command line is
    answered with a warning, the default with a line."""
    module, dm, trainer, resume = fit.build(_compose("fit", ["data=robomimic", f"data.path={lift_hdf5}", "algo=qc",
                                                             f"run_dir={tmp_path / 'qc'}", *QUICK]))
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    ckpt = tmp_path / "qc" / "checkpoints" / "last.ckpt"
    line = "qc has no critic-driven policy target: it fine-tunes with its own actor loss on the replay, as "
    for items, level in ((["finetune.target=som"], logging.WARNING), ([], logging.INFO)):
        caplog.clear()
        caplog.set_level(logging.INFO)
        items = [f"ckpt={ckpt}", "trainer.max_steps=2", "finetune.start_training=2", *items]
        finetune.build(_compose("finetune", items), items)
        said = [r for r in caplog.records if r.getMessage().startswith(line)]
        assert [r.levelno for r in said] == [level], [r.getMessage() for r in caplog.records]
    assert said[0].getMessage().endswith("finetune.target=replay (finetune.target=bon applies to MVP)")


def test_fit_checkpoint_records_the_dataset_file_as_an_absolute_path(lift_run, lift_hdf5):
    cfg = load_checkpoint(lift_run / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]
    for recorded in (cfg["data_info"]["path"], cfg["data"]["path"]):
        assert Path(recorded).is_absolute() and Path(recorded).resolve() == lift_hdf5.resolve()


def test_finetune_reads_the_checkpoints_dataset_from_any_directory(lift_run, lift_hdf5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    final = _finetune_config(lift_run / "checkpoints" / "last.ckpt")
    assert Path(final.data.path).resolve() == lift_hdf5.resolve() and final.data.generate_demos == 0


def test_finetune_finds_an_old_checkpoints_relative_dataset_or_names_it(lift_run, lift_hdf5, tmp_path, monkeypatch):
    """Older checkpoints recorded ``data.path`` relative to the directory their run started from: the run's
    hydra/hydra.yaml names that directory; without it the current one is tried, and a missing file is an error
    naming it as the checkpoint's dataset (no dataset is generated in its place)."""
    ckpt = load_checkpoint(lift_run / "checkpoints" / "last.ckpt")
    cfg = ckpt["hyper_parameters"]["cfg"]
    cfg["data_info"]["path"] = cfg["data"]["path"] = "lift/mh/low_dim_v15.hdf5"
    old = tmp_path / "old_run" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(ckpt, old)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{Path.cwd() / 'lift/mh/low_dim_v15.hdf5'} does not exist: it is the dataset checkpoint {old} was "
            f"trained on")):
        _finetune_config(old)
    assert list(elsewhere.iterdir()) == []
    (old.parents[1] / "hydra").mkdir()
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(lift_hdf5.parents[2])}}}, old.parents[1] / "hydra" / "hydra.yaml")
    assert Path(_finetune_config(old).data.path).resolve() == lift_hdf5.resolve()


def test_resuming_a_run_with_another_algorithm_or_network_is_refused(lift_run, lift_hdf5):
    """The run directory's checkpoint and its recorded config stay as they were; the same command resumes."""
    recorded = (lift_run / "hydra" / "config.yaml").read_text()
    command = ["data=robomimic", f"data.path={lift_hdf5}", f"run_dir={lift_run}", "data.batch_size=32",
               "trainer.accelerator=cpu", "trainer.max_steps=4", "eval.every_n_steps=0", "eval.final_episodes=0"]
    for extra, difference in [(["algo.agent.hidden_dims=[32,32]", "algo.agent.num_samples=4"],
                               "algo.agent.hidden_dims=[64, 64] (this command: [32, 32])"),
                              (["algo=fql"], "algo.name=mvp (this command: fql)"),
                              ([*TINY, "data.reward_mode=r"], "data.reward_mode=r-1 (this command: r)"),
                              ([*TINY, "seed=1"], "seed=0 (this command: 1)")]:
        with pytest.raises(CheckpointError) as info:
            fit.build(_compose("fit", [*command, *extra]))
        assert str(info.value) == (f"{lift_run} holds a mvp run with {difference}; continue it with the run's "
                                   f"values, or give this command another run_dir")
    with pytest.raises(CheckpointError, match=re.escape(f"resume=false but {lift_run} already holds a run")):
        fit.build(_compose("fit", [*command, *TINY, "resume=false"]))
    assert (lift_run / "hydra" / "config.yaml").read_text() == recorded
    assert fit.build(_compose("fit", [*command, *TINY]))[3] == lift_run / "checkpoints" / "last.ckpt"


def test_chunk_length_mismatch_names_the_algorithms_horizon(lift_run):
    last = lift_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint {last} has horizon=5 (action chunk length) but this run's algo.horizon=1")):
        check_compatible(load_checkpoint(last), last, 19, 7, None, 1, where="dataset x")


def test_finetune_overrides_top_level_keys_of_the_checkpoints_config(lift_run):
    """``+seed`` / ``+discount`` also set the keys fit resolved from them."""
    final = _finetune_config(lift_run / "checkpoints" / "last.ckpt", "+seed=3", "+threads=2", "+discount=0.9")
    assert (final.seed, final.data.seed, final.module.seed, final.threads) == (3, 3, 3, 2)
    assert final.discount == final.data.discount == final.algo.agent.discount == 0.9
    # the collection envs follow the run's seed, so fine-tuning one checkpoint under several seeds meets other episodes
    assert final.finetune.seed == 3
    default = _finetune_config(lift_run / "checkpoints" / "last.ckpt")
    assert default.finetune.seed == default.seed == load_checkpoint(lift_run / "checkpoints" / "last.ckpt")[
        "hyper_parameters"]["cfg"]["seed"]
    assert _finetune_config(lift_run / "checkpoints" / "last.ckpt", "finetune.seed=7").finetune.seed == 7


def test_spread_names_every_key_fit_derives_from_seed_and_discount():
    found: dict[str, set[str]] = {key: set() for key in finetune.SPREAD}

    def visit(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            for top in found:
                if value == f"${{{top}}}":
                    found[top].add(f"{prefix}{key}")

    for data in ("robomimic", "ogbench"):
        for algo in sorted(p.stem for p in (Path(CONF) / "algo").glob("*.yaml")):
            visit(OmegaConf.to_container(_compose("fit", [f"data={data}", f"algo={algo}"])), "")
    assert found == {key: set(keys) for key, keys in finetune.SPREAD.items()}


def test_finetune_reads_a_checkpoint_key_as_fit_does(lift_run):
    """Hydra's grammar, not YAML 1.1: ``no`` stays a string (which the module's check then names), as in fit."""
    final = _finetune_config(lift_run / "checkpoints" / "last.ckpt", "+module.compile=no", "+module.lr=1e-4",
                             "+algo.agent.hidden_dims=[32,32]", "+module.actor_ema=null")
    assert final.module.compile == "no" and final.module.lr == 1e-4 and final.module.actor_ema is None
    assert list(final.algo.agent.hidden_dims) == [32, 32]


@pytest.mark.parametrize("override, message", [
    ("+data=ogbench", "override '+data=ogbench' would replace the checkpoint's whole 'data' section"),
    ("+algo.agent.num_sampels=2", "override '+algo.agent.num_sampels=2': the checkpoint's config has no key "
                                  "'algo.agent.num_sampels'"),
    ("+foo=1", "override '+foo=1': the checkpoint's config has no top-level key 'foo'"),
    ("+eval.episods=3", "override '+eval.episods=3': eval has no key 'episods' (its keys: every_n_steps, episodes,"),
    ("resume=maybe", "resume must be auto, true or false, got 'maybe'"),
    ("+env_spec.kwargs.horizon=15", "override '+env_spec.kwargs.horizon=15': env_spec describes the dataset and is "
                                    "read from it at every start; the simulator's episode length is set with "
                                    "+data.env_horizon=N"),
    ("+data_info.num_transitions=3", "override '+data_info.num_transitions=3': data_info describes the dataset"),
])
def test_finetune_refuses_overrides_it_cannot_apply(lift_run, override, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        _finetune_config(lift_run / "checkpoints" / "last.ckpt", override)


@pytest.mark.parametrize("value, message", [("null", "data.path=None: fine-tuning needs a dataset file"),
                                            ("DIR", "is a directory, not a dataset file")])
def test_finetune_data_path_must_be_a_file(lift_run, tmp_path, value, message):
    value = str(tmp_path) if value == "DIR" else value
    with pytest.raises(DatasetError, match=re.escape(message)):
        _finetune_config(lift_run / "checkpoints" / "last.ckpt", f"+data.path={value}")


def test_a_run_predating_an_agent_setting_resumes_with_its_default(lift_run, lift_hdf5, tmp_path):
    """A key the run's recorded config lacks (added to the agent since) is no difference; a changed one is."""
    saved = load_checkpoint(lift_run / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]
    older = copy.deepcopy(saved)
    del older["algo"]["agent"]["q_agg"]
    assert run_differences(older, saved, lift_hdf5, lift_hdf5) == []
    changed = copy.deepcopy(saved)
    changed["algo"]["agent"]["q_agg"] = "min"
    assert run_differences(saved, changed, lift_hdf5, lift_hdf5) == ["algo.agent.q_agg=mean (this command: min)"]


def test_a_checkpoint_predating_the_critic_block_setting_keeps_its_layer_order(lift_run, lift_hdf5, tmp_path):
    """Checkpoints written before ``algo.agent.critic_block`` existed hold LayerNorm-before-GELU critics: loading
    rebuilds that order (not today's default); resuming such a run asks for the run's value by name."""
    ckpt = load_checkpoint(lift_run / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["cfg"]["algo"]["agent"]["critic_block"] == "linear_gelu_norm"
    del ckpt["hyper_parameters"]["cfg"]["algo"]["agent"]["critic_block"]
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, old_run / "checkpoints" / "last.ckpt")
    old = old_run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(old)["hyper_parameters"]["cfg"]["algo"]["agent"]["critic_block"] == "linear_norm_gelu"
    module, _ = load_module(old)
    assert module.agent.critic.block == module.agent.target_critic.block == "linear_norm_gelu"
    current, _ = load_module(lift_run / "checkpoints" / "last.ckpt")
    obs, actions = torch.randn(4, module.obs_dim), torch.rand(4, module.agent.act_dim_flat) * 2 - 1
    with torch.no_grad():  # same weights, another function
        assert not torch.allclose(module.agent.critic(obs, actions), current.agent.critic(obs, actions))
    assert _finetune_config(old).algo.agent.critic_block == "linear_norm_gelu"
    command = ["data=robomimic", f"data.path={lift_hdf5}", f"run_dir={old_run}", *QUICK]
    with pytest.raises(CheckpointError, match=re.escape(
            "algo.agent.critic_block=linear_norm_gelu (this command: linear_gelu_norm)")):
        fit.build(_compose("fit", command))
    assert fit.build(_compose("fit", [*command, "algo.agent.critic_block=linear_norm_gelu"]))[3] == old


def _bare_checkpoint(agent: dict, **cfg) -> dict:
    """The least a manip checkpoint holds: weights, sizes, dataset statistics, the agent's and module's config."""
    return {"state_dict": {}, "hyper_parameters": {"obs_dim": 3, "action_dim": 2, "horizon": 5, "stats": {},
                                                   "cfg": {"algo": {"agent": agent}, "module": {}, **cfg}}}


@pytest.mark.parametrize("target, filled", [
    ("manip.algos.mvp.MVPAgent", {"critic_block": "linear_norm_gelu", "td_select": "target"}),
    ("manip.algos.flow.FlowBoNAgent", {"critic_block": "linear_norm_gelu", "td_select": "target"}),
    ("manip.algos.fql.FQLAgent", {"critic_block": "linear_norm_gelu"}),  # FQL selects no TD candidates
])
def test_settings_added_since_a_checkpoint_get_their_earlier_values_where_the_agent_takes_them(tmp_path, target,
                                                                                                 filled):
    path = tmp_path / "old.ckpt"
    torch.save(_bare_checkpoint({"_target_": target}), path)
    assert load_checkpoint(path)["hyper_parameters"]["cfg"]["algo"]["agent"] == {"_target_": target, **filled}
    torch.save(_bare_checkpoint({"_target_": target, "critic_block": "linear_gelu_norm", **(
        {"td_select": "online"} if "td_select" in filled else {})}), path)  # kept as written
    agent = load_checkpoint(path)["hyper_parameters"]["cfg"]["algo"]["agent"]
    assert agent["critic_block"] == "linear_gelu_norm" and agent.get("td_select") in (None, "online")


@pytest.mark.parametrize("checkpoint, message", [
    ({"state_dict": {}, "hyper_parameters": None}, "is not a manip checkpoint (no config / state_dict inside)"),
    # another Lightning project's checkpoint with a config of its own
    ({"state_dict": {}, "hyper_parameters": {"cfg": {"model": {"lr": 1e-3}}}},
     "is not a manip checkpoint: its hyper_parameters have no obs_dim, action_dim, horizon, stats, cfg.module, "
     "cfg.algo.agent._target_"),
    (_bare_checkpoint({"_target_": "nowhere.Agent"}), "algo.agent._target_=nowhere.Agent: cannot import nowhere"),
    (_bare_checkpoint({"_target_": "manip.algos.mvp.MVPAgent", "warp_factor": 9}),
     "its algo.agent has warp_factor, which manip.algos.mvp.MVPAgent does not take (a checkpoint of a later manip "
     "version?)"),
])
def test_checkpoints_that_manip_cannot_rebuild_are_named_in_one_line(tmp_path, checkpoint, message):
    """Refused when read, before any command builds from them (evaluate, export, finetune, a resumed fit)."""
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as info:
        load_module(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


def test_acting_commands_leave_the_runs_training_compile_setting_off(lift_run, tmp_path, monkeypatch):
    """``module.compile`` compiles the training losses (and sampling) of a run; evaluate and export act with the
    checkpoint's networks as trained and compile only when asked (``act_compile``)."""
    ckpt = torch.load(lift_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["module"]["compile"] = True
    torch.save(ckpt, tmp_path / "compiled_run.ckpt")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", refuse)
    module, cfg = load_module(tmp_path / "compiled_run.ckpt")
    assert cfg["module"]["compile"] is True
    assert module.predict_chunks(np.zeros((2, module.obs_dim), np.float32)).shape == (2, module.horizon, 7)


class _Foreign:
    """An object safe loading refuses."""


def test_files_that_are_not_manip_checkpoints_are_named_in_one_line(tmp_path):
    stats = tmp_path / "dataset_stats.json"
    stats.write_text(json.dumps({"obs_mean": [0.0]}))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "thing": _Foreign()}, foreign)
    npz = tmp_path / "cube-single-play-v0.npz"
    np.savez_compressed(npz, observations=np.zeros((2, 3)), actions=np.zeros((2, 1)))
    expected = {stats: f"{stats} is not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with ",
                npz: f"{npz} is not a PyTorch checkpoint (a zip archive of observations.npy, actions.npy, without "
                     f"torch's data.pkl (a NumPy .npz?))",
                foreign: f"cannot read checkpoint {foreign}: it holds a {_Foreign.__module__}._Foreign object, "
                         f"which loading with weights_only=True refuses"}
    pickled = tmp_path / "foreign.pkl"  # a pickle of another protocol: torch's warning would precede the line
    pickled.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    expected[pickled] = f"{pickled} is not a PyTorch checkpoint (a pickle torch cannot read safely"
    for path, start in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(start) and "\n" not in message
        assert len(message.replace(str(path), "<path>")) < 200  # one short line, however long the path


def test_lightning_lines_about_absent_hardware_are_dropped(caplog):
    """A refused command on a CPU machine is one line: Lightning's "TPU available: False" lines are dropped, the
    lines for hardware a machine has are kept."""
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        for line in ("GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
                     "HPU available: False, using: 0 HPUs", "GPU available: True (cuda), used: True",
                     "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]"):
            lightning_log.info(line)
    assert [record.getMessage() for record in caplog.records] == ["GPU available: True (cuda), used: True"]


@pytest.mark.parametrize("after_ctrl_c", [False, True])
def test_finalizer_errors_after_a_ctrl_c_do_not_follow_the_commands_line(after_ctrl_c):
    """An interrupt landing inside a library's constructor (llvmlite's, under numba) leaves objects whose __del__
    fails at exit: after a Ctrl-C those "Exception ignored" tracebacks are not printed after manip's one line."""
    code = ("from manip.run import quiet_finalizers\n"
            f"if {after_ctrl_c}: quiet_finalizers()\n"
            "class HalfBuilt:\n"
            "    def __del__(self): raise AttributeError('no _as_parameter_')\n"
            "keep = HalfBuilt()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert ("Exception ignored" in proc.stderr) is not after_ctrl_c, proc.stderr


KEYS = list(DEFAULT_OBS_KEYS)


def _ckpt(obs_keys):
    return {"hyper_parameters": {"obs_dim": 19, "action_dim": 7, "horizon": 5,
                                 "cfg": {"data_info": {"obs_keys": obs_keys}}}}


def test_check_compatible_refuses_other_observation_keys():
    """Same width, other order of keys: the columns mean other things, so the checkpoint is refused."""
    check_compatible(_ckpt(KEYS), "c.ckpt", 19, 7, list(KEYS), 5)
    swapped = [KEYS[1], KEYS[0], *KEYS[2:]]
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint c.ckpt has obs_keys={KEYS} but the dataset x has "
                                                        f"obs_keys={swapped}")):
        check_compatible(_ckpt(KEYS), "c.ckpt", 19, 7, swapped, 5, where="dataset x")
    check_compatible(_ckpt(None), "c.ckpt", 19, 7, swapped, 5)  # an OGBench checkpoint records no keys


def test_a_checkpoint_missing_weights_is_refused_by_name(lift_run, tmp_path):
    ckpt = torch.load(lift_run / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(iter(ckpt["state_dict"]))
    del ckpt["state_dict"][name]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit the network its config describes"):
        load_module(tmp_path / "partial.ckpt")


def test_acting_noise_scale_defaults_to_the_runs_eval_noise_scale(lift_run, tmp_path):
    """evaluate / export without noise_scale act with the run's eval.noise_scale (0.25 here: fit.yaml's default, 1.0,
    is also the fallback for a run that records none)."""
    from manip.checkpoint import load_acting_module

    ckpt = torch.load(lift_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["eval"]["noise_scale"] = 0.25
    torch.save(ckpt, tmp_path / "quarter.ckpt")
    assert load_acting_module(tmp_path / "quarter.ckpt")[2] == 0.25
    assert load_acting_module(tmp_path / "quarter.ckpt", noise_scale=0.0)[2] == 0.0
