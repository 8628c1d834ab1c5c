"""Chunk-sampling throughput: ``python -m manip.data.bench [--path FILE] [--batch-size 256] [--horizon 5]``.

Measures ``ChunkReplay.sample`` on one core (samples/s = batches/s x batch size), on a Robomimic
or OGBench file when given, else on 1M synthetic transitions of Robomimic-lift shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from manip.cli_args import at_least
from manip.data.errors import DatasetError
from manip.data.replay import ChunkReplay, Transitions


def synthetic(n: int = 1_000_000, obs_dim: int = 19, action_dim: int = 7, episode_length: int = 200,
              seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    return Transitions(
        observations=rng.standard_normal((n, obs_dim), dtype=np.float32),
        actions=rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
        rewards=-np.ones(n, np.float32), masks=np.ones(n, np.float32),
        terminals=(np.arange(n) % episode_length) == episode_length - 1,
        next_observations=rng.standard_normal((n, obs_dim), dtype=np.float32))


def measure(replay: ChunkReplay, batch_size: int = 256, seconds: float = 3.0) -> dict:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        replay.sample(batch_size, generator)
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        replay.sample(batch_size, generator)
        batches += 1
    elapsed = time.perf_counter() - start
    return {"transitions": replay.size, "batch_size": batch_size, "horizon": replay.horizon,
            "batches_per_s": batches / elapsed, "samples_per_s": batches * batch_size / elapsed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m manip.data.bench", description=__doc__)
    parser.add_argument("--path", default=None, help="robomimic .hdf5 or ogbench .npz (default: synthetic)")
    parser.add_argument("--dataset-name", default="cube-single-play-singletask-task1-v0",
                        help="singletask name for an ogbench file")
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="samples per batch (>= 1)")
    parser.add_argument("--horizon", type=at_least(1), default=5, help="chunk length (>= 1)")
    parser.add_argument("--seconds", type=at_least(0.0, float, strict=True), default=3.0, help="timed sampling duration (> 0)")
    args = parser.parse_args(argv)
    if args.path is not None and not os.path.isfile(args.path):
        parser.error(f"argument --path: no file {args.path}")
    torch.set_num_threads(1)
    try:
        if args.path is None:
            transitions, source = synthetic(), "synthetic 1M x (19 obs, 7 act)"
        elif args.path.endswith(".npz"):
            from manip.data.ogbench import load_ogbench

            transitions, source = load_ogbench(args.dataset_name, args.path).train, args.path
        else:
            from manip.data.robomimic import load_robomimic

            transitions, source = load_robomimic(args.path).transitions, args.path
    except DatasetError as err:  # the file's problem, in one line
        sys.exit(f"manip.data.bench: {err}")
    start = time.perf_counter()
    replay = ChunkReplay.from_transitions(transitions, args.horizon)
    result = {"source": source, "build_seconds": time.perf_counter() - start,
              **measure(replay, args.batch_size, args.seconds)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
