r"""Pretrain the tiny Stable Diffusion of the procedural world (PyTorch; a script only).

  nice -n 19 python tools/pretrain_world.py --out idfuse_jax/assets/world

Writes, from nothing but `idfuse_jax.data.world` and a seed:
  OUT/sd/            a diffusers StableDiffusionPipeline folder: model_index.json, unet/, vae/,
                     text_encoder/ (CLIPTextModel), tokenizer/ (CLIP BPE, the world's words),
                     scheduler/ (DDPM, SD's scaled-linear schedule)
  OUT/image_encoder/ a transformers CLIPVisionModelWithProjection folder (E_I)
  OUT/PROVENANCE.md  the command, seed, steps, data and the measured time of each stage

Stages, all on scenes from `world.world_batch` (the ToyBench subjects' instances never appear):
  1. CLIP: text and vision towers trained contrastively on (image, caption) pairs; the text
     tower becomes SD's text encoder, the vision tower with its projection E_I;
  2. VAE: an AutoencoderKL (x2 downsampling: 32 px -> 16 x 16 x 4 latents), L2 + a light KL;
     its scaling_factor is set so that latents have unit variance;
  3. UNet: epsilon prediction on the VAE's latents, conditioned on the frozen text encoder, with
     10 % empty captions (classifier-free guidance).
PyTorch (diffusers, transformers) is needed only to run this script: idfuse_jax loads the
folders with its own loaders, like any hub download.
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
from idfuse_jax.tokenizer import byte_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # tokens per prompt: captions take at most 10
EXTRA_WORDS = ("sks", "a", "an", "photo", "of", "the", "with", "and", "dog", "toy")


# ------------------------------------------------------------------------------ the tokenizer


def write_tokenizer(folder: pathlib.Path, captions: list[str]) -> None:
    """A CLIP BPE tokenizer whose merges spell each word of the captions (and EXTRA_WORDS) as
    one token; other text falls back to byte characters."""
    chars = list(byte_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in sorted({w for c in captions for w in c.split()} | set(EXTRA_WORDS)):
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {**specials, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------ data


def render_scenes(path: pathlib.Path, count: int, res: int, seed: int) -> None:
    """The training scenes (`world.world_batch`) as an .npz of images and captions, so that
    training can run where idfuse_jax's data dependencies are not installed."""
    from idfuse_jax.data import world

    scenes = world.world_batch(count, res, seed)
    np.savez_compressed(
        path,
        images=np.stack([s.image for s in scenes]),
        captions=np.array([s.caption for s in scenes]),
        every_caption=np.array(
            sorted({world.caption(i, p) for i in world.ALL_INSTANCES for p in world.PLACES})
        ),
    )


def load_scenes(path: pathlib.Path, tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(path)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tokenizer(
        [str(c) for c in data["captions"]], padding="max_length", max_length=MAX_LENGTH,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    return images.to(device), ids.to(device)


def batches(n: int, batch: int, generator: torch.Generator):
    while True:
        for chunk in torch.randperm(n, generator=generator).split(batch):
            if len(chunk) == batch:
                yield chunk


def run_stage(name, steps, step_fn, log_every=200, budget=None) -> float:
    """Run `step_fn` for `steps` steps (an int, or a one-element list that may shrink: after
    100 steps, to what fits `budget` seconds at the measured rate)."""
    total = steps if isinstance(steps, list) else [steps]
    start, i = time.time(), 0
    while i < total[0]:
        i += 1
        loss = step_fn()
        if i == 100 and budget:
            fits = int(budget * i / (time.time() - start))
            if fits < total[0]:
                print(f"[{name}] {total[0]} steps do not fit {budget} s: {fits}", flush=True)
                total[0] = fits
        if i % log_every == 0 or i == total[0]:
            rate = i / (time.time() - start)
            print(f"[{name}] step {i}/{total[0]} loss {loss:.4f} ({rate:.2f} steps/s)", flush=True)
    return time.time() - start


# ---------------------------------------------------------------------------------- stages


def train_clip(images, ids, vocab_size, args, gen):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=args.width,
                         intermediate_size=4 * args.width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=args.width, intermediate_size=4 * args.width,
                           num_hidden_layers=2, num_attention_heads=2,
                           image_size=args.resolution, patch_size=args.patch),
        projection_dim=args.width,
    )  # fmt: skip
    model = CLIPModel(config).to(images.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    order = batches(len(images), args.clip_batch, gen)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=images.device)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=images.device)
    mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def step():
        idx = next(order)
        pixels = ((images[idx] + 1) / 2 - mean) / std
        out = model(input_ids=ids[idx], pixel_values=pixels)
        # Several scenes may share a caption: every pair with the same caption is a positive.
        same = (ids[idx][:, None] == ids[idx][None]).all(-1).float()
        target = same / same.sum(-1, keepdim=True)
        loss = -(target * F.log_softmax(out.logits_per_image, -1)).sum(-1).mean()
        loss = (loss - (target * F.log_softmax(out.logits_per_text, -1)).sum(-1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    seconds = run_stage("clip", args.clip_steps, step, budget=args.clip_budget_s)
    return model, seconds


def train_vae(images, args, gen):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=args.resolution,
    ).to(images.device)  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    order = batches(len(images), args.vae_batch, gen)

    def step():
        x = images[next(order)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    seconds = run_stage("vae", args.vae_steps, step, budget=args.vae_budget_s)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in images.split(256)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(256)])
    print(f"[vae] reconstruction L2 {F.mse_loss(recon, images).item():.5f}", flush=True)
    scale = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return vae, latents * scale, seconds


