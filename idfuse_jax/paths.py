"""Paths a user names (workdir, photo folders, evaluation folders), local or in the cloud.

One path type for all of them: etils `epath.Path`, the one orbax uses. A local path is an
ordinary file-system path; `gs://bucket/...` goes through fsspec's gcsfs (the `gcs` extra).
Writes never rename: a cloud object is replaced whole by one upload (GCS writes are atomic),
and a local file is written beside its target and moved over it, so that an interrupted run
never leaves a half-written file either way.
"""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
from etils import epath
from PIL import Image

from idfuse_jax.errors import ConfigError

Path = epath.Path
PathLike = str | os.PathLike

CLOUD_PREFIXES = ("gs://",)


def is_cloud(path: PathLike) -> bool:
    """Whether `path` names cloud storage (gs://) rather than the local file system."""
    return os.fspath(path).startswith(CLOUD_PREFIXES)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path; a gs:// path without gcsfs installed is one clear error."""
    text = os.fspath(path)
    if is_cloud(text):
        _require_gcsfs(text)
    elif "://" in text:
        raise ConfigError(f"{text}: unsupported storage (local paths and gs:// are supported)")
    return epath.Path(text)


def _require_gcsfs(text: str) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{text}: gs:// paths need gcsfs; install it with pip install 'idfuse_jax[gcs]'"
        ) from None


def absolute(path: PathLike) -> epath.Path:
    """An absolute form of `path` (cloud paths already are)."""
    path = as_path(path)
    return path if is_cloud(path) else epath.Path(os.path.abspath(os.fspath(path)))


def display(path: PathLike) -> str:
    """`path` for a report: absolute and resolved locally, as given in the cloud."""
    return os.fspath(path) if is_cloud(path) else os.path.realpath(os.fspath(path))


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Write `data` to `path` (parents made), without a rename in the cloud."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_cloud(path):
        path.write_bytes(data)  # one upload: readers see the old object or the new one
        return path
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text(path: PathLike, text: str) -> epath.Path:
    return write_bytes(path, text.encode("utf-8"))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: PathLike, image: np.ndarray) -> epath.Path:
    """A uint8 image as a PNG file at `path` (parents made)."""
    return write_bytes(path, png_bytes(image))
