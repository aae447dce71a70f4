r"""Compile every program of a run for a TPU slice or GPU node, here, before paying for one.

  python -m idfuse_jax.compile_check --config configs/dreambench.py --target v5e-32 \
      --config.model.pretrained=weights/sd21-base \
      --config.model.image_encoder=weights/clip-vit-h-14
  python -m idfuse_jax.compile_check --config configs/tiny.py --target 8xh100 --out report.json

Takes the config as `train` does (`--config.x=y` overrides) and compiles, with the target's own
compiler (libtpu, or XLA's CUDA compiler; `pip install 'idfuse_jax[accel]'`) and compile-only
devices (`idfuse_jax.targets`: v5e-4/8/32, v5p-8, v6e-4/8, 1/8 x H100, H200, A100 40/80 GB),
every program the run compiles: the subject features (VAE encode, image encoder), the initial
state, the training step, the validation sampler, and evaluation's batch sampler
(`--eval_batch_size` images per device, as `evaluate --batch_size`). Every argument is abstract
(jax.ShapeDtypeStruct, laid out as the run lays it out): nothing is allocated, and a pretrained
config reads only the config.json files and scheduler/ of its weights folders (the published
ones for SD 2.1-base and ViT-H/14 are in tests/data/configs).

Prints, per program: per-device memory from the compiler's memory analysis (arguments, outputs,
temporaries, and the peak they add up to with donated buffers aliased) against the device's
memory (on a GPU, the JAX allocator's share: XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75),
"fits" or "does not fit"; the model FLOPs per device (`train_lib.model_flops`; not for the
samplers, whose denoising loop the count would see once); the compile seconds; and the
collectives of the compiled program. `--out FILE` writes the same as JSON. Exits 1 with one
`error: ...` line when a program does not fit, the mesh does not suit the target, or the
target's compiler refuses a program.

What the compilers cannot see without a device: GPU autotuning (XLA picks GEMM and fusion
configurations by its heuristics, and GEMMs compile through cuBLAS, not Triton, whose tiling
fails on some shapes without autotuning), cuDNN's workspace (allocated at run time, outside the
memory analysis), and the runtime's own reservations (on a GPU, the CUDA context and NCCL
buffers; the allocator's share above leaves room for them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from idfuse_jax import build, cli, config_lib, method, sharding, subject, targets, train_lib
from idfuse_jax.data import dreambench
from idfuse_jax.data import images as images_lib
from idfuse_jax.errors import ConfigError, UserError
from idfuse_jax.evaluation import generation

GIB = 2**30
PROGRAMS = ("features", "init", "step", "sampler", "evaluation")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode: "= TYPE all-reduce(" or its async "all-reduce-start(".
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# DreamBench: 30 subjects, at most 6 photos each; used when the data folder is not here.
DREAMBENCH_SUBJECTS = 30
DREAMBENCH_MOST_PHOTOS = 6


class DoesNotFitError(UserError):
    """A program needs more memory per device than the target has."""


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: `jitted_for(models)` is the jitted function for those models (the
    same networks with another attention implementation count the model FLOPs), `args` its
    abstract arguments."""

    name: str
    what: str
    jitted_for: Callable[[build.Models], Any]
    args: tuple
    count_flops: bool = True


@dataclasses.dataclass(frozen=True)
class Job:
    """The shapes of a training job that the data decides: subjects and images per subject."""

    subjects: int
    images: int  # per subject, with flips
    note: str = ""


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _sds(shape: Sequence[int], dtype: Any, sharding_: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding_)


def job_shapes(config: ml_collections.ConfigDict) -> Job:
    """How many subjects the config trains and images each has (with flips): from the data
    folder when it is here, else from the config (DreamBench's figures for subjects "all")."""
    d = config.data
    root, notes = pathlib.Path(d.instance_dir), []
    if not d.subjects:
        count, folders = 1, [root]
    elif d.subjects != "all":
        names = [name for name, _ in subject.parse_subjects(d.subjects)]
        count, folders = len(names), [root / name for name in names]
    elif root.is_dir():
        names = dreambench.read_benchmark(root).subjects
        count, folders = len(names), [root / name for name in names]
    else:
        count, folders = DREAMBENCH_SUBJECTS, []
        notes.append(f"{root} is not here: DreamBench's {count} subjects")
    flips = 2 if d.random_flip else 1
    if d.instance_dir == "synthetic":
        return Job(count, d.synthetic_images * flips)
    photos = [len(images_lib.list_images(f)) for f in folders if f.is_dir()]
    if not photos:
        notes.append(f"no photos here: {DREAMBENCH_MOST_PHOTOS} a subject, as DreamBench's most")
    most = max(photos, default=DREAMBENCH_MOST_PHOTOS)
    return Job(count, most * flips, "; ".join(notes))


