"""Offline training: ``python -m manip.fit conf=robomimic_lift [overrides]``.

With ``resume=auto`` (the default) a run whose ``run_dir`` already holds ``checkpoints/last.ckpt``
continues from it (global step, optimizer, RNG and sampler states); ``resume=true`` insists on it,
``resume=false`` starts over. Multi-process training: ``trainer.strategy=ddp trainer.devices=N``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from manip.checkpoint import CheckpointError, check_compatible, load_checkpoint
from manip.data.datamodule import ReplayDataModule
from manip.module import ManipModule
from manip.run import build_datamodule, build_trainer, plain, run_info, seed_everything

# Lightning's DDP launcher re-runs the command with this job name (and the launcher's hydra.run.dir).
_DDP_CHILD_JOB = "train_ddp_process_"


def run_dir_of(cfg: DictConfig) -> Path:
    """``cfg.run_dir``; in a process started by Lightning's DDP launcher, the launching process's run
    directory (its hydra.run.dir), so that a timestamped default names one directory for all ranks."""
    if HydraConfig.initialized() and HydraConfig.get().job.name.startswith(_DDP_CHILD_JOB):
        return Path(HydraConfig.get().run.dir)
    return Path(cfg.run_dir)


def resume_path(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``<run_dir>/checkpoints/last.ckpt`` unless resume is false."""
    if resume not in ("auto", True, False):
        raise ValueError(f"resume must be auto, true or false, got {resume!r}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume is True and not last.exists():
        raise CheckpointError(f"resume=true but {last} does not exist")
    return last if resume and last.exists() else None


def build(cfg: DictConfig) -> tuple[ManipModule, ReplayDataModule, L.Trainer, Path | None]:
    """Module, data, trainer and the checkpoint to resume from (None: a fresh run)."""
    seed_everything(cfg.seed, cfg.get("threads"))
    run_dir = run_dir_of(cfg)
    cfg.run_dir = str(run_dir)
    trainer = build_trainer(cfg, run_dir, phase="offline")  # first: a bad trainer setting costs no data loading
    dm = build_datamodule(cfg)
    module = hydra.utils.instantiate(cfg.module)(
        agent=hydra.utils.instantiate(cfg.algo.agent), obs_dim=dm.obs_dim, action_dim=dm.action_dim,
        horizon=cfg.algo.horizon, stats=dm.stats.to_dict(), cfg=plain(cfg) | run_info(dm))
    resume = resume_path(cfg.resume, run_dir)
    main_process = rank_zero_only.rank == 0  # known before fit (the launcher's env), unlike trainer ranks
    if resume is not None:
        ckpt = load_checkpoint(resume)
        check_compatible(ckpt, resume, dm.obs_dim, dm.action_dim, dm.info.get("obs_keys"), cfg.algo.horizon,
                         where=f"dataset {dm.info['path']}")
        if main_process:
            print(f"[manip] resuming from {resume} at step {ckpt['global_step']}")
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dm.stats.save(run_dir / "dataset_stats.json")
    return module, dm, trainer, resume


@hydra.main(version_base="1.3", config_path="../conf", config_name="fit")
def main(cfg: DictConfig) -> None:
    module, dm, trainer, resume = build(cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    if trainer.is_global_zero:
        print(f"[manip] checkpoints in {Path(trainer.default_root_dir) / 'checkpoints'}")


if __name__ == "__main__":
    main()
