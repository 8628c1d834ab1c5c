"""Generate small datasets in the real Robomimic / OGBench formats.

    python -m manip.data.generate robomimic --task lift --demos 100 [--out data/robomimic/lift/mh/low_dim_v15.hdf5]
    python -m manip.data.generate ogbench --dataset cube-single-play-v0 --episodes 100 [--out data/ogbench/cube-single-play-v0.npz]
    python -m manip.data.generate ogbench --task-demos 1 --episodes 20 --episode-length 200 --out data/ogbench/cube-single-task1-demos.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from manip.cli_args import at_least, interrupted_by_ctrl_c
from manip.data.generate import ogbench_play, robomimic_scripted
from manip.data.generate.files import CannotWriteError


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m manip.data.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    rm = sub.add_parser("robomimic", help="scripted robosuite demos in robomimic low-dim HDF5 format")
    rm.add_argument("--task", choices=list(robomimic_scripted.TASKS), default="lift")
    rm.add_argument("--demos", type=at_least(1), default=100, help="successful demos to collect (>= 1)")
    rm.add_argument("--out", default=None, help=f"a {' or '.join(robomimic_scripted.SUFFIXES)} path; "
                                                "default: data/robomimic/<task>/mh/low_dim_v15.hdf5")
    og = sub.add_parser("ogbench", help="oracle play data in OGBench npz format (+ -val.npz)")
    og.add_argument("--dataset", choices=ogbench_play.DATASETS, default="cube-single-play-v0", metavar="DATASET",
                    help=f"one of {', '.join(ogbench_play.DATASETS)} (default: %(default)s)")
    og.add_argument("--episodes", type=at_least(1), default=100, help="training episodes (>= 1)")
    og.add_argument("--episode-length", type=at_least(2), default=501, help="steps per episode (>= 2)")
    og.add_argument("--out", default=None, help="an .npz path; default: data/ogbench/<dataset>.npz")
    task_ids = ogbench_play.TASK_IDS
    og.add_argument("--task-demos", type=int, default=None, choices=task_ids, metavar="TASK_ID",
                    help=f"{' or '.join(ogbench_play.TASK_DEMO_DATASETS)}: oracle demonstrations of evaluation "
                         f"task TASK_ID ({task_ids[0]}-{task_ids[-1]}) instead of play data")
    for p in (rm, og):
        p.add_argument("--seed", type=at_least(0), default=0, help="seeds every random draw (>= 0)")
        p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    _check(sub.choices[args.kind], args)
    try:
        result = _generate(args)
    except FileExistsError as err:  # the existing file is kept
        sys.exit(f"manip.data.generate: {str(err).replace('pass overwrite=True', 'pass --overwrite')}")
    except CannotWriteError as err:
        sys.exit(f"manip.data.generate: {err}")
    except (Exception, KeyboardInterrupt) as err:
        if not interrupted_by_ctrl_c(err):
            raise  # a bug: its traceback
        print("manip.data.generate: interrupted (no file written)", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(result, indent=1, default=str))
    return result


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Report the first value the generator would reject as ``parser.error`` (usage and one line, exit status 2)."""
    suffixes = robomimic_scripted.SUFFIXES if args.kind == "robomimic" else (".npz",)
    if args.out is not None and Path(args.out).suffix not in suffixes:
        parser.error(f"argument --out: must end in {' or '.join(suffixes)}, got {args.out}")
    demo_datasets = ogbench_play.TASK_DEMO_DATASETS
    if args.kind == "ogbench" and args.task_demos is not None and args.dataset not in demo_datasets:
        parser.error(f"argument --task-demos: needs --dataset {' or '.join(demo_datasets)}, "
                     f"got --dataset {args.dataset}")


def _generate(args: argparse.Namespace) -> dict:
    if args.kind == "robomimic":
        out = args.out or f"data/robomimic/{args.task}/mh/low_dim_v15.hdf5"
        result = robomimic_scripted.generate(args.task, out, args.demos, seed=args.seed, overwrite=args.overwrite)
    else:
        out = args.out or f"data/ogbench/{args.dataset}.npz"
        result = ogbench_play.generate(args.dataset, out, args.episodes, episode_length=args.episode_length,
                                       seed=args.seed, overwrite=args.overwrite, task_id=args.task_demos)
    return result


if __name__ == "__main__":
    main()
