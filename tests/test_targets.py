"""Critic-driven targets (manip.algos.targets) against closed-form and quadrature Boltzmann velocities.

Monte-Carlo checks repeat each estimate R times on independent draws (R copies of the same point in one
batch) and accept when the mean lies within ``Z_MAX`` standard errors of the exact value in every dimension;
the standard error is the empirical std over the repeats divided by sqrt(R).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from manip.algos import targets
from manip.algos.mvp import mvp_policy_loss, sample_one_step
from manip.algos.networks import MeanVelocityNet
from manip.algos.targets import (
    BOUND_STD,
    SOM_T_MIN,
    T_MIN,
    TAIL_WIDTH,
    boltzmann_log_density,
    bon_target,
    make_target_fn,
    policy_prior_target_velocity,
    rfm_noise_posterior_mean,
    rfm_target_velocity,
    som_target_velocity,
)
from manip.data.replay import random_chunk_batch

Z_MAX = 4.0
ESTIMATORS = ("som", 0.0, 1.0, "optimal")  # SOM, then RFM with eta = 0, 1, optimal


def _estimate(name, q_fn, x, t, alpha, num_samples, generator, bound_std):
    """(R, D) velocity estimates at the rows of x (R, D), t (R,); SOM is checked down to RFM's t_min."""
    obs = torch.zeros(x.shape[0], 1, dtype=x.dtype)
    if name == "som":
        return som_target_velocity(
            q_fn, obs, x, t, alpha, num_samples, generator=generator, bound_std=bound_std, t_min=T_MIN
        )
    return rfm_target_velocity(
        q_fn, obs, x, t, alpha, num_samples, eta=name, generator=generator, bound_std=bound_std
    )


