"""The metric models, loaded from transformers folders with our own Flax modules and loaders.

DINO: a ViTModel folder (facebook/dino-vits16); the feature is the final layer norm's CLS token.
CLIP: a CLIPModel folder (openai/clip-vit-base-patch32) holding both towers and the tokenizer;
image_embeds = visual_projection(post_layernorm(CLS)), text_embeds = text_projection(pooled EOS
state), as transformers' get_image_features / get_text_features. Preprocessing is the folder's
image processor (`preprocess`). A folder that is not of the right kind is a one-line
WeightsError naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from idfuse_jax import weights
from idfuse_jax.errors import UserError, WeightsError
from idfuse_jax.evaluation import preprocess as preprocess_lib

# Images (or texts) per encoder call: one compiled shape whatever the count.
CHUNK = 8


def _chunked(fn: Callable[[np.ndarray], Any], inputs: np.ndarray) -> np.ndarray:
    """fn over `inputs` in zero-padded chunks of CHUNK rows; float32 numpy [N, ...]."""
    out = []
    for start in range(0, len(inputs), CHUNK):
        part = inputs[start : start + CHUNK]
        pad = np.zeros((CHUNK - len(part), *part.shape[1:]), part.dtype)
        result = np.asarray(jax.device_get(fn(np.concatenate([part, pad]))), np.float32)
        out.append(result[: len(part)])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """A vision model with its preprocessing: uint8 images in, one feature vector per image out."""

    apply: Callable[[Any, np.ndarray], jax.Array]  # jitted: (params, pixels) -> features
    params: Any
    processing: preprocess_lib.ImageProcessing

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = np.stack([preprocess_lib.preprocess(x, self.processing) for x in images])
        return _chunked(functools.partial(self.apply, self.params), pixels)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """CLIP's text tower and tokenizer: strings in, text_embeds out."""

    apply: Callable[[Any, np.ndarray], jax.Array]  # jitted: (params, token ids) -> text_embeds
    params: Any
    tokenizer: Any

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        ids = np.asarray(self.tokenizer(list(texts)))
        return _chunked(functools.partial(self.apply, self.params), ids)


def _checked_processing(
    folder: pathlib.Path, defaults: dict[str, Any], image_size: int
) -> preprocess_lib.ImageProcessing:
    processing = preprocess_lib.processing_from_folder(folder, defaults)
    if processing.output_size != (image_size, image_size):
        raise WeightsError(
            f"{folder}: the image processor gives {processing.output_size} images, the model "
            f"takes {image_size}x{image_size}"
        )
    return processing


def _refuse(flag: str, folder: pathlib.Path, what: str, error: UserError) -> WeightsError:
    """One line naming the flag and folder; the loader's reason without the folder again."""
    reason = str(error).removeprefix(f"{folder}: ").removeprefix(f"{folder}/")
    return WeightsError(f"--{flag} {folder}: not a transformers {what} folder ({reason})")


def load_dino(folder: str | pathlib.Path) -> ImageEncoder:
    """DINO CLS features from a transformers ViTModel folder."""
    folder = pathlib.Path(folder)
    try:
        module, params = weights.load_vit(folder)
        processing = _checked_processing(
            folder, preprocess_lib.VIT_DEFAULTS, module.config.image_size
        )
    except UserError as e:
        raise _refuse("dino", folder, "ViTModel (DINO)", e) from None
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x).cls)
    return ImageEncoder(fn, jax.device_put(params), processing)


def load_clip(folder: str | pathlib.Path) -> tuple[ImageEncoder, TextEncoder]:
    """(image_embeds encoder, text_embeds encoder) from a transformers CLIPModel folder."""
    folder = pathlib.Path(folder)
    try:
        vision, vision_params = weights.load_clip_vision(folder)
        text, text_params = weights.load_clip_text(folder)
        if vision.config.projection_dim is None or text.config.projection_dim is None:
            raise WeightsError("no visual_projection / text_projection (a CLIPModel has both)")
        tokenizer = weights.load_tokenizer(folder)
        processing = _checked_processing(
            folder, preprocess_lib.CLIP_DEFAULTS, vision.config.image_size
        )
    except UserError as e:
        raise _refuse("clip", folder, "CLIPModel", e) from None
    image_fn = jax.jit(lambda p, x: vision.apply({"params": p}, x).image_embeds)
    text_fn = jax.jit(lambda p, ids: text.apply({"params": p}, ids).text_embeds)
    return (
        ImageEncoder(image_fn, jax.device_put(vision_params), processing),
        TextEncoder(text_fn, jax.device_put(text_params), tokenizer),
    )


@dataclasses.dataclass(frozen=True)
class MetricModels:
    """The three encoders of DreamBench's metrics, and the folders they came from."""

    dino: ImageEncoder
    clip_image: ImageEncoder
    clip_text: TextEncoder
    dino_dir: pathlib.Path
    clip_dir: pathlib.Path


def load_metric_models(dino_dir: str | pathlib.Path, clip_dir: str | pathlib.Path) -> MetricModels:
    clip_image, clip_text = load_clip(clip_dir)
    return MetricModels(
        load_dino(dino_dir),
        clip_image,
        clip_text,
        pathlib.Path(dino_dir).resolve(),
        pathlib.Path(clip_dir).resolve(),
    )
