"""MVP: one-step mean velocity policy trained with the MeanFlow identity plus the instantaneous velocity constraint.

Time convention: see :mod:`manip.algos`. The network ``u(x_t, t, r | s)`` is trained with

* ``L_MF  = E || u(x_t, t, r) - sg(v + (r - t) * du/dt) ||^2`` on pairs with r > t, where
  ``du/dt = d_x u . v + d_t u`` is one forward-mode JVP with tangents (v, 1, 0) over (x, t, r);
* ``L_IVC = E || u(x_t, t, t) - v ||^2`` on pairs with r = t (plain flow matching at the boundary);

``L = L_MF + lambda_ivc * L_IVC``. A ``boundary_fraction`` of each batch is given r = t; those samples skip the
JVP because their ``(r - t)`` factor vanishes. ``lambda_ivc = 0`` removes the r = t samples entirely.

Acting (generate-and-select): N one-step candidates ``a_i = clip(eps_i + u(eps_i, 0, 1 | s), -1, 1)``, the
critic ensemble (its mean; its min with ``q_agg=min``) picks the best. No Q gradient reaches ``u``; the critic
target uses the same best-of-N at ``s'`` scored by the target critic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from manip.algos.base import ActorCriticAgent, Batch, check_agent_settings, flatten_chunk, masked_mean
from manip.algos.networks import MeanVelocityNet

__all__ = [
    "sample_time_pair",
    "num_boundary_samples",
    "mean_velocity_and_derivative",
    "mean_flow_loss",
    "ivc_loss",
    "mvp_policy_loss",
    "sample_one_step",
    "sample_few_step",
    "MVPAgent",
]

MeanVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TargetVelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def num_boundary_samples(batch: int, boundary_fraction: float) -> int:
    """Number of r = t samples in a batch: ``round(boundary_fraction * batch)``."""
    if not 0.0 <= boundary_fraction <= 1.0:
        raise ValueError(f"boundary_fraction must be in [0, 1], got {boundary_fraction}")
    return int(round(boundary_fraction * batch))


def sample_time_pair(
    batch: int,
    generator: torch.Generator | None = None,
    mean: float = -0.4,
    std: float = 1.0,
    boundary_fraction: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    full_interval_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw interval endpoints 0 < t <= r < 1 from two logit-normal samples ``sigmoid(N(mean, std^2))``.

    t = min, r = max of the two draws; the first ``num_boundary_samples(batch, boundary_fraction)`` entries get
    r = t (the IVC samples), the rest keep r >= t (the MeanFlow samples). Of those MeanFlow samples, the first
    ``round(full_interval_fraction * count)`` get exactly (t, r) = (0, 1), the interval one-step generation
    jumps over: two logit-normal draws almost never land at both ends, so without them ``u(x, 0, 1)`` is only
    reached by extrapolation.

    In this package's convention the default LN(-0.4, 1) favours the noise end (median draw 0.40), so long
    intervals starting near t = 0, the ones one-step generation uses, are common. (MeanFlow's LN(-0.4, 1) pair
    with noise at t = 1 corresponds to ``mean=+0.4`` here, since ``1 - sigmoid(z) = sigmoid(-z)``.)

    Returns:
        t (B,), r (B,) and the boundary flags (B,) bool.
    """
    draws = torch.sigmoid(torch.randn(2, batch, generator=generator, device=device, dtype=dtype) * std + mean)
    t, r = torch.minimum(draws[0], draws[1]), torch.maximum(draws[0], draws[1])
    if not 0.0 <= full_interval_fraction <= 1.0:
        raise ValueError(f"full_interval_fraction must be in [0, 1], got {full_interval_fraction}")
    k = num_boundary_samples(batch, boundary_fraction)
    index = torch.arange(batch, device=draws.device)
    boundary = index < k
    full = (index >= k) & (index < k + int(round(full_interval_fraction * (batch - k))))
    t = torch.where(full, torch.zeros_like(t), t)
    r = torch.where(full, torch.ones_like(r), r)
    return t, torch.where(boundary, t, r), boundary


