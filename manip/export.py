"""Export a checkpoint's acting policy for deployment: ``python -m manip.export ckpt=PATH [out=...]``.

The result is a ``torch.export`` program (``.pt2``) that needs PyTorch alone (no manip, Lightning, Hydra or
simulator) and acts exactly as the checkpoint does: raw observation in, action chunk out, with the observation
normalisation, the acting weights (the weight average when the run kept one), the policy's sampler and the critic's
best-of-N inside::

    import json, torch
    meta = {"manip.json": ""}
    policy = torch.export.load("policy.pt2", extra_files=meta).module()
    meta = json.loads(meta["manip.json"])
    noise = torch.randn(1, *meta["noise_shape"])      # (B, C, D): C candidates per state, D = horizon * action_dim
    chunk = policy(obs, noise)                        # obs (B, O) raw float32 -> chunk (B, horizon, action_dim)

The initial noise is an input, so a seeded stream repeats a chunk exactly (robot logs can be replayed). The batch
size is free. ``manip.json`` (the program's extra file) records the input layout (observation keys and their
sizes), the chunk's shape, the sampling settings baked in, the simulator's settings (the controller the actions
are for) and the checkpoint. :func:`load_exported` wraps the program in a :class:`ExportedPolicy` that draws
the noise and keeps LeRobot's action queue (``select_action``).

``aoti=true`` also compiles the program ahead of time with AOTInductor into ``<out stem>.aoti.pt2`` (weights frozen
into the code, matrix products autotuned unless ``max_autotune=false``): a shared library packaged with its weights,
loadable from Python (``torch._inductor.aoti_load_package``) or from C++ without Python
(``torch::inductor::AOTIModelPackageLoader``); :func:`load_exported` reads either file. Before the command ends,
each file is checked against the checkpoint acting in the same dtype on the same states and noise (the largest
chunk difference is printed: 0 for the float32 program). ``python -m manip.evaluate ckpt=<export>`` runs either
file in its simulator.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import zipfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from manip import sweep
from manip.algos.acting import QUIET_AUTOTUNE, acting_copy, quiet_inductor_warnings
from manip.algos.base import NoiseStreams, unit_noise
from manip.checkpoint import (CheckpointError, check_acting_settings, checkpoint_command, env_spec_of,
                              first_sentence, load_acting_module)
from manip.settings import SettingError, check_bool, first_free_path, open_new, run_folder

__all__ = ["ExportError", "ExportedPolicy", "PolicyProgram", "checkpoint_acting", "default_output", "export_checkpoint",
           "load_exported"]

FORMAT = "manip.export/1"
META_FILE = "manip.json"
# the exported batch dimension's range (a program accepts any batch size in it)
MAX_BATCH = 65536
# a chunk within this of the reference's (largest |difference|) agrees with it
AGREEMENT = 0.02


class ExportError(RuntimeError):
    """The ahead-of-time compilation failed (the exported ``.pt2`` itself is written)."""


class PolicyProgram(nn.Module):
    """The acting path of a ``ManipModule`` as one module: raw obs (B, O), unit noise (B, C, D) -> chunk (B, h, A).

    C is the candidates per state (``num_samples``, or 1 for one candidate or ``noise_scale = 0``), D =
    h * A. The agent is a frozen :func:`~manip.algos.acting.acting_copy` of the acting weights at construction.
    """

    def __init__(self, module: nn.Module, num_samples: int, noise_scale: float, act_dtype: str = "float32"):
        super().__init__()
        with module.acting_weights():
            self.agent = acting_copy(module.agent, act_dtype)
        self.register_buffer("obs_mean", module.obs_mean.detach().clone().float())
        self.register_buffer("obs_scale", module.obs_scale.detach().clone().float())
        self.num_samples, self.noise_scale = int(num_samples), float(noise_scale)
        self.horizon, self.action_dim = int(module.horizon), int(module.action_dim)
        self.candidates = self.agent.candidates_per_state(self.num_samples, self.noise_scale)

    @property
    def noise_shape(self) -> tuple[int, int]:
        """(C, D) of one state's noise."""
        return self.candidates, self.horizon * self.action_dim

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        batch = obs.shape[0]
        normalized = (obs - self.obs_mean) / self.obs_scale
        actions = self.agent.sample_actions(normalized, self.num_samples, noise_scale=self.noise_scale,
                                            noise=noise.reshape(batch * self.candidates, -1))
        return actions.reshape(batch, self.horizon, self.action_dim)