def abstract_subjects(models: build.Models, slots: int, images: int, side: int) -> Any:
    """`method.stack_subjects`' output for `slots` subjects of `images` images, as shapes."""
    s = lambda shape, dt=jnp.float32: _sds(shape, dt)
    latent = (slots, images, side, side, models.unet.config.in_channels)
    width = models.idfuse.image_width
    tokens = models.text_encoder.config.max_position_embeddings
    return method.SubjectFeatures(
        latent_mean=s(latent),
        latent_logvar=s(latent),
        image_embeds=s((slots, images, width)),
        background_embeds=s((slots, images, width)),
        prompt_ids=s((slots, 1, tokens), jnp.int32),
        num_items=images,
        decouple=s((slots, images)),
    )


def training_programs(
    config: ml_collections.ConfigDict,
    models: build.Models,
    frozen: dict[str, Any],
    mesh: jax.sharding.Mesh,
    job: Job,
    slots: int,
) -> list[Program]:
    """The programs `train` compiles, in its order: subject features, initial state, step,
    validation sampler; laid out as `train_lib.train_and_evaluate` lays them out over `mesh`,
    for `slots` subject slots (the job's subjects padded to a multiple of the subject axis)."""
    frozen = _abstract(frozen, sharding.fsdp_shardings(frozen, mesh))
    side = config.data.resolution // models.latent_downsample
    pixels = models.image_encoder.config.image_size
    res = config.data.resolution
    image = _sds((1, res, res, 3), jnp.float32)
    clip_image = _sds((1, pixels, pixels, 3), jnp.float32)
    features = [
        Program(
            "features: VAE encode",
            f"VAE moments of one {res} px image",
            lambda m: subject.feature_programs(m, mesh)[0],
            (frozen["vae"], image),
        ),
        Program(
            "features: image encoder",
            f"CLIP image embedding of one {pixels} px image",
            lambda m: subject.feature_programs(m, mesh)[1],
            (frozen["image"], clip_image),
        ),
    ]
    del frozen["image"]  # freed after the features, as train_lib does
    init = lambda m: train_lib.init_program(config, m, slots, mesh)
    state, key = jax.eval_shape(init(models), frozen)
    batch = config.train.batch_size
    step_args = (
        state,
        frozen,
        abstract_subjects(models, slots, job.images, side),
        _sds((slots, batch), jnp.int32),
        key,
        _sds((slots,), jnp.int32),
    )
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    tokens = models.text_encoder.config.max_position_embeddings
    replicated = sharding.replicated(mesh)
    prompts = _sds((job.subjects, len(config.sample.prompts), tokens), jnp.int32, replicated)
    null_ids = np.zeros((1, tokens), np.int32)
    return [
        *features,
        Program("init", f"initial state of {slots} subject slots", init, (frozen,), False),
        Program(
            "step",
            f"training step: {slots} subject slots, batch {batch} each",
            lambda m: train_lib.jit_subjects_step(m, config, mesh, frozen_shardings),
            step_args,
        ),
        Program(
            "sampler",
            f"validation samples: {len(config.sample.prompts)} prompts, "
            f"{config.sample.num_steps} steps",
            lambda m: train_lib.jit_sampler(m, config, mesh, null_ids),
            (frozen, state.params, prompts, _sds((), jnp.int32, replicated)),
            False,
        ),
    ]


def evaluation_program(
    config: ml_collections.ConfigDict,
    models: build.Models,
    frozen: dict[str, Any],
    mesh: jax.sharding.Mesh,
    size: int,
) -> Program:
    """`evaluate`'s batch sampler of `size` images over `mesh` (`make_mesh(-1, 1)`: a data axis
    of every device), weights replicated."""
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    frozen = _abstract(frozen, jax.tree.map(lambda _: replicated, frozen))
    trainable = jax.eval_shape(
        lambda f: method.init_trainable(jax.random.key(0), models, config, f), frozen
    )
    trainable = _abstract(trainable, jax.tree.map(lambda _: replicated, trainable))
    tokens = models.text_encoder.config.max_position_embeddings
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    null_ids = np.zeros((1, tokens), np.int32)
    return Program(
        "evaluation",
        f"evaluation batches of {size} images, {config.sample.num_steps} steps",
        lambda m: generation.jit_generation(m, config, mesh, null_ids),
        (
            frozen,
            trainable,
            _sds((size, tokens), jnp.int32, batch),
            _sds((size, *key_shape), jnp.uint32, batch),
        ),
        False,
    )


