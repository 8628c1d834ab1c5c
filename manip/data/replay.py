"""In-memory transitions and action-chunk sampling shared by every dataset and the online buffer.

A chunk starting at index ``i`` covers transitions ``i .. i + h - 1`` of the same episode. Steps
past the episode's last transition are *invalid*: their actions repeat the last valid action and
their ``valid`` flag is 0, so a chunk never mixes two episodes. Per chunk start the buffer keeps

* ``rewards``: ``sum_j gamma^j * r_{i+j}`` over valid steps, accumulated until the first
  terminating transition (mask 0) inside the chunk,
* ``masks``: the bootstrap mask, 0 if any valid step of the chunk terminates,
* ``next_observations``: the observation after step ``i + h - 1`` (after the last valid step when
  the episode ends inside the chunk; such chunks have ``valid[:, -1] == 0`` and QC drops them
  from the critic loss).

Everything lives in contiguous torch tensors; sampling is a handful of index gathers, uniform with
replacement (RL style), optionally balanced between the offline part and the online part.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from manip.data.errors import DatasetError


@dataclass
class Transitions:
    """Flat, episode-contiguous transitions in time order.

    observations (N, O) float32, actions (N, A) float32 in [-1, 1], rewards (N,) float32 in the
    configured reward convention, masks (N,) float32 bootstrap masks (0 where the transition
    terminates), terminals (N,) bool (True at the last transition of every episode),
    next_observations (N, O) float32.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    masks: np.ndarray
    terminals: np.ndarray
    next_observations: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.observations)
        for f in fields(self):
            value = getattr(self, f.name)
            if len(value) != n:
                raise DatasetError(f"Transitions.{f.name} has {len(value)} rows, observations has {n}")
        if n and not bool(self.terminals[-1]):
            raise DatasetError("Transitions must end with a terminal (the last episode is incomplete)")

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def num_episodes(self) -> int:
        return int(np.asarray(self.terminals, dtype=bool).sum())


_STORED = ("observations", "actions", "rewards", "masks", "next_observations")


