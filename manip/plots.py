"""Figures and tables from run directories and benchmark files (used by ``notebooks/``).

Run directories are what ``manip.fit`` and ``manip.finetune`` write: ``eval.jsonl`` (one line per
evaluation: step, env_steps, phase, success_rate, ci_low, ci_high, ...) and the run config in
``<run_dir>/<phase>/hparams.yaml``. A fine-tuning run (``<offline run>/finetune_<target>``) records
the checkpoint it started from, so its curve is the offline run's evaluations up to that step
followed by its own (a run fine-tuned from a fine-tuning run, ``finetune_<target>_then_<target>``,
goes through both and is labelled with both targets, ``mvp (bon then som)``).

Curves are grouped by task and label (``mvp``, or ``mvp (bon)`` after fine-tuning with the
best-of-N target, or ``mvp [adaptive_p=0.5]`` where runs of one algo differ in a setting); runs
sharing both are seeds of one method. The band around a curve spans two 95% intervals: the bootstrap
interval of the mean over seeds (seed-to-seed variation) and the Wilson interval of the runs' episodes pooled
(episode sampling, all a single run has), so that a few seeds that agree, e.g. all at 1.0, do not shrink it
below what their episodes support.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from manip.evaluation import wilson_interval
from manip.logs import counted

# Paper (MVP, arXiv 2602.13810) Table 1: success after 1M offline + 1M online updates, mean and std
# over 5 seeds (std None where unpublished). Entries in PAPER_TABLE1_INFERRED are split from
# published pair sums, not published themselves.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float | None]]] = {
    "lift": {"FQL": (0.96, 0.03), "BFN": (1.00, 0.01), "QC": (1.00, 0.00), "MVP": (1.00, 0.00)},
    "can": {"FQL": (0.74, 0.11), "BFN": (0.82, None), "QC": (0.94, 0.06), "MVP": (0.92, 0.07)},
    "square": {"FQL": (0.12, None), "BFN": (0.34, None), "QC": (0.92, 0.01), "MVP": (0.93, 0.01)},
    "cube-double-task2": {"FQL": (0.97, None), "BFN": (0.90, None), "QC": (1.00, None), "MVP": (1.00, None)},
    "cube-double-task3": {"FQL": (0.96, None), "BFN": (0.91, None), "QC": (1.00, None), "MVP": (1.00, None)},
    "cube-double-task4": {"FQL": (0.08, None), "BFN": (0.35, None), "QC": (0.93, 0.08), "MVP": (0.95, 0.04)},
    "cube-triple-task2": {"FQL": (0.01, None), "BFN": (0.08, None), "QC": (0.82, 0.10), "MVP": (0.88, 0.03)},
    "cube-triple-task3": {"FQL": (0.12, None), "BFN": (0.26, None), "QC": (0.69, 0.05), "MVP": (0.71, 0.06)},
    "cube-triple-task4": {"FQL": (0.00, None), "BFN": (0.02, None), "QC": (0.46, 0.13), "MVP": (0.52, 0.11)},
}
PAPER_TABLE1_INFERRED = {(task, method) for task in ("cube-double-task2", "cube-double-task3")
                         for method in ("FQL", "BFN")}
# The paper's method name for each algo config (mvp_noivc and qc_fql have no Table 1 column).
PAPER_METHOD = {"mvp": "MVP", "qc": "QC", "bfn": "BFN", "fql": "FQL"}
# Paper Table 3 ("inference per action", ms, CPU-only AMD Threadripper 3960X, JAX JIT off) and Table 2 (online
# it/s). Table 3 is read as one policy call, a whole chunk for QC and MVP (h = 5): BFN (h = 1, N = 4) and QC (h = 5,
# N = 32) take about the same time there, as per-call costs would; plotted beside act_ms, the latency of one call.
PAPER_ACT_MS = {"fql": 10.76, "bfn": 117.3, "qc": 113.22, "mvp": 10.93}
PAPER_UPDATE_ITS = {"fql": 108.5, "bfn": 68.0, "qc": 92.6, "mvp": 153.6}

OFFLINE_SHADE = "0.9"


# ------------------------------------------------------------------------------------------- runs
def task_name(cfg: dict) -> str:
    """Short task name of a run config, as in the paper's Table 1 rows: ``lift``, ``cube-double-task2``."""
    info = cfg["data_info"]
    if info["source"] == "robomimic":
        return cfg["data"]["task"]
    return info["env_name"].replace("-singletask", "").removesuffix("-v0")


