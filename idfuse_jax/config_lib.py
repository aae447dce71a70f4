"""Config helpers: loading a sibling config file and checking values before anything runs.

Configs are ml_collections `get_config()` files in configs/; `configs/default.py` documents
every field. Keys are locked by the `--config` flag (an unknown `--config.x=y` is refused by
ml_collections); this module refuses bad values with one line naming the field.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import ml_collections

from idfuse_jax.errors import ConfigError
from idfuse_jax.models import attention

DTYPES = ("float32", "bfloat16")
CHOICES = {
    "model.dtype": DTYPES,
    "model.attention": attention.IMPLEMENTATIONS,
    "method.background": ("implicit", "explicit"),
    "loss.text_pool": ("mean", "eos"),
    "optim.schedule": ("constant", "cosine"),
    "sample.sampler": ("dpm++", "ddim"),
    "data.masks": ("auto", "given", "grabcut", "onnx"),
    "data.inpaint": ("telea", "sd"),
}
POSITIVE = (
    "data.resolution",
    "data.synthetic_images",
    "method.num_experts",
    "method.lora_rank",
    "train.steps",
    "train.batch_size",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "sample.num_steps",
)
NON_NEGATIVE = (
    "loss.text_only_weight",
    "loss.lambda_denoise",
    "loss.lambda_text_background",
    "loss.lambda_background_agree",
    "loss.lambda_subject_background",
    "optim.learning_rate",
    "optim.weight_decay",
    "optim.grad_clip",
    "optim.warmup_steps",
    "data.min_size",
)


MAX_SAMPLE_STEPS = 1000  # Stable Diffusion's num_train_timesteps


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sibling_module(config_file: str, name: str) -> ModuleType:
    """Import configs/<name>.py next to `config_file` (config files are loaded by path)."""
    path = pathlib.Path(config_file).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"idfuse_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(config: ml_collections.ConfigDict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first field whose value cannot work."""
    for field, choices in CHOICES.items():
        value = _get(config, field)
        if value not in choices:
            raise ConfigError(f"config.{field}={value!r} is not one of {list(choices)}")
    for field in POSITIVE:
        value = _get(config, field)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"config.{field}={value!r} must be a positive integer")
    for field in NON_NEGATIVE:
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"config.{field}={value!r} must be a non-negative number")
    if not _is_int(config.optim.warmup_steps):
        raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps!r} must be an int")
    if config.sample.num_steps > MAX_SAMPLE_STEPS:
        raise ConfigError(
            f"config.sample.num_steps={config.sample.num_steps} exceeds the {MAX_SAMPLE_STEPS} "
            "training timesteps"
        )
    if not config.data.instance_dir:
        raise ConfigError(
            "config.data.instance_dir is empty: set it to a folder of subject photos "
            "(or 'synthetic' for the generated test subject)"
        )
    if config.model.pretrained and not config.model.image_encoder:
        raise ConfigError(
            "config.model.image_encoder is empty: set it to a CLIP vision folder "
            "(transformers CLIPVisionModelWithProjection or CLIPModel) to go with model.pretrained"
        )
    if config.data.inpaint == "sd" and not config.data.inpaint_model:
        raise ConfigError("config.data.inpaint='sd' needs config.data.inpaint_model (a folder)")
    if config.data.masks == "onnx" and not config.data.onnx_model:
        raise ConfigError("config.data.masks='onnx' needs config.data.onnx_model (a .onnx file)")
    if not config.sample.prompts:
        raise ConfigError("config.sample.prompts is empty: give at least one validation prompt")
