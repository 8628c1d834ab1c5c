"""Writing checkpoints atomically, reading them safely, checking them against the data and simulator
they meet, and keeping per-rank RNG states in them.

Every manip checkpoint holds only tensors and plain containers, so ``torch.load(weights_only=True)``
reads it (``load_checkpoint`` here, and Lightning's own restore through ``trainer.fit(ckpt_path=...,
weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from manip.cli_args import exception_chain
from manip.settings import (SettingError, check_declared_settings, check_int, check_output, check_real, check_threads,
                            constructor_parameters, find_class)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the dataset or environment."""


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a file ``torch.save`` wrote, judged from its first bytes; None when it may be one
    (a zip archive, torch's default format, or a pickle, its legacy one)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # a damaged archive: torch.load names what it found
        if names and not any(name.endswith("data.pkl") for name in names):  # torch.save's zip holds <name>/data.pkl
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"a zip archive of {shown}, without torch's data.pkl (a NumPy .npz?)"
        return None
    if head[0] == 0x80:  # a pickle's PROTO opcode
        return None
    return f"neither a zip archive nor a pickle; it starts with {head!r}"


def _exported_program(path: Path) -> str | None:
    """For a ``.pt2`` archive (a ``manip.export`` program or its AOTInductor package): what to pass instead, naming
    the checkpoint its metadata records; None for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("/archive_format") for name in names):
                return None
            meta = next((name for name in names if name.endswith("/extra/manip.json")), None)
            source = json.loads(archive.read(meta)).get("ckpt") if meta else None
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError):
        return None
    return f"pass the checkpoint it was exported from{f', ckpt={source}' if source else ''}"


def first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0]


# Agent settings added after checkpoints were first written, with the value that rebuilds the agent of a
# checkpoint whose config lacks them (today's default may differ): load_checkpoint fills them in for the agents
# that take them.
EARLIER_AGENT_SETTINGS = {"critic_block": "linear_norm_gelu", "td_select": "target"}


def require_ckpt(cfg: Any) -> str:
    """A command's ``ckpt`` setting, or a CheckpointError saying it is required (its config default is ``???``)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise CheckpointError("ckpt=PATH is required, e.g. ckpt=runs/<run>/checkpoints/last.ckpt")
    return str(cfg.ckpt)


def checkpoint_command(cfg: Any, command: str, default_output: Callable[[str], Path],
                       out_file: tuple[str, str, str] = ("result.json", "the result", "JSON file")) -> tuple[str, Path]:
    """What a command on one checkpoint (``evaluate``, ``export``) starts with: every key checked against
    ``conf/<command>.yaml``, its torch CPU threads (``threads``), the required ``ckpt``, and the ``out`` path
    (default ``default_output(ckpt)``) checked new and writable before any work (``out_file``: the example, the noun
    and the kind of file :func:`~manip.settings.check_output` names). Returns (ckpt, out); raises
    ``SettingError`` / ``CheckpointError``."""
    check_declared_settings(cfg, command)
    threads = check_threads(cfg.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    ckpt = require_ckpt(cfg)
    return ckpt, check_output(cfg.out if cfg.out else default_output(ckpt), *out_file)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a manip checkpoint, with one-line ``CheckpointError`` messages:
    a missing file, a file that is not a PyTorch checkpoint, one holding objects other than tensors and plain
    containers (which safe loading refuses), a PyTorch file without a manip config and weights or the sizes,
    statistics and agent a manip checkpoint records, an agent class that does not import or a setting it does not
    take. A config written before an agent setting existed gets that setting's earlier value
    (``EARLIER_AGENT_SETTINGS``) where its agent takes the setting."""
    path = Path(path).expanduser()
    if not path.is_file():
        if path.is_dir():
            candidates = [path / "checkpoints" / "last.ckpt", path / "last.ckpt"]
            hint = next((f"; its run's last checkpoint is {c}" for c in candidates if c.is_file()),
                        "; pass a checkpoint file (runs/<run>/checkpoints/last.ckpt)")
            raise CheckpointError(f"ckpt={path} is a directory{hint}")
        raise CheckpointError(f"checkpoint not found: {path}")
    instead = _exported_program(path)
    if instead is not None:
        raise CheckpointError(f"{path} is a program python -m manip.export wrote, not a checkpoint; {instead}")
    reason = _not_a_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would come before the one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of foreign objects, ...
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise CheckpointError(f"cannot read checkpoint {path}: it holds a {refused[1]} object, which loading "
                                  f"with weights_only=True refuses (manip checkpoints hold tensors and plain "
                                  f"containers only)") from None
        operand = re.search(r"Unsupported operand \d+", str(exc))
        if operand:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (a pickle torch cannot read safely: "
                                  f"{operand[0]})") from None
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {first_sentence(exc)}") from exc
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("cfg"), dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a manip checkpoint (no config / state_dict inside)")
    # Another Lightning project's checkpoint may well hold a `cfg` too: name what a manip one has and it lacks.
    cfg = hp["cfg"]
    agent = cfg["algo"].get("agent") if isinstance(cfg.get("algo"), dict) else None
    lacks = [key for key in ("obs_dim", "action_dim", "horizon", "stats") if key not in hp]
    lacks += [] if isinstance(cfg.get("module"), dict) else ["cfg.module"]
    lacks += [] if isinstance(agent, dict) and "_target_" in agent else ["cfg.algo.agent._target_"]
    if lacks:
        raise CheckpointError(f"{path} is not a manip checkpoint: its hyper_parameters have no {', '.join(lacks)}")
    try:
        parameters, takes_any_key = constructor_parameters(find_class(agent["_target_"], "algo.agent._target_"))
    except SettingError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:  # a class whose signature cannot be read
        raise CheckpointError(f"{path}: algo.agent._target_={agent['_target_']}: {first_sentence(err)}") from None
    takes = {p.name for p in parameters}
    for key, value in EARLIER_AGENT_SETTINGS.items():
        if key not in agent and key in takes:
            agent[key] = value
    unknown = sorted(key for key in agent if not key.startswith("_") and key not in takes)
    if unknown and not takes_any_key:
        raise CheckpointError(f"{path}: its algo.agent has {', '.join(unknown)}, which {agent['_target_']} does not "
                              f"take (a checkpoint of a later manip version?)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: str | Path, obs_dim: int, action_dim: int,
                     obs_keys: list[str] | None = None, horizon: int | None = None,
                     where: str = "dataset") -> None:
    """Refuse a checkpoint whose observation keys, dims or chunk length differ from the data/env.

    Arguments left None are not checked. Raises ``CheckpointError`` naming both sides: ``where`` (e.g.
    ``"dataset <path>"``) for the observation keys and dims, the run's ``algo.horizon`` for the chunk length.
    """
    hp = ckpt["hyper_parameters"]
    theirs = {"obs_dim": hp["obs_dim"], "action_dim": hp["action_dim"], "horizon": hp["horizon"],
              "obs_keys": hp["cfg"].get("data_info", {}).get("obs_keys")}
    ours = {"obs_dim": obs_dim, "action_dim": action_dim, "horizon": horizon, "obs_keys": obs_keys}
    for key, value in ours.items():
        if value is None or theirs[key] is None:
            continue
        if list(value) != list(theirs[key]) if key == "obs_keys" else value != theirs[key]:
            if key == "horizon":
                raise CheckpointError(f"checkpoint {path} has horizon={theirs[key]} (action chunk length) but this "
                                      f"run's algo.horizon={value}")
            raise CheckpointError(f"checkpoint {path} has {key}={theirs[key]} but the {where} has {key}={value}")


def launch_dir(ckpt_path: str | Path) -> Path | None:
    """The directory the run of ``<run_dir>/checkpoints/<name>.ckpt`` was started from, as its
    ``<run_dir>/hydra/hydra.yaml`` records it (``hydra.runtime.cwd``); None without that record."""
    record = Path(ckpt_path).expanduser().absolute().parent.parent / "hydra" / "hydra.yaml"
    if not record.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        cwd = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.cwd")
    except Exception:  # an unreadable record counts as none
        return None
    return Path(cwd) if cwd else None


def dataset_path(ckpt: dict[str, Any], ckpt_path: str | Path) -> Path:
    """The absolute path of the dataset file a checkpoint's run trained on (``data_info.path``).

    Checkpoints record it absolute. A relative path (older checkpoints) is taken from the directory the run was
    started from (:func:`launch_dir`), else from the current directory.
    """
    cfg = ckpt["hyper_parameters"]["cfg"]
    recorded = (cfg.get("data_info") or {}).get("path") or (cfg.get("data") or {}).get("path")
    if not recorded:
        raise CheckpointError(f"checkpoint {ckpt_path} does not record its dataset file (data_info.path)")
    path = Path(recorded).expanduser()
    if path.is_absolute():
        return path
    return Path(os.path.abspath((launch_dir(ckpt_path) or Path.cwd()) / path))


def load_module(path: str | Path, map_location: str = "cpu"):
    """A ``ManipModule`` (eval mode) and its run config from a checkpoint, no dataset needed; the module's
    ``checkpoint_step`` is the checkpoint's global step. The run's ``module.compile`` (a training setting) is left
    off: acting compiles only when a command asks (``ManipModule.fast_acting``)."""
    import hydra

    from manip.module import ManipModule

    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    cfg = hp["cfg"]
    module = ManipModule(agent=hydra.utils.instantiate(cfg["algo"]["agent"]), obs_dim=hp["obs_dim"],
                         action_dim=hp["action_dim"], horizon=hp["horizon"], stats=hp["stats"], cfg=cfg,
                         **{k: v for k, v in cfg["module"].items() if not k.startswith("_") and k != "compile"})
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the network its config describes: {exc}") from exc
    module.checkpoint_step = int(ckpt.get("global_step", 0))
    return module.to(map_location).eval(), cfg


def check_weights_fit(module: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """``CheckpointError`` naming the first weight of checkpoint ``path`` whose shape differs from ``module``'s (a
    network setting overridden on the command line), before Lightning's restore would fail in a traceback."""
    theirs = ckpt["state_dict"]
    for name, tensor in module.state_dict().items():
        if name in theirs and tuple(theirs[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: weight {name} has shape {list(theirs[name].shape)}, but the network this "
                                  f"command builds has {list(tensor.shape)}: an algo.agent setting that sizes the "
                                  f"network differs from the checkpoint's")


def check_acting_settings(num_samples: int | None = None, noise_scale: float | None = None,
                          sample_steps: int | None = None, act_dtype: str = "float32") -> None:
    """``SettingError`` naming the first acting setting out of range (None: the checkpoint's own value), before a
    command loads the checkpoint."""
    from manip.algos.acting import ACT_DTYPES

    for key, value in (("num_samples", num_samples), ("sample_steps", sample_steps)):
        if value is not None:
            check_int(value, key, 1)
    if noise_scale is not None:
        check_real(noise_scale, "noise_scale", 0)
    if act_dtype not in ACT_DTYPES:
        raise SettingError(f"act_dtype={act_dtype!r}: expected one of {', '.join(ACT_DTYPES)}")


def load_acting_module(path: str | Path, noise_scale: float | None = None, sample_steps: int | None = None):
    """:func:`load_module` with the acting settings a command may override: returns (module, cfg, noise_scale),
    ``noise_scale`` None giving the run's ``eval.noise_scale`` (1.0 when it has none); ``sample_steps`` (MVP's
    mean-velocity jumps) set on the agent, a ``SettingError`` for an agent without them."""
    module, cfg = load_module(path)
    if noise_scale is None:
        noise_scale = check_real(cfg.get("eval", {}).get("noise_scale", 1.0), "eval.noise_scale", 0)
    if sample_steps is not None:
        if not hasattr(module.agent, "sample_steps"):
            raise SettingError(f"sample_steps={sample_steps}: {cfg['algo']['name']} checkpoints have no "
                               f"mean-velocity sampler (MVP only)")
        module.agent.sample_steps = sample_steps
    return module, cfg, noise_scale


def env_spec_of(cfg: dict):
    """The ``EnvSpec`` a checkpoint was trained against."""
    from manip.envs import EnvSpec

    spec = cfg.get("env_spec")
    if spec is None:
        raise CheckpointError("checkpoint config has no env_spec; it was not written by manip.fit/finetune")
    return EnvSpec(spec["kind"], dict(spec["kwargs"]))


def os_error_in(err: BaseException) -> OSError | None:
    """The ``OSError`` (disk full, quota, read-only file system, I/O error) that ``err`` is or was raised from:
    ``torch.save`` reports a full disk as ``OSError`` and, as its writer closes, a ``RuntimeError`` from it."""
    return next((error for error in exception_chain(err) if isinstance(error, OSError)), None)


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
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if (cause := os_error_in(err)) is None:
                raise
            last = path.with_name("last.ckpt")
            kept = (f"{last} is kept, and the same command continues from it" if last.exists()
                    else "it stopped before its first checkpoint")
            raise CheckpointError(f"cannot save {path} at step {checkpoint.get('global_step', '?')} "
                                  f"({cause.strerror or cause}): the run stopped; {kept}") from err
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
