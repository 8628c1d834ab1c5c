"""``manip.export``: a checkpoint's acting policy as a PyTorch-only program, checked against the checkpoint itself."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

import manip
from manip.checkpoint import CheckpointError, load_checkpoint, load_module
from manip.export import _metadata, export_checkpoint, load_exported, main, summary_lines

pytestmark = pytest.mark.slow

CONF = Path(manip.__file__).resolve().parent.parent / "conf"
TINY = ["trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "eval.every_n_steps=0", "eval.final_episodes=0", "data.batch_size=32", "algo.agent.hidden_dims=[32,32]",
        "data.env_horizon=10"]  # evaluation episodes are truncated after 10 steps

# Runs without manip: the program and its noise are all a robot's computer needs.
TORCH_ONLY = """
import json, sys, torch
meta = {"manip.json": ""}
policy = torch.export.load(sys.argv[1], extra_files=meta).module()
meta = json.loads(meta["manip.json"])
inputs = torch.load(sys.argv[2])
chunks = [policy(obs, noise) for obs, noise in inputs]
assert not any(name.startswith("manip") for name in sys.modules), "the program imported manip"
torch.save(chunks, sys.argv[3])
print(json.dumps(meta["noise_shape"]))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cube_single_npz) -> dict[str, Path]:
    """``last.ckpt`` of 4-update fits on cube-single: MVP with a weight average (decay 0.5, so that it differs
    from the raw weights), QC and FQL."""
    root = tmp_path_factory.mktemp("export_runs")
    commands = [["algo=mvp", "module.actor_ema=0.5", "algo.agent.num_samples=4"],
                ["algo=qc", "algo.agent.num_samples=4"], ["algo=fql"]]
    procs = [subprocess.Popen([sys.executable, "-m", "manip.fit", *args, f"run_dir={root}/{args[0][5:]}",
                               "data=ogbench", f"data.path={cube_single_npz}", *TINY], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args in commands]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"fit failed:\n{output[-3000:]}"
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("mvp", "qc", "fql")}


def _checkpoint_chunks(ckpt: Path, obs: torch.Tensor, noise: torch.Tensor, noise_scale: float,
                       raw_weights: bool = False) -> torch.Tensor:
    """What the checkpoint's module does with ``noise`` (B, C, D): obs (B, O) raw -> (B, h, A)."""
    module, _ = load_module(ckpt)
    weights = contextlib.nullcontext() if raw_weights else module.acting_weights()
    with torch.inference_mode(), weights:
        actions = module.agent.sample_actions(module.normalize(obs), noise_scale=noise_scale,
                                              noise=noise.flatten(0, 1))
    return actions.view(len(obs), module.horizon, module.action_dim)


@pytest.mark.parametrize("algo", ["mvp", "qc", "fql"])
def test_exported_program_acts_as_the_checkpoint_with_torch_alone(checkpoints, tmp_path, algo):
    """Same raw observations and noise, same chunks, at two batch sizes, in a process that never imports manip;
    MVP's program acts with the weight average, as the checkpoint does."""
    out = tmp_path / f"{algo}.pt2"
    summary = export_checkpoint(checkpoints[algo], out, noise_scale=1.0)
    meta = summary["meta"]
    candidates, horizon = (1, 1) if algo == "fql" else (4, 5)  # conf/algo/fql.yaml: FQL on single actions
    assert meta["chunk_shape"] == [horizon, 5] and meta["noise_shape"] == [candidates, horizon * 5]
    assert meta["algo"] == algo and meta["step"] == 4 and meta["obs_shape"] == [28]
    assert meta["task"] == "cube-single-singletask-task1-v0" and meta["env_spec"]["kind"] == "ogbench"
    assert summary["max_difference"] < 1e-5

    module, _ = load_module(checkpoints[algo])
    generator = torch.Generator().manual_seed(3)
    inputs = []
    for batch in (1, 3):
        obs = module.obs_mean + module.obs_scale * torch.randn(batch, 28, generator=generator)
        inputs.append((obs, torch.randn(batch, *meta["noise_shape"], generator=generator)))
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", TORCH_ONLY, str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "chunks.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    chunks = torch.load(tmp_path / "chunks.pt")
    for (obs, noise), chunk in zip(inputs, chunks):
        expected = _checkpoint_chunks(checkpoints[algo], obs, noise, 1.0)
        assert chunk.shape == (len(obs), horizon, 5)
        torch.testing.assert_close(chunk, expected, atol=1e-5, rtol=0)
    if algo == "mvp":  # the raw weights act otherwise: the program holds the average
        obs, noise = inputs[1]
        raw = _checkpoint_chunks(checkpoints[algo], obs, noise, 1.0, raw_weights=True)
        assert (chunks[1] - raw).abs().max() > 1e-3


