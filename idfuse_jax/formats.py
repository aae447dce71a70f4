"""Checkpoint formats as diffusers and transformers write them: config.json, safetensors.

The bottom of the loading stack: readers that turn files into dicts and numpy arrays, and the
config checks that the model configs use (`check_config_keys`, `require_value`). It knows no
model; `idfuse_jax.weights` maps what these read onto our parameter trees.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from idfuse_jax.errors import WeightsError
from idfuse_jax.types import PathLike

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_json(path: PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def read_config(folder: PathLike) -> dict[str, Any]:
    """The component's `config.json`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder not found")
    return read_json(folder / "config.json")


def component_dir(folder: PathLike, component: str) -> pathlib.Path:
    """`folder/component` if `folder` is a diffusers pipeline folder, else `folder` itself."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder not found")
    if (folder / "model_index.json").is_file():
        sub = folder / component
        if not sub.is_dir():
            raise WeightsError(f"{folder}: pipeline folder has no {component}/ subfolder")
        return sub
    return folder


class StoredTensor:
    """One tensor of a safetensors file, read from disk only when asked.

    `read()` copies its bytes with one positional read into a fresh array (no memory mapping
    stays behind), so a caller that converts, places and drops tensors one at a time holds
    about one tensor in host memory, not the file.
    """

    def __init__(self, path: pathlib.Path, offset: int, shape: tuple[int, ...], dtype: Any):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < self.nbytes:  # os.preadv may return short reads for large tensors
                n = os.preadv(f.fileno(), [view[done:]], self.offset + done)
                if n <= 0:
                    raise WeightsError(f"{self.path}: truncated safetensors file")
                done += n
        return out


class LazyArray:
    """A parameter still on disk: its final shape and dtype, and `load()` to read and convert it.

    What the loaders return with `lazy=True`; `idfuse_jax.sharding.put` loads each one, places
    it shard by shard and drops the host copy before the next.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, load: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._load = tuple(shape), np.dtype(dtype), load

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        array = self._load()
        if array.shape != self.shape or array.dtype != self.dtype:
            raise WeightsError(
                f"loaded {array.shape} {array.dtype}, expected {self.shape} {self.dtype}"
            )
        return array


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"{path}: truncated safetensors file")
        header_len = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: corrupt safetensors header") from None
    return header, 8 + header_len


def read_safetensors_file(path: PathLike, *, lazy: bool = False) -> dict[str, Any]:
    """All tensors of one .safetensors file: memory-mapped numpy arrays (bfloat16 included), or
    with `lazy` `StoredTensor`s that read themselves when asked."""
    path = pathlib.Path(path)
    header, data_start = _read_header(path)
    size = path.stat().st_size - data_start
    data = None if lazy else np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    tensors: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > size:
            raise WeightsError(f"{path}: truncated safetensors file (tensor {name})")
        if lazy:
            tensors[name] = StoredTensor(path, data_start + start, info["shape"], dtype)
        else:
            tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return tensors


