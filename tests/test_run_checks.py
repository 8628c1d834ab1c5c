"""The checks ``fit`` runs before it writes anything: the ``resume`` value, the optional W&B logger and its run id,
``algo.agent.discount``, a float ``trainer.max_steps`` and agent keys a resumed run's config lacks.

Runs are in-process builds of the entry point (``fit.build`` on the Hydra config ``python -m manip.fit`` composes)
with tiny networks on the session's small cube-single file.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest
from lightning.pytorch.loggers.logger import Logger

from manip import fit
from manip.checkpoint import CheckpointError, load_checkpoint
from manip.data.errors import DatasetError
from manip.run import resume_path
from manip.settings import SettingError

from entry_points import config, run_fit

SMALL = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
         "trainer.accelerator=cpu", "eval.every_n_steps=0", "eval.final_episodes=0", "data.env_horizon=10",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=0"]
STEPS = 3  # of the offline run


def fit_overrides(npz: Path, run_dir: Path, steps: int | str, *extra: str) -> list[str]:
    return ["data=ogbench", f"data.path={npz}", f"run_dir={run_dir}", f"trainer.max_steps={steps}", *SMALL, *extra]


@pytest.fixture(scope="module")
def offline_run(cube_single_npz, tmp_path_factory) -> Path:
    """The run directory of a 3-update MVP fit."""
    run_dir = tmp_path_factory.mktemp("offline") / "run"
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, STEPS))
    assert trainer.global_step == STEPS
    return run_dir


def files_in(directory: Path) -> dict[str, bytes]:
    """The run's files (the lock file, which records the command holding it, aside)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("value", ["0", "1", "0.0"])
def test_resume_takes_only_auto_true_or_false(value, offline_run, cube_single_npz):
    """``resume=0`` is not ``resume=false`` (which would refuse this run directory): it is refused by name, before
    anything is written, rather than starting a fresh run over the run's files."""
    before = files_in(offline_run)
    with pytest.raises(SettingError, match=re.escape(f"resume must be auto, true or false, got {value}")):
        fit.build(config("fit", fit_overrides(cube_single_npz, offline_run, STEPS + 2, f"resume={value}")))
    assert files_in(offline_run) == before
    last = offline_run / "checkpoints" / "last.ckpt"
    assert resume_path(True, offline_run) == resume_path("auto", offline_run) == last
    with pytest.raises(CheckpointError, match="resume=false but"):
        resume_path(False, offline_run)


# ------------------------------------------------------------------------------------------------------ W&B
class WandbLogger(Logger):
    """Stands in for Lightning's WandbLogger (the wandb package is optional): keeps the run id it was given."""

    def __init__(self, id: str | None = None, save_dir: str | None = None, **kwargs) -> None:
        super().__init__()
        self._id, self._save_dir = id, save_dir

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str | None:
        return self._id

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def test_logger_wandb_without_the_wandb_package_is_refused_before_anything_is_written(cube_single_npz, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    run_dir = tmp_path / "run"
    with pytest.raises(SettingError, match=re.escape('logger.wandb logs to Weights & Biases, which needs the wandb '
                                                     'package: pip install -e ".[wandb]"')) as refused:
        fit.build(config("fit", fit_overrides(cube_single_npz, run_dir, 2, "logger=wandb")))
    assert "\n" not in str(refused.value) and not run_dir.exists()


def test_wandb_run_id_is_kept_once_the_checks_passed(cube_single_npz, tmp_path, monkeypatch):
    """A command refused by a check after the trainer is built (here the dataset file) leaves no ``wandb_run_id``
    behind; a run that trains keeps the id its logger got, and continues with it when resumed."""
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)  # installed
    stand_in = ["logger=wandb", f"logger.wandb._target_={__name__}.WandbLogger"]
    run_dir = tmp_path / "run"
    with pytest.raises(DatasetError):
        fit.build(config("fit", fit_overrides(tmp_path / "missing.npz", run_dir, 2, *stand_in)))
    assert not (run_dir / "wandb_run_id").exists()

    def logger_id(trainer) -> str:
        return next(logger for logger in trainer.loggers if isinstance(logger, WandbLogger)).version

    built = tmp_path / "built"  # once the checks passed, before Lightning starts the W&B run in trainer.fit
    trainer = fit.build(config("fit", fit_overrides(cube_single_npz, built, 2, *stand_in)))[2]
    assert (built / "wandb_run_id").read_text() == logger_id(trainer)
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, 2, *stand_in))
    first = logger_id(trainer)
    assert (run_dir / "wandb_run_id").read_text() == first
    trainer, _ = run_fit(fit_overrides(cube_single_npz, run_dir, 3, *stand_in))
    assert trainer.global_step == 3 and logger_id(trainer) == first


# ------------------------------------------------------------------------------------------- agent settings
@pytest.mark.parametrize("value,shown", [("abc", "'abc'"), ("[0.9]", "[0.9]")])
def test_non_numeric_agent_discount_is_refused_by_name(value, shown, cube_single_npz, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SettingError, match=re.escape(f"algo.agent.discount must be a number in [0.0, 1.0], "
                                                     f"got {shown}")):
        fit.build(config("fit", fit_overrides(cube_single_npz, run_dir, 2, f"algo.agent.discount={value}")))
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------- trainer.max_steps
def test_float_max_steps_counts_as_its_integer(offline_run, cube_single_npz, tmp_path, caplog):
    """Hydra reads ``trainer.max_steps=2e0`` as 2.0: a resumed run already past it is refused as with 2, and a fresh
    run trains to step 3, not "3.0"."""
    before = files_in(offline_run)
    with pytest.raises(SettingError, match=rf"trainer.max_steps=2 but .*last.ckpt is already at step {STEPS}: "
                                           rf"nothing to train"):
        fit.build(config("fit", fit_overrides(cube_single_npz, offline_run, "2e0")))
    assert files_in(offline_run) == before
    caplog.clear()
    _, _, trainer, _ = fit.build(config("fit", fit_overrides(cube_single_npz, tmp_path / "fresh", "3e0")))
    assert trainer.max_steps == 3 and type(trainer.max_steps) is int
    assert re.search(r"up to step 3 -> ", caplog.text)


# ------------------------------------------------------------------------------------- resuming another agent
def test_resume_compares_an_agent_key_the_run_lacks_with_its_default(offline_run, cube_single_npz):
    """conf/algo/mvp.yaml leaves ``time_dim`` to MVPAgent's default (64): adding another value to the run's command
    would build other networks than the checkpoint's."""
    assert "time_dim" not in load_checkpoint(offline_run / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"][
        "algo"]["agent"]
    before = files_in(offline_run)
    with pytest.raises(CheckpointError, match=re.escape("algo.agent.time_dim=64 (this command: 32); continue it "
                                                        "with the run's values")):
        fit.build(config("fit", fit_overrides(cube_single_npz, offline_run, STEPS + 2, "+algo.agent.time_dim=32")))
    assert files_in(offline_run) == before
    # the default itself is the run's value (at its last step: nothing to train, nothing written)
    _, _, _, resume = fit.build(config("fit", fit_overrides(cube_single_npz, offline_run, STEPS,
                                                            "+algo.agent.time_dim=64")))
    assert resume == offline_run / "checkpoints" / "last.ckpt" and files_in(offline_run) == before
