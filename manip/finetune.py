"""Online fine-tuning: ``python -m manip.finetune ckpt=PATH [finetune.target=som env.num_envs=2 ...]``.

Restores config, dataset statistics, actor, critics, target critics and optimizer from an offline
(``fit``) checkpoint, refills the replay with the offline data and continues in the simulator with
the same module and evaluation loop as ``fit``. Re-running the same command after a crash resumes
from ``<run_dir>/checkpoints/last.ckpt`` (online replay, env-step count and RNG included).

The offline data is the file the checkpoint was trained on (``manip.checkpoint.dataset_path``), never a
newly generated one: a missing file is an error. The run directory receives the dataset statistics and
the composed config (``hydra/config.yaml``) once the checks passed. User errors end the command with one
line, ``manip.finetune: <message>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from manip import run_lock, sweep
from manip.algos.targets import TARGET_SAMPLES
from manip.checkpoint import (CheckpointError, check_compatible, check_weights_fit, dataset_path, load_checkpoint,
                              require_ckpt)
from manip.data.datamodule import DatasetStats, ReplayDataModule, absolute
from manip.data.datamodule import instantiate as instantiate_data
from manip.data.errors import DatasetError
from manip.logs import LOG
from manip.module import ManipModule
from manip.run import (build_trainer, check_command_line, check_same_data, check_same_run, check_steps_left,
                       command_line, data_difference, keep_run_ids, plain, record_config, resume_path, run_command,
                       run_info, seed_everything)
from manip.settings import SettingError, check_int

# Sections that fine-tuning defines itself; everything else comes from the checkpoint's config.
_OWN = ("finetune", "eval", "checkpoint", "trainer", "env")
# Own sections that hold every key they take (the trainer section takes any Trainer argument): a '+key' names
# a key they do not have.
_CLOSED = ("finetune", "eval", "checkpoint", "env")
# Command-line keys of fine-tuning's own config outside those sections (never applied to the checkpoint's config).
_COMMAND_KEYS = ("ckpt", "run_dir", "resume", "logger")
# Sections of the checkpoint's config where an override may add keys (a new logger entry).
_OPEN = ("logger",)
# Config groups of fit's config: choosing one anew would replace the checkpoint's data / algorithm.
_GROUPS = ("data", "algo", "conf", "tuning")
# Top-level keys of fit.yaml that its data / algo / module sections interpolate; a checkpoint's config holds
# them resolved, so overriding the top-level key sets these as well.
SPREAD = {"seed": ("data.seed", "module.seed"), "discount": ("data.discount", "algo.agent.discount")}
# Sections of a run's config that describe its dataset (manip.run.run_info), rebuilt from it at every start.
_READ_FROM_DATA = ("data_info", "env_spec")
# Data keys that generate an absent default file: fine-tuning reads the checkpoint's own file, never a new one.
_GENERATE_KEYS = ("generate_demos", "generate_episodes")

_ABSENT = object()


def _apply_override(final: DictConfig, item: str, cfg: DictConfig, added: set[str]) -> None:
    """Applies one command-line override to the fine-tuning config ``final``, or raises ``SettingError``
    naming it. ``cfg``: fine-tuning's own composed config; ``added``: keys the command added with ``+``."""
    raw = item.partition("=")[0]
    key = raw.lstrip("+~")
    top = key.split(".")[0]
    if key in _COMMAND_KEYS or top == "hydra":
        return
    if top in _READ_FROM_DATA:
        raise SettingError(f"override {item!r}: {top} describes the dataset and is read from it at every start; "
                           f"the simulator's episode length is set with +data.env_horizon=N")
    if top in _OWN:  # already part of cfg, which final takes these sections from
        if top in _CLOSED and raw.startswith("+") and not raw.startswith("++"):
            section, _, name = key.rpartition(".")
            known = [k for k in (OmegaConf.select(cfg, section) or {}) if f"{section}.{k}" not in added]
            raise SettingError(f"override {item!r}: {section or 'the config'} has no key {name!r} (its keys: "
                               f"{', '.join(known)}; fine-tuning's own sections take them without '+')")
        return
    parsed = OverridesParser.create().parse_override(item).value()  # as Hydra reads it: "no" is a string
    if "." not in key:
        current = final.get(key, _ABSENT)
        if key in _GROUPS or OmegaConf.is_dict(current):
            raise SettingError(f"override {item!r} would replace the checkpoint's whole {key!r} section; "
                               f"fine-tuning continues the checkpoint's run, so override single keys instead "
                               f"(e.g. '+{key}.<name>=...')")
        if current is _ABSENT:
            raise SettingError(f"override {item!r}: the checkpoint's config has no top-level key {key!r}")
        final[key] = parsed
        for spread in SPREAD.get(key, ()):
            if OmegaConf.select(final, spread, default=_ABSENT) is not _ABSENT:
                OmegaConf.update(final, spread, parsed)
        return
    if top not in _OPEN and OmegaConf.select(final, key, default=_ABSENT) is _ABSENT:
        raise SettingError(f"override {item!r}: the checkpoint's config has no key {key!r}")
    OmegaConf.update(final, key, parsed, force_add=True)


