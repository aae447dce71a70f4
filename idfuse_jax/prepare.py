"""Explicit decoupling, prepared once per subject: subject masks M_i and backgrounds x'_i.

  python -m idfuse_jax.prepare data/dreambooth/dog --out runs/dog/prepared
  python -m idfuse_jax.prepare data/dreambooth --out prepared/dreambench   # every subject

Writes `masks/*.png` (0/255, one per photo, same size as the photo), `backgrounds/*.png` (the
photo with the subject inpainted away) and `preview.png` (image | mask | background rows) into
the output folder, never into the input. Masks come from the subject folder's own `masks/`
when present, else from GrabCut seeded from the image border (offline default), or from an ONNX
segmentation model the user points to. Backgrounds are OpenCV Telea inpainting of the dilated
mask (offline default), or a Stable Diffusion inpainting model run with our own UNet. A
manifest of content hashes makes a rerun skip photos whose inputs and settings are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import tqdm
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
from idfuse_jax.errors import EXIT_USER_ERROR, DataError, UserError

PathLike = str | pathlib.Path
Segmenter = Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> uint8 [H, W] in {0, 1}
Inpainter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image, mask) -> uint8 [H, W, 3]

MASK_CHOICES = ("auto", "given", "grabcut", "onnx")
INPAINT_CHOICES = ("telea", "sd")
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
_TINY_MASK = 0.01  # masks under this fraction of the photo are probably a failed segmentation
_FORMAT = 1  # bump when the outputs of an unchanged method would change

log = logging.getLogger(__name__)


def method_key(fn: Callable) -> str:
    """What identifies a mask/inpaint method and its settings in the cache key."""
    key = getattr(fn, "key", None)
    return key if isinstance(key, str) else f"{fn.__module__}.{fn.__qualname__}"


def _shrink(array: np.ndarray, work_size: int, interpolation: int) -> np.ndarray:
    """`array` with its long side brought down to `work_size` (never enlarged)."""
    h, w = array.shape[:2]
    scale = work_size / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(array, size, interpolation=interpolation)


def _grow(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A {0, 1} mask resized (bilinear, threshold 1/2) to `shape[:2]`."""
    if mask.shape[:2] == shape[:2]:
        return mask
    up = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return (up >= 0.5).astype(np.uint8)