def test_noise_scale_is_baked_in_and_zero_gives_one_candidate(checkpoints, tmp_path):
    """``noise_scale=0``: one (noise-free) candidate per state, the chunk of zero noise whatever noise comes in."""
    summary = export_checkpoint(checkpoints["mvp"], tmp_path / "p.pt2", noise_scale=0.0)
    assert summary["meta"]["noise_shape"][0] == 1 and summary["meta"]["noise_scale"] == 0.0
    policy = load_exported(tmp_path / "p.pt2")
    module, _ = load_module(checkpoints["mvp"])
    obs = module.obs_mean[None].repeat(2, 1)
    noise = torch.randn(2, 1, summary["meta"]["noise_shape"][1])
    with torch.inference_mode():
        chunk = policy.program(obs, noise)
    torch.testing.assert_close(chunk, _checkpoint_chunks(checkpoints["mvp"], obs, torch.zeros_like(noise), 0.0),
                               atol=1e-5, rtol=0)


def test_select_action_pops_a_chunk_and_refills_when_empty(checkpoints, tmp_path):
    """LeRobot's queue: h actions from one chunk, then a new chunk; ``reset`` starts a fresh one."""
    export_checkpoint(checkpoints["qc"], tmp_path / "p.pt2", noise_scale=1.0)
    policy = load_exported(tmp_path / "p.pt2", generator=torch.Generator().manual_seed(0))
    calls = []
    program = policy.program
    policy.program = lambda obs, noise: calls.append(noise) or program(obs, noise)
    obs = torch.zeros(28)
    actions = [policy.select_action(obs) for _ in range(7)]
    assert len(calls) == 2 and calls[0].shape == (1, 4, 25)
    with torch.inference_mode():
        first = program(obs[None], calls[0])[0]
    torch.testing.assert_close(torch.stack(actions[:5]), first)
    policy.reset()
    policy.select_action(obs)
    assert len(calls) == 3


def test_bfloat16_program_computes_what_the_checkpoint_does_in_bfloat16(checkpoints, tmp_path):
    """Exact against the checkpoint acting in bfloat16 (``manip.evaluate act_dtype=bfloat16``); against float32
    the share of agreeing chunks is reported, not assumed."""
    summary = export_checkpoint(checkpoints["mvp"], tmp_path / "bf16.pt2", noise_scale=1.0, act_dtype="bfloat16")
    assert summary["meta"]["act_dtype"] == "bfloat16" and summary["states"] == 64
    assert summary["max_difference"] < 1e-6 and summary["agreement"] == 1.0
    assert summary["float32_agreement"] > 0.5
    assert "(the checkpoint's networks in bfloat16: " in summary_lines(summary)


