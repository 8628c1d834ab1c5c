"""Agents end to end: losses run and decrease, actions have the right shape and range, and a one-step MVP policy
learns a state-conditioned multimodal action distribution about as well as a 10-step flow policy."""

import math

import pytest
import torch

from manip.algos import FQLAgent, FlowBoNAgent, MVPAgent
from manip.algos.flow import euler_sample, flow_matching_loss
from manip.algos.fql import fql_actor_loss
from manip.algos.mvp import mvp_policy_loss, sample_one_step
from manip.algos.networks import MLP, MeanVelocityNet, VelocityNet

OBS_DIM, ACTION_DIM, HORIZON = 6, 3, 4
SMALL = {"hidden_dims": (64, 64)}
AGENTS = {
    "mvp": lambda: MVPAgent(OBS_DIM, ACTION_DIM, HORIZON, num_samples=8, **SMALL),
    "mvp_noivc": lambda: MVPAgent(OBS_DIM, ACTION_DIM, HORIZON, num_samples=8, lambda_ivc=0.0, **SMALL),
    "qc": lambda: FlowBoNAgent(OBS_DIM, ACTION_DIM, HORIZON, num_samples=8, flow_steps=4, **SMALL),
    "bfn": lambda: FlowBoNAgent(OBS_DIM, ACTION_DIM, 1, num_samples=4, flow_steps=4, **SMALL),
    "qc_fql": lambda: FQLAgent(OBS_DIM, ACTION_DIM, HORIZON, alpha=10.0, flow_steps=4, **SMALL),
    # the flow reading t itself, as FQL's and QC's code
    "qc_raw_t": lambda: FlowBoNAgent(OBS_DIM, ACTION_DIM, HORIZON, num_samples=8, flow_steps=4, time_dim=1, **SMALL),
    "fql_raw_t": lambda: FQLAgent(OBS_DIM, ACTION_DIM, 1, alpha=10.0, flow_steps=4, time_dim=1, **SMALL),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy_batch(agent, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, OBS_DIM, generator=g)
    actions = torch.tanh(obs[:, :ACTION_DIM]).unsqueeze(1).repeat(1, agent.horizon, 1)
    actions = actions + 0.1 * torch.randn(actions.shape, generator=g)
    valid = torch.ones(batch, agent.horizon)
    valid[: batch // 4, agent.horizon // 2 :] = 0.0
    return {
        "observations": obs,
        "actions": actions.clamp(-1, 1),
        "valid": valid,
        "rewards": -torch.rand(batch, generator=g),
        "masks": (torch.rand(batch, generator=g) > 0.1).float(),
        "next_observations": torch.randn(batch, OBS_DIM, generator=g),
    }


@pytest.mark.parametrize("name", list(AGENTS))
def test_agent_losses_decrease_on_a_fixed_batch(name):
    torch.manual_seed(0)
    agent = AGENTS[name]()
    batch = _toy_batch(agent)
    actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=1e-3)
    critic_opt = torch.optim.Adam(agent.critic_parameters(), lr=1e-3)

    def critic_loss():  # the same noise every time, so the change is due to the parameters only
        return agent.critic_loss(batch, generator=torch.Generator().manual_seed(1))

    def actor_loss():
        return agent.actor_loss(batch, generator=torch.Generator().manual_seed(2))

    (critic0, c_info), (actor0, a_info) = critic_loss(), actor_loss()
    assert torch.isfinite(critic0) and torch.isfinite(actor0)
    assert all(v.dim() == 0 and not v.requires_grad for v in {**c_info, **a_info}.values())
    for _ in range(40):
        critic_opt.zero_grad()
        critic_loss()[0].backward()
        critic_opt.step()
        actor_opt.zero_grad()
        actor_loss()[0].backward()
        actor_opt.step()
        agent.soft_update(0.05)
    critic1, actor1 = critic_loss()[0], actor_loss()[0]
    assert critic1 < 0.7 * critic0
    assert actor1 < 0.7 * actor0


def test_actor_loss_does_not_touch_the_critic():
    for name in ("mvp", "qc", "qc_fql"):
        agent = AGENTS[name]()
        loss, _ = agent.actor_loss(_toy_batch(agent))
        loss.backward()
        assert all(p.grad is None for p in agent.critic_parameters())
        assert all(p.grad is not None for p in agent.actor_parameters())
    # FQL's Q term reaches the student through the (frozen) critic
    agent = AGENTS["qc_fql"]()
    agent.alpha = 0.0
    batch = _toy_batch(agent)
    agent.actor_loss(batch)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.onestep.parameters())



