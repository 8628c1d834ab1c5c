"""Weight averaging of the acting network (``module.actor_ema``): updated once per update, used to act,
and checkpoints with or without it load into modules with or without it."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import torch
from test_reliability import config, fit_overrides

from manip import fit
from manip.checkpoint import load_module

DECAY = 0.5


class ActorSnapshots(L.Callback):
    """The acting network's weights after every update."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        net = getattr(module.agent, module.agent.acting_net)
        self.weights.append({k: v.detach().clone() for k, v in net.state_dict().items()})


def test_actor_ema_follows_updates_and_acts(cube_single_npz, tmp_path):
    steps = 10  # = the checkpoint interval, so last.ckpt holds the final weights
    module, dm, trainer, _ = fit.build(config("fit", fit_overrides(
        cube_single_npz, tmp_path, steps, f"module.actor_ema={DECAY}")))
    snapshots = ActorSnapshots()
    trainer.callbacks.append(snapshots)
    trainer.fit(module, datamodule=dm)
    assert len(snapshots.weights) == steps

    # AveragedModel's EMA: the first update copies, then ema <- decay * ema + (1 - decay) * w.
    expected = snapshots.weights[0]
    for weights in snapshots.weights[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k] for k in weights}
    averaged = module.ema_actor.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    raw = module.agent.actor.state_dict()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)

    # Acting uses the average: same noise, same chunks as an agent holding the averaged weights.
    module.eval()
    noise = np.random.default_rng(0).normal(size=(4, module.obs_dim)).astype(np.float32)
    obs = module.obs_mean.numpy() + 0.1 * noise * module.obs_scale.numpy()  # in-distribution: no clipping
    torch.manual_seed(3)
    acted = module.predict_chunks(obs)
    reference = copy.deepcopy(module)
    reference.ema_actor = None
    reference.agent.actor.load_state_dict(averaged)
    torch.manual_seed(3)
    np.testing.assert_array_equal(acted, reference.predict_chunks(obs))
    raw_module = copy.deepcopy(module)
    raw_module.ema_actor = None
    torch.manual_seed(3)
    assert not np.array_equal(acted, raw_module.predict_chunks(obs))

    # The average is in the checkpoint and comes back with the module.
    loaded, cfg = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert cfg["module"]["actor_ema"] == DECAY
    for key, value in averaged.items():
        torch.testing.assert_close(loaded.ema_actor.module.state_dict()[key], value)


def test_checkpoints_load_with_and_without_average(cube_single_npz, tmp_path):
    plain_module, _, plain_trainer, _ = fit.build(config("fit", fit_overrides(cube_single_npz, tmp_path / "a", 2)))
    ema_module, _, ema_trainer, _ = fit.build(config("fit", fit_overrides(
        cube_single_npz, tmp_path / "b", 2, "module.actor_ema=0.99")))

    # Without an average in the checkpoint, the average starts from the checkpoint's actor.
    checkpoint = {"state_dict": copy.deepcopy(plain_module.state_dict())}
    ema_module._match_weight_average(checkpoint["state_dict"])
    ema_module.load_state_dict(checkpoint["state_dict"])
    for key, value in plain_module.agent.actor.state_dict().items():
        torch.testing.assert_close(ema_module.ema_actor.module.state_dict()[key], value)

    # An average the module does not use is dropped; everything else loads strictly.
    checkpoint = {"state_dict": copy.deepcopy(ema_module.state_dict())}
    plain_module._match_weight_average(checkpoint["state_dict"])
    plain_module.load_state_dict(checkpoint["state_dict"])
    assert not any(key.startswith("ema_actor.") for key in plain_module.state_dict())