def _target_label(finetune: dict) -> str:
    """``bon``, ``som``, ``rfm`` with their default prior, else e.g. ``som, box prior``."""
    from manip.algos.targets import AUTO_PRIOR

    target, prior = finetune["target"], finetune.get("prior", "box")
    return target if prior in ("auto", AUTO_PRIOR[target]) else f"{target}, {prior} prior"


def launch_path(variable: str, default: str) -> Path:
    """The path in environment variable ``variable`` (``default`` when unset).

    A relative path is taken from the directory the command was started in (``$PWD``), not from the kernel's working
    directory, which Jupyter sets to the notebook's folder: ``MANIP_RUNS=runs jupyter execute
    notebooks/success_rates.ipynb`` from the project root reads ``<root>/runs``.
    """
    path = Path(os.environ.get(variable, default))
    return path if path.is_absolute() else Path(os.environ.get("PWD", os.getcwd())) / path


# Config keys that do not change what a run measures: bookkeeping, paths, the evaluation schedule, loggers.
RUN_BOOKKEEPING_SECTIONS = {"logger"}
RUN_BOOKKEEPING_KEYS = {
    "seed", "data.seed", "module.seed", "run_dir", "resume", "threads", "ckpt", "offline_ckpt", "finetune_start_step",
    "finetune_start_env_steps", "data.path", "data.data_dir", "data_info.path", "data_info.digest",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps", "trainer.devices",
    "eval.num_envs", "eval.every_n_steps", "eval.episodes", "eval.final_episodes", "eval.seed", "checkpoint.every_n_steps",
    "env.num_envs", "finetune.seed", "trainer.accelerator", "trainer.strategy",
    "module.compile",  # where and how it ran, not what it learns
}


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last component, or by more components where the last is shared."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(other == name or other.endswith("." + name) for other in keys) == 1 or n == len(parts):
                short[key] = name
                break
    return short


def _variant_labels(labels: list[str], configs: list[dict]) -> list[str]:
    """Labels extended by the settings that differ among runs sharing one (``mvp [adaptive_p=0.5]``).

    Runs that share a label are read as seeds of one method, so two runs of one algo with, say, different
    ``algo.agent.adaptive_p`` must not share it. Keys in ``RUN_BOOKKEEPING_KEYS`` or in a
    section of ``RUN_BOOKKEEPING_SECTIONS`` are ignored.
    """
    out = list(labels)
    for label in set(labels):
        members = [i for i, other in enumerate(labels) if other == label]
        if len(members) < 2:
            continue
        keys = sorted(key for key in {key for i in members for key in configs[i]} - RUN_BOOKKEEPING_KEYS
                      if key.split(".")[0] not in RUN_BOOKKEEPING_SECTIONS)
        differing = [key for key in keys if len({repr(configs[i].get(key, "<unset>")) for i in members}) > 1]
        if not differing:
            continue
        short = _short_keys(differing)
        for i in members:
            settings = ", ".join(f"{short[key]}={_format_setting(configs[i].get(key, '<unset>'))}"
                                 for key in differing)
            out[i] = f"{label} [{settings}]"
    return out


