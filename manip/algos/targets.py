"""Critic-driven policy targets for online fine-tuning: best-of-N, SOM and reverse flow matching.

Time convention: the project's linear path (see :mod:`manip.algos`), noise at t = 0 and action at
t = 1, ``x_t = (1 - t) * x0 + t * a``, ``x0 ~ N(0, I)``, conditional velocity ``v = a - x0``.

Boltzmann target
----------------
For a state s the target policy is ``p(a | s) ∝ exp(l(a))`` with log-density ``l(a) = alpha * Q(s, a)``
(extended outside the action box as described under *Action box*). Since ``x_t | a ~ N(t a, (1 - t)^2 I)``
and ``a = (x_t - (1 - t) x0) / t``, the marginal velocity of the path is::

    v(x, t) = E[a - x0 | x_t = x] = (x - mu0(x, t)) / t,        mu0(x, t) = E[x0 | x_t = x]

and Tweedie's formula ``grad log p_t(x) = -mu0(x, t) / (1 - t)`` gives the score form
``v = (x + (1 - t) * grad log p_t(x)) / t``. Every estimator here estimates mu0 (or the score) at one
point (x, t) and returns ``v_hat = (x - mu0_hat) / t``; these are the targets that replace
``v = a - x0`` in the MVP loss (``target_velocity_fn`` of :func:`manip.algos.mvp.mvp_policy_loss`).

Posterior proposals
-------------------
As a function of a, the likelihood ``N(x; t a, (1 - t)^2 I)`` is proportional to
``N(a; x / t, sigma_t^2 I)`` with ``sigma_t = (1 - t) / t``, so
``p(a | x_t = x) ∝ N(a; x / t, sigma_t^2 I) * exp(l(a))``. Drawing ``delta_k ~ N(0, I)`` and
``a_k = x / t + sigma_t * delta_k`` (k = 1..K) gives proposals whose implied noise is
``x0_k = (x - t a_k) / (1 - t) = -delta_k``, with self-normalised importance weights
``w_k = softmax_k l(a_k)``. ``sum_k w_k g(x0_k)`` estimates ``E[g(x0) | x_t = x]`` for any g, consistently
as K grows (self-normalised importance sampling, bias O(1/K)).

With the action box (below) the target lives in ``[-1, 1]^D`` plus a thin tail, and the proposals are drawn
from the same likelihood truncated to a box around it: per dimension ``[lo_j, hi_j]`` with
``hi_j = max(1 + c b, m_j + c s)``, ``m_j = (mu_j b^2 + sigma_t^2) / (sigma_t^2 + b^2)``,
``s = sigma_t b / sqrt(sigma_t^2 + b^2)`` (mirrored for ``lo_j``), ``mu = x / t``, ``b = bound_std``,
``c = TAIL_WIDTH = 4``. Beyond the box edge in dimension j the target is exactly Gaussian in ``a_j``, so the
posterior there is the product ``N(mu_j, sigma_t^2) N(1, b^2)`` with mean m_j and std s: the truncation drops
a posterior fraction of order ``Phi(-c) ≈ 3e-5`` and never cuts off a likelihood centred outside the box.
The truncation normaliser depends on x only and cancels in the weights, so the formulas above are unchanged
(``x0_k = -delta_k`` with delta truncated accordingly). At small t this turns proposals spread over
``sigma_t ≈ 1 / t`` into proposals covering the box, raising the effective sample size by orders of magnitude.

Estimators of mu0
-----------------
* Value-only (RFM, eta = 0): ``mu0_hat = sum_k w_k x0_k``.
* Gradient (RFM, eta = 1): the noise posterior ``q*(x0 | x) ∝ N(x0; 0, I) exp(l((x - (1 - t) x0) / t))``
  has score ``s*(x0) = -x0 - sigma_t * grad_a l(a)``. Stein's identity ``E_q*[s*] = 0`` gives
  ``mu0 = E_q*[x0 + s*] = -sigma_t * E[grad_a l(a) | x_t = x]``, estimated by
  ``-sigma_t * sum_k w_k grad_a l(a_k)``.
* SOM (iDEM-style score): ``log p_t(x) = log E_delta[exp l(x / t + sigma_t delta)] + const``; the
  gradient in x of the K-sample ``logsumexp_k l(a_k(x))``, with the draws delta_k held fixed, is
  ``(1 / t) sum_k w_k grad_a l(a_k)``, the self-normalised estimate of ``E[grad_a l(a) | x] / t``, which by
  the Stein identity above equals the score for any proposal of delta. ``-(1 - t) * score_hat`` is exactly
  the eta = 1 estimate: on the same draws SOM and RFM(eta = 1) agree.
* Blend (RFM, per dimension j): ``mu0_hat_j = sum_k w_k (x0_kj + eta_j s*_kj)``. Because ``E_q*[s*] = 0``
  every eta is a consistent estimator (s* is a control variate); the variance of the per-sample terms is
  minimised by ``eta*_j = -Cov(x0_j, s*_j) / Var(s*_j)``. Stein's identity gives ``Cov(x0_j, s*_j) = -1``,
  so ``eta*_j = 1 / E[s*_j^2] > 0``, and by Cramér–Rao ``eta*_j <= Var(x0_j | x)``; for a concave Q the
  noise posterior is at least as concentrated as its N(0, I) prior (Brascamp–Lieb), so ``eta*_j`` lies in
  (0, 1]. ``eta = "optimal"`` estimates eta* with the same weighted samples and clamps it to [0, 1] (a
  convex blend of the two estimators; near-degenerate weights give ``Var_w(s*) ≈ 0`` and the clamp keeps
  the coefficient finite). For a Gaussian target s* is affine in x0, and with a diagonal posterior
  covariance the optimal blend makes every per-sample term equal to mu0: zero variance.

Small t
-------
The proposal scale ``sigma_t = (1 - t) / t`` grows like 1 / t. All estimators evaluate at
``t_eff = max(t, t_min)``; for ``t < t_min`` the returned target is the marginal velocity at ``(x, t_min)``,
a bounded surrogate. The per-sample terms behave very differently as t falls:

* value terms ``x0_k`` have the spread of the noise posterior, ``≈ t * target_std / (1 - t)``: small;
* gradient terms ``sigma_t * grad_a l(a_k)`` have spread ``≈ sigma_t / target_std``, which diverges.

RFM therefore uses ``t_min = T_MIN = 0.05`` (the optimal blend shifts to the value terms as t falls; MVP's
logit-normal time sampler puts about 1 % of its draws below 0.05), while SOM, a pure gradient estimator,
defaults to ``t_min = SOM_T_MIN = 0.5``: with a sharp critic its targets below that are dominated by noise.
On the two-optimum test bandit (bumps of width 0.25, K = 64) the per-coordinate std of one SOM target is
about 300, 16, 1.7 and 0.15 at t = 0.05, 0.2, 0.5 and 0.8, against at most 0.14 for RFM with the optimal
blend. Freezing the target velocity below t_min is a bias, and SOM's 0.5 is a large one: MVP's default sampler
(t the smaller of two LN(-0.4, 1) draws) puts about 88 % of its t below 0.5, and integrating the frozen exact
velocity of a 1-D Gaussian target N(0.5, 0.1^2) ends at mean 0.51 and std 0.074 (N(0.5, 0.3^2): 0.53, 0.25),
a narrower flow than the target's. This is why SOM's default prior is the data prior (*Data prior* below),
which keeps the gradient terms small down to ``T_MIN``.

Action box
----------
Executed actions are ``clip(a, -1, 1)``. Proposals ``a_k`` outside the box are scored with
``l(a) = alpha * Q(s, clip(a)) - ||a - clip(a)||^2 / (2 * bound_std^2)``: the critic is only queried on
executable actions and the target continues outside the box with a Gaussian tail of scale ``bound_std``.
Scoring ``Q(s, clip(a))`` alone would make the target flat, hence improper, outside the box: for every t
whose proposal scale exceeds the box size most of the posterior mass would then lie outside it and the
velocity would drive actions into saturation. The tail keeps the target proper and l continuous, so the
Stein identity above still holds. ``bound_std=None`` scores the raw, unclipped actions (for critics that
are defined everywhere, e.g. analytic test functions).

Behaviour prior (``prior="policy"``)
------------------------------------
Offline-to-online, the Boltzmann target over the whole action box spreads a chunk policy over
actions the critic never saw. The behaviour-regularised target ``p(a | s) ∝ pi(a | s) exp(alpha Q(s, a))``
(the current policy pi as prior) keeps it on the data's support. With K policy samples ``a_k ~ pi(. | s)``
as proposals the prior cancels from the importance weights, so no policy density is needed::

    w_k ∝ exp(alpha Q(s, a_k) - ||x - t a_k||^2 / (2 (1 - t)^2)),    x0_k = (x - t a_k) / (1 - t)
    mu0_hat = sum_k w_k x0_k,    v_hat = (x - mu0_hat) / t = sum_k w_k (a_k - x) / (1 - t)

(RFM's value-only posterior mean, :func:`policy_prior_target_velocity`). The critic is queried once per
state, not per (x, t). alpha -> infinity with one candidate per kernel recovers best-of-N; alpha = 0
is the policy's own marginal velocity (a kernel estimate of it).

The proposals include the policy sample each row's x_t is built from (conditional importance sampling).
Near t = 1 the kernel, of width (1 - t) / t, is far narrower than the spacing of K policy samples in a
chunk's h * |A| dimensions: K unrelated samples alone make the weights pick the nearest of them, a velocity
(a_k - x) / (1 - t) pointing the wrong way with a magnitude growing as 1 / (1 - t). With the row's own sample
among them the estimate is the mean of an i-SIR kernel, which leaves the posterior invariant: at alpha = 0 it
is exactly unbiased for the marginal velocity (t in [t_min, 1 - t_min]), and near t = 1 it tends to the
conditional velocity (a - x) / (1 - t) of flow matching.

The gradient control variate needs ``grad log pi``, which a one-step generator does not give, so this target
is value-only (eta = 0), and SOM's score is the same estimate here (the x-dependence is all in the Gaussian
kernel).

Data prior (``prior_mean``, ``prior_std``)
------------------------------------------
A Gaussian trust region around a reference chunk m (the replay chunk the batch row came from) gives the
target ``p(a | s, m) ∝ N(a; m, sigma_p^2 I) exp(l(a))``: the data action moved towards higher Q by at most
a few sigma_p, one local improvement per data sample, so a multimodal behaviour stays multimodal. Both
factors of ``N(x; t a, (1 - t)^2 I) N(a; m, sigma_p^2 I)`` are Gaussian in a, so::

    p(a | x_t = x) ∝ N(a; c(x), s^2 I) exp(l(a)),
    c(x) = (sigma_p^2 x / t + sigma_t^2 m) / (sigma_p^2 + sigma_t^2)
    s^2  = sigma_t^2 sigma_p^2 / (sigma_t^2 + sigma_p^2)
    p_t(x) ∝ N(x; t m, ((1 - t)^2 + t^2 sigma_p^2) I) * E_{a ~ N(c(x), s^2)}[exp l(a)]

Proposals ``a_k = c(x) + s delta_k`` are then exact posterior draws up to the weights ``softmax_k l(a_k)``
(effective sample size stays high at every t), with implied noise::

    x0_k = (x - t a_k) / (1 - t)
         = sigma_t^2 (x - t m) / ((1 - t)(sigma_p^2 + sigma_t^2)) - sigma_p delta_k / sqrt(sigma_p^2 + sigma_t^2)

SOM's score is the Gaussian factor's ``-(x - t m) / ((1 - t)^2 + t^2 sigma_p^2)`` plus the gradient in x of
``logsumexp_k l(a_k(x))``, which carries the factor ``dc/dx = sigma_p^2 / (t (sigma_p^2 + sigma_t^2))``
``= t sigma_p^2 / ((1 - t)^2 + t^2 sigma_p^2)``: it vanishes as t -> 0, so the prior also removes the
gradient estimator's small-t blow-up (``t_min = T_MIN`` for both). RFM's Stein term uses the gradient of
the full log target ``l(a) - ||a - m||^2 / (2 sigma_p^2)``.

Best-of-N
---------
``bon`` needs no velocity estimator: the policy is trained with the MVP loss on ``a* = argmax_n Q(s, a_n)``
as the action (``v = a* - x0``), where ``a_n`` are the current policy's candidates (:func:`bon_target`).
It imitates the greedy improvement step of generate-and-select rather than the Boltzmann target.

``q_fn(obs (M, O), actions (M, D)) -> (M,)`` must be differentiable in ``actions`` for SOM and for RFM with
``eta != 0``; for a :class:`~manip.algos.networks.CriticEnsemble` pass e.g.
``lambda o, a: critic(o, a).mean(0)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

QFunction = Callable[[Tensor, Tensor], Tensor]
TargetVelocityFn = Callable[[Tensor, Tensor], Tensor]

T_MIN = 0.05
SOM_T_MIN = 0.5
# Upper clamp of t for the posterior estimators: at t = 1 the data prior's posterior has zero width (its noise is
# 0 / 0). The time sampler's t (the smaller of two logit-normal draws) practically never lies above 1 - 1e-4.
T_MAX = 1.0 - 1e-4
BOUND_STD = 0.1
TAIL_WIDTH = 4.0
TARGET_KINDS = ("bon", "som", "rfm")
# finetune.prior=auto: the prior each target works with offline-to-online (bon and replay have none)
AUTO_PRIOR = {"bon": "box", "som": "data", "rfm": "policy", "replay": "box"}
# finetune.target_samples=null: bon's N candidates (MVP / QC best-of-N), SOM's K score proposals (its K = 100), RFM's
# K proposals (the clean-sample count of MFPO's SNIS target; RFM gives none); replay draws none
TARGET_SAMPLES = {"bon": 32, "som": 100, "rfm": 32, "replay": 32}


def boltzmann_log_density(
    q_fn: QFunction, obs: Tensor, actions: Tensor, alpha: float, bound_std: float | None = BOUND_STD
) -> Tensor:
    """Unnormalised log-density ``l(a)`` of the Boltzmann target (module docstring, *Action box*).

    Args:
        q_fn: ``q_fn(obs (M, O), actions (M, D)) -> (M,)``.
        obs: (M, O) states.
        actions: (M, D) pre-clip actions.
        alpha: inverse temperature.
        bound_std: scale of the Gaussian tail outside [-1, 1]^D; None scores the raw actions.

    Returns:
        (M,) ``alpha * Q(s, clip(a)) - ||a - clip(a)||^2 / (2 * bound_std^2)``.
    """
    if bound_std is None:
        return alpha * q_fn(obs, actions)
    clipped = actions.clamp(-1.0, 1.0)
    outside = (actions - clipped).square().sum(-1)
    return alpha * q_fn(obs, clipped) - outside / (2.0 * bound_std**2)


def _truncated_standard_normal(
    lower: Tensor, upper: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Draws of N(0, 1) truncated to [lower, upper] elementwise by inverse-CDF sampling.

    Args:
        lower, upper: (B, 1, D) standardised bounds, lower < upper (float64).
    Returns:
        (B, K, D) samples. Intervals lying in the upper tail are mirrored into the lower tail, where the normal
        CDF keeps its relative precision; an interval beyond the float64 range of the CDF returns its end nearest
        to the mean.
    """
    batch, _, dim = lower.shape
    flip = lower > 0
    lo, hi = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    p_lo, p_hi = torch.special.ndtr(lo), torch.special.ndtr(hi)
    degenerate = p_hi == 0
    lo, p_lo = torch.where(degenerate, hi, lo), torch.where(degenerate, 0.5, p_lo)
    p_hi = torch.where(degenerate, 0.5, p_hi)
    u = torch.rand(batch, num_samples, dim, generator=generator, device=lower.device, dtype=lower.dtype)
    z = torch.special.ndtri(u.mul_(p_hi - p_lo).add_(p_lo)).clamp_(lo, hi)
    return z.mul_(1.0 - 2.0 * flip.to(z.dtype))


