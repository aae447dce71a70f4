"""An evaluation from start to end: check the inputs, generate what is missing, score, report.

`evaluate(...)` is what `python -m idfuse_jax.evaluate` runs (see that module for the command);
it takes plain arguments, so a script or notebook can call it too. Every folder may be local or
gs://. With several processes (`multihost=True`, every host running the same command) the images
are generated over every host's devices; process 0 alone writes and scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from idfuse_jax import metrics, paths, sharding
from idfuse_jax.data import images as images_lib
from idfuse_jax.data import world
from idfuse_jax.errors import ConfigError, DataError
from idfuse_jax.evaluation import encoders, generation, report, scores, toybench
from idfuse_jax.evaluation.subjects import (
    WEIGHTS_FILE,
    Subject,
    find_workdirs,
    subject_from_workdir,
    subjects_from_images,
)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"--{name}={value} must be at least 1")


def resolve_subjects(
    workdir: str | None, images: str | None, dreambench: str | None, max_prompts: int | None
) -> list[Subject]:
    """The subjects to evaluate, checked before any work (weights, prompts, real images)."""
    bench = paths.as_path(dreambench) if dreambench else None
    if images is not None:
        subjects = subjects_from_images(paths.as_path(images), bench, max_prompts)
    elif workdir is not None:
        subjects = [subject_from_workdir(w, bench, max_prompts) for w in find_workdirs(workdir)]
    else:
        raise ConfigError("give --workdir RUN (generate and score) or --images FOLDER (score)")
    names = [s.name for s in subjects]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"subject {name!r} appears twice; evaluate those runs separately")
    return subjects


def read_real(subject: Subject) -> list[np.ndarray]:
    """A subject's real photos (DataError: missing or empty folder, unreadable photo)."""
    return [images_lib.read_image(p) for p in images_lib.list_images(subject.real_dir)]


def with_sampler_flags(
    subject: Subject, num_steps: int | None, guidance_scale: float | None
) -> Subject:
    """The subject with its run's sampler settings overridden where the flags are given."""
    if subject.config is None:
        return subject
    config = subject.config.copy_and_resolve_references()
    if num_steps is not None:
        config.sample.num_steps = num_steps
    if guidance_scale is not None:
        config.sample.guidance_scale = guidance_scale
    return dataclasses.replace(subject, config=config)


def missing_everywhere(
    folder: paths.Path, num_prompts: int, num_images: int, resolution: int
) -> list[generation.Item]:
    """`generation.missing_items` as process 0 sees them, on every process: all processes must
    run the same batches, and only process 0 need see the output folder."""
    missing = np.zeros((num_prompts, num_images), np.bool_)
    if jax.process_index() == 0:
        for p, k in generation.missing_items(folder, num_prompts, num_images, resolution):
            missing[p, k] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sharding.sync_processes("idfuse_jax: evaluation items listed")
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [(int(p), int(k)) for p, k in zip(*np.nonzero(missing))]


def generate_all(
    subjects: Sequence[Subject],
    images_dir: paths.Path,
    *,
    num_images: int,
    seed: int,
    batch_size: int,
) -> int:
    """Draw every missing or broken image (process 0 writes them); returns how many were drawn."""
    configs = [s.config for s in subjects]
    todo = [
        missing_everywhere(images_dir / s.name, len(s.prompts), num_images, c.data.resolution)
        for s, c in zip(subjects, configs)
    ]
    total = sum(len(s.prompts) for s in subjects) * num_images
    drawn = sum(map(len, todo))
    is_main = jax.process_index() == 0
    bar = tqdm(total=total, initial=total - drawn, unit="img", desc="generate",
               dynamic_ncols=True, disable=not is_main)  # fmt: skip
    samplers: dict[str, generation.Sampler] = {}
    for subject, config, items in zip(subjects, configs, todo):
        if not items:
            continue
        key = generation.generation_key(config)
        if key not in samplers:
            samplers[key] = generation.make_sampler(config, batch_size)
        sampler = samplers[key]
        trainable = generation.load_trainable(sampler, config, subject.workdir / WEIGHTS_FILE)
        folder = images_dir / subject.name
        batches = generation.generate_items(
            sampler, trainable, subject.prompts, subject.name, items, seed
        )
        for chunk, pictures in batches:
            for (p, k), picture in zip(chunk, pictures):
                if is_main:
                    generation.write_png(folder / generation.image_name(p, k), picture)
            bar.update(len(chunk))
    bar.close()
    return drawn


