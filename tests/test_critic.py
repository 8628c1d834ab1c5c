"""Chunked critic pieces: TD targets, weighted loss, best-of-N, Polyak updates and the vectorised ensemble."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manip.algos import FQLAgent, FlowBoNAgent, MVPAgent
from manip.algos.critic import best_of_n, chunk_td_target, critic_loss, soft_update
from manip.algos.networks import CriticEnsemble, CriticMembers
from manip.data.replay import random_chunk_batch


def test_chunk_td_target_arithmetic():
    rewards = torch.tensor([-1.0, -0.5, 0.0])
    masks = torch.tensor([1.0, 0.0, 1.0])
    next_q = torch.tensor([-10.0, -20.0, 3.0])
    discount_h = 0.99**5
    expected = torch.tensor([-1.0 + discount_h * -10.0, -0.5, discount_h * 3.0])
    torch.testing.assert_close(chunk_td_target(rewards, masks, next_q, discount_h), expected)


def test_critic_loss_respects_weights():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 5.0]], requires_grad=True)
    target = torch.tensor([0.0, 2.0, 4.0])
    weight = torch.tensor([1.0, 1.0, 0.0])
    loss = critic_loss(q, target, weight)
    # squared errors [[1, 0, 1], [0, 0, 1]], last column weighted out, mean over all 6 entries
    assert torch.isclose(loss, torch.tensor(1.0 / 6))
    assert torch.isclose(critic_loss(q, target), torch.tensor(3.0 / 6))
    loss.backward()
    assert torch.all(q.grad[:, 2] == 0) and q.grad[0, 0] != 0
    # changing a zero-weight sample's target changes nothing
    assert torch.isclose(critic_loss(q, torch.tensor([0.0, 2.0, 100.0]), weight), loss)


def test_best_of_n_returns_argmax():
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(7, 5, 3, generator=g)
    scores = torch.randn(7, 5, generator=g)
    best, index = best_of_n(candidates, scores)
    assert best.shape == (7, 3) and index.shape == (7,)
    for b in range(7):
        i = max(range(5), key=lambda j: scores[b, j].item())
        assert index[b].item() == i
        assert torch.equal(best[b], candidates[b, i])


def test_soft_update_math():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = copy.deepcopy(source)
    for p in target.parameters():
        p.data.normal_()
    source.eval()(torch.randn(2, 3))
    source.train()(torch.randn(8, 3))  # moves the running stats (buffers)
    before = [p.clone() for p in target.parameters()]
    soft_update(target, source, 0.1)
    for old, new, src in zip(before, target.parameters(), source.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * src)
    for t_buf, s_buf in zip(target.buffers(), source.buffers()):
        assert torch.equal(t_buf, s_buf)
    soft_update(target, source, 1.0)
    for new, src in zip(target.parameters(), source.parameters()):
        torch.testing.assert_close(new, src)


def _member_forward(critic: CriticEnsemble, e: int, obs, actions, norm_first: bool = False):
    """Reference: member e of the ensemble evaluated as a plain MLP, Dense -> GELU -> LayerNorm per hidden layer
    as in FQL's and QC's networks (``norm_first``: LayerNorm before the GELU), with Flax's LayerNorm
    ``(h - mean) / sqrt(var + 1e-6)``."""
    h = torch.cat([obs, actions], -1)
    for i, layer in enumerate(critic.hidden):
        h = h @ layer.weight[e] + layer.bias[e, 0]
        if not norm_first:
            h = F.gelu(h)
        normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
        h = normed * critic.norm_scales[i][e, 0] + critic.norm_shifts[i][e, 0]
        if norm_first:
            h = F.gelu(h)
    return (h @ critic.out.weight[e] + critic.out.bias[e, 0]).squeeze(-1)


@pytest.mark.parametrize("block", ["linear_gelu_norm", "linear_norm_gelu"])
def test_critic_ensemble_matches_independent_members(block):
    torch.manual_seed(0)
    critic = CriticEnsemble(obs_dim=4, action_dim=6, num_critics=3, hidden_dims=(16, 16), block=block)
    with torch.no_grad():  # away from unit scales / zero shifts, which would hide a misplaced LayerNorm
        for scale, shift in zip(critic.norm_scales, critic.norm_shifts):
            scale.uniform_(0.5, 1.5), shift.normal_(0.0, 0.3)
    obs, actions = torch.randn(9, 4), torch.randn(9, 6)
    q = critic(obs, actions)
    assert q.shape == (3, 9)
    for e in range(3):
        torch.testing.assert_close(q[e], _member_forward(critic, e, obs, actions, block == "linear_norm_gelu"))
        assert not torch.allclose(q[e], _member_forward(critic, e, obs, actions, block != "linear_norm_gelu"))
    assert not torch.allclose(q[0], q[1])
    # features of small spread, where the LayerNorm's epsilon matters: Flax's 1e-6, not torch's default 1e-5
    small = copy.deepcopy(critic)
    with torch.no_grad():
        small.hidden[0].weight.mul_(1e-3), small.hidden[0].bias.mul_(1e-3)
        small_q = small(obs, actions)
        members = CriticMembers(small)(obs, actions)
    for e in range(3):
        torch.testing.assert_close(small_q[e], _member_forward(small, e, obs, actions, block == "linear_norm_gelu"),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(members, small_q, rtol=1e-4, atol=1e-4)
    # a loss on one member only produces gradients for that member's slice
    q[1].sum().backward()
    grad = critic.hidden[0].weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_agents_build_the_configured_critic_block_and_refuse_others():
    for agent in (MVPAgent(5, 2, 3, hidden_dims=(8,)), FlowBoNAgent(5, 2, 3, hidden_dims=(8,)),
                  FQLAgent(5, 2, 3, hidden_dims=(8,))):
        assert agent.critic.block == agent.target_critic.block == "linear_gelu_norm"
    assert MVPAgent(5, 2, 3, hidden_dims=(8,), critic_block="linear_norm_gelu").critic.block == "linear_norm_gelu"
    with pytest.raises(ValueError, match="algo.agent.critic_block 'gelu_first'"):
        FQLAgent(5, 2, 3, hidden_dims=(8,), critic_block="gelu_first")


def _toy_batch(obs_dim, action_dim, horizon, batch=16, seed=0):
    return random_chunk_batch(batch, obs_dim, action_dim, horizon, seed=seed)


def _agents():
    torch.manual_seed(0)
    small = {"hidden_dims": (32, 32)}
    return [
        MVPAgent(5, 2, 3, num_samples=4, **small),
        FlowBoNAgent(5, 2, 3, num_samples=4, flow_steps=3, **small),
        FQLAgent(5, 2, 3, **small),
    ]


def test_target_critic_is_frozen_and_outside_the_optimisers():
    for agent in _agents():
        assert all(not p.requires_grad for p in agent.target_critic.parameters())
        target_ids = {id(p) for p in agent.target_critic.parameters()}
        critic_ids = {id(p) for p in agent.critic_parameters()}
        actor_ids = {id(p) for p in agent.actor_parameters()}
        assert not target_ids & (critic_ids | actor_ids)
        assert not critic_ids & actor_ids
        assert len(actor_ids) > 0
        assert critic_ids | actor_ids | target_ids == {id(p) for p in agent.parameters()}
        loss, _ = agent.critic_loss(_toy_batch(5, 2, 3))
        loss.backward()
        assert all(p.grad is None for p in agent.target_critic.parameters())
        assert all(p.grad is None for p in agent.actor_parameters())


def test_agent_critic_loss_uses_chunk_target_and_final_valid_flag():
    for agent in _agents():
        batch = _toy_batch(5, 2, 3)
        batch["masks"] = torch.zeros(16)  # no bootstrap: y = rewards
        q = agent.critic(batch["observations"], batch["actions"].reshape(16, -1)).detach()
        loss, info = agent.critic_loss(batch)
        torch.testing.assert_close(loss, critic_loss(q, batch["rewards"]))
        torch.testing.assert_close(info["critic/target_mean"], batch["rewards"].mean())

        batch["masks"] = torch.ones(16)
        next_obs = batch["next_observations"]
        with torch.no_grad():
            next_actions = agent.target_actions(next_obs, torch.Generator().manual_seed(7))
            next_q = agent.target_critic(next_obs, next_actions).mean(0)
        _, info = agent.critic_loss(batch, generator=torch.Generator().manual_seed(7))
        expected = (batch["rewards"] + agent.discount**agent.horizon * next_q).mean()
        torch.testing.assert_close(info["critic/target_mean"], expected)

        # a sample whose last chunk step is invalid carries no weight
        batch["valid"][:8, -1] = 0.0
        loss_a, _ = agent.critic_loss(batch, generator=torch.Generator().manual_seed(7))
        batch["rewards"][:8] = 100.0
        loss_b, _ = agent.critic_loss(batch, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(loss_a, loss_b)


def test_agent_soft_update_moves_target_towards_critic():
    agent = _agents()[0]
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(1.0)
    before = [p.clone() for p in agent.target_critic.parameters()]
    agent.soft_update(0.25)
    for old, new, src in zip(before, agent.target_critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * src)


@pytest.mark.parametrize("agent_class", [MVPAgent, FlowBoNAgent])
@pytest.mark.parametrize("td_select", ["target", "online"])
def test_target_actions_are_best_of_n_under_the_critic_td_select_names(agent_class, td_select):
    """The named critic ranks the candidates (the other ranks them differently here); the target critic scores
    the winner in the TD target either way."""
    torch.manual_seed(0)
    agent = agent_class(5, 2, 3, num_samples=8, hidden_dims=(32, 32), td_select=td_select)
    with torch.no_grad():  # online and target critic disagree, as after training
        for p in agent.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs, n = torch.randn(6, 5), agent.num_samples
    chosen = agent.target_actions(obs, torch.Generator().manual_seed(4))
    candidates = agent.generate(obs.repeat_interleave(n, 0), torch.Generator().manual_seed(4)).view(6, n, -1)
    with torch.no_grad():
        ranks = {name: best_of_n(candidates, critic(obs.repeat_interleave(n, 0), candidates.reshape(6 * n, -1))
                                 .mean(0).view(6, n)) for name, critic in
                 (("target", agent.target_critic), ("online", agent.critic))}
    torch.testing.assert_close(chosen, ranks[td_select][0])
    assert not torch.equal(ranks["target"][1], ranks["online"][1])

    batch = _toy_batch(5, 2, 3)
    batch["masks"] = torch.ones(16)
    with torch.no_grad():
        next_actions = agent.target_actions(batch["next_observations"], torch.Generator().manual_seed(7))
        next_q = agent.target_critic(batch["next_observations"], next_actions).mean(0)
    _, info = agent.critic_loss(batch, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(info["critic/target_mean"],
                               (batch["rewards"] + agent.discount**agent.horizon * next_q).mean())


def test_td_select_defaults_and_refusal():
    assert MVPAgent(5, 2, 3, hidden_dims=(8,)).td_select == FlowBoNAgent(5, 2, 3, hidden_dims=(8,)).td_select == "target"
    with pytest.raises(ValueError, match="algo.agent.td_select 'both'"):
        FlowBoNAgent(5, 2, 3, hidden_dims=(8,), td_select="both")


def test_q_agg_min_selects_and_bootstraps_with_the_pessimistic_member():
    torch.manual_seed(0)
    agent = MVPAgent(obs_dim=5, action_dim=2, horizon=3, hidden_dims=(32, 32), num_samples=8, q_agg="min")
    with torch.no_grad():  # make the two members disagree so that mean and min rank candidates differently
        for p in agent.target_critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(6, 5)
    chosen = agent.target_actions(obs, torch.Generator().manual_seed(4))
    candidates = agent.generate(obs.repeat_interleave(8, 0), torch.Generator().manual_seed(4)).view(6, 8, -1)
    q = agent.target_critic(obs.repeat_interleave(8, 0), candidates.reshape(48, -1))
    torch.testing.assert_close(chosen, best_of_n(candidates, q.min(0).values.view(6, 8))[0])
    assert not torch.equal(best_of_n(candidates, q.min(0).values.view(6, 8))[1],
                           best_of_n(candidates, q.mean(0).view(6, 8))[1])

    batch = _toy_batch(5, 2, 3)
    batch["masks"] = torch.ones(16)
    with torch.no_grad():
        next_actions = agent.target_actions(batch["next_observations"], torch.Generator().manual_seed(7))
        next_q = agent.target_critic(batch["next_observations"], next_actions).min(0).values
    _, info = agent.critic_loss(batch, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(info["critic/target_mean"],
                               (batch["rewards"] + agent.discount**agent.horizon * next_q).mean())


def test_unknown_q_agg_is_rejected_by_name():
    with pytest.raises(ValueError, match="q_agg 'max'"):
        FlowBoNAgent(obs_dim=5, action_dim=2, horizon=3, hidden_dims=(16,), q_agg="max")
