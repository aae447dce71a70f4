"""The comparison's statistics against a bootstrap written here, and what it writes.

The command end to end (trained runs of two presets, evaluation, reuse) is in
tests/test_evaluate.py, beside the trained runs it shares.
"""

import json

import numpy as np
import pytest
from PIL import Image

from idfuse_jax import compare as compare_cli
from idfuse_jax.errors import ConfigError
from idfuse_jax.evaluation import comparison

SUBJECTS = ("dog", "cat", "can", "vase", "clock")


def results(seed: int, subjects=SUBJECTS, shift: float = 0.0) -> dict:
    """A results.json of made-up per-subject scores."""
    rng = np.random.default_rng(seed)
    return {
        "subjects": {
            s: {k: float(rng.uniform(0.2, 0.8) + shift) for k in ("dino", "clip_i", "clip_t")}
            for s in subjects
        }
    }


def reference_interval(values, resamples, seed):
    """The percentile bootstrap of the mean, one resample at a time."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, np.float64)
    means = []
    for _ in range(resamples):
        picks = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in picks) / len(values))
    return values.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_intervals_and_paired_differences_match_a_plain_bootstrap():
    first = results(0)
    # The second method lists its subjects in another order and lacks one: pairs go by name.
    second = results(1, subjects=SUBJECTS[::-1][:4], shift=0.05)
    table = comparison.compare({"a": first, "b": second}, resamples=500, seed=7)
    assert [c["key"] for c in table["columns"]] == ["dino", "clip_i", "clip_t"]
    for name, res in (("a", first), ("b", second)):
        for metric in ("dino", "clip_i", "clip_t"):
            values = [res["subjects"][s][metric] for s in res["subjects"]]
            got = table["methods"][name][metric]
            expected = reference_interval(values, 500, 7)
            np.testing.assert_allclose((got["mean"], got["low"], got["high"]), expected,
                                       rtol=1e-12)  # fmt: skip
            assert got["low"] < got["mean"] < got["high"]
    for metric in ("dino", "clip_i", "clip_t"):
        shared = [s for s in second["subjects"] if s in first["subjects"]]
        diffs = [second["subjects"][s][metric] - first["subjects"][s][metric] for s in shared]
        got = table["differences"]["b"][metric]
        assert sorted(got["subjects"]) == sorted(SUBJECTS[1:])
        np.testing.assert_allclose((got["mean"], got["low"], got["high"]),
                                   reference_interval(diffs, 500, 7), rtol=1e-12)  # fmt: skip
    assert "a" not in table["differences"]


def test_a_column_some_method_lacks_is_left_out_and_errors_are_one_line(tmp_path):
    first, second = results(0), results(1)
    for s in first["subjects"].values():
        s["clip_t"] = None  # e.g. an evaluation without prompts
    table = comparison.compare({"a": first, "b": second}, resamples=10)
    assert [c["key"] for c in table["columns"]] == ["dino", "clip_i"]
    with pytest.raises(ConfigError, match="'b' and 'a' have no subject in common"):
        comparison.compare({"a": results(0, ("x",)), "b": results(1, ("y",))}, resamples=10)
    with pytest.raises(ConfigError, match=r"^expected NAME=WORKDIR, got 'runs/a'$"):
        compare_cli.parse_methods(["runs/a"])
    with pytest.raises(ConfigError, match=r"^method 'a' is given twice$"):
        compare_cli.parse_methods(["a=x", "a=y"])


def test_writes_table_plots_and_published_rows(tmp_path):
    methods = {"idfuse": results(0), "disenbooth": results(1, shift=-0.1)}
    table = comparison.compare(methods, resamples=200, seed=0)
    sources = {"idfuse": "a/results.json", "disenbooth": "b/results.json"}
    paths = comparison.write(tmp_path, table, sources, "the command")
    assert sorted(p.name for p in paths) == [
        "comparison.json", "results.md", "subjects.png", "tradeoff.png"]  # fmt: skip
    md = (tmp_path / "results.md").read_text()
    row = table["methods"]["disenbooth"]
    cells = " | ".join(f"{row[m]['mean']:.3f} [{row[m]['low']:.3f}, {row[m]['high']:.3f}]"
                       for m in ("dino", "clip_i", "clip_t"))  # fmt: skip
    assert f"| disenbooth | 5 | {cells} |" in md
    diff = table["differences"]["disenbooth"]["dino"]
    assert f"| disenbooth - idfuse | 5 | {diff['mean']:+.3f} [{diff['low']:+.3f}, " in md
    assert "| DreamBooth (Stable Diffusion) | 0.668 | 0.803 | 0.305 |" in md
    assert "![tradeoff.png](tradeoff.png)" in md and "the command" in md
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["methods"]["idfuse"]["dino"]["mean"] == pytest.approx(
        np.mean([s["dino"] for s in methods["idfuse"]["subjects"].values()])
    )
    for name in ("tradeoff.png", "subjects.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank
