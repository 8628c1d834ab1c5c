"""The notebooks run end to end (nbclient) on tiny real runs and a quick benchmark and write their figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

from manip import plots
from manip.evaluation import wilson_interval

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TINY = ["trainer.max_steps=6", "eval.every_n_steps=3", "eval.episodes=2", "eval.final_episodes=2",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
QUICK_BENCH = ["--hidden", "32", "32", "--batch-size", "32", "--act-calls", "5", "--actor-calls", "2",
               "--update-warmup", "1", "--min-update-iters", "2", "--update-seconds", "0.1", "--fast-act"]


def _finish(proc: subprocess.Popen, what: str) -> None:
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, f"{what} failed:\n{output[-3000:]}"


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, cube_single_npz) -> dict[str, Path]:
    """Runs: MVP and QC offline on cube-single (seeds 0 and 1), both MVP runs fine-tuned (best-of-N
    target); plus a quick ``manip.bench`` JSON."""
    root = tmp_path_factory.mktemp("notebook_runs")
    runs, bench = root / "runs", root / "bench.json"
    data = ["data=ogbench", f"data.path={cube_single_npz}", "data.env_horizon=10", "data.batch_size=32",
            "algo.agent.hidden_dims=[32,32]", "algo.agent.num_samples=4"]
    fit = _start(["manip.fit", "--multirun", *data, *TINY, "algo=mvp,qc", "seed=0,1",
                  f"run_dir={runs}/${{algo.name}}_${{seed}}", f"hydra.sweep.dir={root}/sweep_fit"], root)
    benchmark = _start(["manip.bench", "--out", str(bench), *QUICK_BENCH], root)
    _finish(fit, "fit")
    ckpts = ",".join(str(runs / f"mvp_{seed}" / "checkpoints" / "last.ckpt") for seed in (0, 1))
    finetune = _start(["manip.finetune", "--multirun", f"ckpt={ckpts}", *TINY, "finetune.start_training=10",
                       "finetune.target_samples=4", f"hydra.sweep.dir={root}/sweep_finetune"], root)
    _finish(benchmark, "bench")
    _finish(finetune, "finetune")
    return {"runs": runs, "bench": bench}


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _text_outputs(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _check_figures(figures: Path, names: set[str]) -> None:
    assert {path.name for path in figures.iterdir()} == names
    for name in names:
        path = figures / name
        assert path.stat().st_size > 5000, name
        image = iio.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 10, name


@pytest.mark.parametrize("name", ["success_rates.ipynb", "speed.ipynb"])
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_success_rates_notebook(artifacts, tmp_path, monkeypatch):
    """Relative paths are read from the directory the command started in ($PWD), not the kernel's folder."""
    launch = artifacts["runs"].parent
    figures = launch / "figures"
    monkeypatch.setenv("PWD", str(launch))
    monkeypatch.setenv("MANIP_RUNS", "runs")
    monkeypatch.setenv("MANIP_FIGURES", "figures")
    text = _text_outputs(_execute("success_rates.ipynb", tmp_path))
    _check_figures(figures, {"success_cube-single-task1.png", "table1_comparison.png"})
    assert "mvp (bon)" in text and "qc" in text


def test_speed_notebook(artifacts, tmp_path, monkeypatch):
    figures = tmp_path / "figures"  # absolute paths are used as they are
    monkeypatch.setenv("MANIP_BENCH", str(artifacts["bench"]))
    monkeypatch.setenv("MANIP_FIGURES", str(figures))
    text = _text_outputs(_execute("speed.ipynb", tmp_path))
    _check_figures(figures, {"speed_act_ms.png", "speed_update_its.png", "speed_jvp_overhead.png",
                             "speed_peak_mem_mb.png"})
    assert "mvp_act_speedup_vs_qc" in text and "mvp_fast_act_speedup_vs_qc" in text


