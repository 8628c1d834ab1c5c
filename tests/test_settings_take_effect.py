"""Each setting reaches the code it controls: the fine-tuning targets' estimator settings, best-of-N's candidate
count, the BC weight, the alpha schedule, the collection seed, observation standardisation and ``noise_scale``.
(Range checks are in test_run_settings.py; these tests change a setting and look for its effect.)"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from manip.algos import MVPAgent, targets
from manip.data.replay import random_chunk_batch
from manip.module import ManipModule

OBS, ACT, H = 5, 2, 3


def _online_module(target: str, **online) -> ManipModule:
    torch.manual_seed(0)
    agent = partial(MVPAgent, hidden_dims=(32, 32), num_samples=4)
    stats = {"obs_mean": [0.0] * OBS, "obs_std": [1.0] * OBS}
    return ManipModule(agent, obs_dim=OBS, action_dim=ACT, horizon=H, stats=stats,
                       online={"target": target, "target_samples": 8, "alpha": 10.0, **online})


def _batch() -> dict[str, torch.Tensor]:
    return random_chunk_batch(16, OBS, ACT, H)


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
    loss, _ = module.actor_loss(_batch(), torch.Generator().manual_seed(0))
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
    module.actor_loss(_batch(), torch.Generator().manual_seed(0))
    assert calls == [7]


@pytest.mark.parametrize("target", ["bon", "som"])
def test_bc_weight_scales_the_bc_term(target):
    """loss(bc_weight=w) = loss(bc_weight=0) + w * bc_loss on the same draws."""
    batch = _batch()
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


def test_losses_standardise_both_observations_of_the_batch():
    """The critic's TD target sees s' standardised as s is (the dataset's obs_mean / obs_std)."""
    stats = {"obs_mean": [5.0] * OBS, "obs_std": [2.0] * OBS}
    module = ManipModule(partial(MVPAgent, hidden_dims=(32, 32), num_samples=4), obs_dim=OBS, action_dim=ACT,
                         horizon=H, stats=stats)
    seen = {}
    real = module.agent.critic_loss

    def spy(batch, generator=None):
        seen.update(batch)
        return real(batch, generator)

    module._critic_loss_fn = spy
    batch = _batch()
    module.losses(batch, torch.Generator().manual_seed(0))
    for key in ("observations", "next_observations"):
        torch.testing.assert_close(seen[key], (batch[key] - 5.0) / 2.0)


def test_obs_norm_none_acts_on_raw_observations():
    stats = {"obs_mean": [5.0] * OBS, "obs_std": [2.0] * OBS}
    agent = partial(MVPAgent, hidden_dims=(32, 32))
    obs = torch.randn(4, OBS)
    raw = ManipModule(agent, obs_dim=OBS, action_dim=ACT, horizon=H, stats=stats, obs_norm="none")
    torch.testing.assert_close(raw.normalize(obs), obs)
    standard = ManipModule(agent, obs_dim=OBS, action_dim=ACT, horizon=H, stats=stats)
    torch.testing.assert_close(standard.normalize(obs), (obs - 5.0) / 2.0)


def test_predict_chunks_applies_noise_scale():
    """noise_scale=0: the noise-free chunk whatever the noise streams; 1: the streams matter."""
    module = _online_module("bon")
    obs = np.zeros((2, OBS), np.float32)

    def draw(scale: float, seed: int) -> np.ndarray:
        streams = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return module.predict_chunks(obs, noise_scale=scale, generator=streams)

    np.testing.assert_array_equal(draw(0.0, 0), draw(0.0, 100))
    assert not np.array_equal(draw(1.0, 0), draw(1.0, 100))


def test_constant_observation_dimensions_pass_through_centred():
    """A dimension with zero std in the data (a fixed object, a gripper never used) is centred, not divided by 0."""
    stats = {"obs_mean": [1.0, 2.0, 3.0], "obs_std": [0.5, 0.0, 1e-9]}
    module = ManipModule(partial(MVPAgent, hidden_dims=(8,)), obs_dim=3, action_dim=2, horizon=1, stats=stats)
    out = module.normalize(torch.tensor([[2.0, 2.5, 3.0], [1.0, 2.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.0, 1.0]]))
