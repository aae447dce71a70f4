"""The cached run: masks, backgrounds, a preview and a manifest for a subject folder.

Outputs go into an output folder, never into the input: `masks/*.png` (0/255, one per photo,
same size as the photo), `backgrounds/*.png` (the photo with the subject inpainted away),
`preview.png` (image | mask | background rows) and `manifest.json`. The manifest holds a
content hash per photo (photo bytes, given mask bytes, method settings), so a rerun skips
photos whose inputs and settings are unchanged and removes outputs of photos no longer there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import tqdm
from absl import logging
from PIL import Image

from idfuse_jax.data import dreambench
from idfuse_jax.data.images import (
    BACKGROUNDS_DIR,
    MASKS_DIR,
    find_sibling,
    list_images,
    read_image,
    read_mask,
)
from idfuse_jax.errors import DataError
from idfuse_jax.prepare.inpaint import Inpainter, make_inpainter
from idfuse_jax.prepare.masks import Segmenter, make_segmenter

PathLike = str | pathlib.Path

MANIFEST = "manifest.json"
PREVIEW = "preview.png"
_TINY_MASK = 0.01  # masks under this fraction of the photo are probably a failed segmentation
_FORMAT = 1  # bump when the outputs of an unchanged method would change


def method_key(fn: Callable) -> str:
    """What identifies a mask/inpaint method and its settings in the cache key."""
    key = getattr(fn, "key", None)
    return key if isinstance(key, str) else f"{fn.__module__}.{fn.__qualname__}"


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
    """Write atomically, so an interrupted run never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _check_outside(inputs: pathlib.Path, out_dir: pathlib.Path) -> None:
    inputs, out = inputs.resolve(), out_dir.resolve()
    if out == inputs or inputs in out.parents:
        raise DataError(f"{out_dir}: output folder is inside the input folder {inputs}")


