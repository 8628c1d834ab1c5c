"""Chunk replay: masks at episode boundaries, chunk rewards and bootstrap masks, balanced sampling."""

import numpy as np
import pytest
import torch

from manip.data.datamodule import ReplayDataModule
from manip.data.errors import DatasetError
from manip.data.replay import ChunkReplay, Transitions


def two_episodes() -> Transitions:
    # Episode A: 3 steps, truncated (mask 1 at the end); episode B: 4 steps, success at its last step.
    return Transitions(
        observations=np.arange(7, dtype=np.float32)[:, None],
        actions=np.arange(7, dtype=np.float32)[:, None] / 10,
        rewards=np.array([-1, -1, -1, -1, -1, -1, 0], np.float32),
        masks=np.array([1, 1, 1, 1, 1, 1, 0], np.float32),
        terminals=np.array([0, 0, 1, 0, 0, 0, 1], bool),
        next_observations=np.arange(1, 8, dtype=np.float32)[:, None])


def test_chunks_never_cross_episode_end():
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=3, discount=0.5)
    batch = replay.gather(torch.arange(7))
    assert batch["valid"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    # Invalid steps repeat the last valid action of the same episode, never the next episode's.
    assert batch["actions"][1, :, 0].tolist() == pytest.approx([0.1, 0.2, 0.2])
    assert batch["actions"][2, :, 0].tolist() == pytest.approx([0.2, 0.2, 0.2])


def test_chunk_rewards_masks_and_next_observation():
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=3, discount=0.5)
    batch = replay.gather(torch.arange(7))
    assert batch["rewards"].tolist() == pytest.approx([-1.75, -1.5, -1.0, -1.75, -1.5, -1.0, 0.0])
    assert batch["masks"].tolist() == [1, 1, 1, 1, 0, 0, 0]
    # h steps ahead inside the episode, else the observation after the episode's last step.
    assert batch["next_observations"][:, 0].tolist() == [3, 3, 3, 6, 7, 7, 7]


def test_rewards_stop_after_termination_inside_chunk():
    t = Transitions(np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32),
                    np.array([-1, 0, 5, 5], np.float32), np.array([1, 0, 1, 1], np.float32),
                    np.array([0, 0, 0, 1], bool), np.zeros((4, 1), np.float32))
    replay = ChunkReplay.from_transitions(t, horizon=4, discount=1.0)
    out = replay.gather(torch.tensor([0]))
    assert out["rewards"].item() == -1.0 and out["masks"].item() == 0.0
    # the terminating step's own reward counts (discounted); what follows it does not
    t.rewards = np.array([-1, 3, 5, 5], np.float32)
    out = ChunkReplay.from_transitions(t, horizon=4, discount=0.5).gather(torch.tensor([0]))
    assert out["rewards"].item() == pytest.approx(-1 + 0.5 * 3) and out["masks"].item() == 0.0


def test_online_append_and_balanced_sampling():
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=2)
    online = two_episodes()
    online.observations = online.observations + 100
    replay.add(online)
    assert replay.size == 14 and replay.num_offline == 7
    batch = replay.sample(1000, torch.Generator().manual_seed(0), offline_fraction=0.5)
    from_online = (batch["observations"][:, 0] >= 100).float().mean().item()
    assert from_online == pytest.approx(0.5, abs=1e-6)
    state = replay.online_state_dict()
    fresh = ChunkReplay.from_transitions(two_episodes(), horizon=2)
    fresh.load_online_state_dict(state)
    assert fresh.size == 14
    assert torch.equal(fresh.gather(torch.arange(14))["rewards"], replay.gather(torch.arange(14))["rewards"])


def test_bad_transitions_are_refused():
    t = two_episodes()
    with pytest.raises(DatasetError, match="rewards has 6 rows"):
        Transitions(t.observations, t.actions, t.rewards[:6], t.masks, t.terminals, t.next_observations)
    with pytest.raises(DatasetError, match="incomplete"):
        Transitions(t.observations, t.actions, t.rewards, t.masks, np.zeros(7, bool), t.next_observations)
    replay = ChunkReplay(obs_dim=2, action_dim=1)
    with pytest.raises(DatasetError, match="obs_dim=1"):
        replay.add(t)


def test_sampling_throughput_is_reported():
    from manip.data.bench import measure, synthetic

    replay = ChunkReplay.from_transitions(synthetic(20_000), horizon=5)
    result = measure(replay, 256, seconds=0.3)
    assert result["samples_per_s"] > 0 and result["batch_size"] == 256


def online_episodes() -> Transitions:
    """``two_episodes()`` as if collected online, told apart by its observations (+ 100) and actions (+ 1)."""
    online = two_episodes()
    online.observations = online.observations + 100
    online.actions = online.actions + 1
    return online


def test_offline_fraction_is_the_offline_share_not_the_online_one():
    """offline_fraction=0.25: a quarter of the batch from the offline part (an asymmetric share, so that swapping
    the two parts shows)."""
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=2)
    replay.add(online_episodes())
    batch = replay.sample(1000, torch.Generator().manual_seed(0), offline_fraction=0.25)
    from_offline = (batch["observations"][:, 0] < 100).float().mean().item()
    assert from_offline == pytest.approx(0.25, abs=1e-6)


def test_the_streamed_batches_draw_offline_fraction_from_the_offline_part():
    """The data module's batches (what training reads) keep the share too."""

    class Offline(ReplayDataModule):
        def _load(self):
            return two_episodes(), None, {}

    dm = Offline(batch_size=400, horizon=2, offline_fraction=0.25)
    dm.setup("fit")
    dm.replay.add(online_episodes())  # what online collection appends
    batch = next(iter(dm.train_dataloader()))
    assert (batch["observations"][:, 0] < 100).float().mean().item() == pytest.approx(0.25)


def test_episodes_added_online_keep_their_own_boundaries():
    """Chunks of an episode appended after the offline part are cut at that episode's end (buffer coordinates),
    exactly as the same episode's chunks in the offline part."""
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=3, discount=0.5)
    replay.add(online_episodes())
    offline, added = replay.gather(torch.arange(7)), replay.gather(torch.arange(7, 14))
    assert torch.equal(added["valid"], offline["valid"])
    torch.testing.assert_close(added["actions"], offline["actions"] + 1)
    torch.testing.assert_close(added["rewards"], offline["rewards"])
    assert torch.equal(added["masks"], offline["masks"])
    assert np.array_equal(replay.transitions(7).terminals, two_episodes().terminals)


def test_loading_an_online_state_replaces_the_online_part():
    """Restoring a checkpoint's online part into a replay that already collected online (a resume in the same
    process) replaces it; it is not appended after it."""
    replay = ChunkReplay.from_transitions(two_episodes(), horizon=2)
    replay.add(two_episodes())
    state = replay.online_state_dict()
    replay.add(two_episodes())  # collected after the checkpoint
    replay.load_online_state_dict(state)
    assert replay.size == 14 and replay.num_offline == 7