@pytest.mark.parametrize("normalize_q", [False, True])
def test_fql_q_term_is_minus_mean_q_scaled_only_when_asked(normalize_q):
    """FQL's and QC's code leave the Q term unscaled by default (alpha is tuned against it)."""
    agent = AGENTS["qc_fql"]()
    with torch.no_grad():  # a critic far from zero, where the scaling matters
        agent.critic.out.bias.fill_(-40.0)
    batch = _toy_batch(agent)
    obs, actions = batch["observations"], batch["actions"].flatten(1)
    args = (agent.flow, agent.onestep, agent.critic, obs, actions, None, agent.alpha, agent.flow_steps)
    _, info = fql_actor_loss(*args, normalize_q=normalize_q, generator=torch.Generator().manual_seed(1))
    q = info["actor/q_mean"]
    expected = -q / q.abs() if normalize_q else -q
    assert torch.allclose(info["actor/q_loss"], expected, rtol=1e-4, atol=1e-6)
    if not normalize_q:
        _, default = fql_actor_loss(*args, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(default["actor/q_loss"], info["actor/q_loss"])
    assert FQLAgent(OBS_DIM, ACTION_DIM, 1, **SMALL).normalize_q is False

@pytest.mark.parametrize("name", list(AGENTS))
def test_sample_actions_shape_range_and_determinism(name):
    torch.manual_seed(0)
    agent = AGENTS[name]()
    assert agent.act_dim_flat == agent.horizon * ACTION_DIM
    obs = 3 * torch.randn(5, OBS_DIM)
    with torch.inference_mode():
        for n in (None, 1, 3):
            actions = agent.sample_actions(obs, num_samples=n)
            assert actions.shape == (5, agent.horizon * ACTION_DIM)
            assert actions.abs().max() <= 1.0
        a = agent.sample_actions(obs, generator=torch.Generator().manual_seed(3))
        b = agent.sample_actions(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_mvp_acting_picks_the_critic_best_of_n_one_step_candidates():
    torch.manual_seed(0)
    agent = AGENTS["mvp"]()
    obs = torch.randn(3, OBS_DIM)
    n = 16
    with torch.no_grad():
        chosen = agent.sample_actions(obs, num_samples=n, generator=torch.Generator().manual_seed(5))
        obs_rep = obs.repeat_interleave(n, 0)
        noise = torch.randn(3 * n, agent.act_dim_flat, generator=torch.Generator().manual_seed(5))
        candidates = sample_one_step(agent.actor, obs_rep, noise)
        q = agent.critic(obs_rep, candidates).mean(0).view(3, n)
    expected = candidates.view(3, n, -1)[torch.arange(3), q.argmax(1)]
    torch.testing.assert_close(chosen, expected)


@pytest.mark.parametrize("name", list(AGENTS))
def test_noise_scale_shrinks_the_initial_noise_and_zero_is_deterministic(name):
    torch.manual_seed(0)
    agent = AGENTS[name]()
    obs = torch.randn(5, OBS_DIM)

    def act(n, seed, scale):
        generator = torch.Generator().manual_seed(seed)
        return agent.sample_actions(obs, num_samples=n, generator=generator, noise_scale=scale)

    with torch.inference_mode():
        zero = [act(1, 0, 0.0), act(3, 1, 0.0), act(1, 2, 0.0)]
        full, half = act(1, 3, 1.0), act(1, 3, 0.5)
    assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
    assert not torch.equal(full, half)
    # shrinking the noise moves every sample towards the noise-free one
    assert (half - zero[0]).norm(dim=1).mean() < (full - zero[0]).norm(dim=1).mean()


def test_mvp_noise_scale_is_applied_to_the_one_step_noise():
    torch.manual_seed(0)
    agent = AGENTS["mvp"]()
    obs = torch.randn(4, OBS_DIM)
    with torch.no_grad():
        scaled = agent.generate(obs, torch.Generator().manual_seed(7), noise_scale=0.25)
        noise = torch.randn(4, agent.act_dim_flat, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(scaled, sample_one_step(agent.actor, obs, 0.25 * noise))
        zero = torch.zeros(4)
        mode = agent.actor(obs, torch.zeros(4, agent.act_dim_flat), zero, zero + 1).clamp(-1, 1)
        # noise 0: the image of the noise mode, and no critic call (every candidate would be the same)
        agent.critic = None
        torch.testing.assert_close(agent.sample_actions(obs, num_samples=8, noise_scale=0.0), mode)


def test_mvp_noivc_ablation_has_no_boundary_samples():
    agent = AGENTS["mvp_noivc"]()
    assert agent.boundary_fraction == 0.0
    _, info = agent.actor_loss(_toy_batch(agent))
    assert info["actor/ivc_loss"] == 0 and info["actor/mf_loss"] > 0


def test_mvp_policy_loss_accepts_a_target_velocity_fn():
    agent = AGENTS["mvp"]()
    batch = _toy_batch(agent)
    calls = []

    def towards_zero(x_t, t):
        calls.append(x_t.shape)
        return -x_t

    loss, info = agent.policy_loss(batch["observations"], batch["actions"], batch["valid"], towards_zero)
    loss.backward()
    assert calls == [(64, agent.act_dim_flat)]
    assert all(p.grad is not None for p in agent.actor.parameters())


# -- learning a state-conditioned ring of 8 Gaussians ---------------------------------------------------------------

RING_MODES, RING_RADIUS, RING_STD = 8, 0.7, 0.05
RING_BATCH, RING_STEPS, RING_HIDDEN, RING_LR = 1024, 2500, (128, 128, 128), 3e-3


def ring_actions(states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 1) states in [-1, 1] -> (B, 2) actions: 8 Gaussians on a circle, rotated by ``state * pi / 16``."""
    k = torch.randint(0, RING_MODES, (states.shape[0],), generator=generator)
    angle = 2 * math.pi * k / RING_MODES + states[:, 0] * math.pi / 16
    centres = RING_RADIUS * torch.stack([angle.cos(), angle.sin()], dim=-1)
    return centres + RING_STD * torch.randn(centres.shape, generator=generator)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.1) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (biased estimate)."""

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2)).mean()

    return (k(x, x) + k(y, y) - 2 * k(x, y)).item()


def sliced_w1(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced 1-Wasserstein distance between equal-size samples along unit ``directions`` (2, P)."""
    return ((x @ directions).sort(0).values - (y @ directions).sort(0).values).abs().mean().item()


def _train(loss_fn, params, steps, lr, generator):
    """Adam with cosine decay on fresh (state, ring action) batches."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        states = torch.rand(RING_BATCH, 1, generator=generator) * 2 - 1
        loss = loss_fn(states, ring_actions(states, generator))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.slow
def test_one_step_mvp_matches_flow_policy_on_a_state_conditioned_ring():
    """Same widths, batches, steps and learning rate for all three policies (about a CPU minute in total).

    MVP's (t, r) sampler is widened (LN(0.8, 1.5)) so that long intervals, which one-step generation uses, are
    visited often within this short budget.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    mvp = MeanVelocityNet(1, 2, RING_HIDDEN, time_dim=32)
    _train(
        lambda s, a: mvp_policy_loss(mvp, s, a, generator=g, time_mean=0.8, time_std=1.5)[0],
        mvp.parameters(),
        RING_STEPS,
        RING_LR,
        g,
    )
    flow = VelocityNet(1, 2, RING_HIDDEN, time_dim=16)
    _train(lambda s, a: flow_matching_loss(flow, s, a, generator=g), flow.parameters(), RING_STEPS, RING_LR, g)
    gaussian = MLP(1, 4, RING_HIDDEN)  # mean and log-std of a diagonal Gaussian, trained by NLL

    def gaussian_nll(s, a):
        mean, log_std = gaussian(s).chunk(2, dim=-1)
        log_std = log_std.clamp(-5.0, 2.0)
        return (0.5 * ((a - mean) / log_std.exp()).square() + log_std).sum(-1).mean()

    _train(gaussian_nll, gaussian.parameters(), RING_STEPS // 2, RING_LR, g)

    def gaussian_sample(s, z):
        mean, log_std = gaussian(s).chunk(2, dim=-1)
        return (mean + log_std.clamp(-5.0, 2.0).exp() * z).clamp(-1.0, 1.0)

    samplers = {
        "mvp": lambda s, z: sample_one_step(mvp, s, z),
        "flow": lambda s, z: euler_sample(flow, s, z, steps=10),
        "gaussian": gaussian_sample,
    }
    eval_g = torch.Generator().manual_seed(123)
    directions = torch.randn(2, 64, generator=eval_g)
    directions = directions / directions.norm(dim=0, keepdim=True)
    n = 2048
    w1 = {k: 0.0 for k in samplers}
    discrepancy = {k: 0.0 for k in samplers}
    test_states = (-0.75, -0.25, 0.25, 0.75)
    with torch.no_grad():
        for state in test_states:
            states = torch.full((n, 1), state)
            truth = ring_actions(states, eval_g)
            for name, sampler in samplers.items():
                samples = sampler(states, torch.randn(n, 2, generator=eval_g))
                w1[name] += sliced_w1(samples, truth, directions) / len(test_states)
                discrepancy[name] += mmd(samples[:1024], truth[:1024]) / len(test_states)
    print({"sliced_w1": w1, "mmd": discrepancy})
    assert w1["mvp"] < 1.5 * w1["flow"]
    assert w1["mvp"] < 0.5 * w1["gaussian"]
    assert discrepancy["mvp"] < 0.5 * discrepancy["gaussian"]


# -- flow matching, Euler sampling and the FQL actor loss, term by term -----------------------------------------------


def test_flow_matching_loss_is_zero_for_the_exact_field_of_a_point_mass():
    """x_t = (1 - t) x0 + t a and target a - x0: for a point mass at a the field (a - x) / (1 - t) is exact."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.5, -0.3, 0.8], dtype=torch.float64)
    actions = a.expand(256, -1).clone()
    obs = torch.zeros(256, OBS_DIM, dtype=torch.float64)

    def exact(obs, x, t):
        return (a - x) / (1 - t).unsqueeze(-1)

    def wrong(obs, x, t):  # right direction, wrong speed
        return a - x

    loss = flow_matching_loss(exact, obs, actions, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    assert flow_matching_loss(wrong, obs, actions, generator=g).item() > 0.1


def test_flow_matching_draws_its_times_uniformly():
    """t ~ U(0, 1) (QC / FQL): the empirical distribution of 20000 draws is within the Kolmogorov-Smirnov 1% band
    of the uniform one."""
    seen = []

    def recording(obs, x, t):
        seen.append(t)
        return torch.zeros_like(x)

    flow_matching_loss(recording, torch.zeros(20000, OBS_DIM), torch.zeros(20000, 2),
                       generator=torch.Generator().manual_seed(0))
    t = seen[0].sort().values
    empirical = torch.arange(1, len(t) + 1) / len(t)
    assert (empirical - t).abs().max() < 1.63 / math.sqrt(len(t))


def test_euler_sampler_evaluates_the_field_at_the_start_of_each_step():
    """Step i uses t = i * dt: integrating v = t from 0 with 10 steps gives sum_i 0.1 * i / 10 = 0.45 (not 0.55)."""

    def time_field(obs, x, t):
        return t.unsqueeze(-1).expand_as(x)

    out = euler_sample(time_field, torch.zeros(4, OBS_DIM), torch.zeros(4, 2), steps=10)
    torch.testing.assert_close(out, torch.full((4, 2), 0.45))


def _fql_inputs(seed=0):
    torch.manual_seed(seed)
    agent = AGENTS["qc_fql"]()  # flow_steps=4, alpha=10
    batch = _toy_batch(agent, batch=32, seed=seed)
    return agent, batch["observations"], batch["actions"].flatten(1)


def _fql_noise(agent, obs, actions, seed):
    """The student's z inside fql_actor_loss: drawn right after the BC loss's noise and times."""
    g = torch.Generator().manual_seed(seed)
    flow_matching_loss(agent.flow, obs, actions, None, g)
    return torch.randn(actions.shape, generator=g)


def test_fql_teacher_is_detached_so_the_flow_gets_only_the_bc_gradient():
    """The multi-step teacher is a fixed target: the flow's gradient of the FQL loss equals that of the BC loss."""
    agent, obs, actions = _fql_inputs()
    loss, _ = fql_actor_loss(agent.flow, agent.onestep, agent.critic, obs, actions, None, agent.alpha,
                             agent.flow_steps, generator=torch.Generator().manual_seed(3))
    fql_grads = torch.autograd.grad(loss, list(agent.flow.parameters()), allow_unused=True)
    bc = flow_matching_loss(agent.flow, obs, actions, None, torch.Generator().manual_seed(3))
    bc_grads = torch.autograd.grad(bc, list(agent.flow.parameters()))
    for fql_grad, bc_grad in zip(fql_grads, bc_grads):
        torch.testing.assert_close(fql_grad, bc_grad)


def test_fql_q_term_is_evaluated_on_the_clipped_student_action():
    """Q(s, clip(mu(s, z))), not Q(s, mu(s, z)), with the student pushed well outside [-1, 1]."""
    agent, obs, actions = _fql_inputs()
    with torch.no_grad():
        agent.onestep.mlp.net[-1].weight.mul_(20.0)
        agent.onestep.mlp.net[-1].bias.fill_(0.5)
    _, info = fql_actor_loss(agent.flow, agent.onestep, agent.critic, obs, actions, None, agent.alpha,
                             agent.flow_steps, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        student = agent.onestep(obs, _fql_noise(agent, obs, actions, 4))
        assert (student.abs() > 1).float().mean() > 0.5
        clipped_q = agent.critic(obs, student.clamp(-1, 1)).mean(0).mean()
        raw_q = agent.critic(obs, student).mean(0).mean()
    assert (clipped_q - raw_q).abs() > 1e-2
    torch.testing.assert_close(info["actor/q_mean"], clipped_q)
    torch.testing.assert_close(info["actor/q_loss"], -clipped_q)


def test_fql_loss_is_bc_plus_alpha_distill_plus_q_term():
    """alpha weights the distillation term only: loss = bc + alpha * distill + q_loss (alpha = 7 here)."""
    agent, obs, actions = _fql_inputs()
    loss, info = fql_actor_loss(agent.flow, agent.onestep, agent.critic, obs, actions, None, 7.0,
                                agent.flow_steps, generator=torch.Generator().manual_seed(5))
    assert info["actor/distill_loss"] > 1e-2
    expected = info["actor/bc_loss"] + 7.0 * info["actor/distill_loss"] + info["actor/q_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(info["actor/loss"], expected)


def test_fql_teacher_uses_flow_steps_euler_steps():
    """distill = mean((mu(s, z) - euler(flow, s, z, flow_steps))^2) with the agent's flow_steps (4), not 10."""
    agent, obs, actions = _fql_inputs()
    with torch.no_grad():  # a stronger, state-dependent field, so that 4 and 10 Euler steps land apart
        agent.flow.mlp.net[-1].weight.mul_(5.0)
    assert agent.flow_steps == 4
    _, info = fql_actor_loss(agent.flow, agent.onestep, agent.critic, obs, actions, None, agent.alpha,
                             agent.flow_steps, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        z = _fql_noise(agent, obs, actions, 6)
        student = agent.onestep(obs, z)
        expected = (student - euler_sample(agent.flow, obs, z, 4)).square().mean()
        ten_steps = (student - euler_sample(agent.flow, obs, z, 10)).square().mean()
    assert (expected - ten_steps).abs() > 1e-3 * expected
    torch.testing.assert_close(info["actor/distill_loss"], expected)


def test_flow_time_dim_one_reads_the_time_itself():
    """time_dim = 1: v(x, t | s) reads [s, x, t] (FQL's and QC's ActorVectorField), no sinusoidal features."""
    net = VelocityNet(OBS_DIM, 5, (16,), time_dim=1)
    assert net.mlp.net[0].in_features == OBS_DIM + 5 + 1
    g = torch.Generator().manual_seed(0)
    obs, x, t = torch.randn(7, OBS_DIM, generator=g), torch.randn(7, 5, generator=g), torch.rand(7, generator=g)
    torch.testing.assert_close(net(obs, x, t), net.mlp(torch.cat([obs, x, t.unsqueeze(-1)], dim=-1)))
    assert VelocityNet(OBS_DIM, 5, (16,)).mlp.net[0].in_features == OBS_DIM + 5 + 32


def test_readme_python_section_runs():
    """The README's "From Python" lines run as written and do what their comments say."""
    import re
    from pathlib import Path

    import manip

    readme = (Path(manip.__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### From Python"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    agent, chunks = scope["agent"], scope["chunks"]
    assert chunks.shape == (64, 5, 7) and chunks.abs().max() <= 1.0
    assert all(p.grad is not None for p in agent.critic_parameters())
    assert all(p.grad is not None for p in agent.actor_parameters())
    assert scope["actor_info"]["actor/mf_loss"] > 0 and scope["actor_info"]["actor/ivc_loss"] > 0
    listed = re.findall(r"`(manip\.algos\.\w+)` \(([^)]*)\)", section)
    assert len(listed) == 5
    for module_name, functions in listed:
        module = __import__(module_name, fromlist=["_"])
        for function in re.findall(r"`(\w+)`", functions):
            assert callable(getattr(module, function)), f"{module_name}.{function}"
    from manip.data.datamodule import OGBenchDataModule, RobomimicDataModule
    from manip.module import ManipModule

    assert all(isinstance(cls, type) for cls in (OGBenchDataModule, RobomimicDataModule, ManipModule))
    assert "`manip.data.datamodule` (`RobomimicDataModule`, `OGBenchDataModule`)" in " ".join(section.split())
