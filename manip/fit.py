"""Offline training: ``python -m manip.fit conf=robomimic_lift [overrides]``."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from manip.run import build_datamodule, build_trainer, plain, run_info, seed_everything


@hydra.main(version_base="1.3", config_path="../conf", config_name="fit")
def main(cfg: DictConfig) -> None:
    seed_everything(cfg.seed)
    run_dir = Path(cfg.run_dir)
    dm = build_datamodule(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dm.stats.save(run_dir / "dataset_stats.json")
    module = hydra.utils.instantiate(cfg.module)(
        agent=hydra.utils.instantiate(cfg.algo.agent), obs_dim=dm.obs_dim, action_dim=dm.action_dim,
        horizon=cfg.algo.horizon, stats=dm.stats.to_dict(), cfg=plain(cfg) | run_info(dm))
    trainer = build_trainer(cfg, run_dir, phase="offline")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.exists() else None
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    print(f"[manip] checkpoints in {run_dir / 'checkpoints'}")


if __name__ == "__main__":
    main()
