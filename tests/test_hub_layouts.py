"""Checkpoints as the model hub ships them: configs of the published repositories, read as is.

tests/data/configs/<org>/<repo>/ holds the published config files (no weights) of SD 1.5,
SD 2.1-base, SD 2.1 (768, v-prediction), OpenAI CLIP ViT-L/14, laion CLIP ViT-H/14 (a
transformers-4.24-era config with every generic key and the *_config_dict copies) and DINO
ViT-S/16. Each must parse into our config with the published values, and build (shapes only).
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
import transformers

from idfuse_jax import diffusion, formats, weights
from idfuse_jax.errors import WeightsError
from idfuse_jax.models import clip, unet, vae, vit

CONFIGS = pathlib.Path(__file__).parent / "data" / "configs"
SD15 = CONFIGS / "runwayml" / "stable-diffusion-v1-5"
SD21_BASE = CONFIGS / "stabilityai" / "stable-diffusion-2-1-base"
SD21 = CONFIGS / "stabilityai" / "stable-diffusion-2-1"
CLIP_L = CONFIGS / "openai" / "clip-vit-large-patch14"
CLIP_H = CONFIGS / "laion" / "CLIP-ViT-H-14-laion2B-s32B-b79K"
DINO = CONFIGS / "facebook" / "dino-vits16"


def read(folder: pathlib.Path, name: str = "config.json") -> dict:
    return json.loads((folder / name).read_text())


def n_params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights.abstract_params(module)))


def torch_params(model_cls, config, **kwargs) -> int:
    """Parameter count of the transformers model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config, **kwargs).parameters())


@pytest.mark.parametrize(
    ("folder", "heads", "cross", "linear", "upcast", "prediction"),
    [
        (SD15, 8, 768, False, False, "epsilon"),
        (SD21_BASE, (5, 10, 20, 20), 1024, True, False, "epsilon"),
        (SD21, (5, 10, 20, 20), 1024, True, True, "v_prediction"),
    ],
    ids=["sd15", "sd21_base", "sd21"],
)
def test_stable_diffusion_configs(folder, heads, cross, linear, upcast, prediction):
    u = unet.UNetConfig.from_diffusers(read(folder / "unet"))
    assert u.block_out_channels == (320, 640, 1280, 1280)
    assert u.attention_head_dim == heads and u.cross_attention_dim == cross
    assert (u.use_linear_projection, u.upcast_attention) == (linear, upcast)
    v = vae.VAEConfig.from_diffusers(read(folder / "vae"))
    assert v.block_out_channels == (128, 256, 512, 512) and v.scaling_factor == 0.18215
    schedule = diffusion.load_schedule(folder)
    assert schedule.prediction_type == prediction and schedule.steps_offset == 1
    assert schedule.alphas_cumprod.shape == (1000,)
    text_config = read(folder / "text_encoder")
    t = clip.CLIPTextConfig.from_transformers(text_config, with_projection=False)
    assert t.eos_token_id == 2  # legacy argmax pooling, as transformers does for this config
    assert (t.hidden_size, t.num_hidden_layers) == ((768, 12) if folder is SD15 else (1024, 23))
    assert t.hidden_act == ("quick_gelu" if folder is SD15 else "gelu")
    # The SD 2.1 text encoder at full size: shapes only (no init).
    if folder is SD21_BASE:
        reference = transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        count = torch_params(transformers.CLIPTextModel, reference)
        assert n_params(clip.CLIPTextTransformer(t)) == count == 340_387_840


def test_openai_clip_vit_l14():
    config = read(CLIP_L)
    t = clip.CLIPTextConfig.from_transformers(config, with_projection=True)
    assert (t.hidden_size, t.num_hidden_layers, t.projection_dim) == (768, 12, 768)
    v = clip.CLIPVisionConfig.from_transformers(config, with_projection=True)
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.projection_dim) == (
        1024, 24, 14, 768,
    )  # fmt: skip
    assert v.hidden_act == "quick_gelu"