def test_runs_and_curves(artifacts):
    runs = plots.find_runs(artifacts["runs"])
    assert sorted(runs["label"]) == ["mvp", "mvp", "mvp (bon)", "mvp (bon)", "qc", "qc"]
    online = runs[runs["target"].notna()].set_index("seed")
    assert online.loc[0, "parent"] == str(artifacts["runs"] / "mvp_0") and online.loc[0, "start_step"] == 6
    curves = plots.load_curves(runs)
    assert set(curves["label"]) == {"mvp (bon)", "qc"}  # fine-tuned offline runs live on in their fine-tuning curve
    mvp = curves[(curves["label"] == "mvp (bon)") & (curves["seed"] == 0)]
    assert mvp["step"].tolist() == [3, 6, 9, 12]
    assert mvp["phase"].tolist() == ["offline", "offline", "online", "online"]
    summary = plots.aggregate(curves)
    assert set(summary["seeds"]) == {2} and (summary["low"] <= summary["mean"]).all()
    assert (summary["mean"] <= summary["high"]).all()


def _synthetic_curves(task: str, algo: str, label: str, finals: list[float]) -> pd.DataFrame:
    rows = []
    for seed, final in enumerate(finals):
        for step, phase, rate in [(100, "offline", 0.1), (200, "offline", 0.3), (300, "online", final)]:
            low, high = wilson_interval(rate * 50, 50)
            rows.append({"task": task, "algo": algo, "label": label, "seed": seed, "run_dir": f"{label}-{seed}", "step": step,
                         "env_steps": 0, "phase": phase, "success_rate": rate, "ci_low": low, "ci_high": high,
                         "episodes": 50})
    return pd.DataFrame(rows)


def test_comparison_table_lines_up_with_table1():
    curves = pd.concat([_synthetic_curves("cube-triple-task4", "mvp", "mvp (som)", [0.5, 0.6]),
                        _synthetic_curves("cube-triple-task4", "qc_fql", "qc_fql", [0.2]),
                        _synthetic_curves("cube-double-task2", "fql", "fql", [0.9])])
    table = plots.comparison_table(curves).set_index(["task", "label"])
    mvp = table.loc[("cube-triple-task4", "mvp (som)")]
    assert (mvp["seeds"], mvp["offline"], mvp["final"]) == (2, pytest.approx(0.3), pytest.approx(0.55))
    assert (mvp["paper"], mvp["paper_std"], mvp["ours"], mvp["paper_text"]) == (0.52, 0.11, "0.55 ± 0.07",
                                                                                   "0.52 ± 0.11")
    assert table.loc[("cube-triple-task4", "qc_fql"), "paper_text"] == "n/a"
    assert table.loc[("cube-double-task2", "fql"), "paper_text"] == "0.97 (inferred)"
    summary = plots.aggregate(curves)
    single = summary[(summary["label"] == "qc_fql") & (summary["step"] == 300)].iloc[0]
    assert (single["low"], single["high"]) == pytest.approx(wilson_interval(10, 50))  # one seed: Wilson band


def test_band_over_seeds_keeps_the_uncertainty_of_their_episodes():
    """Seeds that agree leave the bootstrap over seeds with zero width; the pooled episodes' Wilson interval
    keeps the band honest. Seeds far apart are governed by the bootstrap."""
    agree = plots.aggregate(_synthetic_curves("lift", "mvp", "mvp", [1.0, 1.0]))
    final = agree[agree["step"] == 300].iloc[0]
    assert plots.bootstrap_interval(np.array([1.0, 1.0])) == (1.0, 1.0)
    assert (final["low"], final["high"]) == pytest.approx(wilson_interval(100, 100)) and final["low"] < 0.97
    apart = plots.aggregate(_synthetic_curves("lift", "mvp", "mvp", [0.2, 0.9, 0.6]))
    final = apart[apart["step"] == 300].iloc[0]
    assert (final["low"], final["high"]) == pytest.approx(plots.bootstrap_interval(np.array([0.2, 0.9, 0.6])))


def test_bootstrap_interval_brackets_the_mean():
    values = np.array([0.2, 0.4, 0.9])
    low, high = plots.bootstrap_interval(values)
    assert values.min() <= low < values.mean() < high <= values.max()
    assert plots.bootstrap_interval(np.array([0.5, 0.5])) == (0.5, 0.5)


