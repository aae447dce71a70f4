"""What an evaluation writes: results.json, results.md (ours beside the published numbers) and
one grid PNG per subject (real images on top, one generated image per prompt below)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idfuse_jax import metrics, paths
from idfuse_jax.data import images as images_lib

METRICS = ("dino", "clip_i", "clip_t")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
_SOURCE = "DreamBooth paper (Ruiz et al., CVPR 2023), Table 1"
# The DreamBench rows of the DreamBooth paper (Stable Diffusion rows; real images: the same
# metrics among the real photos of each subject).
PUBLISHED = (
    {"method": "DreamBooth (Stable Diffusion)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305,
     "source": f"{_SOURCE}, SD row"},
    {"method": "Textual Inversion (Stable Diffusion)", "dino": 0.569, "clip_i": 0.780,
     "clip_t": 0.255, "source": f"{_SOURCE}, SD row"},
    {"method": "Real images", "dino": 0.774, "clip_i": 0.885, "clip_t": None,
     "source": _SOURCE},
)  # fmt: skip


def mean_scores(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = METRICS) -> dict:
    """The mean of each metric over rows (per-image, per-prompt or per-subject scores); None
    where a row lacks the metric (an evaluation without DINO and CLIP, on ToyBench)."""
    values = {k: [r[k] for r in rows] for k in keys}
    return {k: None if None in v else float(np.mean(v)) for k, v in values.items()}


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: the overall table beside the published rows, then one row per subject."""
    s = results["settings"]
    lines = [
        "# DreamBench evaluation",
        "",
        f"{len(results['subjects'])} subject(s), {results['overall']['num_images']} images "
        f"scored ({s['num_prompts']} prompts per subject, "
        f"{s['num_images'] or 'stored'} images per prompt); "
        f"DINO: `{results['models']['dino']}`; CLIP: `{results['models']['clip']}`.",
        "",
        "| method | DINO | CLIP-I | CLIP-T | source |",
        "|---|---|---|---|---|",
    ]
    o = results["overall"]
    lines.append(f"| ours | {_cell(o['dino'])} | {_cell(o['clip_i'])} | {_cell(o['clip_t'])} "
                 "| this evaluation |")  # fmt: skip
    if "real_baseline" in results:
        r = results["real_baseline"]["overall"]
        lines.append(f"| real images (ours) | {_cell(r['dino'])} | {_cell(r['clip_i'])} | - "
                     "| this evaluation, among the real images |")  # fmt: skip
    for row in PUBLISHED:
        cells = " | ".join(_cell(row[k]) for k in METRICS)
        lines.append(f"| {row['method']} | {cells} | {row['source']} |")
    lines += ["", "| subject | class | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|---|"]
    for name, sub in results["subjects"].items():
        cells = " | ".join(_cell(sub[k]) for k in METRICS)
        lines.append(f"| {name} | {sub['class_name']} | {cells} |")
    return "\n".join(lines) + "\n"


def write_results(out: paths.Path, results: Mapping[str, Any]) -> None:
    paths.write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    paths.write_text(out / "results.md", markdown(results))


def subject_grid(real: Sequence[np.ndarray], generated: Sequence[np.ndarray]) -> np.ndarray:
    """The real images (centre-cropped to the generated size) in the top row(s), then one
    generated image per prompt, at least 5 per row."""
    size = generated[0].shape[0]
    columns = max(len(real), 5)
    real = np.stack([images_lib.resize_crop(x, size) for x in real])
    return np.concatenate(
        [metrics.image_grid(real, columns), metrics.image_grid(np.stack(generated), columns)]
    )