def _format_setting(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def find_runs(root: str | Path) -> pd.DataFrame:
    """Every run directory under ``root`` (one with an ``eval.jsonl``), one row each.

    Columns: run_dir (resolved), task, algo, target (fine-tuning target, None offline), seed, parent (the run a
    fine-tuning run started from: the offline run, or the fine-tuning run it continues; None when its checkpoint
    was not in a run directory), start_step (its checkpoint's step), label. The label is the algo and the
    fine-tuning targets from the offline run on (``mvp (bon)``, ``mvp (bon then som)``); runs of one task that
    share it but differ in a setting get that setting appended (``mvp [adaptive_p=0.5]``), so that only true seeds
    are averaged together.
    """
    rows, configs, own_targets = [], [], {}
    for log in sorted(Path(root).rglob("eval.jsonl")):
        run_dir = log.parent.resolve()  # runs pair by the resolved paths their checkpoints record
        phase = "online" if (run_dir / "online" / "hparams.yaml").exists() else "offline"
        if not (run_dir / phase / "hparams.yaml").exists():
            warnings.warn(f"{log.parent} has an eval.jsonl but no offline/ or online/hparams.yaml; skipped")
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / phase / "hparams.yaml"))["cfg"]
        algo = cfg["algo"]["name"]
        finetune = cfg.get("finetune") if phase == "online" else None
        rows.append({
            "run_dir": str(run_dir), "task": task_name(cfg), "algo": algo,
            "target": finetune["target"] if finetune else None, "seed": cfg["seed"],
            "parent": _parent_run(run_dir, cfg["offline_ckpt"]) if finetune else None,
            "start_step": cfg["finetune_start_step"] if finetune else None,
        })
        if finetune:
            own_targets[str(run_dir)] = _target_label(finetune)
        configs.append(_flatten(cfg))
    parents = {row["run_dir"]: row["parent"] for row in rows}

    def targets(run_dir: str, seen: frozenset = frozenset()) -> str:
        """The fine-tuning targets from the offline run to ``run_dir``: ``bon then som``."""
        parent = parents.get(run_dir)
        if parent not in own_targets or run_dir in seen:
            return own_targets[run_dir]
        return f"{targets(parent, seen | {run_dir})} then {own_targets[run_dir]}"

    for row in rows:
        row["label"] = f"{row['algo']} ({targets(row['run_dir'])})" if row["target"] else row["algo"]
    columns = ["run_dir", "task", "algo", "target", "seed", "parent", "start_step", "label"]
    runs = pd.DataFrame(rows, columns=columns)
    for task in set(runs["task"]):
        members = [i for i, row in enumerate(rows) if row["task"] == task]
        labels = _variant_labels([rows[i]["label"] for i in members], [configs[i] for i in members])
        runs.loc[members, "label"] = labels
    return runs


def _parent_run(run_dir: Path, offline_ckpt: str) -> str | None:
    """The run a fine-tuning run started from: the run directory of the recorded checkpoint (``<run>/checkpoints/
    *.ckpt``) or, when runs were moved or copied since (the record is an absolute path), the directory ``finetune``
    puts its runs in by default: ``<run>/finetune_<target>`` for an offline run's checkpoint, ``<run>_then_<target>``
    beside a fine-tuning run. None for a checkpoint kept outside a run directory."""
    recorded = Path(offline_ckpt)
    if recorded.parent.name != "checkpoints":
        return None
    if recorded.parent.parent.is_dir():
        return str(recorded.parent.parent.resolve())
    if "_then_" in run_dir.name:
        return str(run_dir.parent / run_dir.name.rsplit("_then_", 1)[0])
    if run_dir.name.startswith("finetune_"):
        return str(run_dir.parent)
    return None


