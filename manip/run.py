"""Building blocks shared by the ``fit`` and ``finetune`` entry points: Hydra config to trainer."""

from __future__ import annotations

import contextlib
import csv
import difflib
import errno
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressBarBase
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from manip import run_lock, sweep
from manip.algos.base import check_agent_settings
from manip.algos.training import compiler_message
from manip.checkpoint import AtomicCheckpointIO, CheckpointError, dataset_path, os_error_in, require_ckpt
from manip.cli_args import exception_chain, interrupted_by_ctrl_c, raise_if_interrupted
from manip.data.datamodule import ReplayDataModule
from manip.data.errors import DatasetError
from manip.envs import EnvMismatchError, close_vector_env
from manip.evaluation import evaluate_policy
from manip.logs import LOG, RunLog, counted
from manip.module import (ManipModule, OnlineConfig, TrainingDiverged, check_module_settings,
                          check_offline_fraction)
from manip.settings import (CONFIG_DIR, SettingError, cannot_write_in, check_int, check_known_keys, check_real,
                            check_threads, constructor_parameters, find_class, first_free_path, unknown_key_error)


# Errors a user's command or files cause: reported in one line, without a traceback.
USER_ERRORS = (CheckpointError, DatasetError, EnvMismatchError, SettingError, TrainingDiverged)

# Manual optimisation checkpoints the state after the update; that is what we want.
warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
# A resumed run writes into its own checkpoint directory, and fine-tuning into another one than the offline run's;
# a changed checkpoint interval leaves the callback's interval state behind, which is what it asks for.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")


