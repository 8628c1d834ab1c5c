"""Reading checkpoints safely and checking them against the data and simulator they meet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
    """Refuse a checkpoint whose observation keys, dims or chunk length differ from the data/env."""
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
