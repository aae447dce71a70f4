"""Subject masks M_i: GrabCut seeded from the image border or from a saliency map (a DINO
ViT's attention, or a centre prior), or a user-supplied ONNX model.

A segmenter is a function `image uint8 [H, W, 3] -> mask uint8 [H, W] in {0, 1}`. Masks given
by the user (a subject folder's own `masks/`) need no segmenter; `make_segmenter` returns None
for them. Also here: the mask geometry helpers shared with inpainting (`dilate`, resizing).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from idfuse_jax.errors import DataError
from idfuse_jax.models.image_stats import IMAGENET_MEAN, IMAGENET_STD
from idfuse_jax.prepare.keys import file_digest, method_key

PathLike = str | pathlib.Path
Segmenter = Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> uint8 [H, W] in {0, 1}

MASK_SOURCES = ("auto", "given", "grabcut", "dino", "onnx")


# --------------------------------------------------------------------------------------------
# Mask geometry


def shrink(array: np.ndarray, work_size: int, interpolation: int) -> np.ndarray:
    """`array` with its long side brought down to `work_size` (never enlarged)."""
    h, w = array.shape[:2]
    scale = work_size / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(array, size, interpolation=interpolation)


def grow(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A {0, 1} mask resized (bilinear, threshold 1/2) to `shape[:2]`."""
    if mask.shape[:2] == shape[:2]:
        return mask
    up = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return (up >= 0.5).astype(np.uint8)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` (an elliptic structuring element)."""
    if pixels <= 0:
        return mask.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel)


def dilation_pixels(shape: tuple[int, ...], fraction: float) -> int:
    """`fraction` of the image's shorter side, at least 1 px (0 when fraction is 0)."""
    return 0 if fraction <= 0 else max(1, round(fraction * min(shape[:2])))


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


# --------------------------------------------------------------------------------------------
# GrabCut


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
        small = shrink(image, self.work_size, cv2.INTER_AREA)
        h, w = small.shape[:2]
        band = max(1, round(self.border * min(h, w)))
        if min(h, w) <= 2 * band + 1:
            return np.zeros(image.shape[:2], np.uint8)
        seed = np.full((h, w), cv2.GC_PR_FGD, np.uint8)
        seed[-band:] = cv2.GC_PR_BGD
        seed[:band], seed[:, :band], seed[:, -band:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
        return grow(grabcut(small, seed, self.iterations), image.shape)


def grabcut(image: np.ndarray, seed: np.ndarray, iterations: int) -> np.ndarray:
    """GrabCut of `image` (RGB uint8) from a `seed` of cv2.GC_* labels: the {0, 1} subject,
    main connected parts only, enclosed holes filled. Deterministic."""
    seed = seed.copy()
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])  # OpenCV's channel order
    cv2.setRNGSeed(0)  # GrabCut's k-means init is random: keep masks reproducible
    cv2.grabCut(bgr, seed, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    mask = ((seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)).astype(np.uint8)
    return fill_holes(clean_mask(mask))


def top_mass(saliency: np.ndarray, mass: float) -> np.ndarray:
    """The smallest set of the most salient pixels that holds `mass` of the total saliency
    (DINO's own way of thresholding its attention maps), as a boolean map."""
    flat = np.sort(saliency.ravel())[::-1]
    total = np.cumsum(flat, dtype=np.float64)
    if total[-1] <= 0:
        return np.zeros(saliency.shape, bool)
    index = min(int(np.searchsorted(total, mass * total[-1])), flat.size - 1)
    return saliency >= flat[index]


def saliency_seed(
    saliency: np.ndarray, *, sure_mass: float = 0.1, mass: float = 0.6, floor: float = 0.1
) -> np.ndarray:
    """GrabCut seed labels from a saliency map (values >= 0).

    The most salient pixels holding `sure_mass` of the total are sure subject, those holding
    `mass` probable subject; pixels under `floor` x the maximum are sure background, the rest
    probable background. No sure background along the border, so a subject that touches it
    keeps its border pixels.
    """
    seed = np.full(saliency.shape, cv2.GC_PR_BGD, np.uint8)
    seed[top_mass(saliency, mass)] = cv2.GC_PR_FGD
    seed[top_mass(saliency, sure_mass)] = cv2.GC_FGD
    seed[saliency < floor * saliency.max()] = cv2.GC_BGD
    return seed


def saliency_grabcut(
    image: np.ndarray, saliency: np.ndarray, *, iterations: int = 5, work_size: int = 256
) -> np.ndarray:
    """GrabCut seeded by a saliency map (any size, values >= 0; `saliency_seed`) instead of the
    image border, at a working size whose long side is `work_size`; the map is upsampled
    (bilinear). An empty mask when the map has no contrast (GrabCut needs both kinds of seed).
    """
    small = shrink(image, work_size, cv2.INTER_AREA)
    h, w = small.shape[:2]
    up = cv2.resize(np.asarray(saliency, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    seed = saliency_seed(np.maximum(up, 0))
    subject = (seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)
    if subject.all() or not subject.any():
        return np.zeros(image.shape[:2], np.uint8)
    return grow(grabcut(small, seed, iterations), image.shape)


@dataclasses.dataclass(frozen=True)
class SaliencyGrabCut:
    """`saliency_grabcut` with the map from `saliency` (image -> map [h, w], values >= 0), e.g.
    a DINO ViT's attention (`saliency.DinoSaliency`)."""

    saliency: Callable[[np.ndarray], np.ndarray]
    iterations: int = 5
    work_size: int = 256

    @property
    def key(self) -> str:
        return (
            f"saliency_grabcut({method_key(self.saliency)},iterations={self.iterations},"
            f"size={self.work_size})"
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return saliency_grabcut(
            image, self.saliency(image), iterations=self.iterations, work_size=self.work_size
        )


def centre_prior(shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A saliency map that says "the subject is in the middle": a centred Gaussian whose
    standard deviation is `sigma` x each side."""
    h, w = shape[:2]
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None] ** 2) / sigma**2).astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (1 for two empty masks)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclasses.dataclass(frozen=True)
class CentrePrior:
    """The retry after a collapsed mask: GrabCut seeded by two centre priors, a narrow and a
    wide one (`sigmas`), trusted only when the two agree (IoU >= `agreement`).

    A centre prior is a weak hint: on DreamBench's collapsed photos it often grabs a table or a
    bench, and then the two widths disagree; where they agree, the subject was found. Returns
    the narrow prior's mask, or None when the two disagree (no confident mask).
    """

    sigmas: tuple[float, float] = (0.2, 0.3)
    agreement: float = 0.8
    work_size: int = 256

    @property
    def name(self) -> str:
        return "centre prior"

    @property
    def key(self) -> str:
        return (
            f"centre_prior(sigmas={self.sigmas},agreement={self.agreement},size={self.work_size})"
        )

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        narrow, wide = (
            saliency_grabcut(image, centre_prior(image.shape, s), work_size=self.work_size)
            for s in self.sigmas
        )
        return narrow if iou(narrow, wide) >= self.agreement else None


CENTRE_PRIOR = CentrePrior()


# --------------------------------------------------------------------------------------------
# ONNX segmentation model


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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
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
        digest = file_digest(self.path)[:16]
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


def make_segmenter(
    masks: str, onnx_model: PathLike | None = None, dino_model: PathLike | None = None
) -> Segmenter | None:
    """The segmenter for a `masks` choice (one of MASK_SOURCES); None for 'given'.

    'auto' takes the ONNX model when one is given, else DINO-seeded GrabCut when a DINO folder
    is given, else GrabCut seeded from the border (the offline default).
    """
    if masks not in MASK_SOURCES:
        raise DataError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {masks!r}")
    if masks == "given":
        return None
    if masks == "onnx" or (masks == "auto" and onnx_model):
        if not onnx_model:
            raise DataError("masks='onnx' needs the path of a segmentation .onnx model")
        return OnnxSegmenter(onnx_model)
    if masks == "dino" or (masks == "auto" and dino_model):
        if not dino_model:
            raise DataError("masks='dino' needs the folder of a DINO ViT (transformers ViTModel)")
        from idfuse_jax.prepare.saliency import DinoSaliency  # JAX and the ViT: only when asked

        return SaliencyGrabCut(DinoSaliency(dino_model))
    return GrabCut()
