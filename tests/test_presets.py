"""Method presets (idfuse_jax/presets.py): each trains the parts it names, a bad name is one
line, and DisenBooth's step matches a PyTorch DisenBooth step (benchmarks/step_bench.py's
reference step on diffusers/transformers, configured by the same preset) on the same weights
and batch.
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from idfuse_jax import build, config_lib, export, method, presets, train_lib, weights
from idfuse_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import step_bench  # noqa: E402  (benchmarks/ is not a package)
from bench_models import save_and_load  # noqa: E402
from test_train_loop import tiny_config  # noqa: E402


def preset_config(name: str):
    config = step_bench.bench_config("float32", "xla")
    config.method.preset = name
    return config


def test_bad_preset_is_one_line_listing_the_names():
    config = preset_config("disenboot")
    config.data.instance_dir = "synthetic"
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config)
    assert str(info.value) == (
        f"config.method.preset='disenboot' is not one of {list(presets.PRESETS)}"
    )
    config = preset_config("dreambooth_lora")
    config.data.instance_dir = "synthetic"
    config.method.background = "explicit"
    with pytest.raises(ConfigError, match="needs the image branch and explicit decoupling"):
        config_lib.validate(config)


def test_presets_name_their_parts():
    assert presets.PRESETS["idfuse"].terms == (
        "denoise", "text_image", "image_background", "text_background")  # fmt: skip
    assert presets.PRESETS["idfuse_no_explicit"].terms == ("denoise", "text_image")
    assert presets.PRESETS["idfuse_no_image_branch"].terms == ("denoise", "text_background")
    assert presets.PRESETS["disenbooth"].terms == ("denoise", "text_image")
    assert presets.PRESETS["dreambooth_lora"].terms == ("denoise",)
    config = preset_config("disenbooth")
    assert presets.text_lora_targets(config) == ""
    config.method.text_lora = "on"  # DisenBooth with text-encoder LoRA, as its flag allows
    assert presets.text_lora_targets(config) == config.method.text_lora_targets
    assert presets.text_lora_targets(preset_config("idfuse_no_ffm"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """step_bench's tiny torch UNet and text encoder, and the same weights loaded by our
    loaders; the batch as `subject_inputs` draws it."""
    tmp = tmp_path_factory.mktemp("parity")
    spec = step_bench.SIZES["tiny"]
    torch.manual_seed(0)
    torch_unet = TorchUNet(**spec["unet"], sample_size=spec["latent"], in_channels=4,
                           out_channels=4)  # fmt: skip
    torch_text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**spec["text"], vocab_size=49408)
    )
    load = dict(dtype=jnp.float32, attention="xla")
    unet_module, unet_params = save_and_load(
        torch_unet, functools.partial(weights.load_unet, **load), tmp / "unet"
    )
    text_module, text_params = save_and_load(
        torch_text, functools.partial(weights.load_clip_text, **load), tmp / "text"
    )
    inputs = step_bench.subject_inputs(spec, np.random.default_rng(0))
    frozen = {"unet": unet_params, "text": text_params}
    return spec, torch_unet.float(), torch_text.float(), unet_module, text_module, frozen, inputs


def _torch_parameters(trainable, torch_unet, torch_text, idfuse) -> dict:
    """Trainable-tree path -> (the torch parameter holding the same weights, transposed?)."""
    out = {}
    for path, (name, _) in export.export_names(trainable).items():
        if path[0] == "idfuse":  # ("idfuse", "adapter", "fc1", "kernel") -> idfuse.fc1.weight
            module = idfuse
            for part in path[2:-1]:
                module = getattr(module, part)
            leaf = {"kernel": "weight", "bias": "bias"}.get(path[-1], path[-1])
            out[path] = (getattr(module, leaf), path[-1] == "kernel")
            continue
        model = torch_unet if name.startswith("unet.") else torch_text
        owner, _, factor = name.split(".", 1)[1].removesuffix(".weight").rpartition(".")
        attribute = {"lora_A": "down", "lora_B": "up"}[factor]
        out[path] = (getattr(model.get_submodule(owner), attribute), True)
    return out


def test_disenbooth_step_matches_pytorch(tiny_models):
    """Loss and every gradient of one DisenBooth step: ours (the step training runs, by the
    preset) against step_bench's PyTorch step with the same preset, weights and draws."""
    spec, torch_unet, torch_text, unet_module, text_module, frozen, inputs = tiny_models
    config = preset_config("disenbooth")
    models = step_bench.jax_models(spec, config, unet_module, text_module)
    assert not models.idfuse.with_ffm and models.idfuse.with_adapter
    trainable = method.init_trainable(jax.random.key(0), models, config, frozen)
    assert trainable["text_lora"] == {} and set(trainable["idfuse"]) == {"adapter"}
    # Every factor away from its init (LoRA B starts at 0, the mask at 0): all gradients live.
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    subject = step_bench.jax_subject(spec, inputs)
    batch = spec["batch"]
    indices = jnp.arange(batch)
    example_keys = train_lib.example_keys(jax.random.key(2), jnp.int32(0), batch)
    loss_fn = jax.jit(
        lambda t: method.training_loss(models, config, frozen, t, subject, indices, example_keys)
    )
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    assert set(terms) == {"loss", "denoise", "denoise_full", "denoise_text_only", "text_image"}

    idfuse = step_bench.torch_idfuse(spec, config)
    m = config.method
    step_bench.add_lora(torch_unet, step_bench.TORCH_UNET_LORA, m.lora_rank, m.lora_alpha)
    torch_text.requires_grad_(False)
    params = _torch_parameters(trainable, torch_unet, torch_text, idfuse)
    flat = traverse_util.flatten_dict(jax.device_get(trainable))
    assert len(params) == len(flat)
    with torch.no_grad():
        for path, (param, transposed) in params.items():
            value = np.array(flat[path])
            param.copy_(torch.from_numpy(np.ascontiguousarray(value.T if transposed else value)))
    latents, noise, t = method.diffusion_inputs(
        models, subject.latent_mean, subject.latent_logvar, example_keys
    )
    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
    x = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    draws = (nchw(latents), nchw(noise), torch.from_numpy(np.asarray(t)).long())
    torch_loss = step_bench.torch_loss(
        config, idfuse, torch_unet, torch_text, step_bench.ddpm_scheduler(), x, draws
    )
    torch_loss.backward()
    print(f"loss: ours {float(loss):.7f} pytorch {torch_loss.item():.7f}")
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=2e-5)
    flat_grads = traverse_util.flatten_dict(jax.device_get(grads))
    worst = 0.0
    for path, (param, transposed) in params.items():
        ours = np.asarray(flat_grads[path])
        theirs = param.grad.numpy()
        theirs = theirs.T if transposed else theirs
        scale = np.abs(theirs).max()
        assert scale > 0, path  # a live gradient, not two zeros
        np.testing.assert_allclose(ours, theirs, atol=2e-4 * scale, err_msg=str(path))
        worst = max(worst, np.abs(ours - theirs).max() / scale)
    print(f"{len(params)} gradients, worst max-abs error / max-abs gradient {worst:.1e}")


