"""Subject data: photo folders, DreamBench as tfds, the grain pipeline, a synthetic subject.

Data-side arrays are uint8 (images [H, W, 3], masks [H, W] in {0, 1}); the pipeline hands the
model float32 images in [-1, 1]. Bad input raises `DataError` (a ValueError) naming the culprit.
"""

from idfuse_jax.data.images import (
    Subject,
    list_images,
    load_subject,
    read_image,
    read_mask,
    resize_crop,
    to_model,
)
from idfuse_jax.data.pipeline import make_dataset, make_iterator
from idfuse_jax.data.synthetic import synthetic_subject, write_synthetic_subject
from idfuse_jax.errors import DataError

__all__ = [
    "DataError",
    "Subject",
    "list_images",
    "load_subject",
    "make_dataset",
    "make_iterator",
    "read_image",
    "read_mask",
    "resize_crop",
    "synthetic_subject",
    "to_model",
    "write_synthetic_subject",
]