def read_images(
    subject: Subject, folder: paths.Path, num_images: int | None
) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
    """{(prompt, image): (file name, uint8 image)} of a subject: images 0..num_images-1 of each
    prompt, or (None) whatever each prompt has stored. A prompt without images or a broken file
    is a DataError."""
    if num_images is None:
        paths = generation.stored_items(folder)
    else:
        paths = {(p, k): folder / generation.image_name(p, k)
                 for p in range(len(subject.prompts)) for k in range(num_images)}  # fmt: skip
    out = {}
    for p in range(len(subject.prompts)):
        items = [item for item in paths if item[0] == p]
        if not items:
            raise DataError(f"{folder}: no image of prompt {p} ({generation.image_name(p, 0)})")
        for item in items:
            image = generation.read_generated(paths[item])
            if image is None:
                raise DataError(f"{paths[item]}: missing or unreadable image")
            out[item] = (paths[item].name, image)
    return out


def score_subject(
    subject: Subject,
    real: Sequence[np.ndarray],
    generated: dict[tuple[int, int], tuple[str, np.ndarray]],
    models: encoders.MetricModels,
    real_baseline: bool,
) -> dict[str, Any]:
    """Per-image, per-prompt and subject scores (and the real-image baseline when asked)."""
    items = sorted(generated)
    pictures = [generated[i][1] for i in items]
    real_dino, real_clip = models.dino(real), models.clip_image(real)
    gen_clip = models.clip_image(pictures)
    text = models.clip_text(subject.texts)
    per_image = {
        "dino": scores.image_similarity(models.dino(pictures), real_dino),
        "clip_i": scores.image_similarity(gen_clip, real_clip),
        "clip_t": scores.text_similarity(gen_clip, text[[p for p, _ in items]]),
    }
    image_rows = [
        {
            "file": f"{subject.name}/{generated[(p, k)][0]}",
            "prompt_index": p,
            "image_index": k,
            **{m: float(per_image[m][i]) for m in report.METRICS},
        }
        for i, (p, k) in enumerate(items)
    ]
    prompt_rows = []
    for p, (prompt, text_prompt) in enumerate(zip(subject.prompts, subject.texts)):
        rows = [r for r in image_rows if r["prompt_index"] == p]
        prompt_rows.append(
            {"index": p, "prompt": prompt, "clip_t_prompt": text_prompt,
             **report.mean_scores(rows), "images": rows}
        )  # fmt: skip
    result = {
        "class_name": subject.class_name,
        "live": subject.live,
        "workdir": paths.display(subject.workdir) if subject.workdir else None,
        "real_dir": paths.display(subject.real_dir),
        "num_real": len(real),
        "num_images": len(items),
        **report.mean_scores(image_rows),
        "prompts": prompt_rows,
    }
    if subject.config is not None:
        s = subject.config.sample
        result["sampler"] = {"sampler": s.sampler, "num_steps": s.num_steps,
                             "guidance_scale": s.guidance_scale,
                             "resolution": subject.config.data.resolution}  # fmt: skip
    if real_baseline:
        result["real_baseline"] = {
            "dino": float(scores.real_similarity(real_dino).mean()),
            "clip_i": float(scores.real_similarity(real_clip).mean()),
        }
    return result


