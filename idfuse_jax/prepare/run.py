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
from collections.abc import Sequence

import cv2
import numpy as np
import tqdm
from absl import logging

from idfuse_jax import paths
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
from idfuse_jax.paths import PathLike
from idfuse_jax.prepare.checks import MaskCheck
from idfuse_jax.prepare.inpaint import Inpainter, make_inpainter
from idfuse_jax.prepare.keys import method_key, method_name
from idfuse_jax.prepare.masks import CENTRE_PRIOR, Segmenter, make_segmenter

MANIFEST = "manifest.json"
PREVIEW = "preview.png"
_FORMAT = 2  # bump when the outputs or manifest entries of an unchanged method would change
_RED = (220, 0, 0)
DEFAULT_CHECK = MaskCheck()


def _write_png(path: paths.Path, array: np.ndarray) -> None:
    """Never a half-written output, even if interrupted (and no rename in the cloud)."""
    paths.save_png(path, array)


def _check_outside(inputs: paths.Path, out_dir: paths.Path) -> None:
    root, out = paths.display(inputs).rstrip("/"), paths.display(out_dir).rstrip("/")
    if out == root or out.startswith(root + "/"):
        raise DataError(f"{out_dir}: output folder is inside the input folder {root}")


def preview(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    backgrounds: Sequence[np.ndarray],
    height: int = 160,
    reasons: Sequence[str | None] | None = None,
) -> np.ndarray:
    """One row per photo: image | mask | background, each scaled to `height`, on white.

    A row whose entry in `reasons` is not None (a rejected mask) gets a red frame and the
    reason written across its bottom.
    """
    reasons = reasons if reasons is not None else [None] * len(images)
    rows = []
    for image, mask, background, reason in zip(images, masks, backgrounds, reasons):
        w = max(1, round(image.shape[1] * height / image.shape[0]))
        tiles = [image, np.repeat(mask[..., None] * 255, 3, axis=-1), background]
        tiles = [cv2.resize(t, (w, height), interpolation=cv2.INTER_AREA) for t in tiles]
        gap = np.full((height, 4, 3), 255, np.uint8)
        row = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
        rows.append(row if reason is None else _mark_rejected(row, reason))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def _mark_rejected(row: np.ndarray, reason: str, frame: int = 4) -> np.ndarray:
    """The row inside a red frame, with the reason in white on a red band along its bottom."""
    row = row.copy()
    row[:frame], row[-frame:], row[:, :frame], row[:, -frame:] = _RED, _RED, _RED, _RED
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    lines = _wrap(f"no explicit decoupling: {reason}", row.shape[1] - 4 * frame, font, scale)
    (_, text_h), base = cv2.getTextSize(reason, font, scale, thickness)
    line_h = text_h + base + 2
    row[-(line_h * len(lines) + frame) :] = _RED
    for i, line in enumerate(lines):
        y = row.shape[0] - frame - base - line_h * (len(lines) - 1 - i)
        cv2.putText(row, line, (2 * frame, y), font, scale, (255, 255, 255), thickness)
    return row


