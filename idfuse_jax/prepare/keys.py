"""What identifies a mask or inpainting method and its settings in the cache key of a run."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable


def method_key(fn: Callable) -> str:
    """A method's `key` attribute (its settings) or, for a plain function, its dotted name."""
    key = getattr(fn, "key", None)
    return key if isinstance(key, str) else f"{fn.__module__}.{fn.__qualname__}"


def method_name(fn: Callable) -> str:
    """A method's short `name` for messages, else its key."""
    name = getattr(fn, "name", None)
    return name if isinstance(name, str) else method_key(fn)


def file_digest(path: pathlib.Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: pathlib.Path) -> str:
    """A short hash of a model folder's file names, sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
