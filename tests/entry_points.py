"""The entry points run in-process: Hydra composes ``conf/`` as ``python -m manip.fit`` / ``manip.finetune`` would,
and ``fit.build`` / ``finetune.build`` make the module, data and Trainer that ``trainer.fit`` then runs."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose, initialize_config_dir

import manip
from manip import finetune, fit

CONF = Path(manip.__file__).resolve().parent.parent / "conf"


def config(name: str, overrides: list[str]):
    """The config ``python -m manip.<name> OVERRIDES`` composes (``name``: fit, finetune or evaluate)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def run_fit(overrides: list[str]):
    """``python -m manip.fit OVERRIDES``: the trainer and module after ``trainer.fit``."""
    module, dm, trainer, resume = fit.build(config("fit", overrides))
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    return trainer, module


def run_finetune(overrides: list[str]):
    """``python -m manip.finetune OVERRIDES``: the trainer and module after ``trainer.fit``."""
    module, dm, trainer, ckpt_path = finetune.build(config("finetune", overrides), overrides)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return trainer, module


def warnings_logged(caplog) -> str:
    """The WARNING lines ``caplog`` captured (a stand-in dataset's notice is a warning: it reaches a library user's
    stderr without any logging set up)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