def _z_score(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |mean - exact| over dimensions in units of the standard error of the mean.

    The standard error is floored at 1e-6, which only matters for estimators whose spread vanishes (the optimal
    Stein blend on a Gaussian posterior).
    """
    standard_error = (estimates.std(0) / math.sqrt(estimates.shape[0])).clamp_min(1e-6)
    return ((estimates.mean(0) - exact).abs() / standard_error).max().item()


# ---------------------------------------------------------------- quadratic bandit, closed form
#
# Q(a) = -1/2 (a - m)^T P (a - m)  =>  Boltzmann target N(m, S), S = (alpha P)^-1.
# x_t = t a + (1 - t) x0 ~ N(t m, C), C = t^2 S + (1 - t)^2 I, with Cov(a, x_t) = t S and Cov(x0, x_t) = (1 - t) I:
#   E[a | x]  = m + t S C^-1 (x - t m)
#   E[x0 | x] = (1 - t) C^-1 (x - t m)
#   v(x, t)   = E[a | x] - E[x0 | x]
# The noise posterior has covariance Sigma0 = I - (1 - t)^2 C^-1; Stein's identity gives the population
# variance-optimal blend eta*_j = 1 / (Sigma0^-1)_jj.

M = torch.tensor([0.2, -0.1], dtype=torch.float64)
P = torch.tensor([[2.0, 0.8], [0.8, 1.5]], dtype=torch.float64)


def quadratic_q(obs: torch.Tensor, actions: torch.Tensor, precision: torch.Tensor = P) -> torch.Tensor:
    d = actions - M
    return -0.5 * (d[:, :, None] * precision * d[:, None, :]).sum((1, 2))  # elementwise: tiny matmuls are slow


def gaussian_posterior(t: float, alpha: float, precision: torch.Tensor = P):
    """(S, C) of the quadratic bandit's target and of x_t."""
    cov_a = torch.linalg.inv(alpha * precision)
    return cov_a, t * t * cov_a + (1 - t) ** 2 * torch.eye(2, dtype=torch.float64)


def exact_velocity(x: torch.Tensor, t: float, alpha: float, precision: torch.Tensor = P) -> torch.Tensor:
    """Closed-form marginal velocity (D,) at x (D,)."""
    cov_a, cov_x = gaussian_posterior(t, alpha, precision)
    residual = torch.linalg.solve(cov_x, x - t * M)
    return (M + t * cov_a @ residual) - (1 - t) * residual


def typical_points(t: float, alpha: float) -> list[torch.Tensor]:
    """x_t at its mean and at two points 1.8 marginal standard deviations away (whitened)."""
    _, cov_x = gaussian_posterior(t, alpha)
    chol = torch.linalg.cholesky(cov_x)
    offsets = torch.tensor([[0.0, 0.0], [1.5, -1.0], [-1.0, 1.5]], dtype=torch.float64)
    return [t * M + chol @ z for z in offsets]


@pytest.mark.parametrize(
    "alpha, bound_std",
    [(1.0, None), (25.0, BOUND_STD)],
    ids=["raw-actions", "action-box"],  # alpha = 25: target std <= 0.18 around M, > 5 std inside the box
)
def test_estimators_match_closed_form_velocity(alpha, bound_std):
    repeats, num_samples = 128, 1024
    generator = torch.Generator().manual_seed(0)
    worst = dict.fromkeys(ESTIMATORS, 0.0)
    worst_wrong_alpha = dict.fromkeys(ESTIMATORS, 0.0)
    for t in (0.2, 0.5, 0.8):
        for x in typical_points(t, alpha):
            v = exact_velocity(x, t, alpha)
            xs = x.expand(repeats, 2).clone()
            ts = torch.full((repeats,), t, dtype=torch.float64)
            for name in ESTIMATORS:
                est = _estimate(name, quadratic_q, xs, ts, alpha, num_samples, generator, bound_std)
                worst[name] = max(worst[name], _z_score(est, v))
                if t == 0.8:
                    wrong = _estimate(name, quadratic_q, xs, ts, 2 * alpha, num_samples, generator, bound_std)
                    worst_wrong_alpha[name] = max(worst_wrong_alpha[name], _z_score(wrong, v))
    assert all(z < Z_MAX for z in worst.values()), worst
    # The same check rejects every estimator run with a doubled alpha.
    assert all(z > Z_MAX for z in worst_wrong_alpha.values()), worst_wrong_alpha


def test_som_equals_rfm_gradient_form_on_the_same_draws():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    obs = torch.zeros(64, 1, dtype=torch.float64)
    for bound_std in (None, BOUND_STD):
        kwargs = {"bound_std": bound_std, "t_min": T_MIN}
        som = som_target_velocity(quadratic_q, obs, x, t, 3.0, 32, generator=torch.Generator().manual_seed(2), **kwargs)
        rfm = rfm_target_velocity(
            quadratic_q, obs, x, t, 3.0, 32, eta=1.0, generator=torch.Generator().manual_seed(2), **kwargs
        )
        torch.testing.assert_close(som, rfm)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_optimal_eta_reduces_variance(t):
    repeats, num_samples, alpha = 256, 256, 1.0
    x = typical_points(t, alpha)[1]
    xs = x.expand(repeats, 2).clone()
    ts = torch.full((repeats,), t, dtype=torch.float64)
    obs = torch.zeros(repeats, 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)

    def posterior_mean(eta, precision=P):
        q_fn = lambda o, a: quadratic_q(o, a, precision)  # noqa: E731
        return rfm_noise_posterior_mean(
            q_fn, obs, xs, ts, alpha, num_samples, eta=eta, generator=generator, bound_std=None
        )

    mu_value, _ = posterior_mean(0.0)
    mu_optimal, info = posterior_mean("optimal")
    ratio = mu_value.var(0).sum() / mu_optimal.var(0).sum()
    assert ratio > 2.0, ratio.item()  # measured 3.4, 12 and 540 at t = 0.2, 0.5, 0.8

    # The estimated coefficient is the population eta*_j = 1 / (Sigma0^-1)_jj.
    _, cov_x = gaussian_posterior(t, alpha)
    noise_cov = torch.eye(2, dtype=torch.float64) - (1 - t) ** 2 * torch.linalg.inv(cov_x)
    eta_star = 1.0 / torch.linalg.inv(noise_cov).diagonal()
    assert _z_score(info["eta"], eta_star) < Z_MAX

    # Diagonal precision: s* is affine in x0 per dimension and the optimal blend has zero variance.
    diagonal = torch.diag(P.diagonal())
    mu_value, _ = posterior_mean(0.0, diagonal)
    mu_optimal, _ = posterior_mean("optimal", diagonal)
    assert mu_optimal.var(0).sum() < 1e-20 * mu_value.var(0).sum()


# ---------------------------------------------------------------- bimodal 1-D target in the action box, quadrature

MODES_1D = torch.tensor([-0.6, 0.6], dtype=torch.float64)
WIDTH_1D = 0.2


def bimodal_q_1d(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log of two Gaussian bumps of width 0.2, weight 0.7 at -0.6 and 1 at +0.6: (M, 1) -> (M,)."""
    log_weights = torch.log(torch.tensor([0.7, 1.0], dtype=actions.dtype))
    return torch.logsumexp(log_weights - (actions - MODES_1D).square() / (2 * WIDTH_1D**2), dim=-1)


def quadrature_velocity(x: float, t: float, alpha: float = 1.0) -> float:
    """v(x, t) = E[a | x] - E[x0 | x] for the boxed target exp(l(a)) by quadrature on a fine grid."""
    a = torch.linspace(-4.0, 4.0, 400_001, dtype=torch.float64)
    log_target = boltzmann_log_density(bimodal_q_1d, torch.zeros(a.shape[0], 1), a[:, None], alpha, BOUND_STD)
    log_post = log_target - (x - t * a).square() / (2 * (1 - t) ** 2)
    w = torch.softmax(log_post, 0)
    mean_a = (w * a).sum().item()
    mean_x0 = (x - t * mean_a) / (1 - t)
    return mean_a - mean_x0


@pytest.mark.parametrize("t, x", [(0.05, 0.3), (0.05, -2.0), (0.2, 0.9), (0.5, -0.4), (0.9, 0.5), (0.95, 1.25)])
def test_boxed_bimodal_target_matches_quadrature(t, x):
    """Truncated proposals at small t and likelihoods centred outside the box (x / t = 1.32 at t = 0.95)."""
    repeats, num_samples = 128, 1024
    generator = torch.Generator().manual_seed(4)
    xs = torch.full((repeats, 1), x, dtype=torch.float64)
    ts = torch.full((repeats,), t, dtype=torch.float64)
    v = torch.tensor([quadrature_velocity(x, t)], dtype=torch.float64)
    for name in ESTIMATORS:
        est = _estimate(name, bimodal_q_1d, xs, ts, 1.0, num_samples, generator, BOUND_STD)
        assert _z_score(est, v) < Z_MAX, (name, est.mean().item(), v.item())


def test_proposals_stay_near_the_box():
    """With the action box the proposals cover the box plus its tail, even where x / t is far outside it."""
    x = torch.tensor([[1.0, 0.0], [1.0, -1.0], [3.0, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6], dtype=torch.float64)  # x / t = (20, 0), (3.3, -3.3), (5, 0.33)
    obs = torch.zeros(3, 1, dtype=torch.float64)
    mu0, info = rfm_noise_posterior_mean(
        quadratic_q, obs, x, t, 1.0, 512, eta=0.0, generator=torch.Generator().manual_seed(5)
    )
    actions = (x[:, None] - (1 - t[:, None, None]) * info["per_sample"]) / t[:, None, None]
    assert torch.isfinite(mu0).all() and (info["ess"] >= 1.0).all()
    assert actions.abs().max() < 1.0 + TAIL_WIDTH * BOUND_STD + 0.1
    assert actions.abs().max() > 1.0  # the tail is sampled too


def test_proposals_cover_the_posterior_tail_outside_the_box():
    """Where x / t lies outside the box, the noise posterior's part beyond the box is Gaussian (the likelihood
    N(x / t, s^2), s = (1 - t) / t, times the box tail N(1, BOUND_STD^2)); the truncated proposals must reach
    well into it, not stop short of its bulk."""
    t, x = 0.95, 1.25
    obs = torch.zeros(64, 1, dtype=torch.float64)
    xs, ts = torch.full((64, 1), x, dtype=torch.float64), torch.full((64,), t, dtype=torch.float64)
    _, info = rfm_noise_posterior_mean(bimodal_q_1d, obs, xs, ts, 1.0, 1024, eta=0.0,
                                       generator=torch.Generator().manual_seed(9))
    actions = (xs[:, None] - (1 - t) * info["per_sample"]) / t
    s2, b2 = ((1 - t) / t) ** 2, BOUND_STD**2
    tail_mean, tail_std = (x / t * b2 + s2) / (s2 + b2), math.sqrt(s2 * b2 / (s2 + b2))
    assert actions.max() > tail_mean + 3.5 * tail_std


def test_optimal_eta_stays_in_the_unit_interval():
    """The estimated blend is clamped to [0, 1]: with few samples the raw ratio -cov / var overshoots."""
    x = (0.8 * torch.linspace(-1, 1, 256, dtype=torch.float64))[:, None]
    t = torch.full((256,), 0.8, dtype=torch.float64)
    _, info = rfm_noise_posterior_mean(bimodal_q_1d, torch.zeros(256, 1, dtype=torch.float64), x, t, 1.0, 4,
                                       eta="optimal", generator=torch.Generator().manual_seed(0))
    assert info["eta"].min() >= 0.0 and info["eta"].max() <= 1.0 and info["eta"].max() > 0.5


def test_policy_prior_target_is_finite_at_the_end_of_the_path():
    """At t = 1 the (a - x) / (1 - t) velocity is evaluated at t = 1 - t_min instead of dividing by zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    actions = torch.randn(3, 16, 2, generator=g, dtype=torch.float64)
    q = torch.randn(3, 16, generator=g, dtype=torch.float64)
    at_end = policy_prior_target_velocity(x, torch.ones(3, dtype=torch.float64), actions, q, 1.0)
    assert torch.isfinite(at_end).all()
    torch.testing.assert_close(at_end, policy_prior_target_velocity(
        x, torch.full((3,), 1 - T_MIN, dtype=torch.float64), actions, q, 1.0))


def test_small_t_is_clamped_to_the_default_t_min():
    obs = torch.zeros(1, 1, dtype=torch.float64)
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    for fn, t_min in ((som_target_velocity, SOM_T_MIN), (rfm_target_velocity, T_MIN)):
        times = [torch.tensor([t], dtype=torch.float64) for t in (0.0, t_min / 2, t_min)]
        rows = [fn(quadratic_q, obs, x, t, 1.0, 64, generator=torch.Generator().manual_seed(6)) for t in times]
        assert torch.isfinite(rows[0]).all()
        torch.testing.assert_close(rows[0], rows[2])
        torch.testing.assert_close(rows[1], rows[2])


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_score_norm_rescales_the_score_to_length_w_in_its_own_direction(w):
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    t = torch.full((16,), 0.7, dtype=torch.float64)
    obs = torch.zeros(16, 1, dtype=torch.float64)
    scores = {}
    for norm in (None, w):
        v = som_target_velocity(quadratic_q, obs, x, t, 1.0, 32, generator=torch.Generator().manual_seed(3),
                                score_norm=norm)
        scores[norm] = (t[:, None] * v - x) / (1 - t[:, None])
    torch.testing.assert_close(scores[w].norm(dim=-1), torch.full((16,), w, dtype=torch.float64))
    torch.testing.assert_close(scores[w], w * scores[None] / scores[None].norm(dim=-1, keepdim=True))


def test_boltzmann_log_density_box_tail():
    actions = torch.tensor([[0.5, -0.5], [1.3, 0.0], [-1.2, 2.0]], dtype=torch.float64)
    obs = torch.zeros(3, 1)
    clipped = actions.clamp(-1, 1)
    outside = (actions - clipped).square().sum(-1)
    expected = 2.0 * quadratic_q(obs, clipped) - outside / (2 * 0.2**2)
    torch.testing.assert_close(boltzmann_log_density(quadratic_q, obs, actions, 2.0, 0.2), expected)
    raw = boltzmann_log_density(quadratic_q, obs, actions, 2.0, None)
    torch.testing.assert_close(raw, 2.0 * quadratic_q(obs, actions))


# ---------------------------------------------------------------- best-of-N and the factory


def test_bon_target_picks_the_best_candidate():
    candidates = torch.arange(24.0).view(2, 4, 3)
    q = torch.tensor([[0.1, 0.9, -1.0, 0.3], [2.0, 1.0, 0.0, 5.0]])
    torch.testing.assert_close(bon_target(candidates, q), torch.stack([candidates[0, 1], candidates[1, 3]]))


def test_make_target_fn():
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    t = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    obs = torch.zeros(8, 1, dtype=torch.float64)
    for kind, direct in (("som", som_target_velocity), ("rfm", rfm_target_velocity)):
        fn = make_target_fn(kind, quadratic_q, obs, 2.0, num_samples=16, generator=torch.Generator().manual_seed(9))
        expected = direct(quadratic_q, obs, x, t, 2.0, 16, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(fn(x, t), expected)
    assert make_target_fn("bon", quadratic_q, obs, 2.0) is None
    with pytest.raises(ValueError, match="bon, som, rfm"):
        make_target_fn("sac", quadratic_q, obs, 2.0)
    with pytest.raises(ValueError, match="eta"):
        rfm_target_velocity(quadratic_q, obs, x, t, 2.0, 16, eta="best")


# ---------------------------------------------------------------- one-step MVP policies on a two-optimum bandit
#
# Q(a) = log(exp(-|a - m1|^2 / (2 w^2)) + exp(-|a - m2|^2 / (2 w^2))), m = (+-0.6, 0), w = 0.25: two equally good
# optima, and with alpha = 1 the Boltzmann target is the equal mixture of N(m_i, w^2 I). A one-step policy
# (MeanVelocityNet, constant observation) is trained with the MVP loss; for SOM and RFM the x_t come from the
# policy's own one-step samples and the velocity from the target, for best-of-N the action is the best of
# N = 16 of the policy's candidates. Under the target 26 % of the mass lies within 0.3 of each optimum and the
# mean distance to the nearest optimum is w * sqrt(pi / 2) = 0.31.

BANDIT_MODES = torch.tensor([[0.6, 0.0], [-0.6, 0.0]])
BANDIT_WIDTH = 0.25
NEAR = 0.3


def bandit_q(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    d2 = (actions[:, None, :] - BANDIT_MODES).square().sum(-1)
    return torch.logsumexp(-d2 / (2 * BANDIT_WIDTH**2), dim=1)


def train_bandit_policy(
    kind: str, steps: int = 600, batch: int = 256, num_candidates: int = 16, seed: int = 0, **target_kwargs
) -> MeanVelocityNet:
    """One-step policy trained for ``steps`` Adam steps with the ``kind`` target (module comment above)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # time_dim = 4 keeps one (the lowest) frequency of the time features: enough for this 2-D problem.
    net = MeanVelocityNet(1, 2, (128, 128), time_dim=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    obs = torch.zeros(batch, 1)
    target_fn = make_target_fn(kind, bandit_q, obs, 1.0, generator=generator, **target_kwargs)
    for _ in range(steps):
        with torch.no_grad():
            if kind == "bon":
                noise = torch.randn(batch * num_candidates, 2, generator=generator)
                candidates = sample_one_step(net, obs.repeat_interleave(num_candidates, 0), noise)
                candidates = candidates.view(batch, num_candidates, 2)
                actions = bon_target(candidates, bandit_q(None, candidates.view(-1, 2)).view(batch, num_candidates))
            else:
                actions = sample_one_step(net, obs, torch.randn(batch, 2, generator=generator))
        loss, _ = mvp_policy_loss(net, obs, actions, target_velocity_fn=target_fn, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net


def mode_statistics(net: MeanVelocityNet, num: int = 4000) -> dict[str, list[float] | float]:
    """Fractions of one-step samples within NEAR of each optimum and in each half-plane, mean nearest distance."""
    noise = torch.randn(num, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        actions = sample_one_step(net, torch.zeros(num, 1), noise)
    dist = (actions[:, None, :] - BANDIT_MODES).norm(dim=-1)
    right = (actions[:, 0] > 0).float().mean().item()
    return {
        "near": (dist < NEAR).float().mean(0).tolist(),
        "basin": [right, 1.0 - right],
        "distance": dist.min(1).values.mean().item(),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, target_kwargs, min_near, max_distance",
    [("rfm", {"num_samples": 32}, 0.18, 0.36), ("som", {"num_samples": 128}, 0.12, 0.45)],
)
def test_boltzmann_targets_cover_both_optima(kind, target_kwargs, min_near, max_distance):
    """Measured (seeds 0-2): RFM near 0.22-0.25 each, distance 0.32-0.33; SOM near 0.14-0.19, distance 0.38-0.41."""
    stats = mode_statistics(train_bandit_policy(kind, **target_kwargs))
    assert min(stats["basin"]) > 0.4, stats
    assert min(stats["near"]) > min_near, stats
    assert stats["distance"] < max_distance, stats


@pytest.mark.slow
def test_best_of_n_collapses_onto_one_optimum():
    """Imitating the best of N candidates is greedy: one of the two equal optima takes all the mass."""
    stats = mode_statistics(train_bandit_policy("bon"))
    assert max(stats["basin"]) > 0.95, stats
    assert max(stats["near"]) > 0.9, stats
    assert stats["distance"] < 0.15, stats  # tighter than the Boltzmann target's 0.31


# ------------------------------------------------------------------------------ module wiring (online)
def _online_module(target: str, **online):
    from functools import partial

    from manip.algos import MVPAgent
    from manip.module import ManipModule

    torch.manual_seed(0)
    agent = partial(MVPAgent, hidden_dims=(32, 32), num_samples=4)
    stats = {"obs_mean": [0.0] * 5, "obs_std": [1.0] * 5}
    return ManipModule(agent, obs_dim=5, action_dim=2, horizon=3, stats=stats,
                       online={"target": target, "target_samples": 8, "alpha": 10.0, **online})


@pytest.mark.parametrize("target", ["som", "rfm"])
def test_online_alpha_is_in_units_of_mean_abs_q(target):
    batch = random_chunk_batch(16, 5, 2, 3)
    module = _online_module(target)
    with torch.no_grad():
        mean_abs_q = module.q_value(batch["observations"], batch["actions"].reshape(16, -1)).abs().mean()
    loss, info = module.actor_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert float(info["target_alpha"]) == pytest.approx(10.0 / float(mean_abs_q), rel=1e-5)
    _, raw_info = _online_module(target, q_scale="none").actor_loss(batch, torch.Generator().manual_seed(0))
    assert float(raw_info["target_alpha"]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="q_scale"):
        _online_module(target, q_scale="std")


# --------------------------------------------------- behaviour prior: Gaussian policy x quadratic Q
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_policy_prior_target_matches_closed_form(t):
    """pi = N(mu_pi, s^2 I), Q quadratic => target N(m', S'), S' = (I / s^2 + alpha P)^-1,
    m' = S' (mu_pi / s^2 + alpha P M); the estimate from policy samples matches its velocity."""
    alpha, s2 = 2.0, 0.5
    mu_pi = torch.tensor([-0.3, 0.4], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(eye / s2 + alpha * P)
    mean = cov @ (mu_pi / s2 + alpha * P @ M)
    c = t * t * cov + (1 - t) ** 2 * eye
    g = torch.Generator().manual_seed(0)
    x = (t * mean + c.diag().sqrt() * torch.randn(3, 2, generator=g, dtype=torch.float64))  # a few points
    exact = torch.stack([mean + t * cov @ torch.linalg.solve(c, xi - t * mean)
                         - (1 - t) * torch.linalg.solve(c, xi - t * mean) for xi in x])
    reps, k = 200, 512
    estimates = []
    for _ in range(reps):
        actions = mu_pi + s2**0.5 * torch.randn(3, k, 2, generator=g, dtype=torch.float64)
        q = quadratic_q(None, actions.reshape(-1, 2)).view(3, k)
        estimates.append(policy_prior_target_velocity(x, torch.full((3,), t, dtype=torch.float64), actions, q, alpha))
    estimates = torch.stack(estimates)  # (reps, 3, 2)
    for row in range(3):
        # SNIS is biased at O(1/K): allow that on top of the Monte-Carlo error.
        assert _z_score(estimates[:, row], exact[row]) < Z_MAX or \
            (estimates[:, row].mean(0) - exact[row]).abs().max() < 0.02
    wrong = policy_prior_target_velocity(x, torch.full((3,), t, dtype=torch.float64), actions, q, 0.0)
    assert (wrong - exact).abs().max() > 0.05  # the critic matters: alpha = 0 is the policy's own velocity


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_policy_prior_target_is_unbiased_with_the_rows_own_sample_among_the_proposals(t):
    """A chunk-sized action (35 dims), policy N(0, 0.3^2 I), alpha = 0: the target's conditional mean is the
    policy's marginal velocity c * x. With the sample x_t is built from among the proposals the error is
    uncorrelated with x at every t; K unrelated samples alone pick the nearest one near t = 1 (bias ~ -7 x)."""
    g = torch.Generator().manual_seed(0)
    rows, dim, k, std = 4096, 35, 32, 0.3
    own = std * torch.randn(rows, dim, generator=g, dtype=torch.float64)
    x = (1 - t) * torch.randn(rows, dim, generator=g, dtype=torch.float64) + t * own
    exact = (t * std**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * std**2) * x
    others = std * torch.randn(rows, k, dim, generator=g, dtype=torch.float64)
    ts = torch.full((rows,), t, dtype=torch.float64)

    def bias_coefficient(proposals):  # regression of the error on x, and its standard error
        error = policy_prior_target_velocity(x, ts, proposals, torch.zeros(proposals.shape[:2], dtype=x.dtype), 0.0)
        error = error - exact
        per_row = (error * x).sum(1)
        return float(per_row.sum() / x.square().sum()), float(per_row.std() * rows**0.5 / x.square().sum())

    coef, se = bias_coefficient(torch.cat([own[:, None], others], dim=1))
    assert abs(coef) < 4 * se + 0.01, (coef, se)
    if t == 0.9:
        coef, se = bias_coefficient(others)
        assert coef < -3.0, coef


def test_policy_prior_module_target_has_each_rows_own_sample_among_its_proposals():
    """Near t = 1 the kernel leaves only the row's own sample: the target is its conditional velocity."""
    module = _online_module("rfm", prior="policy", target_samples=8)
    obs = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    own = module.agent.sample_actions(obs, num_samples=1, generator=torch.Generator().manual_seed(1))
    target_fn = module._policy_prior_target(obs, own, 1.0, torch.Generator().manual_seed(2))
    t = torch.full((16,), 1 - T_MIN)
    x = T_MIN * torch.randn(16, own.shape[1], generator=torch.Generator().manual_seed(3)) + t[:, None] * own
    torch.testing.assert_close(target_fn(x, t), (own - x) / T_MIN, atol=1e-4, rtol=1e-4)


# ------------------------------------------- data prior: N(m, sigma_p^2 I) x quadratic Q, closed form
def _data_prior_exact(x: torch.Tensor, t: float, alpha: float, m: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Velocity (D,) at x of the Gaussian target N(m', S'), S' = (I / sigma_p^2 + alpha P)^-1,
    m' = S' (m / sigma_p^2 + alpha P M)."""
    eye = torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(eye / prior_std**2 + alpha * P)
    mean = cov @ (m / prior_std**2 + alpha * P @ M)
    residual = torch.linalg.solve(t * t * cov + (1 - t) ** 2 * eye, x - t * mean)
    return mean + t * cov @ residual - (1 - t) * residual


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 0.8, 0.95, 1.0])
def test_data_prior_estimators_match_closed_form(t):
    """SOM and RFM (eta = 0, 1, optimal) under the data prior match the closed-form velocity at every t,
    including t = 0.05 where the box-prior SOM estimate is unusable and t = 1 where the posterior has no width (the
    velocity is x); a wrong prior_std is rejected."""
    alpha, prior_std, repeats, num_samples = 4.0, 0.3, 128, 256
    m = torch.tensor([0.5, -0.6], dtype=torch.float64)  # the reference chunk, away from Q's optimum M
    g = torch.Generator().manual_seed(0)
    obs = torch.zeros(repeats, 1, dtype=torch.float64)
    ts = torch.full((repeats,), t, dtype=torch.float64)
    for x in (t * m, t * m + torch.tensor([0.3, 0.2], dtype=torch.float64)):
        exact = _data_prior_exact(x, t, alpha, m, prior_std)
        xs, ms = x.expand(repeats, 2).clone(), m.expand(repeats, 2)
        for name in ESTIMATORS:
            kwargs = dict(generator=g, bound_std=None, prior_mean=ms)
            if name == "som":
                est = som_target_velocity(quadratic_q, obs, xs, ts, alpha, num_samples, prior_std=prior_std, **kwargs)
                wrong = som_target_velocity(quadratic_q, obs, xs, ts, alpha, num_samples, prior_std=2 * prior_std,
                                            **kwargs)
            else:
                est = rfm_target_velocity(quadratic_q, obs, xs, ts, alpha, num_samples, eta=name,
                                          prior_std=prior_std, **kwargs)
                wrong = rfm_target_velocity(quadratic_q, obs, xs, ts, alpha, num_samples, eta=name,
                                            prior_std=2 * prior_std, **kwargs)
            assert _z_score(est, exact) < Z_MAX or (est.mean(0) - exact).abs().max() < 2e-3, (name, t)
            if t <= 0.8:  # near t = 1 the velocity at x hardly depends on the prior
                assert (wrong.mean(0) - exact).abs().max() > 0.05, (name, t)


def test_data_prior_som_is_stable_at_small_t():
    """The prior damps SOM's gradient term by t sigma_p^2 / ((1 - t)^2 + t^2 sigma_p^2): at t = 0.05 the
    spread of one target is small, where the box-prior SOM estimate (same K) is hundreds of times noisier."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(256, 2, dtype=torch.float64)
    obs = torch.zeros(256, 1, dtype=torch.float64)
    t = torch.full((256,), 0.05, dtype=torch.float64)
    sharp_q = lambda o, a: 50.0 * quadratic_q(o, a)  # noqa: E731  (a sharp critic, as online)
    data = som_target_velocity(sharp_q, obs, x, t, 1.0, 64, generator=g, bound_std=None,
                               prior_mean=torch.zeros_like(x), prior_std=0.3)
    box = som_target_velocity(sharp_q, obs, x, t, 1.0, 64, generator=g, bound_std=None, t_min=0.05)
    assert data.std(0).max() < 0.5, data.std(0)
    assert box.std(0).max() > 100 * data.std(0).max()


def test_policy_prior_module_target_and_validation():
    batch = random_chunk_batch(16, 5, 2, 3)
    module = _online_module("rfm", prior="policy")
    loss, info = module.actor_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(info["target_alpha"]) > 0
    with pytest.raises(ValueError, match="target=rfm"):
        _online_module("som", prior="policy")
    with pytest.raises(ValueError, match="prior"):
        _online_module("rfm", prior="uniform")


@pytest.mark.parametrize("target", ["som", "rfm"])
def test_data_prior_module_target_and_validation(target):
    batch = random_chunk_batch(16, 5, 2, 3)
    module = _online_module(target, prior="data", prior_std=0.2)
    loss, info = module.actor_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(info["target_alpha"]) > 0
    # the target is built around the replay chunks: a different prior_std changes the loss on the same draws
    other, _ = _online_module(target, prior="data", prior_std=2.0).actor_loss(batch, torch.Generator().manual_seed(0))
    assert not torch.isclose(loss, other)
    with pytest.raises(ValueError, match="bon has no prior"):
        _online_module("bon", prior="data")
    # the default prior is the one each target works with
    assert {k: _online_module(k).online.prior for k in ("bon", "som", "rfm")} == {
        "bon": "box", "som": "data", "rfm": "policy"}
    with pytest.raises(ValueError, match="prior_std"):
        _online_module(target, prior="data", prior_std=0.0)


@pytest.mark.parametrize("target", ["som", "rfm"])
def test_data_prior_targets_skip_chunks_running_past_their_episode(target):
    """The critic never trains on a chunk whose last step lies past the episode's end (its TD weight is
    valid[:, -1] = 0), so such replay chunks give the critic-driven term no target; the others do."""
    batch = random_chunk_batch(16, 5, 2, 3)
    batch["valid"][:4, 1:] = 0.0  # episodes ending after the first step of the chunk
    module = _online_module(target, prior="data", bc_weight=0.0, q_scale="none")  # alpha from no batch statistic
    loss, _ = module.actor_loss(batch, torch.Generator().manual_seed(0))
    for rows, changes in ((slice(0, 4), False), (slice(4, 8), True)):
        moved = {**batch, "actions": batch["actions"].clone()}
        moved["actions"][rows] = -moved["actions"][rows]
        other, _ = module.actor_loss(moved, torch.Generator().manual_seed(0))
        assert bool(not torch.isclose(loss, other)) == changes


@pytest.mark.parametrize("target, prior", [("bon", "box"), ("som", "box"), ("rfm", "box"), ("rfm", "policy"),
                                           ("som", "data"), ("rfm", "data")])
def test_no_target_where_the_critic_never_trains(target, prior):
    """At a state whose replay chunk runs past its episode's end the critic never trains (TD weight
    valid[:, -1] = 0): whatever the prior, such rows give the critic-driven term no target and do not enter the
    batch's mean |Q| (alpha's unit); moving those states changes neither, moving the others changes both."""
    batch = random_chunk_batch(16, 5, 2, 3)
    batch["valid"][:4, 1:] = 0.0  # episodes ending after the first step of the chunk
    module = _online_module(target, prior=prior, bc_weight=0.0)
    loss, info = module.actor_loss(batch, torch.Generator().manual_seed(0))
    for rows, changes in ((slice(0, 4), False), (slice(4, 8), True)):
        moved = {**batch, "observations": batch["observations"].clone()}
        moved["observations"][rows] += 1.0
        other, other_info = module.actor_loss(moved, torch.Generator().manual_seed(0))
        assert bool(not torch.isclose(loss, other)) == changes
        if target != "bon":
            assert bool(not torch.isclose(info["target_alpha"], other_info["target_alpha"])) == changes


def test_fine_tuning_from_an_offline_checkpoint_draws_from_its_own_seed():
    """A new fine-tuning run (``restore_random_states = False``, as finetune.build sets it) does not take the
    checkpoint's random states (its loss noise starts from ``module.seed``); a resumed run (True) does."""
    offline_state = torch.Generator().manual_seed(123).get_state()
    for restore, expected in ((False, torch.Generator().manual_seed(0).get_state()), (True, offline_state)):
        module = _online_module("bon")
        module.restore_random_states = restore
        checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {"cfg": {}},
                      "manip": {"rng": [{"torch": torch.get_rng_state(), "generator": offline_state}]}}
        module.on_load_checkpoint(checkpoint)
        assert module.seed == 0 and torch.equal(module.generator.get_state(), expected)


def test_replay_target_trains_the_offline_loss_on_the_replay_alone():
    """finetune.target=replay: the actor's loss is the agent's offline loss on the batch (QC's online design: the
    executed best-of-N chunks in the replay are the imitation targets); the critic never enters it."""
    batch = random_chunk_batch(16, 5, 2, 3)
    module = _online_module("replay")
    loss, info = module.actor_loss(batch, torch.Generator().manual_seed(0))
    offline, _ = module.agent.actor_loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(loss, offline) and "target_alpha" not in info
    loss.backward()
    assert all(p.grad is None for p in module.agent.critic.parameters())
    bon, _ = _online_module("bon").actor_loss(batch, torch.Generator().manual_seed(0))
    assert not torch.isclose(bon, offline)  # bon adds the best-of-N term to that loss
    with pytest.raises(ValueError, match="replay has no prior"):
        _online_module("replay", prior="data")


@pytest.mark.parametrize("target, prior, extra, expected", [
    ("rfm", "data", {"rfm_eta": 0.25}, {"eta": 0.25}),
    ("rfm", "box", {"rfm_eta": 0.0}, {"eta": 0.0}),
    ("som", "data", {"som_score_norm": 2.0}, {"score_norm": 2.0}),
    ("som", "box", {"som_score_norm": 3.0}, {"score_norm": 3.0}),
])
def test_online_target_settings_reach_the_estimator(monkeypatch, target, prior, extra, expected):
    """finetune.rfm_eta / som_score_norm / bound_std / target_samples / prior_std are what the target estimator
    is built with."""
    seen = {}
    real = targets.make_target_fn

    def spy(kind, q_fn, obs, alpha, **kwargs):
        seen.update(kind=kind, **kwargs)
        return real(kind, q_fn, obs, alpha, **kwargs)

    monkeypatch.setattr(targets, "make_target_fn", spy)
    module = _online_module(target, prior=prior, bound_std=0.3, target_samples=7, prior_std=0.4, **extra)
    loss, _ = module.actor_loss(random_chunk_batch(16, 5, 2, 3), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert seen["kind"] == target and seen["bound_std"] == 0.3 and seen["num_samples"] == 7
    for key, value in expected.items():
        assert seen[key] == value, key
    if prior == "data":
        assert seen["prior_std"] == 0.4


def test_bon_target_draws_target_samples_candidates(monkeypatch):
    """finetune.target_samples is the online best-of-N's N, not the agent's own num_samples."""
    module = _online_module("bon", target_samples=7)
    calls = []
    real = module.agent.sample_actions

    def spy(obs, num_samples=None, **kwargs):
        calls.append(num_samples)
        return real(obs, num_samples=num_samples, **kwargs)

    monkeypatch.setattr(module.agent, "sample_actions", spy)
    module.actor_loss(random_chunk_batch(16, 5, 2, 3), torch.Generator().manual_seed(0))
    assert calls == [7]


@pytest.mark.parametrize("target", ["bon", "som"])
def test_bc_weight_scales_the_bc_term(target):
    """loss(bc_weight=w) = loss(bc_weight=0) + w * bc_loss on the same draws."""
    batch = random_chunk_batch(16, 5, 2, 3)
    zero, _ = _online_module(target, bc_weight=0.0, q_scale="none").actor_loss(batch, torch.Generator().manual_seed(0))
    half, info = _online_module(target, bc_weight=0.5, q_scale="none").actor_loss(batch,
                                                                                   torch.Generator().manual_seed(0))
    torch.testing.assert_close(half, zero + 0.5 * info["bc_loss"], rtol=1e-5, atol=1e-6)


def test_alpha_schedule_counts_this_run_s_env_steps():
    """alpha goes linearly from finetune.alpha to alpha_final over alpha_steps env steps of this run (a run that
    continues another counts from its start_env_steps)."""
    module = _online_module("som", alpha=10.0, alpha_final=0.0, alpha_steps=100, start_env_steps=50)
    alphas = []
    for steps in (50, 100, 1000):
        module.env_steps = steps
        alphas.append(module.alpha)
    assert alphas == pytest.approx([10.0, 5.0, 0.0])


def test_collection_seed_depends_on_the_env_steps_so_far(monkeypatch):
    """A resumed run (env_steps > 0) seeds its collection envs anew: it never replays the first run's episodes."""
    import manip.envs
    import manip.module

    seeds = []
    monkeypatch.setattr(manip.envs, "make_vector_env", lambda *a, **k: SimpleNamespace(num_envs=1))
    monkeypatch.setattr(manip.module, "VectorRollout", lambda env, policy, seed, record: seeds.append(seed))
    module = _online_module("bon", seed=3)
    module._trainer = SimpleNamespace(global_rank=0, datamodule=SimpleNamespace(env_spec=None))
    for steps in (0, 0, 500):
        module.env_steps = steps
        module._start_rollout()
    assert seeds[0] == seeds[1] != seeds[2]


def test_each_rank_collects_with_noise_of_its_own(monkeypatch):
    """Every rank seeds torch's global generators alike: the collection policy draws each episode's noise from its
    own stream, seeded, like the envs' resets, by (finetune seed, rank, env steps), so two ranks acting on the same
    states with the same global generator state still explore differently."""
    import manip.envs
    import manip.module

    rollouts = []
    monkeypatch.setattr(manip.envs, "make_vector_env", lambda *a, **k: SimpleNamespace(num_envs=2))
    monkeypatch.setattr(manip.module, "VectorRollout", lambda env, policy, seed, record: rollouts.append(policy))
    module = _online_module("bon", seed=3)
    obs = np.zeros((2, module.obs_dim), np.float32)
    chunks = []
    for rank in (0, 1, 0):
        module._trainer = SimpleNamespace(global_rank=rank, datamodule=SimpleNamespace(env_spec=None))
        module._start_rollout()
        torch.manual_seed(0)
        chunks.append(rollouts[-1].select_action(obs))  # the first action of each env's first chunk
    assert not np.allclose(chunks[0], chunks[1]) and np.array_equal(chunks[0], chunks[2])
    assert not np.allclose(chunks[0][0], chunks[0][1])  # and each env's episode its own
