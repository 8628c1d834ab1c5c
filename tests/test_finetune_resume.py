"""Which fine-tuning run a ``finetune`` command continues: the run in its ``run_dir`` only when that run started from
the command's ``ckpt``, with fine-tuning's own sections as the command gives them, on a moved dataset's copy.

Runs are in-process builds of the entry points (``finetune.build`` on the Hydra config it composes) with tiny
networks on a copy of the session's small cube-single file.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from manip import finetune
from manip.checkpoint import CheckpointError, load_checkpoint

from entry_points import config, run_finetune, run_fit

SMALL = ["algo.agent.hidden_dims=[64,64]", "algo.agent.num_samples=4", "data.batch_size=32",
         "trainer.accelerator=cpu", "eval.every_n_steps=0", "eval.final_episodes=0", "data.env_horizon=10",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def offline(cube_single_npz, tmp_path_factory) -> Path:
    """A 15-update offline run (step10.ckpt, last.ckpt at 15) on a copy of the cube-single file, with an offline-only
    trainer setting (+trainer.max_time)."""
    data = tmp_path_factory.mktemp("data")
    for file in cube_single_npz.parent.glob(f"{cube_single_npz.stem}*.npz"):  # with its -val.npz
        shutil.copy(file, data)
    run_dir = tmp_path_factory.mktemp("offline") / "run"
    run_fit(["data=ogbench", f"data.path={data / cube_single_npz.name}", f"run_dir={run_dir}", "trainer.max_steps=15",
             "checkpoint.every_n_steps=10", "+trainer.max_time=00:01:00:00", *SMALL])
    return run_dir


@pytest.fixture
def run(offline, tmp_path) -> Path:
    """This test's copy of the offline run: fine-tuning writes into it by default."""
    shutil.copytree(offline, tmp_path / "run")
    return tmp_path / "run"


def overrides(ckpt: Path | str, *extra: str) -> list[str]:
    """A 2-update fine-tuning command (no run_dir unless ``extra`` gives one)."""
    return [f"ckpt={ckpt}", "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "eval.every_n_steps=0", "eval.final_episodes=0", "finetune.start_training=10",
            "finetune.target_samples=4", *extra]


def composed(items: list[str]) -> tuple:
    """``finetune.compose``'s (final config, ..., finished, ...) for the command ``items``."""
    return finetune.compose(config("finetune", items), items)


def test_a_run_continues_only_from_the_checkpoint_it_started_from(run):
    """Every checkpoint of an offline run fine-tunes into ``<run>/finetune_<target>`` by default: another one is
    refused, naming both, while the same command, the run's own last.ckpt and a chained run continue."""
    step10, last = run / "checkpoints" / "step10.ckpt", run / "checkpoints" / "last.ckpt"
    ft = run / "finetune_bon"
    run_finetune(overrides(step10))
    recorded = OmegaConf.load(ft / "hydra" / "config.yaml")
    assert (recorded.offline_ckpt, recorded.finetune_start_step) == (str(step10), 10)
    with pytest.raises(CheckpointError) as info:
        composed(overrides(last))
    assert str(info.value) == (f"{ft} holds a fine-tuning run started from {step10} (step 10), not from ckpt={last} "
                               f"(step 15); give run_dir=<a new directory> to fine-tune {last}, or continue that run "
                               f"with ckpt={step10}")
    final, *_, finished, _ = composed(overrides(step10))  # the same command again: that run, finished
    assert finished and final.run_dir == str(ft)
    # the run's own last.ckpt continues it, which still started from step10.ckpt
    own = ft / "checkpoints" / "last.ckpt"
    final, _, _, resume, finished, _ = composed(overrides(own, f"run_dir={ft}", "trainer.max_steps=4"))
    assert (resume, finished, final.offline_ckpt, final.finetune_start_step) == (str(own), False, str(step10), 10)
    # fine-tuning that checkpoint is a new run beside it, which the same command continues
    run_finetune(overrides(own))
    final, *_, finished, _ = composed(overrides(own))
    assert finished and final.run_dir == str(run / "finetune_bon_then_bon") and final.offline_ckpt == str(own)