# The weight file each library loads from a model folder; an index names a sharded checkpoint.
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def add_variant(name: str, variant: str) -> str:
    """`model.safetensors` + "fp16" -> `model.fp16.safetensors`, as both libraries name variants
    (`model.safetensors.index.json` -> `model.safetensors.index.fp16.json`)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_files(folder: pathlib.Path, weights_name: str, variant: str = "") -> list[pathlib.Path]:
    """The safetensors files the library would load from `folder`, and only those.

    `weights_name` is `DIFFUSERS_WEIGHTS` or `TRANSFORMERS_WEIGHTS`. The file itself, or its
    `.index.json` and the shards it lists; with `variant`, the variant's names instead. diffusers
    (`ModelMixin.from_pretrained`) takes the index first, transformers the single file first.
    Every other file (`.bin`, `.ckpt`, other variants, other libraries' `*.safetensors` such as
    open_clip's) is ignored, with one log line.
    """
    single = folder / add_variant(weights_name, variant)
    index = folder / add_variant(f"{weights_name}.index.json", variant)
    order = (index, single) if weights_name == DIFFUSERS_WEIGHTS else (single, index)
    chosen = next((p for p in order if p.is_file()), None)
    if chosen is None:
        raise WeightsError(_no_weights_message(folder, single.name, index.name, variant))
    if chosen == index:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [chosen]
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file()
        and p not in files
        and p != chosen
        and p.name.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5"))
    )
    if others:
        logging.info("%s: loading %s; ignoring %s", folder, chosen.name, ", ".join(others))
    return files


def _no_weights_message(folder: pathlib.Path, single: str, index: str, variant: str) -> str:
    where = f"{folder}: no {single} (nor {index})"
    variants = sorted(p.name for p in folder.glob("*.safetensors") if p.name != single)
    if variant or variants:
        hint = "; safetensors here: " + ", ".join(variants) if variants else ""
        return where + f"{hint} (choose one with config.model.variant)"
    torch_files = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    if torch_files:
        return (
            f"{where}; it holds only PyTorch pickle weights ({', '.join(torch_files)}): "
            'convert once with torch installed: `python -c "import sys, transformers; '
            "m = transformers.AutoModel.from_pretrained(sys.argv[1]); "
            'm.save_pretrained(sys.argv[1], safe_serialization=True)" FOLDER` '
            "(diffusers models: the model class's from_pretrained / save_pretrained likewise)"
        )
    return where


def read_safetensors(
    folder: PathLike, weights_name: str, variant: str = "", *, lazy: bool = False
) -> dict[str, Any]:
    """Every tensor of the model in `folder` (see `weight_files`), memory-mapped, or as
    `StoredTensor`s with `lazy`."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights folder not found")
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder, weights_name, variant):
        if not path.is_file():
            raise WeightsError(f"{path}: weight file listed in the index is missing")
        tensors.update(read_safetensors_file(path, lazy=lazy))
    return tensors


# Keys that transformers' PretrainedConfig writes into every config.json, in 4.x (the full
# attribute list of PretrainedConfig.__init__, generation options included) and 5.x (its dataclass
# fields and the generation options it drops on load, `GenerationConfig._get_default_generation_
# params`), that do not change what an encoder computes: names, versions, storage dtype, output
# and generation options, label maps, token ids (CLIP's text tower reads `eos_token_id` itself),
# feed-forward chunking (same numbers, less memory) and tied embeddings (no LM head here).
# Keys starting with "_" (`_name_or_path`, `_commit_hash`, ...) are never read.
TRANSFORMERS_GENERIC_KEYS = frozenset(
    {
        # identity and storage
        "architectures", "transformers_version", "torch_dtype", "dtype", "name_or_path",
        "use_bfloat16", "torchscript", "xla_device", "gradient_checkpointing",
        "attn_implementation", "experts_implementation",
        # outputs
        "return_dict", "output_hidden_states", "output_attentions", "tie_last_hidden_states",
        "tf_legacy_loss", "use_cache", "chunk_size_feed_forward", "tie_word_embeddings",
        "tie_encoder_decoder", "cross_attention_hidden_size",
        # fine-tuning heads and tokenizer hints
        "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
        "tokenizer_class", "prefix", "task_specific_params",
        # token ids
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        # generation options (4.x wrote them into every config; 5.x drops them on load)
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "encoder_repetition_penalty", "length_penalty",
        "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "epsilon_cutoff", "eta_cutoff", "num_assistant_tokens", "num_assistant_tokens_schedule",
        "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
        # initialisation scales (loaded weights replace the init)
        "initializer_range", "initializer_factor",
    }
)  # fmt: skip


def check_config_keys(
    config: Mapping[str, Any],
    supported: Iterable[str],
    ignored: Iterable[str] = (),
    *,
    where: str,
) -> None:
    """Refuse config keys we do not implement (so nothing is silently ignored), naming each with
    its value.

    `ignored` lists keys that carry no meaning for the computation (names, versions). Keys
    starting with "_" are metadata (diffusers' `_class_name`, `_diffusers_version`,
    `_name_or_path`; transformers' `_name_or_path`, `_commit_hash`), never read by either library.
    """
    allowed = set(supported) | set(ignored)
    unknown = sorted(k for k in config if k not in allowed and not k.startswith("_"))
    if unknown:
        shown = ", ".join(f"{k}={config[k]!r}" for k in unknown)
        raise WeightsError(f"{where}: unsupported config keys: {shown}")


def require_value(
    config: Mapping[str, Any], key: str, allowed: Iterable[Any], *, where: str, default: Any = None
) -> Any:
    """Return config[key] (or `default` when absent), refusing values outside `allowed`."""
    allowed = list(allowed)
    value = config.get(key, default)
    if value not in allowed:
        raise WeightsError(f"{where}: unsupported {key}={value!r} (supported: {allowed})")
    return value