def test_laion_clip_vit_h14_transformers_4_24_config():
    """The *_config_dict copies override the nested configs, as transformers applies them."""
    config = read(CLIP_H)
    v = clip.CLIPVisionConfig.from_transformers(config, with_projection=True)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers) == (1280, 5120, 32)
    assert (v.num_attention_heads, v.patch_size, v.image_size) == (16, 14, 224)
    assert v.hidden_act == "gelu" and v.projection_dim == 1024  # CLIPModel's, not the sub-config's
    t = clip.CLIPTextConfig.from_transformers(config, with_projection=True)
    assert (t.hidden_size, t.num_hidden_layers, t.projection_dim) == (1024, 24, 1024)
    reference = transformers.CLIPConfig.from_pretrained(str(CLIP_H))
    for ours, theirs in ((v, reference.vision_config), (t, reference.text_config)):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "hidden_act"):
            assert getattr(ours, field) == getattr(theirs, field), field
    # A CLIPModel's visual projection has the top-level projection_dim (1024), not the 512 of
    # its vision_config.
    reference.vision_config.projection_dim = reference.projection_dim
    count = torch_params(transformers.CLIPVisionModelWithProjection, reference.vision_config)
    assert n_params(clip.CLIPVisionTransformer(v)) == count


def test_dino_vit_s16():
    c = vit.ViTConfig.from_transformers(read(DINO))
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (384, 12, 6)
    assert (c.patch_size, c.image_size, c.layer_norm_eps) == (16, 224, 1e-12)
    reference = transformers.ViTConfig.from_pretrained(str(DINO))
    count = torch_params(transformers.ViTModel, reference, add_pooling_layer=False)
    assert n_params(vit.ViTModel(c)) == count


def test_generic_keys_cover_what_installed_transformers_writes():
    """Every key PretrainedConfig serialises or drops as a generation option is known."""
    written = set(transformers.PretrainedConfig().to_dict())
    generation = set(transformers.GenerationConfig._get_default_generation_params())
    model_keys = {"model_type"} | set(clip.HF_DEFAULT_ONLY)
    unknown = {k for k in written | generation if not k.startswith("_")}
    assert unknown - formats.TRANSFORMERS_GENERIC_KEYS - model_keys == set()


@pytest.mark.parametrize(
    ("reader", "folder", "key", "value", "message"),
    [
        ("vision", CLIP_H, "per_layer_config", {"3": {"hidden_act": "relu"}},
         "unsupported config keys: per_layer_config={'3': {'hidden_act': 'relu'}}"),
        ("vision", CLIP_H, "pruned_heads", {"1": [0]}, "unsupported pruned_heads={'1': [0]}"),
        ("unet", SD21 / "unet", "quantization_config", {"load_in_4bit": True},
         "unsupported config keys: quantization_config={'load_in_4bit': True}"),
        ("unet", SD21 / "unet", "class_embed_type", "timestep",
         "unsupported class_embed_type='timestep'"),
        ("scheduler", SD21 / "scheduler", "thresholding", True,
         "scheduler config thresholding=True is not supported"),
        ("scheduler", SD21 / "scheduler", "variance_norm", 2,
         "scheduler config key variance_norm=2 is not supported"),
    ],
)  # fmt: skip
def test_settings_that_change_the_math_are_refused_by_key_and_value(
    reader, folder, key, value, message
):
    name = "scheduler_config.json" if reader == "scheduler" else "config.json"
    config = read(folder, name)
    if reader == "vision":
        config["vision_config"][key] = value
    else:
        config[key] = value
    parse = {
        "vision": lambda c: clip.CLIPVisionConfig.from_transformers(c, with_projection=True),
        "unet": unet.UNetConfig.from_diffusers,
        "scheduler": diffusion.Schedule.from_config,
    }[reader]
    with pytest.raises(WeightsError) as error:
        parse(config)
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------
# Whole-repo downloads: the files `huggingface-cli download` leaves, tiny random weights.

TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "sample_size": 4,
}
TINY_VAE = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_hidden_layers": 2}  # fmt: skip
TINY_VISION = {**TINY_TEXT, "image_size": 32, "patch_size": 8}


