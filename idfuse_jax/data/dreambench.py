"""DreamBench (the DreamBooth benchmark) as a tensorflow-datasets builder over a local folder.

The folder has one sub-folder of photos per subject and `prompts_and_classes.txt` (subject ->
class table, then the 25 evaluation prompts for objects and for live subjects), as in the
DreamBooth repository. The builder writes one example per photo, in subject then file order:

  subject, name (file stem), class_name, live (dogs and cats: DreamBooth's live subjects),
  image (uint8 [H, W, 3], EXIF orientation applied, RGB),
  and, when built over a prepared folder (`python -m idfuse_jax.prepare DREAMBENCH --out P`),
  mask (uint8 [H, W, 1] in {0, 1}) and background (uint8 [H, W, 3]).

Metadata: `object_prompts`, `live_prompts` (templates with `{token}` and `{class_name}`) and
`subjects` ({subject: {class_name, live, start, count}}: the record range of each subject).

It builds offline in ArrayRecord format and reads back as random-access numpy through
`builder.as_data_source()`; neither step needs TensorFlow. The build config's name carries a
fingerprint of the input files, so a changed folder builds afresh instead of reusing stale data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from collections.abc import Sequence
from typing import ClassVar

import cv2
import numpy as np
import tensorflow_datasets as tfds

from idfuse_jax import paths
from idfuse_jax.data.images import (
    BACKGROUNDS_DIR,
    MASKS_DIR,
    find_sibling,
    list_images,
    read_image,
    read_mask,
)
from idfuse_jax.errors import DataError
from idfuse_jax.paths import PathLike

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"dog", "cat"})
_TEMPLATE = re.compile(r"""(['"])(.*?)\1\s*\.format\(""")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The parsed benchmark folder (optionally restricted to some subjects)."""

    root: paths.Path
    classes: dict[str, str]  # subject -> class name, in file order
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def is_live(self, subject: str) -> bool:
        return self.classes[subject] in LIVE_CLASSES

    def prompts(self, subject: str) -> tuple[str, ...]:
        """The evaluation prompt templates for this subject's kind."""
        return self.live_prompts if self.is_live(subject) else self.object_prompts


def _section(text: str, start: str, end: str | None, path: paths.Path) -> str:
    i = text.find(start)
    if i < 0:
        raise DataError(f"{path}: no '{start}' section")
    j = text.find(end, i + len(start)) if end else len(text)
    return text[i + len(start) : j if j >= 0 else len(text)]


def _templates(section: str, path: paths.Path, kind: str) -> tuple[str, ...]:
    """'a {0} {1} in the snow'.format(unique_token, class_token) -> 'a {token} {class_name} ...'."""
    found = [m.group(2) for m in _TEMPLATE.finditer(section)]
    if not found:
        raise DataError(f"{path}: no {kind} prompts found")
    return tuple(t.replace("{0}", "{token}").replace("{1}", "{class_name}") for t in found)


def parse_prompts_file(path: PathLike) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """(subject -> class, object prompt templates, live prompt templates) from the file."""
    path = paths.as_path(path)
    if not path.is_file():
        raise DataError(f"{path}: DreamBench {PROMPTS_FILE} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    classes = {}
    for line in _section(text, "Classes", "Prompts", path).splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(parts) and parts[0] != "subject_name":
            classes[parts[0]] = parts[1]
    if not classes:
        raise DataError(f"{path}: no 'subject,class' lines in the Classes section")
    objects = _section(text, "Object Prompts", "Live Subject Prompts", path)
    objects = _templates(objects, path, "object")
    live = _templates(_section(text, "Live Subject Prompts", None, path), path, "live subject")
    return classes, objects, live


def read_benchmark(root: PathLike, subjects: Sequence[str] | None = None) -> Benchmark:
    """Parse a DreamBench folder (local or gs://); `subjects` restricts it (each must be listed
    and present)."""
    root = paths.as_path(root)
    if not root.is_dir():
        raise DataError(f"{root}: DreamBench folder not found")
    classes, objects, live = parse_prompts_file(root / PROMPTS_FILE)
    if subjects is not None:
        unknown = [s for s in subjects if s not in classes]
        if unknown:
            raise DataError(f"{root / PROMPTS_FILE}: lists no subject {unknown[0]!r}")
        classes = {s: classes[s] for s in subjects}
    for subject in classes:
        if not (root / subject).is_dir():
            raise DataError(f"{root / subject}: subject folder listed in {PROMPTS_FILE} is missing")
    return Benchmark(root, classes, objects, live)


def _png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB or single-channel uint8 array."""
    if array.ndim == 3 and array.shape[-1] == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise DataError(f"could not PNG-encode an array of shape {array.shape}")
    return buf.tobytes()


def _fingerprint(files: Sequence[PathLike]) -> str:
    """A short hash of (local) file names, sizes and modification times."""
    h = hashlib.sha256()
    for p in map(pathlib.Path, files):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


class Dreambench(tfds.core.GeneratorBasedBuilder):
    """DreamBench from a local folder; see the module docstring for features and metadata."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "One example per photo; masks and backgrounds when prepared."
    }

    def __init__(
        self,
        *,
        source_dir: PathLike,
        prepared_dir: PathLike | None = None,
        subjects: Sequence[str] | None = None,
        **kwargs,
    ):
        self._bench = read_benchmark(source_dir, subjects)
        self._photos = {s: list_images(self._bench.root / s) for s in self._bench.subjects}
        self._prepared = pathlib.Path(prepared_dir) if prepared_dir is not None else None
        inputs = [self._bench.root / PROMPTS_FILE]
        for subject, photos in self._photos.items():
            inputs += photos
            if self._prepared is not None:
                inputs += [
                    self._companion(subject, p.stem, sub)
                    for p in photos
                    for sub in (MASKS_DIR, BACKGROUNDS_DIR)
                ]
        kind = "prepared" if self._prepared is not None else "images"
        config = tfds.core.BuilderConfig(
            name=f"{kind}-{_fingerprint(inputs)}",
            description=f"{kind} of {len(self._photos)} subject(s) from {self._bench.root}",
        )
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    @property
    def benchmark(self) -> Benchmark:
        return self._bench

    def _companion(self, subject: str, stem: str, sub: str) -> paths.Path:
        folder = self._prepared / subject / sub
        path = find_sibling(folder, stem)
        if path is None:
            raise DataError(f"{folder}: no {sub[:-1]} for image {stem} (run idfuse_jax.prepare)")
        return path

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "subject": tfds.features.Text(),
            "name": tfds.features.Text(),
            "class_name": tfds.features.Text(),
            "live": np.bool_,
            "image": tfds.features.Image(shape=(None, None, 3)),
        }
        if self._prepared is not None:
            features["mask"] = tfds.features.Image(shape=(None, None, 1))
            features["background"] = tfds.features.Image(shape=(None, None, 3))
        ranges, start = {}, 0
        for subject, photos in self._photos.items():
            ranges[subject] = {
                "class_name": self._bench.classes[subject],
                "live": self._bench.is_live(subject),
                "start": start,
                "count": len(photos),
            }
            start += len(photos)
        return tfds.core.DatasetInfo(
            builder=self,
            description="DreamBench (DreamBooth, Ruiz et al. 2023) subject photos.",
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/google/dreambooth",
            # Keep generation order: records are grouped by subject (see metadata ranges).
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                object_prompts=list(self._bench.object_prompts),
                live_prompts=list(self._bench.live_prompts),
                subjects=ranges,
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for subject, photos in self._photos.items():
            for path in photos:
                image = read_image(path)
                example = {
                    "subject": subject,
                    "name": path.stem,
                    "class_name": self._bench.classes[subject],
                    "live": self._bench.is_live(subject),
                    "image": _png(image),
                }
                if self._prepared is not None:
                    mask_path = self._companion(subject, path.stem, MASKS_DIR)
                    mask = read_mask(mask_path, image.shape[:2])
                    bg_path = self._companion(subject, path.stem, BACKGROUNDS_DIR)
                    background = read_image(bg_path)
                    if background.shape != image.shape:
                        raise DataError(f"{bg_path}: background size differs from {path}")
                    example["mask"] = _png(mask[..., None])
                    example["background"] = _png(background)
                yield f"{subject}/{path.stem}", example


def dreambench_builder(
    data_dir: PathLike,
    source_dir: PathLike,
    *,
    prepared_dir: PathLike | None = None,
    subjects: Sequence[str] | None = None,
) -> Dreambench:
    """The builder over `source_dir`, built into `data_dir` unless already built there."""
    builder = Dreambench(
        source_dir=source_dir, prepared_dir=prepared_dir, subjects=subjects, data_dir=data_dir
    )
    builder.download_and_prepare(
        download_dir=pathlib.Path(data_dir) / "downloads",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return builder


def dreambench_source(
    data_dir: PathLike,
    source_dir: PathLike,
    *,
    prepared_dir: PathLike | None = None,
    subjects: Sequence[str] | None = None,
):
    """Random-access numpy examples of DreamBench (a tfds ArrayRecord data source), built first
    if needed. Its `dataset_info.metadata` holds the prompts and the per-subject record ranges."""
    return dreambench_builder(
        data_dir, source_dir, prepared_dir=prepared_dir, subjects=subjects
    ).as_data_source(split="train")


def subject_indices(source, subject: str) -> list[int]:
    """The record indices of one subject in a `dreambench_source`."""
    ranges = source.dataset_info.metadata["subjects"]
    if subject not in ranges:
        raise DataError(f"subject {subject!r} is not in this DreamBench build")
    r = ranges[subject]
    return list(range(r["start"], r["start"] + r["count"]))
