"""The Lightning module shared by ``fit`` (offline) and ``finetune`` (online).

One training step = one update: the critic loss and the actor loss are summed into one backward
pass over one (fused) Adam with two parameter groups (the critic is frozen while the actor loss is
built, so Q terms in actor losses never train the critic). ``trainer.global_step`` therefore
counts updates. The update's values are logged only at the updates whose row the loggers write
(every ``trainer.log_every_n_steps``, and at a stop). Under DDP the losses (the JVP included) run
on the inner agent networks, and the single ``manual_backward`` per step performs DDP's gradient
all-reduce (mean over ranks).

The noise inside the losses (x0, (t, r), best-of-N candidates, target proposals) comes from
``ManipModule.generator``, one stream per rank seeded with ``seed + global_rank``; checkpoints
carry every rank's generator and torch RNG states, so a resumed run draws what it would have drawn.

When ``online`` is set, each step first advances the simulator (vector env, best-of-N actions,
chunks executed open-loop) so that env steps ~= updates / utd, appends finished episodes to the
datamodule's replay, and then updates with the configured critic-driven policy target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from manip.algos.acting import fast_sampler, padded_sample
from manip.algos.base import NoiseStreams, masked_mean
from manip.algos.training import COMPILE_MODES, compiled, compiler_message, frozen, fused_adam, make_optimizer
from manip.cli_args import raise_if_interrupted
from manip.checkpoint import gather_rank_states, rank_state
from manip.evaluation import ChunkPolicy, VectorRollout
from manip.logs import LOG
from manip.settings import SettingError, check_int, check_real

TARGETS = ("bon", "som", "rfm", "replay")
Q_SCALES = ("mean_abs", "none")
PRIORS = ("auto", "box", "policy", "data")
# The agents' loss info repeats the two totals, logged as train/actor_loss and train/critic_loss.
_TOTALS = ("actor/loss", "critic/loss")


@dataclass
class OnlineConfig:
    """Online fine-tuning settings.

    target: "bon" (imitate best-of-N a* at batch states), "som" or "rfm" (critic-driven target
    velocities), "replay" (the offline loss on the replay's chunks alone: the executed best-of-N chunks become
    the imitation targets, QC's online design); bc_weight: weight of the plain MVP loss on replay actions
    added to the bon / som / rfm loss; alpha: inverse temperature of the Boltzmann target (alpha_final + alpha_steps give a linear schedule), applied
    to Q / mean|Q(s, a_batch)| with q_scale="mean_abs" (default) or to raw Q with q_scale="none";
    som_score_norm: None (default: the Monte-Carlo score, the target's marginal velocity) or w > 0: SOM with
    the score rescaled to length w (a greediness knob of SOM's practice, ``manip.algos.targets``); bound_std: scale of
    the Boltzmann target's Gaussian tail outside the action box (``manip.algos.targets``, *Action box*);
    prior: "auto" (default: som -> "data", rfm -> "policy"; bon and replay use none), "box" (the Boltzmann
    target over the action box), "policy" (rfm only: the target
    ``∝ pi(a | s) exp(alpha Q)`` with the current policy as prior, estimated from K policy samples) or
    "data" (som / rfm: ``∝ N(a; a_replay, prior_std^2 I) exp(alpha Q)``, a trust region around each
    replay chunk; its path points are built from the replay chunks);
    utd: updates per env step; start_training: env steps collected before updates start; critic_warmup: online
    updates at the start that train the critic alone (the policy and its weight average stay as they were);
    num_envs: parallel collection envs; target_samples: K proposals (som/rfm) or N candidates (bon), None for
    the target's own (``manip.algos.targets.TARGET_SAMPLES``: bon 32, som 100, rfm 32);
    start_step: the global step fine-tuning started from (the offline checkpoint's), so that
    env steps track online updates only; start_env_steps: the env steps of the checkpoint it started from (a
    fine-tuning run's; 0 for an offline one): ``start_training`` and the alpha schedule count this run's env steps.
    """

    target: str = "bon"
    bc_weight: float = 1.0
    alpha: float = 10.0
    alpha_final: float | None = None
    alpha_steps: int = 100_000
    rfm_eta: float | str = "optimal"
    q_scale: str = "mean_abs"
    som_score_norm: float | None = None
    bound_std: float | None = 0.1
    prior: str = "auto"
    prior_std: float = 0.2
    target_samples: int | None = None
    utd: float = 1.0
    start_training: int = 5000
    critic_warmup: int = 0
    num_envs: int = 1
    seed: int = 0
    start_step: int = 0
    start_env_steps: int = 0

    def __post_init__(self) -> None:
        """Raises ``SettingError`` naming ``finetune.<key>`` for the first setting out of range."""
        if self.target not in TARGETS:
            raise SettingError(f"unknown finetune.target {self.target!r}; expected one of {TARGETS}")
        if self.prior not in PRIORS:
            raise SettingError(f"unknown finetune.prior {self.prior!r}; expected one of {PRIORS}")
        if self.q_scale not in Q_SCALES:
            raise SettingError(f"unknown finetune.q_scale {self.q_scale!r}; expected one of {Q_SCALES}")
        from manip.algos.targets import AUTO_PRIOR, TARGET_SAMPLES

        if self.prior == "auto":
            self.prior = AUTO_PRIOR[self.target]
        if self.target_samples is None:
            self.target_samples = TARGET_SAMPLES[self.target]
        if self.prior == "policy" and self.target != "rfm":
            raise SettingError("finetune.prior=policy is a posterior-mean (value-only) target: use finetune.target=rfm")
        if self.prior == "data" and self.target in ("bon", "replay"):
            raise SettingError(f"finetune.prior=data shapes the som / rfm Boltzmann target; {self.target} has no prior")
        check_real(self.bc_weight, "finetune.bc_weight", 0.0)
        check_real(self.alpha, "finetune.alpha", 0.0)
        if self.alpha_final is not None:
            check_real(self.alpha_final, "finetune.alpha_final", 0.0)
        self.alpha_steps = check_int(self.alpha_steps, "finetune.alpha_steps", 1)
        eta = self.rfm_eta
        if eta != "optimal" and (isinstance(eta, (str, bool)) or not isinstance(eta, numbers.Real)
                                 or not math.isfinite(eta)):
            raise SettingError(f"finetune.rfm_eta must be a number or 'optimal', got {eta!r}")
        if self.bound_std is not None:
            check_real(self.bound_std, "finetune.bound_std", 0.0, strict=True)
        if self.som_score_norm is not None:
            check_real(self.som_score_norm, "finetune.som_score_norm", 0.0, strict=True)
        check_real(self.prior_std, "finetune.prior_std", 0.0, strict=True)
        self.target_samples = check_int(self.target_samples, "finetune.target_samples", 1)
        check_real(self.utd, "finetune.utd", 0.0, strict=True)
        self.start_training = check_int(self.start_training, "finetune.start_training", 0)
        self.critic_warmup = check_int(self.critic_warmup, "finetune.critic_warmup", 0)
        self.num_envs = check_int(self.num_envs, "finetune.num_envs", 1)
        self.seed = check_int(self.seed, "finetune.seed", 0)
        self.start_step = check_int(self.start_step, "finetune.start_step", 0)
        self.start_env_steps = check_int(self.start_env_steps, "finetune.start_env_steps", 0)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "OnlineConfig":
        """The config of a ``finetune`` section (plain dict): ``SettingError`` for a key it does not have."""
        known = {f.name for f in dataclasses.fields(cls)}
        settings = dict(settings)
        if settings.pop("som_normalize_score", False):  # the earlier boolean, false in every default config
            raise SettingError("finetune.som_normalize_score is replaced by finetune.som_score_norm=<w>, the length "
                               "the score is rescaled to")
        unknown = sorted(set(settings) - known)
        if unknown:
            raise SettingError(f"unknown finetune.{unknown[0]}; expected one of {sorted(known)}")
        return cls(**settings)


def check_module_settings(obs_norm: str = "standard", actor_ema: float | None = None, lr: float | None = None,
                          tau: float | None = None, compile: bool | str | None = False) -> None:
    """Raise ``SettingError`` naming ``module.<key>`` for the first module setting out of range (None: not checked,
    except ``actor_ema``, where None turns the weight average off, and ``compile``, where it means false)."""
    if isinstance(compile, str) and compile not in COMPILE_MODES:
        import torch._dynamo

        if compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise SettingError(f"module.compile must be true, false, a torch.compile mode ({', '.join(COMPILE_MODES)}) "
                               f"or a backend such as inductor, got {compile!r}")
        try:  # a registered backend may need a package this machine lacks (tvm, openxla)
            torch.compile(torch.neg, backend=compile)(torch.zeros(1))
        except Exception as exc:  # noqa: BLE001 - any failure of the backend is the setting's
            raise_if_interrupted(exc)
            raise SettingError(f"module.compile={compile}: the backend does not run here "
                               f"({compiler_message(exc)})") from None
    elif compile is not None and not isinstance(compile, (bool, str)):
        raise SettingError(f"module.compile must be true, false, a torch.compile mode or a backend name, "
                           f"got {compile!r}")
    if obs_norm not in ("standard", "none"):
        raise SettingError(f"module.obs_norm must be standard or none, got {obs_norm!r}")
    if actor_ema is not None and not 0.0 < actor_ema < 1.0:
        raise SettingError(f"module.actor_ema must be in (0, 1) or null, got {actor_ema}")
    if lr is not None:
        check_real(lr, "module.lr", 0.0, strict=True)
    if tau is not None:
        check_real(tau, "module.tau", 0.0, strict=True, maximum=1.0)


def check_offline_fraction(fraction: float | None, key: str = "finetune.offline_fraction") -> float | None:
    """``fraction`` if it is None (batches drawn uniformly over the replay) or a share in [0, 1] of each batch drawn
    from the offline data; a SettingError naming ``key`` otherwise."""
    return None if fraction is None else check_real(fraction, key, 0.0, maximum=1.0)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: the run stops before that update, and before it saves or evaluates weights
    trained past the last finite losses."""


class WeightAverage(AveragedModel):
    """``AveragedModel``'s exponential moving average of a network's parameters and buffers (the first update
    copies them, then ``ema <- decay * ema + (1 - decay) * w``, as ``get_ema_multi_avg_fn``), with its state
    (``module.*`` and the update count ``n_averaged``), updated without reading the count back: torch's update
    compares the count with 0 on the host, a GPU sync at every update. Whether the count is 0 is kept on the host,
    read from the count once after a state dict was loaded."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self._started: bool | None = False  # n_averaged > 0; None: unknown (a loaded count), read at the next update

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._started = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [p.detach() for p in (*model.parameters(), *model.buffers())]
        if self._started is None:
            self._started = bool(self.n_averaged > 0)
        if not self._started:
            torch._foreach_copy_(averaged, current)
        else:
            floats = [(a, w) for a, w in zip(averaged, current, strict=True) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [w for _, w in floats], 1.0 - self.decay)
            for a, w in zip(averaged, current, strict=True):
                if not a.is_floating_point():
                    a.copy_(a * self.decay + w * (1.0 - self.decay))
        self.n_averaged += 1
        self._started = True


class ManipModule(L.LightningModule):
    """Actor-critic agent + observation normalisation + (optionally) online collection.

    agent: a ``functools.partial`` of an agent class (``manip.algos``) that takes
    ``obs_dim, action_dim, horizon``; stats: ``DatasetStats.to_dict()`` of the offline data;
    cfg: the full run config (plain dict) kept in the checkpoint; seed: seed of the loss-noise
    generator (rank r uses ``seed + r``); compile: ``torch.compile`` the actor loss (the JVP path), the
    critic loss (the TD target's best-of-N) and acting, meant for GPU training: true for the default
    backend (inductor), a mode of ``COMPILE_MODES`` (inductor; "reduce-overhead" adds CUDA graphs) or a
    backend name (e.g. "aot_eager"); false (default) runs eagerly. actor_ema: decay of an exponential moving
    average of the acting network's weights (e.g. 0.999), updated after every optimizer step and
    used whenever the module acts (evaluation, online collection, ``predict_chunks``); training
    losses and the critic's target actions keep the raw weights. None (default): act with the raw
    weights.
    """

    def __init__(self, agent: Callable[..., nn.Module], obs_dim: int, action_dim: int, horizon: int,
                 stats: dict[str, list[float]], cfg: dict | None = None, lr: float = 3e-4,
                 tau: float = 0.005, obs_norm: str = "standard", grad_clip: float | None = None,
                 online: dict | None = None, seed: int = 0, compile: bool | str = False,
                 actor_ema: float | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters({"cfg": cfg, "obs_dim": obs_dim, "action_dim": action_dim,
                                   "horizon": horizon, "stats": stats})
        self.obs_dim, self.action_dim, self.horizon = obs_dim, action_dim, horizon
        self.lr, self.tau, self.grad_clip, self.seed = lr, tau, grad_clip, seed
        check_module_settings(obs_norm, actor_ema, lr, tau)
        self.agent = agent(obs_dim=obs_dim, action_dim=action_dim, horizon=horizon)
        mean = torch.tensor(stats["obs_mean"], dtype=torch.float32)
        std = torch.tensor(stats["obs_std"], dtype=torch.float32)
        if obs_norm == "none":
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        if len(mean) != obs_dim:
            raise ValueError(f"stats have obs dim {len(mean)}, module has obs_dim={obs_dim}")
        self.register_buffer("obs_mean", mean)
        # Constant dimensions (std ~ 0) pass through centred instead of blowing up.
        self.register_buffer("obs_scale", torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.online = OnlineConfig.from_settings(online) if online else None
        self.ema_actor: AveragedModel | None = None
        if actor_ema is not None:
            self.ema_actor = WeightAverage(getattr(self.agent, self.agent.acting_net), actor_ema)
            self.ema_actor.requires_grad_(False)  # averaged, never optimised (and ignored by DDP)
        self.env_steps = 0
        if self.online is not None:
            # the target's alpha of this update, set in place (see losses): a compiled actor loss takes it as an input
            self.register_buffer("_alpha_now", torch.tensor(float(self.online.alpha)), persistent=False)
        self.episodes = self.successes = 0  # online episodes collected so far, and how many of them succeeded
        self.rollout: VectorRollout | None = None
        self._online_clock = (0.0, 0)  # (perf_counter, env_steps) when this process started collecting
        self._compiled = compile not in (False, None)
        self._actor_loss_fn = compiled(self.actor_loss, compile)
        self._critic_loss_fn = compiled(self.agent.critic_loss, compile)
        self._sample_fn = compiled(self.agent.sample_actions, compile)
        self._compiled_sample = self._sample_fn if self._compiled else None
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        # False: a checkpoint's random states are not restored (a new fine-tuning run draws from its own seed)
        self.restore_random_states = True
        self.checkpoint_online_replay = True  # False while the step checkpoints are written (run.LastCheckpoint)
        # Losses not yet checked for NaN / inf, kept on the device: on a GPU the check (a sync) waits for a logging
        # step, a checkpoint or an evaluation (raise_if_diverged); elsewhere every update checks at once.
        self._unchecked_losses: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.check_losses_every_update: bool | None = None  # None: on any device but a GPU; True / False: always / never
        # This update's values for the loggers (see on_train_batch_end), and the episodes that ended in it
        self._update_logs: dict[str, float | torch.Tensor] = {}
        self._update_loss: torch.Tensor | None = None
        self.progress_loss: float | None = None  # actor + critic loss of the last logged update
        self._ended_episodes: list = []

    # ---------------------------------------------------------------------------------- acting
    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_scale

    @contextlib.contextmanager
    def acting_weights(self):
        """Inside, the agent's acting network is the weight average (when ``actor_ema`` is set)."""
        if self.ema_actor is None:
            yield
            return
        name = self.agent.acting_net
        raw = getattr(self.agent, name)
        setattr(self.agent, name, self.ema_actor.module)
        try:
            yield
        finally:
            setattr(self.agent, name, raw)

    @contextlib.contextmanager
    def fast_acting(self, dtype: str = "bfloat16", compile: bool = True, max_autotune: bool = True):
        """Inside, the module acts (``predict_chunks`` and the policies made from it) with
        :func:`manip.algos.acting.fast_sampler`: a frozen copy of the current acting weights (the weight average
        when ``actor_ema`` is set) whose networks run in ``dtype`` ("float32" or "bfloat16"), compiled unless
        ``compile`` is false. For evaluation and deployment; training keeps the module's own networks."""
        with self.acting_weights():
            sampler = fast_sampler(self.agent, dtype, compile, max_autotune)
        previous, self._sample_fn = self._sample_fn, sampler
        try:
            yield
        finally:
            self._sample_fn = previous

    @torch.inference_mode()
    def predict_chunks(self, obs: np.ndarray | torch.Tensor, num_samples: int | None = None,
                       noise_scale: float = 1.0, generator: NoiseStreams = None) -> np.ndarray:
        """obs (B, O) raw -> action chunks (B, h, A) in [-1, 1] (best-of-N with the agent's N).

        noise_scale: std of the candidates' initial noise (1: the learned distribution, used for online
        collection; evaluation takes ``eval.noise_scale``). generator: the noise's random stream, on the
        module's device (None: torch's global one), or B CPU streams, one per state (evaluation's, one per
        episode: see :class:`manip.evaluation.ChunkPolicy`).
        """
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.obs_mean.device)
        with self.acting_weights():
            if self._sample_fn is self._compiled_sample and len(obs_t):  # a few graphs for any number of states
                actions = padded_sample(self.agent, self._sample_fn, self.normalize(obs_t), num_samples, noise_scale,
                                        generator)
            else:
                actions = self._sample_fn(self.normalize(obs_t), num_samples=num_samples, noise_scale=noise_scale,
                                          generator=generator)
        return actions.reshape(len(obs_t), self.horizon, self.action_dim).float().cpu().numpy()

    # -------------------------------------------------------------------------------- training
    @property
    def generator(self) -> torch.Generator:
        """Noise generator of the training losses on this module's device (one stream per rank).

        Created at first use with seed ``seed + global_rank``, or with the state a checkpoint
        restored for this rank.
        """
        if self._generator is None or self._generator.device != self.device:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.seed + self.global_rank)
            state = self._pending_generator_state
            if state is not None and len(state) == len(generator.get_state()):
                generator.set_state(state)
            self._generator, self._pending_generator_state = generator, None
        return self._generator

    def configure_optimizers(self):
        return make_optimizer(self.agent.actor_parameters(), self.agent.critic_parameters(), self.lr)

    def _normalized_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "observations": self.normalize(batch["observations"]),
                "next_observations": self.normalize(batch["next_observations"])}

    def losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(actor loss, critic loss, detached info) of one update on a raw batch.

        The actor loss is built first with the critic frozen, then the critic loss; both draw
        their noise from ``generator`` in that order.
        """
        batch = self._normalized_batch(batch)
        alpha = None
        if self.online is not None:  # a tensor: a value read in the compiled loss would recompile it as it changes
            alpha = self._alpha_now.fill_(self.alpha)
        with frozen(self.agent.critic):
            actor_loss, actor_info = self._actor_loss_fn(batch, generator, alpha)
        critic_loss, critic_info = self._critic_loss_fn(batch, generator)
        return actor_loss, critic_loss, {**actor_info, **critic_info}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.online is not None:
            self._collect()  # the first update collects finetune.start_training env steps first
        if self._compiled:  # CUDA graphs (module.compile=reduce-overhead) may reuse the last update's outputs now
            torch.compiler.cudagraph_mark_step_begin()
        actor_loss, critic_loss, info = self.losses(batch, self.generator)
        # Copies: a CUDA graph (module.compile=reduce-overhead) reuses its outputs' memory at the next update
        losses = actor_loss.detach().clone(), critic_loss.detach().clone()
        self._unchecked_losses.append((self.global_step + 1, *losses))
        every_update = self.check_losses_every_update
        if every_update is None:
            every_update = self.device.type != "cuda"
        if every_update or (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.raise_if_diverged()  # before this update: the weights stay those of the last finite losses
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(actor_loss + critic_loss)  # both, so that DDP reduces every gradient as usual
        warming_up = (self.online is not None
                      and self.global_step - self.online.start_step < self.online.critic_warmup)
        if warming_up:  # the critic learns from the first online episodes before it drives the policy
            for param in self.agent.actor_parameters():
                param.grad = None  # Adam leaves a parameter without a gradient as it is (no momentum step)
        opt.step()  # clips the gradients first (on_before_optimizer_step)
        self.agent.soft_update(self.tau)
        if self.ema_actor is not None and not warming_up:
            self.ema_actor.update_parameters(getattr(self.agent, self.agent.acting_net))
        self._update_logs.update({"train/actor_loss": actor_loss.detach(), "train/critic_loss": critic_loss.detach(),
                                  **{f"train/{k}": v for k, v in info.items() if k not in _TOTALS}})
        if self.online is not None:
            self._update_logs["online/env_steps"] = float(self.env_steps)
        self._update_loss = (actor_loss + critic_loss).detach()
        if self.trainer._logger_connector.should_update_logs:
            self._log_update()
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clips the gradients' total norm to ``module.grad_clip``, here, inside ``opt.step()``, where Lightning has
        unscaled 16-mixed's gradients for an optimizer it unscales; the fused Adam unscales them in its own step, so
        for it they are unscaled here first (then its step leaves them as they are). Lightning's own
        mixed-precision clipping refuses such an optimizer; bf16-mixed has no scale."""
        if not self.grad_clip:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       self.grad_clip)

    def _log_update(self) -> None:
        """Logs this update's values (``train/...``, ``online/...``, ``loss`` for callbacks and the progress bar's
        ``progress_loss``) for its row.

        Only at the updates whose row Lightning writes: every ``trainer.log_every_n_steps`` and at a stop. Each
        ``self.log`` call costs Lightning's bookkeeping, about a third of a millisecond, as much as a small network's
        whole update on a GPU, and a value logged at any other update would never be written. Callbacks (their
        ``on_train_batch_end``) see the values of a row's update in ``trainer.callback_metrics``."""
        logs, self._update_logs = self._update_logs, {}
        if not logs:
            return
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=1)
        if self._update_loss is not None:
            # The progress bar's figure (run.ProgressBar, run.ProgressLines) is a float read here, where the row's
            # values are read anyway: a tensor logged with prog_bar=True is read by Lightning after every batch.
            self.progress_loss = float(self._update_loss)
            self.log("loss", self._update_loss, logger=False, on_step=True, on_epoch=False, batch_size=1)
        self._log_update_count()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """A callback that stopped training in this update made it a row (Lightning writes one at a stop): its values,
        unless logged already. The episodes that ended are rows of their own, at each update where some ended."""
        if self._update_logs and self.trainer._logger_connector.should_update_logs:
            self._log_update()
        self._update_logs, self._update_loss = {}, None
        ended, self._ended_episodes = self._ended_episodes, []
        if ended:
            episodes = {"online/episode_success": float(np.mean([end.success for end in ended])),
                        "online/episode_length": float(np.mean([end.length for end in ended]))}
            for logger in self.loggers:
                logger.log_metrics(episodes, step=self.global_step)

    def raise_if_diverged(self) -> None:
        """Raises :class:`TrainingDiverged` naming the first update whose actor or critic loss was NaN or infinite
        since the last check (and the weights that produced it). Under DDP every process calls it at the same
        updates (each appends one entry per update) and all of them stop at the first bad update of any."""
        unchecked, self._unchecked_losses = self._unchecked_losses, []
        if not unchecked:
            return
        finite = torch.stack([torch.isfinite(a) & torch.isfinite(c) for _, a, c in unchecked])
        steps = torch.tensor([step for step, _, _ in unchecked], device=finite.device)
        never = unchecked[-1][0] + 1  # the steps count up
        first = torch.where(finite, never, steps).min()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)  # one process's bad loss stops all
        first = int(first)
        if first == never:
            return
        here = [(a, c) for (step, a, c), ok in zip(unchecked, finite.tolist()) if step == first and not ok]
        losses = (f"actor loss {here[0][0].item():.4g} and critic loss {here[0][1].item():.4g}" if here else
                  "a NaN or infinite loss in another process")
        raise TrainingDiverged(
            f"training diverged: update {first} had {losses}; the run stopped, and no weights trained past the last "
            f"finite losses were saved or evaluated (a lower module.lr, module.grad_clip, or a look at the dataset's "
            f"values)")

    def _log_update_count(self) -> None:
        """Sets the loggers' step of this batch's rows to the update count (``global_step``), as in evaluation rows
        and checkpoints (Lightning's default, its count of earlier batches, is one less)."""
        self.log("step", float(self.global_step), on_step=True, on_epoch=False, batch_size=1)

    def actor_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                   alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Offline: the agent's own actor loss. Online (MVP): the configured critic-driven target.

        ``finetune.target=replay`` and agents without a mean-velocity ``policy_loss`` (QC, BFN, FQL) keep the
        agent's own actor loss online, on replay batches that now include online episodes (as in QC). ``batch`` has
        normalised observations; noise comes from ``generator``; ``alpha``: the target's alpha, a 0-dim tensor on
        the batch's device (None: ``self.alpha``).
        """
        if self.online is None or self.online.target == "replay" or not hasattr(self.agent, "policy_loss"):
            return self.agent.actor_loss(batch, generator)
        from manip.algos import targets

        cfg, obs, valid = self.online, batch["observations"], batch.get("valid")
        # The critic never trains at a state whose replay chunk runs past its episode's end (its TD weight is
        # valid[:, -1] = 0), so Q there is extrapolation: such rows get no critic-driven target, whatever the prior.
        trained = None if valid is None else valid[:, -1:]
        if cfg.prior == "data":
            # path points around the replay chunks, where the trust-region target lives
            target_actions = batch["actions"]
            target_valid = None if valid is None else valid * trained
        else:
            with torch.no_grad():
                num_samples = cfg.target_samples if cfg.target == "bon" else 1
                target_actions = self.agent.sample_actions(obs, num_samples=num_samples, generator=generator)
            target_valid = None if valid is None else trained.expand_as(valid)
        target_fn = None
        if alpha is None:
            alpha = torch.tensor(self.alpha, device=obs.device)
        if cfg.target != "bon":
            if cfg.q_scale == "mean_abs":
                # alpha in units of the batch's mean |Q| over the rows the critic trains on (QC / FQL's Q
                # normalisation): the Boltzmann target's sharpness no longer depends on the reward scale or horizon.
                with torch.no_grad():
                    abs_q = self.q_value(obs, batch["actions"].reshape(len(obs), -1)).abs()
                    mean_abs_q = abs_q.mean() if trained is None else masked_mean(abs_q, trained[:, 0])
                alpha = alpha / mean_abs_q.clamp_min(1e-6)
            if cfg.prior == "policy":
                target_fn = self._policy_prior_target(obs, target_actions, alpha, generator)
            else:
                extra = {"eta": cfg.rfm_eta} if cfg.target == "rfm" else {"score_norm": cfg.som_score_norm}
                if cfg.prior == "data":
                    extra.update(prior_mean=batch["actions"].reshape(len(obs), -1), prior_std=cfg.prior_std)
                target_fn = targets.make_target_fn(cfg.target, self.q_value, obs, alpha, bound_std=cfg.bound_std,
                                                   num_samples=cfg.target_samples, generator=generator, **extra)
        loss, info = self.agent.policy_loss(obs, target_actions, target_valid, target_velocity_fn=target_fn,
                                            generator=generator)
        info = {f"target_{k}": v for k, v in info.items()}
        if target_fn is not None:
            info["target_alpha"] = alpha.detach().clone()  # not the buffer itself, which the next update sets
        if cfg.bc_weight:
            bc_loss, _ = self.agent.actor_loss(batch, generator)
            loss = loss + cfg.bc_weight * bc_loss
            info["bc_loss"] = bc_loss.detach()
        return loss, info

    def _policy_prior_target(self, obs: torch.Tensor, actions: torch.Tensor, alpha: float | torch.Tensor,
                             generator: torch.Generator | None):
        """RFM target under the behaviour prior: proposals are each row's own policy sample ``actions`` (B, D),
        the one its x_t is built from, and K more policy samples, all scored once by the critic."""
        from manip.algos import targets

        batch, k = obs.shape[0], self.online.target_samples
        with torch.no_grad():
            more = self.agent.generate(obs.repeat_interleave(k, dim=0), generator).view(batch, k, -1)
            proposals = torch.cat([actions.detach()[:, None], more], dim=1)
            q = self.q_value(obs.repeat_interleave(k + 1, dim=0), proposals.flatten(0, 1)).view(batch, k + 1)
        return lambda x_t, t: targets.policy_prior_target_velocity(x_t, t, proposals, q, alpha)

    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Aggregated critic ensemble (the agent's ``q_agg``): obs (M, O) normalised, actions (M, D) -> (M,)."""
        return self.agent.aggregate_q(self.agent.critic(obs, actions))

    @property
    def alpha(self) -> float:
        cfg = self.online
        if cfg.alpha_final is None:
            return cfg.alpha
        frac = min(1.0, self.run_env_steps / max(1, cfg.alpha_steps))
        return cfg.alpha + frac * (cfg.alpha_final - cfg.alpha)

    @property
    def run_env_steps(self) -> int:
        """Env steps of this fine-tuning run (``env_steps`` counts those of the runs it continues too)."""
        return self.env_steps - self.online.start_env_steps

    # ---------------------------------------------------------------------------------- online
    def _collect(self) -> None:
        """Advance the simulator until env_steps catches up with online updates / utd."""
        if self.rollout is None:
            self._start_rollout()
            self._online_clock = (time.perf_counter(), self.env_steps)
            if self.run_env_steps < self.online.start_training and self.global_rank == 0:
                LOG.info(f"collecting {self.online.start_training - self.run_env_steps} env steps "
                         f"(finetune.start_training) before the first online update")
        updates = self.global_step - self.online.start_step + 1
        # QC: start_training env steps first, then utd updates per env step.
        target = self.online.start_env_steps + self.online.start_training + updates / self.online.utd
        dm = self.trainer.datamodule
        ended = []
        while self.env_steps < target:
            for end in self.rollout.step():
                dm.replay.add(end.transitions)
                ended.append(end)
            self.env_steps += self.rollout.num_envs
        self.episodes += len(ended)
        self.successes += sum(bool(end.success) for end in ended)
        # Running totals: any logged row (one every trainer.log_every_n_steps) gives the success rate between rows.
        self._update_logs.update({"online/episodes": float(self.episodes), "online/successes": float(self.successes)})
        self._ended_episodes += ended
        # Throughput of the whole online loop (collection + updates) since this process started it.
        started, steps0 = self._online_clock
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            self._update_logs["online/env_steps_per_s"] = (self.env_steps - steps0) / elapsed

    def _start_rollout(self) -> None:
        """Collection envs and their episodes' noise streams, seeded by (finetune seed, rank, env steps so far): a
        resumed run or another rank never replays the same episodes, nor draws the same noise (the global
        generators, which every rank seeds alike, draw none of it)."""
        from manip.envs import make_vector_env

        spec = self.trainer.datamodule.env_spec
        env = make_vector_env(spec, self.online.num_envs, obs_dim=self.obs_dim, action_dim=self.action_dim)
        env_seed, noise_seed = np.random.SeedSequence([self.online.seed, self.global_rank,
                                                       self.env_steps]).generate_state(2)
        policy = ChunkPolicy(self.predict_chunks, env.num_envs, noise_seed=int(noise_seed))
        self.rollout = VectorRollout(env, policy, seed=int(env_seed), record=True)

    def on_train_end(self) -> None:
        self.close_rollout()

    def close_rollout(self) -> None:
        """Closes the online collection's simulators (at the end of training, or after a run failed)."""
        if self.rollout is not None:
            from manip.envs import close_vector_env

            close_vector_env(self.rollout.env)
            self.rollout = None

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds env steps, every rank's RNG states and (online) the collected episodes.

        Under DDP the episodes are rank 0's: a resumed multi-process run restarts every rank's
        online buffer from them. ``checkpoint_online_replay = False`` leaves them out (the step checkpoints).
        """
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # The episodes in progress are not saved: their steps are not counted either, so that a resumed run
        # collects them again and its replay keeps pace with its env steps.
        unfinished = int(self.rollout.lengths.sum()) if self.rollout is not None else 0
        checkpoint["manip"] = {"env_steps": self.env_steps - unfinished, "episodes": self.episodes,
                               "successes": self.successes, "rng": gather_rank_states(self._trainer, rng)}
        dm = self._trainer.datamodule if self._trainer is not None else None
        if self.online is not None and dm is not None and dm.replay is not None and self.checkpoint_online_replay:
            checkpoint["manip"]["online_replay"] = dm.replay.online_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._match_weight_average(checkpoint["state_dict"])
        # A saved optimizer's param groups replace the fresh optimizer's, with their fused setting: one saved by
        # an unfused Adam (checkpoints of earlier versions), or on another device, trains as this run's would.
        device = self._trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for group in optimizer_state.get("param_groups", []):
                group.update(fused=fused_adam({device}), foreach=None)
        state = checkpoint.get("manip", {})
        self.env_steps = int(state.get("env_steps", 0))
        self.episodes, self.successes = int(state.get("episodes", 0)), int(state.get("successes", 0))
        online_replay = state.get("online_replay")
        dm = self._trainer.datamodule if self._trainer is not None else None
        replay = getattr(dm, "replay", None)  # the trainer sets the data up before it restores a checkpoint
        if online_replay is not None and self.online is not None and replay is not None:
            # here, not at train start: the fit loop draws its first batch before on_train_start
            replay.load_online_state_dict(online_replay)
        rng = rank_state(state.get("rng"), self._trainer) if self.restore_random_states else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], torch.cuda.current_device())
            self._generator, self._pending_generator_state = None, rng["generator"]

    def _match_weight_average(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Lets a checkpoint with or without ``ema_actor`` weights load into this module: an average
        missing from the checkpoint starts from its acting network, an unused one is dropped."""
        has_ema = any(key.startswith("ema_actor.") for key in state_dict)
        if self.ema_actor is None and has_ema:
            for key in [key for key in state_dict if key.startswith("ema_actor.")]:
                del state_dict[key]
        elif self.ema_actor is not None and not has_ema:
            prefix = f"agent.{self.agent.acting_net}."
            for key, value in list(state_dict.items()):
                if key.startswith(prefix):
                    state_dict["ema_actor.module." + key[len(prefix):]] = value.clone()
            state_dict["ema_actor.n_averaged"] = torch.tensor(1, dtype=torch.long)

    def on_train_start(self) -> None:
        # A restored optimizer brings back its run's learning rate; the configured one (module.lr) applies.
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr
