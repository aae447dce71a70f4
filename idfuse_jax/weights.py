"""Loading PyTorch-format weights into our Flax parameter trees, with no torch at run time.

The on-disk formats are the ones diffusers and transformers write: a folder with `config.json`
and `*.safetensors`, and diffusers' pipeline folder (`model_index.json` with `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), each model's weights in the file its library
loads (`formats.weight_files`: `diffusion_pytorch_model[.variant].safetensors` or
`model[.variant].safetensors`, or their index; nothing else in the folder; `LoadOptions`
chooses the variant, lazy reading and the parameter dtype). Our Flax modules
mirror the PyTorch module names, so a state-dict key maps to a parameter path by one generic rule:

  "down_blocks.0.attentions.1.to_q.weight" -> ("down_blocks_0", "attentions_1", "to_q", "kernel")

with the leaf renamed and laid out by what the target tree holds at that path: `kernel`
(Linear weight transposed; Conv weight (O, I, kh, kw) -> (kh, kw, I, O)), `scale` (norm weight),
`embedding` (nn.Embedding weight), or a raw parameter of the same name. Every tensor must find
its place and every parameter must be filled: anything else is a `WeightsError` that lists the
missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from idfuse_jax.errors import WeightsError
from idfuse_jax.formats import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    LazyArray,
    StoredTensor,
    component_dir,
    read_config,
    read_safetensors,
)
from idfuse_jax.types import PathLike


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """'a.0.b.weight' -> ('a_0', 'b', 'weight'): list indices join their parent's name."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _to_kernel(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if array.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> (in, out)
        return array.T
    if array.ndim == 4 and len(target_shape) == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
        return array[:, :, 0, 0].T  # 1x1 conv stored where we use a Dense
    if array.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
        return array.T[None, None]  # Linear stored where we use a 1x1 conv
    return array


def _shape_probe(array: Any) -> np.ndarray:
    """A zero-stride array of `array`'s shape: layout changes give the shape, reading nothing."""
    return np.lib.stride_tricks.as_strided(np.zeros((), np.uint8), array.shape, (0,) * array.ndim)


