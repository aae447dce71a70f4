r"""Pretrain the world's ViT: the encoder `prepare --masks=dino` reads (PyTorch; a script only).

  nice -n 19 python tools/pretrain_world_vit.py --out idfuse_jax/assets/world/vit

DINO's CLS token attends to the foreground object; `prepare` seeds GrabCut with that attention
map (`prepare.saliency`). Real DINO weights cannot be fetched here, and the world's CLIP vision
tower (32 px, 8 px patches: a 4 x 4 map) is too coarse to point at an object. This script
trains a small transformers ViTModel (32 px, 4 px patches: an 8 x 8 map) whose CLS token must
name the object of a scene (its shape, colour and pattern; three linear heads, dropped on
saving): what names the object is on the object, so the last layer's CLS attention goes there.
Nothing in training sees a mask; the masks only score it (the printed "attention on object").

Writes OUT/config.json and OUT/model.safetensors (a ViTModel folder, no pooler) and
OUT/PROVENANCE.md (the command, seed, data, time and the held-out scores). Data: scenes of
`idfuse_jax.data.world.world_batch` (the ToyBench subjects' instances never appear); held out:
the ToyBench subjects' photos. PyTorch (transformers) is needed only to run this script.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from idfuse_jax.data import world
from idfuse_jax.models.image_stats import IMAGENET_MEAN, IMAGENET_STD

ATTRIBUTES = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "pattern": world.PATTERNS}


def tensors(scenes: list[world.Scene], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [N, 3, R, R] normalised as `prepare.saliency` does, labels [N, 3])."""
    x = np.stack([s.image for s in scenes]).astype(np.float32) / 255
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    labels = [
        [values.index(getattr(s.instance, name)) for name, values in ATTRIBUTES.items()]
        for s in scenes
    ]
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    return pixels.to(device), torch.tensor(labels, device=device)


def drop_patches(x: torch.Tensor, patch: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Each patch blanked (to the mean, 0 after normalising) with probability `rate`: the
    object must be named from whichever of its patches are left, so the CLS token learns to
    read all of them, not the one most telling patch."""
    if rate <= 0:
        return x
    n, _, h, w = x.shape
    keep = torch.rand(n, 1, h // patch, w // patch, generator=gen) >= rate
    keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3).to(x.device)
    return x * keep


def object_share(attention: torch.Tensor, masks: np.ndarray) -> float:
    """Mean share of the CLS attention (over patches, [N, g, g]) that falls on the object
    (each patch weighted by the fraction of its pixels under the mask)."""
    grid = attention.shape[-1]
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    covered = F.adaptive_avg_pool2d(m, grid)[:, 0].to(attention.device)
    return float(((attention * covered).sum((1, 2)) / attention.sum((1, 2))).mean())


def evaluate(model, heads, pixels, labels, masks) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True)
        cls = out.last_hidden_state[:, 0]
        accuracy = {
            name: float((head(cls).argmax(-1) == labels[:, k]).float().mean())
            for k, (name, head) in enumerate(zip(ATTRIBUTES, heads))
        }
        grid = model.config.image_size // model.config.patch_size
        attention = out.attentions[-1][:, :, 0, 1:].mean(1).reshape(-1, grid, grid)
    model.train()
    return {**accuracy, "attention on object": object_share(attention, masks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--scenes", type=int, default=8192)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patch_drop", type=float, default=0.5, help="see drop_patches")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import ViTConfig, ViTModel

    start = time.perf_counter()
    train_scenes = world.world_batch(args.scenes, args.resolution, args.seed)
    held_out = [s for t in world.SUBJECTS for s in world.subject_photos(t, args.resolution)]
    pixels, labels = tensors(train_scenes, args.device)
    test_pixels, test_labels = tensors(held_out, args.device)
    test_masks = np.stack([s.mask for s in held_out])
    render_s = time.perf_counter() - start

    config = ViTConfig(
        image_size=args.resolution, patch_size=args.patch, hidden_size=args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.width, layer_norm_eps=1e-6, qkv_bias=True,
    )  # fmt: skip
    config._attn_implementation = "eager"  # the attention maps are read (sdpa gives none)
    model = ViTModel(config, add_pooling_layer=False).to(args.device)
    heads = torch.nn.ModuleList(
        torch.nn.Linear(args.width, len(v)) for v in ATTRIBUTES.values()
    ).to(args.device)
    parameters = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.05)
    warmup = min(200, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)),
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(pixels), (args.batch,), generator=gen).to(args.device)
        x, y = pixels[index], labels[index]
        flip = torch.rand(args.batch, generator=gen).to(args.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # labels are flip-invariant
        x = drop_patches(x, args.patch, args.patch_drop, gen)
        cls = model(pixel_values=x).last_hidden_state[:, 0]
        loss = sum(F.cross_entropy(head(cls), y[:, k]) for k, head in enumerate(heads))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            scores = evaluate(model, heads, test_pixels, test_labels, test_masks)
            shown = " ".join(f"{k} {v:.3f}" for k, v in scores.items())
            print(f"step {step} loss {loss.item():.4f} held out: {shown}", flush=True)
    train_s = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    (args.out / "PROVENANCE.md").write_text(
        "# The world's ViT (the encoder of prepare's masks=dino)\n\n"
        f"Trained from scratch by `python tools/pretrain_world_vit.py {' '.join(sys.argv[1:])}` "
        f"(torch {torch.__version__}, on {where}) on {args.scenes} scenes of "
        f"`idfuse_jax.data.world.world_batch({args.scenes}, {args.resolution}, "
        f"seed={args.seed})` (no ToyBench subject instance among them), to name each scene's "
        "object (shape, colour, pattern) from its CLS token. No masks, no other data, no "
        "downloaded weights.\n\n"
        f"Settings: `{json.dumps(vars(args), default=str)}`.\n\n"
        f"Measured: rendering {render_s:.0f} s, training {train_s:.0f} s, "
        f"{size / 2**20:.1f} MiB on disk. On the {len(held_out)} ToyBench photos (held out): "
        f"{shown}.\n"
    )
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