# Per preset: (trainable parts of the method's modules, logged terms besides loss/denoise/
# denoise_full, text-encoder LoRA on by default).
PARTS = {
    "idfuse": ({"adapter", "ffm"}, {"denoise_text_only", "text_image", "image_background",
                                    "text_background", "router_weight", "router_entropy"}, True),
    "idfuse_no_explicit": ({"adapter", "ffm"}, {"denoise_text_only", "text_image",
                                                "router_weight", "router_entropy"}, True),
    "idfuse_no_ffm": ({"adapter"}, {"denoise_text_only", "text_image", "image_background",
                                    "text_background"}, True),
    "idfuse_no_image_branch": ({"ffm"}, {"text_background", "router_weight", "router_entropy"},
                               True),
    "disenbooth": ({"adapter"}, {"denoise_text_only", "text_image"}, False),
    "dreambooth_lora": (set(), set(), False),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_random_models():
    """configs/smoke.py's random models (built once; each preset swaps the method's modules)."""
    return build.build_models(tiny_config())


@pytest.mark.parametrize("name", list(PARTS))
def test_each_preset_builds_and_traces_its_parts(name, tiny_random_models):
    """The tiny config's models and loss for every preset, traced (not compiled): the trainable
    tree holds the preset's parts, the loss logs exactly its terms, and the UNet runs once per
    conditioning the method has (batch 8: full, text-only, and prior with class images)."""
    config = tiny_config(method__preset=name)
    base, frozen = tiny_random_models
    idfuse = build.idfuse_module(config, base.idfuse.image_width, base.idfuse.text_width)
    models = dataclasses.replace(base, idfuse=idfuse, unet=base.unet.clone())
    modules, logged, text_lora = PARTS[name]
    trainable = jax.eval_shape(
        lambda: method.init_trainable(jax.random.key(0), models, config, frozen)
    )
    assert set(trainable["idfuse"]) == modules
    assert bool(trainable["text_lora"]) == text_lora and trainable["unet_lora"]
    count = 3
    subject = method.SubjectFeatures(
        latent_mean=jnp.zeros((count, 4, 4, 4)),
        latent_logvar=jnp.zeros((count, 4, 4, 4)),
        image_embeds=jnp.ones((count, 32)),
        background_embeds=jnp.ones((count, 32)),
        prompt_ids=jnp.asarray(models.tokenizer(["a photo of sks dog"])),
        num_items=count,
        decouple=jnp.ones((count,)),
        class_latent_mean=jnp.zeros((2, 4, 4, 4)),
        class_latent_logvar=jnp.zeros((2, 4, 4, 4)),
        class_prompt_ids=jnp.asarray(models.tokenizer(["a photo of dog"])),
    )
    batch = 8
    unet_batches = []
    real_apply = models.unet.apply

    def spy(variables, x, *args, **kwargs):
        unet_batches.append(x.shape[0])
        return real_apply(variables, x, *args, **kwargs)

    keys = train_lib.example_keys(jax.random.key(0), jnp.int32(0), batch)
    object.__setattr__(models.unet, "apply", spy)
    try:
        _, terms = jax.eval_shape(
            lambda t: method.training_loss(
                models, config, frozen, t, subject, jnp.zeros((batch,), jnp.int32), keys
            ),
            trainable,
        )
    finally:
        object.__delattr__(models.unet, "apply")
    assert set(terms) == {"loss", "denoise", "denoise_full", "prior"} | logged
    passes = 1 + ("denoise_text_only" in logged) + 1  # full, text-only, prior
    assert unet_batches == [passes * batch]


def test_no_image_branch_needs_equal_widths():
    config = tiny_config(method__preset="idfuse_no_image_branch")
    with pytest.raises(ConfigError, match=r"compares image features \(width 24\) with text "):
        build.idfuse_module(config, 24, 32)
    assert build.idfuse_module(tiny_config(method__preset="disenbooth"), 24, 32).with_adapter
