"""Generating a subject's evaluation images: per-image seeds, sharded batches, resumable files.

Image k of prompt p of subject s starts from the noise of
fold_in(fold_in(fold_in(key(seed), crc32(s)), p), k), so an image is the same whatever batch,
device count or resumed run produced it. Batches are split over a ("data", "fsdp") mesh of all
devices (fsdp = 1: the weights are replicated, every device draws its own images) and padded to
a fixed size, so one compiled program serves every batch and every subject of the same run
config. Files (local or gs://) are written whole or not at all (`paths.write_bytes`) and
checked on reuse. Several processes (`evaluate --multihost`): the mesh spans every host's devices,
every process runs the same batches, and the images come back whole on every process.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from idfuse_jax import build, export, method, paths, sharding
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import DataError

Item = tuple[int, int]  # (prompt index, image index)
IMAGE_NAME = re.compile(r"(\d+)_(\d+)\.png")


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:02d}_{image_index}.png"


def image_keys(seed: int, subject: str, items: Sequence[Item]) -> np.ndarray:
    """uint32 key data [len(items), ...] of each image's PRNG key (see the module docstring)."""
    base = jax.random.fold_in(jax.random.key(seed), zlib.crc32(subject.encode()) & 0x7FFFFFFF)
    p = jnp.asarray([i for i, _ in items], jnp.int32)
    k = jnp.asarray([j for _, j in items], jnp.int32)
    keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(p, k)
    return np.asarray(jax.random.key_data(keys))


def read_generated(path: paths.Path, resolution: int | None = None) -> np.ndarray | None:
    """A stored image, or None when it is missing, unreadable, truncated or of another size."""
    if not path.is_file():
        return None
    try:
        image = images_lib.read_image(path)
    except DataError:
        return None
    if resolution is not None and image.shape != (resolution, resolution, 3):
        return None
    return image


def write_png(path: paths.Path, image: np.ndarray) -> None:
    """An interrupted write never leaves a partial file under the final name."""
    paths.save_png(path, image)


def missing_items(
    folder: paths.Path, num_prompts: int, num_images: int, resolution: int
) -> list[Item]:
    """The (prompt, image) pairs whose file is absent or not a valid image of this size."""
    return [
        (p, k)
        for p in range(num_prompts)
        for k in range(num_images)
        if read_generated(folder / image_name(p, k), resolution) is None
    ]


def stored_items(folder: paths.Path) -> dict[Item, paths.Path]:
    """{(prompt, image): path} of the P_K.png files in a folder (any zero padding)."""
    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = IMAGE_NAME.fullmatch(path.name)
        if m:
            found[(int(m[1]), int(m[2]))] = path
    return dict(sorted(found.items()))


def generation_key(config: ml_collections.ConfigDict) -> str:
    """What the compiled sampler depends on: runs that agree here share models and program."""
    parts = {k: config[k].to_dict() for k in ("model", "method", "sample")}
    parts.update(seed=config.seed, resolution=config.data.resolution)
    return json.dumps(parts, sort_keys=True, default=str)


def replicate(tree: dict, mesh: jax.sharding.Mesh) -> dict:
    """Every leaf whole on every device of the mesh."""
    return sharding.put(tree, jax.tree.map(lambda _: sharding.replicated(mesh), tree))


@dataclasses.dataclass
class Sampler:
    """The built models of one run config and its sharded, jitted batch sampler."""

    models: build.Models
    frozen: dict
    fn: Callable
    mesh: jax.sharding.Mesh
    batch_size: int  # global, a multiple of the device count


def make_sampler(config: ml_collections.ConfigDict, per_device_batch: int) -> Sampler:
    """Models of `config` (frozen weights replicated) and a jit over the data axis of every
    process's devices; the uint8 images come back whole on every device, so that each process
    reads its own copy (a batch-sharded output would have rows on other hosts)."""
    mesh = sharding.make_mesh(-1, 1)
    models, frozen = build.build_models(config)
    frozen = replicate(frozen, mesh)
    fn = jit_generation(models, config, mesh)
    return Sampler(models, frozen, fn, mesh, per_device_batch * mesh.size)


def jit_generation(
    models: build.Models,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    null_ids: np.ndarray | None = None,
):
    """(frozen, trainable, token ids [B, T], key data [B, ...]) -> images [B, R, R, 3], jitted
    with the weights replicated over `mesh` and the batch split over its batch axes.
    `null_ids` [1, T]: the empty prompt's ids (default: from the tokenizer)."""
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    if null_ids is None:
        null_ids = np.asarray(models.tokenizer([""]))

    def sample(frozen, trainable, ids, key_data):
        keys = jax.random.wrap_key_data(key_data)
        images = method.generate(models, config, frozen, trainable, ids, null_ids, keys)
        return to_uint8(images)

    return sharding.jit_on(
        mesh,
        sample,
        in_shardings=(replicated, replicated, batch, batch),
        out_shardings=replicated,
    )


def load_trainable(sampler: Sampler, config: ml_collections.ConfigDict, path: paths.Path) -> dict:
    """The trained LoRA, adapter and FFM of a workdir, replicated over the mesh."""
    template = method.init_trainable(jax.random.key(0), sampler.models, config, sampler.frozen)
    trainable = export.import_trainable(path, template)
    return replicate(trainable, sampler.mesh)


def generate_items(
    sampler: Sampler,
    trainable: dict,
    prompts: Sequence[str],
    subject: str,
    items: Sequence[Item],
    seed: int,
) -> Iterator[tuple[list[Item], np.ndarray]]:
    """Yield (items, uint8 images) batch by batch; the last batch is padded, then trimmed.

    The next batch is dispatched before the previous one is fetched, so the devices keep
    working while the host writes files.
    """
    ids = np.asarray(sampler.models.tokenizer(list(prompts)))
    all_keys = image_keys(seed, subject, items)  # up front: no device sync inside the loop
    b = sampler.batch_size
    batch = sharding.batch_sharding(sampler.mesh)
    pending, compiled = None, None
    for start in range(0, len(items), b):
        chunk = list(items[start : start + b])
        rows = np.arange(start, start + len(chunk))
        rows = np.concatenate([rows, np.full(b - len(chunk), start)])  # padded with the first
        ids_batch = sharding.put(ids[[items[i][0] for i in rows]], batch)
        keys = sharding.put(all_keys[rows], batch)
        if compiled is None:
            # Every process compiles before any runs it: on several hosts the program gathers
            # across them, and CPU collectives give up on a peer 30 s late.
            compiled = sampler.fn.lower(sampler.frozen, trainable, ids_batch, keys).compile()
            sharding.sync_processes("idfuse_jax: evaluation sampler compiled")
        images = compiled(sampler.frozen, trainable, ids_batch, keys)  # dispatched, not awaited
        if pending is not None:
            yield _fetch(*pending)
        pending = (chunk, images)
    if pending is not None:
        yield _fetch(*pending)


def to_uint8(images: jax.Array) -> jax.Array:
    """`metrics.to_uint8` on device (the same float32 arithmetic): a quarter of the bytes to
    gather and to fetch."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _fetch(chunk: list[Item], images: jax.Array) -> tuple[list[Item], np.ndarray]:
    return chunk, np.asarray(jax.device_get(images))[: len(chunk)]