def test_mvp_sample_steps_and_the_runs_noise_scale_are_baked_in(checkpoints, tmp_path):
    summary = export_checkpoint(checkpoints["mvp"], tmp_path / "p.pt2", sample_steps=3)
    meta = summary["meta"]
    assert meta["sample_steps"] == 3 and meta["noise_scale"] == 1.0  # fit.yaml's eval.noise_scale
    assert meta["flow_steps"] is None and meta["torch_version"] == torch.__version__
    module, _ = load_module(checkpoints["mvp"])
    obs = module.obs_mean[None].repeat(2, 1)
    noise = torch.randn(2, *meta["noise_shape"])
    module.agent.sample_steps = 3
    with torch.inference_mode(), module.acting_weights():
        three = module.agent.sample_actions(module.normalize(obs), noise=noise.flatten(0, 1)).view(2, 5, 5)
    chunk = load_exported(tmp_path / "p.pt2")(obs, noise)
    torch.testing.assert_close(chunk, three, atol=1e-5, rtol=0)
    assert (chunk - _checkpoint_chunks(checkpoints["mvp"], obs, noise, 1.0)).abs().max() > 1e-4  # not one step


AOTI_CHECK = """
import sys, torch
from torch._inductor import aoti_load_package
package = aoti_load_package(sys.argv[1])
print(tuple(package(torch.zeros(1, 28), torch.zeros(1, 1, 5)).shape))
try:
    package(torch.zeros(1, 29), torch.zeros(1, 1, 5))
except Exception as exc:
    print("refused", type(exc).__name__)
"""


