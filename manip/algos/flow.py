"""QC and BFN: a flow behaviour-cloning policy (10 Euler steps) acting by best-of-N under the critic.

Time convention: see :mod:`manip.algos`. The velocity net is trained by flow matching,
``|| v(x_t, t | s) - (a - x0) ||^2`` with ``t ~ U(0, 1)``; no Q gradient reaches the actor. QC uses chunks of
h = 5 and N = 32 candidates; BFN uses h = 1 and N = 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from manip.algos.base import ActorCriticAgent, Batch, check_agent_settings, flatten_chunk, masked_mean
from manip.algos.networks import VelocityNet

__all__ = ["flow_matching_loss", "euler_sample", "FlowBoNAgent"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flow_matching_loss(
    vel_net: VelocityFn,
    obs: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Conditional flow matching on the linear path.

    Args:
        vel_net: ``vel_net(obs, x, t) -> (B, D)``.
        obs: (B, O); actions: (B, D) flattened chunks; valid: (B, D) element weights or None.
    Returns:
        scalar masked mean of ``(v(x_t, t) - (a - x0))^2``.
    """
    batch = actions.shape[0]
    x0 = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
    t = torch.rand(batch, generator=generator, device=actions.device, dtype=actions.dtype)
    x_t = torch.lerp(x0, actions, t.unsqueeze(-1))
    return masked_mean((vel_net(obs, x_t, t) - (actions - x0)).square(), valid)


def euler_sample(vel_net: VelocityFn, obs: torch.Tensor, noise: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t | s)`` from t = 0 (noise) to t = 1 with ``steps`` Euler steps.

    obs (B, O), noise (B, D) -> actions (B, D) clipped to [-1, 1].
    """
    x = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((noise.shape[0],), i * dt, device=noise.device, dtype=noise.dtype)
        x = x + dt * vel_net(obs, x, t)
    return x.clamp(-1.0, 1.0)


class FlowBoNAgent(ActorCriticAgent):
    """Flow BC policy with best-of-N selection (QC: ``horizon=5, num_samples=32``; BFN: ``horizon=1, num_samples=4``).

    critic_loss (from :class:`ActorCriticAgent`): chunked TD loss, ``a'`` = best-of-N flow samples at ``s'``
    ranked by the critic ``td_select`` names (QC's code: the online one). actor_loss: :func:`flow_matching_loss` on
    the batch's chunks. sample_actions: N ``flow_steps``-step Euler samples, argmax of the aggregated critic
    (``q_agg``, default the mean).
    """

    TIME_FEATURES = "flow"  # the time_dim rule check_agent_settings applies

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        horizon: int = 5,
        hidden_dims: Sequence[int] = (512,) * 4,
        num_critics: int = 2,
        num_samples: int = 32,
        discount: float = 0.99,
        flow_steps: int = 10,
        time_dim: int = 32,
        q_agg: str = "mean",
        critic_block: str = "linear_gelu_norm",
        td_select: str = "target",
    ):
        check_agent_settings(time_features=self.TIME_FEATURES, flow_steps=flow_steps, time_dim=time_dim)
        super().__init__(obs_dim, action_dim, horizon, hidden_dims, num_critics, num_samples, discount, q_agg,
                         critic_block, td_select)
        self.flow_steps = flow_steps
        self.actor = VelocityNet(obs_dim, self.act_dim_flat, hidden_dims, time_dim)

    def actor_loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Flow-matching BC loss on the batch's action chunks (valid steps only)."""
        actions, mask = flatten_chunk(batch["actions"], batch.get("valid"))
        loss = flow_matching_loss(self.actor, batch["observations"], actions, mask, generator)
        return loss, {"actor/loss": loss.detach(), "actor/bc_loss": loss.detach()}

    def transport(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``flow_steps`` Euler steps of the velocity field per row: obs (M, O), noise (M, D) -> (M, D)."""
        return euler_sample(self.actor, obs, noise, self.flow_steps)
