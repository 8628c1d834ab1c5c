"""Policies and critics for chunked action generation: MVP, QC/BFN and FQL.

Time convention (used by every module in this package): noise at t = 0, action at t = 1.
The path is ``x_t = (1 - t) * x0 + t * a`` with ``x0 ~ N(0, I)`` and conditional velocity ``v = a - x0``.
The mean velocity ``u(x_t, t, r | s)`` averages the velocity over [t, r] with r >= t, so ``u(x, t, t | s)`` is the
instantaneous velocity and one-step generation is ``a = clip(x0 + u(x0, 0, 1 | s), -1, 1)``.
Action chunks (B, h, A) are flattened to (B, h * A) for every network.
"""

from manip.algos.base import ActorCriticAgent, flatten_chunk, masked_mean
from manip.algos.critic import best_of_n, chunk_td_target, critic_loss, soft_update
from manip.algos.flow import FlowBoNAgent, euler_sample, flow_matching_loss
from manip.algos.fql import FQLAgent, fql_actor_loss
from manip.algos.mvp import (
    MVPAgent,
    ivc_loss,
    mean_flow_loss,
    mean_velocity_and_derivative,
    mvp_policy_loss,
    sample_one_step,
    sample_time_pair,
)
from manip.algos.networks import (
    MLP,
    CriticEnsemble,
    MeanVelocityNet,
    OneStepNet,
    VelocityNet,
    time_embedding,
)

__all__ = [
    "ActorCriticAgent",
    "CriticEnsemble",
    "FQLAgent",
    "FlowBoNAgent",
    "MLP",
    "MVPAgent",
    "MeanVelocityNet",
    "OneStepNet",
    "VelocityNet",
    "best_of_n",
    "chunk_td_target",
    "critic_loss",
    "euler_sample",
    "flatten_chunk",
    "flow_matching_loss",
    "fql_actor_loss",
    "ivc_loss",
    "masked_mean",
    "mean_flow_loss",
    "mean_velocity_and_derivative",
    "mvp_policy_loss",
    "sample_one_step",
    "sample_time_pair",
    "soft_update",
    "time_embedding",
]
