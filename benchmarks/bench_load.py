"""Start-up cost of the paper's setup at real size: loading SD 2.1-base + OpenCLIP ViT-H/14.

  python benchmarks/bench_load.py --folder /tmp/real_size [--weights_dtype bfloat16] [--eager]

Writes (once) a real-size folder pair laid out as the hub repos are, from the published configs
in tests/data/configs: stabilityai/stable-diffusion-2-1-base (unet/ vae/ text_encoder/
tokenizer/ scheduler/) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (CLIPModel). The tensors are
zeros in sparse files (tensor names and shapes from the torch models built on the meta device),
so writing costs no time and no disk; reading them costs what reading real weights from the
page cache costs. Then, in a fresh process, builds the models as `train_lib` does
(`build.build_models(config, lazy=True)` and `sharding.put` over one device; `--eager` loads
everything into host memory first, the earlier path) and prints the wall time, the process's
peak host memory and the placed bytes. Needs torch, diffusers, transformers (the `test` extra)
to lay the folder out; the load itself needs none of them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "data" / "configs"
SD = "stabilityai/stable-diffusion-2-1-base"
CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

flags.DEFINE_string("folder", None, "Where the real-size folders are (written if absent).")
flags.DEFINE_string("weights_dtype", "", "model.weights_dtype: '' (float32) or 'bfloat16'.")
flags.DEFINE_bool("eager", False, "Load every tensor into host memory before placing any.")
flags.DEFINE_bool("measure", False, "Internal: run the measurement in this process.")
flags.mark_flags_as_required(["folder"])


def _sparse_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file of zeros without writing its data (a sparse file)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for n in shape:
            size *= n
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def _meta_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_folders(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    import diffusers
    import torch
    import transformers

    sd, clip_dir = root / "sd21-base", root / "clip-vit-h-14"
    if (sd / "model_index.json").is_file() and (clip_dir / "config.json").is_file():
        return sd, clip_dir
    for src in (CONFIGS / SD).rglob("*.json"):
        dst = sd / src.relative_to(CONFIGS / SD)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    # A CLIP-sized vocabulary (49408 entries, the two specials last), no merges.
    tokens = [f"t{i}</w>" for i in range(49406)] + ["<|startoftext|>", "<|endoftext|>"]
    tokens[0] = "!"
    (sd / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (sd / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(
            json.loads((sd / "unet/config.json").read_text())
        )
        vae = diffusers.AutoencoderKL.from_config(json.loads((sd / "vae/config.json").read_text()))
        text = transformers.CLIPTextModel(
            transformers.CLIPTextConfig.from_pretrained(str(sd / "text_encoder"))
        )
        clip_config = transformers.CLIPConfig.from_pretrained(str(CONFIGS / CLIP))
        clip = transformers.CLIPModel(clip_config)
    _sparse_safetensors(sd / "unet" / "diffusion_pytorch_model.safetensors", _meta_shapes(unet))
    _sparse_safetensors(sd / "vae" / "diffusion_pytorch_model.safetensors", _meta_shapes(vae))
    text_shapes = {f"text_model.{k}": v for k, v in _meta_shapes(text).items()}
    _sparse_safetensors(sd / "text_encoder" / "model.safetensors", text_shapes)
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / "config.json").write_text((CONFIGS / CLIP / "config.json").read_text())
    _sparse_safetensors(clip_dir / "model.safetensors", _meta_shapes(clip))
    return sd, clip_dir


def measure(sd: pathlib.Path, clip_dir: pathlib.Path, weights_dtype: str, eager: bool) -> None:
    import jax

    from idfuse_jax import build, resources, sharding
    from idfuse_jax.config_lib import sibling_module

    config = sibling_module(str(REPO / "configs" / "dog.py"), "dog").get_config()
    config.model.pretrained, config.model.image_encoder = str(sd), str(clip_dir)
    config.model.weights_dtype = weights_dtype
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    with resources.phase("load") as record:
        _, frozen = build.build_models(config, lazy=not eager)
        frozen = jax.block_until_ready(sharding.put(frozen, sharding.fsdp_shardings(frozen, mesh)))
    placed = sum(x.nbytes for x in jax.tree.leaves(frozen))
    print(
        f"load {'eager' if eager else 'streamed'}, weights_dtype={weights_dtype or 'float32'}: "
        f"{record.seconds:.1f} s, peak host memory {record.host_peak_bytes / 2**30:.2f} GiB, "
        f"placed {placed / 2**30:.2f} GiB"
    )


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    root = pathlib.Path(f.folder)
    if f.measure:
        measure(root / "sd21-base", root / "clip-vit-h-14", f.weights_dtype, f.eager)
        return
    write_folders(root)
    eager = "--eager" if f.eager else "--noeager"
    command = [sys.executable, __file__, f"--folder={root}", "--measure",
               f"--weights_dtype={f.weights_dtype}", eager]  # fmt: skip
    # The measuring process imports idfuse_jax from this checkout.
    env = {"JAX_PLATFORMS": "cpu", **os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    app.run(main)
