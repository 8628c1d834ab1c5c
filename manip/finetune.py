"""Online fine-tuning: ``python -m manip.finetune ckpt=PATH [finetune.target=som env.num_envs=2 ...]``.

Restores config, dataset statistics, actor, critics, target critics and optimizer from an offline
(``fit``) checkpoint, refills the replay with the offline data and continues in the simulator with
the same module and evaluation loop as ``fit``. Re-running the same command after a crash resumes
from ``<run_dir>/checkpoints/last.ckpt`` (online replay, env-step count and RNG included).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from manip.checkpoint import CheckpointError, check_compatible, load_checkpoint
from manip.data.datamodule import ReplayDataModule
from manip.module import ManipModule
from manip.run import build_datamodule, build_trainer, plain, run_info, seed_everything

# Sections that fine-tuning defines itself; everything else comes from the checkpoint's config.
_OWN = ("finetune", "eval", "checkpoint", "trainer", "env")
# Command-line keys of fine-tuning's own config outside those sections (never applied to the checkpoint's config).
_COMMAND_KEYS = ("ckpt", "run_dir", "resume", "logger")


def compose(cfg: DictConfig, user_overrides: list[str]) -> tuple[DictConfig, str, str | None]:
    """(final config, checkpoint to start from, checkpoint to resume from or None)."""
    ckpt = load_checkpoint(cfg.ckpt)
    base = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    target = cfg.finetune.target
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.ckpt).resolve().parent.parent / f"finetune_{target}"
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if (cfg.resume == "auto" or cfg.resume is True) and last.exists() else None
    if cfg.resume is True and resume is None:
        raise CheckpointError(f"resume=true but {last} does not exist")
    if resume is not None:  # the interrupted run's own config, then today's overrides again
        base = OmegaConf.create(load_checkpoint(resume)["hyper_parameters"]["cfg"])
        start_step = int(base.finetune_start_step)
    else:
        start_step = int(ckpt.get("global_step", 0))
    final = OmegaConf.merge(base, {k: cfg[k] for k in _OWN})
    if cfg.get("logger") is not None:  # logger=... on the command line replaces the checkpoint's loggers
        final.logger = cfg.logger
    if final.eval.get("noise_scale") is None:  # evaluate as the offline run did
        final.eval.noise_scale = (base.get("eval") or {}).get("noise_scale", 1.0)
    for item in user_overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key in _COMMAND_KEYS or key.split(".")[0] in _OWN:
            continue
        if "." not in key:
            raise CheckpointError(f"override {item!r} changes a config group; fine-tuning keeps the "
                                  f"checkpoint's data/algo (override individual keys instead)")
        OmegaConf.update(final, key, OmegaConf.from_dotlist([f"x={value}"]).x, force_add=True)
    final.run_dir = str(run_dir)
    final.finetune_start_step = start_step
    final.offline_ckpt = str(Path(cfg.ckpt).resolve())
    return final, str(cfg.ckpt), resume


def build(cfg: DictConfig, user_overrides: list[str]) -> tuple[ManipModule, ReplayDataModule, L.Trainer, str]:
    """Module, data, trainer and the checkpoint ``trainer.fit`` starts from (the offline one, or
    this run's ``last.ckpt`` when resuming). ``user_overrides``: the command line's ``key=value``."""
    final, offline_ckpt, resume = compose(cfg, user_overrides)
    seed_everything(final.seed + 1, final.get("threads"))
    run_dir = Path(final.run_dir)
    trainer = build_trainer(final, run_dir, phase="online",  # first: a bad trainer setting costs no data loading
                            max_steps=final.finetune_start_step + final.trainer.max_steps)
    dm = build_datamodule(final)
    dm.offline_fraction = final.finetune.offline_fraction
    ckpt = load_checkpoint(offline_ckpt)
    check_compatible(ckpt, offline_ckpt, dm.obs_dim, dm.action_dim, dm.info.get("obs_keys"),
                     final.algo.horizon, where=f"dataset {dm.info['path']}")
    online = {k: v for k, v in plain(final.finetune).items() if k != "offline_fraction"}
    online["start_step"] = final.finetune_start_step
    module = hydra.utils.instantiate(final.module)(
        agent=hydra.utils.instantiate(final.algo.agent), obs_dim=dm.obs_dim, action_dim=dm.action_dim,
        horizon=final.algo.horizon, stats=ckpt["hyper_parameters"]["stats"],
        cfg=plain(final) | run_info(dm), online=online)
    if resume and rank_zero_only.rank == 0:
        print(f"[manip] resuming fine-tuning from {resume}")
    return module, dm, trainer, resume or offline_ckpt


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    module, dm, trainer, ckpt_path = build(cfg, list(HydraConfig.get().overrides.task))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if trainer.is_global_zero:
        print(f"[manip] checkpoints in {Path(trainer.default_root_dir) / 'checkpoints'}")


if __name__ == "__main__":
    main()
