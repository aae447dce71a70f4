"""Config helpers: loading a sibling config file, checking values before anything runs, and
reading the config.json of a run written by an older version.

Configs are ml_collections `get_config()` files in configs/; `configs/default.py` documents
every field. Keys are locked by the `--config` flag (an unknown `--config.x=y` is refused by
ml_collections, a renamed one with its new name); this module refuses bad values with one line
naming the field. The allowed values of each choice come from the module that implements it.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections
from flax import traverse_util

from idfuse_jax import build, diffusion, losses, optim, paths, presets
from idfuse_jax.errors import ConfigError
from idfuse_jax.models import attention, conditioning
from idfuse_jax.prepare.inpaint import INPAINTERS
from idfuse_jax.prepare.masks import MASK_SOURCES

CHOICES = {
    "model.dtype": tuple(build.DTYPES),
    "model.attention": attention.IMPLEMENTATIONS,
    "model.weights_dtype": tuple(build.WEIGHTS_DTYPES),
    "method.background": conditioning.BACKGROUND_MODES,
    "method.preset": tuple(presets.PRESETS),
    "method.text_lora": presets.TEXT_LORA_CHOICES,
    "loss.text_pool": losses.TEXT_POOLS,
    "optim.schedule": optim.SCHEDULES,
    "sample.sampler": tuple(diffusion.SAMPLERS),
    "data.masks": MASK_SOURCES,
    "data.inpaint": INPAINTERS,
}
# Keys of older versions: old name -> new name (None: removed). Refused in --config overrides
# with the new name; renamed when an old run's config.json is read.
RENAMED = {
    "loss.lambda_denoise": "loss.weights.denoise",
    "loss.lambda_text_background": "loss.weights.text_image",
    "loss.lambda_background_agree": "loss.weights.image_background",
    "loss.lambda_subject_background": "loss.weights.text_background",
    "train.inject_nan_at_step": None,
}
# Fields added since the first release, with the value that reproduces older runs.
ADDED: dict[str, Any] = {
    "model.variant": "",
    "model.weights_dtype": "",
    "model.attention": "xla",  # the kernel of runs before the field
    "data.subjects": "",
    "data.synthetic_variant": 0,
    "train.object_steps": 0,
    "mesh.subject": 1,
    "method.preset": "idfuse",
    "loss.sweep": "",
    "method.text_lora": "auto",
    "prior.class_images": 0,
    "prior.weight": 1.0,
    "prior.prompt": "a photo of {class_name}",
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
    "train.stop_check_every",
    "sample.num_steps",
)
NON_NEGATIVE = (
    "loss.text_only_weight",
    "loss.weights.denoise",
    "loss.weights.text_image",
    "loss.weights.image_background",
    "loss.weights.text_background",
    "optim.learning_rate",
    "optim.weight_decay",
    "optim.grad_clip",
    "optim.warmup_steps",
    "data.min_size",
    "data.synthetic_variant",
    "train.object_steps",
    "prior.class_images",
    "prior.weight",
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
    for field in (
        "optim.warmup_steps",
        "train.object_steps",
        "data.synthetic_variant",
        "prior.class_images",
    ):
        if not _is_int(_get(config, field)):
            raise ConfigError(f"config.{field}={_get(config, field)!r} must be an integer")
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
    if config.data.masks == "dino" and not config.data.dino_model:
        raise ConfigError(
            "config.data.masks='dino' needs config.data.dino_model (a DINO ViT folder)"
        )
    if not config.sample.prompts:
        raise ConfigError("config.sample.prompts is empty: give at least one validation prompt")
    presets.validate(config)


def renamed_key_message(key: str) -> str | None:
    """For an old key ('loss.lambda_denoise'), the one-line error that names its successor."""
    if key not in RENAMED:
        return None
    new = RENAMED[key]
    if new is None:
        return f"config.{key} was removed"
    return f"config.{key} was renamed: use config.{new}"


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict written by any version of this library, in today's key names."""
    flat = traverse_util.flatten_dict(dict(saved), sep=".")
    for old, new in RENAMED.items():
        if old in flat:
            value = flat.pop(old)
            if new is not None:
                flat.setdefault(new, value)
    for key, value in ADDED.items():
        flat.setdefault(key, value)
    return traverse_util.unflatten_dict(flat, sep=".")


def load_run_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to WORKDIR/config.json (local or gs://), in
    today's key names."""
    path = paths.as_path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --workdir must be a training workdir")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return ml_collections.ConfigDict(upgrade(saved))