def _save(tensors: dict, path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _torch_files(model, folder: pathlib.Path, stem: str, prefix: str = "") -> dict[str, np.ndarray]:
    """save_pretrained's safetensors plus fp16 / .bin copies, as hub repos hold them.

    The fp16 variant holds other values (shifted by 0.5), so a test can tell which was read.
    `prefix` restores the names transformers 4.x wrote (`text_model.` for a CLIPTextModel).
    """
    import torch
    from safetensors.numpy import load_file

    model.save_pretrained(folder, safe_serialization=True)
    state = load_file(str(folder / f"{stem}.safetensors"))
    state = {(k if k.startswith(prefix) else prefix + k): v for k, v in state.items()}
    _save(state, folder / f"{stem}.safetensors")
    other = {k: (v + np.float32(0.5)).astype(np.float16) for k, v in state.items()}
    _save(other, folder / f"{stem}.fp16.safetensors")
    bin_stem = "pytorch_model" if stem == "model" else stem
    for name in (f"{bin_stem}.bin", f"{bin_stem}.fp16.bin"):
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / name)
    return state


def _published(path: pathlib.Path, **sizes) -> dict:
    """A published config.json with tiny sizes put in (every other key as published)."""
    return {**json.loads(path.read_text()), **sizes}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """stabilityai/stable-diffusion-2-1-base and laion/CLIP-ViT-H-14 as downloaded, tiny."""
    import diffusers
    import torch
    from test_tokenizer import write_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    sd = root / "stable-diffusion-2-1-base"
    sd.mkdir()
    published = (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    )
    for name in published:
        (sd / name).parent.mkdir(exist_ok=True)
        (sd / name).write_text((SD21_BASE / name).read_text())
    tokenizer = write_tokenizer(sd / "tokenizer_words", pad_token="!")
    for name in ("vocab.json", "merges.txt"):
        (tokenizer / name).rename(sd / "tokenizer" / name)
    vocab_size = len(json.loads((sd / "tokenizer" / "vocab.json").read_text()))
    state = {}
    text = {**TINY_TEXT, "vocab_size": vocab_size}
    for component, sizes, stem in (
        ("unet", TINY_UNET, "diffusion_pytorch_model"),
        ("vae", TINY_VAE, "diffusion_pytorch_model"),
        ("text_encoder", text, "model"),
    ):
        folder = sd / component
        folder.mkdir()
        config = _published(SD21_BASE / component / "config.json", **sizes)
        if component == "text_encoder":
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
        else:
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        prefix = "text_model." if component == "text_encoder" else ""
        state[component] = _torch_files(model, folder, stem, prefix)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    # SD 1.5's unet/ also holds the non-EMA weights; the repo root the original checkpoints.
    _save(
        {"x": np.zeros(2, np.float32)}, sd / "unet" / "diffusion_pytorch_model.non_ema.safetensors"
    )
    _save({"x": np.zeros(2, np.float32)}, sd / "v2-1_512-ema-pruned.safetensors")
    torch.save({"state_dict": {}}, sd / "v2-1_512-ema-pruned.ckpt")
    (sd / "feature_extractor").mkdir()
    (sd / "feature_extractor" / "preprocessor_config.json").write_text("{}")

    # laion's repo: a CLIPModel folder (transformers 4.24 config), open_clip files beside it.
    clip_dir = root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    clip_dir.mkdir()
    config = json.loads(
        CLIP_H.read_text() if CLIP_H.is_file() else (CLIP_H / "config.json").read_text()
    )
    config["projection_dim"] = 16
    config["text_config"].update(TINY_TEXT, vocab_size=vocab_size)
    config["vision_config"].update(TINY_VISION)
    config["text_config_dict"].update(TINY_TEXT)
    config["vision_config_dict"].update(TINY_VISION)
    model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config))
    state["image_encoder"] = _torch_files(model, clip_dir, "model")
    (clip_dir / "config.json").write_text(json.dumps(config, indent=2))
    open_clip = {
        "visual.proj": (32, 16),
        "text_projection": (32, 16),
        "visual.class_embedding": (32,),
    }
    _save({k: np.zeros(v, np.float32) for k, v in open_clip.items()},
          clip_dir / "open_clip_model.safetensors")  # fmt: skip
    torch.save({}, clip_dir / "open_clip_pytorch_model.bin")
    return sd, clip_dir, state