def _write_run(run_dir: Path, algo: str, seed: int, logger: dict | None = None, **agent) -> None:
    """A run directory as ``manip.fit`` leaves it: ``offline/hparams.yaml`` (``cfg``) and ``eval.jsonl``."""
    from omegaconf import OmegaConf

    cfg = {"seed": seed, "run_dir": str(run_dir), "data": {"task": "lift", "seed": seed, "path": f"/data/{seed}.hdf5"},
           "data_info": {"source": "robomimic", "path": f"/data/{seed}.hdf5"},
           "algo": {"name": algo, "agent": {"hidden_dims": [256, 256], **agent}},
           "module": {"seed": seed, "compile": bool(seed)}, "trainer": {"accelerator": ["cpu", "gpu"][seed % 2]},
           "eval": {"episodes": 20 + seed, "noise_scale": 0.0}, "logger": logger or {}}
    (run_dir / "offline").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"cfg": cfg}), run_dir / "offline" / "hparams.yaml")
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": 10, "env_steps": 0, "phase": "offline",
                                                    "success_rate": 0.5, "ci_low": 0.3, "ci_high": 0.7,
                                                    "episodes": 20}) + "\n")


def test_runs_that_differ_in_a_setting_are_not_seeds_of_one_method(tmp_path):
    _write_run(tmp_path / "a", "mvp", 0, adaptive_p=None)
    _write_run(tmp_path / "b", "mvp", 1, adaptive_p=None)
    _write_run(tmp_path / "c", "mvp", 0, adaptive_p=0.5)
    _write_run(tmp_path / "d", "qc", 0)
    # seeds, paths, evaluation schedules, loggers and hardware differ: still one method
    _write_run(tmp_path / "e", "qc", 1, logger={"wandb": {"_target_": "WandbLogger", "project": "manip"}})
    _write_run(tmp_path / "f", "fql", 0, hidden_dims=[512, 512])
    _write_run(tmp_path / "g", "fql", 0)
    _write_run(tmp_path / "h", "mvp", 1, adaptive_p=None)  # seed 1 again: a second run, not a third seed
    runs = plots.find_runs(tmp_path)
    labels = dict(zip(runs["run_dir"].map(lambda path: Path(path).name), runs["label"]))
    assert labels == {"a": "mvp [adaptive_p=None]", "b": "mvp [adaptive_p=None]", "c": "mvp [adaptive_p=0.5]",
                      "d": "qc", "e": "qc", "f": "fql [hidden_dims=[512,512]]", "g": "fql [hidden_dims=[256,256]]",
                      "h": "mvp [adaptive_p=None]"}
    summary = plots.aggregate(plots.load_curves(runs)).set_index("label")
    assert (summary.loc["mvp [adaptive_p=None]", "runs"], summary.loc["mvp [adaptive_p=None]", "seeds"]) == (3, 2)
    assert plots._count_text(3, 2) == "3 runs, 2 seeds" and plots._count_text(1, 1) == "1 seed"


def test_setting_names_are_the_shortest_unambiguous_key_suffix():
    keys = ["algo.agent.adaptive_p", "finetune.p", "module.lr", "algo.agent.lr"]
    assert plots._short_keys(keys) == {"algo.agent.adaptive_p": "adaptive_p", "finetune.p": "p",
                                       "module.lr": "module.lr", "algo.agent.lr": "agent.lr"}


def test_final_success_is_compared_at_the_last_step_every_run_reached():
    curves = _synthetic_curves("lift", "mvp", "mvp", [0.6, 0.2])
    curves = curves[~((curves["seed"] == 1) & (curves["step"] == 300))]  # seed 1 stopped after step 200
    row = plots.comparison_table(curves).iloc[0]
    assert (row["last_step"], row["final"]) == (200, pytest.approx(0.3))  # both seeds at step 200, not 0.6 and 0.3


def test_broken_run_directories_are_skipped_with_a_warning(tmp_path):
    _write_run(tmp_path / "good", "mvp", 0)
    _write_run(tmp_path / "killed", "mvp", 1)
    with open(tmp_path / "killed" / "eval.jsonl", "a") as f:  # killed while appending its second record
        f.write('{"step": 20, "env_steps": 0, "pha')
    _write_run(tmp_path / "empty", "mvp", 2)
    (tmp_path / "empty" / "eval.jsonl").write_text("")
    (tmp_path / "no_hparams").mkdir()
    (tmp_path / "no_hparams" / "eval.jsonl").write_text('{"step": 1}\n')
    with pytest.warns(UserWarning) as caught:
        runs = plots.find_runs(tmp_path)
        curves = plots.load_curves(runs)
    messages = " ".join(str(w.message) for w in caught)
    assert "no_hparams has an eval.jsonl but no" in messages and "killed/eval.jsonl:2 is not a JSON record" in messages
    assert sorted(Path(p).name for p in runs["run_dir"]) == ["empty", "good", "killed"]
    assert sorted(Path(p).name for p in curves["run_dir"]) == ["good", "killed"]


