"""Common agent skeleton: an actor that generates flattened action chunks plus a chunked critic ensemble.

Subclasses implement ``generate(obs, generator, noise_scale)`` (one action chunk per row) and ``actor_loss(batch)``;
this base owns the critic, its target copy, ``critic_loss``, ``soft_update`` and best-of-N ``sample_actions``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from manip.algos.critic import best_of_n, chunk_td_target, critic_loss, soft_update
from manip.algos.networks import CRITIC_BLOCKS, CriticEnsemble
from manip.settings import SettingError, check_int, check_real

__all__ = ["ActorCriticAgent", "NoiseStreams", "Q_AGGREGATES", "TD_SELECTORS", "check_agent_settings",
           "flatten_chunk", "masked_mean", "unit_noise"]

Batch = dict[str, torch.Tensor]
# One random stream, or one CPU stream per state (evaluation: each episode draws its own noise).
NoiseStreams = torch.Generator | Sequence[torch.Generator] | None
Q_AGGREGATES = ("mean", "min")
# Which critic ranks the N candidates of the TD target's next action (the target critic then scores the winner).
TD_SELECTORS = ("target", "online")
# Agent settings that count something (samples, networks, integration steps, units): integers >= 1.
_COUNTS = ("num_samples", "num_critics", "flow_steps", "sample_steps", "time_dim")
_FRACTIONS = ("boundary_fraction", "full_interval_fraction")


def check_agent_settings(horizon: int | None = None, time_features: str | None = None, **settings) -> None:
    """Raise ``SettingError`` naming ``algo.horizon`` or ``algo.agent.<key>`` for the first setting out of range.

    Checked when given: horizon, num_samples, num_critics, flow_steps, sample_steps, time_dim (integers >= 1),
    hidden_dims (a non-empty list of integers >= 1), boundary_fraction and full_interval_fraction (in [0, 1]),
    q_agg (one of ``Q_AGGREGATES``), critic_block (one of ``CRITIC_BLOCKS``) and td_select (one of ``TD_SELECTORS``);
    other keys pass unchecked. ``time_features`` (the agent class's ``TIME_FEATURES``): "mean_velocity" requires
    a time_dim that is a multiple of 4 (half for t, half for r - t), "flow" 1 (t itself) or an even number. The
    agents call it in their constructors, and the entry points with the composed ``algo`` config before any data
    is loaded.
    """
    if horizon is not None:
        check_int(horizon, "algo.horizon", 1)
    for key in _COUNTS:
        if key in settings:
            check_int(settings[key], f"algo.agent.{key}", 1)
    time_dim = settings.get("time_dim")
    if time_features == "mean_velocity" and time_dim is not None and time_dim % 4:
        raise SettingError(f"algo.agent.time_dim must be a multiple of 4 (sinusoidal features of t and of r - t), "
                           f"got {time_dim}")
    if time_features == "flow" and time_dim is not None and time_dim != 1 and time_dim % 2:
        raise SettingError(f"algo.agent.time_dim must be 1 (t itself) or an even number of sinusoidal features, "
                           f"got {time_dim}")
    if "hidden_dims" in settings:
        dims = settings["hidden_dims"]
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
            raise SettingError(f"algo.agent.hidden_dims must be a non-empty list of layer sizes, got {dims!r}")
        for i, dim in enumerate(dims):
            check_int(dim, f"algo.agent.hidden_dims[{i}]", 1)
    for key in _FRACTIONS:
        if key in settings:
            check_real(settings[key], f"algo.agent.{key}", 0.0, maximum=1.0)
    if "q_agg" in settings and settings["q_agg"] not in Q_AGGREGATES:
        raise SettingError(f"unknown algo.agent.q_agg {settings['q_agg']!r}; expected one of {Q_AGGREGATES}")
    if "critic_block" in settings and settings["critic_block"] not in CRITIC_BLOCKS:
        raise SettingError(f"unknown algo.agent.critic_block {settings['critic_block']!r}; expected one of "
                           f"{CRITIC_BLOCKS}")
    if "td_select" in settings and settings["td_select"] not in TD_SELECTORS:
        raise SettingError(f"unknown algo.agent.td_select {settings['td_select']!r}; expected one of {TD_SELECTORS}")


def unit_noise(shape: Sequence[int], generator: NoiseStreams, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn(shape)`` drawn from ``generator``: one stream (on ``device``; None: torch's global one), or a
    sequence of CPU streams, one per state, each drawing its equal, consecutive share of the rows (``shape[0]``
    states times their candidates). Per-state streams make a state's noise independent of which other states share
    the call, and of the device: evaluation gives each episode its own stream."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    streams = list(generator)
    if not streams or shape[0] % len(streams):
        raise ValueError(f"{len(streams)} noise streams for {shape[0]} rows: one stream per state is needed")
    share = (shape[0] // len(streams), *shape[1:])
    return torch.cat([torch.randn(share, generator=stream) for stream in streams]).to(device=device, dtype=dtype)


def flatten_chunk(actions: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten action chunks and expand the per-step validity flags to per-element weights.

    Args:
        actions: (B, h, A) chunks, or already flat (B, h * A).
        valid: (B, h) step flags (1 = inside the episode), or None.
    Returns:
        actions (B, h * A) and the weight mask (B, h * A) (None when ``valid`` is None).
    """
    batch = actions.shape[0]
    flat = actions.reshape(batch, -1)
    if valid is None:
        return flat, None
    per_step = flat.shape[1] // valid.shape[1]
    mask = valid.to(flat.dtype).unsqueeze(-1).expand(batch, valid.shape[1], per_step).reshape(batch, -1)
    return flat, mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the elements where ``mask`` (same shape, 0/1 weights) is set; plain mean if None."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class ActorCriticAgent(nn.Module):
    """Actor + critic ensemble over flattened chunks of ``horizon`` actions.

    The target critic is a frozen copy (``requires_grad=False``) that only :meth:`soft_update` changes; it is
    part of the state dict but not of :meth:`critic_parameters` or :meth:`actor_parameters`.
    ``acting_net`` names the network that generates actions when acting (weight averaging applies to it).
    ``critic_block``: the order of the critic's hidden layers (see :class:`~manip.algos.networks.CriticEnsemble`).
    ``td_select``: the critic whose ensemble ranks the best-of-N candidates of the TD target's next action,
    ``"target"`` (the MVP paper's ``argmax Q_phi'``) or ``"online"`` (QC's code); the target critic scores the
    chosen one either way.
    """

    acting_net = "actor"

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        horizon: int,
        hidden_dims: Sequence[int] = (512,) * 4,
        num_critics: int = 2,
        num_samples: int = 32,
        discount: float = 0.99,
        q_agg: str = "mean",
        critic_block: str = "linear_gelu_norm",
        td_select: str = "target",
    ):
        super().__init__()
        check_agent_settings(horizon, hidden_dims=hidden_dims, num_critics=num_critics, num_samples=num_samples,
                             q_agg=q_agg, critic_block=critic_block, td_select=td_select)
        self.q_agg, self.td_select = q_agg, td_select
        self.obs_dim, self.action_dim, self.horizon = obs_dim, action_dim, horizon
        self.act_dim_flat = horizon * action_dim
        self.num_samples = num_samples
        self.discount = discount
        self.critic = CriticEnsemble(obs_dim, self.act_dim_flat, num_critics, hidden_dims, layer_norm=True,
                                     block=critic_block)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    # -- parameters -------------------------------------------------------------------------------------
    def actor_parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable parameter outside the critic and its target."""
        for name, param in self.named_parameters():
            if not name.startswith(("critic.", "target_critic.")):
                yield param

    def critic_parameters(self) -> Iterator[nn.Parameter]:
        return self.critic.parameters()

    def aggregate_q(self, q: torch.Tensor) -> torch.Tensor:
        """Ensemble (E, M) -> (M,): the mean (QC) or the pessimistic min over members (FQL's ``q_agg=min``)."""
        return q.mean(0) if self.q_agg == "mean" else q.min(0).values

    # -- acting ---------------------------------------------------------------------------------------------
    def transport(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The policy's map from initial noise to actions: obs (M, O), noise (M, D) -> (M, D) in [-1, 1]."""
        raise NotImplementedError

    def initial_noise(self, rows: int, generator: NoiseStreams, like: torch.Tensor) -> torch.Tensor:
        """Unit Gaussian initial noise (rows, D) on ``like``'s device and dtype, drawn from ``generator`` (see
        :func:`unit_noise`: one stream, or one per state)."""
        return unit_noise((rows, self.act_dim_flat), generator, like.device, like.dtype)

    def generate(self, obs: torch.Tensor, generator: NoiseStreams = None, noise_scale: float = 1.0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """One policy sample per row from the initial noise ``noise_scale * N(0, I)``: obs (M, O) -> (M, D) in [-1, 1].

        ``noise_scale = 1`` samples the learned distribution; smaller values draw closer to the image of the noise
        mode (0: deterministic). ``noise``: the unit noise (M, D) to scale, drawn from ``generator`` when None.
        """
        if noise is None:
            noise = self.initial_noise(obs.shape[0], generator, obs)
        return self.transport(obs, noise_scale * noise)

    @staticmethod
    def candidates_per_state(num_samples: int, noise_scale: float) -> int:
        """Candidates :meth:`select` draws per state: N, or 1 when N = 1 or ``noise_scale = 0`` (every candidate
        would be the same)."""
        return 1 if num_samples == 1 or noise_scale == 0 else num_samples

    def select(
        self,
        obs: torch.Tensor,
        num_samples: int,
        critic: nn.Module,
        generator: NoiseStreams = None,
        noise_scale: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Best-of-N under ``critic``'s ensemble aggregated by ``q_agg``: obs (B, O) -> actions (B, D).

        One candidate skips the critic (see :meth:`candidates_per_state`). ``noise``: the candidates' unit noise
        (B * candidates, D), state-major, drawn from ``generator`` when None.
        """
        n = self.candidates_per_state(num_samples, noise_scale)
        if n == 1:
            return self.generate(obs, generator, noise_scale, noise)
        batch, obs_dim = obs.shape
        obs_rep = obs.unsqueeze(1).expand(batch, n, obs_dim).reshape(batch * n, obs_dim)
        candidates = self.generate(obs_rep, generator, noise_scale, noise)
        scores = self.aggregate_q(critic(obs_rep, candidates)).view(batch, n)
        return best_of_n(candidates.view(batch, n, -1), scores)[0]

    def sample_actions(
        self,
        obs: torch.Tensor,
        num_samples: int | None = None,
        generator: NoiseStreams = None,
        noise_scale: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Acting policy: best-of-N (N = ``num_samples``, default the agent's) by the online critic, candidates
        drawn from the initial noise ``noise_scale * N(0, I)`` (see :meth:`generate`; ``noise`` as in
        :meth:`select`).

        obs (B, O) -> actions (B, horizon * action_dim) in [-1, 1].
        """
        n = self.num_samples if num_samples is None else num_samples
        return self.select(obs, n, self.critic, generator, noise_scale, noise)

    def target_actions(self, next_obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions a' for the TD target: best-of-N at s' ranked by the critic ``td_select`` names. (B, O) -> (B, D)."""
        ranking = self.target_critic if self.td_select == "target" else self.critic
        return self.select(next_obs, self.num_samples, ranking, generator)

    # -- critic ---------------------------------------------------------------------------------------------
    def critic_loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Chunked TD loss ``weight * (Q(s, a) - y)^2``, weight = ``valid[:, -1]`` (QC).

        ``y = rewards + discount^h * masks * agg_e Q_target_e(s', a')`` (agg: ``q_agg``), a' from
        :meth:`target_actions`.
        """
        obs, next_obs = batch["observations"], batch["next_observations"]
        with torch.no_grad():
            next_q = self.aggregate_q(self.target_critic(next_obs, self.target_actions(next_obs, generator)))
            target = chunk_td_target(batch["rewards"], batch["masks"], next_q, self.discount**self.horizon)
        q = self.critic(obs, batch["actions"].reshape(obs.shape[0], -1))
        valid = batch.get("valid")
        loss = critic_loss(q, target, None if valid is None else valid[:, -1].to(q.dtype))
        info = {
            "critic/loss": loss.detach(),
            "critic/q_mean": q.detach().mean(),
            "critic/q_max": q.detach().max(),
            "critic/q_min": q.detach().min(),
            "critic/target_mean": target.mean(),
        }
        return loss, info

    def soft_update(self, tau: float = 0.005) -> None:
        """Polyak-average the critic into the target critic."""
        soft_update(self.target_critic, self.critic, tau)

    def actor_loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
