"""Shared fixtures: small datasets generated once per test session in the real formats."""

from __future__ import annotations

import os
import signal

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_in_a_terminal():
    """The Ctrl-C tests assume SIGINT is handled as in a terminal. A test run started in the background (``cmd &``
    in a script, ``nohup``) inherits it ignored, and so would every command the tests start."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _run_directories_released():
    """A test that builds a run in-process (``fit.build``) holds its run directory's lock as the command would;
    the command releases it when it ends, and so does each test."""
    yield
    from manip import run_lock

    run_lock.release()


@pytest.fixture(scope="session")
def lift_hdf5(tmp_path_factory):
    """A Robomimic-format lift file of 6 scripted demos."""
    from manip.data.generate.robomimic_scripted import generate

    path = tmp_path_factory.mktemp("robomimic") / "lift" / "mh" / "low_dim_v15.hdf5"
    path.parent.mkdir(parents=True)
    generate("lift", path, 6, seed=0, verbose=False)
    return path


@pytest.fixture(scope="session")
def cube_single_npz(tmp_path_factory):
    """An OGBench-format cube-single play file (8 x 101 steps) with its -val.npz sibling."""
    from manip.data.generate.ogbench_play import generate

    path = tmp_path_factory.mktemp("ogbench") / "cube-single-play-v0.npz"
    generate("cube-single-play-v0", path, 8, episode_length=101, seed=0, verbose=False)
    return path
