"""ToyBench scores with ground truth: identity, prompt fidelity and background leakage.

Every colour of the world (`data.world`) is one of a few known palette colours plus a little
noise, so a pixel's nearest palette colour says what it shows: one of the places' textures, an
object body colour, or the pattern's black. On that label map:

- the object is the largest connected region of object labels (body colours and black);
- identity compares the object with the subject's instance, one third each for
  colour (the most frequent body colour), shape (the object's silhouette, scaled to its bounding
  box, against each shape's: highest IoU) and pattern (where its black falls, against each
  pattern's, in the same frame; little black: plain);
- prompt fidelity is the share of the background (everything but the object) that shows the
  prompt's place;
- background leakage, for prompts of places the subject was never photographed on, is the share
  of the background that shows one of its photos' places.

On rendered scenes these are exact up to noise (tested); on generated images they measure what
a person would read off the picture: is it the subject's shape, colour and pattern, and where.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from idfuse_jax.data import dreambench, world
from idfuse_jax.errors import DataError
from idfuse_jax.evaluation import generation

FRAME = 16  # side of the bounding-box frame silhouettes and patterns are compared in
MIN_OBJECT = 0.01  # an object smaller than this share of the image counts as absent
PLAIN_BELOW = 0.08  # share of black in the object under which it is plain
FAR_FROM_PLACES = 60.0  # RGB distance from every place colour beyond which a pixel is object
DARK = 60.0  # mean level under which an object pixel is the pattern's black

_PLACE_NAMES = tuple(world.PLACES)
_COLOUR_NAMES = tuple(world.COLOURS)
# Prototype colours and what each one means: places' palettes, then body colours, then black.
_PROTOTYPES = np.array(
    [c for _, palette in world.PLACES.values() for c in palette]
    + list(world.COLOURS.values())
    + [world.PATTERN_COLOUR],
    np.float32,
)
_PLACE_OF_PROTOTYPE = np.array(
    [k for k, (_, palette) in enumerate(world.PLACES.values()) for _ in palette]
)
NUM_PLACES, NUM_COLOURS = len(_PLACE_NAMES), len(_COLOUR_NAMES)
BLACK = NUM_PLACES + NUM_COLOURS  # label of the pattern's black


def label_pixels(image: np.ndarray) -> np.ndarray:
    """int [H, W] labels: 0..NUM_PLACES-1 a place, then a body colour, then BLACK. A pixel far
    from every place colour (a blend of body and black, on a blurred edge) counts as BLACK
    when dark, else as its nearest body colour."""
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    dist = np.sqrt(((pixels - _PROTOTYPES) ** 2).sum(-1))
    n_place = len(_PLACE_OF_PROTOTYPE)
    nearest = np.argmin(dist, axis=-1)
    labels = np.where(nearest < n_place, _PLACE_OF_PROTOTYPE[np.minimum(nearest, n_place - 1)], 0)
    labels = np.where(nearest >= n_place, nearest - n_place + NUM_PLACES, labels)
    strange = dist[:, :n_place].min(-1) > FAR_FROM_PLACES
    dark = pixels[:, 0].mean(-1) < DARK
    body = NUM_PLACES + np.argmin(dist[:, n_place : BLACK - NUM_PLACES + n_place], axis=-1)
    labels = np.where(strange & (labels < NUM_PLACES), np.where(dark, BLACK, body), labels)
    return labels.reshape(image.shape[:2])


def object_mask(labels: np.ndarray) -> np.ndarray:
    """bool [H, W]: the largest connected region of object labels, holes filled."""
    candidate = (labels >= NUM_PLACES).astype(np.uint8)
    count, parts, stats, _ = cv2.connectedComponentsWithStats(candidate, 8)
    if count <= 1:
        return np.zeros(labels.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (parts == largest).astype(np.uint8)
    outside = np.pad(mask, 1)
    cv2.floodFill(outside, None, (0, 0), 2)
    return outside[1:-1, 1:-1] != 2


def _to_frame(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box's contents resized to FRAME x FRAME (area average), as float in [0, 1]."""
    y0, y1, x0, x1 = box
    crop = array[y0:y1, x0:x1].astype(np.float32)
    return cv2.resize(crop, (FRAME, FRAME), interpolation=cv2.INTER_AREA)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


@functools.cache
def _templates() -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """{shape: (silhouette, {pattern: black map})} in the bounding-box frame, drawn large."""
    size = 128
    v, u = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size * 2.2 - 1.1
    out = {}
    for shape in world.SHAPES:
        silhouette = world.shape_mask(shape, u, v)
        box = _box(silhouette)
        patterns = {
            p: _to_frame(silhouette & world.pattern_mask(p, u, v), box) for p in world.PATTERNS
        }
        out[shape] = (_to_frame(silhouette, box), patterns)
    return out


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Reading:
    """What an image shows, read off its label map."""

    shape: str | None
    colour: str | None
    pattern: str | None
    places: dict[str, float]  # share of the background per place
    object_share: float

    def identity(self, instance: world.Instance) -> dict[str, float]:
        found = {
            "shape": self.shape == instance.shape,
            "colour": self.colour == instance.colour,
            "pattern": self.pattern == instance.pattern,
        }
        scores = {k: float(v) for k, v in found.items()}
        return {"identity": float(np.mean(list(scores.values()))), **scores}


