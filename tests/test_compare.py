"""The comparison's statistics against a bootstrap written here, and what it writes.

The command end to end (trained runs of two presets, evaluation, reuse) is in
tests/test_evaluate.py, beside the trained runs it shares.
"""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from idfuse_jax import compare as compare_cli
from idfuse_jax.errors import ConfigError, DataError
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


def fake_toybench_method(root, bench, subjects, wrong_colour, off_place):
    """A method folder as a ToyBench job leaves it, without training: per subject a workdir
    config.json (photo folder BENCH/NAME), and an evaluation (results.json without the metric
    models, one image per prompt) whose images are rendered scenes, so their truth is known:
    the subject's instance (with another colour for the subjects in `wrong_colour`) on the
    prompt's place, except prompts in `off_place`, drawn on the subject's first photo place.
    Returns {subject: [(identity, fidelity, leakage or None) per image]} as constructed."""
    from configs import world as world_config
    from idfuse_jax.data import world
    from idfuse_jax.evaluation import generation

    places = list(world.PLACES)  # ToyBench's prompt p is place p
    truth, entries = {}, {}
    for subject in subjects:
        config = world_config.get_config()
        config.data.instance_dir = str(bench / subject.name)
        (root / subject.name).mkdir(parents=True)
        (root / subject.name / "config.json").write_text(config.to_json_best_effort())
        instance = subject.instance
        identity = 1.0
        if subject.name in wrong_colour:
            other = next(c for c in world.COLOURS if c != instance.colour)
            instance, identity = dataclasses.replace(instance, colour=other), 2 / 3
        rows = []
        for p, place in enumerate(places):
            drawn = subject.places[0] if p in off_place else place
            scene = world.render(instance, drawn, 32, np.random.default_rng([p, len(rows)]))
            generation.write_png(root / "eval/images" / subject.name / f"{p:02d}_0.png",
                                 scene.image)  # fmt: skip
            new = place not in subject.places
            rows.append((identity, float(drawn == place),
                         float(drawn in subject.places) if new else None))  # fmt: skip
        truth[subject.name] = rows
        entries[subject.name] = {"num_images": len(places), "dino": None, "clip_i": None,
                                 "clip_t": None}  # fmt: skip
    settings = {"mode": "generate", "num_images": 1, "num_steps": None, "guidance_scale": None,
                "seed": 0, "max_prompts": None}  # fmt: skip
    (root / "eval/results.json").write_text(
        json.dumps(
            {"settings": settings, "models": {"dino": None, "clip": None}, "subjects": entries}
        )
    )
    return truth


def test_toybench_columns_are_the_truth_of_rendered_images(tmp_path):
    """compare on ToyBench runs (found from their photo folders) scores their images against
    the ground truth: identity, prompt fidelity and leakage per subject are what the images
    were drawn to show, and the means, intervals and paired differences follow."""
    from idfuse_jax.data import world

    subjects = world.SUBJECTS[:4]
    bench = world.write_toybench(tmp_path / "bench", 32, subjects=subjects)
    good = fake_toybench_method(tmp_path / "good", bench, subjects, (), ())
    bad = fake_toybench_method(tmp_path / "bad", bench, subjects,
                               {subjects[0].name, subjects[2].name}, {1, 3, 6})  # fmt: skip
    methods = {"good": tmp_path / "good", "bad": tmp_path / "bad"}
    kwargs = dict(dino=None, clip=None, num_images=1, num_steps=None, guidance_scale=None,
                  seed=0, max_prompts=None, batch_size=4)  # fmt: skip
    table = compare_cli.compare_methods(methods, tmp_path / "out", resamples=300,
                                        bootstrap_seed=3, **kwargs)  # fmt: skip
    assert [c["key"] for c in table["columns"]] == ["identity", "fidelity", "leakage"]
    expected = {}
    for name, truth in (("good", good), ("bad", bad)):
        expected[name] = {}
        for k, metric in enumerate(("identity", "fidelity", "leakage")):
            per_subject = {s: np.mean([r[k] for r in rows if r[k] is not None])
                           for s, rows in truth.items()}  # fmt: skip
            expected[name][metric] = per_subject
            got = table["methods"][name][metric]
            np.testing.assert_allclose([got["subjects"][s] for s in per_subject],
                                       list(per_subject.values()), atol=0.02)  # fmt: skip
            if metric == "identity":  # exact: the intervals are the bootstrap's
                np.testing.assert_allclose(
                    (got["mean"], got["low"], got["high"]),
                    reference_interval(list(per_subject.values()), 300, 3),
                    rtol=1e-12,
                )
    assert expected["bad"]["leakage"][subjects[0].name] > 0  # the off-place prompts leak
    diffs = [expected["bad"]["identity"][s] - expected["good"]["identity"][s] for s in good]
    got = table["differences"]["bad"]["identity"]
    np.testing.assert_allclose((got["mean"], got["low"], got["high"]),
                               reference_interval(diffs, 300, 3), rtol=1e-12)  # fmt: skip
    md = (tmp_path / "out/results.md").read_text()
    assert "| method | subjects | identity | fidelity | leakage |" in md
    assert "except for leakage" in md and "Published" not in md  # DreamBench rows: no columns
    assert (tmp_path / "out/tradeoff.png").is_file()  # identity against fidelity
    # The scores were written beside each evaluation, and a second comparison reuses them.
    scored = tmp_path / "good/eval/toybench.json"
    stamp = scored.stat().st_mtime_ns
    again = compare_cli.compare_methods(methods, tmp_path / "out", resamples=300,
                                        bootstrap_seed=3, toybench=bench, **kwargs)  # fmt: skip
    assert again["methods"] == table["methods"] and scored.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not a ToyBench folder"):
        compare_cli.compare_methods(methods, tmp_path / "out", toybench=tmp_path, **kwargs)
