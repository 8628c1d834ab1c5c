"""Offline training: ``python -m manip.fit conf=robomimic_lift [overrides]``.

With ``resume=auto`` (the default) a run whose ``run_dir`` already holds ``checkpoints/last.ckpt``
continues from it (global step, optimizer, RNG and sampler states); ``resume=true`` insists on it,
``resume=false`` insists on a fresh run (refused where ``run_dir`` already holds one). Resuming is refused when the
command's algorithm, data settings, dataset file or transitions, ``module.obs_norm`` or seed differ from the run's
(``run_differences``, ``data_difference``). Multi-process training: ``trainer.strategy=ddp trainer.devices=N``.

A user error (a setting out of range, a missing or malformed dataset, an incompatible checkpoint or
simulator) ends the command with one line, ``manip.fit: <message>``, and a non-zero exit status. The
settings, the resume target and the dataset are checked before anything is written to ``run_dir``; the
composed Hydra config (``<run_dir>/hydra/``) and the dataset statistics are written once they passed, and
a run directory left empty by a refused command is removed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from manip import run_lock, sweep
from manip.checkpoint import check_compatible, load_checkpoint
from manip.data.datamodule import ReplayDataModule, absolute
from manip.data.datamodule import instantiate as instantiate_data
from manip.logs import LOG
from manip.module import ManipModule
from manip.run import (build_trainer, check_command_line, check_same_data, check_same_run, check_steps_left,
                       command_line, keep_run_ids, plain, record_config, resume_path, run_command, run_info,
                       seed_everything)
from manip.settings import check_int

# Lightning's DDP launcher re-runs the command with this job name (and the launcher's hydra.run.dir).
_DDP_CHILD_JOB = "train_ddp_process_"

# fit.yaml's hydra.sweep.subdir: each --multirun job's Hydra output (fit.log) goes to its own run_dir.
OmegaConf.register_new_resolver("manip.abspath", lambda path: os.path.abspath(str(path)), replace=True)


def run_dir_of(cfg: DictConfig) -> Path:
    """``cfg.run_dir``; in a process started by Lightning's DDP launcher, the launching process's run
    directory (its hydra.run.dir), so that a timestamped default names one directory for all ranks."""
    if HydraConfig.initialized() and HydraConfig.get().job.name.startswith(_DDP_CHILD_JOB):
        return Path(HydraConfig.get().run.dir)
    return Path(cfg.run_dir).expanduser()  # as Lightning's default_root_dir, which expands it


def build(cfg: DictConfig) -> tuple[ManipModule, ReplayDataModule, L.Trainer, Path | None]:
    """Module, data, trainer and the checkpoint to resume from (None: a fresh run).

    Checks run cheapest first and before anything is written: ``resume``, the data settings, the run
    directory's checkpoint against this command, the trainer / evaluation / agent settings, then the
    dataset itself. Writes ``dataset_stats.json`` and ``hydra/`` into ``run_dir`` last (main process)."""
    composed = copy.deepcopy(cfg)  # as Hydra composed it, for hydra/config.yaml
    seed_everything(check_int(cfg.seed, "seed", 0), cfg.get("threads"))
    run_dir = run_dir_of(cfg)
    cfg.run_dir = str(run_dir)
    main_process = rank_zero_only.rank == 0  # known before fit (the launcher's env), unlike trainer ranks
    if main_process:  # another command still running in run_dir: refused before its files are read
        run_lock.check_free(run_dir, command_line("fit"))
    resume = resume_path(cfg.resume, run_dir)
    max_steps = cfg.trainer.max_steps
    if isinstance(max_steps, float) and max_steps.is_integer():  # Hydra reads trainer.max_steps=1e4 as 10000.0
        cfg.trainer.max_steps = int(max_steps)
    check_int(cfg.algo.horizon, "algo.horizon", 1)  # before data.horizon, which repeats it
    dm = instantiate_data(cfg.data)  # checks the data settings; reads nothing yet
    data_file = absolute(dm.path)
    OmegaConf.update(cfg, "data.path", str(data_file), force_add=True)  # recorded absolute in the checkpoint
    ckpt, finished = None, False
    if resume is not None:
        ckpt = load_checkpoint(resume)
        check_same_run(ckpt, resume, plain(cfg), data_file, run_dir)
        if isinstance(cfg.trainer.max_steps, int):  # else build_trainer names the bad value
            finished = check_steps_left(ckpt, resume, cfg.trainer.max_steps,
                                        f"trainer.max_steps={cfg.trainer.max_steps}", run_dir, cfg.eval.final_episodes)
    trainer = build_trainer(cfg, run_dir, phase="offline")  # before the data: a bad setting costs no loading
    dm.prepare_data()
    dm.setup("fit")
    module = hydra.utils.instantiate(cfg.module)(
        agent=hydra.utils.instantiate(cfg.algo.agent), obs_dim=dm.obs_dim, action_dim=dm.action_dim,
        horizon=cfg.algo.horizon, stats=dm.stats.to_dict(), cfg=plain(cfg) | run_info(dm))
    if ckpt is not None:
        check_compatible(ckpt, resume, dm.obs_dim, dm.action_dim, dm.info.get("obs_keys"), cfg.algo.horizon,
                         where=f"dataset {dm.info['path']}")
        check_same_data(ckpt, dm, run_dir)
        if main_process and not finished:
            LOG.info(f"resuming from {resume} at step {ckpt['global_step']}")
    if main_process and not finished:
        LOG.info(f"training {cfg.algo.name} on {dm.info['path']} ({_transitions(dm.info)}) up to "
                 f"step {cfg.trainer.max_steps} -> {run_dir.resolve()}")
        run_lock.claim(run_dir, command_line("fit"))  # makes run_dir; held until the command ends
        dm.stats.save(run_dir / "dataset_stats.json")
        record_config(run_dir, composed)
        keep_run_ids(trainer)
    return module, dm, trainer, resume


def _transitions(info: dict) -> str:
    """The dataset's transition count for the start line, and the part of it ``data.max_transitions`` keeps."""
    used = info.get("transitions_used")
    return f"{info['num_transitions']} transitions" + (
        "" if used is None else f", of which data.max_transitions keeps the first {used}")


def discard_if_empty(directory: str | Path) -> None:
    """Removes ``directory`` when it is empty, and the empty directories above it up to the one that existed before
    the command (``run.EXISTING_ABOVE_RUN_DIRS``): Hydra makes the job's output directory before the job starts, so a
    command refused by its checks leaves no run directory."""
    from manip import run

    directory = Path(os.path.abspath(directory))
    stop = max((above for above in run.EXISTING_ABOVE_RUN_DIRS if above in directory.parents),
               key=lambda above: len(above.parts), default=None)
    while True:
        try:
            directory.rmdir()
        except OSError:
            return
        if stop is None or directory.parent == stop or stop not in directory.parents:
            return
        directory = directory.parent


@hydra.main(version_base="1.3", config_path="../conf", config_name="fit")
def main(cfg: DictConfig) -> None:
    run_command("fit", lambda: build(cfg), refused=lambda: discard_if_empty(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    check_command_line("fit", "offline")
    with sweep.summary("fit"):
        main()
