"""The real entry points end to end: Hydra composition, fit -> checkpoint -> finetune -> evaluate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from manip.checkpoint import load_checkpoint, load_module

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10"]


def run(module: str, *overrides: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *overrides], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


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
    paper_lift = shlex.split(re.search(r'paper_lift="([^"]*)"', readme).group(1))
    algos = re.search(r"for algo in ([\w ]+); do", readme).group(1).split()
    assert "mvp" in algos and len(algos) >= 4
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for algo in algos:
            cfg = compose("fit", overrides=["conf=robomimic_lift", f"algo={algo}", *paper_lift])
            assert cfg.trainer.max_steps == 1_000_000 and cfg.algo.agent.get("full_interval_fraction", 0.0) == 0.0
            assert cfg.algo.agent.get("adaptive_p") is None
            _build_agent(cfg)


def _fit(tmp_path: Path, data: list[str], steps: int = 200) -> Path:
    run_dir = tmp_path / "run"
    run("manip.fit", *data, *TINY, f"run_dir={run_dir}", f"trainer.max_steps={steps}",
        "eval.every_n_steps=0", "eval.final_episodes=2", "eval.num_envs=1", f"checkpoint.every_n_steps={steps}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and records[-1]["episodes"] == 2 and records[-1]["phase"] == "offline"
    return ckpt


def _finetune_and_check(ckpt: Path, target: str, env_steps: int, updates: int, action_dim: int,
                        noise_scale: float = 1.0) -> Path:
    run("manip.finetune", f"ckpt={ckpt}", f"finetune.target={target}", f"trainer.max_steps={updates}",
        f"finetune.start_training={env_steps}", "finetune.target_samples=8", "eval.every_n_steps=0",
        "eval.final_episodes=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=1000", "trainer.log_every_n_steps=10")
    run_dir = ckpt.parent.parent / f"finetune_{target}"
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    offline_step = load_checkpoint(ckpt)["global_step"]
    assert last["global_step"] == offline_step + updates
    online = last["manip"]["online_replay"]
    # QC schedule: start_training env steps, then one env step per update; only whole episodes enter the buffer.
    assert last["manip"]["env_steps"] >= env_steps + updates
    assert 0 < len(online["observations"]) <= last["manip"]["env_steps"] and bool(online["terminals"][-1])
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert records[-1]["phase"] == "online" and records[-1]["env_steps"] >= env_steps
    assert records[-1]["noise_scale"] == noise_scale  # evaluates as the offline run did
    assert records[-1]["wall_s"] > records[-1]["seconds"] > 0
    with open(run_dir / "online" / "metrics.csv") as f:
        rates = [float(row["online/env_steps_per_s"]) for row in csv.DictReader(f)
                 if row.get("online/env_steps_per_s")]
    assert rates and all(rate > 0 for rate in rates)
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
@pytest.mark.parametrize("target", ["bon", "som", "rfm"])
def test_fit_finetune_ogbench_cube_single(cube_ckpt, target):
    run_dir = _finetune_and_check(cube_ckpt, target, env_steps=250, updates=40, action_dim=5)
    # fine-tuning keeps the checkpoint's loggers, writing into its own run directory
    assert {"train/critic_loss", "eval/success_rate", "online/env_steps_per_s"} <= _logged_columns(run_dir)


def test_logger_group_adds_loggers_that_receive_training_and_evaluation(cube_ckpt):
    """The `logger` entries are built next to CSV / TensorBoard with the run directory as their save_dir;
    fine-tuning inherits them from the checkpoint unless `logger=...` replaces them."""
    from manip import finetune

    fit_dir = cube_ckpt.parent.parent
    assert {"train/critic_loss", "train/actor_loss", "eval/success_rate"} <= _logged_columns(fit_dir)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        inherited = finetune.compose(compose("finetune", overrides=[f"ckpt={cube_ckpt}"]), [f"ckpt={cube_ckpt}"])[0]
        dropped = finetune.compose(compose("finetune", overrides=[f"ckpt={cube_ckpt}", "logger=none"]),
                                   [f"ckpt={cube_ckpt}", "logger=none"])[0]
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

    from manip.run import build_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("fit", overrides=["conf=robomimic_lift", "logger=wandb"])

    def wandb_logger(run_dir: Path) -> WandbLogger:
        trainer = build_trainer(cfg, run_dir, phase="offline")
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
    """Every ``python -m manip.{fit,finetune,evaluate}`` command of the README's bash blocks as (module,
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
            match = re.match(r"\s*python -m manip\.(fit|finetune|evaluate) (.*)", line)
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
    assert {module for module, _ in commands} == {"fit", "finetune", "evaluate"} and len(commands) >= 15
    absent = object()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        fit_keys = compose("fit", overrides=["conf=robomimic_lift"])
        for module, overrides in commands:
            if module == "fit":
                _build_agent(compose("fit", overrides=overrides))
            elif module == "evaluate":
                compose("evaluate", overrides=overrides)
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
    assert {"manip.fit", "manip.finetune", "manip.evaluate", "manip.data.generate", "manip.bench"} <= set(modules)
    assert all(importlib.util.find_spec(module) is not None for module in modules), modules
