"""Per-device memory and FLOPs of the multi-subject training step at SD 2.1-base size, per mesh.

Compiles (never runs) the library's own jitted `train_lib.subjects_step`, laid out exactly as
`train_lib.train_and_evaluate` lays it out (in/out shardings, donated state), for the paper's
setup as `configs/dreambench.py` trains it: SD 2.1-base UNet and OpenCLIP ViT-H/14 text encoder
(the published configs in tests/data/configs, no weights), ViT-H/14 image width 1024 for the
adapter and FFM, 512 px (64x64 latents), bfloat16 compute, a batch of 1 per subject. Every
argument is abstract (`jax.ShapeDtypeStruct`), so nothing is allocated; a mesh of N devices is N
fake CPU devices. Per case it prints XLA's memory analysis of the compiled per-device program
(arguments, outputs, temporaries, and the peak they add up to with the donated state aliased),
the FLOPs per device of its cost analysis (which counts a loop's body once), and the model FLOPs
per device (the step lowered with materialised attention, whose FLOPs the cost analysis counts
in full; `--nocompile` prints these alone, in seconds).

  PYTHONPATH=. python benchmarks/mesh_memory.py --cases 1x1x1:1,1x1x1:2
  PYTHONPATH=. python benchmarks/mesh_memory.py --cases 8x1x1:32,32x1x1:32,8x1x4:32:4
  PYTHONPATH=. python benchmarks/mesh_memory.py --nocompile --cases 1x1x1:30   # seconds

A case is SUBJECTxDATAxFSDP:S[:B]: the mesh ("subject", "data", "fsdp"), S subject slots in the
job (a multiple of the subject axis) and B examples per subject (default 1; data x fsdp must
divide it). The figures come from XLA's CPU backend: GPU and TPU compilers fuse and assign
buffers differently, and their flash-attention kernels replace the blockwise attention compiled
here, so read them as a guide to how memory splits and scales, not as a promise for a device.
Run from the repository root with PYTHONPATH=. (or `pip install -e .`) to compile this
checkout's idfuse_jax.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from idfuse_jax import (
    build,
    config_lib,
    diffusion,
    formats,
    method,
    sharding,
    train_lib,
    weights,
)
from idfuse_jax.cli import fail, parse_flags, run_or_fail
from idfuse_jax.errors import ConfigError
from idfuse_jax.models import clip, conditioning, unet, vae

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "data" / "configs"
SD21 = CONFIGS / "stabilityai" / "stable-diffusion-2-1-base"
VIT_H = CONFIGS / "laion" / "CLIP-ViT-H-14-laion2B-s32B-b79K"
GIB = 2**30
# DreamBench's largest subject has 6 photos: 12 training images with flips (stack_subjects pads
# every subject to the largest).
IMAGES_PER_SUBJECT = 12

flags.DEFINE_list(
    "cases",
    ["1x1x1:1", "1x1x1:2", "8x1x1:32", "32x1x1:32", "8x1x4:32:4"],
    "Meshes to compile, each SUBJECTxDATAxFSDP:S[:B] (S subject slots, B examples per subject).",
)
flags.DEFINE_list(
    "weights_dtypes", ["float32", "bfloat16"], "model.weights_dtype of the frozen UNet and CLIP."
)
flags.DEFINE_enum("dtype", "bfloat16", list(build.DTYPES), "model.dtype: the compute dtype.")
flags.DEFINE_string("attention", "auto", "model.attention ('auto': blockwise on CPU).")
flags.DEFINE_bool("remat", False, "model.remat: rematerialise the UNet blocks.")
flags.DEFINE_integer("resolution", 512, "Training resolution in pixels (latents: / 8).")
flags.DEFINE_integer("images", IMAGES_PER_SUBJECT, "Training images per subject (with flips).")
flags.DEFINE_bool(
    "compile", True, "Compile each step (memory); --nocompile prints the model FLOPs alone."
)
flags.DEFINE_list(
    "lora",
    ["unet", "text"],
    "Models with LoRA (the default targets); leave one out to measure what its merged copies "
    "cost per subject.",
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: mesh sizes, subject slots, examples per subject."""

    subject: int
    data: int
    fsdp: int
    slots: int
    batch: int = 1

    @property
    def devices(self) -> int:
        return self.subject * self.data * self.fsdp

    @property
    def mesh(self) -> str:
        return f"{self.subject}x{self.data}x{self.fsdp}"

    @classmethod
    def parse(cls, text: str) -> Case:
        """'8x1x4:32:4' -> Case(8, 1, 4, 32, 4); a malformed or inconsistent case is an error."""
        try:
            mesh, *rest = text.split(":")
            subject, data, fsdp = (int(n) for n in mesh.split("x"))
            case = cls(subject, data, fsdp, *(int(n) for n in rest))
        except (TypeError, ValueError):
            raise ConfigError(
                f"--cases entry {text!r}: expected SUBJECTxDATAxFSDP:S[:B], e.g. 8x1x4:32:4"
            ) from None
        sizes = (case.subject, case.data, case.fsdp, case.slots, case.batch)
        if min(sizes) < 1 or case.slots % case.subject or case.batch % (case.data * case.fsdp):
            raise ConfigError(
                f"--cases entry {text!r}: sizes must be positive, S a multiple of the subject "
                "axis and B of data x fsdp"
            )
        return case