def clean_mask(mask: np.ndarray, min_fraction: float = 0.2) -> np.ndarray:
    """Drop specks: keep connected parts at least `min_fraction` of the largest part's area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count <= 1:
        return mask.astype(np.uint8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
    return np.isin(labels, keep).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region it encloses filled (background reachable from the border
    stays background): GrabCut tends to drop eyes, mouths and logos from the subject."""
    h, w = mask.shape
    outside = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(outside, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
    return (outside[1:-1, 1:-1] != 2).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class GrabCut:
    """GrabCut seeded from the image border, on a copy whose long side is `work_size`.

    A band of `border` x the shorter side along the top, left and right edges is sure
    background; the bottom band only probable background, because photographed subjects are
    often cut by the bottom edge (a sitting dog, a worn backpack). The inside starts as probable
    subject. The result keeps the main connected parts, with enclosed holes filled.
    """

    border: float = 0.04
    iterations: int = 5
    # On DreamBench, 256 px segments as well as or better than 384-512 px, 3-4x faster.
    work_size: int = 256

    @property
    def key(self) -> str:
        return f"grabcut(border={self.border},iterations={self.iterations},size={self.work_size})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        small = _shrink(image, self.work_size, cv2.INTER_AREA)
        h, w = small.shape[:2]
        band = max(1, round(self.border * min(h, w)))
        if min(h, w) <= 2 * band + 1:
            return np.zeros(image.shape[:2], np.uint8)
        seed = np.full((h, w), cv2.GC_PR_FGD, np.uint8)
        seed[-band:] = cv2.GC_PR_BGD
        seed[:band], seed[:, :band], seed[:, -band:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = np.ascontiguousarray(small[..., ::-1])  # OpenCV's channel order
        cv2.setRNGSeed(0)  # GrabCut's k-means init is random: keep masks reproducible
        cv2.grabCut(bgr, seed, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        mask = ((seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)).astype(np.uint8)
        return _grow(fill_holes(clean_mask(mask)), image.shape)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _score_map(output: np.ndarray, path: pathlib.Path) -> np.ndarray:
    """A segmentation model's first output as a 2-D foreground score in [0, 1]."""
    out = np.asarray(output, np.float32)
    if out.ndim == 4 and out.shape[-1] in (1, 2) and out.shape[1] > 2:
        out = np.moveaxis(out, -1, 1)  # NHWC -> NCHW
    if out.ndim == 4 and out.shape[0] == 1 and out.shape[1] == 2:
        logits = out[0] - out[0].max(axis=0)
        return (np.exp(logits[1]) / np.exp(logits).sum(axis=0)).astype(np.float32)
    while out.ndim > 2 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 2:
        raise DataError(
            f"{path}: output shape {tuple(output.shape)} is not a single foreground map "
            "([1,1,H,W], [1,H,W], [H,W] or two-class [1,2,H,W])"
        )
    if out.min() < 0 or out.max() > 1:  # logits, not probabilities
        out = 1 / (1 + np.exp(-out))
    return out


class OnnxSegmenter:
    """A user-supplied ONNX segmentation model (onnxruntime, the `onnx` extra).

    Contract: input 0 takes float32 [1, 3, H, W] RGB scaled to [0, 1] then normalised by
    (x - mean) / std (ImageNet statistics by default); H, W are the model's static input size
    or `size` when dynamic. Output 0 is one foreground map ([1, 1, h, w], [1, h, w] or [h, w];
    logits if any value lies outside [0, 1]) or two-class scores [1, 2, h, w]. The map is
    resized to the photo and thresholded at `threshold`.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        size: int = 512,
        mean: Sequence[float] = _IMAGENET_MEAN,
        std: Sequence[float] = _IMAGENET_STD,
        threshold: float = 0.5,
    ):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: ONNX model file not found")
        try:
            import onnxruntime
        except ImportError:
            raise DataError(
                f"{self.path}: onnxruntime is not installed (pip install 'idfuse_jax[onnx]')"
            ) from None
        try:
            self._session = onnxruntime.InferenceSession(
                str(self.path), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own non-ValueError types
            raise DataError(f"{self.path}: not a loadable ONNX model ({e})") from None
        inp = self._session.get_inputs()[0]
        if len(inp.shape) != 4:
            raise DataError(f"{self.path}: input 0 has shape {inp.shape}, expected [1, 3, H, W]")
        h, w = inp.shape[2:]
        self._input = inp.name
        self._size = (h if isinstance(h, int) else size, w if isinstance(w, int) else size)
        self._mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.threshold = threshold
        digest = _file_digest(self.path)[:16]
        self.key = (
            f"onnx(sha256={digest},size={self._size},mean={tuple(mean)},std={tuple(std)},"
            f"threshold={threshold})"
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = self._size
        x = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = (x.transpose(2, 0, 1)[None] - self._mean) / self._std
        output = self._session.run(None, {self._input: x.astype(np.float32)})[0]
        score = _score_map(output, self.path)
        score = cv2.resize(score, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        return (score >= self.threshold).astype(np.uint8)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` (an elliptic structuring element)."""
    if pixels <= 0:
        return mask.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel)


def dilation_pixels(shape: tuple[int, ...], fraction: float) -> int:
    """`fraction` of the image's shorter side, at least 1 px (0 when fraction is 0)."""
    return 0 if fraction <= 0 else max(1, round(fraction * min(shape[:2])))


@dataclasses.dataclass(frozen=True)
class Telea:
    """OpenCV Telea inpainting of the mask dilated by `dilate` x the shorter side (covering the
    subject's soft edge and contact shadow), at a working size whose long side is `work_size`;
    pixels outside the dilated mask keep the photo's own values."""

    dilate: float = 0.02
    radius: int = 5
    work_size: int = 512

    @property
    def key(self) -> str:
        return f"telea(dilate={self.dilate},radius={self.radius},size={self.work_size})"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hole = dilate(mask, dilation_pixels(image.shape, self.dilate))
        if not hole.any():
            return image.copy()
        small = _shrink(image, self.work_size, cv2.INTER_AREA)
        small_hole = _grow(hole, small.shape)
        # The hole at working size must cover the full-size hole, or a seam of subject remains.
        small_hole = dilate(small_hole, 1) if small.shape != image.shape else small_hole
        filled = cv2.inpaint(
            np.ascontiguousarray(small[..., ::-1]), small_hole * 255, self.radius, cv2.INPAINT_TELEA
        )[..., ::-1]
        if filled.shape != image.shape:
            filled = cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        return np.where(hole[..., None] > 0, filled, image)


# --------------------------------------------------------------------------------------------
# Preparing a folder


def _file_digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def make_segmenter(masks: str, onnx_model: PathLike | None = None) -> Segmenter | None:
    """The segmenter for a `masks` choice; None for 'given' (user masks only)."""
    if masks not in MASK_CHOICES:
        raise DataError(f"masks must be one of {', '.join(MASK_CHOICES)}, got {masks!r}")
    if masks == "given":
        return None
    if masks == "onnx" or (masks == "auto" and onnx_model):
        if not onnx_model:
            raise DataError("masks='onnx' needs the path of a segmentation .onnx model")
        return OnnxSegmenter(onnx_model)
    return GrabCut()


def make_inpainter(inpaint: str, inpaint_model: PathLike | None = None) -> Inpainter:
    """The inpainter for an `inpaint` choice ('telea', or 'sd' with a model folder)."""
    if inpaint not in INPAINT_CHOICES:
        raise DataError(f"inpaint must be one of {', '.join(INPAINT_CHOICES)}, got {inpaint!r}")
    if inpaint == "telea":
        return Telea()
    if not inpaint_model:
        raise DataError("inpaint='sd' needs the folder of an SD inpainting model")
    from idfuse_jax.data.sd_inpaint import SDInpainter  # heavy (JAX models): only when asked

    return SDInpainter(inpaint_model)


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
        log.warning(
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m idfuse_jax.prepare",
        description="Subject masks and inpainted backgrounds for a subject folder or a whole "
        "DreamBench folder (one with prompts_and_classes.txt).",
    )
    p.add_argument("input", help="subject folder, or DreamBench folder")
    p.add_argument("--out", required=True, help="output folder (never inside the input)")
    p.add_argument("--masks", default="auto", choices=MASK_CHOICES)
    p.add_argument("--onnx_model", default=None, help="segmentation .onnx file (masks=onnx)")
    p.add_argument("--inpaint", default="telea", choices=INPAINT_CHOICES)
    p.add_argument("--inpaint_model", default=None, help="SD inpainting folder (inpaint=sd)")
    p.add_argument("--subjects", default="", help="comma-separated DreamBench subjects")
    p.add_argument("--min_size", type=int, default=0, help="refuse photos with a smaller side")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (EXIT_USER_ERROR, one line, on bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    kwargs = dict(
        masks=args.masks,
        onnx_model=args.onnx_model,
        inpaint=args.inpaint,
        inpaint_model=args.inpaint_model,
        min_size=args.min_size,
    )
    try:
        root = pathlib.Path(args.input)
        if (root / dreambench.PROMPTS_FILE).is_file():
            subjects = [s for s in args.subjects.split(",") if s] or None
            results = prepare_dreambench(root, args.out, subjects=subjects, **kwargs)
        else:
            results = {root.name: prepare_subject(root, args.out, **kwargs)}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    done = sum(len(r.processed) for r in results.values())
    kept = sum(len(r.skipped) for r in results.values())
    print(f"prepared {done} image(s), {kept} already up to date, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