def preview(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    backgrounds: Sequence[np.ndarray],
    height: int = 160,
) -> np.ndarray:
    """One row per photo: image | mask | background, each scaled to `height`, on white."""
    rows = []
    for image, mask, background in zip(images, masks, backgrounds):
        w = max(1, round(image.shape[1] * height / image.shape[0]))
        tiles = [image, np.repeat(mask[..., None] * 255, 3, axis=-1), background]
        tiles = [cv2.resize(t, (w, height), interpolation=cv2.INTER_AREA) for t in tiles]
        gap = np.full((height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """Where the outputs went, and which photos (by stem) were computed or found up to date."""

    out_dir: pathlib.Path
    processed: tuple[str, ...]
    skipped: tuple[str, ...]


def _read_manifest(out_dir: pathlib.Path) -> dict[str, dict]:
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if manifest.get("format") != _FORMAT:
        return {}
    return manifest.get("images", {})


def _write_manifest(out_dir: pathlib.Path, entries: dict[str, dict]) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": _FORMAT, "images": entries}, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST)


def _cache_key(settings: str, path: pathlib.Path, given: pathlib.Path | None) -> str:
    """What the outputs for one photo depend on: methods, photo bytes, given mask bytes."""
    h = hashlib.sha256(settings.encode())
    h.update(path.read_bytes())
    h.update(given.read_bytes() if given else b"")
    return h.hexdigest()


def _output_paths(out_dir: pathlib.Path, stem: str) -> tuple[pathlib.Path, pathlib.Path]:
    return out_dir / MASKS_DIR / f"{stem}.png", out_dir / BACKGROUNDS_DIR / f"{stem}.png"


def _prepare_one(
    path: pathlib.Path,
    given: pathlib.Path | None,
    segment: Segmenter | None,
    inpainter: Inpainter,
    min_size: int,
    outputs: tuple[pathlib.Path, pathlib.Path],
) -> None:
    """Mask and background of one photo, written to `outputs`."""
    image = read_image(path, min_size)
    mask = read_mask(given, image.shape[:2]) if given else segment(image)
    if mask.mean() < _TINY_MASK:
        logging.warning(
            "%s: the mask covers %.1f%% of the photo (failed segmentation?); see %s",
            path,
            100 * mask.mean(),
            outputs[0].parent.parent / PREVIEW,
        )
    background = inpainter(image, mask)
    _write_png(outputs[0], mask.astype(np.uint8) * 255)
    _write_png(outputs[1], np.asarray(background, np.uint8))


def prepare_subject(
    folder: PathLike,
    out_dir: PathLike,
    *,
    masks: str | Segmenter = "auto",
    onnx_model: PathLike | None = None,
    inpaint: str | Inpainter = "telea",
    inpaint_model: PathLike | None = None,
    min_size: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Masks, backgrounds and a preview for one subject folder, written to `out_dir`.

    `masks`: 'auto' (the folder's `masks/<stem>` where present, else GrabCut, or the ONNX model
    when `onnx_model` is set), 'given' (every photo needs its mask), 'grabcut', 'onnx', or any
    function image -> {0,1} mask. `inpaint`: 'telea', 'sd' (with `inpaint_model`), or any
    function (image, mask) -> background. Photos whose bytes, given mask and methods are
    unchanged since the last run are skipped; outputs of photos no longer present are removed.
    """
    folder, out_dir = pathlib.Path(folder), pathlib.Path(out_dir)
    paths = list_images(folder)
    _check_outside(folder, out_dir)
    use_given = masks in ("auto", "given")
    segment = make_segmenter(masks, onnx_model) if isinstance(masks, str) else masks
    inpainter = make_inpainter(inpaint, inpaint_model) if isinstance(inpaint, str) else inpaint
    settings = f"{_FORMAT}|{method_key(segment) if segment else 'given'}|{method_key(inpainter)}"

    old = _read_manifest(out_dir)
    entries, processed, skipped = {}, [], []
    try:
        for path in tqdm.tqdm(paths, desc=folder.name, unit="img", disable=not progress):
            given = find_sibling(folder / MASKS_DIR, path.stem) if use_given else None
            if given is None and segment is None:
                raise DataError(f"{path}: no mask in {folder / MASKS_DIR} (masks='given')")
            entry = {
                "key": _cache_key(settings, path, given),
                "source": path.name,
                "mask": "given" if given else "computed",
            }
            outputs = _output_paths(out_dir, path.stem)
            if old.get(path.stem, {}).get("key") == entry["key"] and all(
                p.is_file() for p in outputs
            ):
                skipped.append(path.stem)
            else:
                _prepare_one(path, given, segment, inpainter, min_size, outputs)
                processed.append(path.stem)
            entries[path.stem] = entry
    except BaseException:
        if processed:  # keep the finished work: a rerun skips it
            _write_manifest(out_dir, {**old, **entries})
        raise

    for stem in set(old) - set(entries):  # photos removed from the input since the last run
        for sub in (MASKS_DIR, BACKGROUNDS_DIR):
            (out_dir / sub / f"{stem}.png").unlink(missing_ok=True)
    if processed or set(old) != set(entries) or not (out_dir / PREVIEW).is_file():
        stems = list(entries)
        _write_png(
            out_dir / PREVIEW,
            preview(
                [read_image(p) for p in paths],
                [read_mask(out_dir / MASKS_DIR / f"{s}.png") for s in stems],
                [read_image(out_dir / BACKGROUNDS_DIR / f"{s}.png") for s in stems],
            ),
        )
    if processed or old != entries:
        _write_manifest(out_dir, entries)
    return PrepareResult(out_dir, tuple(processed), tuple(skipped))


def prepare_dreambench(
    root: PathLike,
    out_dir: PathLike,
    *,
    subjects: Sequence[str] | None = None,
    **kwargs,
) -> dict[str, PrepareResult]:
    """`prepare_subject` for every subject (or the named ones) of a DreamBench-layout folder,
    into `out_dir/<subject>/`; keyword arguments as for `prepare_subject`."""
    root, out_dir = pathlib.Path(root), pathlib.Path(out_dir)
    _check_outside(root, out_dir)
    bench = dreambench.read_benchmark(root, subjects)
    return {s: prepare_subject(root / s, out_dir / s, **kwargs) for s in bench.subjects}
