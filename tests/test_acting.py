"""The inference form of the agents (manip.algos.acting): same actions as the training networks, frozen weights,
bfloat16 close to float32, compiled equal to eager."""

from __future__ import annotations

import pytest
import torch

from manip.algos import CriticEnsemble, FlowBoNAgent, FQLAgent, MVPAgent
from manip.algos.acting import acting_copy, fast_sampler
from manip.algos.networks import CriticMembers

OBS, ACT, H = 6, 2, 3
AGENTS = {
    "mvp": lambda: MVPAgent(OBS, ACT, H, (32, 32), num_samples=8),
    "qc": lambda: FlowBoNAgent(OBS, ACT, H, (32, 32), num_samples=8, flow_steps=4),
    "fql": lambda: FQLAgent(OBS, ACT, H, (32, 32), alpha=10.0, flow_steps=4),
}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter away from its initialisation (zero biases, unit LayerNorm scales hide mistakes)."""
    generator = _seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("layer_norm,block", [(True, "linear_gelu_norm"), (True, "linear_norm_gelu"),
                                              (False, "linear_gelu_norm")])
def test_critic_members_equal_the_ensemble_and_are_a_copy(layer_norm, block):
    torch.manual_seed(0)
    ensemble = CriticEnsemble(OBS, ACT * H, num_critics=3, hidden_dims=(16, 8), layer_norm=layer_norm, block=block)
    _perturb_(ensemble)
    obs, actions = torch.randn(5, OBS), torch.randn(5, ACT * H)
    members = CriticMembers(ensemble)
    expected = ensemble(obs, actions)
    assert expected.shape == (3, 5)
    torch.testing.assert_close(members(obs, actions), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ensemble.out.bias.add_(1.0)
    torch.testing.assert_close(members(obs, actions), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", list(AGENTS))
def test_float32_copy_acts_like_the_agent_and_leaves_it_alone(algo):
    torch.manual_seed(0)
    agent = AGENTS[algo]()
    _perturb_(agent)
    obs = torch.randn(4, OBS)
    copy = acting_copy(agent)
    assert copy.target_critic is None and isinstance(copy.critic, CriticMembers)
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    for seed in range(3):
        torch.testing.assert_close(copy.sample_actions(obs, generator=_seeded(seed)),
                                   agent.sample_actions(obs, generator=_seeded(seed)), rtol=1e-5, atol=1e-5)
    # the agent keeps training as before
    assert isinstance(agent.target_critic, CriticEnsemble) and agent.training
    assert all(p.requires_grad for p in agent.critic_parameters())


@pytest.mark.parametrize("algo", list(AGENTS))
def test_bfloat16_copy_is_close_to_float32(algo):
    """One candidate (no argmax to flip): the bf16 networks move the action by less than 0.03."""
    torch.manual_seed(0)
    agent = AGENTS[algo]()
    _perturb_(agent, seed=1, scale=0.05)
    obs = torch.randn(64, OBS)
    copy = acting_copy(agent, "bfloat16")
    assert next(getattr(copy, copy.acting_net).parameters()).dtype == torch.bfloat16
    assert next(copy.critic.parameters()).dtype == torch.bfloat16
    fast = copy.sample_actions(obs, num_samples=1, generator=_seeded(2))
    exact = agent.sample_actions(obs, num_samples=1, generator=_seeded(2))
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    error = (fast - exact).abs()
    assert 0 < error.max() < 0.03  # bf16 does change the numbers, by little


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="act dtype 'float16'"):
        acting_copy(AGENTS["mvp"](), "float16")


@pytest.mark.slow
def test_compiled_sampler_equals_eager_copy_and_is_frozen():
    torch.manual_seed(0)
    agent = AGENTS["mvp"]()
    _perturb_(agent)
    obs = torch.randn(1, OBS)
    compiled = fast_sampler(agent, "float32", compile=True, max_autotune=False)
    eager = fast_sampler(agent, "float32", compile=False)
    for seed in range(3):
        torch.testing.assert_close(compiled(obs, generator=_seeded(seed)), eager(obs, generator=_seeded(seed)),
                                   rtol=1e-4, atol=1e-4)
    before = compiled(obs, generator=_seeded(0))
    with torch.no_grad():
        for p in agent.actor.parameters():
            p.mul_(0.5)
    assert not torch.allclose(agent.sample_actions(obs, generator=_seeded(0)), before, atol=1e-3)
    torch.testing.assert_close(compiled(obs, generator=_seeded(0)), before)  # a snapshot: training does not reach it
    batch = compiled(torch.randn(3, OBS), noise_scale=0.0)  # another batch size compiles another graph
    assert batch.shape == (3, H * ACT) and batch.abs().max() <= 1.0


@pytest.mark.slow
def test_compiled_sampler_pads_batches_to_powers_of_two():
    """Batches of 3 to 8 states compile two graphs (4 and 8 rows), not six, and every state's chunk is the eager
    copy's with its own noise stream."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    agent = AGENTS["mvp"]()
    _perturb_(agent)
    compiled = fast_sampler(agent, "float32", compile=True, max_autotune=False)
    eager = fast_sampler(agent, "float32", compile=False)
    graphs = counters["stats"]["unique_graphs"]
    for batch in range(3, 9):
        obs = torch.randn(batch, OBS)
        chunks = compiled(obs, generator=[_seeded(i) for i in range(batch)])
        assert chunks.shape == (batch, H * ACT)
        torch.testing.assert_close(chunks, eager(obs, generator=[_seeded(i) for i in range(batch)]),
                                   rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_module_fast_acting_uses_the_acting_weights_and_restores():
    """Inside ``fast_acting`` the module acts with a copy of its acting weights (the weight average when
    ``actor_ema`` is set), and with its own networks again after."""
    from functools import partial

    import numpy as np

    from manip.module import ManipModule

    stats = {"obs_mean": [0.0] * OBS, "obs_std": [1.0] * OBS}
    module = ManipModule(partial(MVPAgent, hidden_dims=(32, 32), num_samples=8), obs_dim=OBS, action_dim=ACT,
                         horizon=H, stats=stats, actor_ema=0.5)
    _perturb_(module.agent)
    module.ema_actor.update_parameters(module.agent.actor)
    _perturb_(module.agent.actor, seed=3)  # the raw weights now differ from their average
    obs = np.random.default_rng(0).normal(size=(4, OBS)).astype(np.float32)
    expected = module.predict_chunks(obs, generator=_seeded(1))  # acts with the average
    own = module._sample_fn
    with module.fast_acting("float32", compile=False):
        assert module._sample_fn is not own
        fast = module.predict_chunks(obs, generator=_seeded(1))
    assert module._sample_fn is own
    np.testing.assert_allclose(fast, expected, atol=1e-5)
    with torch.no_grad():
        raw = module.agent.sample_actions(torch.as_tensor(obs), generator=_seeded(1))
    assert not np.allclose(raw.numpy().reshape(fast.shape), fast, atol=1e-3)


@pytest.mark.parametrize("algo", sorted(AGENTS))
def test_a_states_chunk_depends_on_its_own_noise_stream_only(algo):
    """With one noise stream per state (evaluation's, one per episode), a state's chunk is what it is alone with its
    stream, whichever states share the call; the fast sampler draws the same. A stream count that does not divide
    the rows is refused by name."""
    from manip.algos.base import unit_noise

    torch.manual_seed(0)
    agent = AGENTS[algo]()
    _perturb_(agent)
    obs = torch.randn(3, OBS)
    together = agent.sample_actions(obs, generator=[_seeded(10 + i) for i in range(3)])
    fast = fast_sampler(agent, "float32", compile=False)(obs, generator=[_seeded(10 + i) for i in range(3)])
    for i in range(3):
        alone = agent.sample_actions(obs[i:i + 1], generator=[_seeded(10 + i)])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, together, rtol=1e-5, atol=1e-6)
    reordered = agent.sample_actions(obs[[2, 0, 1]], generator=[_seeded(12), _seeded(10), _seeded(11)])
    torch.testing.assert_close(reordered, together[[2, 0, 1]], rtol=1e-5, atol=1e-6)
    noise = unit_noise((6, 4), [_seeded(10), _seeded(11), _seeded(12)])  # each state's two rows from its stream
    torch.testing.assert_close(noise[2:4], torch.randn(2, 4, generator=_seeded(11)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 noise streams for 3 rows"):
        unit_noise((3, 4), [_seeded(0), _seeded(1)])