def _first_conv(params) -> np.ndarray:
    return np.asarray(params["conv_in"]["kernel"])


def test_whole_repo_download_loads_the_canonical_files(hub, caplog):
    sd, clip_dir, state = hub
    with caplog.at_level("INFO"):
        _, unet_params = weights.load_unet(sd)
    expected = state["unet"]["conv_in.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(_first_conv(unet_params), expected)
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 1, ignored
    for name in ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.non_ema.safetensors"):  # fmt: skip
        assert name in ignored[0]
    _, fp16 = weights.load_unet(sd, options=weights.LoadOptions(variant="fp16"))
    np.testing.assert_array_equal(
        _first_conv(fp16), (state["unet"]["conv_in.weight"] + np.float32(0.5)).astype(np.float16)
        .astype(np.float32).transpose(2, 3, 1, 0),
    )  # fmt: skip
    _, vae_params = weights.load_vae(sd)
    np.testing.assert_array_equal(
        vae_params["encoder"]["conv_in"]["kernel"],
        state["vae"]["encoder.conv_in.weight"].transpose(2, 3, 1, 0),
    )
    _, text_params = weights.load_clip_text(sd)
    np.testing.assert_array_equal(
        text_params["embeddings"]["token_embedding"]["embedding"],
        state["text_encoder"]["text_model.embeddings.token_embedding.weight"],
    )
    image_model, image_params = weights.load_clip_vision(clip_dir)
    assert image_model.config.projection_dim == 16
    np.testing.assert_array_equal(
        image_params["visual_projection"]["kernel"],
        state["image_encoder"]["visual_projection.weight"].T,
    )
    tokenizer = weights.load_tokenizer(sd)
    assert tokenizer.pad_token_id == json.loads((sd / "tokenizer/vocab.json").read_text())["!"]


def test_missing_variant_is_one_line_naming_the_file(hub):
    _, clip_dir, _ = hub
    with pytest.raises(
        WeightsError, match=r"no model\.bf16\.safetensors .*model\.fp16\.safetensors"
    ):
        weights.load_clip_vision(clip_dir, options=weights.LoadOptions(variant="bf16"))


def test_whole_repo_download_trains_through_the_cli(hub, tmp_path):
    """configs/smoke.py on the downloaded folders: the path every real run takes, here with the
    frozen weights streamed to 2 devices and stored in bfloat16; start-up phases are logged."""
    from test_train import SHORT, metrics, ok, train

    sd, clip_dir, _ = hub
    result = ok(train(tmp_path, *SHORT, f"--config.model.pretrained={sd}",
                      f"--config.model.image_encoder={clip_dir}", "--config.train.batch_size=2",
                      "--config.train.steps=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
                      "--config.model.weights_dtype=bfloat16", devices=2))  # fmt: skip
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "idfuse_weights.safetensors").is_file()
    assert (tmp_path / "idfuse_lora.safetensors").is_file()
    for name in ("load", "prepare", "features", "compile", "steps 0-2"):
        assert f"phase {name}: " in result.stderr, name


@pytest.mark.parametrize("param_dtype", [np.float32, jax.numpy.bfloat16], ids=["f32", "bf16"])
def test_streamed_load_places_the_same_values(hub, param_dtype):
    """lazy=True: leaves stay on disk until `sharding.put` reads, converts and places each."""
    from idfuse_jax import formats, sharding

    sd, clip_dir, _ = hub
    mesh = sharding.make_mesh(1, 2, jax.devices()[:2])
    options = weights.LoadOptions(lazy=True, param_dtype=param_dtype)
    for load, folder in ((weights.load_unet, sd), (weights.load_clip_vision, clip_dir)):
        _, lazy = load(folder, options=options)
        assert all(isinstance(x, formats.LazyArray) for x in jax.tree.leaves(lazy))
        placed = sharding.put(lazy, sharding.fsdp_shardings(lazy, mesh))
        _, eager = load(folder)
        for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(eager), strict=True):
            assert got.dtype == param_dtype
            np.testing.assert_array_equal(np.asarray(got), want.astype(param_dtype))