def read_evaluations(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``eval.jsonl`` as a frame (a step evaluated twice, e.g. after a resume, keeps its last line). A line
    that does not parse (a process killed while appending it) is skipped with a warning."""
    path = Path(run_dir) / "eval.jsonl"
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number} is not a JSON record; skipped")
    if not records:
        return pd.DataFrame(columns=["step"])
    records = pd.DataFrame(records)
    return records.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Success-rate curves, one per run, in long form (one row per evaluation).

    A fine-tuning run's curve starts with its parent's curve up to ``start_step`` (the parent's offline
    evaluations, or, for a run fine-tuned from a fine-tuning run, that run's whole curve up to there). A run whose
    every evaluation is part of such a curve (fine-tuned from its last evaluated step or later) is not a curve of its
    own; one fine-tuned from an earlier step stays one. Columns: the run's task, algo, label, seed and run_dir, then
    the ``eval.jsonl`` fields and their ``source``, the run that made the evaluation (several fine-tuning runs of
    one checkpoint share its run's evaluations).
    """
    parents = {run.run_dir: (run.parent, run.start_step) for run in runs.itertuples() if pd.notna(run.parent)}
    own = {run.run_dir: read_evaluations(run.run_dir).assign(source=run.run_dir) for run in runs.itertuples()}

    def curve(run_dir: str, seen: frozenset = frozenset()) -> pd.DataFrame:
        records = own[run_dir]
        if run_dir not in parents or run_dir in seen or records.empty:
            return records
        parent, start_step = parents[run_dir]
        if parent not in own:
            return records
        before = curve(parent, seen | {run_dir})
        return pd.concat([before[before["step"] <= start_step], records], ignore_index=True)

    continued = {parent for parent, start_step in parents.values()
                 if parent in own and (own[parent].empty or own[parent]["step"].max() <= start_step)}
    curves = []
    for run in runs.itertuples():
        if run.run_dir in continued:
            continue
        records = curve(run.run_dir)
        if records.empty:
            continue
        curves.append(records.assign(task=run.task, algo=run.algo, label=run.label, seed=run.seed,
                                     run_dir=run.run_dir))
    columns = ["task", "algo", "label", "seed", "run_dir", "step", "env_steps", "phase", "success_rate", "ci_low",
               "ci_high", "episodes", "source"]
    if not curves:
        return pd.DataFrame(columns=columns)
    return pd.concat(curves, ignore_index=True)[columns]


def bootstrap_interval(values: np.ndarray, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeds)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def aggregate(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean success per (task, label, step) with its band: columns mean, low, high, runs, seeds (distinct seed
    values among the runs: a repeated seed is a second run, not a second seed), phase.

    The band of one run is its Wilson interval; of several, the hull of the bootstrap interval of the mean over
    runs and the Wilson interval of their episodes pooled. An evaluation that several curves share (``source``: the
    run the fine-tuning seeds of one checkpoint continue) counts once."""
    rows = []
    for (task, label, step), group in curves.groupby(["task", "label", "step"], sort=True):
        group = group.drop_duplicates("source" if "source" in group else "run_dir")
        values = group["success_rate"].to_numpy(dtype=float)
        if len(values) > 1:
            low, high = bootstrap_interval(values)
            episodes = group["episodes"].to_numpy(dtype=float)
            pooled_low, pooled_high = wilson_interval(float((values * episodes).sum()), float(episodes.sum()))
            low, high = min(low, pooled_low), max(high, pooled_high)
        else:
            low, high = float(group["ci_low"].iloc[0]), float(group["ci_high"].iloc[0])
        rows.append({"task": task, "label": label, "step": step, "mean": values.mean(), "low": low,
                     "high": high, "runs": len(values), "seeds": group["seed"].nunique(),
                     "phase": group["phase"].iloc[0]})
    return pd.DataFrame(rows, columns=["task", "label", "step", "mean", "low", "high", "runs", "seeds", "phase"])


def _paper_entry(task: str, algo: str) -> tuple[float, float | None] | None:
    """Table 1's (mean, std) for ``algo`` on ``task``, None where the paper has no such entry."""
    return PAPER_TABLE1.get(task, {}).get(PAPER_METHOD.get(algo))


def plot_success_curves(curves: pd.DataFrame, task: str) -> plt.Figure:
    """Success rate vs updates for one task: offline phase shaded, one line (and band) per label,
    the paper's Table 1 value of the same method as a dotted line where it has one."""
    summary = aggregate(curves[curves["task"] == task])
    fig, ax = plt.subplots(figsize=(7, 4))
    offline_end = summary.loc[summary["phase"] == "offline", "step"].max()
    if not np.isnan(offline_end):
        ax.axvspan(0, offline_end, color=OFFLINE_SHADE, zorder=0, label="offline phase")
    drawn = set()
    algos = dict(zip(curves["label"], curves["algo"]))
    for i, (label, line) in enumerate(summary.groupby("label", sort=True)):
        color = f"C{i}"
        ax.plot(line["step"], line["mean"], marker="o", ms=3, color=color,
                label=f"{label} ({_count_text(int(line['runs'].max()), int(line['seeds'].max()))})")
        ax.fill_between(line["step"], line["low"], line["high"], color=color, alpha=0.2, linewidth=0)
        paper, method = _paper_entry(task, algos[label]), PAPER_METHOD.get(algos[label])
        if paper is not None and method not in drawn:
            drawn.add(method)
            ax.axhline(paper[0], color=color, linestyle=":", linewidth=1.5, label=f"paper {method} (Table 1)")
    ax.set(xlim=(0, max(summary["step"].max(), 1)), ylim=(-0.02, 1.02), xlabel="gradient updates",
           ylabel="success rate", title=f"{task}: success rate (offline, then online)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _count_text(runs: int, seeds: int) -> str:
    """``3 seeds``, or ``3 runs, 2 seeds`` when a seed was run more than once."""
    seeds_text = counted(seeds, "seed")
    return seeds_text if runs == seeds else f"{runs} runs, {seeds_text}"


# ------------------------------------------------------------------------------------------ table
def _fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def comparison_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Final success per (task, label) next to the paper's Table 1 number for the same method.

    offline / final: mean over seeds of each run's last offline evaluation / its evaluation at ``last_step``, the
    last step every run of the group reached, so that a run still going or stopped early is compared at a step
    the others also report (final_std: the std over seeds, NaN for one seed); paper: Table 1 mean and std; ``ours`` and ``paper_text``
    are the same as ``mean ± std`` strings.
    """
    rows = []
    for (task, label), group in curves.groupby(["task", "label"], sort=True):
        group = group.sort_values("step")
        last_step = int(group.groupby("run_dir")["step"].max().min())
        final = group[group["step"] <= last_step].groupby("run_dir")["success_rate"].last().to_numpy(dtype=float)
        offline = group[group["phase"] == "offline"].groupby("run_dir")["success_rate"].last()
        algo = group["algo"].iloc[0]
        paper = _paper_entry(task, algo)
        rows.append({
            "task": task, "label": label, "runs": len(final), "seeds": group["seed"].nunique(),
            "episodes": int(group["episodes"].iloc[-1]),
            "last_step": last_step,
            "offline": offline.mean() if len(offline) else np.nan, "final": final.mean(),
            "final_std": final.std(ddof=1) if len(final) > 1 else np.nan,
            "paper": paper[0] if paper else np.nan,
            "paper_std": paper[1] if paper and paper[1] is not None else np.nan,
            "paper_inferred": (task, PAPER_METHOD.get(algo)) in PAPER_TABLE1_INFERRED,
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["ours"] = [_fmt(m, s) for m, s in zip(table["final"], table["final_std"])]
    table["paper_text"] = [_fmt(m, s) + (" (inferred)" if inferred else "")
                           for m, s, inferred in zip(table["paper"], table["paper_std"], table["paper_inferred"])]
    return table


def plot_comparison(table: pd.DataFrame) -> plt.Figure:
    """Grouped bars per task: each label's final success (std over seeds as error bar, value on top)
    and, hatched beside it, the paper's Table 1 value for the same method where there is one."""
    tasks = list(dict.fromkeys(table["task"]))
    labels = list(dict.fromkeys(table["label"]))
    with_paper = {label: table.loc[table["label"] == label, "paper"].notna().any() for label in labels}
    slots = sum(1 + with_paper[label] for label in labels)
    width = 0.8 / slots
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(tasks) * slots + 2), 4))
    x = np.arange(len(tasks))
    slot = 0
    for i, label in enumerate(labels):
        rows = table[table["label"] == label].set_index("task").reindex(tasks)
        offset = (slot - (slots - 1) / 2) * width
        bars = ax.bar(x + offset, rows["final"], width, yerr=rows["final_std"].fillna(0), capsize=3,
                      color=f"C{i}", label=f"{label} (ours)")
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in rows["final"]], fontsize=7)
        slot += 1
        if with_paper[label]:
            ax.bar(x + offset + width, rows["paper"], width, yerr=rows["paper_std"].fillna(0), capsize=3,
                   color="white", edgecolor=f"C{i}", hatch="//", label=f"{label}: paper Table 1")
            slot += 1
    ax.set_xticks(x, tasks)
    ax.set(xlim=(-0.5, len(tasks) - 0.5), ylim=(0, 1.1), ylabel="final success rate",
           title="Final success vs the paper's Table 1")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ speed