class ChunkReplay:
    """Replay of transitions sampled as action chunks of length ``horizon``.

    Episodes are appended whole (``add``); the first ``num_offline`` transitions are the offline
    dataset, the rest were collected online. Storage grows by doubling, nothing is evicted.
    """

    def __init__(self, obs_dim: int, action_dim: int, horizon: int = 5, discount: float = 0.99,
                 capacity: int = 1024) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.horizon, self.discount = horizon, float(discount)
        self.size = 0
        self.num_offline = 0
        self._alloc(max(capacity, 1))

    # ----------------------------------------------------------------------------------- storage
    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "_data", None)
        shapes = {"observations": (self.obs_dim,), "actions": (self.action_dim,), "rewards": (),
                  "masks": (), "next_observations": (self.obs_dim,)}
        data = {k: torch.zeros((capacity, *shapes[k]), dtype=torch.float32) for k in _STORED}
        # Per chunk start: index of the episode's last transition, chunk reward and bootstrap mask.
        data["episode_end"] = torch.zeros(capacity, dtype=torch.long)
        data["chunk_rewards"] = torch.zeros(capacity, dtype=torch.float32)
        data["chunk_masks"] = torch.zeros(capacity, dtype=torch.float32)
        if old is not None:
            for k, v in old.items():
                data[k][: self.size] = v[: self.size]
        self._data = data
        self.capacity = capacity

    @classmethod
    def from_transitions(cls, transitions: Transitions, horizon: int = 5, discount: float = 0.99,
                         capacity: int | None = None) -> "ChunkReplay":
        """A buffer holding ``transitions`` as its offline part."""
        replay = cls(transitions.obs_dim, transitions.action_dim, horizon, discount,
                     capacity=max(capacity or 0, len(transitions)))
        replay.add(transitions)
        replay.num_offline = replay.size
        return replay

    def add(self, transitions: Transitions) -> None:
        """Append whole episodes (``transitions.terminals[-1]`` must be True)."""
        n = len(transitions)
        if n == 0:
            return
        if transitions.obs_dim != self.obs_dim or transitions.action_dim != self.action_dim:
            raise DatasetError(
                f"cannot add transitions with obs_dim={transitions.obs_dim}, action_dim="
                f"{transitions.action_dim} to a buffer with obs_dim={self.obs_dim}, "
                f"action_dim={self.action_dim}")
        if self.size + n > self.capacity:
            self._alloc(max(2 * self.capacity, self.size + n))
        start, stop = self.size, self.size + n
        for k in _STORED:
            self._data[k][start:stop] = torch.as_tensor(np.asarray(getattr(transitions, k)), dtype=torch.float32)
        terminals = np.asarray(transitions.terminals, dtype=bool)
        ends = np.flatnonzero(terminals)
        # episode_end[i] = first terminal index >= i, shifted to buffer coordinates.
        episode_end = ends[np.searchsorted(ends, np.arange(n))] + start
        self._data["episode_end"][start:stop] = torch.as_tensor(episode_end)
        self.size = stop
        self._update_chunk_targets(start, stop)

    def _update_chunk_targets(self, start: int, stop: int) -> None:
        idx = torch.arange(start, stop)
        steps, valid = self._chunk_indices(idx)
        rewards = self._data["rewards"][steps]
        masks = self._data["masks"][steps]
        # alive[j] = no terminating transition among valid steps < j.
        alive = torch.cumprod(torch.cat([torch.ones_like(masks[:, :1]), masks[:, :-1]], 1), 1)
        weights = valid * alive * self.discount ** torch.arange(self.horizon, dtype=torch.float32)
        self._data["chunk_rewards"][start:stop] = (weights * rewards).sum(1)
        self._data["chunk_masks"][start:stop] = torch.where(valid.bool(), masks, 1.0).prod(1)

    def _chunk_indices(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = idx[:, None] + torch.arange(self.horizon)
        end = self._data["episode_end"][idx][:, None]
        return torch.minimum(raw, end), (raw <= end).float()

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               offline_fraction: float | None = None) -> dict[str, torch.Tensor]:
        """A batch of chunks, uniform with replacement.

        ``offline_fraction`` (e.g. 0.5) draws that share from the offline part and the rest from
        the online part (RLPD-style balanced sampling) once both are non-empty.

        Returns observations (B, O), actions (B, h, A), valid (B, h), rewards (B,),
        masks (B,), next_observations (B, O).
        """
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        online = self.size - self.num_offline
        if offline_fraction is not None and online > 0 and self.num_offline > 0:
            n_off = int(round(batch_size * offline_fraction))
            idx = torch.cat([
                torch.randint(0, self.num_offline, (n_off,), generator=generator),
                torch.randint(self.num_offline, self.size, (batch_size - n_off,), generator=generator)])
        else:
            idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.gather(idx)

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The chunks starting at buffer indices ``idx`` (B,)."""
        d = self._data
        steps, valid = self._chunk_indices(idx)
        return {
            "observations": d["observations"][idx],
            "actions": d["actions"][steps],
            "valid": valid,
            "rewards": d["chunk_rewards"][idx],
            "masks": d["chunk_masks"][idx],
            "next_observations": d["next_observations"][steps[:, -1]],
        }

    # ------------------------------------------------------------------------------ persistence
    def transitions(self, start: int = 0, stop: int | None = None) -> Transitions:
        """Stored transitions ``start:stop`` as numpy arrays (episode boundaries preserved)."""
        stop = self.size if stop is None else stop
        d = self._data
        ends = d["episode_end"][start:stop]
        return Transitions(
            **{k: d[k][start:stop].numpy().copy() for k in _STORED},
            terminals=(ends == torch.arange(start, stop)).numpy())

    def online_state_dict(self) -> dict[str, torch.Tensor]:
        """The online part, for resuming a fine-tuning run (the offline part is rebuilt from data)."""
        t = self.transitions(self.num_offline)
        return {k: torch.as_tensor(getattr(t, k)) for k in (*_STORED, "terminals")}

    def load_online_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the online part with ``state`` (from ``online_state_dict``)."""
        self.size = self.num_offline
        if len(state["terminals"]):
            self.add(Transitions(**{k: v.numpy() for k, v in state.items()}))


def random_chunk_batch(batch_size: int, obs_dim: int, action_dim: int, horizon: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A synthetic batch in ``ChunkReplay.sample``'s format (for benchmarks and unit tests).

    observations/next_observations (B, obs_dim) standard normal, actions (B, horizon, action_dim)
    uniform in [-1, 1], rewards (B,) in (-1, 0], masks and valid all ones.
    """
    g = torch.Generator().manual_seed(seed)
    batch = {
        "observations": torch.randn(batch_size, obs_dim, generator=g),
        "actions": torch.rand(batch_size, horizon, action_dim, generator=g) * 2 - 1,
        "valid": torch.ones(batch_size, horizon),
        "rewards": -torch.rand(batch_size, generator=g),
        "masks": torch.ones(batch_size),
        "next_observations": torch.randn(batch_size, obs_dim, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}
