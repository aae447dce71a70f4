"""The grain input pipeline: random-access examples -> shuffled, flipped, batched model input.

A source is any random-access sequence of example dicts holding `image` (uint8 [H, W, 3]) and
optionally `mask` (uint8 [H, W] or [H, W, 1]) and `background` (uint8 [H, W, 3]): a
`dreambench_source(...)` or `Subject.examples()`. Batches hold

  image       float32 [B, R, R, 3] in [-1, 1]
  mask        float32 [B, R, R] in {0, 1}          (when the source has masks)
  background  float32 [B, R, R, 3] in [-1, 1]      (when the source has backgrounds)
  index       int32 [B]   the example's position in the source (to look up precomputed features)
  flipped     bool [B]    whether it was mirrored

The iterator's `get_state()` is a small dict to store in checkpoints; `set_state(state)` on a
fresh iterator of the same pipeline resumes exactly where it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from idfuse_jax.data.images import SPATIAL_KEYS, flip, resize_crop, to_model
from idfuse_jax.errors import DataError


class _Indexed(Sequence):
    """`source` restricted to `indices`, each example tagged with its source index."""

    def __init__(self, source: Sequence, indices: Sequence[int] | None):
        self._source = source
        self._indices = list(range(len(source))) if indices is None else list(indices)
        bad = [i for i in self._indices if not 0 <= i < len(source)]
        if bad:
            raise DataError(f"example index {bad[0]} is out of range for {len(source)} examples")

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        index = self._indices[i]
        example = {k: v for k, v in self._source[index].items() if k in SPATIAL_KEYS}
        example["index"] = np.int32(index)
        return example


class _Crop(grain.transforms.Map):
    """Centre crop + resize of every image-shaped field to the training resolution."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def map(self, example: dict) -> dict:
        out = dict(example)
        if "mask" in out:
            mask = np.asarray(out["mask"])
            out["mask"] = resize_crop(mask.reshape(mask.shape[:2]), self.resolution, is_mask=True)
        for key in ("image", "background"):
            if key in out:
                out[key] = resize_crop(np.asarray(out[key]), self.resolution)
        return out


class _Flip(grain.transforms.RandomMap):
    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        flipped = flip(example, rng)
        flipped["flipped"] = np.bool_(flipped is not example)
        return flipped


class _NoFlip(grain.transforms.Map):
    def map(self, example: dict) -> dict:
        return {**example, "flipped": np.bool_(False)}


class _ToModel(grain.transforms.Map):
    def map(self, example: dict) -> dict:
        out = dict(example)
        for key in ("image", "background"):
            if key in out:
                out[key] = to_model(out[key])
        if "mask" in out:
            out["mask"] = out["mask"].astype(np.float32)
        return out


def make_dataset(
    source: Sequence,
    *,
    resolution: int,
    batch_size: int,
    seed: int,
    random_flip: bool = True,
    indices: Sequence[int] | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain dataset; `num_epochs=None` repeats forever.

    With shuffling, every epoch sees each example once, in an order drawn from (seed, epoch);
    flips are drawn from (seed, position), so a restored iterator replays them exactly.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    data = _Indexed(source, indices)
    if len(data) == 0:
        raise DataError("the data source has no examples")
    ds = grain.MapDataset.source(data).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs).map(_Crop(resolution))
    ds = ds.random_map(_Flip()) if random_flip else ds.map(_NoFlip())
    ds = ds.map(_ToModel()).batch(batch_size, drop_remainder=num_epochs is None)
    return ds.to_iter_dataset()


def make_iterator(source: Sequence, **kwargs) -> grain.DatasetIterator:
    """An iterator over `make_dataset(source, **kwargs)`, with `get_state`/`set_state`."""
    return iter(make_dataset(source, **kwargs))