def _wrap(text: str, width: int, font: int, scale: float) -> list[str]:
    """`text` in lines no wider than `width` pixels (a word is never split)."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and cv2.getTextSize(candidate, font, scale, 1)[0][0] > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """Where the outputs went, which photos (by stem) were computed or found up to date, and
    which train without explicit decoupling (stem -> reason)."""

    out_dir: paths.Path
    processed: tuple[str, ...]
    skipped: tuple[str, ...]
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)


def _read_manifest(out_dir: paths.Path) -> dict[str, dict]:
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if manifest.get("format") != _FORMAT:
        return {}
    return manifest.get("images", {})


def _write_manifest(out_dir: paths.Path, entries: dict[str, dict]) -> None:
    manifest = {"format": _FORMAT, "images": entries}
    paths.write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _cache_key(settings: str, path: paths.Path, given: paths.Path | None) -> str:
    """What the outputs for one photo depend on: methods, photo bytes, given mask bytes."""
    h = hashlib.sha256(settings.encode())
    h.update(path.read_bytes())
    h.update(given.read_bytes() if given else b"")
    return h.hexdigest()


def _output_paths(out_dir: paths.Path, stem: str) -> tuple[paths.Path, paths.Path]:
    return out_dir / MASKS_DIR / f"{stem}.png", out_dir / BACKGROUNDS_DIR / f"{stem}.png"


def choose_mask(
    image: np.ndarray,
    segment: Segmenter,
    check: MaskCheck,
    retry: Segmenter | None = None,
) -> tuple[np.ndarray, dict]:
    """The mask of one photo and its manifest record (source, coverage, retries, accepted and
    the reason when not).

    A mask that fails `check` is recomputed by `retry` (another seeding; it may return None:
    no confident mask); the first mask that passes is kept. When none does, the first mask is
    kept and the photo is not accepted: it trains without explicit decoupling.
    """
    mask = segment(image)
    reason = check(mask)
    record = {"mask_source": method_key(segment), "retries": 0}
    if reason is not None and retry is not None:
        second = retry(image)
        second_reason = "no confident mask" if second is None else check(second)
        record["retries"] = 1
        if second_reason is None:
            record.update(mask_source=method_key(retry), retried_because=reason)
            mask, reason = second, None
        else:
            reason = f"{reason}; retried with {method_name(retry)}: {second_reason}"
    record.update(coverage=round(float(np.mean(mask > 0)), 4), accepted=reason is None)
    record["reason"] = reason
    return mask, record


def _prepare_one(
    path: paths.Path,
    given: paths.Path | None,
    segment: Segmenter | None,
    inpainter: Inpainter,
    check: MaskCheck,
    retry: Segmenter | None,
    min_size: int,
    outputs: tuple[paths.Path, paths.Path],
) -> dict:
    """Mask and background of one photo, written to `outputs`; returns the mask's record."""
    image = read_image(path, min_size)
    if given:  # the user's own mask: checked, never replaced
        given_mask = read_mask(given, image.shape[:2])
        mask, record = choose_mask(image, lambda _: given_mask, check)
        record["mask_source"] = "given"
    else:
        mask, record = choose_mask(image, segment, check, retry)
    if record["retries"] and record["accepted"]:
        logging.info("%s: %s; the retry passed", path, record["retried_because"])
    elif not record["accepted"]:
        logging.warning(
            "%s: no explicit decoupling for this photo (L3, L4 off): %s; see %s",
            path,
            record["reason"],
            outputs[0].parent.parent / PREVIEW,
        )
    background = inpainter(image, mask)
    _write_png(outputs[0], mask.astype(np.uint8) * 255)
    _write_png(outputs[1], np.asarray(background, np.uint8))
    return record


