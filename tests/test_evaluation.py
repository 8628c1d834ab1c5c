"""Success statistics and the evaluation rollout loop on a scripted fake vector env (no simulator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from manip.evaluation import ChunkPolicy, VectorRollout, evaluate_policy, wilson_interval
from manip.evaluation import SuccessRate

ACTION_DIM = 2


def test_wilson_interval_matches_known_values():
    """95% Wilson score bounds (published values, found independently as the roots of |k/n - p| = z se(p))."""
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    for n in (1, 20, 50, 100):  # all or none: the bound on that side is exactly 1 or 0, as the records print it
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(0, n)[0] == 0.0
        assert wilson_interval(n, n)[0] == pytest.approx(1 - wilson_interval(0, n)[1], abs=1e-12)


class ScriptedVectorEnv:
    """Gymnasium-style vector env with same-step autoreset.

    Env i's episodes last ``lengths[i]`` steps; ``success(i, step)`` (step = 1, 2, ... within the episode) is the
    success flag reported after that step; an episode's end is a truncation (a time limit), or a termination with
    ``terminate=True``. On the last step of an episode the step's info comes from the reset
    (success False) and the finished episode's info is under ``final_info``, its last observation under
    ``final_obs``, as Gymnasium's ``SyncVectorEnv`` reports them.
    """

    def __init__(self, lengths, success, terminate=False):
        self.lengths, self.success, self.terminate = list(lengths), success, terminate
        self.num_envs = len(self.lengths)
        self.steps = np.zeros(self.num_envs, dtype=int)

    def _obs(self):
        return np.stack([np.arange(self.num_envs), self.steps], axis=1).astype(np.float32)

    def reset(self, seed=None):
        self.steps[:] = 0
        return self._obs(), {}

    def step(self, actions):
        assert actions.shape == (self.num_envs, ACTION_DIM)
        self.steps += 1
        success = np.array([self.success(i, int(s)) for i, s in enumerate(self.steps)])
        done = self.steps >= np.asarray(self.lengths)
        final_obs = np.empty(self.num_envs, dtype=object)
        for i in np.flatnonzero(done):
            final_obs[i] = self._obs()[i]
        self.steps[done] = 0
        info = {"success": np.where(done, False, success)}
        if done.any():
            info["final_obs"] = final_obs
            info["final_info"] = {"success": np.where(done, success, False)}
        rewards = success.astype(np.float32)
        terminated = done if self.terminate else np.zeros(self.num_envs, bool)
        return self._obs(), rewards, terminated, done & ~terminated, info


def _zero_chunks(obs, generator=None):
    assert len(generator) == len(obs)  # one noise stream per state
    return np.zeros((obs.shape[0], 3, ACTION_DIM), dtype=np.float32)


def test_evaluate_policy_counts_a_fixed_quota_of_episodes_per_env():
    """Env i runs episodes i, i + E, ...: with 4 episodes on 2 envs each env gives 2, even though the short env
    (2 steps, always failing) finishes 3 episodes before the long one (5 steps, always succeeding) finishes 2."""
    env = ScriptedVectorEnv([2, 5], lambda i, step: i == 1 and step == 5)
    result = evaluate_policy(env, _zero_chunks, num_episodes=4)
    assert result.episodes == 4
    # outcomes[k] / lengths[k] belong to episode k, which env k % 2 ran
    assert result.lengths == [2, 5, 2, 5]
    assert result.outcomes == [False, True, False, True]
    assert result.success_rate == pytest.approx(0.5)
    assert result.mean_length == pytest.approx(3.5)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2, 4))


def test_an_odd_episode_count_gives_the_first_envs_one_more():
    env = ScriptedVectorEnv([5, 2], lambda i, step: i == 0 and step == 5)
    result = evaluate_policy(env, _zero_chunks, num_episodes=5)
    assert result.lengths == [5, 2, 5, 2, 5] and result.outcomes == [True, False, True, False, True]


def test_success_at_any_step_of_an_episode_counts():
    """An episode that succeeds mid-way (step 3 of 5) but not at its last step is a success."""
    env = ScriptedVectorEnv([5], lambda i, step: step == 3)
    result = evaluate_policy(env, _zero_chunks, num_episodes=2)
    assert result.outcomes == [True, True]
    assert result.lengths == [5, 5]
    assert result.success_rate == 1.0


@pytest.mark.parametrize("terminate", [False, True])
def test_recorded_episodes_bootstrap_past_a_time_limit_but_not_past_a_termination(terminate):
    """Online collection's transitions: mask 1 - terminated, so a truncated episode's last step keeps its bootstrap
    and a terminated one's does not; its next observation is the episode's final one, not the next episode's."""
    env = ScriptedVectorEnv([3], lambda i, step: False, terminate=terminate)
    rollout = VectorRollout(env, ChunkPolicy(lambda obs: np.zeros((len(obs), 2, ACTION_DIM), np.float32), 1),
                            record=True)
    [end] = [end for _ in range(3) for end in rollout.step()]
    episode = end.transitions
    assert episode.masks.tolist() == [1.0, 1.0, 0.0 if terminate else 1.0]
    assert episode.terminals.tolist() == [False, False, True]
    assert episode.next_observations[:, 1].tolist() == [1, 2, 3]  # steps within the episode: the last is final_obs
    assert episode.observations[:, 1].tolist() == [0, 1, 2]


def test_chunk_policy_streams_follow_the_vector_env_s_episode_numbers():
    """Env i's j-th episode is the vector env's episode i + j E, and draws from the stream seeded with
    noise_seed + i + j E."""
    policy = ChunkPolicy(lambda obs, generator: None, num_envs=3, noise_seed=100)
    policy.reset(np.array([False, True, False]))
    policy.reset(np.array([False, True, True]))
    assert policy.episodes == [0, 7, 5]
    for stream, episode in zip(policy.streams, (0, 7, 5)):
        assert torch.equal(stream.get_state(), torch.Generator().manual_seed(100 + episode).get_state())


def test_success_rate_counts_every_episode_of_a_batched_update():
    metric = SuccessRate()
    metric.update(torch.tensor([True, False, True, True]))
    metric.update(torch.tensor([0.0]))
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["episodes"] == 5 and result["success_rate"] == pytest.approx(0.6)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(3, 5))
