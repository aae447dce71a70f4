r"""Compare methods trained here (presets, or any training workdirs) on DreamBench's metrics.

  python -m idfuse_jax.compare idfuse=runs/idfuse disenbooth=runs/disenbooth \
      dreambooth_lora=runs/dreambooth --dino weights/dino-vits16 \
      --clip weights/clip-vit-base-patch32 --out runs/comparison

Each NAME=WORKDIR is a training workdir (or a job of several subjects, or a folder of them),
as `python -m idfuse_jax.evaluate --workdir` takes it. A method whose WORKDIR/eval/results.json
was written with the same settings and metric models is reused; the others are evaluated
(`idfuse_jax.evaluation.run.evaluate`, which itself reuses the images already drawn). Writes to
--out: results.md (per method the mean over subjects with its 95 % bootstrap interval, paired
differences against the first method, the published rows, per-subject scores),
comparison.json, tradeoff.png (DINO and CLIP-I against CLIP-T) and subjects.png (per-subject
bars). The statistics are documented in `idfuse_jax.evaluation.comparison`.

On ToyBench runs (`--toybench DIR`, or found: every run trained on the photo folders of one
ToyBench folder, as `--config.data.instance_dir=DIR --config.data.subjects=all` does) the
table also has the ground-truth identity, prompt fidelity and background leakage
(`idfuse_jax.evaluation.toybench`), scored from each evaluation's images when its
toybench.json is missing or stale, and the tradeoff plot draws identity against fidelity;
--dino and --clip are then optional:

  python -m idfuse_jax.compare idfuse=runs/idfuse disenbooth=runs/disenbooth \
      --toybench runs/toybench --num_images 2 --out runs/comparison
"""

from __future__ import annotations

import json
import pathlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from idfuse_jax import cli, config_lib
from idfuse_jax.data import world
from idfuse_jax.errors import ConfigError
from idfuse_jax.evaluation import comparison, run, toybench
from idfuse_jax.evaluation.subjects import find_workdirs


def define_flags() -> None:
    """The command's flags, defined when it runs as a program (not on import: tests import this
    module beside sample and compile_check, whose flags share names)."""
    cli.define_evaluation_flags()  # as `evaluate` takes them
    flags.DEFINE_string("out", None, "Output folder of the comparison.")
    flags.DEFINE_integer("resamples", 10_000, "Bootstrap resamples of the subjects.")
    flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the bootstrap.")
    flags.DEFINE_string(
        "toybench", None, "A ToyBench folder: add its ground-truth scores (default: the runs' "
        "photo folder when every run trained on the same ToyBench folder)."
    )  # fmt: skip
    flags.mark_flags_as_required(["out"])


EVAL_DIR = "eval"  # evaluate's default output folder inside a workdir


def parse_methods(args: Sequence[str]) -> dict[str, pathlib.Path]:
    """['idfuse=runs/a', ...] -> {'idfuse': Path('runs/a'), ...}, in order."""
    methods: dict[str, pathlib.Path] = {}
    for arg in args:
        name, sep, workdir = arg.partition("=")
        if not sep or not name or not workdir:
            raise ConfigError(f"expected NAME=WORKDIR, got {arg!r}")
        if name in methods:
            raise ConfigError(f"method {name!r} is given twice")
        methods[name] = pathlib.Path(workdir)
    if not methods:
        raise ConfigError("give at least one NAME=WORKDIR to compare")
    return methods


