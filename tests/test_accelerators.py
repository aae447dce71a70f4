"""The tiny config's programs compiled for real accelerators, on this CPU: a v5e 2x2 TPU slice
(libtpu's compile-only topology) with the Pallas flash kernel and 8 H100s (the CUDA plugin's
deviceless topology) with cuDNN's fused attention.

Each program a run compiles (subject features, the step, the sampler) compiles on one mesh
that splits subjects and shards the frozen weights (fsdp), and, on the 8 GPUs, the batch too
(the v5e-4's 4 chips cannot hold three split axes: its data x fsdp run compiles in
tests/test_compile_check.py), and holds the kernel itself (Mosaic's custom call on TPU, cuDNN's
fused attention on GPU: a fallback that hides the kernel would prove nothing); the step over a
subject-only mesh holds no collective. Nothing is run: the programs are lowered from abstract
arrays and compiled. One mesh with every axis, not one per axis: TPU compiles of even the tiny
step take minutes on 2 cores.
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idfuse_jax import build, config_lib, method, sharding, subject, targets, train_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
KERNELS = {"tpu": 'custom_call_target="tpu_custom_call"', "gpu": 'custom_call_target="__cudnn$fmha'}
COLLECTIVE = re.compile(r"\s(all-reduce|all-gather|reduce-scatter)(-start)?\(")


TARGETS = {"tpu": "v5e-4", "gpu": "8xh100"}  # `idfuse_jax.targets` names


def target_devices(platform: str) -> list[jax.Device]:
    return targets.devices(TARGETS[platform])


@functools.cache
def tiny(platform: str) -> tuple[object, build.Models, dict]:
    """(config, models, frozen weights' shapes) of the tiny config with the target's kernel."""
    config = config_lib.sibling_module(str(CONFIGS / "default.py"), "smoke").get_config()
    config.model.attention = {"tpu": "tpu_flash", "gpu": "cudnn"}[platform]
    config.model.random.text_layers = config.model.random.image_layers = 1  # compile time
    if platform == "gpu":
        config.model.dtype = "bfloat16"  # cuDNN's flash kernel takes half precision only
    models = build.random_modules(config)
    return config, models, jax.eval_shape(lambda: build.random_weights(models, config))


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


# Meshes of the target's devices: ("subject", "data", "fsdp") sizes.
MESHES = {
    "tpu": {"split": (2, 1, 2), "subject": (4, 1, 1)},
    "gpu": {"split": (2, 2, 2), "subject": (8, 1, 1)},
}


@functools.cache
def compiled_programs(platform: str, mesh_name: str, names: tuple[str, ...]) -> dict[str, str]:
    """{name: compiled HLO text} of the programs `names` (of "encode", "embed", "step",
    "sampler") of a run of the tiny config over a mesh of the target's devices."""
    config, models, frozen = tiny(platform)
    subject_size, data, fsdp = MESHES[platform][mesh_name]
    mesh = sharding.make_mesh(data, fsdp, target_devices(platform), subject=subject_size)
    replicated = sharding.replicated(mesh)
    frozen = _abstract(frozen, sharding.fsdp_shardings(frozen, mesh))
    whole = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    r, size = config.data.resolution, models.image_encoder.config.image_size
    encode, embed = subject.feature_programs(models, mesh)
    lowered = {
        "encode": encode.lower(frozen["vae"], whole((1, r, r, 3))),
        "embed": embed.lower(frozen["image"], whole((1, size, size, 3))),
    }
    # The step, from the shapes of one subject's features stacked over the subject slots: two
    # per device (DreamBench's 30 on 8 GPUs are 4), which a kernel's batching must take.
    count = 2 * mesh.shape["subject"]
    items = 2 * config.data.synthetic_images  # with flips
    latent, width = lowered["encode"].out_info[0].shape[1:], lowered["embed"].out_info.shape[-1]
    per_subject = sharding.subject_sharding(mesh)
    features = method.SubjectFeatures(
        latent_mean=jax.ShapeDtypeStruct((count, items, *latent), jnp.float32),
        latent_logvar=jax.ShapeDtypeStruct((count, items, *latent), jnp.float32),
        image_embeds=jax.ShapeDtypeStruct((count, items, width), jnp.float32),
        background_embeds=jax.ShapeDtypeStruct((count, items, width), jnp.float32),
        prompt_ids=jax.ShapeDtypeStruct((count, *np.shape(models.tokenizer(["a"]))), jnp.int32),
        num_items=items,
        decouple=jax.ShapeDtypeStruct((count, items), jnp.float32),
    )
    features = _abstract(features, jax.tree.map(lambda _: per_subject, features))
    state, key = jax.eval_shape(
        lambda f: train_lib.initial_state(config, models, f, count, mesh), frozen
    )
    state = _abstract(state, jax.tree.map(lambda _: per_subject, state))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    indices = jax.ShapeDtypeStruct(
        (count, config.train.batch_size), jnp.int32, sharding=sharding.subject_batch_sharding(mesh)
    )
    num_steps = jax.ShapeDtypeStruct((count,), jnp.int32, sharding=per_subject)
    # On the subject-only mesh, the metrics stay with their subjects: gathering them (a few
    # scalars per subject, which the loop asks for) is then the only communication.
    step = train_lib.jit_subjects_step(
        models,
        config,
        mesh,
        jax.tree.map(lambda x: x.sharding, frozen),
        gather_metrics=mesh_name != "subject",
    )
    if "step" in names:
        lowered["step"] = step.lower(state, frozen, features, indices, key, num_steps)
    if "sampler" in names:
        prompt_ids = whole((count, len(config.sample.prompts), features.prompt_ids.shape[-1]))
        sampler = train_lib.jit_sampler(models, config, mesh)
        lowered["sampler"] = sampler.lower(
            frozen, state.params, prompt_ids.update(dtype=jnp.int32), whole((), jnp.int32)
        )
    options = targets.get(TARGETS[platform]).compiler_options()
    return {name: lowered[name].compile(options).as_text() for name in names}


def collectives(hlo: str) -> set[str]:
    return {m[0] for m in COLLECTIVE.findall(hlo)}


PROGRAMS = ("encode", "embed", "step", "sampler")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_programs_compile_for_the_target_with_its_kernel(platform):
    """Subject features, the step and the sampler compile for the target's devices split over
    subjects and weights, with the target's fused attention inside (the VAE's float32 attention
    on GPU goes blockwise); the sharded weights are gathered where they are used."""
    compiled = compiled_programs(platform, "split", PROGRAMS)
    for name, hlo in compiled.items():
        expected = not (platform == "gpu" and name == "encode")
        assert (KERNELS[platform] in hlo) == expected, (platform, name)
    assert "all-gather" in collectives(compiled["step"]), platform


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_subject_only_step_has_no_collective(platform):
    """Subjects split over the devices, each whole on its own: the step's computation needs no
    communication (no tie of backward.after across devices, kernels under a shard_map per
    subject); its metrics are left split over the subjects (the loop gathers them: a few
    scalars per subject, the only collective then)."""
    (hlo,) = compiled_programs(platform, "subject", ("step",)).values()
    assert KERNELS[platform] in hlo
    assert collectives(hlo) == set(), platform