def package_path(out: str | Path) -> Path:
    """The AOTInductor package written beside the program ``out``: ``<out stem>.aoti.pt2``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.aoti.pt2")


def default_output(ckpt: str | Path) -> Path:
    """``<run_dir>/export/<ckpt name>.pt2`` for ``<run_dir>/checkpoints/<ckpt name>.ckpt`` (``export/`` beside a
    checkpoint kept elsewhere), or, where earlier exports are, the first free ``<ckpt name>.<k>.pt2`` (k = 1, 2, ...)
    whose package name is free too: none is replaced."""
    ckpt = Path(ckpt)
    first = run_folder(ckpt, "export") / f"{ckpt.stem}.pt2"
    out, k = first_free_path(first), 0
    while package_path(out).exists():
        k += 1
        out = first_free_path(first.with_name(f"{ckpt.stem}.{k}.pt2"))
    return out


def _metadata(program: PolicyProgram, cfg: dict, ckpt: Path, step: int, act_dtype: str) -> dict[str, Any]:
    data_info = cfg.get("data_info", {})
    obs_dim = int(program.obs_mean.numel())
    return {
        "format": FORMAT,
        "call": "policy(obs, noise) -> chunk",
        "obs_shape": [obs_dim], "noise_shape": list(program.noise_shape), "max_batch": MAX_BATCH,
        "chunk_shape": [program.horizon, program.action_dim],
        "obs_keys": data_info.get("obs_keys"), "obs_key_dims": data_info.get("obs_key_dims"),
        "num_samples": program.num_samples, "noise_scale": program.noise_scale,
        "sample_steps": getattr(program.agent, "sample_steps", None),
        "flow_steps": getattr(program.agent, "flow_steps", None), "act_dtype": act_dtype,
        "device": "cpu", "torch_version": torch.__version__,
        "algo": cfg["algo"]["name"], "task": data_info.get("env_name"), "env_spec": cfg.get("env_spec"),
        "ckpt": str(ckpt), "step": step, "trained_on": data_info.get("path"),
        "trained_on_stand_in": data_info.get("generated"),
    }


def checkpoint_acting(module: nn.Module, num_samples: int, noise_scale: float,
                      act_dtype: str = "float32") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What ``module`` itself does with given noise, the reference an export is checked against: obs (B, O) raw,
    noise (B, C, D) -> chunk (B, h, A), through ``module.normalize`` and its acting weights; in float32 the
    module's own networks, in bfloat16 the copy ``manip.evaluate act_dtype=bfloat16`` acts with."""
    if act_dtype == "float32":
        agent = module.agent
    else:
        with module.acting_weights():
            agent = acting_copy(module.agent, act_dtype)

    def act(obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        weights = module.acting_weights() if agent is module.agent else contextlib.nullcontext()
        with torch.inference_mode(), weights:
            actions = agent.sample_actions(module.normalize(obs), num_samples, noise_scale=noise_scale,
                                           noise=noise.flatten(0, 1))
        return actions.view(len(obs), module.horizon, module.action_dim)

    return act


def _latency_ms(fn, obs: torch.Tensor, noise: torch.Tensor, calls: int = 100) -> float:
    """Median time of one call at batch 1 (after 10 warm-up calls), in ms."""
    from manip.bench import median_ms

    with torch.inference_mode():
        return median_ms(lambda: fn(obs, noise), calls, 10, obs.device)


def _chunk_differences(fn, reference, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per state, the largest |chunk difference| between ``fn`` and ``reference`` on ``inputs`` (obs, noise)."""
    with torch.inference_mode():
        return (fn(*inputs) - reference(*inputs)).abs().flatten(1).max(dim=1).values


def export_checkpoint(ckpt: str | Path, out: str | Path, num_samples: int | None = None,
                      noise_scale: float | None = None, sample_steps: int | None = None,
                      act_dtype: str = "float32", aoti: bool = False, max_autotune: bool = True,
                      seed: int = 0, check_states: int = 64) -> dict[str, Any]:
    """Exports ``ckpt``'s acting policy to ``out`` (see the module docstring) and checks it; returns a summary.

    num_samples: best-of-N candidates (None: the agent's own N); noise_scale: std of the initial noise the
    program scales its unit-noise input by (None: the run's ``eval.noise_scale``, else 1); sample_steps: MVP's
    mean-velocity jumps (None: the run's); act_dtype: "float32" or "bfloat16" networks. ``aoti``: also an
    AOTInductor package next to ``out``, its weights frozen into the compiled code and, with ``max_autotune``, its
    matrix products autotuned (a longer compile for faster calls). The check runs ``check_states`` random states
    around the data's mean, with random noise (seeded with ``seed``), through each file and through
    :func:`checkpoint_acting` in ``act_dtype``: ``max_difference`` (0 when the program computes what the checkpoint
    does) and ``agreement``, the share of states whose chunk is within ``AGREEMENT`` of the checkpoint's; for
    bfloat16 also ``float32_agreement``, the same against the float32 checkpoint (rounding, and compiled kernels'
    summation order, can change which candidate wins). The package's figures have the prefix ``aoti_``. A setting out of range raises ``SettingError``, a bad
    checkpoint ``CheckpointError``, a failed AOTInductor compilation ``ExportError`` (the ``.pt2`` is kept).
    """
    check_acting_settings(num_samples, noise_scale, sample_steps, act_dtype)
    check_bool(aoti, "aoti")
    check_bool(max_autotune, "max_autotune")
    out = Path(out)
    if not out.name.endswith(".pt2"):  # torch.export's archive suffix, by which manip.evaluate knows a program
        raise SettingError(f"out={out}: the program is a .pt2 file; name it <name>.pt2")
    for path in (out, package_path(out)) if aoti else (out,):
        if path.exists():
            raise SettingError(f"{path} exists and is kept; name a new file for the program (out=...)")
    ckpt = Path(ckpt).resolve()
    module, cfg, noise_scale = load_acting_module(ckpt, noise_scale, sample_steps)
    env_spec_of(cfg)  # an export names its simulator: a checkpoint without one is refused here
    num_samples = module.agent.num_samples if num_samples is None else num_samples
    program = PolicyProgram(module, num_samples, noise_scale, act_dtype).eval()
    example = (torch.zeros(2, module.obs_dim), torch.zeros(2, *program.noise_shape))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        exported = torch.export.export(program, example, dynamic_shapes=({0: batch}, {0: batch}))
    meta = _metadata(program, cfg, ckpt, module.checkpoint_step, act_dtype)
    program_bytes = io.BytesIO()  # saved in memory first: torch's archive writer aborts the process on a full disk
    torch.export.save(exported, program_bytes, extra_files={META_FILE: json.dumps(meta, indent=1)})
    handle, out = open_new(out, binary=True)
    try:
        with handle:
            handle.write(program_bytes.getbuffer())
    except BaseException as err:  # a full disk, Ctrl-C: no partial program
        out.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise SettingError(f"cannot write {out} ({err.strerror}); nothing is left there") from None
        raise

    generator = torch.Generator().manual_seed(seed)
    inputs = (module.obs_mean + module.obs_scale * torch.randn(check_states, module.obs_dim, generator=generator),
              torch.randn(check_states, *program.noise_shape, generator=generator))
    one = (module.obs_mean[None].clone(), torch.zeros(1, *program.noise_shape))
    reference = checkpoint_acting(module, num_samples, noise_scale, act_dtype)
    float32 = reference if act_dtype == "float32" else checkpoint_acting(module, num_samples, noise_scale)

    def compare(fn, prefix: str = "") -> dict[str, float]:
        differences = _chunk_differences(fn, reference, inputs)
        figures = {"max_difference": float(differences.max()),
                   "agreement": float((differences <= AGREEMENT).float().mean())}
        if float32 is not reference:
            figures["float32_agreement"] = float((_chunk_differences(fn, float32, inputs) <= AGREEMENT).float().mean())
        return {prefix + key: value for key, value in figures.items()}

    loaded = load_exported(out).program
    summary = {"out": str(out), "meta": meta, "states": check_states, **compare(loaded),
               "latency_ms": _latency_ms(loaded, *one), "module_latency_ms": _latency_ms(reference, *one)}
    if aoti:
        handle, package = open_new(package_path(out), binary=True)
        handle.close()  # the name is taken now; the compiler writes the package into it
        compiled = _compile_package(exported, package, out, meta, max_autotune)
        summary.update(aoti=str(package), **compare(compiled, "aoti_"), aoti_latency_ms=_latency_ms(compiled, *one))
    return summary


def _compile_package(exported: torch.export.ExportedProgram, package: Path, program: Path, meta: dict[str, Any],
                     max_autotune: bool):
    """AOTInductor package of ``exported`` (saved as ``program``) at ``package`` (metadata: ``manip.json``), loaded
    back. Where no package is made, the (empty) file at ``package`` is removed."""
    try:
        from torch._inductor import aoti_compile_and_package, aoti_load_package
    except ImportError as exc:
        package.unlink(missing_ok=True)
        raise ExportError(f"this torch ({torch.__version__}) has no AOTInductor packaging (torch >= 2.6 has it); "
                          f"the program {program} is written") from exc
    quiet_inductor_warnings()
    configs = {"freezing": True, "max_autotune": bool(max_autotune), **QUIET_AUTOTUNE,
               # a batch of 1 passes the package's input checks (AOTI_RUNTIME_CHECK_INPUTS=1)
               "aot_inductor.check_lowerbound": False,
               "aot_inductor.metadata": {META_FILE: json.dumps(meta)}}
    try:
        aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
    except BaseException as exc:  # a missing compiler, an unsupported CPU, Ctrl-C: the .pt2 stays usable
        package.unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        raise ExportError(f"AOTInductor could not compile {package.name} ({type(exc).__name__}: "
                          f"{first_sentence(exc)}); the program {program} is written and needs no compiler") from exc
    return aoti_load_package(str(package))


class ExportedPolicy:
    """An exported program (``manip.export``) with its noise and action queue, for a robot's control loop.

    ``policy(obs)``: obs (B, O) raw -> chunk (B, h, A), the noise drawn from ``generator`` (or ``noise``
    (B, C, D) given; or ``policy(obs, generator=[B CPU streams])``, one stream per state, as evaluation draws
    it). ``select_action(obs)``: obs (O,) -> one action (A,), popped from the current chunk; a new
    chunk is computed when the queue is empty (executed open-loop, as in training); ``reset()`` empties it at an
    episode's start. An observation of the wrong shape raises ``ValueError`` naming the size and keys expected.
    """

    def __init__(self, program: Any, meta: dict[str, Any], generator: torch.Generator | None = None):
        self.program, self.meta, self.generator = program, meta, generator
        self._queue: deque[torch.Tensor] = deque()

    def _check(self, obs: torch.Tensor) -> None:
        size = self.meta["obs_shape"][0]
        if obs.dim() != 2 or obs.shape[1] != size or not 1 <= obs.shape[0] <= self.meta["max_batch"]:
            keys = self.meta.get("obs_key_dims") or self.meta.get("obs_keys")
            raise ValueError(f"observations of shape {tuple(obs.shape)}: the policy takes (batch, {size})"
                             + (f", the raw {keys} concatenated" if keys else "")
                             + f", batch 1 to {self.meta['max_batch']}")

    def __call__(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: NoiseStreams = None) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32)
        self._check(obs)
        shape = (obs.shape[0], *self.meta["noise_shape"])
        if noise is None:
            noise = unit_noise(shape, self.generator if generator is None else generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)}: expected {shape}")
        with torch.inference_mode():
            return self.program(obs, noise)

    def reset(self) -> None:
        self._queue.clear()

    def select_action(self, obs: torch.Tensor) -> torch.Tensor:
        if not self._queue:
            self._queue.extend(self(torch.as_tensor(obs, dtype=torch.float32)[None])[0])
        return self._queue.popleft()


def load_exported(path: str | Path, generator: torch.Generator | None = None) -> ExportedPolicy:
    """The :class:`ExportedPolicy` of a ``manip.export`` file: the ``.pt2`` program or its ``.aoti.pt2`` package.
    ``CheckpointError`` naming the file if it is neither."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a manip.export program (not a .pt2 archive)") from exc
    is_package = any("/data/aotinductor/" in name for name in names)
    if not is_package and not any(name.endswith(f"/extra/{META_FILE}") for name in names):
        raise CheckpointError(f"{path}: not a manip.export program (it has no {META_FILE}; "
                              f"python -m manip.export ckpt=... writes one)")
    # torch logs a failed load's traceback as warnings too: the error below says it in one line
    torch_export_log = logging.getLogger("torch.export")
    level = torch_export_log.level
    torch_export_log.setLevel(logging.ERROR)
    try:
        if is_package:
            from torch._inductor import aoti_load_package

            program = aoti_load_package(str(path))
            meta = json.loads(program.get_metadata().get(META_FILE, "null"))
        else:
            extra = {META_FILE: ""}
            program = torch.export.load(path, extra_files=extra).module()
            meta = json.loads(extra[META_FILE])
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is not a usable export
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {first_sentence(exc)})") from exc
    finally:
        torch_export_log.setLevel(level)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a manip.export program (its {META_FILE} does not say {FORMAT})")
    return ExportedPolicy(program, meta, generator)


def _shape(dims: list[int]) -> str:
    return "(" + ", ".join(["B", *map(str, dims)]) + ")"


def _agreement(summary: dict[str, Any], prefix: str = "") -> str:
    """How a file's chunks compare with the checkpoint's, in words."""
    dtype, states = summary["meta"]["act_dtype"], summary["states"]
    text = (f"against the checkpoint ({dtype}, {states} states, same noise) largest chunk difference "
            f"{summary[prefix + 'max_difference']:.1e}, {summary[prefix + 'agreement']:.2f} of chunks within "
            f"{AGREEMENT}")
    if prefix + "float32_agreement" in summary:
        text += f" ({summary[prefix + 'float32_agreement']:.2f} of the float32 checkpoint's)"
    return text


def summary_lines(summary: dict[str, Any]) -> str:
    """What ``main`` prints."""
    meta = summary["meta"]
    candidates = meta["noise_shape"][0]
    choice = f"best of {candidates} candidates" if candidates > 1 else "one candidate"
    lines = [
        f"exported {meta['algo']} ({meta['task']}, step {meta['step']}) -> {summary['out']}",
        f"policy(obs {_shape(meta['obs_shape'])}, noise {_shape(meta['noise_shape'])}) -> chunk "
        f"{_shape(meta['chunk_shape'])}; {choice}, noise scale {meta['noise_scale']}, {meta['act_dtype']}",
        f"{_agreement(summary)}; batch-1 call {summary['latency_ms']:.2f} ms (the checkpoint's networks"
        f"{'' if meta['act_dtype'] == 'float32' else ' in ' + meta['act_dtype']}: "
        f"{summary['module_latency_ms']:.2f} ms)",
    ]
    if "aoti" in summary:
        lines.append(f"AOTInductor package -> {summary['aoti']} (compiled for this machine's CPU): "
                     f"{_agreement(summary, 'aoti_')}; batch-1 call {summary['aoti_latency_ms']:.2f} ms")
    if meta["trained_on_stand_in"]:
        lines.append(f"trained on a stand-in dataset manip generated ({meta['trained_on']}), not the released one")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        ckpt, out = checkpoint_command(cfg, "export", default_output, ("policy.pt2", "the program", "file"))
        summary = export_checkpoint(ckpt, out, cfg.num_samples, cfg.noise_scale, cfg.sample_steps, cfg.act_dtype,
                                    cfg.aoti, cfg.max_autotune)
    except (CheckpointError, ExportError, SettingError) as err:
        sweep.refuse("export", str(err))
        return
    except KeyboardInterrupt:
        print("manip.export: interrupted", file=sys.stderr)
        sys.exit(130)
    print(summary_lines(summary))


if __name__ == "__main__":
    from manip.run import check_command_line

    check_command_line("export")
    with sweep.summary("export"):
        main()