def first_per_prompt(generated: dict[tuple[int, int], tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """The lowest-numbered image of each prompt, in prompt order (a grid's generated rows)."""
    first: dict[int, np.ndarray] = {}
    for p, k in sorted(generated):
        first.setdefault(p, generated[(p, k)][1])
    return list(first.values())


def without_metric_models(subject: Subject, generated: dict, real: Sequence[np.ndarray]) -> dict:
    """A subject's entry when DINO and CLIP are not given (ToyBench's own scores only)."""
    return {"class_name": subject.class_name, "live": subject.live, "num_real": len(real),
            "num_images": len(generated), **dict.fromkeys(report.METRICS)}  # fmt: skip


def evaluate(
    *,
    dino: str | None,
    clip: str | None,
    workdir: str | None = None,
    out: str | None = None,
    num_images: int = 4,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    real_baseline: bool = False,
    images: str | None = None,
    dreambench: str | None = None,
    max_prompts: int | None = None,
    batch_size: int = 4,
    multihost: bool = False,
    toybench_dir: str | None = None,
) -> dict[str, Any] | None:
    """Generate (unless `images`), score and write the report; returns results.json's content
    (None on processes other than 0 of a multi-host evaluation, which only generate).

    Every input is checked before any image is drawn: the runs and their weights, the prompts,
    the real images, the metric folders. `toybench_dir` (a `data.world.write_toybench` folder)
    stands for `dreambench` and adds the ground-truth scores (toybench.json, toybench.md);
    DINO and CLIP are then optional.
    """
    sharding.maybe_initialize_distributed(multihost)
    if toybench_dir is not None:
        world.read_truth(toybench_dir)  # a ToyBench folder, or a clear error now
        dreambench = dreambench or toybench_dir
    if (dino is None or clip is None) and (toybench_dir is None or dino or clip):
        raise ConfigError("give both --dino and --clip (optional only with --toybench)")
    if real_baseline and dino is None:
        raise ConfigError("--real_baseline scores DINO and CLIP-I: give --dino and --clip")
    for name, value in (("num_images", num_images), ("num_steps", num_steps),
                        ("max_prompts", max_prompts), ("batch_size", batch_size)):  # fmt: skip
        _positive(name, value)
    subjects = [
        with_sampler_flags(s, num_steps, guidance_scale)
        for s in resolve_subjects(workdir, images, dreambench, max_prompts)
    ]
    real = {s.name: read_real(s) for s in subjects}
    if real_baseline:
        few = [name for name, photos in real.items() if len(photos) < 2]
        if few:
            raise DataError(f"--real_baseline: subject {few[0]!r} has fewer than 2 real images")
    models = encoders.load_metric_models(dino, clip) if dino else None
    drawn = 0
    if images is not None:
        images_dir = paths.as_path(images)
        out_dir = paths.as_path(out) if out else images_dir.parent
    else:
        out_dir = paths.as_path(out) if out else paths.as_path(workdir) / "eval"
        images_dir = out_dir / "images"
        drawn = generate_all(
            subjects, images_dir, num_images=num_images, seed=seed, batch_size=batch_size
        )
    if jax.process_index() != 0:  # the others wait for process 0 to score and write
        sharding.sync_processes("idfuse_jax: evaluation done")
        return None
    per_subject = {}
    for s in subjects:
        generated = read_images(s, images_dir / s.name, None if images else num_images)
        if models is None:
            per_subject[s.name] = without_metric_models(s, generated, real[s.name])
        else:
            per_subject[s.name] = score_subject(s, real[s.name], generated, models, real_baseline)
        grid = report.subject_grid(real[s.name], first_per_prompt(generated))
        metrics.save_png(out_dir / "grids" / f"{s.name}.png", grid)
    results = {
        "settings": {
            "mode": "images" if images else "generate",
            "num_prompts": max(len(s.prompts) for s in subjects),
            "num_images": None if images else num_images,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "max_prompts": max_prompts,
            "batch_size_per_device": batch_size,
            "devices": jax.device_count(),
            "generated_this_run": drawn,
        },
        "models": {
            "dino": str(models.dino_dir) if models else None,
            "clip": str(models.clip_dir) if models else None,
        },
        "inputs": {
            "workdir": None if images or not workdir else paths.display(workdir),
            "images": paths.display(images_dir),
            "out": paths.display(out_dir),
            "dreambench": paths.display(dreambench) if dreambench else None,
        },
        "published": list(report.PUBLISHED),
        "overall": {
            **report.mean_scores(list(per_subject.values())),
            "num_subjects": len(per_subject),
            "num_images": sum(r["num_images"] for r in per_subject.values()),
        },
        "subjects": per_subject,
    }
    if real_baseline:
        baselines = {name: r["real_baseline"] for name, r in per_subject.items()}
        results["real_baseline"] = {
            "overall": report.mean_scores(list(baselines.values()), ("dino", "clip_i")),
            "subjects": baselines,
        }
    if toybench_dir is not None:
        truth = toybench.score_folder(images_dir, paths.as_path(toybench_dir))
        toybench.write_scores(out_dir, truth)
        results["toybench"] = truth["overall"]
    report.write_results(out_dir, results)
    sharding.sync_processes("idfuse_jax: evaluation done")
    return results
