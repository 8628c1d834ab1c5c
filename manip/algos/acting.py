"""Inference form of an agent for fast acting: a frozen copy, optionally in bfloat16 and compiled.

    act = fast_sampler(agent, dtype=torch.bfloat16, compile=True)
    actions = act(obs, generator=g)      # the signature of agent.sample_actions: float32 (B, O) -> (B, D)

The copy holds the weights of the moment it is made (later training does not reach it: make a new one), with the
critic ensemble rebuilt as separate MLPs (:class:`~manip.algos.networks.CriticMembers`, whose ``nn.Linear`` weights
the compiler can pack for small-batch CPU kernels) and the target networks dropped. Its networks run in ``dtype``
(weights and activations; the CPU kernels accumulate in float32); everything between them — the noise, the
integration steps, the clip and the argmax — stays in the caller's float32, so a seeded generator draws the same
noise as ``agent.sample_actions`` does. With ``compile`` the sampler is ``torch.compile``-d with inductor's
freezing (weights become constants of the compiled graph) and, by default, its autotuned matrix products; a batch
is padded to the next power of two, and one graph is compiled per padded size, at its first call.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from manip.algos.base import ActorCriticAgent, NoiseStreams
from manip.algos.networks import CriticEnsemble, CriticMembers

__all__ = ["ACT_DTYPES", "QUIET_AUTOTUNE", "InDtype", "acting_copy", "fast_sampler", "padded_batch",
           "quiet_inductor_warnings"]

ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Inductor config: without its report (a table per autotuned matrix product, dozens of lines on standard error at
# a first compilation) autotuning makes the same choices.
QUIET_AUTOTUNE = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def quiet_inductor_warnings() -> None:
    """Hide the deprecation warning inductor's own autotuning raises (its ``tensor.storage()`` call), which a
    caller can do nothing about; other warnings are kept."""
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning,
                            module=r"torch\._inductor\.")


def padded_batch(batch: int) -> int:
    """Rows a compiled :func:`fast_sampler` runs for ``batch`` states: the next power of two (one graph each)."""
    return 1 << (batch - 1).bit_length()


def padded_sample(agent: ActorCriticAgent, sample: Callable[..., torch.Tensor], obs: torch.Tensor,
                  num_samples: int | None, noise_scale: float, generator: NoiseStreams, pad: bool = True
                  ) -> torch.Tensor:
    """``sample`` (``agent.sample_actions``, compiled) on ``obs`` (B, O) with the noise drawn here, outside the
    compiled graph, which cannot take a generator (the same draws as ``agent.sample_actions(obs, generator=...)``).
    With ``pad``, the batch is padded to :func:`padded_batch` rows: one graph per power of two (states are
    independent rows; the padding's are dropped), so any number of simulators compiles a few graphs, within Dynamo's
    recompilation limit."""
    n = agent.num_samples if num_samples is None else num_samples
    batch, per_state = obs.shape[0], agent.candidates_per_state(n, noise_scale)
    noise = agent.initial_noise(batch * per_state, generator, obs)
    if pad and batch > 0:
        extra = padded_batch(batch) - batch
        obs = torch.cat([obs, obs.new_zeros(extra, obs.shape[1])])
        noise = torch.cat([noise, noise.new_zeros(extra * per_state, noise.shape[1])])
    return sample(obs, num_samples=n, noise_scale=noise_scale, noise=noise)[:batch]


class InDtype(nn.Module):
    """Runs ``net`` in ``dtype``: its inputs are cast in, its output cast back to the first input's dtype."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net.to(dtype), dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(*(x.to(self.dtype) for x in inputs)).to(inputs[0].dtype)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ACT_DTYPES:
        raise ValueError(f"act dtype {dtype!r}: expected one of {sorted(ACT_DTYPES)}")
    return ACT_DTYPES[dtype]


def acting_copy(agent: ActorCriticAgent, dtype: torch.dtype | str = torch.float32) -> ActorCriticAgent:
    """A frozen copy of ``agent`` for acting: eval mode, no gradients, no target networks, the critic as
    :class:`CriticMembers`, the acting network and critic running in ``dtype``. ``agent`` itself is unchanged."""
    dtype = _as_dtype(dtype)
    # the target critic is not needed to act: the memo makes the copy hold None in its place
    snapshot = copy.deepcopy(agent, memo={id(agent.target_critic): None})
    critic = snapshot.critic
    if isinstance(critic, CriticEnsemble):
        critic = CriticMembers(critic)
    name = snapshot.acting_net
    if dtype != torch.float32:
        setattr(snapshot, name, InDtype(getattr(snapshot, name), dtype))
        critic = InDtype(critic, dtype)
    snapshot.critic = critic
    return snapshot.eval().requires_grad_(False)


def fast_sampler(agent: ActorCriticAgent, dtype: torch.dtype | str = torch.bfloat16, compile: bool = True,
                 max_autotune: bool = True) -> Callable[..., torch.Tensor]:
    """``sample_actions`` of :func:`acting_copy` (agent, dtype), compiled (see the module docstring) unless
    ``compile`` is false. Calls run under ``torch.inference_mode``."""
    snapshot = acting_copy(agent, dtype)
    sample = snapshot.sample_actions
    if compile:
        sample = torch.compile(sample, dynamic=False, mode="max-autotune-no-cudagraphs" if max_autotune else None)
        quiet_inductor_warnings()
    # freezing is read when a graph compiles (at the first call of each padded size), so it is set around calls
    # (passed as a torch.compile option it does not take effect); one patch object, re-entered by every call
    freezing = torch._inductor.config.patch(freezing=True, **QUIET_AUTOTUNE) if compile else nullcontext()

    def act(obs: torch.Tensor, num_samples: int | None = None, generator: NoiseStreams = None,
            noise_scale: float = 1.0) -> torch.Tensor:
        with torch.inference_mode(), freezing:
            # the inputs are always new (inference) tensors, so the graphs' guards see the same kind whatever the
            # caller passes
            return padded_sample(snapshot, sample, obs, num_samples, noise_scale, generator, pad=compile)

    act.agent = snapshot  # type: ignore[attr-defined]
    return act
