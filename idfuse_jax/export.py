"""The trained weights alone: one safetensors file with everything trained (LoRA factors under
diffusers/peft names, the adapter and FFM under `idfuse.*`) and reading it back into a trainable
tree; and a LoRA-only file that diffusers' `load_lora_weights` takes as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from safetensors.numpy import load, save

from idfuse_jax import paths
from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import read_safetensors_file
from idfuse_jax.types import Params

_LORA_PREFIXES = {"unet_lora": "unet.", "text_lora": "text_encoder.text_model."}
_LORA_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def _torch_key(path: Sequence[str]) -> str:
    """('down_blocks_0', 'attentions_1', 'to_out_0') -> 'down_blocks.0.attentions.1.to_out.0'."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def export_names(trainable: dict[str, Params]) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Trainable-tree path -> (name in the exported file, stored transposed?).

    LoRA factors get diffusers/peft names (`unet.<module>.lora_A.weight` [r, in],
    `lora_B.weight` [out, r]; `text_encoder.text_model.<module>...`), the adapter and FFM
    `idfuse.<flax path>`.
    """
    names = {}
    for path in traverse_util.flatten_dict(dict(trainable)):
        part, module, leaf = path[0], path[1:-1], path[-1]
        if part in _LORA_PREFIXES:
            name = f"{_LORA_PREFIXES[part]}{_torch_key(module)}.{_LORA_NAMES[leaf]}.weight"
            names[path] = (name, True)
        else:
            names[path] = (".".join(path), False)
    return names


def export_trainable(
    trainable: dict[str, Params],
    path: paths.PathLike,
    config: ml_collections.ConfigDict | None = None,
) -> paths.Path:
    """The trained weights alone as one safetensors file (names: `export_names`)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(trainable)))
    tensors = {}
    for key, (name, transposed) in export_names(trainable).items():
        value = np.asarray(flat[key], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    metadata = {"format": "idfuse_jax"}
    if config is not None:
        metadata.update(
            lora_rank=str(config.method.lora_rank), lora_alpha=str(config.method.lora_alpha)
        )
    path = paths.write_bytes(path, save(tensors, metadata=metadata))  # local or gs://
    logging.info("exported %d tensors to %s", len(tensors), path)
    return path


LORA_FILE = "idfuse_lora.safetensors"
# diffusers (`lora_base.LORA_ADAPTER_METADATA_KEY`): per-model peft LoraConfig kwargs, as JSON.
_LORA_METADATA_KEY = "lora_adapter_metadata"


def diffusers_lora(
    trainable: dict[str, Params], config: ml_collections.ConfigDict
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a LoRA file that diffusers' `load_lora_weights` takes as it is.

    Tensors: the UNet and text-encoder LoRA factors in diffusers/peft names (`export_names`).
    Metadata: diffusers reads `lora_adapter_metadata` (`"unet.r"`, `"unet.lora_alpha"`,
    `"unet.target_modules"`, likewise `"text_encoder.*"`) as the peft LoraConfig of each model;
    without it diffusers takes alpha = rank (scale 1), which is wrong for lora_alpha != rank.
    Text-encoder module names drop `text_model.`: peft matches a target as a name suffix, so
    they fit transformers 4.x (`text_model.encoder...`) and 5.x (`encoder...`) models alike.
    """
    flat = traverse_util.flatten_dict(jax.device_get(dict(trainable)))
    tensors: dict[str, np.ndarray] = {}
    adapters: dict[str, Any] = {}
    for key, (name, transposed) in export_names(trainable).items():
        if key[0] not in _LORA_PREFIXES:
            continue
        value = np.asarray(flat[key], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
        model, module = name.split(".", 1)
        module = module.rsplit(".lora_", 1)[0].removeprefix("text_model.")
        adapters.setdefault(model, set()).add(module)
    metadata = {"format": "pt"}
    if adapters:
        kwargs = {}
        for model, modules in adapters.items():
            kwargs[f"{model}.r"] = int(config.method.lora_rank)
            kwargs[f"{model}.lora_alpha"] = float(config.method.lora_alpha)
            kwargs[f"{model}.target_modules"] = sorted(modules)
        metadata[_LORA_METADATA_KEY] = json.dumps(kwargs, sort_keys=True)
    return tensors, metadata


def export_run(
    trainable: dict[str, Params], workdir: paths.PathLike, config: ml_collections.ConfigDict
) -> list[paths.Path]:
    """A finished run's exports: idfuse_weights.safetensors (everything trained, for
    `idfuse_jax.sample`) and, when LoRA is on, idfuse_lora.safetensors (for diffusers'
    `load_lora_weights`; examples/diffusers_sample.py adds the adapter and FFM)."""
    workdir = paths.as_path(workdir)
    written = [export_trainable(trainable, workdir / "idfuse_weights.safetensors", config)]
    tensors, metadata = diffusers_lora(trainable, config)
    if tensors:
        written.append(paths.write_bytes(workdir / LORA_FILE, save(tensors, metadata=metadata)))
    return written


def import_trainable(path: paths.PathLike, template: dict[str, Params]) -> dict[str, Params]:
    """Read an `export_trainable` file (local or gs://) into a tree shaped like `template`."""
    path = paths.as_path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: exported weights not found")
    # A cloud file is read whole (it is small: the trained weights alone).
    tensors = load(path.read_bytes()) if paths.is_cloud(path) else read_safetensors_file(path)
    flat_template = traverse_util.flatten_dict(dict(template))
    flat, missing = {}, []
    for key, (name, transposed) in export_names(template).items():
        if name not in tensors:
            missing.append(name)
            continue
        value = tensors[name].T if transposed else tensors[name]
        if value.shape != tuple(flat_template[key].shape):
            raise WeightsError(
                f"{path}: {name} has shape {value.shape}, the model needs "
                f"{tuple(flat_template[key].shape)} (trained with another config?)"
            )
        flat[key] = jnp.asarray(value, jnp.float32)
    if missing:
        raise WeightsError(
            f"{path}: {len(missing)} tensors missing ({', '.join(missing[:4])}, ...); "
            "trained with another config?"
        )
    # Empty sub-trees (e.g. no text LoRA) have no leaves; keep them as in the template.
    tree = traverse_util.unflatten_dict(flat)
    return {part: tree.get(part, {}) for part in template}