def count_kernels(hlo_text: str) -> dict[str, int]:
    """The fused attention kernels a compiled program calls, by their custom calls: cuDNN's
    (GPU; its convolutions not counted) and Mosaic's (Pallas, TPU)."""
    return {
        "cudnn": len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo_text)),
        "mosaic": len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text)),
    }


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective a compiled program's HLO holds (async pairs count once)."""
    found = _COLLECTIVE.findall(hlo_text)
    return {name: found.count(name) for name in COLLECTIVES}


def compile_program(
    program: Program,
    twin: Program,
    models: build.Models,
    target: targets.Target,
    num_devices: int,
) -> dict[str, Any]:
    """Compile `program` for `target`: memory per device (bytes), model FLOPs per device,
    compile seconds, collectives; a program the compiler refuses for its memory has
    "error" set instead of the memory.

    The model FLOPs are those of `twin`, the same program over one CPU device, divided by the
    devices: the whole job's math (`train_lib.model_flops`), which a compile-only client cannot
    count (its cost analysis of a lowered program is None)."""
    result: dict[str, Any] = {"program": program.name, "what": program.what}
    if program.count_flops:
        flops = train_lib.model_flops(twin.jitted_for, models, twin.args)
        result["model_flops_per_device"] = flops / num_devices
    start = time.perf_counter()
    try:
        lowered = program.jitted_for(models).lower(*program.args)
        compiled = lowered.compile(target.compiler_options())
    except Exception as e:  # jax raises JaxRuntimeError (XlaRuntimeError before 0.4.36)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise ConfigError(
                f"{program.name}: the {target.name} compiler refused it: {_first_line(e)}"
            ) from e
        result["error"] = _first_line(e)
        result["compile_seconds"] = time.perf_counter() - start
        return result
    result["compile_seconds"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    arguments, outputs = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temps = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    result.update(
        arguments=arguments,
        outputs=outputs,
        aliased=alias,
        temporaries=temps,
        peak=arguments + outputs - alias + temps,
    )
    text = compiled.as_text()
    result.update(collectives=count_collectives(text), kernels=count_kernels(text))
    return result


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


HEADER = (
    "| program | arguments GiB | outputs GiB | temporaries GiB | peak GiB | fits | "
    "model TFLOP per device | compile s | collectives | fused attention calls |\n"
    "|---|---:|---:|---:|---:|---|---:|---:|---|---|"
)


def table_row(r: dict[str, Any]) -> str:
    flops = r.get("model_flops_per_device")
    collectives = ", ".join(f"{k} {v}" for k, v in r.get("collectives", {}).items() if v)
    cells = [
        r["program"],
        *(_gib(r.get(k)) for k in ("arguments", "outputs", "temporaries", "peak")),
        "yes" if r["fits"] else "**no**",
        "-" if flops is None else f"{flops / 1e12:.3g}",
        f"{r['compile_seconds']:.1f}",
        collectives or ("-" if "error" in r else "none"),
        ", ".join(f"{k} {v}" for k, v in r.get("kernels", {}).items() if v) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def check(
    config: ml_collections.ConfigDict,
    target: targets.Target,
    *,
    programs: Sequence[str] = PROGRAMS,
    eval_batch_size: int = 4,
    memory_bytes: int | None = None,
    log: Callable[[str], None] = print,
    save: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Compile `programs` of the run `config` describes for `target`; the report (a dict for
    JSON). `memory_bytes` replaces the device's usable memory (a smaller device, or a MIG slice).
    `save(report)` is called after each program (full-size compiles take minutes each), with
    report["complete"] False until the last."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ConfigError(f"--programs: unknown {unknown}; choose from {', '.join(PROGRAMS)}")
    config_lib.validate(config)
    devices = target.devices()
    limit = memory_bytes or target.usable_bytes
    try:
        mesh = sharding.make_mesh(
            config.mesh.data, config.mesh.fsdp, devices, subject=config.mesh.subject
        )
        sharding.check_batch_size(config.train.batch_size, mesh)
    except ConfigError as e:
        raise ConfigError(f"target {target.name} ({len(devices)} devices): {e}") from None
    job = job_shapes(config)
    slots = -(-job.subjects // mesh.shape["subject"]) * mesh.shape["subject"]
    eval_mesh = sharding.make_mesh(-1, 1, devices)
    eval_size = eval_batch_size * eval_mesh.size
    models, frozen = build.abstract_models(config)
    # The same programs over one CPU device (every mesh axis of size 1), for the model FLOPs.
    cpu = jax.devices("cpu")[:1]
    one = sharding.make_mesh(1, 1, cpu, subject=1)
    report = {
        "target": target.name,
        "device": target.device_name,
        "devices": len(devices),
        "device_memory_bytes": target.memory_bytes,
        "usable_bytes": limit,
        "peak_flops_per_device": target.peak_flops,
        "mesh": dict(mesh.shape),
        "subjects": job.subjects,
        "images_per_subject": job.images,
        "resolution": config.data.resolution,
        "attention": config.model.attention,
        "dtype": config.model.dtype,
        "weights_dtype": config.model.weights_dtype or "float32",
        "jax": jax.__version__,
        "complete": False,
        "programs": [],
    }
    log(
        f"{target.name}: {len(devices)} x {target.device_name}, {_gib(limit)} GiB usable per "
        f"device; mesh {dict(mesh.shape)}; {job.subjects} subject(s), {job.images} images each"
        f"{f' ({job.note})' if job.note else ''}; {config.data.resolution} px, compute "
        f"{config.model.dtype}, weights {report['weights_dtype']}, attention "
        f"{config.model.attention}"
    )
    pairs = zip(
        training_programs(config, models, frozen, mesh, job, slots),
        training_programs(config, models, frozen, one, job, slots),
    )
    todo = [(p, twin) for p, twin in pairs if p.name.split(":")[0] in programs]
    if "evaluation" in programs:
        todo.append(
            (
                evaluation_program(config, models, frozen, eval_mesh, eval_size),
                evaluation_program(config, models, frozen, one, eval_size),
            )
        )
    for i, (program, twin) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {program.name} ({program.what}): compiling ...")
        r = compile_program(program, twin, models, target, len(devices))
        r["fits"] = "error" not in r and r["peak"] <= limit
        report["programs"].append(r)
        save(report)
        log(
            f"[{i}/{len(todo)}] {program.name}: "
            + (
                f"peak {_gib(r['peak'])} GiB per device"
                if "peak" in r
                else f"the compiler ran out of memory: {r['error']}"
            )
            + f", {'fits' if r['fits'] else 'DOES NOT FIT'}, compiled in "
            f"{r['compile_seconds']:.1f} s"
        )
    report["fits"] = all(r["fits"] for r in report["programs"])
    report["complete"] = True
    save(report)
    return report


def does_not_fit_message(report: dict[str, Any]) -> str:
    bad = [r for r in report["programs"] if not r["fits"]]
    parts = [
        f"{r['program']} needs {_gib(r['peak'])} GiB"
        if "peak" in r
        else f"{r['program']} ran out of memory in the compiler"
        for r in bad
    ]
    return (
        f"does not fit a {report['target']}: {'; '.join(parts)} per device, of "
        f"{_gib(report['usable_bytes'])} GiB usable; use more devices (mesh.fsdp, mesh.subject), "
        "bfloat16 weights (model.weights_dtype) or model.remat"
    )


# --------------------------------------------------------------------------------------------
# The command line

def define_flags() -> None:
    """The command's flags, defined when it runs as a program (not on import: tests import this
    module beside other CLIs whose flags share names, such as --out)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py).", lock_config=True
    )
    flags.DEFINE_string("target", None, f"Compile for: {', '.join(targets.TARGETS)}.")
    flags.DEFINE_string("out", None, "Also write the report as JSON to this file.")
    flags.DEFINE_list("programs", list(PROGRAMS), "Which programs to compile.")
    flags.DEFINE_integer(
        "eval_batch_size", 4, "Evaluation images per device (evaluate --batch_size)."
    )
    flags.DEFINE_float(
        "memory_gib", None,
        "Usable memory per device in GiB, instead of the target's (a MIG slice).",
    )
    flags.mark_flags_as_required(["config", "target"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    # Compile-only devices need no local accelerator (and must not take one from a run).
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    f = flags.FLAGS
    target = targets.get(f.target)
    memory = None if f.memory_gib is None else int(f.memory_gib * GIB)
    log = lambda line: print(line, flush=True)
    path = pathlib.Path(f.out) if f.out else None
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    save = lambda report: path.write_text(json.dumps(report, indent=2) + "\n") if path else None
    report = check(
        f.config,
        target,
        programs=f.programs,
        eval_batch_size=f.eval_batch_size,
        memory_bytes=memory,
        log=log,
        save=save,
    )
    log(HEADER)
    for r in report["programs"]:
        log(table_row(r))
    if path:
        log(f"report written to {path}")
    if not report["fits"]:
        raise DoesNotFitError(does_not_fit_message(report))
    step = [r for r in report["programs"] if r["program"] == "step"]
    flops = step[0].get("model_flops_per_device") if step else None
    if flops:
        seconds = flops / target.peak_flops
        log(
            f"step: {flops / 1e12:.2f} model TFLOP per device; at 100% MFU {seconds:.3f} s a step "
            f"on {target.device_name} ({target.peak_flops / 1e12:.0f} TFLOP/s bf16 peak)"
        )
    return 0


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(lambda argv: cli.run_or_fail(main, argv), flags_parser=cli.parse_flags))
