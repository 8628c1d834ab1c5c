"""Networks shared by the agents: MLPs, time features, velocity nets and a vectorised critic ensemble.

All action inputs and outputs are flattened chunks of size ``D = horizon * action_dim``; the constructors'
``action_dim`` argument is that flattened size. Times follow the convention of :mod:`manip.algos`.

Time features: a scalar ``t`` in [0, 1] is embedded as ``[sin(w_k t), cos(w_k t)]`` with ``dim / 2`` angular
frequencies ``w_k`` spaced geometrically in [1, 3] rad per unit time: less than half a period over [0, 1], so the
features are smooth, nearly linear functions of time. Mean-velocity training differentiates the network in ``t``
(the JVP in :mod:`manip.algos.mvp`) and one-step generation queries the corner ``t = 0, r - t = 1`` of the time
inputs, which the interval sampler rarely visits; low frequencies keep ``du/dt`` well scaled and that corner a
smooth extrapolation (high-frequency features, e.g. up to 100 rad, made the MeanFlow target blow up on small
MLPs). :class:`MeanVelocityNet` embeds ``t`` and the interval length ``r - t``, each with ``time_dim / 2``
features.

Initialisation follows FQL/QC: Xavier-uniform weights, zero biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLP",
    "time_embedding",
    "TimeEmbedding",
    "MeanVelocityNet",
    "VelocityNet",
    "OneStepNet",
    "EnsembleLinear",
    "CriticEnsemble",
    "CriticMembers",
    "CRITIC_BLOCKS",
]

# Hidden-layer orders of the critic: FQL's and QC's ``Dense -> GELU -> LayerNorm``, and ``Linear -> LayerNorm ->
# GELU`` (the order of manip checkpoints whose config predates the choice).
CRITIC_BLOCKS = ("linear_gelu_norm", "linear_norm_gelu")

MAX_TIME_FREQUENCY = 3.0
# The critic's LayerNorm epsilon: Flax's nn.LayerNorm default, which FQL's and QC's critics use (torch's is 1e-5).
LAYER_NORM_EPS = 1e-6


def _time_frequencies(dim: int, device=None, dtype=None) -> torch.Tensor:
    """Angular frequencies (dim // 2,) spaced geometrically in [1, MAX_TIME_FREQUENCY]."""
    if dim < 2 or dim % 2:
        raise ValueError(f"time embedding dim must be an even number >= 2, got {dim}")
    return torch.exp(torch.linspace(0.0, math.log(MAX_TIME_FREQUENCY), dim // 2, device=device, dtype=dtype))


def _embed(t: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    angles = t.unsqueeze(-1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a scalar time.

    Args:
        t: (B,) times, nominally in [0, 1].
        dim: even output size.
    Returns:
        (B, dim) ``[sin(w t), cos(w t)]`` with ``dim / 2`` frequencies ``w`` in [1, 3].
    """
    return _embed(t, _time_frequencies(dim, device=t.device, dtype=t.dtype))


class TimeEmbedding(nn.Module):
    """:func:`time_embedding` with the frequencies kept as a (non-persistent) buffer."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("frequencies", _time_frequencies(dim), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, dim)."""
        return _embed(t, self.frequencies.to(t.dtype))


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    nn.init.xavier_uniform_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


class MLP(nn.Module):
    """``Linear -> [LayerNorm] -> activation`` per hidden layer, then a linear output layer.

    forward: (..., in_dim) -> (..., out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dims: Sequence[int] = (512,) * 4,
        activation: type[nn.Module] = nn.GELU,
        layer_norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out))
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(activation())
        layers.append(nn.Linear(dims[-1], out_dim))
        for layer in layers:
            if isinstance(layer, nn.Linear):
                _init_linear_(layer.weight, layer.bias)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MeanVelocityNet(nn.Module):
    """Mean velocity ``u(x, t, r | s)`` over the interval [t, r] (r >= t).

    Input features: ``[obs, x, emb(t), emb(r - t)]``. With ``r = t`` it is an instantaneous velocity field.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (512,) * 4, time_dim: int = 64):
        super().__init__()
        if time_dim % 4:
            raise ValueError(f"time_dim must be a multiple of 4, got {time_dim}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.time_embed = TimeEmbedding(time_dim // 2)
        self.mlp = MLP(obs_dim + action_dim + time_dim, action_dim, hidden_dims)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """obs (B, O), x (B, D), t (B,), r (B,) -> u (B, D)."""
        return self.mlp(torch.cat([obs, x, self.time_embed(t), self.time_embed(r - t)], dim=-1))


class RawTime(nn.Module):
    """The time itself as the one time feature: (B,) -> (B, 1) (FQL's and QC's ``ActorVectorField`` input)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(-1)


class VelocityNet(nn.Module):
    """Instantaneous velocity ``v(x, t | s)`` for flow behaviour cloning. Input ``[obs, x, emb(t)]``, ``emb(t)``
    the ``time_dim`` sinusoidal features, or ``t`` itself for ``time_dim = 1`` (as FQL's and QC's code)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (512,) * 4, time_dim: int = 32):
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.time_embed = RawTime() if time_dim == 1 else TimeEmbedding(time_dim)
        self.mlp = MLP(obs_dim + action_dim + time_dim, action_dim, hidden_dims)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """obs (B, O), x (B, D), t (B,) -> v (B, D)."""
        return self.mlp(torch.cat([obs, x, self.time_embed(t)], dim=-1))


class OneStepNet(nn.Module):
    """One-step noise-to-action map ``mu(s, z)`` (FQL student). Input ``[obs, z]``, output unclipped."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (512,) * 4):
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.mlp = MLP(obs_dim + action_dim, action_dim, hidden_dims)

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """obs (B, O), z (B, D) -> (B, D)."""
        return self.mlp(torch.cat([obs, z], dim=-1))


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul.

    Weights (E, in, out), biases (E, 1, out). forward: (E, B, in) -> (E, B, out), or a shared (B, in) input
    broadcast to every member.
    """

    def __init__(self, num_members: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_members, 1, out_dim))
        for w in self.weight:
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """Ensemble of E Q-functions ``Q_e(s, a)`` on flattened action chunks, evaluated in one batched pass.

    Each member: MLP ``[obs, actions] -> 1`` whose hidden layers are ``Linear -> GELU -> LayerNorm`` (``block``
    ``"linear_gelu_norm"``, FQL's and QC's order: the output head reads normalised features) or ``Linear ->
    LayerNorm -> GELU`` (``"linear_norm_gelu"``); LayerNorm with per-member affine parameters, left out when not
    ``layer_norm``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_critics: int = 2,
        hidden_dims: Sequence[int] = (512,) * 4,
        layer_norm: bool = True,
        block: str = "linear_gelu_norm",
    ):
        super().__init__()
        if block not in CRITIC_BLOCKS:
            raise ValueError(f"unknown critic block {block!r}; expected one of {CRITIC_BLOCKS}")
        self.obs_dim, self.action_dim, self.num_critics = obs_dim, action_dim, num_critics
        self.block = block
        dims = [obs_dim + action_dim, *hidden_dims]
        self.hidden = nn.ModuleList(EnsembleLinear(num_critics, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norm_scales = nn.ParameterList(
            nn.Parameter(torch.ones(num_critics, 1, d)) for d in (hidden_dims if layer_norm else ())
        )
        self.norm_shifts = nn.ParameterList(
            nn.Parameter(torch.zeros(num_critics, 1, d)) for d in (hidden_dims if layer_norm else ())
        )
        self.out = EnsembleLinear(num_critics, dims[-1], 1)
        self.layer_norm = layer_norm

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, O), actions (B, D) -> Q values (E, B)."""
        h = torch.cat([obs, actions], dim=-1)
        norm_first = self.block == "linear_norm_gelu"
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if not norm_first:
                h = F.gelu(h)
            if self.layer_norm:
                h = torch.addcmul(self.norm_shifts[i], F.layer_norm(h, h.shape[-1:], eps=LAYER_NORM_EPS),
                                  self.norm_scales[i])
            if norm_first:
                h = F.gelu(h)
        if torch.is_autocast_enabled(h.device.type):
            # Q in float32 under mixed precision: a bfloat16 Q (spacing 0.25 at |Q| = 50) would coarsen the TD
            # targets and tie best-of-N candidates (outside autocast the head runs in the layers' own dtype)
            with torch.autocast(h.device.type, enabled=False):
                return self.out(h.float()).squeeze(-1)
        return self.out(h).squeeze(-1)


class CriticMembers(nn.Module):
    """A :class:`CriticEnsemble` rebuilt as E separate ``nn.Sequential`` MLPs: the same function, one matrix
    product per member and layer instead of batched ones.

    The inference form of the ensemble (see :mod:`manip.algos.acting`): compilers pack ``nn.Linear`` weights for
    small-batch CPU kernels, which they do not for the batched products. The weights are copies; later changes to
    the ensemble do not reach them. forward: obs (B, O), actions (B, D) -> Q values (E, B).
    """

    def __init__(self, ensemble: CriticEnsemble):
        super().__init__()
        self.obs_dim, self.action_dim = ensemble.obs_dim, ensemble.action_dim
        self.num_critics = ensemble.num_critics
        members = []
        for e in range(ensemble.num_critics):
            layers: list[nn.Module] = []
            for i, batched in enumerate([*ensemble.hidden, ensemble.out]):
                in_dim, out_dim = batched.weight.shape[1:]
                linear = nn.Linear(in_dim, out_dim)
                with torch.no_grad():
                    linear.weight.copy_(batched.weight[e].T)
                    linear.bias.copy_(batched.bias[e, 0])
                layers.append(linear)
                if batched is ensemble.out:
                    break
                block = [nn.GELU()]
                if ensemble.layer_norm:
                    norm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)
                    with torch.no_grad():
                        norm.weight.copy_(ensemble.norm_scales[i][e, 0])
                        norm.bias.copy_(ensemble.norm_shifts[i][e, 0])
                    block = [norm, *block] if ensemble.block == "linear_norm_gelu" else [*block, norm]
                layers += block
            members.append(nn.Sequential(*layers))
        self.members = nn.ModuleList(members).to(ensemble.out.weight.device, ensemble.out.weight.dtype)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """obs (B, O), actions (B, D) -> Q values (E, B)."""
        h = torch.cat([obs, actions], dim=-1)
        return torch.stack([member(h).squeeze(-1) for member in self.members])
