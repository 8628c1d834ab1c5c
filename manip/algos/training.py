"""The pieces of an update that ``ManipModule`` trains with and ``manip.bench`` times the same way: the optimizer,
compiled losses and the frozen critic of the actor step. Torch only (the benchmark runs without Lightning).

``module.compile`` (and ``python -m manip.bench --compile``) takes false, true (inductor), one of torch.compile's
``COMPILE_MODES`` (inductor in that mode: "reduce-overhead" replays each compiled graph as a CUDA graph, which cuts
the launch cost per kernel that bounds small-network updates on a GPU) or a backend name (e.g. "aot_eager").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compiled", "compiler_message", "frozen", "fused_adam", "make_optimizer"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiled(fn: Callable, compile: bool | str | None) -> Callable:
    """``fn`` itself (compile false or None), ``torch.compile(fn)`` (true), compiled by inductor in that mode (one of
    ``COMPILE_MODES``) or compiled with that backend (any other name).

    Static shapes: one graph per batch size (acting sees a handful), since Dynamo's dynamic-shape graphs cannot draw
    noise (``torch.randn`` with a symbolic size and a ``generator`` argument, even None, fails to trace). A draw
    from a ``torch.Generator`` splits the function into graphs around it: the draws run eagerly, from the same
    stream as without compilation, so compiled and eager losses see the same noise."""
    if compile is False or compile is None:
        return fn
    if compile is True:
        return torch.compile(fn, dynamic=False)
    if compile in COMPILE_MODES:
        return torch.compile(fn, dynamic=False, mode=compile)
    return torch.compile(fn, dynamic=False, backend=compile)


def compiler_message(exc: BaseException) -> str:
    """The line of a torch.compile failure that names its cause: the first line of ``exc``, or the one after
    Dynamo's ``backend='...' raised:`` wrapper line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[1] if len(lines) > 1 and lines[0].endswith("raised:") else lines[0]


def make_optimizer(actor_params: Iterable[nn.Parameter], critic_params: Iterable[nn.Parameter],
                   lr: float) -> torch.optim.Adam:
    """One Adam over two parameter groups, ``actor`` and ``critic``. Fused (one kernel for every parameter) on CPUs
    and GPUs: for the paper's networks a fifth of the time of torch's default step on a CPU, and on a GPU far fewer
    launches per update."""
    groups = [{"params": list(actor_params), "name": "actor"}, {"params": list(critic_params), "name": "critic"}]
    devices = {p.device.type for group in groups for p in group["params"]}
    return torch.optim.Adam(groups, lr=lr, fused=fused_adam(devices))


def fused_adam(device_types: set[str]) -> bool | None:
    """Adam's ``fused`` setting for parameters on these device types: True on CPUs and CUDA GPUs, else None
    (torch's default)."""
    return True if device_types <= {"cpu", "cuda"} else None


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients into ``module``'s parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