def load_bench(path: str | Path) -> tuple[pd.DataFrame, dict, dict]:
    """A ``python -m manip.bench`` JSON as (per-algo frame indexed by algo, ratios, config)."""
    report = json.loads(Path(path).read_text())
    ratios, config = report.get("ratios", {}), report.get("config", {})
    algos = {k: v for k, v in report.items() if k not in ("ratios", "config")}
    return pd.DataFrame.from_dict(algos, orient="index"), ratios, config


def _measured_label(config: dict) -> str:
    hidden = "x".join(str(h) for h in config.get("hidden", [])) or "?"
    compiled = f", compiled {config['compile']}" if config.get("compile") else ""  # bench --compile [MODE]
    return (f"measured ({config.get('device_name', '?')}, threads={config.get('threads', '?')}, MLP {hidden}"
            f"{compiled})")


def _bars(ax, algos: list[str], measured: list[float], paper: dict[str, float] | None, config: dict,
          paper_label: str, log: bool = False, extra: tuple[list[float], str] | None = None) -> None:
    """Measured values per algo as solid bars, ``extra`` (values, label) as lighter bars beside them, the
    paper's (if given) as hatched bars after those."""
    series = [(list(measured), _measured_label(config), {"color": "C0"})]
    if extra is not None:
        series.append((list(extra[0]), extra[1], {"color": "C2"}))
    if paper:
        series.append(([paper.get(a, np.nan) for a in algos], paper_label,
                       {"color": "white", "edgecolor": "C1", "hatch": "//"}))
    x = np.arange(len(algos))
    width = 0.8 / len(series) if len(series) > 1 else 0.6
    shown: list[float] = []
    for i, (values, label, style) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, **style)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.3g}" for v in values], fontsize=8)
        shown += values
    ax.set_xticks(x, algos)
    ax.grid(axis="y", alpha=0.3)
    # Headroom above the tallest bar for the legend and the ratio box.
    if log:
        ax.set_yscale("log")
        ax.set_ylim(np.nanmin(shown) / 2, np.nanmax(shown) * 30)
    else:
        ax.set_ylim(0, np.nanmax(shown) * 1.5)
    ax.legend(fontsize=8, loc="upper left")