def _offline_data(final: DictConfig, base_ckpt: dict, base_path: str | Path, user_overrides: list[str]) -> None:
    """Points ``final.data`` at the dataset file the checkpoint at ``base_path`` was trained on (or at the
    command's ``+data.path``), as an absolute path, with generation off; raises when that file is missing."""
    overridden = any(item.split("=")[0].lstrip("+") == "data.path" for item in user_overrides)
    if overridden and not final.data.path:
        raise DatasetError(f"data.path={final.data.path}: fine-tuning needs a dataset file")
    path = absolute(final.data.path) if overridden else dataset_path(base_ckpt, base_path)
    if not path.is_file():
        if overridden:
            raise DatasetError(f"data.path={final.data.path}: {path} "
                               f"{'is a directory, not a dataset file' if path.is_dir() else 'does not exist'}")
        raise CheckpointError(f"{path} does not exist: it is the dataset checkpoint {base_path} was trained on, "
                              f"which fine-tuning refills its replay with (restore it, or pass +data.path=<its copy>)")
    final.data.path = str(path)
    for key in _GENERATE_KEYS:
        if key in final.data:
            final.data[key] = 0


def default_run_dir(ckpt_path: str | Path, ckpt_cfg: dict, target: str, seed: Any = None) -> Path:
    """Where fine-tuning ``ckpt_path`` writes without a ``run_dir``: ``<offline run>/finetune_<target>`` for an
    offline run's checkpoint (``<run>/checkpoints/*.ckpt``); beside a fine-tuning run's own directory,
    ``<its run>_then_<target>``, for one of its checkpoints; ``<dir>/<name>_finetune_<target>`` for a checkpoint
    file kept elsewhere. A ``seed`` other than the checkpoint's adds ``_s<seed>`` (``finetune_bon_s1``), so that
    seeds fine-tuned from one checkpoint (``--multirun +seed=0,1,2``) each get their own run."""
    name = f"{target}_s{seed}" if seed is not None and seed != ckpt_cfg.get("seed") else target
    path = Path(os.path.abspath(Path(ckpt_path).expanduser()))  # a symlinked checkpoint: beside the link
    if path.parent.name != "checkpoints":
        return path.parent / f"{path.stem}_finetune_{name}"
    run = path.parent.parent
    if "finetune_start_step" not in ckpt_cfg:
        return run / f"finetune_{name}"
    nested = run / f"finetune_{name}"  # where such runs went before: the same command continues them there
    if (nested / "checkpoints" / "last.ckpt").is_file():
        return nested
    return run.parent / f"{run.name}_then_{name}"


def _check_started_from(run_dir: Path, resume: Path, run_cfg: dict, ckpt_path: str, ckpt: dict) -> None:
    """``CheckpointError`` when the fine-tuning run to resume (``resume``, config ``run_cfg``) started from another
    checkpoint than this command's ``ckpt_path`` (contents ``ckpt``): every checkpoint of an offline run has the same
    default ``run_dir``, and resuming would ignore ``ckpt``. The run's own ``last.ckpt`` continues it as well."""
    recorded = run_cfg.get("offline_ckpt")
    path = Path(ckpt_path).expanduser().resolve()
    if recorded is None or path == resume.resolve():
        return
    start, step = int(run_cfg["finetune_start_step"]), int(ckpt.get("global_step", 0))
    if Path(recorded).resolve() in (path, Path(ckpt_path).resolve()):  # the latter: recorded with '~' unexpanded
        if step == start:
            return
        # Written over since (an offline run's last.ckpt after that run continued): the run started from a checkpoint
        # this file no longer holds, so the command asks for a new run.
        raise CheckpointError(f"{run_dir} holds a fine-tuning run started from {recorded} at step {start}, but that "
                              f"file is now at step {step}; give run_dir=<a new directory> to fine-tune it, or "
                              f"continue that run with ckpt={resume} run_dir={run_dir}")
    again = f"ckpt={recorded}" if Path(recorded).is_file() else f"ckpt={resume} run_dir={run_dir}"
    raise CheckpointError(f"{run_dir} holds a fine-tuning run started from {recorded} (step {start}), not from "
                          f"ckpt={ckpt_path} (step {step}); give run_dir=<a new directory> to fine-tune {ckpt_path}, "
                          f"or continue that run with {again}")