def sd21_config(weights_dtype: str) -> Any:
    """configs/dreambench.py (the SD 2.1-base setup of dog.py, a subject axis) as flagged."""
    config = config_lib.sibling_module(str(REPO / "configs" / "dreambench.py"), "dreambench")
    config = config.get_config()
    config.model.dtype = flags.FLAGS.dtype
    config.model.weights_dtype = "" if weights_dtype == "float32" else weights_dtype
    config.model.attention = flags.FLAGS.attention
    config.model.remat = flags.FLAGS.remat
    config.data.resolution = flags.FLAGS.resolution
    if "unet" not in flags.FLAGS.lora:
        config.method.unet_lora_targets = ""
    if "text" not in flags.FLAGS.lora:
        config.method.text_lora_targets = ""
    return config


def sd21_models(config: Any) -> tuple[build.Models, dict[str, Any]]:
    """(Models, abstract frozen params {"unet", "vae", "text"}) of SD 2.1-base with the ViT-H/14
    image width, from the published configs; frozen leaves are ShapeDtypeStructs in their
    storage dtype (the VAE float32), as `build.pretrained_models` would load them."""
    dtype, attention = build.DTYPES[config.model.dtype], config.model.attention
    unet_model = unet.UNet2DConditionModel(
        unet.UNetConfig.from_diffusers(formats.read_config(SD21 / "unet")),
        dtype=dtype,
        remat=config.model.remat,
        attention=attention,
    )
    vae_model = vae.AutoencoderKL(
        vae.VAEConfig.from_diffusers(formats.read_config(SD21 / "vae")), attention=attention
    )
    text_config = clip.CLIPTextConfig.from_transformers(
        formats.read_config(SD21 / "text_encoder"), with_projection=False
    )
    text_model = clip.CLIPTextTransformer(text_config, dtype=dtype, attention=attention)
    image_config = clip.CLIPVisionConfig.from_transformers(
        formats.read_config(VIT_H), with_projection=True
    )
    # The image tower's own work (subject features) happens before the step; the step sees
    # only its projection width.
    image_model = clip.CLIPVisionTransformer(image_config, dtype=dtype, attention=attention)
    m = config.method
    idfuse = conditioning.IdFuse(
        image_width=image_config.projection_dim,
        text_width=text_config.hidden_size,
        num_experts=m.num_experts,
        expert_hidden_mult=m.expert_hidden_mult,
        adapter_hidden_mult=m.adapter_hidden_mult,
    )
    models = build.Models(
        unet=unet_model,
        vae=vae_model,
        text_encoder=text_model,
        image_encoder=image_model,
        idfuse=idfuse,
        tokenizer=None,
        schedule=diffusion.load_schedule(SD21),
    )
    store = build.WEIGHTS_DTYPES[config.model.weights_dtype]
    cast = lambda tree, dt: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), tree)
    frozen = {
        "unet": cast(weights.abstract_params(unet_model), store),
        "vae": cast(weights.abstract_params(vae_model), jnp.float32),
        "text": cast(weights.abstract_params(text_model), store),
    }
    return models, frozen


def abstract_subjects(models: build.Models, slots: int, images: int, side: int) -> Any:
    """`method.stack_subjects`' output for `slots` subjects of `images` images, as shapes."""
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
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


