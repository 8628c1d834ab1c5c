"""One command per run directory (``manip.run_lock``): a second process is refused with the holder's pid and
command, nothing is created before the checks, and the lock ends with its process however that ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from manip import run_lock
from manip.settings import SettingError

from entry_points import run_dir_held

@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"``."""
    run_dir = tmp_path / "run"
    with run_dir_held(run_dir) as proc:
        yield proc, run_dir


def refusal(run_dir: Path, pid: int) -> re.Pattern:
    return re.compile(rf"{re.escape(str(run_dir))} is in use by another run \(pid {pid} on \S+ since "
                      r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: python -m manip\.fit seed=1\); wait for it to end, or give "
                      r"this command another run_dir")


def test_a_run_directory_held_by_another_process_is_refused_with_its_holder(holder):
    proc, run_dir = holder
    for take in (lambda: run_lock.check_free(run_dir, "python -m manip.fit"),
                 lambda: run_lock.claim(run_dir, "python -m manip.fit")):
        with pytest.raises(run_lock.RunDirInUse) as info:
            take()
        assert isinstance(info.value, SettingError)  # a user error: one line from the commands
        assert refusal(run_dir, proc.pid).fullmatch(str(info.value)), str(info.value)
    assert run_lock.held() == []
    assert (run_dir / run_lock.LOCK_NAME).read_text().startswith(f"pid {proc.pid} ")  # the refusals changed nothing


def test_the_lock_ends_with_its_process_even_when_killed(holder):
    proc, run_dir = holder
    proc.send_signal(signal.SIGKILL)  # no clean-up at all: the file stays, naming the dead holder
    proc.wait()
    assert f"pid {proc.pid} " in (run_dir / run_lock.LOCK_NAME).read_text()
    try:
        run_lock.check_free(run_dir, "python -m manip.fit resume=true")  # the file exists: taken already here
        assert run_lock.held() == [str(run_dir)]
        assert (run_dir / run_lock.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
        run_lock.claim(run_dir, "python -m manip.fit resume=true")  # the same process: still its own
    finally:
        run_lock.release()
    assert run_lock.held() == [] and (run_dir / run_lock.LOCK_NAME).read_text() == ""


def test_checking_creates_nothing_and_claiming_makes_the_directory(tmp_path):
    run_dir = tmp_path / "new" / "run"
    run_lock.check_free(run_dir, "python -m manip.fit")  # a refused command must leave no directory behind
    assert not (tmp_path / "new").exists() and run_lock.held() == []
    try:
        run_lock.claim(run_dir, "python -m manip.fit run_dir=new/run")
        assert run_lock.held() == [str(run_dir)]
        assert (run_dir / run_lock.LOCK_NAME).read_text().rstrip().endswith(": python -m manip.fit run_dir=new/run")
        other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from manip import run_lock
            try:
                run_lock.claim({str(run_dir)!r}, "python -m manip.fit")
            except run_lock.RunDirInUse as err:
                print(err)
        """)], capture_output=True, text=True, timeout=120)
        assert " is in use by another run (pid " in other.stdout, other.stdout + other.stderr
    finally:
        run_lock.release()
    released = subprocess.run([sys.executable, "-c", f"from manip import run_lock; "
                               f"run_lock.claim({str(run_dir)!r}, 'x'); print(run_lock.held())"],
                              capture_output=True, text=True, timeout=120)
    assert released.stdout.strip() == str([str(run_dir)]), released.stderr
