"""What a run shows: metrics.jsonl, TensorBoard events, image grids, and MFU bookkeeping."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from idfuse_jax import paths

# Dense bf16 peak TFLOP/s per device, for MFU. Matched as whole words in jax's device_kind.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device: the override if set, else the table, else None."""
    if override > 0:
        return override
    for name, tflops in PEAK_TFLOPS.items():
        # Whole words only: "L4" must not match "L40S".
        if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", device_kind, re.IGNORECASE):
            return tflops
    return None


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

    Only process 0 writes; other processes get a writer that does nothing. The workdir may be
    local or gs://: cloud objects cannot be appended to, so there the whole file is uploaded
    again at each row (a few KB), and TensorBoard uses tensorboardX's own gs:// writer.
    """

    def __init__(self, workdir: paths.PathLike, resume_step: int = 0, enabled: bool | None = None):
        """`resume_step`: rows logged after it by an interrupted run are dropped from
        metrics.jsonl, since those steps are about to run again."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = paths.as_path(workdir)
        self._path = self.workdir / "metrics.jsonl"
        self._rows: list[str] = []
        self._jsonl = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            if self._path.is_file():
                text = self._path.read_text()
                self._rows = [r for r in text.splitlines() if _row_step(r) <= resume_step]
                paths.write_text(self._path, "".join(r + "\n" for r in self._rows))
            if not paths.is_cloud(self._path):
                self._jsonl = open(self._path, "a")
            self._tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in scalars.items():
            value = None if value is None else float(value)
            row[key] = value
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._rows.append(json.dumps(row))
        if self._jsonl is None:
            paths.write_text(self._path, "".join(r + "\n" for r in self._rows))
        else:
            self._jsonl.write(self._rows[-1] + "\n")
            self._jsonl.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run: drop it


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """[N, H, W, 3] uint8 -> one [rows*H, columns*W, 3] uint8 grid (blank cells stay black)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def save_png(path: paths.PathLike, image: np.ndarray) -> paths.Path:
    """A uint8 image as a PNG at `path`, local or gs:// (parents made)."""
    return paths.save_png(path, image)


def to_uint8(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Model-space images in [-1, 1] -> uint8 [0, 255]."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