def train_unet(latents, ids, text_encoder, empty_ids, args, gen):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=latents.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(args.unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=args.width, attention_head_dim=2, norm_num_groups=8,
        use_linear_projection=True,
    ).to(latents.device)  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
        steps_offset=1,
    )  # fmt: skip
    with torch.no_grad():  # the text encoder is frozen: encode every caption once
        states = torch.cat([text_encoder(c).last_hidden_state for c in ids.split(512)])
        empty = text_encoder(empty_ids).last_hidden_state
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    total = [args.unet_steps]  # may shrink to fit --unet_budget_s (measured on the first steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(i / total[0], 1))),
    )
    alphas = scheduler.alphas_cumprod.to(latents.device)
    order = batches(len(latents), args.unet_batch, gen)

    def step():
        idx = next(order)
        x0, cond = latents[idx], states[idx].clone()
        drop = (torch.rand(len(idx), generator=gen) < 0.1).to(x0.device)
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, 1000, (len(idx),), generator=gen).to(x0.device)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    seconds = run_stage("unet", total, step, budget=args.unet_budget_s)
    return unet.cpu(), scheduler, seconds, total[0]


# ------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--data", type=pathlib.Path, help="scenes .npz (rendered here if missing)")
    p.add_argument("--render_only", action="store_true", help="write --data and stop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--scenes", type=int, default=8192)
    p.add_argument("--width", type=int, default=64, help="text/vision width, cross-attention")
    p.add_argument("--patch", type=int, default=8, help="vision tower patch size")
    p.add_argument("--clip_steps", type=int, default=1500)
    p.add_argument("--clip_batch", type=int, default=128)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch", type=int, default=32)
    p.add_argument("--unet_steps", type=int, default=6000)
    p.add_argument("--unet_batch", type=int, default=64)
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--unet_channels", type=int, nargs=3, default=(32, 64, 64))
    for stage in ("clip", "vae", "unet"):
        p.add_argument(f"--{stage}_budget_s", type=float, help="fewer steps if these won't fit")
    p.add_argument("--preview", type=pathlib.Path, help="write a PNG grid of samples here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    data = args.data or args.out / "scenes.npz"
    if not data.is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        render_scenes(data, args.scenes, args.resolution, args.seed)
    if args.render_only:
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(args.seed)

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    sd = args.out / "sd"
    write_tokenizer(sd / "tokenizer", [str(c) for c in np.load(data)["every_caption"]])
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    images, ids = load_scenes(data, tokenizer, args.device)
    vocab_size = len(tokenizer)
    clip, clip_s = train_clip(images, ids, vocab_size, args, gen)
    clip = clip.cpu()
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval()
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    vae, latents, vae_s = train_vae(images, args, gen)
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
    unet, scheduler, unet_s, unet_steps = train_unet(
        latents, ids, text_encoder.to(args.device), empty.input_ids.to(args.device), args, gen
    )
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(sd, safe_serialization=True)
    vision.save_pretrained(args.out / "image_encoder", safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file() and f.suffix != ".npz")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    (args.out / "PROVENANCE.md").write_text(
        "# The world's tiny Stable Diffusion\n\n"
        f"Trained from scratch by `python tools/pretrain_world.py {' '.join(sys.argv[1:])}` "
        f"(torch {torch.__version__}, on {where}), on {args.scenes} scenes of "
        f"`idfuse_jax.data.world.world_batch({args.scenes}, {args.resolution}, "
        f"seed={args.seed})` (no ToyBench subject instance among them). No other data, no "
        "downloaded weights.\n\n"
        f"Settings: `{json.dumps(vars(args), default=str)}`; UNet steps run: {unet_steps}.\n\n"
        f"Measured: CLIP {clip_s:.0f} s, VAE {vae_s:.0f} s, UNet {unet_s:.0f} s; "
        f"{size / 2**20:.1f} MiB on disk.\n"
    )
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)", flush=True)
    if args.preview:
        write_preview(pipe, args.preview, args.resolution)


PREVIEW_PROMPTS = [
    f"a {c} {s} {place}"
    for c, s, place in (
        ("red", "ball", "on sand"), ("yellow checked", "box", "in the snow"),
        ("cyan", "cone", "on grass"), ("orange belted", "star", "on water"),
        ("purple striped", "diamond", "in front of a brick wall"),
        ("magenta", "ball", "on a wooden floor"), ("orange", "box", "on pink fabric"),
        ("red belted", "cone", "on a road"),
    )
]  # fmt: skip


def write_preview(pipe, path: pathlib.Path, res: int) -> None:
    """Two samples of each of 8 captions, DDIM 25 steps, guidance 4: a quick look."""
    from diffusers import DDIMScheduler
    from PIL import Image

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = PREVIEW_PROMPTS * 2
    out = pipe(
        prompts, height=res, width=res, num_inference_steps=25, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    tiles = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    rows = [np.concatenate(list(tiles[i : i + 8]), axis=1) for i in range(0, len(tiles), 8)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((8 * res * 4, 2 * res * 4), 0).save(path)


if __name__ == "__main__":
    main()