def test_moved_fine_tuning_runs_find_their_offline_run(tmp_path):
    """The recorded offline checkpoint is an absolute path; a copied runs/ tree still pairs runs by layout."""
    from omegaconf import OmegaConf

    _write_run(tmp_path / "mvp_0", "mvp", 0)
    online = tmp_path / "mvp_0" / "finetune_bon"
    _write_run(online, "mvp", 0)
    cfg = OmegaConf.load(online / "offline" / "hparams.yaml")
    cfg.cfg.finetune = {"target": "bon"}
    cfg.cfg.offline_ckpt = "/elsewhere/runs/mvp_0/checkpoints/last.ckpt"
    cfg.cfg.finetune_start_step = 10
    (online / "online").mkdir()
    OmegaConf.save(cfg, online / "online" / "hparams.yaml")
    runs = plots.find_runs(tmp_path).set_index("target")
    assert runs.loc["bon", "parent"] == str(tmp_path / "mvp_0")


def _write_fine_tuning_run(run_dir: Path, parent_ckpt: str, target: str, start_step: int, steps: list[int]) -> None:
    """A run directory as ``manip.finetune`` leaves it: ``online/hparams.yaml`` and its online evaluations."""
    from omegaconf import OmegaConf

    _write_run(run_dir, "mvp", 0)
    cfg = OmegaConf.load(run_dir / "offline" / "hparams.yaml")
    cfg.cfg.finetune = {"target": target, "prior": "auto"}
    cfg.cfg.offline_ckpt = parent_ckpt
    cfg.cfg.finetune_start_step = start_step
    (run_dir / "online").mkdir()
    OmegaConf.save(cfg, run_dir / "online" / "hparams.yaml")
    (run_dir / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "env_steps": step - start_step, "phase": "online", "success_rate": 0.9,
                    "ci_low": 0.8, "ci_high": 1.0, "episodes": 20}) + "\n" for step in steps))


def test_fine_tuning_seeds_of_one_checkpoint_count_its_evaluations_once(tmp_path):
    """Three fine-tuning seeds of one offline run (`+seed=0,1,2`): their curves share its evaluation at step 10,
    which is one run's (its band its own Wilson interval), not three seeds'."""
    from omegaconf import OmegaConf

    _write_run(tmp_path / "mvp_0", "mvp", 0)  # step 10: 0.5 over 20 episodes, interval (0.3, 0.7)
    for seed in (0, 1, 2):
        run_dir = tmp_path / "mvp_0" / f"finetune_bon{f'_s{seed}' if seed else ''}"
        _write_fine_tuning_run(run_dir, f"{tmp_path}/mvp_0/checkpoints/last.ckpt", "bon", 10, [20])
        hparams = OmegaConf.load(run_dir / "online" / "hparams.yaml")
        hparams.cfg.seed = seed
        OmegaConf.save(hparams, run_dir / "online" / "hparams.yaml")
    curves = plots.load_curves(plots.find_runs(tmp_path))
    assert len(curves) == 6 and set(curves["label"]) == {"mvp (bon)"}
    summary = plots.aggregate(curves).set_index("step")
    assert summary.loc[10, ["runs", "seeds", "low", "high"]].tolist() == [1, 1, 0.3, 0.7]
    assert summary.loc[20, ["runs", "seeds"]].tolist() == [3, 3]


