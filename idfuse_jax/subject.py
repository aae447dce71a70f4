"""Per-subject fixed work, done once before the loop: the only part of the method with I/O.

The subject's photos are prepared (masks, inpainted backgrounds; cached under the workdir) and
encoded: VAE latent moments and CLIP image and background features of every (flipped) image, and
the identity prompt's token ids.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idfuse_jax import resources, sharding
from idfuse_jax.build import Models
from idfuse_jax.data import images as images_lib
from idfuse_jax.data import synthetic
from idfuse_jax.method import SubjectFeatures, format_prompts
from idfuse_jax.models import clip
from idfuse_jax.types import Params


def subject_images(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, backgrounds, decouple): uint8 [N, R, R, 3] at the training resolution, and
    float32 [N], 1 where the background is usable for L3 and L4, 0 where it is not.

    The synthetic subject brings exact backgrounds; a photo folder is prepared (masks and
    inpainted backgrounds) once, cached under workdir/prepared, never written into the input.
    A photo whose mask failed (`prepare`'s collapse detection) trains without explicit
    decoupling, and the log says so in one line per photo.
    """
    d = config.data
    if d.instance_dir == "synthetic":
        images, _, backgrounds = synthetic.synthetic_subject(
            d.synthetic_images, d.resolution, config.seed
        )
        return images, backgrounds, np.ones(len(images), np.float32)
    from idfuse_jax import prepare  # OpenCV and friends only when a photo folder is used

    prepared = workdir / "prepared"
    if jax.process_index() == 0:
        prepare.prepare_subject(
            d.instance_dir,
            prepared,
            masks=d.masks,
            onnx_model=d.onnx_model or None,
            dino_model=d.dino_model or None,
            inpaint=d.inpaint,
            inpaint_model=d.inpaint_model or None,
            min_size=d.min_size,
        )
    # A host barrier, not a device collective: preparing can take minutes on process 0, longer
    # than CPU collectives wait for a peer.
    sharding.sync_processes("idfuse_jax: subject prepared")
    subject = images_lib.load_subject(
        d.instance_dir, d.resolution, min_size=d.min_size, prepared_dir=prepared
    )
    decouple = prepare.explicit_decoupling(prepared, subject.names)
    reasons = prepare.rejection_reasons(prepared)
    for name, weight in zip(subject.names, decouple):
        if not weight:
            logging.warning(
                "photo %s trains without explicit decoupling (L3, L4 off): %s; see %s",
                name,
                reasons[name],
                prepared / prepare.PREVIEW,
            )
    return subject.images, subject.backgrounds, decouple


def clip_pixels(images: np.ndarray, image_size: int) -> np.ndarray:
    return np.stack(
        [clip.preprocess_image(x, resize_to=image_size, crop_to=image_size) for x in images]
    )


def prepare_subject_features(
    config: ml_collections.ConfigDict,
    models: Models,
    frozen: dict[str, Params],
    workdir: pathlib.Path,
) -> SubjectFeatures:
    """VAE moments, CLIP image and background features of every (flipped) image, which of them
    have explicit decoupling, and P's ids."""
    with resources.phase("prepare"):  # masks and backgrounds (cached under the workdir)
        images, backgrounds, decouple = subject_images(config, workdir)
    with resources.phase("features"):
        return _features(config, models, frozen, images, backgrounds, decouple)


def _features(
    config: ml_collections.ConfigDict,
    models: Models,
    frozen: dict[str, Params],
    images: np.ndarray,
    backgrounds: np.ndarray,
    decouple: np.ndarray,
) -> SubjectFeatures:
    if config.data.random_flip:
        images = np.concatenate([images, images[:, :, ::-1]])
        backgrounds = np.concatenate([backgrounds, backgrounds[:, :, ::-1]])
        decouple = np.concatenate([decouple, decouple])

    encode = jax.jit(lambda p, x: models.vae.apply({"params": p}, x, method="encode"))
    embed = jax.jit(lambda p, x: models.image_encoder.apply({"params": p}, x).image_embeds)
    # One image at a time: a single compiled shape, and memory bounded at 512 px.
    moments = [encode(frozen["vae"], images_lib.to_model(x[None])) for x in images]
    size = models.image_encoder.config.image_size
    image_embeds = [embed(frozen["image"], clip_pixels(x[None], size)) for x in images]
    background_embeds = [embed(frozen["image"], clip_pixels(x[None], size)) for x in backgrounds]
    (prompt,) = format_prompts(config, [config.data.prompt])
    features = SubjectFeatures(
        latent_mean=jnp.concatenate([m[0] for m in moments]).astype(jnp.float32),
        latent_logvar=jnp.concatenate([m[1] for m in moments]).astype(jnp.float32),
        image_embeds=jnp.concatenate(image_embeds).astype(jnp.float32),
        background_embeds=jnp.concatenate(background_embeds).astype(jnp.float32),
        prompt_ids=jnp.asarray(models.tokenizer([prompt])),
        num_items=len(images),
        decouple=jnp.asarray(decouple, jnp.float32),
    )
    return jax.block_until_ready(features)
