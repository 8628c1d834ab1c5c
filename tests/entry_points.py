"""The entry points run in-process: Hydra composes ``conf/`` as ``python -m manip.fit`` / ``manip.finetune`` would,
and ``fit.build`` / ``finetune.build`` make the module, data and Trainer that ``manip.run.train`` then runs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hydra import compose, initialize_config_dir

import manip
from manip import finetune, fit, run_lock
from manip.run import train

CONF = Path(manip.__file__).resolve().parent.parent / "conf"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# One task of a SLURM job, as srun starts it (what Lightning's SLURMEnvironment.detect() reads).
SLURM_JOB_ENV = {**SUBPROCESS_ENV, "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fit", "SLURM_JOB_ID": "4242",
                 "SLURM_NODELIST": "vm", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def slurm_job_with_scontrol(bin_dir: Path) -> tuple[dict, Path]:
    """SLURM_JOB_ENV with an executable ``bin_dir/scontrol`` first on PATH, standing in for SLURM's: the environment,
    and the file where it appends each call's arguments (``requeue 4242``)."""
    stand_in, calls = bin_dir / "scontrol", bin_dir / "scontrol.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stand_in.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    stand_in.chmod(0o755)
    return {**SLURM_JOB_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(calls)}, calls


def config(name: str, overrides: list[str]):
    """The config ``python -m manip.<name> OVERRIDES`` composes (``name``: fit, finetune or evaluate)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def run_fit(overrides: list[str]):
    """``python -m manip.fit OVERRIDES``: the trainer and module after ``trainer.fit``."""
    try:
        module, dm, trainer, resume = fit.build(config("fit", overrides))
        train(trainer, module, dm, resume)
    finally:
        run_lock.release()  # as the command does when it ends
    return trainer, module


def run_finetune(overrides: list[str]):
    """``python -m manip.finetune OVERRIDES``: the trainer and module after ``trainer.fit``."""
    try:
        module, dm, trainer, ckpt_path = finetune.build(config("finetune", overrides), overrides)
        train(trainer, module, dm, ckpt_path)
    finally:
        run_lock.release()
    return trainer, module


def warnings_logged(caplog) -> str:
    """The WARNING lines ``caplog`` captured (a stand-in dataset's notice is a warning: it reaches a library user's
    stderr without any logging set up)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


_HOLDER = textwrap.dedent("""
    import sys
    from manip import run_lock
    run_lock.claim(sys.argv[1], sys.argv[2])
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
""")


@contextlib.contextmanager
def run_dir_held(run_dir: Path, command: str = "python -m manip.fit seed=1"):
    """Another process holding ``run_dir``'s lock, as a running ``command`` would (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
