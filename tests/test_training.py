"""The update's pieces (manip.algos.training): ``module.compile`` compiles both losses, which then equal the eager
ones and draw the same noise; the fused optimizer steps as torch's reference Adam does; the module standardises
observations (both of a batch's, a constant dimension centred, none with ``obs_norm=none``) and applies
``noise_scale`` when acting."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from manip.algos import MVPAgent
from manip.algos.training import COMPILE_MODES, compiled, make_optimizer
from manip.data.replay import random_chunk_batch
from manip.module import ManipModule

OBS, ACTION, HORIZON = 5, 2, 3


def _module(compile):
    torch.manual_seed(0)
    agent = partial(MVPAgent, hidden_dims=(32, 32), num_samples=4)
    stats = {"obs_mean": [0.1] * OBS, "obs_std": [2.0] * OBS}
    return ManipModule(agent, obs_dim=OBS, action_dim=ACTION, horizon=HORIZON, stats=stats, compile=compile)


def _gradients(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_compiled_losses_equal_eager_ones_with_the_same_noise():
    """Inductor-compiled actor (JVP) and critic (best-of-N TD target) losses of ``module.compile=true`` give the
    eager module's losses and gradients, and leave the noise stream where the eager losses leave it."""
    eager, fast = _module(False), _module(True)
    fast.load_state_dict(eager.state_dict())
    batch = random_chunk_batch(16, OBS, ACTION, HORIZON, seed=3)
    for seed in (0, 1):  # the second call runs the compiled graphs without compiling
        streams = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        results = []
        for module, stream in zip((eager, fast), streams):
            module.zero_grad(set_to_none=True)
            actor_loss, critic_loss, info = module.losses(batch, stream)
            (actor_loss + critic_loss).backward()
            results.append((actor_loss, critic_loss, info, _gradients(module)))
        (a_eager, c_eager, info_eager, g_eager), (a_fast, c_fast, info_fast, g_fast) = results
        torch.testing.assert_close(a_fast, a_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_fast, c_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(info_fast["critic/target_mean"], info_eager["critic/target_mean"])
        assert g_fast.keys() == g_eager.keys() and any("critic" in name for name in g_eager)
        for name in g_eager:
            torch.testing.assert_close(g_fast[name], g_eager[name], rtol=1e-3, atol=1e-5, msg=name)
        assert torch.equal(streams[0].get_state(), streams[1].get_state())


_RECORDED_GRAPHS: list[str] = []


def _record_graph(gm: torch.fx.GraphModule, example_inputs):
    """A torch.compile backend that keeps each graph's code and runs the graph as traced."""
    _RECORDED_GRAPHS.append(gm.code)
    return gm.forward


def test_module_compile_reaches_both_losses_and_acting():
    """A recording backend sees a graph of the actor loss (the JVP's network), of the critic loss and of
    acting."""
    torch._dynamo.reset()
    if "manip_test_recorder" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_record_graph, name="manip_test_recorder")
    graphs = _RECORDED_GRAPHS
    graphs.clear()
    module = _module("manip_test_recorder")
    batch = random_chunk_batch(8, OBS, ACTION, HORIZON)
    module.losses(batch, torch.Generator().manual_seed(0))
    assert any("jvp" in code or "_make_dual" in code for code in graphs), "no graph of the actor loss's JVP"
    # MVP's offline actor loss never calls the critic, whose hidden layers alone have a LayerNorm
    assert any("layer_norm" in code for code in graphs), "no graph of the critic loss"
    before = len(graphs)
    module.predict_chunks(torch.zeros(2, OBS), noise_scale=1.0)
    assert len(graphs) > before, "acting was not compiled"


def test_compiled_passes_modes_and_backends_and_leaves_false_alone():
    def fn(x):
        return x + 1

    assert compiled(fn, False) is fn and compiled(fn, None) is fn
    for setting in (True, *COMPILE_MODES, "aot_eager"):
        assert compiled(fn, setting)(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_fused_optimizer_steps_as_the_reference_adam():
    """``make_optimizer``: two named groups, fused on a CPU, and after five steps the same parameters as torch's
    single-tensor Adam (to rounding)."""
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    reference = [p.detach().clone().requires_grad_() for p in (*actor.parameters(), *critic.parameters())]
    optimizer = make_optimizer(actor.parameters(), critic.parameters(), lr=1e-2)
    assert [g["name"] for g in optimizer.param_groups] == ["actor", "critic"]
    assert all(g["fused"] for g in optimizer.param_groups)
    plain = torch.optim.Adam(reference, lr=1e-2, foreach=False)
    params = [*actor.parameters(), *critic.parameters()]
    initial = [p.detach().clone() for p in params]
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, r, g in zip(params, reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.step()
        plain.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial))