def _with_loss(metrics: dict, module) -> dict:
    """``metrics`` with the module's ``loss`` of its last logged update (a float: nothing read from the device)."""
    loss = getattr(module, "progress_loss", None)
    if loss is not None:
        metrics["loss"] = loss
    return metrics


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num`` (it shows the last four characters of the logger's version,
    "line" for offline / online), with the loss of the last logged update."""

    def get_metrics(self, trainer, module) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return _with_loss(metrics, module)


class ProgressLines(ProgressBarBase):
    """Training progress where standard output is not a terminal (a log file, a SLURM job's output), which
    Lightning's bar would fill with a carriage return per update: a line every ``every_s`` seconds, from rank 0,
    ``[manip] step 3000/14000 (21%): 11.2 updates/s, loss 0.412, about 17 min left`` (the rate over those seconds,
    evaluations included; fine-tuning adds ``, 4200 env steps``)."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._since = (0.0, 0)  # (perf_counter, global step) of the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer, module) -> dict:
        return _with_loss(super().get_metrics(trainer, module), module)

    def on_train_start(self, trainer, module) -> None:
        self._since = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now, (then, step_then) = time.perf_counter(), self._since
        if not (self._enabled and trainer.is_global_zero) or now - then < self.every_s:
            return
        step, last = trainer.global_step, trainer.max_steps
        rate = (step - step_then) / max(now - then, 1e-9)
        line = f"step {step}/{last} ({100 * step / last:.0f}%)" if last > 0 else f"step {step}"
        line += f": {rate:.3g} updates/s"
        loss = self.get_metrics(trainer, module).get("loss")
        if loss is not None:
            line += f", loss {float(loss):.3g}"
        if last > 0 and rate > 0:
            line += f", about {math.ceil((last - step) / rate / 60)} min left"
        if getattr(module, "online", None) is not None:  # fine-tuning: the simulator's count too
            line += f", {module.env_steps} env steps"
        LOG.info(line)
        self._since = (now, step)


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always ends at the final global step.

    Lightning's step-interval checkpointing saves nothing when training stops between two intervals
    (``max_steps`` not a multiple of ``every_n_train_steps``); :meth:`save_final` then saves ``last`` at the
    current step. It runs at the end of training, and :class:`PeriodicEvaluation` calls it before its final
    evaluation, so a failing evaluation never loses the trained weights. Only ``last.ckpt``, which a run resumes
    from, carries the online replay (``ManipModule.checkpoint_online_replay``): the step checkpoints keep the
    networks, optimizer and RNG states without the growing buffer of collected episodes.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints written with the plain callback restore this one's state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        # The ``step`` of a checkpoint's name is the update count, not the row the module logged last (it logs a
        # row every trainer.log_every_n_steps updates)
        return {**super()._monitor_candidates(trainer), "step": torch.tensor(trainer.global_step)}

    def save_final(self, trainer: L.Trainer) -> None:
        """Saves ``last`` at ``trainer.global_step`` unless it is already saved there (every rank must call it)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_final(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        module.raise_if_diverged()  # never a checkpoint of weights trained on NaN losses
        module.checkpoint_online_replay = Path(filepath).name == f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            module.checkpoint_online_replay = True


def _on_main_thread() -> bool:
    """Whether this is the main thread, the only one where Python lets a program set signal handlers."""
    return threading.current_thread() is threading.main_thread()


def _default_action(signum: int) -> Any:
    """Python's handler for Ctrl-C (a KeyboardInterrupt), the system's default for any other signal."""
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


class StopOnCtrlC(Callback):
    """Ctrl-C (SIGINT) or SIGTERM (``kill <pid>``, a scheduler's preemption; the env workers ignore both) during
    training stops it once the update (or periodic evaluation) in progress ends: ``last.ckpt`` is saved at that step
    (the same command then continues the run) and the final evaluation is skipped; ``run_command`` ends the command
    with ``manip.<name>: interrupted at step N ...`` and status 130 (SIGTERM: ``stopped by SIGTERM at step N ...``,
    status 143). A second signal stops at once, saving nothing; Ctrl-C during the final evaluation, which runs
    after the last save, ends it (:class:`PeriodicEvaluation`). Not for a signal the process ignores (a background
    job keeps running when the terminal's Ctrl-C is meant for the foreground). ``requested``: the signal that
    stopped training, or None.

    Under DDP a signal that reaches any process (a scheduler signals them all, ``kill <pid>`` one) stops every
    process after the same update: they agree after each update (an all-reduce, beside the broadcast Lightning makes
    there anyway). Lightning's own SIGTERM handling, which this replaces, broadcasts from inside the signal handler
    and ends the run in a traceback without saving.

    In a SLURM job, SIGUSR1 (SLURM's warning before the time limit, ``#SBATCH --signal=SIGUSR1@90``) stops training
    the same way, and ``run_command`` then requeues the job (:func:`requeue_slurm_job`; rank 0 does under DDP). It
    replaces Lightning's auto-requeue, which saves a checkpoint from inside the signal handler, wherever the update
    then is. After training, the other ranks of a DDP job ignore it: rank 0 alone evaluates then, and requeues.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._agree = False  # DDP: whether the processes agree on stopping after each update
        self._ignored_after_training: set[int] = set()

    def setup(self, trainer, module, stage) -> None:
        # Before Lightning installs its SLURM requeue handler, which it leaves out where a SIGUSR1 handler exists.
        if SLURMEnvironment.detect() and _on_main_thread():
            self._trainer = trainer
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._request)
            if trainer.world_size > 1 and trainer.global_rank != 0:
                self._ignored_after_training = {signal.SIGUSR1}

    def on_train_start(self, trainer, module) -> None:
        if _on_main_thread():
            self._trainer = trainer
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._request)
        self._agree = (trainer.world_size > 1 and torch.distributed.is_available()
                       and torch.distributed.is_initialized())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self._agree:
            return
        requested = torch.tensor([int(self.requested or 0)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        if requested.item():  # the same in every process: all stop after this update
            self.requested = self.requested or signal.Signals(int(requested.item()))
            trainer.should_stop = True

    def _request(self, signum, frame) -> None:
        if self._trainer is None:  # put back by Lightning's own restore after training ended: the default action
            if signum in self._ignored_after_training:
                signal.signal(signum, signal.SIG_IGN)
                return
            signal.signal(signum, _default_action(signum))
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum)
        if not self._agree:  # (under DDP the processes agree first, after this update)
            self._trainer.should_stop = True  # checked once this batch's callbacks (an evaluation among them) are done
        # the second signal stops at once: Ctrl-C as a KeyboardInterrupt, SIGTERM (SIGUSR1) as the system's default
        signal.signal(signum, _default_action(signum))
        name = self.NAMES[self.requested]
        LOG.info(f"{name}: stopping once this update (or evaluation) ends, then saving last.ckpt ({name} again stops "
                 f"at once, saving nothing)")

    def on_train_end(self, trainer, module) -> None:
        self._restore()  # Ctrl-C during the final evaluation ends it: the weights are saved first

    def teardown(self, trainer, module, stage) -> None:
        self._restore()

    def _restore(self) -> None:
        self._trainer, self._agree = None, False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        # teardown comes after Lightning's own restore, and a handler of Python's own, unlike SIG_IGN, would be
        # reset to the default action when the interpreter shuts down (a rank may wait there for the others)
        for signum in self._ignored_after_training:
            signal.signal(signum, signal.SIG_IGN)


def stop_signal(trainer: L.Trainer) -> signal.Signals | None:
    """The signal (SIGINT, SIGTERM or, in a SLURM job, SIGUSR1) that stopped ``trainer`` (:class:`StopOnCtrlC`), or
    None."""
    return next((callback.requested for callback in trainer.callbacks
                 if isinstance(callback, StopOnCtrlC) and callback.requested), None)


def requeue_slurm_job() -> tuple[str, str | None]:
    """``scontrol requeue`` for this SLURM job (an array task as ``<array job>_<task>``): (job, None) once SLURM took
    it, (job, why not) otherwise."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return job, "SLURM_JOB_ID is not set"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return job, str(err)
    why = (done.stderr or done.stdout).strip().splitlines()
    return job, None if done.returncode == 0 else (why[-1] if why else f"scontrol exited with {done.returncode}")


class SlurmWarning:
    """In a SLURM job (main thread), SIGUSR1 (SLURM's warning before the time limit) ends what runs inside
    ``with SlurmWarning():`` as Ctrl-C would, a ``KeyboardInterrupt``, and ``received`` says the signal was SLURM's:
    outside training, where :class:`StopOnCtrlC` stops after the update in progress, the signal's default action
    would end the process without a requeue. Elsewhere a no-op."""

    def __init__(self) -> None:
        self.active = SLURMEnvironment.detect() and _on_main_thread()
        self.received = False
        self._previous: Any = None

    def _interrupt(self, signum, frame) -> None:
        self.received = True
        signal.signal(signal.SIGUSR1, self._previous)  # one interrupt: the clean-up runs under the earlier handler
        ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(ctrl_c):  # Ctrl-C's own handler: it waits for an import in progress (defer_ctrl_c_during_imports)
            ctrl_c(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> "SlurmWarning":
        if self.active:
            self._previous = signal.signal(signal.SIGUSR1, self._interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self.active and signal.getsignal(signal.SIGUSR1) == self._interrupt:
            signal.signal(signal.SIGUSR1, self._previous)


def final_evaluation_interrupted(trainer: L.Trainer) -> signal.Signals | None:
    """The signal (SIGINT, or SLURM's SIGUSR1) that ended ``trainer``'s final evaluation, or None."""
    return next((callback.final_interrupted for callback in trainer.callbacks
                 if isinstance(callback, PeriodicEvaluation) and callback.final_interrupted), None)


def final_evaluation_done(run_dir: Path, step: int, episodes: int) -> bool:
    """Whether ``run_dir/eval.jsonl`` holds an evaluation of ``step`` over at least ``episodes`` episodes."""
    records = run_dir / "eval.jsonl"
    done = [json.loads(line) for line in records.read_text().splitlines()] if records.is_file() else []
    return any(r.get("step") == step and r.get("episodes", 0) >= episodes for r in done)


class PeriodicEvaluation(Callback):
    """Success rate in the simulator every ``every_n_steps`` updates (and at the end of training).

    Logs eval/success_rate, eval/ci_low, eval/ci_high, eval/mean_length (x = global step) and
    appends each result with its env-step count and ``wall_s`` (seconds since this process started
    training, evaluations included) to ``<run_dir>/eval.jsonl``. ``noise_scale``: std of the policy's
    initial noise while evaluating (see ``ManipModule.predict_chunks``). ``seed`` seeds the episodes' resets and
    the policy's noise alike at every evaluation, so checkpoints are compared on the same draws. Settings out of
    range raise ``SettingError`` naming their ``eval.`` key when the callback is built, before any training.
    The final checkpoint (``LastCheckpoint.save_final``) is written before the end-of-training evaluation runs.
    Ctrl-C (in a SLURM job also SIGUSR1) during it ends it, and ``final_interrupted`` names the signal. A finished
    run whose command runs again, with nothing left to train, gets its final evaluation then where ``eval.jsonl``
    lacks it (:meth:`evaluate_finished_run`).
    """

    def __init__(self, run_dir: str, every_n_steps: int, episodes: int, num_envs: int = 1,
                 seed: int = 1000, final_episodes: int = 0, phase: str = "offline",
                 noise_scale: float = 1.0) -> None:
        every_n_steps = check_int(every_n_steps, "eval.every_n_steps", 0)
        episodes = check_int(episodes, "eval.episodes", 1 if every_n_steps > 0 else 0)
        final_episodes = check_int(final_episodes, "eval.final_episodes", 0)
        num_envs = check_int(num_envs, "eval.num_envs", 1)
        seed = check_int(seed, "eval.seed", 0)
        self.run_dir, self.every_n_steps, self.episodes = Path(run_dir), every_n_steps, episodes
        self.num_envs, self.seed, self.final_episodes, self.phase = num_envs, seed, final_episodes, phase
        self.final_interrupted: signal.Signals | None = None
        self.trained = False  # whether this process's fit ran its training loop
        self.noise_scale = check_real(noise_scale, "eval.noise_scale", 0)
        self.env = None
        self.last = (-1, 0)  # (step, episodes) of the latest evaluation
        self.started = time.perf_counter()

    def _evaluate(self, trainer: L.Trainer, module: ManipModule, episodes: int, key: str = "eval.episodes") -> None:
        from manip.envs import make_vector_env

        # The end-of-training evaluation still runs when a periodic one just ran with fewer episodes.
        if episodes <= 0 or self.last >= (trainer.global_step, episodes):
            return
        self.last = (trainer.global_step, episodes)
        module.raise_if_diverged()  # on every process (under DDP the check is collective)
        if trainer.global_rank != 0:
            return
        started = time.perf_counter()
        LOG.info(f"step {trainer.global_step}: evaluating {counted(episodes, 'episode')} ({key}) in "
                 f"{counted(self.num_envs, 'simulator')}")
        if self.env is None:
            self.env = make_vector_env(trainer.datamodule.env_spec, self.num_envs, obs_dim=module.obs_dim,
                                       action_dim=module.action_dim)
        was_training = module.training
        module.eval()
        predict = partial(module.predict_chunks, noise_scale=self.noise_scale)
        result = evaluate_policy(self.env, predict, episodes, seed=self.seed)  # same episodes at every evaluation
        module.train(was_training)
        metrics = {"eval/success_rate": result.success_rate, "eval/ci_low": result.ci_low,
                   "eval/ci_high": result.ci_high, "eval/mean_length": result.mean_length}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        record = {"step": trainer.global_step, "env_steps": module.env_steps, "phase": self.phase,
                  **{k.split("/")[1]: v for k, v in metrics.items()}, "episodes": episodes,
                  "noise_scale": self.noise_scale, "chunk_latency_ms": result.chunk_latency_ms,
                  "action_latency_ms": result.action_latency_ms,
                  "seconds": result.seconds,
                  "wall_s": time.perf_counter() - self.started}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        LOG.info(f"step {trainer.global_step}: success {result.success_rate:.2f} "
                 f"[{result.ci_low:.2f}, {result.ci_high:.2f}] over {counted(episodes, 'episode')} "
                 f"({time.perf_counter() - started:.0f} s)")

    def on_train_start(self, trainer, module) -> None:
        self.started = time.perf_counter()  # wall_s: seconds since this process started training
        self.trained = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, module, self.episodes)

    def on_train_end(self, trainer, module) -> None:
        # Lightning runs checkpoint callbacks last: save the final weights here, before evaluating.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.save_final(trainer)
        if not stop_signal(trainer):
            self._evaluate_final(trainer, module)
        self._close_env()

    def on_exception(self, trainer, module, exception) -> None:
        self._close_env()  # a failed job of a --multirun sweep leaves no simulator workers beside the next ones

    def _close_env(self) -> None:
        if self.env is not None:
            close_vector_env(self.env)
            self.env = None

    def evaluate_finished_run(self, trainer: L.Trainer, module: ManipModule) -> None:
        """After ``trainer.fit`` found nothing left to train (the run was already at its last step): the final
        evaluation, where ``eval.jsonl`` has none of that step with ``final_episodes`` episodes (an earlier command
        was stopped during it, or asked for fewer episodes), then the loggers' files are written again."""
        if (self.trained or self.final_episodes <= 0 or trainer.global_rank != 0
                or final_evaluation_done(self.run_dir, trainer.global_step, self.final_episodes)):
            return
        module.to(trainer.strategy.root_device)  # Lightning's teardown left it on the CPU
        self._evaluate_final(trainer, module)
        for logger in trainer.loggers:
            logger.finalize("success")

    def _evaluate_final(self, trainer: L.Trainer, module: ManipModule) -> None:
        warning = SlurmWarning()  # under DDP rank 0's, which alone evaluates
        try:
            with warning:
                self._evaluate(trainer, module, self.final_episodes, "eval.final_episodes")
        except KeyboardInterrupt:  # the final weights are saved: the same command runs this evaluation again
            self.final_interrupted = signal.SIGUSR1 if warning.received else signal.SIGINT
        finally:
            self._close_env()


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv and appends to it (its header gives the known columns)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose metrics.csv survives a resumed run: new rows are appended to it.

    Steps between a run's last checkpoint and its interruption appear twice; the later row wins.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id kept in ``<run_dir>/wandb_run_id``, or a new one, which :class:`KeepWandbRunId` writes there
    when training starts: a resumed run continues its W&B run, and a command refused by its checks writes nothing."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    return secrets.token_hex(8)


class KeepWandbRunId(Callback):
    """Writes a new :func:`wandb_run_id` into ``<run_dir>/wandb_run_id`` (main process): from :func:`keep_run_ids`
    once a command's checks passed, before Lightning starts the W&B run; at the latest as training sets up."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        self.path, self.run_id = Path(run_dir) / "wandb_run_id", run_id

    def keep(self) -> None:
        if rank_zero_only.rank == 0 and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(self.run_id)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.keep()


def keep_run_ids(trainer: L.Trainer) -> None:
    """The run ids of ``trainer``'s loggers kept in the run directory (a resumed run continues its W&B run)."""
    for callback in trainer.callbacks:
        if isinstance(callback, KeepWandbRunId):
            callback.keep()


def extra_loggers(cfg: DictConfig, run_dir: Path) -> tuple[list[Logger], str | None]:
    """The ``logger`` group's Lightning loggers (e.g. ``logger=wandb``): an entry's ``save_dir: null`` becomes
    ``run_dir``, a WandbLogger's ``id: null`` the run directory's :func:`wandb_run_id`; and that id where it is new
    (None: none), for :class:`KeepWandbRunId`. A WandbLogger without the wandb package raises ``SettingError``."""
    loggers, run_id, new_id = [], None, None
    for name, spec in (cfg.get("logger") or {}).items():
        overrides = {"save_dir": str(run_dir)} if "save_dir" in spec and spec.save_dir is None else {}
        if str(spec.get("_target_", "")).endswith("WandbLogger"):
            if importlib.util.find_spec("wandb") is None:  # Lightning's ModuleNotFoundError would be a traceback
                raise SettingError(f"logger.{name} logs to Weights & Biases, which needs the wandb package: "
                                   f'pip install -e ".[wandb]" (or logger=none to leave it out)')
            if "id" in spec and spec.id is None:
                if run_id is None:
                    run_id = wandb_run_id(run_dir)
                    new_id = None if (run_dir / "wandb_run_id").exists() else run_id
                overrides["id"] = run_id
        logger = hydra.utils.instantiate(spec, **overrides)
        if not isinstance(logger, Logger):
            raise TypeError(f"logger.{name} builds a {type(logger).__name__}, not a Lightning Logger")
        loggers.append(logger)
    return loggers, new_id


_GROUPS = ("data", "algo", "trainer", "logger", "conf", "tuning")  # fit's config groups (conf/<group>/)
# The sections hydra.utils.instantiate builds, with the constructor arguments the entry points pass themselves.
_BUILT_SECTIONS = {"data": (), "algo.agent": ("obs_dim", "action_dim", "horizon"), "trainer": (),
                   "module": ("agent", "obs_dim", "action_dim", "horizon", "stats", "cfg", "online")}


def check_config_keys(cfg: DictConfig, phase: str) -> None:
    """Every key of the run's config must be one manip reads: a key added with ``+key=value`` that nothing takes
    (a typo such as ``+eval.episode=2``) would otherwise be ignored, or end the command in a traceback.

    ``env``, ``eval`` and ``checkpoint`` have the keys ``conf/fit.yaml`` declares (``finetune``: those of
    ``conf/finetune.yaml``), the sections ``hydra.utils.instantiate`` builds (data, algo.agent, trainer, module)
    their ``_target_``'s constructor arguments, and (``phase="offline"``) the top level fit.yaml's keys and groups;
    fine-tuning's top level is checked by :func:`manip.finetune.compose`. Raises ``SettingError`` with the closest
    key."""
    declared = OmegaConf.load(CONFIG_DIR / "fit.yaml")
    if phase == "online":
        declared.finetune = OmegaConf.load(CONFIG_DIR / "finetune.yaml").finetune
    for section in ("env", "eval", "checkpoint") + (("finetune",) if phase == "online" else ()):
        for key in cfg.get(section) or {}:
            if key not in declared[section]:
                raise unknown_key_error(key, list(declared[section]), section)
    if phase == "offline":
        top = [key for key in declared if key not in ("defaults", "hydra")] + list(_GROUPS)
        for key in cfg:
            if key not in top:
                raise unknown_key_error(key, top)
    for section, given in _BUILT_SECTIONS.items():
        settings = OmegaConf.select(cfg, section)
        if settings is not None and settings.get("_target_"):
            check_known_keys(find_class(settings["_target_"], f"{section}._target_"), settings, section, given)


def check_command_line(command: str, phase: str | None = None, args: list[str] | None = None) -> None:
    """Before Hydra runs ``python -m manip.<command>``: a ``key=value`` whose key the config does not have ends the
    command with one line, ``manip.<command>: unknown eval.episode; did you mean eval.episodes?``, or, for a key
    some component takes but the config leaves out, the ``+key=value`` to write. (Hydra's own message suggests
    ``+key=value`` for a typo too, and the typo then goes unread.) ``phase`` ("offline", "online"; None for
    ``evaluate``) selects the checks of the ``+`` form (:func:`check_config_keys`, the sections' ``_target_``).
    An option a config group lacks (``algo=qcc``), a value Hydra's grammar cannot read, a ``+key`` the config already
    has and a ``run_dir`` that is a file are one line too (:func:`_exit_on_composition_error`). Command lines with
    Hydra's other flags (``--help``, ``--cfg``) and every other composition error are left to Hydra. With
    ``--multirun`` (``-m``) every value of every sweep is checked (:func:`_sweep_representatives`), before any job."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    args = sys.argv[1:] if args is None else args
    if flags := [arg for arg in args if arg.startswith("-")]:
        if set(flags) <= {"--multirun", "-m"}:
            values = _sweep_values([arg for arg in args if not arg.startswith("-")])
            for job in _sweep_representatives(values):
                check_command_line(command, phase, job)
            _check_sweep_outputs(command, values)
        return
    for arg in args:
        if "=" not in arg and not arg.startswith("~"):  # Hydra's answer: "mismatched input '.' expecting <EOF>"
            if command != "fit" and (arg.endswith(".ckpt") or Path(arg).exists()):
                sys.exit(f"manip.{command}: settings are key=value: for the checkpoint, ckpt={arg}")
            example = "conf=robomimic_lift" if command == "fit" else "ckpt=PATH"
            sys.exit(f"manip.{command}: settings are key=value (e.g. {example}), got {arg!r}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=command):
        try:
            composed = compose(command, overrides=args)
        except ConfigCompositionException as err:
            raise_if_interrupted(err)  # Hydra's error from a Ctrl-C while it read a config file
            missing = re.match(r"Could not override '([^']+)'", str(err))
            if missing is None:
                _exit_on_composition_error(command, err, args)
        except Exception as err:  # noqa: BLE001 - Hydra reports the rest when it composes the config itself
            raise_if_interrupted(err)
            _exit_on_composition_error(command, err, args)
            return
        else:
            _check_run_dir(command, composed)
            if command != "fit":  # finetune, evaluate, export: every job of a sweep would refuse it alike
                try:
                    require_ckpt(composed)
                except CheckpointError as err:
                    sys.exit(f"manip.{command}: {err}")
            return
        if missing is None or missing.group(1).startswith("hydra."):
            return
        key = missing.group(1)
        item = next(arg for arg in args if arg.split("=", 1)[0] == key)
        try:
            added = compose(command, overrides=[arg for arg in args if arg != item] + [f"+{item}"])
        except Exception:  # noqa: BLE001
            return
    error: Exception | None = None
    try:
        if phase is None:
            known = list(_leaves(OmegaConf.to_container(added), ""))
            error = unknown_key_error(key, [k for k in known if k != key])
        else:
            check_config_keys(added, phase)
    except SettingError as err:
        error = err
    if (error is None or key not in str(error)) and phase == "online":
        error = _checkpoint_key_error(key, item, args)
    if error is None or key not in str(error):
        error = SettingError(f"{key} is not in the config yet: set it with +{item}")
    sys.exit(f"manip.{command}: {error}")


def _sweep_values(args: list[str]) -> list[list[str]] | None:
    """Per item of a ``--multirun`` command line, the items its jobs get (``seed=0,1`` -> ``["seed=0", "seed=1"]``),
    as Hydra's sweeper expands them; None where Hydra's parser cannot expand them (a ``glob``) and reports them
    itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return [[f"{item.get_key_element()}={value}" for value in item.sweep_string_iterator()]
                if item.is_sweep_override() else [item.input_line]
                for item in OverridesParser.create().parse_overrides(args)]
    except Exception:  # noqa: BLE001 - Hydra's parser and sweeps raise HydraException and others
        return None


def _sweep_representatives(values: list[list[str]] | None) -> list[list[str]]:
    """Command lines of single jobs that together use every value of every sweep (``algo=mvp,qcc seed=0,1`` ->
    ``algo=mvp seed=0``, ``algo=qcc seed=0``, ``algo=mvp seed=1``): one per value rather than one per combination,
    since a key or group option that fails does so whatever the other sweeps' values. None of them when
    :func:`_sweep_values` could not expand the sweep."""
    if values is None:
        return []
    first = [choices[0] for choices in values]
    return [first] + [first[:i] + [value] + first[i + 1:] for i, choices in enumerate(values) for value in choices[1:]]


_SWEEP_OUTPUT = {"fit": "run_dir", "finetune": "run_dir", "evaluate": "out", "export": "out"}
_MAX_SWEEP_CHECK = 64  # jobs whose outputs are compared before the sweep (each a Hydra composition, ~0.1 s)


def _default_finetune_dir(cfg: DictConfig) -> Path:
    """Fine-tuning's default run_dir for ``cfg.ckpt`` as if it were an offline run's checkpoint (the command line
    alone does not say)."""
    from manip.finetune import default_run_dir

    return default_run_dir(cfg.ckpt, {}, cfg.finetune.target)


def _interpolable(item: str, cfg: DictConfig) -> str | None:
    """The key whose ``${...}`` shows ``item``'s value in a path: ``seed=1`` -> ``seed``, ``algo=qc`` ->
    ``algo.name``; None for a section, a key the config lacks or a path."""
    name = item.partition("=")[0].lstrip("+~")
    value = OmegaConf.select(cfg, name, default=None)
    if isinstance(value, DictConfig):
        return f"{name}.name" if isinstance(value.get("name"), (str, int)) else None
    if value is None or OmegaConf.is_config(value) or "/" in str(value):  # a path (ckpt=...) makes no folder name
        return None
    return name


def _check_sweep_outputs(command: str, values: list[list[str]] | None) -> None:
    """Two jobs of one sweep that would write to the same ``run_dir`` (``out``) end the command before the first job
    starts, in one line naming the keys they differ in: the later job would be refused only once the earlier one
    is done. A ``run_dir`` with the time in it (fit's default) and an unset ``out`` differ from job to job;
    finetune's default ``run_dir`` is the same for the checkpoints of one run, ``finetune.target`` and seed. A sweep
    of more than ``_MAX_SWEEP_CHECK`` jobs is checked on its :func:`_sweep_representatives`, which catch an output
    that ignores a swept key."""
    from hydra import compose, initialize_config_dir

    from manip.finetune import command_seed, default_run_dir

    key = _SWEEP_OUTPUT.get(command)
    if key is None or values is None:
        return
    sizes = [len(choices) for choices in values]
    if math.prod(sizes) <= _MAX_SWEEP_CHECK:
        jobs = dict(enumerate(list(job) for job in itertools.product(*values)))  # Hydra's basic sweeper's order
    else:  # a job's number in that order: the last item's values vary fastest
        strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        jobs = {sum(choices.index(item) * stride for choices, item, stride in zip(values, job, strides)): job
                for job in _sweep_representatives(values)}
    seen: dict[Any, int] = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=command):
        for num, job in sorted(jobs.items()):
            try:
                cfg = compose(command, overrides=job)
                raw = OmegaConf.to_container(cfg, resolve=False).get(key)  # as written: ${now:...} unresolved
                if raw is not None and "${now:" in str(raw):
                    return  # named by the time each job starts
                if raw is not None:
                    where, shown = os.path.abspath(os.path.expanduser(str(cfg[key]))), f"{key}={cfg[key]}"
                elif command == "finetune":  # its default run_dir: one per run of the checkpoint, target and seed
                    where = str(default_run_dir(cfg.ckpt, {}, cfg.finetune.target, command_seed(job)))
                    shown = f"the default run_dir of ckpt={cfg.ckpt} finetune.target={cfg.finetune.target}"
                else:
                    continue  # evaluate / export without out: each result takes the first free name
            except Exception:  # noqa: BLE001 - resolved only in the job (${hydra:job.num}), ...
                return  # the job reports it
            if where in seen:
                first = seen[where]
                differ = [item for item in job if item not in jobs[first]]
                base = str(raw) if raw is not None else str(_default_finetune_dir(cfg))
                swept = [choices[0] for choices in values if len(choices) > 1]
                example = "".join(f"_${{{name}}}" for item in swept
                                  if (name := _interpolable(item, cfg)) and f"${{{name}}}" not in base)
                suffix = Path(base).suffix if key == "out" else ""  # r.json -> r_${episodes}.json
                stem = base[:len(base) - len(suffix)]
                hint = f", e.g. {key}='{stem}{example}{suffix}'" if example else ""
                sys.exit(f"manip.{command}: --multirun jobs #{first} and #{num} would both write to {shown} "
                         f"(they differ in {' '.join(differ)}); give each job its own {key}{hint}")
            seen[where] = num


def _exit_on_composition_error(command: str, err: Exception, args: list[str]) -> None:
    """Ends the command with one line for the composition errors a user makes (an option a config group lacks, a
    value Hydra's grammar cannot read, a ``+key`` the config already has); returns for any other."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    option = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if isinstance(err, MissingConfigException) and option and not option.group(1).startswith("hydra"):
        group, name = option.groups()  # a group of conf/ (Hydra's own groups, hydra/..., are Hydra's to name)
        options = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
        close = difflib.get_close_matches(name, options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        sys.exit(f"manip.{command}: {group}={name}: conf/{group}/ has no {name}.yaml; {hint}"
                 f"{group} is one of {', '.join(options)}")
    if isinstance(err, OverrideParseException):
        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_override(arg)
            except Exception as bad:  # noqa: BLE001 - Hydra's parser raises HydraException for a grammar error
                sys.exit(f"manip.{command}: cannot read {arg!r}: {str(bad).splitlines()[0]} (quote a value with "
                         f"brackets, commas or spaces: key='[1, 2]')")
    ambiguous = re.match(r"Ambiguous value for argument '([^'=]+)=(.*)'", text)
    if ambiguous:
        key, value = ambiguous.groups()
        sys.exit(f"manip.{command}: {key}={value} is a sweep, which needs --multirun; a list is {key}=[{value}], a "
                 f"string {key}='{value}'")
    present = re.match(r"Could not append to config. An item is already at '([^']+)'", text)
    if present:
        item = next((arg for arg in args if arg.lstrip("+").split("=", 1)[0] == present.group(1)), present.group(1))
        sys.exit(f"manip.{command}: {present.group(1)} is in the config already: set it without the +, "
                 f"{item.lstrip('+')}")


def _check_run_dir(command: str, cfg: DictConfig) -> None:
    """Ends the command with one line when its ``run_dir`` is a file, lies under one, or cannot be made or written
    (Hydra would stop in a traceback when it makes the directory)."""
    try:
        run_dir = cfg.get("run_dir")
    except Exception:  # noqa: BLE001 - an interpolation Hydra resolves later (or reports)
        return
    if not run_dir:
        return
    path = Path(os.path.abspath(Path(str(run_dir)).expanduser()))
    if path.exists() and not path.is_dir():
        sys.exit(f"manip.{command}: run_dir={run_dir} is a file; name a directory for the run")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        sys.exit(f"manip.{command}: run_dir={run_dir}: {parent} is a file, so the run's directory cannot be made")
    writable = path if path.exists() else parent
    if (refused := cannot_write_in(writable)) is not None:  # Hydra makes run_dir next, and would fail in a traceback
        sys.exit(f"manip.{command}: run_dir={run_dir}: cannot write in {writable} ({refused})")
    EXISTING_ABOVE_RUN_DIRS.add(parent)


# For each run_dir the command's check saw, the nearest directory above it that existed before the command (set by
# check_command_line): a refused command removes the empty directories Hydra made below the deepest of them above its
# own run_dir, and no others. Not keyed by run_dir: a default with the time in it can name another second by then.
EXISTING_ABOVE_RUN_DIRS: set[Path] = set()


def _checkpoint_key_error(key: str, item: str, args: list[str]) -> SettingError:
    """For ``finetune``: a key its own config lacks belongs to the checkpoint's config, which the checkpoint's run
    directory records (``hydra/config.yaml``, read here without loading the checkpoint)."""
    ckpt = next((arg.split("=", 1)[1] for arg in args if arg.startswith("ckpt=")), None)
    recorded = Path(ckpt).expanduser().resolve().parent.parent / "hydra" / "config.yaml" if ckpt else None
    if recorded is None or not recorded.is_file():
        return SettingError(f"{key} is not a fine-tuning setting; a setting of the checkpoint's config takes a "
                            f"leading +: +{item}")
    config = OmegaConf.to_container(OmegaConf.load(recorded))
    known = _leaves(config, "")
    if key in known or any(k.startswith(f"{key}.") for k in known):
        return SettingError(f"{key} comes from the checkpoint's config: override it with +{item}")
    return unknown_key_error(key, list(known))


def check_settings(cfg: DictConfig, phase: str) -> None:
    """Raise ``SettingError`` naming the key of the first run setting out of range, before any data or training.

    Checks ``checkpoint.every_n_steps``, the ``module`` settings (:func:`manip.module.check_module_settings`),
    ``data.horizon`` against ``algo.horizon``, the agent's settings (``algo.horizon``, ``algo.agent.*``, see
    :func:`manip.algos.base.check_agent_settings`) and, for ``phase="online"``, the ``finetune`` section
    (:class:`manip.module.OnlineConfig`, ``finetune.offline_fraction``). The ``eval`` settings are checked by
    :class:`PeriodicEvaluation`.
    """
    check_config_keys(cfg, phase)
    if (cfg.get("env") or {}).get("num_envs") is not None:  # before eval.num_envs / finetune.num_envs, which repeat it
        check_int(cfg.env.num_envs, "env.num_envs", 1)
    check_int(cfg.checkpoint.every_n_steps, "checkpoint.every_n_steps", 0)  # 0: last.ckpt at the end only
    module = cfg.get("module") or {}
    check_module_settings(module.get("obs_norm", "standard"), module.get("actor_ema"), module.get("lr"),
                          module.get("tau"), module.get("compile", False))
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if max_steps is not None:  # Lightning checks the range, but a string ends in a TypeError naming no key
        check_int(max_steps, "trainer.max_steps", -1)
    precision = str((cfg.get("trainer") or {}).get("precision"))
    if precision in _HALF_WEIGHTS:
        raise SettingError(f"trainer.precision={precision} keeps the weights in half precision, which manip does "
                           f"not train (MVP's total derivative runs in float32); use trainer.precision="
                           f"{_HALF_WEIGHTS[precision]}: float32 weights, half-precision compute")
    algo = cfg.get("algo")
    data_horizon = (cfg.get("data") or {}).get("horizon")
    if algo is not None and data_horizon is not None and data_horizon != algo.get("horizon"):
        raise SettingError(f"data.horizon={data_horizon} but algo.horizon={algo.get('horizon')}: the replay's chunks "
                           f"are the agent's chunks (leave data.horizon to follow algo.horizon)")
    data_discount = (cfg.get("data") or {}).get("discount")
    agent_discount = ((algo or {}).get("agent") or {}).get("discount")
    for key, value in (("data.discount", data_discount), ("algo.agent.discount", agent_discount)):
        if value is not None:  # named here: float() below would raise naming no key
            check_real(value, key, 0.0, maximum=1.0)
    if data_discount is not None and agent_discount is not None and float(data_discount) != float(agent_discount):
        raise SettingError(f"data.discount={data_discount} but algo.agent.discount={agent_discount}: the replay sums "
                           f"a chunk's rewards with the discount the critic bootstraps with (set discount=..., "
                           f"which both follow)")
    if algo is not None:
        agent = OmegaConf.to_container(algo.get("agent") or {}, resolve=True)
        # check_config_keys above has imported the agent's _target_ (or named the key)
        agent_class = find_class(agent["_target_"], "algo.agent._target_") if agent.get("_target_") else None
        check_agent_settings(algo.get("horizon"), time_features=getattr(agent_class, "TIME_FEATURES", None),
                             **{k: v for k, v in agent.items() if not k.startswith("_")})
    if phase == "online":
        online = plain(cfg.finetune)
        check_offline_fraction(online.pop("offline_fraction", None))
        OnlineConfig.from_settings(online)


# Lightning precisions whose weights are half floats, with the mixed precision to use instead.
_HALF_WEIGHTS = {"bf16-true": "bf16-mixed", "16-true": "16-mixed"}

# Data settings that select or relabel a run's transitions (the dataset file itself is compared by path).
_DATA_KEYS = ("_target_", "obs_keys", "filter_key", "reward_mode", "dataset_name", "max_transitions", "discount")

_UNSET = object()


def _leaves(tree: dict | None, prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _constructor_defaults(target: Any) -> dict[str, Any]:
    """The default of each keyword argument of the class ``target`` names (:func:`constructor_parameters`), in a
    config's form (a tuple as a list); {} when it cannot be imported."""
    try:
        parameters, _ = constructor_parameters(find_class(target, "algo.agent._target_"))
    except SettingError:
        return {}
    defaults: dict[str, Any] = {}
    for p in parameters:
        if p.default is not p.empty:
            defaults.setdefault(p.name, list(p.default) if isinstance(p.default, tuple) else p.default)
    return defaults


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else str(value)


def run_differences(saved: dict, cfg: dict, saved_data: Path, new_data: Path, sections: tuple[str, ...] = (),
                    free: tuple[str, ...] = ()) -> list[str]:
    """The settings a run's weights and optimizer state depend on where its checkpoint's config ``saved``
    (trained on ``saved_data``) and this command's plain config ``cfg`` (reading ``new_data``) disagree, as
    ``"key=<run's value> (this command: <value>)"``: the algorithm (``algo.name``; for the same algorithm
    ``algo.horizon`` and every ``algo.agent`` key, one the run's config lacks at its constructor's default), the
    dataset file, the data keys that select or relabel transitions, ``module.obs_norm`` and ``seed`` (a resumed
    run restores its own random states, so another seed would be ignored: two seeds in one ``run_dir``, e.g. a
    ``--multirun seed=0,1`` without ``${seed}`` in ``run_dir``, must not share a run); and every key of
    ``sections`` (fine-tuning's ``finetune``) but those in ``free``."""
    pairs: list[tuple[str, Any, Any]] = [("seed", saved.get("seed", _UNSET), cfg.get("seed", _UNSET))]
    old_algo, new_algo = saved.get("algo") or {}, cfg.get("algo") or {}
    if old_algo.get("name") != new_algo.get("name"):
        pairs.append(("algo.name", old_algo.get("name", _UNSET), new_algo.get("name", _UNSET)))
    else:
        old, new = _leaves(old_algo, "algo."), _leaves(new_algo, "algo.")
        pairs += [(key, old[key], new.get(key, _UNSET)) for key in sorted(old)]
        # an agent key the run's config lacks: the run's agent was built with its constructor's default
        defaults = _leaves(_constructor_defaults((old_algo.get("agent") or {}).get("_target_")), "algo.agent.")
        pairs += [(key, defaults.get(key, _UNSET), new[key]) for key in sorted(new)
                  if key not in old and key.startswith("algo.agent.")]
    if os.path.normpath(saved_data) != os.path.normpath(new_data):
        pairs.append(("data.path", saved_data, new_data))
    old_data, new_data_cfg = saved.get("data") or {}, cfg.get("data") or {}
    pairs += [(f"data.{key}", old_data.get(key, _UNSET), new_data_cfg.get(key, _UNSET)) for key in _DATA_KEYS]
    old_module, new_module = saved.get("module") or {}, cfg.get("module") or {}
    pairs.append(("module.obs_norm", old_module.get("obs_norm", _UNSET), new_module.get("obs_norm", _UNSET)))
    for section in sections:
        old, new = _leaves(saved.get(section), f"{section}."), _leaves(cfg.get(section), f"{section}.")
        pairs += [(key, old[key], new.get(key, _UNSET)) for key in sorted(old) if key not in free]
    return [f"{key}={_show(old)} (this command: {_show(new)})" for key, old, new in pairs if old != new]


def check_same_run(ckpt: dict, ckpt_path: Path, cfg: dict, data_file: Path, run_dir: Path,
                   phase: str = "offline") -> None:
    """``CheckpointError`` when ``run_dir``'s checkpoint belongs to a run that differs from this command in
    what its weights depend on (:func:`run_differences`; for a fine-tuning run, ``phase="online"``, also in its
    ``finetune`` settings but the number of collection simulators)."""
    saved = ckpt["hyper_parameters"]["cfg"]
    online = phase == "online"
    if not online and "finetune_start_step" in saved:
        raise CheckpointError(f"{run_dir} holds a fine-tuning run ({ckpt_path}), not an offline (fit) run; give fit "
                              f"another run_dir")
    differences = run_differences(saved, cfg, dataset_path(ckpt, ckpt_path), data_file,
                                  sections=("finetune",) if online else (), free=("finetune.num_envs",))
    if differences:
        algo = (saved.get("algo") or {}).get("name", "manip")
        raise CheckpointError(f"{run_dir} holds a {algo} {'fine-tuning ' if online else ''}run with "
                              f"{', '.join(differences)}; continue it with the run's values, or give this command "
                              f"another run_dir")


def data_difference(ckpt: dict, dm: ReplayDataModule) -> str | None:
    """How the dataset ``dm`` read differs from the one the checkpoint's run trained on, which the checkpoint
    knows by its transition count and digest (``data_info``; a file replaced at the same path has the same name);
    None when it does not. Checkpoints written before the digest was recorded are compared by their statistics
    where these are the data's own (an offline run; a fine-tuning run keeps the statistics of the offline run it
    started from)."""
    hp = ckpt["hyper_parameters"]
    info = hp["cfg"].get("data_info") or {}
    theirs = info.get("num_transitions")
    ours = dm.info.get("num_transitions")
    if theirs is not None and ours is not None and theirs != ours:
        return f"{ours} transitions (the run's: {theirs})"
    if info.get("digest") is not None:
        return None if info["digest"] == dm.info.get("digest") else (
            "other transitions (observations, actions, rewards or episode ends)")
    if "finetune_start_step" in hp["cfg"]:
        return None
    saved, read = hp.get("stats") or {}, dm.stats.to_dict()
    differing = [key for key in read if key in saved
                 and not np.allclose(np.asarray(saved[key]), np.asarray(read[key]), rtol=1e-5, atol=1e-6)]
    return f"other statistics ({', '.join(differing)})" if differing else None


def check_same_data(ckpt: dict, dm: ReplayDataModule, run_dir: Path, phase: str = "offline") -> None:
    """``CheckpointError`` when the run in ``run_dir`` (its checkpoint ``ckpt``) trained on other data than ``dm``
    read (:func:`data_difference`): a resumed run continues on its own data."""
    changed = data_difference(ckpt, dm)
    if changed is not None:
        raise CheckpointError(f"{dm.info['path']} is not the file {run_dir}'s run "
                              f"{'fine-tuned with' if phase == 'online' else 'trained on'}: it has {changed}; "
                              f"continue the run with its own data, or give this command another run_dir")


def check_steps_left(ckpt: dict, ckpt_path: Path | str, last_step: int, setting: str, run_dir: Path,
                     final_episodes: Any = 0) -> bool:
    """``SettingError`` when the run to resume is already past ``last_step`` (the step ``setting``, e.g.
    ``trainer.max_steps=5000``, trains to): the command would train nothing and say nothing. A line when it is exactly
    there (a finished command run again, e.g. a relaunched sweep; Lightning's loop then runs nothing), which points
    to the final evaluation this command then runs when ``run_dir/eval.jsonl`` lacks it (an earlier command was
    stopped during it; :meth:`PeriodicEvaluation.evaluate_finished_run`). Returns whether the run is already
    finished."""
    step = int(ckpt["global_step"])
    if last_step < 0:  # max_steps=-1: Lightning's "no limit"
        return False
    if step > last_step:
        raise SettingError(f"{setting} but {ckpt_path} is already at step {step}: nothing to train (a larger "
                           f"trainer.max_steps continues the run)")
    if step < last_step or rank_zero_only.rank != 0:
        return step == last_step
    if (isinstance(final_episodes, int) and final_episodes > 0
            and not final_evaluation_done(run_dir, step, final_episodes)):
        LOG.info(f"{ckpt_path} is already at step {step} ({setting}): nothing left to train, but "
                 f"{run_dir / 'eval.jsonl'} lacks its final evaluation (eval.final_episodes={final_episodes}), which "
                 f"runs now")
    else:
        LOG.info(f"{ckpt_path} is already at step {step} ({setting}): nothing left to train")
    return True


def resume_path(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``<run_dir>/checkpoints/last.ckpt`` when it exists (``resume=auto``);
    ``resume=true`` requires it, ``resume=false`` requires a run directory without one (a fresh run never writes
    its checkpoints, logs and config over another run's).

    ``SettingError`` for a value other than auto / true / false, ``CheckpointError`` when the file's presence
    does not match."""
    # by identity: 0 == False and 1 == True, and resume=0 must not pass as false
    if resume is not True and resume is not False and not (isinstance(resume, str) and resume == "auto"):
        raise SettingError(f"resume must be auto, true or false, got {resume!r}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume is True and not last.exists():
        raise CheckpointError(f"resume=true but {last} does not exist")
    if resume is False and last.exists():
        raise CheckpointError(f"resume=false but {run_dir} already holds a run ({last}); give this command another "
                              f"run_dir, or remove that one to start over")
    others = sorted(p.name for p in last.parent.glob("*.ckpt")) if not last.exists() else []
    if others:  # every save writes last.ckpt with them: it was removed, and a fresh run would write over these
        raise CheckpointError(f"{last.parent} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} but "
                              f"no last.ckpt, which a run continues from; copy the one to continue from to "
                              f"{last.name}, or give this command another run_dir")
    return last if resume and last.exists() else None


def record_config(run_dir: Path, config: DictConfig | dict, overrides: list[str] | None = None) -> None:
    """``<run_dir>/hydra/config.yaml`` (``config``), ``overrides.yaml`` (the command line's overrides) and, under
    a Hydra app, ``hydra.yaml``: what Hydra's ``output_subdir`` holds, written once the run's checks passed.

    A resumed run whose command differs from the recorded one (a larger ``trainer.max_steps``, other ``env`` or
    ``eval`` settings) keeps the earlier record as ``config.<k>.yaml`` (and ``overrides.<k>.yaml``,
    ``hydra.<k>.yaml``), k = 1 for the first command: ``config.yaml`` is always the latest command's."""
    out = run_dir / "hydra"
    out.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    if overrides is None and hydra_cfg is not None:
        overrides = list(hydra_cfg.hydra.overrides.task)
    texts = {"config": OmegaConf.to_yaml(config)}
    if overrides is not None:
        texts["overrides"] = OmegaConf.to_yaml(OmegaConf.create(list(overrides)))
    if hydra_cfg is not None:
        texts["hydra"] = OmegaConf.to_yaml(hydra_cfg)
    recorded = out / "config.yaml"
    changed = any((out / f"{name}.yaml").exists() and (out / f"{name}.yaml").read_text() != text
                  for name, text in texts.items() if name != "hydra")  # hydra.yaml also holds the job's cwd
    if recorded.exists() and changed:
        kept = first_free_path(recorded).name  # config.<k>.yaml; overrides.<k>.yaml and hydra.<k>.yaml beside it
        for name in ("config", "overrides", "hydra"):
            if (out / f"{name}.yaml").exists():
                (out / f"{name}.yaml").rename(out / kept.replace("config", name, 1))
    for name, text in texts.items():
        (out / f"{name}.yaml").write_text(text)


def build_trainer(cfg: DictConfig, run_dir: Path, phase: str, max_steps: int | None = None) -> L.Trainer:
    """The configured Trainer with manip's checkpointing (atomic writes; ``last.ckpt`` always at the final step),
    evaluation and loggers. Settings out of range raise ``SettingError`` first (:func:`check_settings`)."""
    check_settings(cfg, phase)
    callbacks = [
        StopOnCtrlC(),  # first: its on_train_end restores Ctrl-C before the final evaluation
        LastCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                       every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=-1,
                       enable_version_counter=False),  # a resumed run overwrites its last.ckpt, never last-v1
        PeriodicEvaluation(str(run_dir), cfg.eval.every_n_steps, cfg.eval.episodes, cfg.eval.num_envs,
                           cfg.eval.seed, cfg.eval.final_episodes, phase, cfg.eval.get("noise_scale", 1.0)),
    ]
    extra, new_wandb_id = extra_loggers(cfg, run_dir)
    if new_wandb_id is not None:
        callbacks.append(KeepWandbRunId(run_dir, new_wandb_id))
    # metrics.csv is written whenever metrics are logged, so a killed run keeps all it logged.
    loggers = [ResumableCSVLogger(run_dir, name="", version=phase,
                                  flush_logs_every_n_steps=cfg.trainer.log_every_n_steps),
               TensorBoardLogger(run_dir, name="tb", version=phase), *extra]
    overrides: dict[str, Any] = {"default_root_dir": str(run_dir), "callbacks": callbacks, "logger": loggers,
                                 "plugins": [AtomicCheckpointIO()]}
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if cfg.trainer.get("enable_progress_bar", True) is not False:  # Lightning takes None as True
        callbacks.append(ProgressBar() if sys.stdout.isatty() else ProgressLines())
    try:
        return hydra.utils.instantiate(cfg.trainer, **overrides)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, MisconfigurationException):
            raise
        # Lightning's own check of a value (max_steps=-5, devices=0, ...)
        raise SettingError(f"trainer: {str(cause).strip().splitlines()[0]}") from err


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (checkpoint-safe)."""
    return OmegaConf.to_container(cfg, resolve=True)


def run_info(dm: ReplayDataModule) -> dict:
    """What a checkpoint must know about its data: where it came from and how to rebuild the env."""
    return {"data_info": dm.info, "env_spec": {"kind": dm.env_spec.kind, "kwargs": dict(dm.env_spec.kwargs)}}


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed every RNG; ``threads`` sets torch's CPU threads (None: torch's default).

    A ``threads`` other than null or a count >= 1 raises ``SettingError``. Small MLP batches gain little from intra-op threads, and on a busy machine (simulator workers,
    other jobs) spinning threads make a step many times slower, so the configs default to 1.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    threads = check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("high")


def quiet_finalizers() -> None:
    """After a Ctrl-C: objects a library was building when the interrupt landed (e.g. llvmlite's, inside a numba
    compilation) can fail in ``__del__`` at exit, printing "Exception ignored in ..." tracebacks after the command's
    one line; those errors are the interrupt's, not the library's."""
    sys.unraisablehook = lambda unraisable: None


# The machine, not the command: a full disk or quota, a file too large for a limit, a read-only file system.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def storage_error(err: BaseException, run_dir: str | Path | None = None) -> str | None:
    """One line for an error that writing a run's files (logs, metrics, records) hit on a full or read-only disk;
    None for any other error. (A checkpoint that cannot be saved is a ``CheckpointError`` of its own.) A failed
    ``write`` names no file: the line names ``run_dir`` where it is known."""
    cause = os_error_in(err)
    if cause is None or cause.errno not in _STORAGE_ERRNOS:
        return None
    where = cause.filename or (f"the run's files in {run_dir}" if run_dir else "the run's files")
    return f"cannot write {where} ({cause.strerror}); the checkpoints saved before, if any, are kept"


def compile_error(err: BaseException, key: str, instead: str) -> str | None:
    """One line for a failure of the compiler that setting ``key`` asked for (a missing or broken C++ compiler, a
    backend that cannot lower a graph), which shows at the first compiled update or act, ending with ``instead``
    (what to run); None for any other error."""
    import torch._inductor.exc
    from torch._dynamo.exc import BackendCompilerFailed

    # InductorError exists in newer torch only
    failures = (BackendCompilerFailed, getattr(torch._inductor.exc, "InductorError", BackendCompilerFailed))
    failure = next((error for error in exception_chain(err) if isinstance(error, failures)), None)
    if failure is None:
        return None
    return f"{key}: the compiler failed on this machine ({compiler_message(failure)}); {instead}"


def command_line(name: str) -> str:
    """``python -m manip.<name> <overrides>``: this command as its user typed it (Hydra's task overrides)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else sys.argv[1:]
    return " ".join([f"python -m manip.{name}", *overrides])


def train(trainer: L.Trainer, module: ManipModule, dm: ReplayDataModule, ckpt_path: str | Path | None) -> None:
    """``trainer.fit`` from ``ckpt_path`` (None: from the start), then, where the run was already at its last step,
    the final evaluation its ``eval.jsonl`` lacks (:meth:`PeriodicEvaluation.evaluate_finished_run`)."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    finally:
        module.close_rollout()  # a failed run leaves no collection simulators beside a --multirun sweep's next jobs
    if not stop_signal(trainer):
        for callback in trainer.callbacks:
            if isinstance(callback, PeriodicEvaluation):
                callback.evaluate_finished_run(trainer, module)


def requeued(then: str) -> tuple[str, int]:
    """Requeues this SLURM job (:func:`requeue_slurm_job`): what happens next (``then``: what the same command does)
    and the command's status, 0 once SLURM took the job back, 1 where it did not."""
    job, failed = requeue_slurm_job()
    if failed is None:
        return f"SLURM job {job} is requeued: its {then.removeprefix('the ')}", 0
    return f"requeueing SLURM job {job} failed ({failed}); {then}", 1


@contextlib.contextmanager
def _releasing_run_dirs():
    try:
        yield
    finally:
        run_lock.release()  # before the next --multirun job in this process, or a later command in a notebook


def run_command(name: str, build: Callable[[], tuple], refused: Callable[[], None] = lambda: None) -> None:
    """The body of ``python -m manip.<name>`` (fit, finetune): ``build()`` -> (module, data, trainer, checkpoint to
    start from), then ``trainer.fit``, with the run's log (:class:`~manip.logs.RunLog`, its first line the command).

    A user error (``USER_ERRORS``) ends the command with one line ``manip.<name>: <message>`` and status 1, Ctrl-C
    before training (during the checks or the dataset's generation) with ``manip.<name>: interrupted`` and status
    130; ``refused()`` then runs on the main process. In a ``--multirun`` sweep a user error ends only its job
    (:mod:`manip.sweep`). Ctrl-C during training saves the run first
    (:class:`StopOnCtrlC`) and also ends with status 130. In a SLURM job, SIGUSR1 before training ends the command
    as Ctrl-C does, and during training or the final evaluation as :class:`StopOnCtrlC` and
    :class:`PeriodicEvaluation` say; each time the job is requeued (status 0). A run already at its last step trains
    nothing and gets the final evaluation its ``eval.jsonl`` lacks. A full or read-only disk is one line too
    (:func:`storage_error`), and so is a compiler that fails ``module.compile`` (:func:`compile_error`). Anything
    else is a bug and keeps its traceback."""
    with RunLog(name, enabled=rank_zero_only.rank == 0) as log, _releasing_run_dirs():
        log.file_only(command_line(name))
        run_dir = None
        warning = SlurmWarning()  # before training: every task of the job ends, and rank 0 requeues it
        try:
            with warning:
                module, dm, trainer, ckpt_path = build()
            run_dir = trainer.default_root_dir
            log.keep_in(run_dir)
            train(trainer, module, dm, ckpt_path)
        except (Exception, KeyboardInterrupt) as err:
            interrupted = interrupted_by_ctrl_c(err)
            storage = None if interrupted or isinstance(err, USER_ERRORS) else storage_error(err, run_dir)
            # finetune takes module.compile from the checkpoint's config, which "+" overrides
            override = "+module.compile=false" if name == "finetune" else "module.compile=false"
            compiler = None if interrupted or isinstance(err, USER_ERRORS) or storage else compile_error(
                err, "module.compile", f"the same command with {override} trains without it")
            if not (interrupted or isinstance(err, USER_ERRORS) or storage or compiler):
                raise  # a bug: its traceback
            # A second Ctrl-C must not cut the clean-up short with a traceback (nor leave half a run directory).
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if interrupted else None
            if interrupted:
                quiet_finalizers()
            try:
                message = f"manip.{name}: {'interrupted' if interrupted else storage or compiler or err}"
                status = 130 if interrupted else 1
                if interrupted and warning.received:  # SLURM's warning during the checks or the dataset's loading
                    then, status = (requeued("the same command starts the run") if rank_zero_only.rank == 0 else
                                    ("rank 0 requeues the job", 0))  # one requeue per job
                    message = f"manip.{name}: stopped by SIGUSR1 before training; {then}"
                log.file_only(message, logging.ERROR)
                if rank_zero_only.rank == 0:
                    refused()
                if rank_zero_only.rank == 0 or not warning.received:  # SLURM's warning: one line for the job
                    print(message, file=sys.stderr)
            finally:
                if handler is not None:
                    signal.signal(signal.SIGINT, handler)
            if not (interrupted or storage) and sweep.go_on_after(name, message):
                return  # a --multirun job refused: the sweep goes on with the next
            sys.exit(status)
        checkpoints = Path(trainer.default_root_dir) / "checkpoints"
        stopped_by = stop_signal(trainer)
        in_evaluation = final_evaluation_interrupted(trainer)
        if stopped_by or in_evaluation:
            last = checkpoints / "last.ckpt"
            signum = stopped_by or in_evaluation
            how = "interrupted" if signum == signal.SIGINT else f"stopped by {StopOnCtrlC.NAMES.get(signum)}"
            status = 143 if signum == signal.SIGTERM else 130  # 128 + the signal's number, as a shell reports
            then = "the same command continues the run" if stopped_by else "the same command runs that evaluation"
            if signum == signal.SIGUSR1:  # SLURM's warning: the requeued job runs the same command
                then, status = requeued(then) if trainer.is_global_zero else (then, 0)  # one requeue per job
            message = (f"manip.{name}: {how} at step {trainer.global_step}; {last} holds it, and {then}"
                       if stopped_by else
                       f"manip.{name}: {how} during the final evaluation; {last} holds the run's final step "
                       f"{trainer.global_step}, and {then}")
            log.file_only(message, logging.ERROR)
            if trainer.is_global_zero:  # one line for the run, also under DDP
                print(message, file=sys.stderr)
            sys.exit(status)
        if trainer.is_global_zero and checkpoints.is_dir():
            LOG.info(f"checkpoints in {checkpoints}")
