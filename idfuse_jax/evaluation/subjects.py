"""What an evaluation covers: its subjects, each with prompts, real images and (when generated
here) the training workdir whose weights draw the images.

A subject comes from a training workdir (config.json + idfuse_weights.safetensors: token, class,
photo folder) or from a folder of another method's images (`images/SUBJECT/PP_K.png`) plus a
DreamBench folder. Prompts are the DreamBench templates of the subject's kind (live: dogs and
cats; object: the rest) from the benchmark's prompts_and_classes.txt (`data.dreambench`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from idfuse_jax import config_lib, paths
from idfuse_jax.data import dreambench, world
from idfuse_jax.errors import ConfigError, DataError, WeightsError
from idfuse_jax.subject import SUBJECTS_DIR

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "idfuse_weights.safetensors"


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject's evaluation protocol.

    prompts: the generation prompts ({token} and class filled in), in template order;
    texts: the same prompts without the identifier token, for CLIP-T.
    """

    name: str
    class_name: str
    live: bool
    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    real_dir: paths.Path
    workdir: paths.Path | None = None
    config: ml_collections.ConfigDict | None = dataclasses.field(default=None, compare=False)


def without_token(template: str, class_name: str) -> str:
    """'a {token} {class_name} in the snow' -> 'a dog in the snow' (CLIP-T's prompt)."""
    return " ".join(template.format(token="", class_name=class_name).split())


def protocol_prompts(
    templates: tuple[str, ...], token: str, class_name: str, max_prompts: int | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(generation prompts, CLIP-T prompts) of the first `max_prompts` templates (all: None)."""
    templates = templates[:max_prompts] if max_prompts else templates
    prompts = tuple(t.format(token=token, class_name=class_name) for t in templates)
    return prompts, tuple(without_token(t, class_name) for t in templates)


def find_workdirs(run: paths.PathLike) -> list[paths.Path]:
    """The subject workdirs of `run`: those of a multi-subject job (run/subjects/NAME), [run]
    if it is a single-subject workdir, else its sub-folders that are (one per subject)."""
    run = paths.as_path(run)
    if not run.is_dir():
        raise ConfigError(f"--workdir {run}: folder not found")
    if (run / CONFIG_FILE).is_file() and (run / SUBJECTS_DIR).is_dir():
        return find_workdirs(run / SUBJECTS_DIR)
    if (run / CONFIG_FILE).is_file():
        return [run]
    found = sorted(p for p in run.iterdir() if (p / CONFIG_FILE).is_file())
    if not found:
        raise ConfigError(
            f"--workdir {run}: not a training workdir (no {CONFIG_FILE}), nor a folder of them"
        )
    return found


def read_run(workdir: paths.Path) -> ml_collections.ConfigDict:
    """A trained workdir's config (in today's key names); refuses one without trained weights."""
    if not (workdir / WEIGHTS_FILE).is_file():
        raise WeightsError(f"{workdir}: no trained weights ({WEIGHTS_FILE}); train it first")
    return config_lib.load_run_config(workdir)


def _prompts_file(bench_dir: paths.Path | None, instance_dir: paths.Path | None, where: str):
    for folder in (bench_dir, instance_dir.parent if instance_dir else None):
        if folder is not None and (folder / dreambench.PROMPTS_FILE).is_file():
            return folder / dreambench.PROMPTS_FILE
    raise DataError(
        f"{where}: no DreamBench {dreambench.PROMPTS_FILE} found (beside the photo folder); "
        "pass --dreambench DIR"
    )


def subject_from_workdir(
    workdir: paths.Path, bench_dir: paths.Path | None, max_prompts: int | None
) -> Subject:
    """The subject a workdir was trained on: its token, class and photos (real images)."""
    config = read_run(workdir)
    d = config.data
    generated = d.instance_dir == "synthetic" or d.instance_dir.startswith(world.PREFIX)
    instance = None if generated else paths.as_path(d.instance_dir)
    name = instance.name if instance is not None else workdir.name
    if d.instance_dir.startswith(world.PREFIX):  # a ToyBench subject: --toybench has its photos
        name = d.instance_dir[len(world.PREFIX) :]
    real_dir = bench_dir / name if bench_dir is not None else instance
    if real_dir is None:
        raise DataError(
            f"{workdir}: trained on the synthetic subject, which has no real images; pass "
            "--dreambench DIR with a DIR/SUBJECT photo folder"
        )
    _, objects, live_prompts = dreambench.parse_prompts_file(
        _prompts_file(bench_dir, instance, str(workdir))
    )
    live = d.class_name in dreambench.LIVE_CLASSES
    prompts, texts = protocol_prompts(
        live_prompts if live else objects, d.token, d.class_name, max_prompts
    )
    return Subject(name, d.class_name, live, prompts, texts, real_dir, workdir, config)


def subjects_from_images(
    folder: paths.Path, bench_dir: paths.Path | None, max_prompts: int | None
) -> list[Subject]:
    """The subjects of an image folder laid out like OUT/images (one sub-folder per subject)."""
    if bench_dir is None:
        raise ConfigError("--images needs --dreambench DIR (real images and prompts)")
    if not folder.is_dir():
        raise DataError(f"--images {folder}: folder not found")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"--images {folder}: no subject sub-folders")
    bench = dreambench.read_benchmark(bench_dir, names)
    subjects = []
    for name in names:
        class_name, live = bench.classes[name], bench.is_live(name)
        # The token is not known (nor needed): the stored images are scored, not regenerated.
        _, texts = protocol_prompts(bench.prompts(name), "", class_name, max_prompts)
        subjects.append(Subject(name, class_name, live, texts, texts, bench_dir / name))
    return subjects