def prepare_subject(
    folder: PathLike,
    out_dir: PathLike,
    *,
    masks: str | Segmenter = "auto",
    onnx_model: PathLike | None = None,
    dino_model: PathLike | None = None,
    inpaint: str | Inpainter = "telea",
    inpaint_model: PathLike | None = None,
    check: MaskCheck = DEFAULT_CHECK,
    retry: Segmenter | None = CENTRE_PRIOR,
    min_size: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Masks, backgrounds, a preview and a manifest for one subject folder, in `out_dir`.

    `masks`: 'auto' (the folder's `masks/<stem>` where present, else the ONNX model when
    `onnx_model` is set, else DINO-seeded GrabCut when `dino_model` is set, else GrabCut seeded
    from the border), 'given' (every photo needs its mask), 'grabcut', 'dino', 'onnx', or any
    function image -> {0,1} mask. `inpaint`: 'telea', 'sd' (with `inpaint_model`), or any
    function (image, mask) -> background. Every mask goes through `check`; a computed mask that
    fails it is retried with `retry` (None: no retry), and a photo whose mask still fails is
    marked not accepted in the manifest (training then leaves out its L3 and L4). Photos whose
    bytes, given mask and methods are unchanged since the last run are skipped; outputs of
    photos no longer present are removed.
    """
    folder, out_dir = paths.as_path(folder), paths.as_path(out_dir)
    photos = list_images(folder)
    _check_outside(folder, out_dir)
    use_given = masks in ("auto", "given")
    segment = make_segmenter(masks, onnx_model, dino_model) if isinstance(masks, str) else masks
    inpainter = make_inpainter(inpaint, inpaint_model) if isinstance(inpaint, str) else inpaint
    settings = "|".join(
        [
            str(_FORMAT),
            method_key(segment) if segment else "given",
            method_key(inpainter),
            check.key,
            method_key(retry) if retry else "no retry",
        ]
    )

    old = _read_manifest(out_dir)
    entries, processed, skipped = {}, [], []
    try:
        for path in tqdm.tqdm(photos, desc=folder.name, unit="img", disable=not progress):
            given = find_sibling(folder / MASKS_DIR, path.stem) if use_given else None
            if given is None and segment is None:
                raise DataError(f"{path}: no mask in {folder / MASKS_DIR} (masks='given')")
            entry = {
                "key": _cache_key(settings, path, given),
                "source": path.name,
                "mask": "given" if given else "computed",
            }
            outputs = _output_paths(out_dir, path.stem)
            previous = old.get(path.stem, {})
            if previous.get("key") == entry["key"] and all(p.is_file() for p in outputs):
                entries[path.stem] = previous
                skipped.append(path.stem)
            else:
                record = _prepare_one(
                    path, given, segment, inpainter, check, retry, min_size, outputs
                )
                entries[path.stem] = {**entry, **record}
                processed.append(path.stem)
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
                [read_image(p) for p in photos],
                [read_mask(out_dir / MASKS_DIR / f"{s}.png") for s in stems],
                [read_image(out_dir / BACKGROUNDS_DIR / f"{s}.png") for s in stems],
                reasons=[entries[s]["reason"] for s in stems],
            ),
        )
    if processed or old != entries:
        _write_manifest(out_dir, entries)
    rejected = {s: e["reason"] for s, e in entries.items() if not e["accepted"]}
    return PrepareResult(out_dir, tuple(processed), tuple(skipped), rejected)


def explicit_decoupling(prepared_dir: PathLike, names: Sequence[str]) -> np.ndarray:
    """Per photo (by stem, in the order of `names`): 1.0 where its mask was accepted, so that
    L3 and L4 use its background; 0.0 where it trains without explicit decoupling. float32 [N].
    """
    prepared_dir = paths.as_path(prepared_dir)
    entries = _read_manifest(prepared_dir)
    missing = [n for n in names if n not in entries]
    if missing:
        raise DataError(
            f"{prepared_dir / MANIFEST}: no current entry for image(s) {', '.join(missing)} "
            "(run idfuse_jax.prepare)"
        )
    return np.asarray([float(entries[n]["accepted"]) for n in names], np.float32)


def rejection_reasons(prepared_dir: PathLike) -> dict[str, str]:
    """stem -> why, for the photos of a prepared folder that train without explicit
    decoupling."""
    entries = _read_manifest(paths.as_path(prepared_dir))
    return {stem: e["reason"] for stem, e in entries.items() if not e["accepted"]}


def prepare_dreambench(
    root: PathLike,
    out_dir: PathLike,
    *,
    subjects: Sequence[str] | None = None,
    **kwargs,
) -> dict[str, PrepareResult]:
    """`prepare_subject` for every subject (or the named ones) of a DreamBench-layout folder,
    into `out_dir/<subject>/`; keyword arguments as for `prepare_subject`."""
    root, out_dir = paths.as_path(root), paths.as_path(out_dir)
    _check_outside(root, out_dir)
    bench = dreambench.read_benchmark(root, subjects)
    return {s: prepare_subject(root / s, out_dir / s, **kwargs) for s in bench.subjects}
