"""Training speed through Lightning's loop: ``ManipModule`` under a real ``Trainer`` on synthetic chunk batches.

    python -m manip.bench_trainer --out trainer.json [--device cuda] [--algos mvp qc] [--precision 32-true bf16-mixed]
                                  [--steps 400] [--grad-clip 1.0] [--actor-ema 0.999] [--compile [MODE]]

``manip.bench`` times the bare update (losses, backward, Adam, target update); this times what ``manip.fit`` trains
at: the same update inside ``trainer.fit``, with Lightning's precision plugin, manual optimisation, the actor's
weight average, the loss checks and a CSV logger writing every ``--log-every`` updates, on batches a DataLoader hands
over from host memory as the datamodule's are. Agents and sizes are ``manip.bench``'s (robomimic-lift: obs 19,
action 7, chunks of h = 5; ``--hidden`` MLPs).

Per algorithm and precision (one after another in this process):

* ``updates_per_s``: updates per second over the ``--steps`` after the first ``--warmup`` (CUDA synchronised at
  both ends; compilation, with ``--compile``, happens in the warm-up);
* ``syncs_per_update`` (CUDA only): host synchronisations per timed update, counted by
  ``torch.cuda.set_sync_debug_mode("warn")``: 0 between logging steps is the design (the module checks its losses
  for divergence only when it logs), so about ``1 / --log-every`` plus the logger's own.

It needs torch, numpy, Lightning and torchmetrics only (no Hydra, no simulators), so that it runs on a GPU machine
whose Python has those, as ``.ci/device_check`` does.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from manip.bench import ACTION_DIM, AGENTS, DEFAULT_ALGOS, OBS_DIM, check_device_and_out
from manip.cli_args import at_least, new_file
from manip.data.replay import random_chunk_batch
from manip.settings import write_result

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
SYNC_WARNING = "called a synchronizing CUDA operation"


class SyntheticChunks(IterableDataset):
    """An endless stream cycling over ``pool`` seeded synthetic batches (host memory, as the replay's)."""

    def __init__(self, batch_size: int, horizon: int, pool: int = 16) -> None:
        self.batches = [random_chunk_batch(batch_size, OBS_DIM, ACTION_DIM, horizon, seed=seed) for seed in range(pool)]

    def __iter__(self):
        while True:
            yield from self.batches


class UpdateClock(L.Callback):
    """Wall time of the updates after the first ``warmup``, and on CUDA the sync warnings raised during them."""

    def __init__(self, warmup: int, caught: list) -> None:
        self.warmup, self.caught = warmup, caught  # caught: warnings.catch_warnings(record=True)'s list
        self.started = self.seconds = None
        self.first_warning = 0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self._sync(trainer)
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            self.first_warning = len(self.caught)
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(trainer)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started


def measure(algo: str, precision: str, args: argparse.Namespace) -> dict:
    """One ``trainer.fit`` of ``args.steps`` updates of ``algo`` at ``precision``."""
    from manip.module import ManipModule

    cls, settings = AGENTS[algo]
    settings = dict(settings)
    horizon = settings.pop("horizon")
    agent = functools.partial(cls, hidden_dims=tuple(args.hidden), **settings)
    stats = {"obs_mean": [0.0] * OBS_DIM, "obs_std": [1.0] * OBS_DIM}
    module = ManipModule(agent, OBS_DIM, ACTION_DIM, horizon, stats, grad_clip=args.grad_clip,
                         actor_ema=args.actor_ema, compile=args.compile or False)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this fit's peak, not the largest so far
    with tempfile.TemporaryDirectory() as logs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync warning, not the first of each place only
        clock = UpdateClock(args.warmup, caught)
        trainer = L.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                            precision=precision, max_steps=args.steps, logger=CSVLogger(logs, name="", version=""),
                            log_every_n_steps=args.log_every, callbacks=[clock], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        loader = DataLoader(SyntheticChunks(args.batch_size, horizon), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
        syncs = sum(SYNC_WARNING in str(w.message) for w in caught[clock.first_warning:])
    updates = args.steps - args.warmup
    result = {"updates": updates, "seconds": clock.seconds, "updates_per_s": updates / clock.seconds}
    if device.type == "cuda":
        result["syncs_per_update"] = syncs / updates
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings; an unusable value exits with ``parser.error`` (usage and one line, status 2)."""
    parser = argparse.ArgumentParser(prog="python -m manip.bench_trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, type=new_file,
                        help="JSON output path, a new file in an existing directory (default: trainer.json, or the "
                             "first free trainer.<k>.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS), choices=list(AGENTS))
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=PRECISIONS,
                        help="trainer.precision settings to measure (default: %(default)s; Lightning runs 16-mixed "
                             "as bf16-mixed on a CPU)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads")
    parser.add_argument("--hidden", type=at_least(1), nargs="+", default=[512] * 4, help="hidden sizes of every MLP")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--steps", type=at_least(2), default=400, help="updates per fit, warm-up included")
    parser.add_argument("--warmup", type=at_least(1), default=50, help="untimed first updates (compilation)")
    parser.add_argument("--log-every", type=at_least(1), default=100, help="trainer.log_every_n_steps")
    parser.add_argument("--grad-clip", type=at_least(0.0, float, strict=True), default=None,
                        help="module.grad_clip (default: none)")
    parser.add_argument("--actor-ema", type=float, default=0.999, help="module.actor_ema (the lift preset's)")
    parser.add_argument("--compile", nargs="?", const=True, default=None,
                        help="module.compile: alone true (inductor), or a mode / backend name")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"argument --warmup: must be less than --steps ({args.steps}), got {args.warmup}")
    return check_device_and_out(parser, args, "trainer.json")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per figure, not Lightning's per fit
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as manip.fit trains
    results: dict[str, dict[str, dict]] = {}
    for algo in args.algos:
        for precision in args.precision:
            result = measure(algo, precision, args)
            results.setdefault(algo, {})[precision] = result
            syncs = f", {result['syncs_per_update']:.2f} syncs/update" if "syncs_per_update" in result else ""
            print(f"{algo:<10} {precision:<11} {result['updates_per_s']:8.1f} updates/s{syncs}", flush=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["torch"] = torch.__version__
    config["lightning"] = L.__version__
    config["device_name"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    report = {**results, "config": config}
    out = write_result(args.out, json.dumps(report, indent=2), "python -m manip.bench_trainer")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
