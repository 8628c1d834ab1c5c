"""What a GPU run does differently, checked on a CPU: gradient clipping under mixed precision, the float32 Q of the
critic under autocast, updates that never read a value back from the device between logging steps (the weight
average, the progress bar's loss) and a compiled actor loss that the ``finetune.alpha_final`` schedule does not
recompile."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from manip.algos import MVPAgent
from manip.algos.networks import CriticEnsemble
from manip.data.replay import random_chunk_batch
from manip.module import ManipModule, WeightAverage

OBS, ACTION, HORIZON = 5, 2, 3


def _module(**kwargs) -> ManipModule:
    torch.manual_seed(0)
    agent = partial(MVPAgent, hidden_dims=(32, 32), num_samples=4)
    stats = {"obs_mean": [0.1] * OBS, "obs_std": [2.0] * OBS}
    return ManipModule(agent, obs_dim=OBS, action_dim=ACTION, horizon=HORIZON, stats=stats, **kwargs)


def _batches(count: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader([random_chunk_batch(8, OBS, ACTION, HORIZON, seed=i) for i in range(count)],
                                       batch_size=None)


def _trainer(steps: int, **kwargs) -> L.Trainer:
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "accelerator": "cpu", **kwargs}
    return L.Trainer(max_steps=steps, **options)


class HostReads(TorchDispatchMode):
    """Counts the tensor values read on the host (``.item()``, ``bool(t)``, ``float(t)``: one GPU sync each)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------- gradient clipping
