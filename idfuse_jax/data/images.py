"""Reading a subject folder: photos (and optional masks) to fixed-size uint8 arrays.

Layout of a subject folder: JPEG/PNG/WebP photos, optionally `masks/` beside them holding one
mask per photo with the same stem (`masks/00.png` for `00.jpg`). Other files are skipped with a
warning; sub-folders are ignored. Nothing here ever writes into the folder.

Data-side conventions: images are uint8 HWC RGB; masks are uint8 HW with values {0, 1}
(1 = subject); backgrounds (the photo with the subject inpainted away) are uint8 HWC RGB, the
same size as their photo. `to_model` turns images into the model side's float32 in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from idfuse_jax import paths
from idfuse_jax.errors import DataError
from idfuse_jax.paths import PathLike

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASKS_DIR = "masks"
BACKGROUNDS_DIR = "backgrounds"


def list_images(folder: PathLike) -> list[paths.Path]:
    """The photos of a subject folder (local or gs://), sorted by name; other files are skipped
    with a warning."""
    folder = paths.as_path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: subject folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    images, stems = [], {}
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            logging.warning("%s: not a JPEG, PNG or WebP image; skipped", path)
            continue
        if path.stem in stems:
            raise DataError(f"{path}: has the same stem as {stems[path.stem].name}")
        stems[path.stem] = path
        images.append(path)
    if not images:
        raise DataError(f"{folder}: no images (JPEG, PNG or WebP)")
    return images


def _open(path: paths.Path) -> Image.Image:
    """The fully decoded image, EXIF orientation applied; any decoding failure is a DataError."""
    try:
        # Read whole, then decode: one request for a cloud file.
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e})") from None


def _wide_grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit or float grey to 8 bits, by the range the values evidently use."""
    top = float(a.max(initial=0))
    if mode == "F" and top <= 1:
        scale = 255.0  # float images in [0, 1]
    elif top <= 255:
        scale = 1.0  # 8-bit values in a wide container
    elif top <= 65535:
        scale = 255 / 65535  # 16-bit
    else:
        scale = 255 / top
    return np.round(np.clip(a * scale, 0, 255)).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (transparent pixels hold junk colour)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = Image.fromarray(_wide_grey_to_uint8(np.asarray(image, np.float64), image.mode))
    return image.convert("RGB")


def read_image(path: PathLike, min_size: int = 0) -> np.ndarray:
    """A photo as uint8 [H, W, 3] RGB: EXIF orientation applied, any mode converted to RGB.

    Raises DataError when the file cannot be decoded or its shorter side is under `min_size`.
    """
    path = paths.as_path(path)
    image = _open(path)
    if min(image.size) < min_size:
        w, h = image.size
        raise DataError(f"{path}: image is {w}x{h} px, under the minimum side of {min_size} px")
    return np.asarray(_to_rgb(image))


def read_mask(path: PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as uint8 [H, W] in {0, 1}.

    A mask with transparency (a cut-out) is its alpha channel; otherwise pixels whose grey level
    is >= 128 are subject. `shape` (H, W), when given, is the size of the mask's photo, which the
    mask must match.
    """
    path = paths.as_path(path)
    image = _open(path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    grey = None
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            grey = alpha
    if grey is None:
        grey = np.asarray(_to_rgb(image).convert("L"))
    if shape is not None and grey.shape != tuple(shape):
        raise DataError(
            f"{path}: mask is {grey.shape[1]}x{grey.shape[0]} px but its image is "
            f"{shape[1]}x{shape[0]} px"
        )
    return (grey >= 128).astype(np.uint8)


def find_sibling(folder: PathLike, stem: str) -> paths.Path | None:
    """The image file in `folder` with this stem (any image suffix), or None."""
    folder = paths.as_path(folder)
    if not folder.is_dir():
        return None
    names = {p.name for p in folder.iterdir()}  # one listing, not a request per candidate
    for suffix in IMAGE_SUFFIXES:
        for name in (f"{stem}{suffix}", f"{stem}{suffix.upper()}"):
            if name in names and not (folder / name).is_dir():
                return folder / name
    return None


def crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of side min(width, height), as a PIL box (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def resize_crop(array: np.ndarray, resolution: int, *, is_mask: bool = False) -> np.ndarray:
    """Centre-crop to a square and resize to `resolution`, in one resampling step.

    Images use bicubic (PIL antialiases when shrinking); masks use bilinear then a 0.5 threshold,
    so a mask gets the same geometry as its image and stays binary.
    """
    if resolution <= 0:
        raise DataError(f"resolution must be positive, got {resolution}")
    h, w = array.shape[:2]
    if (h, w) == (resolution, resolution):
        return array
    box = crop_box(w, h)
    if is_mask:
        grey = Image.fromarray((np.asarray(array) > 0).astype(np.uint8) * 255)
        out = grey.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
        return (np.asarray(out) >= 128).astype(np.uint8)
    out = Image.fromarray(array).resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], the range the VAE and the model side expect."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """With probability 1/2, mirror every image-shaped field of one example left-right."""
    if rng.random() >= 0.5:
        return example
    return {
        k: (np.ascontiguousarray(v[:, ::-1]) if k in SPATIAL_KEYS else v)
        for k, v in example.items()
    }


SPATIAL_KEYS = ("image", "mask", "background")


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject's photos at training resolution, with masks/backgrounds when available."""

    folder: paths.Path
    names: tuple[str, ...]  # file stems, in order
    images: np.ndarray  # uint8 [N, R, R, 3]
    masks: np.ndarray | None = None  # uint8 [N, R, R] in {0, 1}
    backgrounds: np.ndarray | None = None  # uint8 [N, R, R, 3]

    def __len__(self) -> int:
        return len(self.names)

    def examples(self) -> list[dict[str, np.ndarray]]:
        """One dict per photo (`image`, and `mask`/`background` when present): a grain source."""
        out = []
        for i in range(len(self)):
            ex = {"image": self.images[i]}
            if self.masks is not None:
                ex["mask"] = self.masks[i]
            if self.backgrounds is not None:
                ex["background"] = self.backgrounds[i]
            out.append(ex)
        return out


def _read_companions(
    folder: paths.Path, stems: list[str], shapes: list[tuple[int, int]], kind: str
) -> list[np.ndarray] | None:
    """Masks or backgrounds for every stem from `folder`; None when the folder is absent."""
    if not folder.is_dir():
        return None
    out = []
    for stem, shape in zip(stems, shapes):
        path = find_sibling(folder, stem)
        if path is None:
            raise DataError(f"{folder}: no {kind} for image {stem} (run idfuse_jax.prepare)")
        if kind == "mask":
            out.append(read_mask(path, shape))
        else:
            array = read_image(path)
            if array.shape[:2] != shape:
                raise DataError(
                    f"{path}: background is {array.shape[1]}x{array.shape[0]} px but its image "
                    f"is {shape[1]}x{shape[0]} px"
                )
            out.append(array)
    return out


def load_subject(
    folder: PathLike,
    resolution: int,
    *,
    min_size: int = 0,
    prepared_dir: PathLike | None = None,
) -> Subject:
    """Read a subject folder, centre-cropped and resized to `resolution`.

    Masks come from `prepared_dir/masks` when `prepared_dir` is given (the output of
    `idfuse_jax.prepare`), else from the folder's own `masks/` if it has one; backgrounds come
    from `prepared_dir/backgrounds`. Every photo needs its mask once a mask folder is used.
    """
    folder = paths.as_path(folder)
    photos = list_images(folder)
    raw = [read_image(p, min_size) for p in photos]
    stems = [p.stem for p in photos]
    shapes = [a.shape[:2] for a in raw]
    if prepared_dir is not None:
        prepared_dir = paths.as_path(prepared_dir)
        if not prepared_dir.is_dir():
            raise DataError(f"{prepared_dir}: prepared folder not found")
        mask_dir, bg_dir = prepared_dir / MASKS_DIR, prepared_dir / BACKGROUNDS_DIR
    else:
        mask_dir, bg_dir = folder / MASKS_DIR, None
    masks = _read_companions(mask_dir, stems, shapes, "mask")
    backgrounds = _read_companions(bg_dir, stems, shapes, "background") if bg_dir else None

    def stack(arrays: list[np.ndarray] | None, is_mask: bool = False) -> np.ndarray | None:
        if arrays is None:
            return None
        return np.stack([resize_crop(a, resolution, is_mask=is_mask) for a in arrays])

    return Subject(
        folder=folder,
        names=tuple(stems),
        images=stack(raw),
        masks=stack(masks, is_mask=True),
        backgrounds=stack(backgrounds),
    )