def test_a_checkpoint_written_over_since_the_run_started_is_another_start(run, tmp_path):
    """The path is the same, the step is not (an offline run's last.ckpt after that run continued)."""
    kept = tmp_path / "kept" / "model.ckpt"
    kept.parent.mkdir()
    shutil.copy(run / "checkpoints" / "step10.ckpt", kept)
    run_finetune(overrides(kept))
    ft = kept.parent / "model_finetune_bon"
    own = ft / "checkpoints" / "last.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", kept)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{ft} holds a fine-tuning run started from {kept} at step 10, but that file is now at step 15; give "
            f"run_dir=<a new directory> to fine-tune it, or continue that run with ckpt={own} run_dir={ft}")):
        composed(overrides(kept))
    assert composed(overrides(own, f"run_dir={ft}"))[4]  # as the line says: that run, finished
    final, *_ = composed(overrides(kept, f"run_dir={tmp_path / 'new'}"))
    assert final.finetune_start_step == 15


def test_a_checkpoint_under_home_is_recorded_by_its_path(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(run / "checkpoints"))
    final = composed(overrides("'~/last.ckpt'"))[0]
    assert final.offline_ckpt == str(run / "checkpoints" / "last.ckpt") and final.run_dir == str(run / "finetune_bon")


def test_fine_tuning_takes_its_own_sections_whole(run):
    """A Trainer argument only the offline run set (+trainer.max_time) is not fine-tuning's; one the fine-tuning
    command sets is."""
    last = run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["hyper_parameters"]["cfg"]["trainer"]["max_time"] == "00:01:00:00"
    assert "max_time" not in composed(overrides(last))[0].trainer
    assert composed(overrides(last, "+trainer.max_time=00:00:30:00"))[0].trainer.max_time == "00:00:30:00"


def test_a_run_whose_dataset_moved_continues_on_a_copy_with_the_same_contents(run, tmp_path):
    """The line naming the missing file says to pass its copy, and that copy continues the run; a file with
    other contents does not."""
    offline_data = Path(load_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["cfg"]["data"]["path"])
    shutil.copytree(offline_data.parent, tmp_path / "a")
    data, ft = tmp_path / "a" / offline_data.name, tmp_path / "ft"
    command = overrides(run / "checkpoints" / "last.ckpt", f"run_dir={ft}")
    run_finetune([*command, f"+data.path={data}"])
    (tmp_path / "a").rename(tmp_path / "b")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{data} does not exist: it is the dataset checkpoint {ft / 'checkpoints' / 'last.ckpt'} was trained on, "
            f"which fine-tuning refills its replay with (restore it, or pass +data.path=<its copy>)")):
        composed([*command, "trainer.max_steps=4"])
    other = tmp_path / "c" / offline_data.name  # as many transitions, one action changed
    shutil.copytree(tmp_path / "b", other.parent)
    with np.load(other) as f:
        arrays = dict(f)
    arrays["actions"][0, 0] = -arrays["actions"][0, 0] + 0.5
    np.savez_compressed(other, **arrays)
    with pytest.raises(CheckpointError, match=re.escape(f"{other} is not the file {ft}'s run fine-tuned with: it has "
                                                        f"other transitions")):
        run_finetune([*command, "trainer.max_steps=4", f"+data.path={other}"])
    trainer, _ = run_finetune([*command, "trainer.max_steps=4", f"+data.path={tmp_path / 'b' / offline_data.name}"])
    assert trainer.global_step == 15 + 4
    assert OmegaConf.load(ft / "hydra" / "config.yaml").data.path == str(tmp_path / "b" / offline_data.name)


def test_a_network_setting_the_checkpoint_was_not_built_with_is_named(run, tmp_path):
    """``+algo.agent.hidden_dims=[32,32]`` on a checkpoint of [64, 64]: one line naming a weight and both shapes,
    before training and before the run directory is made."""
    command = overrides(run / "checkpoints" / "last.ckpt", f"run_dir={tmp_path / 'ft'}",
                        "+algo.agent.hidden_dims=[32,32]")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: weight agent\.\S+ has shape \[\d+(, \d+)*\], but the "
                                              r"network this command builds has \[\d+(, \d+)*\]: an algo\.agent "
                                              r"setting that sizes the network differs from the checkpoint's$"):
        finetune.build(config("finetune", command), command)
    assert not (tmp_path / "ft").exists()
