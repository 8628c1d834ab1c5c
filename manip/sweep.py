"""``--multirun`` sweeps: a job that a user error refuses (a missing dataset or checkpoint, a ``run_dir`` another run
holds, a value out of range in one combination) prints its one line and the sweep goes on with the next job; once
Hydra has run them all, the command ends with status 1 and a line per refused job (:func:`summary`).

A Ctrl-C and a full disk still end the sweep where they happen: the next job would meet them too. A bug (a
traceback) is Hydra's to report: its basic launcher runs the other jobs and raises the first job's error at the end;
the lines of the refused jobs then follow its traceback (:func:`summary`)."""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator

_refused: list[str] = []  # "#<job> (<overrides>): <message>" of this process's sweep

_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def current_job() -> str | None:
    """``#<num> (<the job's overrides>)`` inside a ``--multirun`` job that Hydra's basic launcher runs (in this
    process, one job after another); None in a single run, or where another launcher runs jobs in processes of its
    own, from which a refusal recorded here would not come back."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or hydra.launcher.get("_target_") != _BASIC_LAUNCHER:
        return None
    overrides = re.sub(r"\\(.)", r"\1", " ".join(hydra.overrides.task))  # as typed: Hydra escapes ${...} as $\{...\}
    return f"#{hydra.job.num} ({overrides})"


def go_on_after(command: str, message: str) -> bool:
    """Within a ``--multirun`` job: records ``message`` (already printed, without its ``manip.<command>: ``) as the
    job's refusal and returns True, so the job returns and Hydra starts the next one. Outside a sweep: False, and
    the caller ends the command."""
    job = current_job()
    if job is None:
        return False
    _refused.append(f"{job}: {message.removeprefix(f'manip.{command}: ')}")
    return True


def refuse(command: str, message: str) -> None:
    """A user error: ``manip.<command>: <message>`` on stderr; ends a single run with status 1, ends only the current
    job of a ``--multirun`` sweep."""
    line = f"manip.{command}: {message}"
    job = current_job()
    if job is None:
        sys.exit(line)
    print(line, file=sys.stderr)
    _refused.append(f"{job}: {message}")


@contextlib.contextmanager
def summary(command: str) -> Iterator[None]:
    """Around a command's ``main()``: once the sweep is over, status 1 and one line per refused job, when any was
    refused. Where the sweep ends otherwise (a job's bug, which Hydra reports and exits with; a Ctrl-C), those
    lines follow its own."""
    try:
        yield
    except BaseException:
        if _refused:
            print(_summary_lines(command), file=sys.stderr)
        raise
    if _refused:
        sys.exit(_summary_lines(command))


def _summary_lines(command: str) -> str:
    refused = list(_refused)
    _refused.clear()
    jobs = "1 --multirun job was" if len(refused) == 1 else f"{len(refused)} --multirun jobs were"
    return "\n".join([f"manip.{command}: {jobs} refused (the sweep ran the others):", *(f"  {job}" for job in refused)])
