"""MVP loss pieces: JVP derivative, time-pair sampling, and exactness of the losses on closed-form mean velocities."""

import math

import pytest
import torch

from manip.algos.mvp import (
    MVPAgent,
    ivc_loss,
    mean_flow_loss,
    mean_velocity_and_derivative,
    mvp_policy_loss,
    num_boundary_samples,
    sample_few_step,
    sample_one_step,
    sample_time_pair,
)
from manip.algos.base import flatten_chunk
from manip.algos.networks import MeanVelocityNet


class GaussianMeanVelocity:
    """Closed-form mean velocity of the linear-path flow from N(0, I) to N(mu, diag(sigma^2)).

    The marginal flow is affine, x_t = t mu + s_t z with s_t = sqrt((1 - t)^2 + t^2 sigma^2), so
    u(x, t, r) = (x_r - x_t) / (r - t) = mu + (x - t mu) (s_r - s_t) / (s_t (r - t)) and
    (s_r - s_t) / (r - t) = (-2 + (r + t)(1 + sigma^2)) / (s_r + s_t): smooth at r = t, where it equals the marginal
    velocity. sigma = 0 is a point mass, whose conditional velocity a - x0 equals the marginal one.
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu, self.sigma = mu, sigma

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        t = t.unsqueeze(-1)
        return ((1 - t) ** 2 + t**2 * self.sigma**2).sqrt()

    def __call__(self, obs, x, t, r):
        s_t, s_r = self.scale(t), self.scale(r)
        slope = (-2 + (r + t).unsqueeze(-1) * (1 + self.sigma**2)) / (s_t * (s_r + s_t))
        return self.mu + (x - t.unsqueeze(-1) * self.mu) * slope

    def marginal_velocity(self, x, t):
        s_t = self.scale(t)
        tt = t.unsqueeze(-1)
        return self.mu + (x - tt * self.mu) * (tt * self.sigma**2 - (1 - tt)) / s_t**2

    def sample(self, n, generator):
        return self.mu + self.sigma * torch.randn(n, self.mu.shape[0], generator=generator, dtype=self.mu.dtype)


def _random_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MeanVelocityNet(obs_dim=3, action_dim=4, hidden_dims=(32, 32), time_dim=16).to(dtype)


def test_jvp_matches_central_finite_difference():
    net = _random_net()
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = 0.8 * torch.rand(6, generator=g, dtype=torch.float64)
    r = t + (1 - t) * torch.rand(6, generator=g, dtype=torch.float64)
    v = torch.randn(6, 4, generator=g, dtype=torch.float64)

    def u_fn(x_, t_, r_):
        return net(obs, x_, t_, r_)

    u, dudt = mean_velocity_and_derivative(u_fn, x, t, r, v)
    eps = 1e-6
    with torch.no_grad():
        fd = (u_fn(x + eps * v, t + eps, r) - u_fn(x - eps * v, t - eps, r)) / (2 * eps)
        along_x_only = (u_fn(x + eps * v, t, r) - u_fn(x - eps * v, t, r)) / (2 * eps)
        torch.testing.assert_close(u, u_fn(x, t, r))
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)
    # the t-direction matters, so a derivative along x alone would not pass the check above
    assert (dudt - along_x_only).abs().max() > 1e-3


def test_gradient_flows_through_jvp_primal_output():
    net = _random_net(torch.float32, seed=3)
    g = torch.Generator().manual_seed(2)
    obs, x, v = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 0.5 * torch.rand(5, generator=g)
    r = t + 0.3

    u, dudt = mean_velocity_and_derivative(lambda a, b, c: net(obs, a, b, c), x, t, r, v)
    (u - dudt.detach()).square().sum().backward()
    jvp_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    (net(obs, x, t, r) - dudt.detach()).square().sum().backward()
    for a, b in zip(jvp_grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b)
    assert all(gr.abs().sum() > 0 for gr in jvp_grads)


def test_jvp_runs_in_fp32_under_autocast():
    net = _random_net(torch.float32)
    obs, x, v = torch.randn(4, 3), torch.randn(4, 4), torch.randn(4, 4)
    t, r = torch.full((4,), 0.2), torch.full((4,), 0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, dudt = mean_velocity_and_derivative(lambda a, b, c: net(obs, a, b, c), x, t, r, v)
    assert u.dtype == torch.float32 and dudt.dtype == torch.float32


def test_time_pair_sampler_order_and_boundary_fraction():
    g = torch.Generator().manual_seed(0)
    n = 20000
    t, r, boundary = sample_time_pair(n, g, mean=-0.4, std=1.0, boundary_fraction=0.25)
    assert t.shape == r.shape == boundary.shape == (n,)
    assert boundary.dtype == torch.bool
    assert int(boundary.sum()) == num_boundary_samples(n, 0.25) == 5000
    assert torch.all(t <= r) and torch.all(t > 0) and torch.all(r < 1)
    assert torch.equal(r[boundary], t[boundary])
    assert torch.all(r[~boundary] > t[~boundary])
    # the non-boundary pairs are the order statistics of two logit-normal draws
    logits = torch.logit(torch.cat([t[~boundary], r[~boundary]]).double())
    assert abs(logits.mean().item() + 0.4) < 0.03
    assert abs(logits.std().item() - 1.0) < 0.03
    assert int(sample_time_pair(8, g, boundary_fraction=0.0)[2].sum()) == 0
    assert int(sample_time_pair(8, g, boundary_fraction=1.0)[2].sum()) == 8


def test_time_pair_sampler_full_interval_fraction():
    g = torch.Generator().manual_seed(0)
    n = 1000
    t, r, boundary = sample_time_pair(n, g, boundary_fraction=0.5, full_interval_fraction=0.25)
    full = (t == 0) & (r == 1)
    assert int(full.sum()) == 125  # a quarter of the 500 r > t samples
    assert not torch.any(full & boundary)
    assert torch.equal(r[boundary], t[boundary]) and torch.all(t[boundary] > 0)
    rest = ~boundary & ~full
    assert int(rest.sum()) == 375 and torch.all((t[rest] > 0) & (r[rest] < 1) & (r[rest] > t[rest]))
    # without IVC samples the share applies to the whole batch
    t0, r0, _ = sample_time_pair(8, g, boundary_fraction=0.0, full_interval_fraction=1.0)
    assert torch.all(t0 == 0) and torch.all(r0 == 1)
    with pytest.raises(ValueError, match="full_interval_fraction"):
        sample_time_pair(8, g, full_interval_fraction=1.5)


def test_agent_trains_the_full_interval_it_samples():
    """With full_interval_fraction = 1 every MeanFlow sample is the one-step jump: its loss is the one-step error."""
    torch.manual_seed(0)
    agent = MVPAgent(obs_dim=3, action_dim=2, horizon=1, hidden_dims=(16,), full_interval_fraction=1.0)
    seen = []
    forward = agent.actor.forward

    def spy(obs, x, t, r):
        seen.append((t.detach().clone(), r.detach().clone()))
        return forward(obs, x, t, r)

    agent.actor.forward = spy
    batch = {"observations": torch.randn(16, 3), "actions": torch.rand(16, 1, 2) * 2 - 1}
    agent.actor_loss(batch, generator=torch.Generator().manual_seed(1))
    mf_t, mf_r = seen[0]  # the JVP call on the 8 r > t samples comes first
    assert torch.all(mf_t == 0) and torch.all(mf_r == 1)
    ivc_t, ivc_r = seen[1]
    assert torch.equal(ivc_t, ivc_r) and torch.all(ivc_t > 0)


@pytest.mark.parametrize("adaptive_p", [None, 0.5])
def test_losses_vanish_for_closed_form_gaussian_mean_velocity(adaptive_p):
    g = torch.Generator().manual_seed(0)
    flow = GaussianMeanVelocity(
        mu=torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64), sigma=torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    )
    actions = flow.sample(512, g)
    obs = torch.zeros(512, 1, dtype=torch.float64)

    def losses(u_fn):
        _, info = mvp_policy_loss(
            u_fn,
            obs,
            actions,
            adaptive_p=adaptive_p,
            target_velocity_fn=flow.marginal_velocity,
            generator=torch.Generator().manual_seed(1),
        )
        return info["actor/mf_loss"].item(), info["actor/ivc_loss"].item()

    mf, ivc = losses(flow)
    assert mf < 1e-12 and ivc < 1e-12
    # a C(x, r)-style term that vanishes at r = t: invisible to the IVC, caught by the MeanFlow identity
    mf, ivc = losses(lambda o, x, t, r: flow(o, x, t, r) + 0.2 * (r - t).unsqueeze(-1) * x)
    assert mf > 1e-4 and ivc < 1e-12
    # a constant offset breaks both terms
    mf, ivc = losses(lambda o, x, t, r: flow(o, x, t, r) + 0.05)
    assert mf > 1e-4 and ivc > 1e-4


def test_losses_vanish_for_point_mass_with_conditional_velocity():
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([0.4, -0.7], dtype=torch.float64)
    flow = GaussianMeanVelocity(mu=target, sigma=torch.zeros(2, dtype=torch.float64))
    actions = target.expand(256, 2).clone()
    obs = torch.zeros(256, 1, dtype=torch.float64)
    _, info = mvp_policy_loss(flow, obs, actions, generator=g)
    assert info["actor/mf_loss"] < 1e-12 and info["actor/ivc_loss"] < 1e-12
    _, info = mvp_policy_loss(lambda o, x, t, r: 1.1 * flow(o, x, t, r), obs, actions, generator=g)
    assert info["actor/mf_loss"] > 1e-3 and info["actor/ivc_loss"] > 1e-3
    # one step from noise lands on the point mass
    noise = torch.randn(256, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sample_one_step(flow, obs, noise), actions)


def test_mean_flow_and_ivc_loss_arithmetic():
    u = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    dudt = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    v = torch.tensor([[0.5, 2.5], [1.0, -1.0]])
    t = torch.tensor([0.2, 0.5])
    r = torch.tensor([0.6, 0.5])
    # targets: row 0: v + 0.4 dudt = [0.9, 2.1]; row 1: v (r = t)
    expected = ((1.0 - 0.9) ** 2 + (2.0 - 2.1) ** 2 + 1.0 + 1.0) / 4
    assert math.isclose(mean_flow_loss(u, dudt, v, t, r).item(), expected, rel_tol=1e-6)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert math.isclose(mean_flow_loss(u, dudt, v, t, r, mask).item(), 0.01, rel_tol=1e-5)
    assert math.isclose(ivc_loss(u, v, mask).item(), (0.25 + 0.25) / 2, rel_tol=1e-6)
    err = torch.tensor([0.25, 0.25, 1.0, 1.0])
    adaptive = (err / (err + 1e-3).sqrt()).mean().item()
    assert math.isclose(ivc_loss(u, v, adaptive_p=0.5).item(), adaptive, rel_tol=1e-5)


def test_total_loss_weights_the_ivc_term_by_lambda():
    obs, actions = torch.zeros(32, 1), torch.rand(32, 3) * 2 - 1
    net = lambda o, x, t, r: torch.sin(2 * x) + (r - t).unsqueeze(-1) * x  # noqa: E731
    loss, info = mvp_policy_loss(net, obs, actions, lambda_ivc=0.5, generator=torch.Generator().manual_seed(2))
    assert info["actor/mf_loss"] > 0 and info["actor/ivc_loss"] > 0
    torch.testing.assert_close(loss, info["actor/mf_loss"] + 0.5 * info["actor/ivc_loss"])


def test_adaptive_weight_is_a_stop_gradient_scale():
    """d/du of sg(1 / (e + c)^p) * e with e = (u - v)^2 is 2 (u - v) / (e + c)^p: the weight carries no gradient."""
    u = torch.tensor([[0.0, 1.0], [3.0, -2.0]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[0.5, 1.0], [1.0, 0.0]], dtype=torch.float64)
    ivc_loss(u, v, adaptive_p=0.5).backward()
    err = (u.detach() - v).square()
    torch.testing.assert_close(u.grad, 2 * (u.detach() - v) / (err + 1e-3).sqrt() / u.numel())


def test_mean_flow_target_is_stop_gradient():
    u = torch.randn(3, 2, requires_grad=True)
    dudt = torch.randn(3, 2, requires_grad=True)
    v = torch.randn(3, 2, requires_grad=True)
    mean_flow_loss(u, dudt, v, torch.zeros(3), torch.ones(3)).backward()
    assert u.grad is not None and dudt.grad is None and v.grad is None


class _RecordingNet:
    def __init__(self):
        self.intervals = []

    def __call__(self, obs, x, t, r):
        self.intervals.append((r - t).detach())
        return x * t.unsqueeze(-1) + r.unsqueeze(-1)


def test_lambda_zero_has_no_boundary_samples():
    obs, actions = torch.zeros(64, 1), torch.rand(64, 3)
    net = _RecordingNet()
    loss, info = mvp_policy_loss(net, obs, actions, lambda_ivc=0.0, generator=torch.Generator().manual_seed(0))
    gaps = torch.cat(net.intervals)
    assert gaps.numel() == 64 and torch.all(gaps > 0)
    assert info["actor/ivc_loss"] == 0 and torch.isclose(loss, info["actor/mf_loss"])

    net = _RecordingNet()
    g = torch.Generator().manual_seed(0)
    mvp_policy_loss(net, obs, actions, lambda_ivc=1.0, boundary_fraction=0.5, generator=g)
    gaps = torch.cat(net.intervals)
    assert gaps.numel() == 64 and int((gaps == 0).sum()) == 32


def test_invalid_chunk_steps_do_not_affect_the_loss():
    def elementwise_u(obs, x, t, r):  # element i of u depends on element i of x only
        return torch.sin(3 * x) * (1 + r - t).unsqueeze(-1) + t.unsqueeze(-1)

    obs = torch.zeros(32, 1)
    actions = torch.rand(32, 6) * 2 - 1
    valid = torch.ones(32, 6)
    valid[:, 4:] = 0.0
    changed = actions.clone()
    changed[:, 4:] = 5.0
    base, _ = mvp_policy_loss(elementwise_u, obs, actions, valid, generator=torch.Generator().manual_seed(3))
    same, _ = mvp_policy_loss(elementwise_u, obs, changed, valid, generator=torch.Generator().manual_seed(3))
    other, _ = mvp_policy_loss(elementwise_u, obs, changed, None, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(base, same)
    assert other > base + 1.0


def test_invalid_steps_are_masked_row_by_row_in_both_terms():
    """Rows end their chunks at different steps and go to either term: each row's own mask must follow it into
    the IVC rows and the mean-flow rows."""
    def elementwise_u(obs, x, t, r):
        return torch.sin(3 * x) * (1 + r - t).unsqueeze(-1) + t.unsqueeze(-1)

    obs = torch.zeros(32, 1)
    actions = torch.rand(32, 6) * 2 - 1
    valid = torch.ones(32, 6)
    valid[:8, 3:] = 0.0    # boundary rows 0-7 end after 3 steps
    valid[20:, 5:] = 0.0   # mean-flow rows 20-31 after 5
    changed = actions.clone()
    changed[valid == 0] = 5.0
    _, base = mvp_policy_loss(elementwise_u, obs, actions, valid, generator=torch.Generator().manual_seed(4))
    _, same = mvp_policy_loss(elementwise_u, obs, changed, valid, generator=torch.Generator().manual_seed(4))
    for key in ("actor/ivc_loss", "actor/mf_loss"):
        torch.testing.assert_close(base[key], same[key])
    tampered = actions.clone()
    tampered[8:20, 3:] = 5.0  # entries valid in these rows (and invalid in rows 0-7): they count
    _, other = mvp_policy_loss(elementwise_u, obs, tampered, valid, generator=torch.Generator().manual_seed(4))
    assert other["actor/loss"] > base["actor/loss"] + 1.0


class _RowRecordingNet:
    """u = 0; records which rows (obs holds the row index) reach the r = t and the r > t evaluations."""

    def __init__(self):
        self.boundary_rows, self.mean_flow_rows = [], []

    def __call__(self, obs, x, t, r):
        rows = obs[:, 0].long().tolist()
        (self.boundary_rows if bool(torch.all(r == t)) else self.mean_flow_rows).extend(rows)
        return torch.zeros_like(x)


def test_boundary_rows_are_drawn_at_random_not_by_position():
    """A balanced batch is offline rows then online rows: both halves must reach both terms."""
    batch = 256
    obs, actions = torch.arange(batch, dtype=torch.float32).unsqueeze(-1), torch.rand(batch, 3)
    seen = []
    for seed in (0, 1):
        net = _RowRecordingNet()
        mvp_policy_loss(net, obs, actions, boundary_fraction=0.5, generator=torch.Generator().manual_seed(seed))
        assert sorted(net.boundary_rows + net.mean_flow_rows) == list(range(batch))  # every row once
        assert len(net.boundary_rows) == 128
        first_half = sum(row < batch // 2 for row in net.boundary_rows)
        assert 40 <= first_half <= 88, first_half  # ~64 expected; by position it would be 128
        seen.append(set(net.boundary_rows))
    assert seen[0] != seen[1]


def test_target_velocity_fn_replaces_conditional_velocity():
    obs, actions = torch.zeros(16, 1), torch.rand(16, 2)
    zero_u = lambda o, x, t, r: torch.zeros_like(x)  # noqa: E731
    seen = {}

    def constant_velocity(x_t, t):
        seen["shapes"] = (x_t.shape, t.shape)
        return torch.full_like(x_t, 2.0)

    _, info = mvp_policy_loss(zero_u, obs, actions, target_velocity_fn=constant_velocity)
    assert seen["shapes"] == ((16, 2), (16,))
    # u = 0, v_hat = 2 everywhere, du/dt = 0: both terms are exactly 4
    assert torch.isclose(info["actor/mf_loss"], torch.tensor(4.0))
    assert torch.isclose(info["actor/ivc_loss"], torch.tensor(4.0))


def test_few_step_sampling_is_exact_for_the_closed_form_mean_velocity():
    """Exact mean velocities give the same sample from the same noise for any number of jumps, and the
    sample is distributed as the target; a velocity-only field (u(x, t, r) = v(x, t)) is not one-step exact."""
    flow = GaussianMeanVelocity(
        mu=torch.tensor([0.3, -0.2], dtype=torch.float64), sigma=torch.tensor([0.2, 0.25], dtype=torch.float64)
    )  # inside the action box: the final clip changes nothing
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    obs = torch.zeros(4096, 1, dtype=torch.float64)
    one = sample_one_step(flow, obs, noise)
    for steps in (2, 4):
        torch.testing.assert_close(sample_few_step(flow, obs, noise, steps), one)
    torch.testing.assert_close(one.mean(0), flow.mu, atol=0.03, rtol=0)
    torch.testing.assert_close(one.std(0), flow.sigma, atol=0.03, rtol=0)
    instantaneous = lambda o, x, t, r: flow.marginal_velocity(x, t)  # noqa: E731
    one_inst, many_inst = sample_few_step(instantaneous, obs, noise, 1), sample_few_step(instantaneous, obs, noise, 256)
    assert (one_inst - one).abs().max() > 0.1 and (many_inst - one).abs().max() < 0.015
    with pytest.raises(ValueError, match="sample_steps"):
        sample_few_step(flow, obs, noise, 0)


def test_time_features_are_sin_and_cos_of_low_frequencies():
    from manip.algos.networks import time_embedding

    torch.testing.assert_close(time_embedding(torch.zeros(1), 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    t = torch.tensor([0.3])
    expected = torch.tensor([[math.sin(0.3), math.sin(0.9), math.cos(0.3), math.cos(0.9)]])
    torch.testing.assert_close(time_embedding(t, 4), expected)


def test_mean_velocity_net_embeds_t_and_the_interval_length():
    """u(x, t, r | s) reads [s, x, emb(t), emb(r - t)]: the interval length, not r, is the second time input."""
    net = _random_net()
    g = torch.Generator().manual_seed(5)
    obs, x = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.2, 0.5, 0.0], dtype=torch.float64)
    r = torch.tensor([0.4, 0.2, 0.9, 1.0], dtype=torch.float64)
    features = torch.cat([obs, x, net.time_embed(t), net.time_embed(r - t)], dim=-1)
    torch.testing.assert_close(net(obs, x, t, r), net.mlp(features))


def test_the_agent_passes_every_loss_setting_to_the_mvp_loss():
    """``MVPAgent.policy_loss`` is ``mvp_policy_loss`` with the agent's settings: equal with them, different when
    any one of them is left at its default (a setting the agent dropped would go unnoticed in training)."""
    settings = dict(lambda_ivc=0.5, boundary_fraction=0.3, adaptive_p=0.5, time_mean=0.2, time_std=0.7,
                    full_interval_fraction=0.25)
    defaults = dict(lambda_ivc=1.0, boundary_fraction=0.5, adaptive_p=None, time_mean=-0.4, time_std=1.0,
                    full_interval_fraction=0.0)
    torch.manual_seed(0)
    agent = MVPAgent(3, 2, 2, hidden_dims=(16,), **settings)
    obs, actions = torch.randn(64, 3), torch.rand(64, 2, 2) * 2 - 1

    def loss_with(**kwargs) -> torch.Tensor:
        return mvp_policy_loss(agent.actor, obs, actions.reshape(64, -1), generator=torch.Generator().manual_seed(1),
                               **kwargs)[0]

    loss, _ = agent.policy_loss(obs, actions, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, loss_with(**settings))
    for key, default in defaults.items():
        assert not torch.allclose(loss, loss_with(**{**settings, key: default})), key


def test_flatten_chunk_expands_each_step_flag_over_its_action_dims():
    """Chunk (B, h, A) -> (B, h * A) step-major; a step's validity flag covers its A action dims."""
    actions = torch.arange(12.0).reshape(2, 3, 2)
    flat, mask = flatten_chunk(actions, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert flat.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert flatten_chunk(actions, None)[1] is None
