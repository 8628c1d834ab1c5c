"""Throughput of the simulators used for online collection.

    python -m manip.bench_envs [--envs ogbench-cube-single robosuite-lift] [--workers 1 2] [--steps 300]
                               [--out bench_envs.json]

For each env and worker count W, ``manip.envs.make_vector_env`` builds a
``gymnasium.vector.AsyncVectorEnv`` (one process per env, same-step autoreset) that is stepped with
uniform random actions in [-1, 1]: ``steps`` vector steps after ``warmup`` untimed ones, i.e.
``W * steps`` env steps. The in-process ``SyncVectorEnv`` with one env is measured too, as the
baseline without inter-process overhead. Prints a table, then the results as JSON (also written to
``--out`` when given). ``env_steps_per_s`` is the whole vector env's rate; ``per_worker`` divides it by W.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from manip.cli_args import at_least, new_file
from manip.envs import EnvSpec, close_vector_env, make_vector_env
from manip.settings import write_result

ENVS = ("ogbench-cube-single", "robosuite-lift")


def env_spec(name: str) -> EnvSpec:
    """The collection env behind a benchmark name (the tasks' own evaluation horizons)."""
    if name == "ogbench-cube-single":
        return EnvSpec("ogbench", {"env_name": "cube-single-singletask-task1-v0"})
    if name == "robosuite-lift":
        from manip.data.generate.robomimic_scripted import env_args
        from manip.data.robomimic import DEFAULT_OBS_KEYS

        return EnvSpec("robosuite", {"env_args": env_args("lift"), "obs_keys": list(DEFAULT_OBS_KEYS),
                                     "horizon": 300})
    raise ValueError(f"unknown env {name!r}; expected one of {ENVS}")


def measure(spec: EnvSpec, workers: int, asynchronous: bool, steps: int, warmup: int, seed: int = 0) -> dict:
    """Env steps per second of ``workers`` copies of ``spec`` under random actions."""
    start = time.perf_counter()
    env = make_vector_env(spec, workers, asynchronous=asynchronous)
    try:
        env.reset(seed=seed)
        startup_s = time.perf_counter() - start
        rng = np.random.default_rng(seed)
        shape = (workers, *env.single_action_space.shape)
        for _ in range(warmup):
            env.step(rng.uniform(-1.0, 1.0, shape).astype(np.float32))
        start = time.perf_counter()
        for _ in range(steps):
            env.step(rng.uniform(-1.0, 1.0, shape).astype(np.float32))
        seconds = time.perf_counter() - start
    finally:
        close_vector_env(env)
    rate = workers * steps / seconds
    return {"vector": "async" if asynchronous else "sync", "workers": workers, "env_steps": workers * steps,
            "seconds": seconds, "env_steps_per_s": rate, "per_worker": rate / workers, "startup_s": startup_s}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m manip.bench_envs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    parser.add_argument("--workers", nargs="+", type=at_least(1), default=[1, 2], help="AsyncVectorEnv sizes (>= 1)")
    parser.add_argument("--steps", type=at_least(1), default=300, help="timed vector steps per configuration (>= 1)")
    parser.add_argument("--warmup", type=at_least(0), default=20, help="untimed vector steps first (>= 0)")
    parser.add_argument("--out", default=None, type=new_file, help="also write the JSON here (a new file in an existing directory)")
    args = parser.parse_args(argv)

    results = []
    print(f"{'env':<22}{'vector':<8}{'workers':>8}{'env steps':>11}{'seconds':>9}{'steps/s':>10}"
          f"{'per worker':>12}{'startup s':>11}", flush=True)
    for name in args.envs:
        spec = env_spec(name)
        configs = [(1, False)] + [(w, True) for w in args.workers]
        for workers, asynchronous in configs:
            row = {"env": name, **measure(spec, workers, asynchronous, args.steps, args.warmup)}
            results.append(row)
            print(f"{name:<22}{row['vector']:<8}{workers:>8}{row['env_steps']:>11}{row['seconds']:>9.2f}"
                  f"{row['env_steps_per_s']:>10.1f}{row['per_worker']:>12.1f}{row['startup_s']:>11.1f}", flush=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        write_result(args.out, text + "\n", "python -m manip.bench_envs", printed=True)
    return results


if __name__ == "__main__":
    main()