def test_logged_rows_hold_their_own_update_and_a_stop_writes_a_fresh_row(tmp_path):
    """Values are logged only at the updates whose row Lightning writes (every ``log_every_n_steps``, and at a stop
    decided by a callback in that update), and each row holds that update's own losses, not an earlier update's."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    module = _module(False)
    batches = [random_chunk_batch(8, OBS, ACTION, HORIZON, seed=i) for i in range(20)]
    seen: dict[int, float] = {}

    class RecordAndStop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = float(pl_module._update_loss)  # actor + critic loss of this update
            if trainer.global_step == 5:
                trainer.should_stop = True

    trainer = L.Trainer(max_steps=20, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="", version=""),
                        callbacks=[RecordAndStop()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/actor_loss")]
    assert [int(float(row["step"])) for row in rows] == [3, 5]
    for row in rows:
        total = float(row["train/actor_loss"]) + float(row["train/critic_loss"])
        assert total == pytest.approx(seen[int(float(row["step"]))], rel=1e-5)
    assert seen[5] != seen[3] and len(seen) == 5
    assert module.progress_loss == pytest.approx(seen[5], rel=1e-6)  # the progress bar's figure


def test_a_failing_compiler_is_one_line_and_the_command_it_names_trains(cube_single_npz, tmp_path):
    """``module.compile=true`` where inductor finds no C++ compiler: the first update fails with one line naming the
    setting, no traceback and no checkpoint; the command the line names (``module.compile=false``) trains."""
    import subprocess
    import sys

    from entry_points import SUBPROCESS_ENV

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "manip.fit", "conf=ogbench_cube_single", f"data.path={cube_single_npz}",
               "trainer.max_steps=3", "eval.every_n_steps=0", "eval.final_episodes=1", "algo.agent.hidden_dims=[16,16]",
               "data.batch_size=8", "trainer.enable_progress_bar=false", f"run_dir={run_dir}"]
    no_compiler = {**SUBPROCESS_ENV, "CXX": str(tmp_path / "nowhere" / "g++"),
                   "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    failed = subprocess.run([*command, "module.compile=true"], env=no_compiler, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("manip.fit: module.compile: the compiler failed on this machine (InvalidCxxCompiler: ")
    assert line.endswith("; the same command with module.compile=false trains without it")
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    trained = subprocess.run([*command, "module.compile=false"], env=no_compiler, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_losses_standardise_both_observations_of_the_batch():
    """The critic's TD target sees s' standardised as s is (the dataset's obs_mean / obs_std)."""
    stats = {"obs_mean": [5.0] * OBS, "obs_std": [2.0] * OBS}
    module = ManipModule(partial(MVPAgent, hidden_dims=(32, 32), num_samples=4), obs_dim=OBS, action_dim=ACTION,
                         horizon=HORIZON, stats=stats)
    seen = {}
    real = module.agent.critic_loss

    def spy(batch, generator=None):
        seen.update(batch)
        return real(batch, generator)

    module._critic_loss_fn = spy
    batch = random_chunk_batch(16, OBS, ACTION, HORIZON)
    module.losses(batch, torch.Generator().manual_seed(0))
    for key in ("observations", "next_observations"):
        torch.testing.assert_close(seen[key], (batch[key] - 5.0) / 2.0)


def test_obs_norm_none_acts_on_raw_observations():
    stats = {"obs_mean": [5.0] * OBS, "obs_std": [2.0] * OBS}
    agent = partial(MVPAgent, hidden_dims=(32, 32))
    obs = torch.randn(4, OBS)
    raw = ManipModule(agent, obs_dim=OBS, action_dim=ACTION, horizon=HORIZON, stats=stats, obs_norm="none")
    torch.testing.assert_close(raw.normalize(obs), obs)
    standard = ManipModule(agent, obs_dim=OBS, action_dim=ACTION, horizon=HORIZON, stats=stats)
    torch.testing.assert_close(standard.normalize(obs), (obs - 5.0) / 2.0)


def test_predict_chunks_applies_noise_scale():
    """noise_scale=0: the noise-free chunk whatever the noise streams; 1: the streams matter."""
    module = _module(False)
    obs = np.zeros((2, OBS), np.float32)

    def draw(scale: float, seed: int) -> np.ndarray:
        streams = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return module.predict_chunks(obs, noise_scale=scale, generator=streams)

    np.testing.assert_array_equal(draw(0.0, 0), draw(0.0, 100))
    assert not np.array_equal(draw(1.0, 0), draw(1.0, 100))


def test_constant_observation_dimensions_pass_through_centred():
    """A dimension with zero std in the data (a fixed object, a gripper never used) is centred, not divided by 0."""
    stats = {"obs_mean": [1.0, 2.0, 3.0], "obs_std": [0.5, 0.0, 1e-9]}
    module = ManipModule(partial(MVPAgent, hidden_dims=(8,)), obs_dim=3, action_dim=2, horizon=1, stats=stats)
    out = module.normalize(torch.tensor([[2.0, 2.5, 3.0], [1.0, 2.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.0, 1.0]]))