def _flops(cost: Any) -> float:
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) if cost else float("nan")


def compile_case(case: Case, weights_dtype: str, compile_step: bool) -> dict[str, float]:
    """The job's step for `case`: its model TFLOP per device and, when `compile_step`, its
    per-device memory (GiB), the compiled program's TFLOP per device and compile seconds."""
    config = sd21_config(weights_dtype)
    config.mesh.subject, config.mesh.data, config.mesh.fsdp = case.subject, case.data, case.fsdp
    config.train.batch_size = case.batch
    mesh = sharding.make_mesh(
        case.data, case.fsdp, jax.devices()[: case.devices], subject=case.subject
    )
    sharding.check_batch_size(case.batch, mesh)
    models, frozen = sd21_models(config)
    state, key = jax.eval_shape(
        lambda f: train_lib.initial_state(config, models, f, case.slots, mesh), frozen
    )
    side = config.data.resolution // models.latent_downsample
    subjects = abstract_subjects(models, case.slots, flags.FLAGS.images, side)
    indices = jax.ShapeDtypeStruct((case.slots, case.batch), jnp.int32)
    num_steps = jax.ShapeDtypeStruct((case.slots,), jnp.int32)
    args = (state, frozen, subjects, indices, key, num_steps)
    jitted = lambda models: train_lib.jit_subjects_step(
        models, config, mesh, sharding.fsdp_shardings(frozen, mesh)
    )
    # Model FLOPs: the whole job's step before partitioning, with materialised attention,
    # split evenly over the devices (train_lib.model_flops, as the training log reports them).
    result = {
        "frozen": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen)) / GIB,
        "model_tflop": train_lib.model_flops(jitted, models, args) / case.devices / 1e12,
    }
    if not compile_step:
        return result
    start = time.perf_counter()
    compiled = jitted(models).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    arguments, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    return result | {
        "args": arguments / GIB,
        "outputs": out / GIB,
        "temps": temp / GIB,
        "peak": (arguments + out - alias + temp) / GIB,
        "tflop": _flops(compiled.cost_analysis()) / 1e12,
        "seconds": seconds,
    }


HEADER = (
    "| mesh (subject x data x fsdp) | devices | S | S per device | B | frozen weights | "
    "arguments GiB | outputs GiB | temporaries GiB | peak GiB | model TFLOP per device | "
    "compiled TFLOP per device | compile s |\n"
    "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
)


def row(case: Case, weights_dtype: str, r: dict[str, float]) -> str:
    cells = [
        case.mesh,
        case.devices,
        case.slots,
        case.slots // case.subject,
        case.batch,
        f"{weights_dtype} ({r['frozen']:.2f} GiB)",
        *(f"{r[k]:.2f}" if k in r else "-" for k in ("args", "outputs", "temps", "peak")),
        f"{r['model_tflop']:.2f}",
        f"{r['tflop']:.2f}" if "tflop" in r else "-",
        f"{r['seconds']:.0f}" if "seconds" in r else "-",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see --help")
    cases = [Case.parse(text) for text in flags.FLAGS.cases]
    if set(flags.FLAGS.lora) - {"unet", "text"}:
        fail(f"--lora {flags.FLAGS.lora}: expected a list of unet, text (or nothing)")
    for dt in flags.FLAGS.weights_dtypes:
        if dt not in build.WEIGHTS_DTYPES or not dt:
            fail(f"--weights_dtypes entry {dt!r}: expected float32 or bfloat16")
    # Fake CPU devices for the largest mesh; must be set before JAX starts its CPU backend.
    jax.config.update("jax_num_cpu_devices", max(c.devices for c in cases))
    f = flags.FLAGS
    print(
        f"SD 2.1-base + ViT-H/14 width, {f.resolution} px, compute {f.dtype}, attention "
        f"{f.attention}, remat {f.remat}, LoRA on {','.join(f.lora) or 'nothing'}, {f.images} "
        f"images per subject; jax {jax.__version__}, "
        f"{jax.device_count()} fake {jax.devices()[0].platform} devices",
        flush=True,
    )
    print(HEADER, flush=True)
    for case in cases:
        for dt in f.weights_dtypes:
            print(row(case, dt, compile_case(case, dt, f.compile)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(lambda argv: run_or_fail(main, argv), flags_parser=parse_flags))
