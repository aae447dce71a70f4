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
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idfuse_jax import losses, metrics, paths, presets, resources, sharding
from idfuse_jax import method as method_lib
from idfuse_jax.build import Models
from idfuse_jax.data import dreambench, synthetic, world
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import ConfigError, DataError
from idfuse_jax.evaluation import generation  # checked, atomic image files
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
    workdir: paths.Path

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


def subject_runs(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> list[SubjectRun]:
    """The subjects `config` trains, in order.

    data.subjects "" trains data.instance_dir alone. Otherwise data.instance_dir is a folder
    with one sub-folder per subject (the DreamBooth layout) and data.subjects is "all" (every
    subject of its prompts_and_classes.txt) or comma-separated names, each optionally
    "NAME:CLASS" (else the class comes from prompts_and_classes.txt). With instance_dir
    "synthetic" each name draws its own synthetic subject (class: CLASS or data.class_name).
    """
    workdir = paths.as_path(workdir)
    d = config.data
    if not d.subjects:
        single = _single_config(config, d.instance_dir, d.class_name, d.synthetic_variant)
        return sweep_runs(config, [SubjectRun("", single, workdir)], workdir)
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
            folder, variant = str(paths.as_path(d.instance_dir) / name), 0
            if not paths.as_path(folder).is_dir():
                raise DataError(f"{folder}: no photo folder for subject {name!r}")
        single = _single_config(config, folder, classes[name], variant)
        if single.mesh.fsdp != -1:  # alone, the subject's batch takes every device
            single.mesh.data = -1
        runs.append(SubjectRun(name, single, workdir / SUBJECTS_DIR / name))
    return sweep_runs(config, runs, workdir)


def parse_sweep(value: str) -> tuple[str, list[float]]:
    """'text_image=0.001,0.01' -> ('text_image', [0.001, 0.01])."""
    term, sep, listed = value.partition("=")
    problem = None
    if not sep or term not in losses.TERMS:
        problem = f"expected TERM=V1,V2,... with TERM one of {list(losses.TERMS)}"
    else:
        try:
            values = [float(v) for v in listed.split(",")]
        except ValueError:
            values, problem = [], "the values must be numbers"
        if any(v < 0 for v in values):
            problem = "the weights must be non-negative"
        elif len({f"{v:g}" for v in values}) != len(values):
            problem = "a value is given twice"
    if problem:
        raise ConfigError(f"config.loss.sweep={value!r}: {problem}")
    return term, values


def sweep_runs(
    config: ml_collections.ConfigDict, runs: list[SubjectRun], workdir: paths.Path
) -> list[SubjectRun]:
    """`runs`, each repeated once per value of config.loss.sweep with that loss weight: one
    slot of the subject axis each, named NAME@TERM=V (one subject: TERM=V)."""
    if not config.loss.get("sweep"):
        return runs
    term, values = parse_sweep(config.loss.sweep)
    swept = []
    for run in runs:
        for value in values:
            single = ml_collections.ConfigDict(run.config.to_dict())
            single.loss.weights[term] = value
            single.loss.sweep = ""
            if single.mesh.fsdp != -1:  # alone, the slot's batch takes every device
                single.mesh.data = -1
            name = f"{run.name}@{term}={value:g}" if run.name else f"{term}={value:g}"
            swept.append(SubjectRun(name, single, workdir / SUBJECTS_DIR / name))
    return swept


def subject_images(
    config: ml_collections.ConfigDict, workdir: paths.Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, backgrounds, decouple): uint8 [N, R, R, 3] at the training resolution, and
    float32 [N], 1 where the background is usable for L3 and L4, 0 where it is not.

    The synthetic subject brings exact backgrounds; a photo folder is prepared (masks and
    inpainted backgrounds) once, cached under workdir/prepared, never written into the input.
    A photo whose mask failed (`prepare`'s collapse detection) trains without explicit
    decoupling, and the log says so in one line per photo.
    """
    d = config.data
    explicit = presets.of(config).explicit
    if d.instance_dir == "synthetic":
        images, _, backgrounds = synthetic.synthetic_subject(
            d.synthetic_images, d.resolution, config.seed + d.synthetic_variant
        )
        return images, backgrounds, np.full(len(images), float(explicit), np.float32)
    if d.instance_dir.startswith(world.PREFIX):  # a ToyBench subject, with its exact truth
        scenes = world.subject_photos(world.toy_subject(d.instance_dir[len(world.PREFIX) :]),
                                      d.resolution)  # fmt: skip
        images = np.stack([s.image for s in scenes])
        backgrounds = np.stack([s.background for s in scenes])
        return images, backgrounds, np.full(len(images), float(explicit), np.float32)
    if not explicit:  # a method without explicit decoupling: no masks, no inpainting
        subject = images_lib.load_subject(d.instance_dir, d.resolution, min_size=d.min_size)
        return subject.images, subject.images, np.zeros(len(subject.images), np.float32)
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
    workdir: paths.Path,
) -> SubjectFeatures:
    """VAE moments, CLIP image and background features of every (flipped) image, which of them
    have explicit decoupling, and P's ids."""
    with resources.phase("prepare"):  # masks and backgrounds (cached under the workdir)
        images, backgrounds, decouple = subject_images(config, workdir)
    class_images = None
    if config.prior.class_images:
        with resources.phase("class images"):
            class_images = prior_class_images(config, models, frozen, workdir)
    with resources.phase("features"):
        return _features(config, models, frozen, images, backgrounds, decouple, class_images)


CLASS_IMAGES_DIR = "class_images"
_CLASS_BATCH = 4  # class images drawn per call (one compiled shape)


def prior_class_images(
    config: ml_collections.ConfigDict,
    models: Models,
    frozen: dict[str, Params],
    workdir: paths.Path,
) -> np.ndarray:
    """uint8 [prior.class_images, R, R, 3]: images of prior.prompt drawn by the frozen model
    (no LoRA, no adapter, no FFM: the plain text conditioning), DreamBooth's class images.

    Cached in workdir/class_images/NNNN.png: a rerun reads them back and draws only the missing
    or broken ones. Image i starts from the noise of fold_in(key(sample.seed), i) whatever the
    batch, so every process draws the same images (process 0 writes them).
    """
    count, resolution = config.prior.class_images, config.data.resolution
    folder = workdir / CLASS_IMAGES_DIR
    files = [folder / f"{i:04d}.png" for i in range(count)]
    images = [generation.read_generated(p, resolution) for p in files]
    missing = [i for i, image in enumerate(images) if image is None]
    if missing:
        plain = dataclasses.replace(
            models, idfuse=models.idfuse.clone(with_adapter=False, with_ffm=False)
        )
        nothing = {"unet_lora": {}, "text_lora": {}, "idfuse": {}}
        (prompt,) = format_prompts(config, [config.prior.prompt])
        ids = jnp.asarray(models.tokenizer([prompt] * _CLASS_BATCH))
        null_ids = jnp.asarray(models.tokenizer([""]))
        draw = jax.jit(
            lambda f, keys: method_lib.generate(plain, config, f, nothing, ids, null_ids, keys)
        )
        base = jax.random.key(config.sample.seed)
        logging.info("drawing %d class images of %r with the frozen model", len(missing), prompt)
        for start in range(0, len(missing), _CLASS_BATCH):
            chunk = missing[start : start + _CLASS_BATCH]
            padded = chunk + [chunk[-1]] * (_CLASS_BATCH - len(chunk))
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(padded))
            drawn = metrics.to_uint8(jax.device_get(draw(frozen, keys)))
            for i, image in zip(chunk, drawn):
                images[i] = image
                if jax.process_index() == 0:
                    folder.mkdir(parents=True, exist_ok=True)
                    generation.write_png(files[i], image)
    return np.stack(images)


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
    class_images: np.ndarray | None = None,
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
    # Without explicit decoupling f'_i is never used: no background is encoded.
    background_embeds = (
        [embed(frozen["image"], clip_pixels(x[None], size)) for x in backgrounds]
        if presets.of(config).explicit
        else image_embeds
    )
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
    if config.prior.class_images:
        class_moments = [encode(frozen["vae"], images_lib.to_model(x[None])) for x in class_images]
        (class_prompt,) = format_prompts(config, [config.prior.prompt])
        features = features.replace(
            class_latent_mean=jnp.concatenate([m[0] for m in class_moments]).astype(jnp.float32),
            class_latent_logvar=jnp.concatenate([m[1] for m in class_moments]).astype(jnp.float32),
            class_prompt_ids=jnp.asarray(models.tokenizer([class_prompt])),
        )
    return jax.block_until_ready(features)