def command_seed(user_overrides: list[str]) -> Any:
    """The seed the command line sets (``+seed=3``), or None: the checkpoint's."""
    for item in reversed(user_overrides):
        if item.partition("=")[0].lstrip("+") == "seed":
            return OverridesParser.create().parse_override(item).value()
    return None


def compose(cfg: DictConfig, user_overrides: list[str]) -> tuple[DictConfig, str, dict, str | None, bool, dict]:
    """(final config, checkpoint to start from, its contents as ``load_checkpoint`` read them, checkpoint to
    resume from or None, whether that run is already finished, the contents of the checkpoint to resume from or,
    for a new run, of the one to start from).

    ``user_overrides``: the command line's ``key=value`` items. Fine-tuning's own sections (``_OWN``) come
    from ``cfg``; the checkpoint's keys take a leading ``+`` (a top-level scalar such as ``+seed=3`` too, which
    also sets the keys fit derived from it, ``SPREAD``). Raises ``SettingError`` for an override that names a
    key neither config has or that would replace the checkpoint's data / algorithm, ``CheckpointError`` for
    an unreadable checkpoint, a missing dataset file or a run in ``run_dir`` that started from another checkpoint,
    before any data is read. Resumed from its own ``last.ckpt`` (``ckpt=<run_dir>/checkpoints/last.ckpt``), a run
    keeps the checkpoint it started from; one whose dataset moved continues on ``+data.path=<its copy>``.
    """
    require_ckpt(cfg)
    ckpt = load_checkpoint(cfg.ckpt)
    run_dir = (Path(cfg.run_dir).expanduser() if cfg.run_dir
               else default_run_dir(cfg.ckpt, ckpt["hyper_parameters"]["cfg"], cfg.finetune.target,
                                    command_seed(user_overrides)))
    if rank_zero_only.rank == 0:  # another command still running in run_dir: refused before its files are read
        run_lock.check_free(run_dir, command_line("finetune"))
    resume = resume_path(cfg.resume, run_dir)
    if resume is not None:  # the interrupted run's own config, then today's overrides again
        base_path, base_ckpt = resume, load_checkpoint(resume)
        base = base_ckpt["hyper_parameters"]["cfg"]
        if "finetune_start_step" not in base:
            raise CheckpointError(f"{run_dir} holds an offline (fit) run, not a fine-tuning run; give finetune "
                                  f"another run_dir")
        _check_started_from(run_dir, resume, base, str(cfg.ckpt), ckpt)
        start_step = int(base["finetune_start_step"])
        start_env_steps = int(base.get("finetune_start_env_steps", 0))
    else:
        base_path, base_ckpt = Path(cfg.ckpt), ckpt
        base = base_ckpt["hyper_parameters"]["cfg"]
        start_step = int(ckpt.get("global_step", 0))
        start_env_steps = int(ckpt.get("manip", {}).get("env_steps", 0))  # a fine-tuning run's checkpoint: > 0
    final = OmegaConf.create(base)  # a copy: base stays the config the run recorded
    for key in _OWN:  # replaced whole: a key only the checkpoint's run set (+trainer.max_time) is not fine-tuning's
        final[key] = cfg[key]
    if cfg.get("logger") is not None:  # logger=... on the command line replaces the checkpoint's loggers
        final.logger = cfg.logger
    if final.eval.get("noise_scale") is None:  # evaluate as the offline run did
        final.eval.noise_scale = (base.get("eval") or {}).get("noise_scale", 1.0)
    added = {item.split("=")[0].lstrip("+") for item in user_overrides
             if item.startswith("+") and not item.startswith("++")}
    for item in user_overrides:
        _apply_override(final, item, cfg, added)
    if final.finetune.get("target_samples") is None:  # the target's own, recorded (and compared on resume) as a number
        final.finetune.target_samples = TARGET_SAMPLES.get(final.finetune.target)
    _offline_data(final, base_ckpt, base_path, user_overrides)
    final.run_dir = str(run_dir)
    final.finetune_start_step = start_step
    final.finetune_start_env_steps = start_env_steps
    if resume is None or "offline_ckpt" not in base:  # a resumed run keeps its own (also when continued by last.ckpt)
        final.offline_ckpt = str(Path(cfg.ckpt).expanduser().resolve())
    updates = check_int(final.trainer.max_steps, "trainer.max_steps", 0)  # -1 ("no limit") would end at once
    finished = False
    if resume is not None:  # the same fine-tuning run, and something left to train
        data_file, run_data = Path(final.data.path), dataset_path(base_ckpt, resume)
        if not run_data.exists():  # moved: +data.path names its copy, which build checks by contents (check_same_data)
            data_file = run_data
        check_same_run(base_ckpt, resume, plain(final), data_file, run_dir, phase="online")
        finished = check_steps_left(base_ckpt, resume, start_step + updates,
                                    f"trainer.max_steps={final.trainer.max_steps} (online updates after step "
                                    f"{start_step})", run_dir, final.eval.final_episodes)
    return final, str(cfg.ckpt), ckpt, None if resume is None else str(resume), finished, base_ckpt


