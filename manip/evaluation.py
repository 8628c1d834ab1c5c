"""One rollout loop for evaluation and online collection, the chunked policy queue, success metrics.

``VectorRollout`` steps a Gymnasium vector env with a ``ChunkPolicy``; evaluation runs it until
enough episodes finished, online fine-tuning calls ``step`` between updates and takes the finished
episodes as ``Transitions``. ``SuccessRate`` is a torchmetrics metric with a Wilson interval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torchmetrics

from manip.data.replay import Transitions


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the lower (upper) bound is exactly 0 (1); rounding would leave 1e-17 off it
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


class SuccessRate(torchmetrics.Metric):
    """Episode success rate with its Wilson 95% interval.

    ``update(successes)`` takes a (E,) bool/0-1 tensor of finished episodes; ``compute`` returns
    {"success_rate", "ci_low", "ci_high", "episodes"} as float tensors.
    """

    full_state_update = False

    def __init__(self, z: float = 1.959964, **kwargs) -> None:
        super().__init__(**kwargs)
        self.z = z
        self.add_state("successes", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("episodes", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, successes: torch.Tensor) -> None:
        successes = torch.as_tensor(successes, dtype=torch.float64).reshape(-1)
        self.successes += successes.sum()
        self.episodes += successes.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        k, n = float(self.successes), float(self.episodes)
        low, high = wilson_interval(k, n, self.z)
        rate = k / n if n else float("nan")
        as_tensor = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731 (exact in the JSON records)
        return {"success_rate": as_tensor(rate), "ci_low": as_tensor(low), "ci_high": as_tensor(high),
                "episodes": as_tensor(n)}


class ChunkPolicy:
    """Per-env action queues over a chunk predictor (LeRobot's ``select_action``).

    predict_chunks(obs (B, O) float32 np) -> (B, h, A) np. A queue is refilled only when empty, so
    chunks run open-loop; ``reset(mask)`` clears the queues of envs whose episode ended. ``latencies``: seconds
    of each ``predict_chunks`` call (one batched call refills every empty queue); ``actions``: actions returned.

    ``noise_seed``: every episode draws its candidates' noise from its own CPU stream, passed as
    ``predict_chunks(obs, generator=[one per row])``: the vector env's episode k (env i's j-th, k = i + j * E, as
    :class:`manip.envs.EpisodeSeeds` numbers them) from ``noise_seed + k``. An episode then draws the same noise
    whatever the number of envs, the device, and what ran before it. None: ``predict_chunks(obs)`` draws its own
    noise.
    """

    def __init__(self, predict_chunks: Callable[..., np.ndarray], num_envs: int,
                 noise_seed: int | None = None) -> None:
        self.predict_chunks, self.num_envs = predict_chunks, num_envs
        self.queues: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self.latencies: list[float] = []
        self.actions = 0
        self.noise_seed = noise_seed
        self.episodes = list(range(num_envs))  # the episode each env runs
        self.streams = [self._stream(k) for k in self.episodes] if noise_seed is not None else None

    def _stream(self, episode: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.noise_seed + episode)

    def reset(self, mask: np.ndarray | None = None) -> None:
        """The episodes of the envs in ``mask`` (None: all) ended: their queues empty, the next ones start."""
        for i in range(self.num_envs):
            if mask is None or mask[i]:
                self.queues[i] = []
                self.episodes[i] += self.num_envs
                if self.streams is not None:
                    self.streams[i] = self._stream(self.episodes[i])

    def select_action(self, obs: np.ndarray) -> np.ndarray:
        """obs (E, O) -> actions (E, A); refills the empty queues with one batched call."""
        empty = [i for i, q in enumerate(self.queues) if not q]
        if empty:
            start = time.perf_counter()
            if self.streams is None:
                chunks = self.predict_chunks(obs[empty])
            else:
                chunks = self.predict_chunks(obs[empty], generator=[self.streams[i] for i in empty])
            self.latencies.append(time.perf_counter() - start)
            for i, chunk in zip(empty, chunks):
                self.queues[i] = list(chunk)
        self.actions += self.num_envs
        return np.stack([q.pop(0) for q in self.queues])


@dataclass
class _Episode:
    obs: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    next_obs: list = field(default_factory=list)


@dataclass
class EpisodeEnd:
    """A finished episode: which env, success, length, and its transitions when recorded."""

    env_index: int
    success: bool
    length: int
    transitions: Transitions | None = None


class VectorRollout:
    """Steps a same-step-autoreset vector env with a ``ChunkPolicy``.

    record=True keeps every env's current episode so finished episodes come back as
    ``Transitions`` (reward as the env returns it, mask = 1 - terminated, terminal at the end).
    """

    def __init__(self, env, policy: ChunkPolicy, seed: int = 0, record: bool = False) -> None:
        self.env, self.policy, self.record = env, policy, record
        self.num_envs = env.num_envs
        self.obs, _ = env.reset(seed=seed)
        self.lengths = np.zeros(self.num_envs, dtype=int)
        self.successes = np.zeros(self.num_envs, dtype=bool)
        self.episodes = [_Episode() for _ in range(self.num_envs)]
        self.env_steps = 0

    def step(self) -> list[EpisodeEnd]:
        """One vector step; returns the episodes that ended in it."""
        actions = self.policy.select_action(self.obs)
        next_obs, rewards, terminated, truncated, info = self.env.step(actions)
        done = np.logical_or(terminated, truncated)
        success = np.asarray(info.get("success", np.zeros(self.num_envs)), dtype=bool)
        if done.any() and "final_info" in info:
            final_success = info["final_info"].get("success")
            if final_success is not None:
                success = np.where(done, np.asarray(final_success, dtype=bool), success)
        real_next = next_obs.copy()
        if done.any():
            real_next[done] = np.stack(info["final_obs"][done])
        self.lengths += 1
        self.successes |= success
        self.env_steps += self.num_envs
        ended = []
        for i in range(self.num_envs):
            if self.record:
                ep = self.episodes[i]
                ep.obs.append(self.obs[i]); ep.actions.append(actions[i]); ep.rewards.append(rewards[i])
                ep.masks.append(0.0 if terminated[i] else 1.0); ep.next_obs.append(real_next[i])
            if done[i]:
                transitions = self._finish(i) if self.record else None
                ended.append(EpisodeEnd(i, bool(self.successes[i]), int(self.lengths[i]), transitions))
                self.lengths[i], self.successes[i] = 0, False
        self.policy.reset(done)
        self.obs = next_obs
        return ended

    def _finish(self, i: int) -> Transitions:
        ep, self.episodes[i] = self.episodes[i], _Episode()
        n = len(ep.obs)
        terminals = np.zeros(n, dtype=bool)
        terminals[-1] = True
        return Transitions(np.asarray(ep.obs, np.float32), np.asarray(ep.actions, np.float32),
                           np.asarray(ep.rewards, np.float32), np.asarray(ep.masks, np.float32),
                           terminals, np.asarray(ep.next_obs, np.float32))


@dataclass
class EvalResult:
    success_rate: float
    ci_low: float
    ci_high: float
    episodes: int
    mean_length: float
    outcomes: list[bool]
    lengths: list[int]
    chunk_latency_ms: float
    action_latency_ms: float
    env_steps: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_policy(env, predict_chunks: Callable[..., np.ndarray], num_episodes: int,
                    seed: int = 0) -> EvalResult:
    """Success rate of ``predict_chunks`` over ``num_episodes`` episodes of a vector env.

    Episode quotas are fixed per env up front (env i runs episodes i, i + E, ...), so short
    episodes are not over-counted when envs finish at different speeds; ``outcomes[k]`` and ``lengths[k]`` are
    episode k's. In a vector env from :func:`manip.envs.make_vector_env` episode k starts from seed ``seed + k``,
    and draws its candidates' noise from a stream seeded with ``seed + k`` (``predict_chunks(obs, generator=...)``,
    see :class:`ChunkPolicy`), so the episodes do not depend on the number of envs. ``chunk_latency_ms``: median
    wall time of one policy call (what the step that refills a queue waits); ``action_latency_ms``: the policy's time
    per executed action (all calls over all actions the envs took; a call for several envs counts once).
    """
    start = time.perf_counter()
    policy = ChunkPolicy(predict_chunks, env.num_envs, noise_seed=seed)
    rollout = VectorRollout(env, policy, seed=seed)
    quota = [len(range(i, num_episodes, env.num_envs)) for i in range(env.num_envs)]
    counts = [0] * env.num_envs
    metric = SuccessRate(sync_on_compute=False)  # this process's episodes: under DDP only rank 0 evaluates
    outcomes, lengths = [False] * num_episodes, [0] * num_episodes
    while sum(counts) < num_episodes:
        for end in rollout.step():
            i = end.env_index
            if counts[i] < quota[i]:
                episode = i + counts[i] * env.num_envs
                counts[i] += 1
                outcomes[episode], lengths[episode] = end.success, end.length
                metric.update(torch.tensor([end.success]))
    stats = {k: float(v) for k, v in metric.compute().items()}
    chunk_ms = float(np.median(policy.latencies)) * 1e3 if policy.latencies else float("nan")
    action_ms = float(np.sum(policy.latencies)) * 1e3 / policy.actions if policy.actions else float("nan")
    return EvalResult(stats["success_rate"], stats["ci_low"], stats["ci_high"], num_episodes,
                      float(np.mean(lengths)), outcomes, lengths, chunk_ms, action_ms, rollout.env_steps,
                      time.perf_counter() - start)
