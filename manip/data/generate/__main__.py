"""Generate small datasets in the real Robomimic / OGBench formats.

    python -m manip.data.generate robomimic --task lift --demos 100 [--out data/robomimic/lift/mh/low_dim_v15.hdf5]
    python -m manip.data.generate ogbench --dataset cube-single-play-v0 --episodes 100 [--out data/ogbench/cube-single-play-v0.npz]
    python -m manip.data.generate ogbench --task-demos 1 --episodes 20 --episode-length 200 --out data/ogbench/cube-single-task1-demos.npz
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m manip.data.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    rm = sub.add_parser("robomimic", help="scripted robosuite demos in robomimic low-dim HDF5 format")
    rm.add_argument("--task", choices=["lift", "can", "square"], default="lift")
    rm.add_argument("--demos", type=int, default=100)
    rm.add_argument("--out", default=None, help="default: data/robomimic/<task>/mh/low_dim_v15.hdf5")
    og = sub.add_parser("ogbench", help="oracle play data in OGBench npz format (+ -val.npz)")
    og.add_argument("--dataset", default="cube-single-play-v0")
    og.add_argument("--episodes", type=int, default=100)
    og.add_argument("--episode-length", type=int, default=501)
    og.add_argument("--out", default=None, help="default: data/ogbench/<dataset>.npz")
    og.add_argument("--task-demos", type=int, default=None, metavar="TASK_ID",
                    help="cube-single: oracle demonstrations of evaluation task TASK_ID instead of play data")
    for p in (rm, og):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = _generate(args)
    except FileExistsError as err:  # the existing file is kept
        sys.exit(f"manip.data.generate: {err}")
    print(json.dumps(result, indent=1, default=str))
    return result


def _generate(args: argparse.Namespace) -> dict:
    if args.kind == "robomimic":
        from manip.data.generate.robomimic_scripted import generate

        out = args.out or f"data/robomimic/{args.task}/mh/low_dim_v15.hdf5"
        result = generate(args.task, out, args.demos, seed=args.seed, overwrite=args.overwrite)
    else:
        from manip.data.generate.ogbench_play import generate

        out = args.out or f"data/ogbench/{args.dataset}.npz"
        result = generate(args.dataset, out, args.episodes, episode_length=args.episode_length,
                          seed=args.seed, overwrite=args.overwrite, task_id=args.task_demos)
    return result


if __name__ == "__main__":
    main()
