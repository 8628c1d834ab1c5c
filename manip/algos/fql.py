"""FQL and QC-FQL: flow BC plus a one-step student distilled from it and pushed up the critic.

Time convention: see :mod:`manip.algos`. Actor loss
``L = L_BC(flow) + alpha * ||mu(s, z) - euler(s, z)||^2 - Q(s, clip(mu(s, z)))``, the Q term scaled by
``1 / sg(mean |Q|)`` when ``normalize_q`` (off by default, as in FQL's and QC's code, where ``alpha`` was tuned
against the unscaled Q term). The agent acts with the student (one sample, no selection) and the
critic target uses the student's action at ``s'``. FQL: ``horizon=1``; QC-FQL: ``horizon=5``; ``alpha`` 100
(QC-FQL, OGBench offline-to-online), 300 for FQL on cube tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from manip.algos.base import ActorCriticAgent, Batch, check_agent_settings, flatten_chunk
from manip.algos.flow import euler_sample, flow_matching_loss
from manip.algos.networks import OneStepNet, VelocityNet

__all__ = ["fql_actor_loss", "FQLAgent"]


def fql_actor_loss(
    vel_net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    onestep_net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    critic: nn.Module,
    obs: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None,
    alpha: float,
    flow_steps: int = 10,
    normalize_q: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FQL actor loss.

    The critic is evaluated with detached parameters, so the Q term back-propagates into the student only and
    leaves the critic's ``.grad`` untouched.

    Args:
        vel_net: flow BC velocity ``(obs, x, t) -> (B, D)``; onestep_net: student ``(obs, z) -> (B, D)``.
        critic: ensemble ``(obs, actions) -> (E, B)``, aggregated by the mean.
        obs: (B, O); actions: (B, D) flattened chunks; valid: (B, D) element weights or None (BC term only).
        alpha: distillation weight.
    Returns:
        loss and detached info {"actor/loss", "actor/bc_loss", "actor/distill_loss", "actor/q_loss", "actor/q_mean"}.
    """
    bc = flow_matching_loss(vel_net, obs, actions, valid, generator)
    z = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
    with torch.no_grad():
        teacher = euler_sample(vel_net, obs, z, flow_steps)
    student = onestep_net(obs, z)
    distill = (student - teacher).square().mean()
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    q = torch.func.functional_call(critic, frozen, (obs, student.clamp(-1.0, 1.0))).mean(0)
    q_loss = -q.mean()
    if normalize_q:
        q_loss = q_loss / q.abs().mean().detach().clamp_min(1e-6)
    loss = bc + alpha * distill + q_loss
    info = {
        "actor/loss": loss.detach(),
        "actor/bc_loss": bc.detach(),
        "actor/distill_loss": distill.detach(),
        "actor/q_loss": q_loss.detach(),
        "actor/q_mean": q.detach().mean(),
    }
    return loss, info


class FQLAgent(ActorCriticAgent):
    """Flow Q-learning with a one-step student policy.

    critic_loss (from :class:`ActorCriticAgent`): chunked TD loss with ``a' = clip(mu(s', z))``.
    actor_loss: :func:`fql_actor_loss`. sample_actions: ``clip(mu(s, z))`` (``num_samples > 1`` would add
    best-of-N selection over student samples).
    """

    acting_net = "onestep"
    TIME_FEATURES = "flow"  # the time_dim rule check_agent_settings applies

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        horizon: int = 1,
        hidden_dims: Sequence[int] = (512,) * 4,
        num_critics: int = 2,
        discount: float = 0.99,
        alpha: float = 100.0,
        flow_steps: int = 10,
        normalize_q: bool = False,
        time_dim: int = 32,
        q_agg: str = "mean",
        critic_block: str = "linear_gelu_norm",
    ):
        check_agent_settings(time_features=self.TIME_FEATURES, flow_steps=flow_steps, time_dim=time_dim)
        super().__init__(obs_dim, action_dim, horizon, hidden_dims, num_critics, num_samples=1, discount=discount,
                         q_agg=q_agg, critic_block=critic_block)
        self.alpha, self.flow_steps, self.normalize_q = alpha, flow_steps, normalize_q
        self.flow = VelocityNet(obs_dim, self.act_dim_flat, hidden_dims, time_dim)
        self.onestep = OneStepNet(obs_dim, self.act_dim_flat, hidden_dims)

    def actor_loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """:func:`fql_actor_loss` on the batch (the critic is the online critic)."""
        actions, mask = flatten_chunk(batch["actions"], batch.get("valid"))
        return fql_actor_loss(
            self.flow,
            self.onestep,
            self.critic,
            batch["observations"],
            actions,
            mask,
            self.alpha,
            self.flow_steps,
            self.normalize_q,
            generator,
        )

    def transport(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One student call per row: obs (M, O), z (M, D) -> clip(mu(s, z)) (M, D)."""
        return self.onestep(obs, noise).clamp(-1.0, 1.0)