def _read_converted(
    tensor: StoredTensor, layout: Callable, target_shape: tuple[int, ...], dtype: Any
) -> np.ndarray:
    return np.asarray(layout(tensor.read(), target_shape), dtype=dtype)


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    where: str = "weights",
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map a PyTorch state dict onto the nested parameter tree `target` (shapes only).

    Args:
      state: tensor name -> array, as read from safetensors; `StoredTensor`s (lazy reading)
        become `LazyArray` leaves that read and convert themselves when loaded.
      target: nested dict whose leaves have `.shape` (e.g. from `jax.eval_shape` of `init`).
      where: the folder or component name, for error messages.
      rename: optional key rewrite before the generic rule; returning None drops the tensor.
      ignore: regular expressions (full match) of tensor names to drop (buffers, unused heads).
      dtype: the dtype of the returned parameters.

    Returns:
      A nested dict of numpy arrays (or `LazyArray`s) with exactly the structure and shapes of
      `target`.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    ignore_res = [re.compile(p) for p in ignore]
    result: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    for key, array in state.items():
        if any(r.fullmatch(key) for r in ignore_res):
            continue
        new_key = rename(key) if rename else key
        if new_key is None:
            continue
        base = torch_key_to_path(new_key)
        prefix, leaf = base[:-1], base[-1]
        path = base
        if leaf == "weight":
            for candidate in ("kernel", "scale", "embedding", "weight"):
                if (*prefix, candidate) in flat_target:
                    path = (*prefix, candidate)
                    break
        if path not in flat_target:
            unexpected.append(key)
            continue
        target_shape = tuple(flat_target[path].shape)
        layout = _to_kernel if path[-1] == "kernel" else lambda a, _: a
        shape = tuple(layout(_shape_probe(array), target_shape).shape)
        if shape != target_shape:
            misshaped.append(f"{key} {tuple(array.shape)} != {target_shape}")
            continue
        if isinstance(array, StoredTensor):
            load = functools.partial(_read_converted, array, layout, target_shape, dtype)
            result[path] = LazyArray(target_shape, dtype, load)
        else:
            result[path] = np.asarray(layout(array, target_shape), dtype=dtype)
    missing = ["/".join(p) for p in flat_target if p not in result]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing [{_summarise(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected [{_summarise(unexpected)}]")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped [{_summarise(misshaped)}]")
        raise WeightsError(f"{where}: weights do not match the model: " + "; ".join(parts))
    return traverse_util.unflatten_dict(result)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a loader reads a model's weights.

    variant: weight-file variant ("fp16": `*.fp16.safetensors`), "" for the plain files.
    lazy: return `LazyArray` leaves that read one tensor each when loaded (streaming placement
      by `sharding.put`), instead of numpy arrays.
    param_dtype: dtype of the returned parameters (float32, or the compute dtype to halve
      memory).
    """

    variant: str = ""
    lazy: bool = False
    param_dtype: Any = np.float32


# --- CLIP, ViT and tokenizer loaders -----------------------------------------------------------


def abstract_params(module: Any) -> dict[str, Any]:
    """The module's parameter shapes and dtypes (jax.ShapeDtypeStruct leaves), without init.

    Every model module provides `example_inputs()`. Traced with materialised attention: the
    shapes do not depend on the kernel, and a fused one traced here, outside any program's
    devices, would log a CPU fallback that no program takes.
    """
    import jax

    if getattr(module, "attention", None) is not None:
        module = module.clone(attention="xla")
    return jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())["params"]


def init_params(module: Any, rng: Any) -> dict[str, Any]:
    """Random parameters for a (tiny) model, initialised under jax.jit (eager init is slow)."""
    import jax

    inputs = module.example_inputs()
    return jax.jit(lambda key: module.init(key, *inputs)["params"])(rng)


def _strip_prefix(prefix: str) -> Callable[[str], str]:
    return lambda key: key[len(prefix) :] if key.startswith(prefix) else key


# Buffers and the other tower's tensors in CLIPModel folders; none are parameters of ours.
_CLIP_BUFFERS = (r".*position_ids", r"logit_scale")
_CLIP_TEXT_SIDE = (r"text_model\..*", r"text_projection\..*")
_CLIP_VISION_SIDE = (r"vision_model\..*", r"visual_projection\..*")


_CLIP_COMPONENTS = {"text": "text_encoder", "vision": "image_encoder"}


def clip_module(
    folder: PathLike,
    side: str,
    with_projection: bool,
    *,
    dtype: Any = np.float32,
    remat: bool = False,
    attention: str = "auto",
) -> Any:
    """The CLIP tower ("text" or "vision") a transformers folder's config.json describes (or a
    diffusers pipeline folder's text_encoder/, image_encoder/), without its weights."""
    from idfuse_jax.models import clip

    config_cls, module_cls = {
        "text": (clip.CLIPTextConfig, clip.CLIPTextTransformer),
        "vision": (clip.CLIPVisionConfig, clip.CLIPVisionTransformer),
    }[side]
    folder = component_dir(folder, _CLIP_COMPONENTS[side])
    config = config_cls.from_transformers(
        read_config(folder), with_projection=with_projection, where=str(folder)
    )
    return module_cls(config, dtype=dtype, remat=remat, attention=attention)


def _load_clip_tower(
    folder: PathLike, side: str, dtype: Any, remat: bool, options: LoadOptions, attention: str
) -> tuple[Any, dict[str, Any]]:
    """One CLIP tower ("text" or "vision"), the other tower's tensors ignored."""
    projection, prefix, other = {
        "text": ("text_projection", "text_model.", _CLIP_VISION_SIDE),
        "vision": ("visual_projection", "vision_model.", _CLIP_TEXT_SIDE),
    }[side]
    folder = component_dir(folder, _CLIP_COMPONENTS[side])
    tensors = read_safetensors(folder, TRANSFORMERS_WEIGHTS, options.variant, lazy=options.lazy)
    with_projection = f"{projection}.weight" in tensors
    module = clip_module(
        folder, side, with_projection, dtype=dtype, remat=remat, attention=attention
    )
    params = convert_state_dict(
        tensors,
        abstract_params(module),
        where=str(folder),
        rename=_strip_prefix(prefix),
        ignore=_CLIP_BUFFERS + other,
        dtype=options.param_dtype,
    )
    return module, params


def load_clip_text(
    folder: PathLike,
    *,
    dtype: Any = np.float32,
    remat: bool = False,
    options: LoadOptions = LoadOptions(),
    attention: str = "auto",
) -> tuple[Any, dict[str, Any]]:
    """(CLIPTextTransformer, float32 numpy params) from a transformers text-encoder folder.

    Accepts CLIPTextModel, CLIPTextModelWithProjection and full CLIPModel folders, or a diffusers
    pipeline folder (its text_encoder/). The projection is built when the weights hold
    `text_projection.weight`. `dtype` is the module's compute dtype, `attention` its attention
    implementation (`models.attention.IMPLEMENTATIONS`, as for every loader here).
    """
    return _load_clip_tower(folder, "text", dtype, remat, options, attention)


def load_clip_vision(
    folder: PathLike,
    *,
    dtype: Any = np.float32,
    remat: bool = False,
    options: LoadOptions = LoadOptions(),
    attention: str = "auto",
) -> tuple[Any, dict[str, Any]]:
    """(CLIPVisionTransformer, float32 numpy params) from a transformers image-encoder folder.

    Accepts CLIPVisionModelWithProjection, CLIPVisionModel and full CLIPModel folders (the text
    side is ignored), or a diffusers pipeline folder (its image_encoder/). The projection is
    built when the weights hold `visual_projection.weight`.
    """
    return _load_clip_tower(folder, "vision", dtype, remat, options, attention)


def load_vit(
    folder: PathLike, *, dtype: Any = np.float32, remat: bool = False, attention: str = "auto"
) -> tuple[Any, dict[str, Any]]:
    """(ViTModel, float32 numpy params) from a transformers ViTModel folder (e.g. DINO ViT-S/16).

    The pooler's tensors are dropped (DINO features are the CLS token, not the pooler output);
    so are an image-classification head's (`classifier.*`, with the `vit.` prefix stripped).
    """
    from idfuse_jax.models.vit import ViTConfig, ViTModel

    folder = pathlib.Path(folder)
    tensors = read_safetensors(folder, TRANSFORMERS_WEIGHTS)
    config = ViTConfig.from_transformers(read_config(folder), where=str(folder))
    module = ViTModel(config, dtype=dtype, remat=remat, attention=attention)
    params = convert_state_dict(
        tensors,
        abstract_params(module),
        where=str(folder),
        rename=_strip_prefix("vit."),
        ignore=(r"(vit\.)?pooler\..*", r"classifier\..*"),
    )
    return module, params


def load_tokenizer(folder: PathLike) -> Any:
    """The CLIPTokenizer of a diffusers pipeline folder (its tokenizer/) or a vocab.json folder."""
    from idfuse_jax.tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(component_dir(folder, "tokenizer"))


# --- Stable Diffusion UNet and VAE ------------------------------------------------------------

# Old VAE checkpoints name the mid-block attention's projections the pre-0.14 diffusers way.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_ATTENTION_RE = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(\w+)")


def _rename_legacy_vae_attention(key: str) -> str:
    m = _LEGACY_VAE_ATTENTION_RE.fullmatch(key)
    return f"{m[1]}.{_LEGACY_VAE_ATTENTION[m[2]]}.{m[3]}" if m else key


def unet_module(
    folder: PathLike, *, dtype: Any = np.float32, remat: bool = False, attention: str = "auto"
) -> Any:
    """The UNet a diffusers UNet folder's config.json describes (or a pipeline folder's unet/)."""
    from idfuse_jax.models import unet as unet_lib  # models import this module

    folder = component_dir(folder, "unet")
    config = unet_lib.UNetConfig.from_diffusers(read_config(folder), where=str(folder))
    return unet_lib.UNet2DConditionModel(config, dtype=dtype, remat=remat, attention=attention)


def vae_module(folder: PathLike, *, dtype: Any = np.float32, attention: str = "auto") -> Any:
    """The AutoencoderKL a diffusers VAE folder's config.json describes (or a pipeline's vae/)."""
    from idfuse_jax.models import vae as vae_lib  # models import this module

    folder = component_dir(folder, "vae")
    config = vae_lib.VAEConfig.from_diffusers(read_config(folder), where=str(folder))
    return vae_lib.AutoencoderKL(config, dtype=dtype, attention=attention)


def load_unet(
    folder: PathLike,
    *,
    dtype: Any = np.float32,
    remat: bool = False,
    options: LoadOptions = LoadOptions(),
    attention: str = "auto",
) -> tuple[Any, Any]:
    """A diffusers UNet2DConditionModel folder (or pipeline folder) -> (model, float32 params).

    The params are host (numpy) arrays, so the caller chooses their device placement/sharding.
    """
    folder = component_dir(folder, "unet")
    model = unet_module(folder, dtype=dtype, remat=remat, attention=attention)
    tensors = read_safetensors(folder, DIFFUSERS_WEIGHTS, options.variant, lazy=options.lazy)
    params = convert_state_dict(
        tensors, abstract_params(model), where=str(folder), dtype=options.param_dtype
    )
    return model, params


def load_vae(
    folder: PathLike,
    *,
    dtype: Any = np.float32,
    options: LoadOptions = LoadOptions(),
    attention: str = "auto",
) -> tuple[Any, Any]:
    """A diffusers AutoencoderKL folder (or pipeline folder) -> (model, float32 params)."""
    folder = component_dir(folder, "vae")
    model = vae_module(folder, dtype=dtype, attention=attention)
    params = convert_state_dict(
        read_safetensors(folder, DIFFUSERS_WEIGHTS, options.variant, lazy=options.lazy),
        abstract_params(model),
        where=str(folder),
        rename=_rename_legacy_vae_attention,
        dtype=options.param_dtype,
    )
    return model, params