def mean_velocity_and_derivative(
    u_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = u_fn(x, t, r)`` and its total derivative ``du/dt = d_x u . v + d_t u`` (r fixed) in one JVP.

    Uses ``torch.func.jvp`` with tangents (v, 1, 0). Autocast is disabled inside, so the computation runs in the
    inputs' dtype (fp32 under mixed-precision training). ``u`` keeps its autograd graph to the parameters that
    ``u_fn`` closes over; ``dudt`` is meant for the stop-gradient target.

    Args:
        u_fn: (x (B, D), t (B,), r (B,)) -> (B, D), conditioning closed over.
        x: (B, D) points on the path, t, r: (B,) times, v: (B, D) velocity tangent.
    Returns:
        u (B, D), dudt (B, D).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.func.jvp(u_fn, (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


def _regression(
    pred: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor | None, adaptive_p: float | None
) -> torch.Tensor:
    """Masked mean of the squared error; with ``adaptive_p`` each element is scaled by ``sg(1/(e^2 + 1e-3)^p)``."""
    err = (pred - target.detach()).square()
    if adaptive_p is not None:
        err = err / (err.detach() + 1e-3).pow(adaptive_p)
    return masked_mean(err, weight_mask)


def mean_flow_loss(
    u: torch.Tensor,
    dudt: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
    adaptive_p: float | None = None,
) -> torch.Tensor:
    """MeanFlow identity loss: regress u (B, D) on ``sg(v + (r - t) * dudt)``.

    Args:
        u, dudt, v: (B, D); t, r: (B,); weight_mask: (B, D) element weights (valid chunk steps) or None;
        adaptive_p: exponent of the element-wise adaptive weight, None for plain MSE.
    Returns:
        scalar masked mean squared residual.
    """
    target = v + (r - t).unsqueeze(-1) * dudt
    return _regression(u, target, weight_mask, adaptive_p)


def ivc_loss(
    u_boundary: torch.Tensor,
    v: torch.Tensor,
    weight_mask: torch.Tensor | None = None,
    adaptive_p: float | None = None,
) -> torch.Tensor:
    """Instantaneous velocity constraint: regress ``u(x_t, t, t)`` (B, D) on the velocity v (B, D)."""
    return _regression(u_boundary, v, weight_mask, adaptive_p)


def mvp_policy_loss(
    net: MeanVelocityFn,
    obs: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None = None,
    lambda_ivc: float = 1.0,
    boundary_fraction: float = 0.5,
    adaptive_p: float | None = None,
    target_velocity_fn: TargetVelocityFn | None = None,
    generator: torch.Generator | None = None,
    time_mean: float = -0.4,
    time_std: float = 1.0,
    full_interval_fraction: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_MF + lambda_ivc * L_IVC`` on a batch of target actions.

    ``x_t = (1 - t) x0 + t a`` with ``x0 ~ N(0, I)``; the velocity is ``v = a - x0`` or, when
    ``target_velocity_fn`` is given, ``v_hat = target_velocity_fn(x_t, t)`` (detached), used in both terms and as
    the JVP tangent. A random ``round(boundary_fraction * B)`` of the rows get r = t (L_IVC), the others r >= t (L_MF).

    Args:
        net: mean velocity ``net(obs, x, t, r) -> (B, D)``.
        obs: (B, O); actions: (B, D) flattened target chunks; valid: (B, D) element weights or None.
        lambda_ivc: IVC weight; 0 also sets ``boundary_fraction`` to 0 (no r = t samples).
        target_velocity_fn: optional ``(x_t (B, D), t (B,)) -> v_hat (B, D)``.
        full_interval_fraction: share of the MeanFlow (r > t) samples placed on (t, r) = (0, 1).
    Returns:
        loss (scalar) and detached info {"actor/loss", "actor/mf_loss", "actor/ivc_loss"}.
    """
    if lambda_ivc == 0:
        boundary_fraction = 0.0
    batch = actions.shape[0]
    x0 = torch.randn(actions.shape, generator=generator, device=actions.device, dtype=actions.dtype)
    t, r, _ = sample_time_pair(
        batch,
        generator,
        time_mean,
        time_std,
        boundary_fraction,
        device=actions.device,
        dtype=actions.dtype,
        full_interval_fraction=full_interval_fraction,
    )
    # Time pair j goes to row order[j]: pairs [:k] have r = t (IVC), [k:] r >= t (MeanFlow). The rows are drawn at
    # random, not by position, so a batch with structure (a balanced batch is offline rows, then online rows)
    # feeds both terms from all of its parts.
    k = num_boundary_samples(batch, boundary_fraction)
    order = torch.randperm(batch, generator=generator, device=actions.device)
    t_rows = torch.empty_like(t).index_copy_(0, order, t)
    x_t = torch.lerp(x0, actions, t_rows.unsqueeze(-1))
    v = actions - x0 if target_velocity_fn is None else target_velocity_fn(x_t, t_rows).detach()

    mf = ivc = actions.new_zeros(())
    if k < batch:
        rows = order[k:]
        obs_mf = obs[rows]
        # Fresh (non-view) time tensors: forward-mode AD under torch.compile rejects views as primals.
        u, dudt = mean_velocity_and_derivative(
            lambda x, t_, r_: net(obs_mf, x, t_, r_), x_t[rows], t[k:].clone(), r[k:].clone(), v[rows]
        )
        mf = mean_flow_loss(u, dudt, v[rows], t[k:], r[k:], None if valid is None else valid[rows], adaptive_p)
    if k > 0:
        rows = order[:k]
        u_boundary = net(obs[rows], x_t[rows], t[:k], t[:k])
        ivc = ivc_loss(u_boundary, v[rows], None if valid is None else valid[rows], adaptive_p)
    loss = mf + lambda_ivc * ivc
    info = {"actor/loss": loss.detach(), "actor/mf_loss": mf.detach(), "actor/ivc_loss": ivc.detach()}
    return loss, info


def sample_one_step(net: MeanVelocityFn, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One-step generation ``a = clip(x0 + u(x0, 0, 1 | s), -1, 1)``: obs (B, O), noise (B, D) -> (B, D)."""
    return sample_few_step(net, obs, noise, 1)


def sample_few_step(net: MeanVelocityFn, obs: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` mean-velocity jumps over equal intervals, ``x <- x + (r - t) u(x, t, r)``, then clip.

    A mean velocity is exact for any interval, so every ``steps`` draws from the same distribution when u is
    exact; with a learned u, shorter intervals can be more accurate. ``steps = 1`` is one-step generation.
    """
    if steps < 1:
        raise ValueError(f"sample_steps must be >= 1, got {steps}")
    x = noise
    for i in range(steps):
        t = noise.new_full((noise.shape[0],), i / steps)
        r = noise.new_full((noise.shape[0],), (i + 1) / steps)
        x = x + (r - t).unsqueeze(-1) * net(obs, x, t, r)
    return x.clamp(-1.0, 1.0)


class MVPAgent(ActorCriticAgent):
    """Mean velocity policy with best-of-N selection over one-step candidates.

    critic_loss (from :class:`ActorCriticAgent`): chunked TD loss, ``a'`` = best-of-N one-step candidates at
    ``s'`` ranked by the critic ``td_select`` names (default the target critic, the paper's Eq. 20).
    actor_loss: :func:`mvp_policy_loss` on the batch's action chunks.
    sample_actions: N one-step candidates, argmax of the aggregated critic (``q_agg``, default the mean).
    ``lambda_ivc = 0`` is the no-IVC ablation.
    """

    TIME_FEATURES = "mean_velocity"  # the time_dim rule check_agent_settings applies

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        horizon: int,
        hidden_dims: Sequence[int] = (512,) * 4,
        num_critics: int = 2,
        num_samples: int = 32,
        discount: float = 0.99,
        lambda_ivc: float = 1.0,
        boundary_fraction: float = 0.5,
        time_mean: float = -0.4,
        time_std: float = 1.0,
        adaptive_p: float | None = None,
        time_dim: int = 64,
        sample_steps: int = 1,
        full_interval_fraction: float = 0.0,
        q_agg: str = "mean",
        critic_block: str = "linear_gelu_norm",
        td_select: str = "target",
    ):
        check_agent_settings(time_features=self.TIME_FEATURES, sample_steps=sample_steps, time_dim=time_dim,
                             boundary_fraction=boundary_fraction, full_interval_fraction=full_interval_fraction)
        super().__init__(obs_dim, action_dim, horizon, hidden_dims, num_critics, num_samples, discount, q_agg,
                         critic_block, td_select)
        self.sample_steps = sample_steps
        self.lambda_ivc = lambda_ivc
        self.boundary_fraction = 0.0 if lambda_ivc == 0 else boundary_fraction
        self.time_mean, self.time_std = time_mean, time_std
        self.full_interval_fraction = full_interval_fraction
        self.adaptive_p = adaptive_p
        self.actor = MeanVelocityNet(obs_dim, self.act_dim_flat, hidden_dims, time_dim)

    @property
    def sample_steps(self) -> int:
        """Mean-velocity jumps per sample (1: one-step generation); settable after training, e.g. to evaluate."""
        return self._sample_steps

    @sample_steps.setter
    def sample_steps(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {steps}")
        self._sample_steps = steps

    def actor_loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """:meth:`policy_loss` on the batch's observations, action chunks and validity flags."""
        return self.policy_loss(batch["observations"], batch["actions"], batch.get("valid"), generator=generator)

    def policy_loss(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        valid: torch.Tensor | None = None,
        target_velocity_fn: TargetVelocityFn | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """MVP loss towards ``actions``.

        Args:
            obs: (B, O); actions: (B, h, A) or (B, h * A); valid: (B, h) step flags or None.
            target_velocity_fn: optional ``(x_t (B, D), t (B,)) -> v_hat (B, D)`` replacing ``a - x0``.
        """
        flat, mask = flatten_chunk(actions, valid)
        return mvp_policy_loss(
            self.actor,
            obs,
            flat,
            mask,
            lambda_ivc=self.lambda_ivc,
            boundary_fraction=self.boundary_fraction,
            adaptive_p=self.adaptive_p,
            target_velocity_fn=target_velocity_fn,
            generator=generator,
            time_mean=self.time_mean,
            time_std=self.time_std,
            full_interval_fraction=self.full_interval_fraction,
        )

    def transport(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One mean-velocity jump per row (``sample_steps`` of them if > 1): obs (M, O), noise (M, D) -> (M, D).
        Zero noise gives ``clip(u(0, 0, 1 | s))``."""
        return sample_few_step(self.actor, obs, noise, self.sample_steps)