def _settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The results.json settings an evaluation with these arguments writes."""
    keys = ("num_images", "num_steps", "guidance_scale", "seed", "max_prompts")
    return {k: kwargs[k] for k in keys}


def is_evaluated(results_file: pathlib.Path, kwargs: dict[str, Any]) -> bool:
    """Whether results.json exists and was written with these settings and metric models."""
    if not results_file.is_file():
        return False
    try:
        results = json.loads(results_file.read_text())
    except json.JSONDecodeError:
        return False
    settings = results.get("settings", {})
    same = all(settings.get(k) == v for k, v in _settings(kwargs).items())
    models = results.get("models", {})
    wanted = {k: str(pathlib.Path(kwargs[k]).resolve()) if kwargs.get(k) else None
              for k in ("dino", "clip")}  # fmt: skip
    return same and settings.get("mode") == "generate" and models == wanted


def detect_toybench(methods: dict[str, pathlib.Path]) -> pathlib.Path | None:
    """The ToyBench folder every method's runs trained on (their photo folders' parent, with
    its toybench.json), or None when they are not all ToyBench runs of one folder."""
    found = set()
    for workdir in methods.values():
        try:
            runs = find_workdirs(workdir)
        except ConfigError:
            return None  # not a workdir: evaluate's own error says so
        for run_dir in runs:
            photos = config_lib.load_run_config(run_dir).data.instance_dir
            if photos.startswith(world.PREFIX) or not photos:
                return None  # rendered in-process: no folder to score against
            bench = pathlib.Path(photos).parent
            if not (bench / world.TRUTH_FILE).is_file():
                return None
            found.add(bench.resolve())
    return found.pop() if len(found) == 1 else None


def toybench_scores(
    out: pathlib.Path, bench: pathlib.Path, results: dict[str, Any]
) -> dict[str, Any]:
    """OUT/toybench.json's content: reused when it scored this bench and as many images per
    subject as results.json has, else scored from OUT/images and written (toybench.md too)."""
    path = out / "toybench.json"
    if path.is_file():
        try:
            truth = json.loads(path.read_text())
        except json.JSONDecodeError:
            truth = {}
        subjects = truth.get("subjects", {})
        if truth.get("bench") == str(bench.resolve()) and all(
            name in subjects and len(subjects[name]["images"]) == entry["num_images"]
            for name, entry in results["subjects"].items()
        ):
            return truth
    truth = toybench.score_folder(out / "images", bench)
    toybench.write_scores(out, truth)
    return truth


def evaluated(
    methods: dict[str, pathlib.Path], toybench_dir: pathlib.Path | None = None, **kwargs: Any
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({name: results.json content}, {name: its path}), evaluating what is not yet; with
    `toybench_dir`, each subject's entry also has its ToyBench scores (`TOYBENCH_KEYS`)."""
    results, sources = {}, {}
    for name, workdir in methods.items():
        out = workdir / EVAL_DIR
        if is_evaluated(out / "results.json", kwargs):
            print(f"{name}: reusing {out / 'results.json'}", flush=True)
            results[name] = json.loads((out / "results.json").read_text())
        else:
            print(f"{name}: evaluating {workdir}", flush=True)
            results[name] = run.evaluate(
                workdir=str(workdir), out=str(out),
                toybench_dir=str(toybench_dir) if toybench_dir else None, **kwargs,
            )  # fmt: skip
        if toybench_dir is not None:
            truth = toybench_scores(out, toybench_dir, results[name])
            results[name] = comparison.with_toybench(results[name], truth)
        sources[name] = str((out / "results.json").resolve())
    return results, sources


def compare_methods(
    methods: dict[str, pathlib.Path],
    out: str | pathlib.Path,
    *,
    resamples: int = 10_000,
    bootstrap_seed: int = 0,
    command: str | None = None,
    toybench: str | pathlib.Path | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate what is missing, compare, write --out; returns the comparison. `toybench` (a
    ToyBench folder; default: detected from the runs) adds the ground-truth columns."""
    if resamples < 1:
        raise ConfigError(f"--resamples={resamples} must be at least 1")
    if toybench is not None:
        world.read_truth(toybench)  # a ToyBench folder, or one clear line now
        bench = pathlib.Path(toybench)
    else:
        bench = detect_toybench(methods)
        if bench is not None:
            print(f"ToyBench runs: scoring against {bench}", flush=True)
    results, sources = evaluated(methods, bench, **evaluate_kwargs)
    table = comparison.compare(results, resamples, bootstrap_seed)
    comparison.write(pathlib.Path(out), table, sources, command)
    return table


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    methods = cli.run_or_fail(parse_methods, argv[1:])
    command = "python -m idfuse_jax.compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = cli.run_or_fail(
        compare_methods,
        methods,
        f.out,
        resamples=f.resamples,
        bootstrap_seed=f.bootstrap_seed,
        command=command,
        toybench=f.toybench,
        **cli.evaluation_flag_values(),
    )
    for name, row in table["methods"].items():
        cells = ", ".join(f"{k} {v['mean']:.3f}" for k, v in row.items())
        print(f"{name}: {cells}", flush=True)
    print(f"Wrote {pathlib.Path(f.out) / 'results.md'}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