def read_image(image: np.ndarray) -> Reading:
    """The object's shape, colour and pattern (None when there is no object) and the places."""
    labels = label_pixels(image)
    obj = object_mask(labels)
    background = labels[~obj]
    counts = np.bincount(background[background < NUM_PLACES], minlength=NUM_PLACES)
    places = {p: float(c / max(background.size, 1)) for p, c in zip(_PLACE_NAMES, counts)}
    share = float(obj.mean())
    if share < MIN_OBJECT:
        return Reading(None, None, None, places, share)
    body = labels[obj]
    colours = np.bincount(body[(body >= NUM_PLACES) & (body < BLACK)] - NUM_PLACES,
                          minlength=NUM_COLOURS)  # fmt: skip
    colour = _COLOUR_NAMES[int(np.argmax(colours))] if colours.sum() else None
    box = _box(obj)
    silhouette = _to_frame(obj, box)
    templates = _templates()
    shape = max(world.SHAPES, key=lambda s: _soft_iou(silhouette, templates[s][0]))
    black = _to_frame(obj & (labels == BLACK), box)
    if black.sum() < PLAIN_BELOW * silhouette.sum():
        pattern = "plain"
    else:
        patterns = templates[shape][1]
        pattern = max(world.PATTERNS[1:], key=lambda p: _soft_iou(black, patterns[p]))
    return Reading(shape, colour, pattern, places, share)


def score_image(
    image: np.ndarray, subject: world.ToySubject, place: str | None
) -> dict[str, float | None]:
    """Identity (and its parts), prompt fidelity (None without a place) and background leakage
    (None unless the prompt's place is new to the subject)."""
    reading = read_image(image)
    fidelity = reading.places[place] if place is not None else None
    new_place = place is not None and place not in subject.places
    leakage = sum(reading.places[p] for p in subject.places) if new_place else None
    return {**reading.identity(subject.instance), "fidelity": fidelity, "leakage": leakage}


METRICS = ("identity", "shape", "colour", "pattern", "fidelity", "leakage")


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def score_folder(images_dir: pathlib.Path, bench_dir: pathlib.Path) -> dict[str, Any]:
    """ToyBench scores of a folder laid out like evaluate's OUT/images (SUBJECT/PP_K.png, PP
    the prompt's index in the bench's prompts_and_classes.txt): per image, subject and overall.
    """
    truth = world.read_truth(bench_dir)
    bench = dreambench.read_benchmark(bench_dir)
    places = [world.place_of(t) for t in bench.object_prompts]
    names = sorted(p.name for p in pathlib.Path(images_dir).iterdir() if p.is_dir())
    unknown = [n for n in names if n not in truth]
    if unknown:
        raise DataError(f"{images_dir / unknown[0]}: not a subject of the ToyBench at {bench_dir}")
    subjects = {}
    for name in names:
        rows = []
        for (p, _), path in sorted(generation.stored_items(images_dir / name).items()):
            if p >= len(places):
                raise DataError(f"{path}: prompt {p} is not among the bench's {len(places)}")
            image = generation.read_generated(path)
            if image is None:
                raise DataError(f"{path}: unreadable image")
            scores = score_image(image, truth[name], places[p])
            rows.append({"file": f"{name}/{path.name}", "place": places[p], **scores})
        if not rows:
            raise DataError(f"{images_dir / name}: no images")
        subjects[name] = {**{m: _mean(rows, m) for m in METRICS}, "images": rows}
    overall = {m: _mean(list(subjects.values()), m) for m in METRICS}
    return {"bench": str(pathlib.Path(bench_dir).resolve()), "overall": overall,
            "subjects": subjects}  # fmt: skip


def score_samples(
    grid: np.ndarray, subject: world.ToySubject, prompts: Sequence[str], resolution: int
) -> dict[str, float | None]:
    """The mean scores of a training run's validation grid (`samples/step_N.png`: one image per
    prompt in a row, `resolution` px each), each image scored against its prompt's place."""
    if grid.shape[:2] != (resolution, resolution * len(prompts)):
        raise DataError(
            f"a sample grid of {len(prompts)} prompts at {resolution} px is "
            f"{resolution}x{resolution * len(prompts)}, not {grid.shape[0]}x{grid.shape[1]}"
        )
    rows = [
        score_image(grid[:, k * resolution : (k + 1) * resolution], subject, world.place_of(p))
        for k, p in enumerate(prompts)
    ]
    return {m: _mean(rows, m) for m in METRICS}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    """The ToyBench table: one row per subject, then the mean."""
    lines = ["| subject | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, row in [*results["subjects"].items(), ("mean", results["overall"])]:
        lines.append(f"| {name} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_scores(out_dir: pathlib.Path, results: dict[str, Any]) -> None:
    """toybench.json and toybench.md in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "toybench.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "toybench.md").write_text(markdown(results), encoding="utf-8")