def test_aoti_package_matches_the_checkpoint_and_checks_its_inputs(checkpoints, tmp_path):
    """The package computes the checkpoint's chunks, carries the metadata, loads as an ExportedPolicy, and with
    ``AOTI_RUNTIME_CHECK_INPUTS=1`` takes a batch of 1 and refuses a wrong observation size."""
    summary = export_checkpoint(checkpoints["fql"], tmp_path / "p.pt2", aoti=True)
    package = tmp_path / "p.aoti.pt2"
    assert Path(summary["aoti"]) == package and package.is_file()
    assert summary["aoti_max_difference"] < 1e-4 and summary["aoti_agreement"] == 1.0
    assert summary["aoti_latency_ms"] > 0 and "float32_agreement" not in summary
    policy = load_exported(package)
    assert policy.meta == summary["meta"]
    assert policy(torch.zeros(3, 28)).shape == (3, 1, 5)
    done = subprocess.run([sys.executable, "-c", AOTI_CHECK, str(package)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["(1, 1, 5)", "refused RuntimeError"], done.stdout
    from manip.evaluate import _exported_policy  # manip.evaluate ckpt=<package> acts as the program does

    obs = torch.zeros(2, 28).numpy()
    streams = [[torch.Generator().manual_seed(3 + i) for i in range(2)] for _ in range(2)]  # the same noise
    chunks = [_exported_policy(path, None, None, None, "float32", False)[0](obs, generator=generator)
              for path, generator in zip((package, tmp_path / "p.pt2"), streams)]
    torch.testing.assert_close(torch.as_tensor(chunks[0]), torch.as_tensor(chunks[1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("obs", "message"), [
    (torch.zeros(1, 29), r"observations of shape \(1, 29\): the policy takes \(batch, 28\), batch 1 "),
    (torch.zeros(28), r"observations of shape \(28,\): the policy takes \(batch, 28\)"),
    (torch.zeros(0, 28), r"observations of shape \(0, 28\): .* batch 1 to 65536"),
])
def test_wrong_observations_are_refused_by_name(checkpoints, tmp_path, obs, message):
    export_checkpoint(checkpoints["fql"], tmp_path / "p.pt2")
    with pytest.raises(ValueError, match=message):
        load_exported(tmp_path / "p.pt2")(obs)


def test_a_file_that_is_not_an_export_is_named(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=f"{checkpoints['fql']}: not a manip.export program \\(it has no "):
        load_exported(checkpoints["fql"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: not a manip.export program \\(not a .pt2 archive\\)"):
        load_exported(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="missing.pt2: no such file"):
        load_exported(tmp_path / "missing.pt2")


def _cli(*overrides: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("export", overrides=list(overrides))
    main.__wrapped__(cfg)


def test_a_program_that_cannot_be_written_leaves_nothing(checkpoints, tmp_path):
    """A full disk (here: a file size limit smaller than the program): one line, status 1, no partial .pt2 (torch's
    archive writer, writing to the file itself, would abort the process and leave one)."""
    import resource

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "export" / "p.pt2"
    done = subprocess.run([sys.executable, "-m", "manip.export", f"ckpt={checkpoints['mvp']}", f"out={out}"],
                          capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit)
    assert (done.returncode, done.stderr) == (1, f"manip.export: cannot write {out} (File too large); nothing is "
                                                 f"left there\n"), done.stderr[-2000:]
    assert list(out.parent.iterdir()) == []


def test_cli_writes_next_to_the_run_and_prints_the_check(checkpoints, capsys):
    """The default path is ``<run>/export/last.pt2``; a second export goes to ``last.1.pt2``, keeping the first."""
    export = checkpoints["fql"].parents[1] / "export"
    for name in ("last.pt2", "last.1.pt2"):
        _cli(f"ckpt={checkpoints['fql']}")
        printed = capsys.readouterr().out
        assert f"-> {export / name}" in printed and "largest chunk difference 0.0e+00" in printed
        assert load_exported(export / name).meta["step"] == 4


@pytest.mark.parametrize(("overrides", "message"), [
    (["sample_steps=2"], "sample_steps=2: qc checkpoints have no mean-velocity sampler (MVP only)"),
    (["noise_scale=-1"], "noise_scale must be >= 0, got -1"),
    (["act_dtype=float16"], "act_dtype='float16': expected one of float32, bfloat16"),
    (["+num_sample=3"], "unknown num_sample; did you mean num_samples?"),
    (["aoti=maybe"], "aoti must be true or false, got 'maybe'"),
    (["max_autotune=nope"], "max_autotune must be true or false, got 'nope'"),
    (["threads=abc"], "threads must be an integer >= 1 or null (torch's default), got 'abc'"),
    (["out={tmp}/p.json"], "out={tmp}/p.json: the program is a .pt2 file; name it <name>.pt2"),
    (["out={tmp}/kept.pt2"], "out={tmp}/kept.pt2 exists and is kept; name a new file"),
    (["aoti=true"], "{tmp}/p.aoti.pt2 exists and is kept; name a new file for the program (out=...)"),
])
def test_cli_refuses_bad_settings_in_one_line(checkpoints, tmp_path, overrides, message):
    """Nothing is written, and no file is replaced."""
    (tmp_path / "kept.pt2").write_text("kept")
    (tmp_path / "p.aoti.pt2").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        _cli(f"ckpt={checkpoints['qc']}", f"out={tmp_path / 'p.pt2'}", *[o.format(tmp=tmp_path) for o in overrides])
    assert exit_info.value.code.startswith(f"manip.export: {message.format(tmp=tmp_path)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt2", "p.aoti.pt2"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"kept"}


def test_files_that_appear_while_exporting_are_kept(checkpoints, tmp_path, monkeypatch, caplog):
    """A program or package written at ``out`` after the command's checks is kept: the export takes the next free
    name and says so. A package that fails to compile leaves no file behind, and the error names the program."""
    import manip.export as export

    out, package = tmp_path / "p.pt2", tmp_path / "p.1.aoti.pt2"  # the package of p.1.pt2, where out is taken
    metadata = export._metadata

    def another_writer(*args, **kwargs):  # runs after the checks, before anything is saved
        out.write_text("kept")
        package.write_text("kept")
        return metadata(*args, **kwargs)

    def failing_compiler(*args, **kwargs):
        assert Path(kwargs["package_path"]).is_file()  # the package's name is reserved while it compiles
        raise RuntimeError("no C++ compiler. More detail")

    monkeypatch.setattr(export, "_metadata", another_writer)
    monkeypatch.setattr("torch._inductor.aoti_compile_and_package", failing_compiler)
    with caplog.at_level("WARNING", logger="manip"), pytest.raises(export.ExportError) as info:
        export_checkpoint(checkpoints["fql"], out, check_states=2, aoti=True)
    written = tmp_path / "p.1.pt2"
    assert str(info.value) == (f"AOTInductor could not compile p.1.aoti.1.pt2 (RuntimeError: no C++ compiler); the "
                               f"program {written} is written and needs no compiler")
    assert out.read_text() == "kept" and package.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.1.aoti.pt2", "p.1.pt2", "p.pt2"]
    assert f"{out} appeared while the command ran and is kept; writing {written} instead" in caplog.messages
    assert f"{package} appeared while the command ran and is kept; writing {tmp_path / 'p.1.aoti.1.pt2'} instead" \
        in caplog.messages
    assert load_exported(written)(torch.zeros(1, 28)).shape == (1, 1, 5)


def test_finetune_and_export_name_the_checkpoint_of_an_exported_program(checkpoints, tmp_path):
    """An exported program is not a checkpoint: the command names the one it came from."""
    out = tmp_path / "p.pt2"
    export_checkpoint(checkpoints["fql"], out, check_states=2)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(out)
    assert str(info.value) == (f"{out} is a program python -m manip.export wrote, not a checkpoint; pass the "
                               f"checkpoint it was exported from, ckpt={Path(checkpoints['fql']).resolve()}")


def test_readme_snippet_runs_on_an_export(checkpoints, tmp_path):
    """The README's Python lines under "Deploying a policy", on a real export, in a process without manip."""
    import re

    readme = (CONF.parent / "README.md").read_text()
    section = readme[readme.index("### Deploying a policy"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = tmp_path / "p.pt2"
    export_checkpoint(checkpoints["mvp"], out)
    snippet = snippet.replace("runs/lift/export/last.pt2", str(out))
    check = ("\nassert chunk.shape == (1, *meta['chunk_shape'])"
             "\nassert not any(m.startswith('manip') for m in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", "import sys\n" + snippet + check], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_evaluating_an_export_draws_the_checkpoints_noise_stream(checkpoints, tmp_path):
    """``manip.evaluate ckpt=<export>``'s policy gives, call after call, the chunks the checkpoint gives from the same
    per-episode noise streams: an exported program and its checkpoint act alike episode by episode."""
    from manip.evaluate import _exported_policy

    export_checkpoint(checkpoints["mvp"], tmp_path / "p.pt2", noise_scale=1.0)
    predict, spec, dims, info = _exported_policy(tmp_path / "p.pt2", None, None, None, "float32", False)
    module, cfg = load_module(checkpoints["mvp"])
    assert spec.kind == "ogbench" and dims == (28, 5)
    assert info["exported_from"] == str(checkpoints["mvp"])
    observations = module.obs_mean + module.obs_scale * torch.randn(3, 2, 28, generator=torch.Generator().manual_seed(1))
    streams = [[torch.Generator().manual_seed(7 + i) for i in range(2)] for _ in range(2)]  # export's, checkpoint's
    for obs in observations.numpy():
        exported = predict(obs, generator=streams[0])
        reference = module.predict_chunks(obs, noise_scale=1.0, generator=streams[1])
        torch.testing.assert_close(torch.as_tensor(exported), torch.as_tensor(reference), atol=1e-5, rtol=0)
        assert not torch.allclose(torch.as_tensor(exported[0]), torch.as_tensor(exported[1]))


def _evaluate_cli(*overrides: str) -> None:
    from manip.evaluate import main as evaluate_main

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    evaluate_main.__wrapped__(cfg)


def test_evaluate_cli_runs_an_export_in_its_simulator(checkpoints, tmp_path, capsys):
    export = checkpoints["qc"].parents[1] / "export" / "evaluated.pt2"
    export_checkpoint(checkpoints["qc"], export, noise_scale=1.0)
    _evaluate_cli(f"ckpt={export}", "episodes=2", "num_envs=2")
    out = checkpoints["qc"].parents[1] / "eval" / "evaluated.export.json"
    result = json.loads(out.read_text())
    assert result["episodes"] == 2 and len(result["lengths"]) == 2 and all(1 <= n <= 10 for n in result["lengths"])
    assert result["algo"] == "qc" and result["step"] == 4 and result["num_samples"] == 4
    assert result["exported_from"] == str(checkpoints["qc"]) and result["ckpt"] == str(export)
    assert f"-> {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _evaluate_cli(f"ckpt={export}", "episodes=2", "noise_scale=0.5", f"out={tmp_path / 'r.json'}")
    assert exit_info.value.code.startswith(f"manip.evaluate: noise_scale=0.5: {export} is an exported program")
    with pytest.raises(SystemExit) as exit_info:
        _evaluate_cli(f"ckpt={export}", "act_compile=true")
    assert exit_info.value.code.startswith(f"manip.evaluate: act_compile=true: {export} is an exported program "
                                           f"(python -m manip.export ... aoti=true")
    (tmp_path / "broken.pt2").write_bytes(export.read_bytes()[:5000])  # a .pt2 cut short
    for bad, message in ((tmp_path / "missing.pt2", "no such file"), (tmp_path / "broken.pt2", "not a")):
        with pytest.raises(SystemExit) as exit_info:
            _evaluate_cli(f"ckpt={bad}", "num_samples=2")
        assert exit_info.value.code.startswith(f"manip.evaluate: {bad}: {message}"), exit_info.value.code
        assert "\n" not in exit_info.value.code


def test_default_outputs_stay_beside_a_file_kept_outside_a_run_directory(tmp_path):
    """A run's checkpoint exports to ``<run>/export/`` and evaluates into ``<run>/eval/``; a checkpoint or program
    kept elsewhere gets those folders beside it (not two directories up)."""
    from manip import evaluate, export

    run, models = tmp_path / "run", tmp_path / "models"
    assert export.default_output(run / "checkpoints" / "last.ckpt") == run / "export" / "last.pt2"
    assert evaluate.default_output(run / "checkpoints" / "last.ckpt") == run / "eval" / "last.json"
    assert evaluate.default_output(run / "export" / "last.pt2") == run / "eval" / "last.export.json"
    assert export.default_output(models / "lift.ckpt") == models / "export" / "lift.pt2"
    assert evaluate.default_output(models / "lift.ckpt") == models / "eval" / "lift.json"
    assert evaluate.default_output(models / "policy.aoti.pt2") == models / "eval" / "policy.aoti.export.json"


def test_metadata_records_the_observation_layout_and_sampling_settings():
    """What a robot's code reads: the raw keys and their widths in order, and the sampling settings baked in."""
    dims = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
    program = SimpleNamespace(obs_mean=torch.zeros(19), noise_shape=(8, 35), horizon=5, action_dim=7, num_samples=8,
                              noise_scale=0.5, agent=SimpleNamespace(sample_steps=2))
    cfg = {"algo": {"name": "mvp"}, "env_spec": {"kind": "robosuite", "kwargs": {}},
           "data_info": {"obs_keys": list(dims), "obs_key_dims": dims, "env_name": "Lift", "path": "/d/lift.hdf5"}}
    meta = _metadata(program, cfg, "/r/last.ckpt", 7, "float32")
    assert meta["obs_keys"] == list(dims) and meta["obs_key_dims"] == dims and meta["obs_shape"] == [19]
    assert (meta["num_samples"], meta["noise_scale"], meta["sample_steps"], meta["step"]) == (8, 0.5, 2, 7)
    assert meta["noise_shape"] == [8, 35] and meta["chunk_shape"] == [5, 7] and meta["trained_on"] == "/d/lift.hdf5"


def test_num_samples_override_is_baked_in(checkpoints, tmp_path):
    """num_samples=2 on a checkpoint trained with N=4: two candidates per state, in the program and its metadata."""
    summary = export_checkpoint(checkpoints["qc"], tmp_path / "p.pt2", num_samples=2, noise_scale=1.0)
    assert summary["meta"]["num_samples"] == 2 and summary["meta"]["noise_shape"][0] == 2
    assert summary["max_difference"] < 1e-5
    policy = load_exported(tmp_path / "p.pt2", generator=torch.Generator().manual_seed(0))
    assert policy(torch.zeros(3, 28)).shape == (3, 5, 5)