class FirstStep(L.Callback):
    """The gradients the optimizer stepped with (left on the parameters after the step), their norm at every update,
    and the parameters before and after the first update."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.grads = self.before = self.after = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.before is None:
            self.before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        if self.after is None:
            self.grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            self.after = {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", True), ("16-mixed", True),
                                              ("16-mixed", None)])
def test_grad_clip_steps_with_the_clipped_gradients(precision, fused, monkeypatch):
    """``module.grad_clip`` under every ``trainer.precision`` with the fused Adam, and under 16-mixed with an
    optimizer Lightning unscales in its step (devices without the fused Adam): every update's gradients have the
    clipped norm, and the first update is Adam's step on exactly those (16-mixed: unscaled) gradients."""
    import manip.algos.training as training

    monkeypatch.setattr(training, "fused_adam", lambda device_types: fused)
    clip = 1e-3  # far below the gradients' norm: every update clips
    module, record = _module(grad_clip=clip), FirstStep()
    setting = {"precision": precision}
    if precision == "16-mixed":  # which Lightning runs as bf16-mixed on a CPU: its GPU plugin, given on the CPU
        # a first scale that overflows no gradient here, so that no update is skipped
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        setting = {"plugins": [MixedPrecision(precision, "cpu", scaler=scaler)]}
    trainer = _trainer(3, callbacks=[record], **setting)
    trainer.fit(module, _batches(3))
    assert trainer.global_step == 3 and len(record.norms) == 3
    assert bool(module.optimizers().optimizer.defaults["fused"]) == bool(fused)
    assert record.norms == pytest.approx([clip] * 3, rel=1e-3)
    names = list(record.grads)
    reference = [record.before[n].clone().requires_grad_() for n in names]
    for param, name in zip(reference, names):
        param.grad = record.grads[name]
    torch.optim.Adam(reference, lr=module.lr, foreach=False).step()
    for param, name in zip(reference, names):
        torch.testing.assert_close(record.after[name], param.detach(), rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------- weight average
def test_weight_average_is_averaged_models_ema_without_reading_the_device():
    """``module.actor_ema``'s average: after k updates the weights and count of torch's ``AveragedModel`` EMA,
    with no value read back from the device; a loaded state (count 0 or not) continues as torch's would."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # float and integer buffers
    reference = AveragedModel(net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    average = WeightAverage(net, 0.7)

    def train_and_update(averages) -> int:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 3))
        with HostReads() as reads:
            averages[0].update_parameters(net)
        for avg in averages[1:]:
            avg.update_parameters(net)
        return reads.count

    assert [train_and_update([average, reference]) for _ in range(4)] == [0] * 4
    for key, value in reference.state_dict().items():
        assert torch.equal(average.state_dict()[key], value), key
    assert int(average.n_averaged) == 4

    for count in (0, 4):  # a resumed run: the count comes from the checkpoint
        state = {**reference.state_dict(), "n_averaged": torch.tensor(count)}
        resumed, continued = WeightAverage(net, 0.7), AveragedModel(
            net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.7))
        resumed.load_state_dict(state)
        continued.load_state_dict(state)
        train_and_update([resumed, continued])
        for key, value in continued.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), (count, key)


# --------------------------------------------------------------------------------------- critic precision
@pytest.mark.parametrize("block", ["linear_gelu_norm", "linear_norm_gelu"])
def test_critic_q_is_float32_under_bf16_autocast(block):
    """Under bf16 autocast (trainer.precision=bf16-mixed) Q comes out in float32, near the float32 critic's even
    at |Q| ~ 50 where bfloat16's spacing is 0.25; a critic cast to bfloat16 (the acting copies) stays bfloat16."""
    torch.manual_seed(0)
    critic = CriticEnsemble(OBS, ACTION * HORIZON, num_critics=2, hidden_dims=(32, 32), block=block)
    with torch.no_grad():
        critic.out.bias.fill_(50.0)
    obs, actions = torch.randn(64, OBS), torch.rand(64, ACTION * HORIZON) * 2 - 1
    exact = critic(obs, actions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = critic(obs, actions)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.0, atol=0.05)
    half = critic.to(torch.bfloat16)(obs.bfloat16(), actions.bfloat16())
    assert half.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- host reads between logging steps
class ReadsPerUpdate(L.Callback):
    """Values read back from the device from one batch's start to the next's (the update and Lightning's batch end),
    and each update's loss (a copy: reading it would count)."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.losses: list[torch.Tensor] = []
        self._reads: HostReads | None = None

    def _close(self) -> None:
        if self._reads is not None:
            self._reads.__exit__(None, None, None)
            self.counts.append(self._reads.count)
            self._reads = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._close()
        self._reads = HostReads()
        self._reads.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(module._update_loss.clone())

    def on_train_end(self, trainer, module) -> None:
        self._close()


def test_updates_between_logging_steps_read_nothing_back_and_the_bar_shows_the_logged_loss(caplog):
    """As on a GPU (losses checked at logging steps), an update between two logging steps, weight average and
    Lightning's batch end included, reads no value back from the device (each read is a GPU sync). The progress
    bar and the progress lines show the loss of the last logged update."""
    from manip.run import ProgressBar, ProgressLines

    module = _module(actor_ema=0.9)
    module.check_losses_every_update = False
    record, lines = ReadsPerUpdate(), ProgressLines(every_s=0.0)
    trainer = _trainer(8, log_every_n_steps=3, callbacks=[record, lines], enable_progress_bar=True)
    trainer.fit(module, _batches(8))
    logging_steps = [3, 6]
    assert [step for step, count in enumerate(record.counts, start=1) if count] == logging_steps
    assert not trainer.progress_bar_metrics  # nothing Lightning would read back after every batch
    logged = float(record.losses[logging_steps[-1] - 1])
    assert module.progress_loss == pytest.approx(logged, rel=1e-6) != float(record.losses[-1])
    assert ProgressBar().get_metrics(trainer, module)["loss"] == module.progress_loss
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 8/8 ")]
    assert len(shown) == 1 and f", loss {module.progress_loss:.3g}," in shown[0], shown


# ------------------------------------------------------------------------------------ compiled alpha schedule
_GRAPHS: list[str] = []


def _count_graph(gm: torch.fx.GraphModule, example_inputs):
    """A torch.compile backend that counts the graphs it compiles and runs each as traced."""
    _GRAPHS.append(gm.code)
    return gm.forward


def _count_graphs_afresh() -> None:
    """Forgets the graphs compiled so far (Dynamo's and the count); ``manip_test_graph_counter`` counts them."""
    torch._dynamo.reset()
    _GRAPHS.clear()
    if "manip_test_graph_counter" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_count_graph, name="manip_test_graph_counter")


@pytest.mark.parametrize("q_scale", ["none", "mean_abs"])
def test_alpha_schedule_does_not_recompile_the_actor_loss(q_scale):
    """``finetune.alpha_final`` with ``module.compile``: alpha changes with every env step, and the compiled actor
    loss, compiled once, uses each update's alpha (the eager loss's)."""
    _count_graphs_afresh()
    online = {"target": "som", "target_samples": 4, "alpha": 10.0, "alpha_final": 0.0, "alpha_steps": 100,
              "q_scale": q_scale, "bc_weight": 0.0}
    fast, eager = _module(online=online, compile="manip_test_graph_counter"), _module(online=online)
    batch = random_chunk_batch(8, OBS, ACTION, HORIZON, seed=1)
    graphs = []
    for env_steps in (10, 20, 30, 40):
        fast.env_steps = eager.env_steps = env_steps
        results = [module.losses(batch, torch.Generator().manual_seed(0)) for module in (fast, eager)]
        graphs.append(len(_GRAPHS))
        (actor_fast, _, info_fast), (actor_eager, _, info_eager) = results
        torch.testing.assert_close(actor_fast, actor_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(info_fast["target_alpha"], info_eager["target_alpha"])
        if q_scale == "none":
            assert float(info_fast["target_alpha"]) == pytest.approx(10.0 * (1 - env_steps / 100))
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 3, graphs


# ------------------------------------------------------------------------------------------ compiled acting
def test_compiled_acting_compiles_one_graph_per_power_of_two_batch():
    """With ``module.compile``, acting on 3, 4, 5, ..., 8 states (envs whose chunk ran out) compiles for 4 and 8
    states only, and acts as the uncompiled module does with the same noise stream."""
    _count_graphs_afresh()
    fast, eager = _module(compile="manip_test_graph_counter", actor_ema=0.5), _module(actor_ema=0.5)
    obs = torch.randn(8, OBS).numpy()
    graphs = []
    for batch in range(3, 9):
        acted = [module.predict_chunks(obs[:batch], generator=torch.Generator().manual_seed(batch))
                 for module in (fast, eager)]
        graphs.append(len(_GRAPHS))
        torch.testing.assert_close(torch.from_numpy(acted[0]), torch.from_numpy(acted[1]), rtol=1e-5, atol=1e-6)
    assert graphs[0] > 0 and graphs[1] == graphs[0] < graphs[2] == graphs[-1], graphs
