"""Chunked critic: TD targets over action chunks, weighted critic loss, best-of-N selection, target updates.

Q(s_t, a_{t:t+h}) scores a flattened chunk (QC); its target is
``y = sum_{i<h} discount^i r_{t+i} + discount^h * mask * Q_target(s_{t+h}, a')`` where the replay buffer already
provides the discounted reward sum and ``s_{t+h}`` as ``next_observations``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["chunk_td_target", "critic_loss", "best_of_n", "soft_update"]


def chunk_td_target(
    rewards: torch.Tensor, masks: torch.Tensor, next_q: torch.Tensor, discount_h: float
) -> torch.Tensor:
    """TD target ``y = rewards + discount_h * masks * next_q``.

    Args:
        rewards: (B,) discounted reward sums over the chunk.
        masks: (B,) bootstrap masks (0 where the chunk reached a terminal state).
        next_q: (B,) target-critic value at the state after the chunk.
        discount_h: ``discount ** horizon``.
    Returns:
        (B,) targets.
    """
    return rewards + discount_h * masks * next_q


def critic_loss(q: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted squared TD error averaged over members and batch (QC).

    Args:
        q: (E, B) ensemble predictions.
        target: (B,) TD targets (no gradient needed).
        weight: (B,) per-sample weights, e.g. ``valid[:, -1]``; zero-weight samples contribute zero but still
            count in the mean, as in QC.
    Returns:
        scalar ``mean_{e,b} weight_b * (q_eb - target_b)^2``.
    """
    sq = (q - target.detach()).square()
    if weight is not None:
        sq = sq * weight
    return sq.mean()


def best_of_n(candidates: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each row's highest-scoring candidate.

    Args:
        candidates: (B, N, D).
        scores: (B, N).
    Returns:
        best (B, D) and its index (B,).
    """
    index = scores.argmax(dim=1)
    best = candidates.gather(1, index.view(-1, 1, 1).expand(-1, 1, candidates.shape[-1])).squeeze(1)
    return best, index


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak update ``target <- (1 - tau) * target + tau * source`` on parameters; buffers are copied."""
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    if len(target_params) != len(source_params):
        raise ValueError("target and source have different parameter lists")
    torch._foreach_lerp_(target_params, source_params, tau)
    for t_buf, s_buf in zip(target.buffers(), source.buffers()):
        t_buf.copy_(s_buf)
