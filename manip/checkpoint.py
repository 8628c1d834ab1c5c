"""Writing checkpoints atomically, reading them safely, checking them against the data and simulator
they meet, and keeping per-rank RNG states in them.

Every manip checkpoint holds only tensors and plain containers, so ``torch.load(weights_only=True)``
reads it (``load_checkpoint`` here, and Lightning's own restore through ``trainer.fit(ckpt_path=...,
weights_only=True)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the dataset or environment."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a manip checkpoint, with clear errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of foreign objects, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(hp.get("cfg"), dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a manip checkpoint (no config / state_dict inside)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: str | Path, obs_dim: int, action_dim: int,
                     obs_keys: list[str] | None = None, horizon: int | None = None,
                     where: str = "dataset") -> None:
    """Refuse a checkpoint whose observation keys, dims or chunk length differ from the data/env.

    Arguments left None are not checked. Raises ``CheckpointError`` naming both sides.
    """
    hp = ckpt["hyper_parameters"]
    theirs = {"obs_dim": hp["obs_dim"], "action_dim": hp["action_dim"], "horizon": hp["horizon"],
              "obs_keys": hp["cfg"].get("data_info", {}).get("obs_keys")}
    ours = {"obs_dim": obs_dim, "action_dim": action_dim, "horizon": horizon, "obs_keys": obs_keys}
    for key, value in ours.items():
        if value is None or theirs[key] is None:
            continue
        if list(value) != list(theirs[key]) if key == "obs_keys" else value != theirs[key]:
            raise CheckpointError(f"checkpoint {path} has {key}={theirs[key]} but the {where} has {key}={value}")


def load_module(path: str | Path, map_location: str = "cpu"):
    """A ``ManipModule`` (eval mode) and its run config from a checkpoint, no dataset needed."""
    import hydra

    from manip.module import ManipModule

    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    cfg = hp["cfg"]
    module = ManipModule(agent=hydra.utils.instantiate(cfg["algo"]["agent"]), obs_dim=hp["obs_dim"],
                         action_dim=hp["action_dim"], horizon=hp["horizon"], stats=hp["stats"], cfg=cfg,
                         **{k: v for k, v in cfg["module"].items() if not k.startswith("_")})
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network its config describes: {exc}") from exc
    return module.to(map_location).eval(), cfg


def env_spec_of(cfg: dict):
    """The ``EnvSpec`` a checkpoint was trained against."""
    from manip.envs import EnvSpec

    spec = cfg.get("env_spec")
    if spec is None:
        raise CheckpointError("checkpoint config has no env_spec; it was not written by manip.fit/finetune")
    return EnvSpec(spec["kind"], dict(spec["kwargs"]))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that never leave a partial file behind.

    ``torch.save`` goes to a temporary file in the target's directory, which is flushed, fsynced
    and then renamed over the target (``os.replace``, atomic on POSIX); a crash or error mid-write
    leaves the previous checkpoint (e.g. ``last.ckpt``) as it was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def gather_rank_states(trainer, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``state`` (same keys, shapes and dtypes on all ranks) in rank order, on CPU.

    A collective under multi-process training: every rank must call it (Lightning builds a
    checkpoint's content on every rank). Without a trainer or with one process: ``[state]``.
    """
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    device = trainer.strategy.root_device
    gathered = {}
    for key, value in state.items():
        value = value.to(device).contiguous()
        parts = [torch.empty_like(value) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(parts, value)
        gathered[key] = [part.cpu() for part in parts]
    return [{k: v[rank] for k, v in gathered.items()} for rank in range(trainer.world_size)]


def rank_state(states: list[dict[str, torch.Tensor]] | None, trainer) -> dict[str, torch.Tensor] | None:
    """This process's entry of a ``gather_rank_states`` list; None when absent (e.g. more ranks now)."""
    rank = trainer.global_rank if trainer is not None else 0
    if not states or rank >= len(states):
        return None
    return states[rank]
