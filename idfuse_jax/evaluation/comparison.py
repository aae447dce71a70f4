"""Several methods' evaluations side by side: per-method means over subjects with 95 %
bootstrap intervals, paired differences against the first method, the published rows, plots.

Pure functions of the evaluations' results.json contents (`run.evaluate`), plus the writers of
comparison.json, results.md and the PNGs. The statistics:

- a method's score on a metric is the mean over its subjects of the per-subject scores;
- its 95 % interval is the percentile bootstrap over subjects: `resamples` draws of the subjects
  with replacement (numpy's default_rng(seed)), the 2.5th and 97.5th percentiles of the means;
- the paired difference of method m against the first method is the mean over the subjects
  both have of (m's score - first's score), with the same bootstrap on those differences; an
  interval that excludes 0 is a difference the subjects support at about the 5 % level.

Columns: `COLUMNS` lists every metric the table knows, in order, with the per-subject key of
results.json it reads. A column shows when every method's results carry that key for every
subject: DINO, CLIP-I and CLIP-T when the evaluations had the metric models, ToyBench's
ground-truth identity, prompt fidelity and background leakage when they were ToyBench runs
(`with_toybench` merges toybench.json's per-subject scores in). Each column has a role in the
tradeoff plot: a "subject" column (DINO, CLIP-I; identity) is drawn against the "prompt"
column of its benchmark (CLIP-T; fidelity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idfuse_jax.errors import ConfigError
from idfuse_jax.evaluation import report


@dataclasses.dataclass(frozen=True)
class Column:
    key: str  # the per-subject key in results.json
    header: str
    higher_is_better: bool = True
    bench: str = "dreambench"  # the tradeoff plot pairs columns of the same benchmark
    role: str = ""  # "subject" (y of the tradeoff plot), "prompt" (its x), "" (not drawn there)
    axis: str = ""  # the tradeoff plot's axis label (default: the header and its role)

    @property
    def label(self) -> str:
        return self.axis or f"{self.header} ({self.role} fidelity)"


COLUMNS = (
    Column("dino", "DINO", role="subject"),
    Column("clip_i", "CLIP-I", role="subject"),
    Column("clip_t", "CLIP-T", role="prompt"),
    Column(
        "identity",
        "identity",
        bench="toybench",
        role="subject",
        axis="ToyBench identity (subject fidelity)",
    ),
    Column(
        "fidelity", "fidelity", bench="toybench", role="prompt", axis="ToyBench prompt fidelity"
    ),
    Column("leakage", "leakage", higher_is_better=False, bench="toybench"),
)
TOYBENCH_KEYS = ("identity", "shape", "colour", "pattern", "fidelity", "leakage")
LEVEL = 0.95


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples] means of `values` [N] resampled with replacement (N draws each)."""
    values = np.asarray(values, np.float64)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def interval(values: Sequence[float], resamples: int, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % percentile-bootstrap interval over `values`.

    One value has no spread to resample: its interval is the value itself.
    """
    values = np.asarray(values, np.float64)
    means = bootstrap_means(values, resamples, np.random.default_rng(seed))
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def with_toybench(results: Mapping[str, Any], truth: Mapping[str, Any]) -> dict[str, Any]:
    """results.json's content with each subject's ToyBench scores (`TOYBENCH_KEYS` of
    toybench.json's per-subject means) added to its entry; a subject toybench.json lacks is a
    ConfigError (the two files come from different evaluations)."""
    subjects = {}
    for name, entry in results["subjects"].items():
        if name not in truth["subjects"]:
            raise ConfigError(f"subject {name!r} has no ToyBench scores (toybench.json)")
        scores = truth["subjects"][name]
        subjects[name] = {**entry, **{k: scores.get(k) for k in TOYBENCH_KEYS}}
    return {**results, "subjects": subjects}


def subject_scores(results: Mapping[str, Any], column: Column) -> dict[str, float] | None:
    """{subject: score} of one column, or None when some subject lacks it."""
    subjects = results["subjects"]
    if not all(column.key in s and s[column.key] is not None for s in subjects.values()):
        return None
    return {name: float(s[column.key]) for name, s in subjects.items()}


def compare(
    methods: Mapping[str, Mapping[str, Any]], resamples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """The comparison of `methods` ({name: results.json content}, the first is the reference).

    Returns {"columns", "methods": {name: {key: {"mean", "low", "high", "subjects"}}},
    "differences": {name: {key: {"mean", "low", "high", "subjects"}}} (every method but the
    first, on the subjects it shares with the first), "settings"}.
    """
    if not methods:
        raise ConfigError("nothing to compare: give at least one NAME=WORKDIR")
    names = list(methods)
    columns = [c for c in COLUMNS if all(subject_scores(methods[n], c) is not None for n in names)]
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        table[name] = {}
        for c in columns:
            scores = subject_scores(methods[name], c)
            mean, low, high = interval(list(scores.values()), resamples, seed)
            table[name][c.key] = {"mean": mean, "low": low, "high": high, "subjects": scores}
    first = names[0]
    differences: dict[str, dict[str, Any]] = {}
    for name in names[1:]:
        shared = [s for s in methods[name]["subjects"] if s in methods[first]["subjects"]]
        if not shared:
            raise ConfigError(f"{name!r} and {first!r} have no subject in common to compare")
        differences[name] = {}
        for c in columns:
            ours, ref = table[name][c.key]["subjects"], table[first][c.key]["subjects"]
            diffs = {s: ours[s] - ref[s] for s in shared}
            mean, low, high = interval(list(diffs.values()), resamples, seed)
            differences[name][c.key] = {"mean": mean, "low": low, "high": high,
                                        "subjects": diffs}  # fmt: skip
    return {
        "columns": [dataclasses.asdict(c) for c in columns],
        "methods": table,
        "differences": differences,
        "settings": {"resamples": resamples, "seed": seed, "level": LEVEL, "reference": first},
    }


def _cell(stats: Mapping[str, float] | None, signed: bool = False) -> str:
    if stats is None:
        return "-"
    fmt = "+.3f" if signed else ".3f"
    return f"{stats['mean']:{fmt}} [{stats['low']:{fmt}}, {stats['high']:{fmt}}]"


def _plain(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _direction(columns: Sequence[Column]) -> str:
    """' Higher is better, except for leakage.' (naming every lower-is-better column), or ''."""
    lower = [c.header for c in columns if not c.higher_is_better]
    return f" Higher is better, except for {', '.join(lower)}." if lower else ""


def markdown(
    comparison: Mapping[str, Any],
    sources: Mapping[str, str],
    plots: Sequence[str],
    command: str | None = None,
) -> str:
    """results.md: the table with intervals, the paired differences, the published rows, the
    per-subject scores and the plots."""
    columns = [Column(**c) for c in comparison["columns"]]
    s = comparison["settings"]
    names = list(comparison["methods"])
    head = "| method | subjects | " + " | ".join(c.header for c in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = ["# Method comparison", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Mean over subjects, with its {s['level']:.0%} percentile-bootstrap interval over "
        f"subjects ({s['resamples']} resamples, seed {s['seed']}).{_direction(columns)}",
        "",
        head,
        rule,
    ]
    for name in names:
        row = comparison["methods"][name]
        count = len(next(iter(row.values()))["subjects"]) if row else 0
        lines.append(f"| {name} | {count} | " + " | ".join(_cell(row[c.key]) for c in columns)
                     + " |")  # fmt: skip
    if comparison["differences"]:
        lines += ["", f"Paired differences against **{s['reference']}** (mean over the subjects "
                  "both have of method - reference, with its bootstrap interval; an interval "
                  "without 0 is a difference the subjects support):", "", head, rule]  # fmt: skip
        for name, row in comparison["differences"].items():
            count = len(next(iter(row.values()))["subjects"]) if row else 0
            cells = " | ".join(_cell(row[c.key], signed=True) for c in columns)
            lines.append(f"| {name} - {s['reference']} | {count} | {cells} |")
    published = [c for c in columns if c.key in report.METRICS]
    if published:  # DreamBench's metrics only
        lines += ["", "Published (DreamBench, real weights; not comparable with tiny or ToyBench "
                  "runs):", "", "| method | " + " | ".join(c.header for c in published)
                  + " | source |", "|---|" + "---|" * len(published) + "---|"]  # fmt: skip
        for row in report.PUBLISHED:
            cells = " | ".join(_plain(row[c.key]) for c in published)
            lines.append(f"| {row['method']} | {cells} | {row['source']} |")
    subjects = sorted({s for n in names for c in columns
                       for s in comparison["methods"][n][c.key]["subjects"]})  # fmt: skip
    headers = " | ".join(c.header for c in columns)
    lines += ["", "Per subject:", "", f"| subject | method | {headers} |",
              "|---|---|" + "---|" * len(columns)]  # fmt: skip
    for subject in subjects:
        for name in names:
            row = comparison["methods"][name]
            if subject not in next(iter(row.values()))["subjects"]:
                continue
            cells = " | ".join(_plain(row[c.key]["subjects"][subject]) for c in columns)
            lines.append(f"| {subject} | {name} | {cells} |")
    lines += ["", "Evaluations:", ""]
    lines += [f"- {name}: `{path}`" for name, path in sources.items()]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "the comparison plots need matplotlib: pip install 'idfuse_jax[compare]'"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def tradeoff_pairs(columns: Sequence[Column]) -> list[tuple[Column, Column]]:
    """(subject column, prompt column) of each panel of the tradeoff plot: every "subject"
    column against the "prompt" column of its benchmark, where both are in the table."""
    prompt = {c.bench: c for c in columns if c.role == "prompt"}
    return [(c, prompt[c.bench]) for c in columns if c.role == "subject" and c.bench in prompt]


def plot_tradeoff(comparison: Mapping[str, Any], path: pathlib.Path) -> bool:
    """Subject fidelity against prompt fidelity (DINO and CLIP-I against CLIP-T; ToyBench's
    identity against its prompt fidelity), one point per method with its intervals on both
    axes: the field's tradeoff plot. False (nothing drawn) when no pair is in the table."""
    pairs = tradeoff_pairs([Column(**c) for c in comparison["columns"]])
    if not pairs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), squeeze=False)
    for ax, (ycol, xcol) in zip(axes[0], pairs):
        for name, row in comparison["methods"].items():
            x, y = row[xcol.key], row[ycol.key]
            ax.errorbar(
                x["mean"], y["mean"],
                xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
                fmt="o", capsize=3, label=name,
            )  # fmt: skip
        ax.set_xlabel(xcol.label)
        ax.set_ylabel(ycol.label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Mean over subjects, {LEVEL:.0%} bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_subjects(comparison: Mapping[str, Any], path: pathlib.Path) -> None:
    """One panel per column: grouped bars, one group per subject, one bar per method."""
    plt = _pyplot()
    columns = [Column(**c) for c in comparison["columns"]]
    names = list(comparison["methods"])
    subjects = sorted({s for n in names for c in columns
                       for s in comparison["methods"][n][c.key]["subjects"]})  # fmt: skip
    width = 0.8 / len(names)
    side = min(16, max(6, 0.25 * len(subjects) * len(names) + 2))  # inches; README-sized
    fig, axes = plt.subplots(len(columns), 1, figsize=(side, 2.6 * len(columns)), squeeze=False)
    positions = np.arange(len(subjects))
    for ax, column in zip(axes[:, 0], columns):
        for i, name in enumerate(names):
            scores = comparison["methods"][name][column.key]["subjects"]
            heights = [scores.get(s, np.nan) for s in subjects]
            ax.bar(positions + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
        ax.set_ylabel(column.header + ("" if column.higher_is_better else " (lower is better)"))
        ax.set_xticks(positions, subjects, rotation=30 if len(subjects) > 6 else 0, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(len(names), 4))
    axes[0, 0].set_title("Per-subject scores (mean over the subject's images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(
    out: pathlib.Path,
    comparison: Mapping[str, Any],
    sources: Mapping[str, str],
    command: str | None = None,
) -> list[pathlib.Path]:
    """comparison.json, the plots (tradeoff.png, subjects.png) and results.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(
        json.dumps({**comparison, "sources": dict(sources)}, indent=2) + "\n"
    )
    plots = []
    if plot_tradeoff(comparison, out / "tradeoff.png"):
        plots.append("tradeoff.png")
    plot_subjects(comparison, out / "subjects.png")
    plots.append("subjects.png")
    (out / "results.md").write_text(markdown(comparison, sources, plots, command))
    return [out / "comparison.json", out / "results.md", *(out / p for p in plots)]