def _ratio_note(ax, lines: list[str]) -> None:
    ax.text(0.98, 0.97, "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})


def plot_act_latency(bench: pd.DataFrame, ratios: dict, config: dict) -> plt.Figure:
    """act() latency per algo (batch 1, ms, log scale) beside the paper's Table 3, with MVP's speedup over QC."""
    fig, ax = plt.subplots(figsize=(7, 4))
    algos = list(bench.index)
    fast = None
    if "fast_act_ms" in bench.columns:  # bench --fast-act
        fast = (bench["fast_act_ms"].tolist(), f"frozen compiled copy ({config.get('fast_act_dtype', '?')})")
    _bars(ax, algos, bench["act_ms"].tolist(), PAPER_ACT_MS, config, "paper Table 3 (Threadripper CPU, JAX, JIT off)",
          log=True, extra=fast)
    ax.set(ylabel="ms per act() call", title="Action latency (lower is better)")
    if "mvp_act_speedup_vs_qc" in ratios:
        paper = PAPER_ACT_MS["qc"] / PAPER_ACT_MS["mvp"]
        lines = [f"MVP act speedup vs QC: {ratios['mvp_act_speedup_vs_qc']:.1f}x"]
        if "mvp_fast_act_speedup_vs_qc" in ratios:
            lines.append(f"compiled copies: {ratios['mvp_fast_act_speedup_vs_qc']:.1f}x")
        _ratio_note(ax, [*lines, f"(paper: {paper:.1f}x)"])
    fig.tight_layout()
    return fig


def plot_update_throughput(bench: pd.DataFrame, ratios: dict, config: dict) -> plt.Figure:
    """Full updates per second per algo beside the paper's Table 2, with MVP/QC and the JVP overhead."""
    fig, ax = plt.subplots(figsize=(7, 4))
    algos = list(bench.index)
    _bars(ax, algos, bench["update_its"].tolist(), PAPER_UPDATE_ITS, config, "paper Table 2 (online it/s)")
    ax.set(ylabel="updates / s", title="Update throughput (higher is better)")
    lines = []
    if "mvp_update_ratio_vs_qc" in ratios:
        paper = PAPER_UPDATE_ITS["mvp"] / PAPER_UPDATE_ITS["qc"]
        lines += [f"MVP / QC update rate: {ratios['mvp_update_ratio_vs_qc']:.2f}x", f"(paper: {paper:.2f}x)"]
    if "jvp_overhead" in ratios:
        lines.append(f"JVP overhead of the MVP actor step: {ratios['jvp_overhead']:.2f}x")
    if lines:
        _ratio_note(ax, lines)
    fig.tight_layout()
    return fig


def plot_jvp_overhead(bench: pd.DataFrame, ratios: dict, config: dict) -> plt.Figure:
    """MVP's actor step (MeanFlow loss through torch.func.jvp) vs a plain flow-matching step of the same net."""
    mvp = bench.loc["mvp"]
    fig, ax = plt.subplots(figsize=(5, 4))
    _bars(ax, ["MeanFlow + IVC (jvp)", "flow matching"], [mvp["actor_update_ms"], mvp["fm_update_ms"]], None,
          config, "")
    ax.set(ylabel="ms per actor step", title="Cost of the JVP in the MVP actor step")
    _ratio_note(ax, [f"overhead: {ratios['jvp_overhead']:.2f}x"])
    fig.tight_layout()
    return fig


def plot_peak_memory(bench: pd.DataFrame, config: dict) -> plt.Figure:
    """Peak memory per algo during the benchmark (CUDA allocations, or CPU RSS growth)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _bars(ax, list(bench.index), bench["peak_mem_mb"].tolist(), None, config, "")
    source = "CUDA max allocated" if str(config.get("device", "cpu")).startswith("cuda") else "CPU RSS growth"
    ax.set(ylabel=f"MiB ({source})", title="Peak memory (act + updates)")
    fig.tight_layout()
    return fig