@pytest.mark.parametrize("moved", [False, True])
def test_a_run_fine_tuned_from_a_fine_tuning_run_continues_that_runs_curve(tmp_path, moved):
    """offline (eval at 10) -> finetune_bon from step 10 (evals 20, 30) -> finetune_bon_then_som from its last step,
    30 (eval at 40): the last run's curve is 10, 20, 30, 40; the runs it continues are not curves of their own."""
    _write_run(tmp_path / "mvp_0", "mvp", 0)
    root = "/elsewhere/runs" if moved else str(tmp_path)  # moved: the recorded paths no longer exist
    _write_fine_tuning_run(tmp_path / "mvp_0" / "finetune_bon", f"{root}/mvp_0/checkpoints/step10.ckpt", "bon", 10,
                           [20, 30])
    _write_fine_tuning_run(tmp_path / "mvp_0" / "finetune_bon_then_som",
                           f"{root}/mvp_0/finetune_bon/checkpoints/last.ckpt", "som", 30, [40])
    runs = plots.find_runs(tmp_path).set_index("target")
    assert runs.loc["som", "parent"] == str(tmp_path / "mvp_0" / "finetune_bon")
    assert runs.loc["bon", "parent"] == str(tmp_path / "mvp_0")
    assert runs.loc["som", "label"] == "mvp (bon then som)" and runs.loc["bon", "label"] == "mvp (bon)"
    curves = plots.load_curves(runs.reset_index())
    assert set(curves["run_dir"]) == {str(tmp_path / "mvp_0" / "finetune_bon_then_som")}
    assert curves["step"].tolist() == [10, 20, 30, 40]
    assert curves["phase"].tolist() == ["offline", "online", "online", "online"]


def test_curves_pair_runs_under_a_relative_or_linked_root_and_keep_runs_continued_from_an_earlier_step(
        tmp_path, monkeypatch):
    """Checkpoints record resolved paths: runs found under a relative root or through a symlink still pair. A run
    fine-tuned again from before its last evaluation (bon evaluated at 20 and 30, som from step 20) stays a curve."""
    real = tmp_path / "real"
    _write_run(real / "mvp_0", "mvp", 0)
    _write_fine_tuning_run(real / "mvp_0" / "finetune_bon", f"{real}/mvp_0/checkpoints/last.ckpt", "bon", 10, [20, 30])
    _write_fine_tuning_run(real / "mvp_0" / "finetune_bon_then_som",
                           f"{real}/mvp_0/finetune_bon/checkpoints/step20.ckpt", "som", 20, [40])
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    for root in ("link", "real", tmp_path / "link"):
        curves = plots.load_curves(plots.find_runs(root)).set_index("label")
        assert curves.loc["mvp (bon)", "step"].tolist() == [10, 20, 30]
        assert curves.loc["mvp (bon then som)", "step"].tolist() == [10, 20, 40]
        assert "mvp" not in curves.index  # the offline run's one evaluation is part of both curves


def test_a_run_fine_tuned_from_a_checkpoint_outside_a_run_directory_is_a_curve_of_its_own(tmp_path):
    _write_run(tmp_path / "elsewhere", "mvp", 0)  # an unrelated run beside the kept checkpoint's folder
    _write_fine_tuning_run(tmp_path / "models" / "lift_finetune_bon", f"{tmp_path}/models/lift.ckpt", "bon", 10,
                           [20])
    runs = plots.find_runs(tmp_path).set_index("target")
    assert pd.isna(runs.loc["bon", "parent"])
    curves = plots.load_curves(runs.reset_index())
    assert sorted(curves["label"].unique()) == ["mvp", "mvp (bon)"]
    assert curves.set_index("label").loc["mvp (bon)", "step"] == 20


def test_speed_bars_say_whether_the_losses_were_compiled():
    """A ``manip.bench --compile`` JSON's bars are labelled with its mode; an eager one's are not."""
    from manip import plots

    config = {"device_name": "cpu", "threads": 1, "hidden": [512, 512]}
    assert plots._measured_label(config) == "measured (cpu, threads=1, MLP 512x512)"
    assert plots._measured_label({**config, "compile": None}) == plots._measured_label(config)
    assert plots._measured_label({**config, "compile": "reduce-overhead"}) == (
        "measured (cpu, threads=1, MLP 512x512, compiled reduce-overhead)")


def test_bootstrap_interval_is_a_95_percent_interval_of_the_mean():
    """100 values of 0 and 1 in equal parts: the mean's standard error is 0.05, so the 95% interval is about
    0.5 +- 0.098 (a 68% one would be +- 0.05)."""
    low, high = plots.bootstrap_interval(np.r_[np.zeros(50), np.ones(50)])
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)


def test_a_step_evaluated_twice_keeps_its_last_record(tmp_path):
    """After a resume the step evaluated again keeps the later line (the docstring's rule)."""
    lines = [{"step": 10, "success_rate": 0.2}, {"step": 20, "success_rate": 0.4}, {"step": 10, "success_rate": 0.6}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = plots.read_evaluations(tmp_path)
    assert records["step"].tolist() == [10, 20] and records["success_rate"].tolist() == [0.6, 0.4]
