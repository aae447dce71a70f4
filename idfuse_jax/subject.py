"""The subjects of a job and their fixed work, done once before the loop: the only part of
the method with I/O.

A job trains one subject (`data.instance_dir`) or several (`data.subjects`: sub-folders of a
DreamBooth-layout folder, or synthetic subjects). Each subject gets the config of the
equivalent single-subject run (its photo folder, class and number of steps) and its own output
folder. Its photos are prepared (masks, inpainted backgrounds; cached under its workdir) and
encoded: VAE latent moments and CLIP image and background features of every (flipped) image,
and the identity prompt's token ids.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idfuse_jax import resources, sharding
from idfuse_jax.build import Models
from idfuse_jax.data import dreambench, synthetic
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import ConfigError, DataError
from idfuse_jax.method import SubjectFeatures, format_prompts
from idfuse_jax.models import clip
from idfuse_jax.types import Params

SUBJECTS_DIR = "subjects"  # WORKDIR/subjects/NAME: one subject's outputs in a multi-subject job


@dataclasses.dataclass(frozen=True)
class SubjectRun:
    """One subject of a job.

    name: "" when the job trains one subject (its outputs go in the workdir itself, as always);
    config: the config of the same subject trained alone (data.instance_dir is its photo
      folder, data.class_name its class, train.steps its length); `sample` and `evaluate` read
      it from workdir/config.json;
    workdir: where its metrics, samples, prepared photos and exports go.
    """

    name: str
    config: ml_collections.ConfigDict
    workdir: pathlib.Path

    @property
    def steps(self) -> int:
        return self.config.train.steps


def subject_steps(config: ml_collections.ConfigDict, class_name: str) -> int:
    """train.steps, or train.object_steps for an object (not a dog or cat) when it is set:
    DisenBooth trains objects about twice as long as live subjects."""
    t = config.train
    live = class_name in dreambench.LIVE_CLASSES
    return t.object_steps if t.object_steps and not live else t.steps


def synthetic_variant(name: str) -> int:
    """The synthetic subject a name stands for: the same name draws the same subject in any job."""
    return zlib.crc32(name.encode()) % 100_000 + 1  # 0 is the default synthetic subject


def _single_config(
    config: ml_collections.ConfigDict, instance_dir: str, class_name: str, variant: int
) -> ml_collections.ConfigDict:
    single = ml_collections.ConfigDict(config.to_dict())
    single.data.subjects = ""
    single.data.instance_dir = instance_dir
    single.data.class_name = class_name
    single.data.synthetic_variant = variant
    single.train.steps = subject_steps(config, class_name)
    single.train.object_steps = 0
    single.mesh.subject = 1
    return single


def parse_subjects(value: str) -> list[tuple[str, str | None]]:
    """'dog,cat2:cat' -> [('dog', None), ('cat2', 'cat')]."""
    entries = []
    for entry in value.split(","):
        name, _, class_name = (part.strip() for part in entry.partition(":"))
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"config.data.subjects={value!r}: bad subject name {name!r}")
        entries.append((name, class_name or None))
    names = [name for name, _ in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"config.data.subjects={value!r} names {repeated[0]!r} twice")
    return entries


def subject_runs(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> list[SubjectRun]:
    """The subjects `config` trains, in order.

    data.subjects "" trains data.instance_dir alone. Otherwise data.instance_dir is a folder
    with one sub-folder per subject (the DreamBooth layout) and data.subjects is "all" (every
    subject of its prompts_and_classes.txt) or comma-separated names, each optionally
    "NAME:CLASS" (else the class comes from prompts_and_classes.txt). With instance_dir
    "synthetic" each name draws its own synthetic subject (class: CLASS or data.class_name).
    """
    workdir = pathlib.Path(workdir)
    d = config.data
    if not d.subjects:
        single = _single_config(config, d.instance_dir, d.class_name, d.synthetic_variant)
        return [SubjectRun("", single, workdir)]
    synthetic_root = d.instance_dir == "synthetic"
    if d.subjects == "all":
        if synthetic_root:
            raise ConfigError(
                "config.data.subjects='all' needs a DreamBench folder in config.data.instance_dir; "
                "name synthetic subjects one by one (e.g. 'a:dog,b:teapot')"
            )
        entries = [(name, None) for name in dreambench.read_benchmark(d.instance_dir).subjects]
    else:
        entries = parse_subjects(d.subjects)
    classes = dict(entries)
    unknown = [name for name, class_name in entries if class_name is None]
    if unknown and synthetic_root:
        classes.update((name, d.class_name) for name in unknown)
    elif unknown:
        classes.update(dreambench.read_benchmark(d.instance_dir, unknown).classes)
    runs = []
    for name, _ in entries:
        if synthetic_root:
            folder, variant = "synthetic", synthetic_variant(name)
        else:
            folder, variant = str(pathlib.Path(d.instance_dir) / name), 0
            if not pathlib.Path(folder).is_dir():
                raise DataError(f"{folder}: no photo folder for subject {name!r}")
        single = _single_config(config, folder, classes[name], variant)
        if single.mesh.fsdp != -1:  # alone, the subject's batch takes every device
            single.mesh.data = -1
        runs.append(SubjectRun(name, single, workdir / SUBJECTS_DIR / name))
    return runs


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
            d.synthetic_images, d.resolution, config.seed + d.synthetic_variant
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


def feature_programs(models: Models, mesh: jax.sharding.Mesh | None) -> tuple[Any, Any]:
    """(encode, embed), jitted for frozen weights on `mesh` (None: one device):
    encode(vae params, images [B, R, R, 3] in [-1, 1]) -> VAE moments (mean, logvar);
    embed(image encoder params, CLIP pixels) -> image embeddings [B, D_img]."""
    encode = lambda p, x: models.vae.apply({"params": p}, x, method="encode")
    embed = lambda p, x: models.image_encoder.apply({"params": p}, x).image_embeds
    return sharding.jit_on(mesh, encode), sharding.jit_on(mesh, embed)


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

    # One image at a time: a single compiled shape, and memory bounded at 512 px.
    size = models.image_encoder.config.image_size
    encode, embed = feature_programs(models, sharding.mesh_of(frozen))
    encode = encode.lower(frozen["vae"], images_lib.to_model(images[:1])).compile()
    embed = embed.lower(frozen["image"], clip_pixels(images[:1], size)).compile()
    # Both are collectives over the mesh: no process may start them while another still
    # compiles (CPU collectives give up on a peer 30 s late).
    sharding.sync_processes("idfuse_jax: features compiled")
    moments = [encode(frozen["vae"], images_lib.to_model(x[None])) for x in images]
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