def _clamped_time(t: Tensor, t_min: float, dtype: torch.dtype) -> Tensor:
    """(B,) times -> (B, 1) in [t_min, T_MAX], detached, in ``dtype``."""
    return t.detach().to(dtype).clamp(t_min, T_MAX)[:, None]


def _posterior_proposals(
    x_t: Tensor,
    t: Tensor,
    num_samples: int,
    bound_std: float | None,
    t_min: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets ``delta`` of the proposals ``a_k = x / t + sigma_t * delta_k`` (module docstring).

    Returns:
        ``t_eff`` (B, 1), ``delta`` (B, K, D), ``sigma_t`` (B, 1), in the dtype of ``x_t``.
    """
    batch, dim = x_t.shape
    t_eff = _clamped_time(t, t_min, x_t.dtype)
    sigma = (1.0 - t_eff) / t_eff
    if bound_std is None:
        delta = torch.randn(batch, num_samples, dim, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return t_eff, delta, sigma
    mean = (x_t.detach() / t_eff).double()[:, None, :]
    s = sigma.double()[:, :, None].clamp_min(1e-12)
    b2, s2 = bound_std**2, s.square()
    tail_std = s * bound_std / (s2 + b2).sqrt()
    upper = torch.maximum(
        torch.full_like(mean, 1.0 + TAIL_WIDTH * bound_std), (mean * b2 + s2) / (s2 + b2) + TAIL_WIDTH * tail_std
    )
    lower = torch.minimum(
        torch.full_like(mean, -1.0 - TAIL_WIDTH * bound_std), (mean * b2 - s2) / (s2 + b2) - TAIL_WIDTH * tail_std
    )
    delta = _truncated_standard_normal((lower - mean) / s, (upper - mean) / s, num_samples, generator)
    return t_eff, delta.to(x_t.dtype), sigma


def _data_prior_posterior(
    x: Tensor, t_eff: Tensor, prior_mean: Tensor, prior_std: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian pieces of the data-prior posterior (module docstring, *Data prior*).

    Args:
        x: (B, D) points (may require grad), t_eff: (B, 1) times, prior_mean: (B, D) reference chunks m.
    Returns:
        centre c(x) (B, D), proposal std s (B, 1), noise of the centre ``(x - t c) / (1 - t)`` (B, D) and the
        Gaussian factor's score ``-(x - t m) / ((1 - t)^2 + t^2 sigma_p^2)`` (B, D).
    """
    if prior_std <= 0:
        raise ValueError(f"prior_std must be positive, got {prior_std}")
    var_p = prior_std**2
    var_t = ((1.0 - t_eff) / t_eff).square()
    m = prior_mean.detach().to(x.dtype)
    centre = (var_p * x / t_eff + var_t * m) / (var_p + var_t)
    std = (var_t * var_p / (var_t + var_p)).sqrt()
    residual = x - t_eff * m
    centre_noise = var_t * residual / ((1.0 - t_eff) * (var_p + var_t))
    gaussian_score = -residual / ((1.0 - t_eff).square() + t_eff.square() * var_p)
    return centre, std, centre_noise, gaussian_score


def _repeat_obs(obs: Tensor, num_samples: int) -> Tensor:
    """(B, O) -> (B * K, O), each row repeated K times consecutively."""
    return obs.repeat_interleave(num_samples, dim=0)


def som_target_velocity(
    q_fn: QFunction,
    obs: Tensor,
    x_t: Tensor,
    t: Tensor,
    alpha: float,
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    score_norm: float | None = None,
    bound_std: float | None = BOUND_STD,
    t_min: float | None = None,
    prior_mean: Tensor | None = None,
    prior_std: float = 0.2,
) -> Tensor:
    """SOM target velocity from the Monte-Carlo score of the Boltzmann target.

    ``score_hat = grad_x logsumexp_k l(s, a_k(x))`` with ``a_k(x) = x / t + ((1 - t) / t) delta_k``
    (autograd through the proposals, draws delta_k held fixed, K = ``num_samples``), then
    ``v_hat = (x + (1 - t) score_hat) / t``. All B * K proposals are scored in one ``q_fn`` call. Equal to
    :func:`rfm_target_velocity` with ``eta=1`` on the same draws (module docstring); its variance grows like
    ``((1 - t) / t)^2``, hence the larger default ``t_min``.

    Args:
        q_fn: ``q_fn(obs (M, O), actions (M, D)) -> (M,)``, differentiable in actions.
        obs: (B, O) states.
        x_t: (B, D) points on the path.
        t: (B,) times in [0, 1]; evaluated at ``max(t, t_min)``.
        alpha: inverse temperature of the target ``∝ exp(alpha Q)``.
        num_samples: proposals K per row.
        generator: torch generator for the proposals.
        score_norm: None (the Monte-Carlo score as is: the target's marginal velocity), or w > 0: the score rescaled
            to length w, ``w * score / ||score||`` (the normalised score of SOM's practice, ``w * s_hat``). A
            greediness knob, no longer the marginal velocity; w must be of the score's own size (it grows like
            sqrt(D)), a unit score in D = 35 dimensions leaves ``v ~ x / t``, which pushes actions out of the box.
        bound_std: see :func:`boltzmann_log_density`.
        t_min: lower clamp of t (module docstring, *Small t*); None: ``SOM_T_MIN``, or ``T_MIN`` with a data
            prior.
        prior_mean: (B, D) reference chunks m of the data prior ``N(m, prior_std^2 I)`` (module docstring,
            *Data prior*); None: the Boltzmann target over the action box.
        prior_std: sigma_p of the data prior.

    Returns:
        (B, D) detached target velocity.
    """
    batch, dim = x_t.shape
    x = x_t.detach()
    if t_min is None:
        t_min = SOM_T_MIN if prior_mean is None else T_MIN
    # with a data prior the posterior is Gaussian before the Q weights: untruncated standard-normal offsets
    proposal_bound = bound_std if prior_mean is None else None
    t_eff, delta, sigma = _posterior_proposals(x_t, t, num_samples, proposal_bound, t_min, generator)
    with torch.enable_grad():
        x_leaf = x.clone().requires_grad_(True)
        if prior_mean is None:
            actions = x_leaf[:, None, :] / t_eff[:, :, None] + sigma[:, :, None] * delta
        else:
            centre, std, _, gaussian_score = _data_prior_posterior(x_leaf, t_eff, prior_mean, prior_std)
            actions = centre[:, None, :] + std[:, :, None] * delta
        log_p = boltzmann_log_density(
            q_fn, _repeat_obs(obs.detach(), num_samples), actions.reshape(-1, dim), alpha, bound_std
        ).view(batch, num_samples)
        (score,) = torch.autograd.grad(torch.logsumexp(log_p, dim=1).sum(), x_leaf)
    if prior_mean is not None:
        score = score + gaussian_score.detach()
    if score_norm is not None:
        score = score_norm * score / score.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ((x + (1.0 - t_eff) * score) / t_eff).detach()


def rfm_noise_posterior_mean(
    q_fn: QFunction,
    obs: Tensor,
    x_t: Tensor,
    t: Tensor,
    alpha: float,
    num_samples: int = 100,
    eta: float | str = "optimal",
    generator: torch.Generator | None = None,
    bound_std: float | None = BOUND_STD,
    t_min: float = T_MIN,
    prior_mean: Tensor | None = None,
    prior_std: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Posterior mean of the noise ``E[x0 | x_t]`` under the Boltzmann target by SNIS with a Stein blend.

    ``mu0_hat = sum_k w_k f_k`` with per-sample terms ``f_k = x0_k + eta * s*_k``, ``x0_k = -delta_k``,
    ``s*_k = -x0_k - ((1 - t) / t) grad_a l(a_k)`` and ``w = softmax_k l(a_k)`` (module docstring).

    Args:
        q_fn: ``q_fn(obs (M, O), actions (M, D)) -> (M,)``; differentiable in actions unless ``eta == 0``.
        obs: (B, O) states.
        x_t: (B, D) points on the path.
        t: (B,) times in [0, 1]; evaluated at ``max(t, t_min)``.
        alpha: inverse temperature of the target ``∝ exp(alpha Q)``.
        num_samples: proposals K per row.
        eta: Stein blend; 0 value-only, 1 gradient-only, any float, or ``"optimal"`` for the per-dimension
            variance-optimal coefficient estimated from the weighted samples and clamped to [0, 1].
        generator: torch generator for the proposals.
        bound_std: see :func:`boltzmann_log_density`.
        t_min: lower clamp of t (module docstring, *Small t*).
        prior_mean, prior_std: the data prior ``N(prior_mean, prior_std^2 I)`` (module docstring, *Data prior*);
            None: the Boltzmann target over the action box.

    Returns:
        ``(mu0 (B, D), info)``, detached; info holds ``weights`` (B, K), ``per_sample`` f (B, K, D),
        ``eta`` (B, D) and ``ess`` (B,) the effective sample size ``1 / sum_k w_k^2``.
    """
    if isinstance(eta, str) and eta != "optimal":
        raise ValueError(f"eta must be a float or 'optimal', got {eta!r}")
    batch, dim = x_t.shape
    x = x_t.detach()
    proposal_bound = bound_std if prior_mean is None else None  # data prior: see som_target_velocity
    t_eff, delta, sigma = _posterior_proposals(x_t, t, num_samples, proposal_bound, t_min, generator)
    if prior_mean is None:
        actions = (x[:, None, :] / t_eff[:, :, None] + sigma[:, :, None] * delta).reshape(-1, dim)
        noise = -delta
    else:
        centre, std, centre_noise, _ = _data_prior_posterior(x, t_eff, prior_mean, prior_std)
        actions = (centre[:, None, :] + std[:, :, None] * delta).reshape(-1, dim)
        # x0_k = (x - t a_k) / (1 - t), written without the 1 / (1 - t) cancellation
        noise = centre_noise[:, None, :] - (t_eff * std / (1.0 - t_eff))[:, :, None] * delta
    obs_rep = _repeat_obs(obs.detach(), num_samples)
    if eta == 0:
        with torch.no_grad():
            log_p = boltzmann_log_density(q_fn, obs_rep, actions, alpha, bound_std).view(batch, num_samples)
        s_star = torch.zeros_like(noise)
    else:
        with torch.enable_grad():
            actions = actions.requires_grad_(True)
            log_p = boltzmann_log_density(q_fn, obs_rep, actions, alpha, bound_std)
            (grad_l,) = torch.autograd.grad(log_p.sum(), actions)
        log_p = log_p.detach().view(batch, num_samples)
        grad_l = grad_l.view(batch, num_samples, dim)
        if prior_mean is not None:
            offset = actions.detach().view(batch, num_samples, dim) - prior_mean.detach()[:, None, :]
            grad_l = grad_l - offset / prior_std**2
        s_star = -noise - sigma[:, :, None] * grad_l
    weights = torch.softmax(log_p, dim=1)
    w = weights[:, :, None]
    if eta == "optimal":
        centred_noise = noise - (w * noise).sum(1, keepdim=True)
        centred_s = s_star - (w * s_star).sum(1, keepdim=True)
        cov = (w * centred_noise * centred_s).sum(1)
        var = (w * centred_s.square()).sum(1)
        eta_t = (-cov / var.clamp_min(1e-12)).clamp(0.0, 1.0)
    else:
        eta_t = torch.full((batch, dim), float(eta), dtype=x.dtype, device=x.device)
    per_sample = noise + eta_t[:, None, :] * s_star
    mu0 = (w * per_sample).sum(1)
    info = {
        "weights": weights.detach(),
        "per_sample": per_sample.detach(),
        "eta": eta_t.detach(),
        "ess": 1.0 / weights.square().sum(1).detach(),
    }
    return mu0.detach(), info


def rfm_target_velocity(
    q_fn: QFunction,
    obs: Tensor,
    x_t: Tensor,
    t: Tensor,
    alpha: float,
    num_samples: int = 100,
    eta: float | str = "optimal",
    generator: torch.Generator | None = None,
    bound_std: float | None = BOUND_STD,
    t_min: float = T_MIN,
    prior_mean: Tensor | None = None,
    prior_std: float = 0.2,
) -> Tensor:
    """Reverse-flow-matching target velocity ``v_hat = (x_t - mu0_hat) / t``.

    ``mu0_hat`` from :func:`rfm_noise_posterior_mean` (same arguments), t evaluated at ``max(t, t_min)``.

    Returns:
        (B, D) detached target velocity.
    """
    mu0, _ = rfm_noise_posterior_mean(
        q_fn,
        obs,
        x_t,
        t,
        alpha,
        num_samples,
        eta=eta,
        generator=generator,
        bound_std=bound_std,
        t_min=t_min,
        prior_mean=prior_mean,
        prior_std=prior_std,
    )
    t_eff = _clamped_time(t, t_min, x_t.dtype)
    return ((x_t.detach() - mu0) / t_eff).detach()


def policy_prior_target_velocity(
    x_t: Tensor, t: Tensor, actions: Tensor, q: Tensor, alpha: float, t_min: float = T_MIN
) -> Tensor:
    """Velocity of the behaviour-regularised target ``∝ pi(a | s) exp(alpha Q(s, a))`` (module docstring).

    Args:
        x_t: (B, D) points on the path; t: (B,) times, evaluated in ``[t_min, 1 - t_min]``.
        actions: (B, K, D) samples of the policy at each row's state (the proposals), one of them the sample
            x_t was built from (module docstring, *Behaviour prior*).
        q: (B, K) their critic values.
        alpha: inverse temperature.

    Returns:
        (B, D) detached target velocity ``sum_k w_k (a_k - x) / (1 - t)``.
    """
    x = x_t.detach()[:, None, :]
    t_eff = t.detach().to(x.dtype).clamp(t_min, 1.0 - t_min)[:, None]
    one_minus_t = (1.0 - t_eff)[:, :, None]
    kernel = -(x - t_eff[:, :, None] * actions).square().sum(-1) / (2.0 * one_minus_t[:, :, 0] ** 2)
    weights = torch.softmax(alpha * q.detach() + kernel, dim=1)
    return (weights[:, :, None] * (actions.detach() - x) / one_minus_t).sum(1)


def bon_target(candidates: Tensor, q: Tensor) -> Tensor:
    """Best-of-N action target ``a* = candidates[argmax_n q]`` per row.

    The ``bon`` target trains the policy with the MVP loss on ``a*`` as the action (no velocity hook).

    Args:
        candidates: (B, N, D) candidate actions, e.g. one-step samples of the current policy.
        q: (B, N) their critic values.

    Returns:
        (B, D) detached best candidates.
    """
    index = q.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index].detach()


def make_target_fn(kind: str, q_fn: QFunction, obs: Tensor, alpha: float, **kwargs) -> TargetVelocityFn | None:
    """Target velocity closure ``fn(x_t (B, D), t (B,)) -> v_hat (B, D)`` for ``mvp_policy_loss``.

    Args:
        kind: ``"som"`` (:func:`som_target_velocity`), ``"rfm"`` (:func:`rfm_target_velocity`) or ``"bon"``
            (returns None: train on :func:`bon_target` actions instead).
        q_fn: ``q_fn(obs (M, O), actions (M, D)) -> (M,)``.
        obs: (B, O) states matching the rows of ``x_t``.
        alpha: inverse temperature.
        **kwargs: further keyword arguments of the chosen estimator (num_samples, eta, generator, ...).

    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "som":
        estimator = som_target_velocity
    elif kind == "rfm":
        estimator = rfm_target_velocity
    elif kind == "bon":
        return None
    else:
        raise ValueError(f"unknown target kind {kind!r}; valid kinds: {', '.join(TARGET_KINDS)}")

    def target_velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return estimator(q_fn, obs, x_t, t, alpha, **kwargs)

    return target_velocity_fn