def build(cfg: DictConfig, user_overrides: list[str]) -> tuple[ManipModule, ReplayDataModule, L.Trainer, str]:
    """Module, data, trainer and the checkpoint ``trainer.fit`` starts from (the offline one, or
    this run's ``last.ckpt`` when resuming). ``user_overrides``: the command line's ``key=value``.

    Once the checks passed, the main process writes ``dataset_stats.json`` (the checkpoint's statistics)
    and ``hydra/config.yaml`` (the final config) with ``hydra/overrides.yaml`` into the run directory."""
    final, offline_ckpt, ckpt, resume, finished, run_ckpt = compose(cfg, user_overrides)
    seed_everything(check_int(final.seed, "seed", 0) + 1, final.get("threads"))
    run_dir = Path(final.run_dir)
    dm = instantiate_data(final.data)  # checks the data settings; reads nothing yet
    trainer = build_trainer(final, run_dir, phase="online",  # before the data: a bad setting costs no loading
                            max_steps=final.finetune_start_step + final.trainer.max_steps)
    dm.prepare_data()
    dm.setup("fit")
    dm.offline_fraction = final.finetune.offline_fraction
    check_compatible(ckpt, offline_ckpt, dm.obs_dim, dm.action_dim, dm.info.get("obs_keys"),
                     final.algo.horizon, where=f"dataset {dm.info['path']}")
    if resume:
        check_same_data(run_ckpt, dm, run_dir, phase="online")
    elif (changed := data_difference(ckpt, dm)) is not None and rank_zero_only.rank == 0:
        LOG.warning(f"the replay starts from {dm.info['path']}, which is not the data {offline_ckpt} was trained on "
                    f"({changed}); the policy keeps the checkpoint's observation and action normalisation")
    online = {k: v for k, v in plain(final.finetune).items() if k != "offline_fraction"}
    online["start_step"] = final.finetune_start_step
    online["start_env_steps"] = final.finetune_start_env_steps
    stats = ckpt["hyper_parameters"]["stats"]
    module = hydra.utils.instantiate(final.module)(
        agent=hydra.utils.instantiate(final.algo.agent), obs_dim=dm.obs_dim, action_dim=dm.action_dim,
        horizon=final.algo.horizon, stats=stats, cfg=plain(final) | run_info(dm), online=online)
    check_weights_fit(module, run_ckpt, resume or offline_ckpt)
    target = final.finetune.target
    if target != "replay" and not hasattr(module.agent, "policy_loss") and rank_zero_only.rank == 0 and not finished:
        given = any(item.lstrip("+").startswith("finetune.target=") for item in user_overrides)
        (LOG.warning if given else LOG.info)(
            f"{final.algo.name} has no critic-driven policy target: it fine-tunes with its own actor loss on the "
            f"replay, as finetune.target=replay (finetune.target={target} applies to MVP)")
    # A new fine-tuning run draws its loss noise and batches from its own seed, not from the offline run's random
    # states (seed_everything above seeded the global generators); a resumed one continues its own.
    module.restore_random_states = dm.restore_sampler = resume is not None
    if rank_zero_only.rank == 0 and not finished:
        if resume:
            LOG.info(f"resuming fine-tuning from {resume}")
        elif "finetune_start_step" in ckpt["hyper_parameters"]["cfg"] and "online_replay" not in ckpt.get("manip", {}):
            LOG.warning(f"{offline_ckpt} is a step checkpoint of a fine-tuning run: only last.ckpt keeps the online "
                        f"episodes, so this run starts from the offline data alone")
        LOG.info(f"fine-tuning {final.offline_ckpt} (step {final.finetune_start_step}) with "
                 f"finetune.target={final.finetune.target}: {final.trainer.max_steps} online updates -> "
                 f"{run_dir.resolve()}")
        run_lock.claim(run_dir, command_line("finetune"))  # makes run_dir; held until the command ends
        DatasetStats(**stats).save(run_dir / "dataset_stats.json")
        record_config(run_dir, final, user_overrides)
        keep_run_ids(trainer)
    return module, dm, trainer, resume or offline_ckpt


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run_command("finetune", lambda: build(cfg, list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    check_command_line("finetune", "online")
    with sweep.summary("finetune"):
        main()