# --------------------------------------------------------------------------------------------
# The export, loaded by diffusers: LoRA file + the adapter/FFM in torch (examples/).


def _example_module():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "diffusers_sample.py"
    spec = importlib.util.spec_from_file_location("diffusers_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_diffusers_pipeline_with_exported_files_predicts_our_noise(hub, tmp_path):
    """Our export in diffusers' StableDiffusionPipeline (load_lora_weights + FFM prompt embeds
    from examples/diffusers_sample.py) gives our UNet's noise prediction, with and without a
    reference image, for a trained-like state (every trainable tensor random, alpha != rank)."""
    import diffusers
    import torch

    from idfuse_jax import build, export, method
    from idfuse_jax.config_lib import sibling_module
    from idfuse_jax.models import conditioning

    sd, clip_dir, _ = hub
    tiny = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"
    config = sibling_module(str(tiny), "smoke").get_config()
    config.model.pretrained, config.model.image_encoder = str(sd), str(clip_dir)
    config.method.lora_alpha = 8.0  # scale 2: diffusers must read alpha from the file
    models, frozen = build.pretrained_models(config)
    trainable = method.init_trainable(jax.random.key(0), models, config, frozen)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = jax.tree.unflatten(
        treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    paths = export.export_run(trainable, tmp_path, config)
    assert [p.name for p in paths] == ["idfuse_weights.safetensors", "idfuse_lora.safetensors"]

    prompts = ["a photo of sks dog in the snow", ""]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)  # NHWC
    timesteps = np.array([500, 500])
    reference = rng.standard_normal((1, 16)).astype(np.float32)
    unet_vars, text_vars = method.model_variables(frozen, trainable, config)
    ids = jax.numpy.asarray(models.tokenizer(prompts))
    text = models.text_encoder.apply(text_vars, ids).last_hidden_state
    cond, _ = conditioning.text_conditioning(models.idfuse, trainable["idfuse"], text)
    cond_ref, _ = conditioning.reference_conditioning(
        models.idfuse, trainable["idfuse"], text[:1], reference
    )
    ours = models.unet.apply(unet_vars, latents, timesteps, cond)

    example = _example_module()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    idfuse = example.load_trained(pipe, tmp_path)
    embeds = example.prompt_embeds(pipe, idfuse, prompts)
    embeds_ref = example.prompt_embeds(pipe, idfuse, prompts[:1], torch.from_numpy(reference))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                           torch.from_numpy(timesteps), embeds).sample  # fmt: skip
    assert _relative(embeds.numpy(), cond) < 1e-4
    assert _relative(embeds_ref.numpy(), cond_ref) < 1e-4
    assert _relative(theirs.numpy().transpose(0, 2, 3, 1), ours) < 1e-4
    # The example's command line, as a PyTorch user runs it (2 steps, with a reference photo).
    import subprocess
    import sys

    from PIL import Image

    script = pathlib.Path(example.__file__)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(photo)
    command = [sys.executable, str(script), f"--pipeline={sd}", f"--workdir={tmp_path}",
               "--prompt=a photo of sks dog", "--num_steps=2", f"--out={tmp_path / 'x.png'}",
               f"--reference={photo}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    run = lambda *extra: subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
    result = run()
    assert result.returncode == 1 and "error: --reference needs --image_encoder" in result.stderr
    result = run(f"--image_encoder={clip_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(tmp_path / "x.png") as image:
        assert image.size == (8, 8)  # the tiny UNet's 4 latents x the VAE's factor 2
    # Without the LoRA (a plain pipeline), the prediction is not ours: the file mattered.
    pipe.unload_lora_weights()
    with torch.no_grad():
        plain = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                          torch.from_numpy(timesteps), embeds).sample  # fmt: skip
    assert _relative(plain.numpy().transpose(0, 2, 3, 1), ours) > 1e-2
