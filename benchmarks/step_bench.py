"""The full training step of idfuse_jax beside a PyTorch reference of the same step.

JAX: the library's own jitted step (`train_lib.train_step`: CLIP text encoder with LoRA, IEDM
adapter, FFM, both UNet passes as one batched call, the four losses, grad-norm clip + AdamW),
compiled ahead of time with the state donated. PyTorch: the same step written here on diffusers'
UNet2DConditionModel and transformers' CLIPTextModel with LoRA on the same modules (a small
hand-written LoRA wrapper; peft is not a dependency), the same adapter, FFM and losses, and
torch.optim.AdamW. Both sides load the same random weights (saved by torch, loaded by our
loaders), use the same config and batch, in float32 on CPU.

Per size it prints the median step time after warm-up, JAX's compile time, memory (XLA's
arguments and temporaries from the compiled memory analysis; PyTorch's peak RSS rise during a
step), and `ratio pytorch/jax = X` (> 1: JAX is faster). Then, without running anything, the
compiled memory of a float32 and a bfloat16 SD 2.1-base UNet backward at 512 px (batch 1,
gradients of the LoRA-adapted attention projections) for each attention implementation the
platform can compile.

  python benchmarks/step_bench.py                # tiny, small, 512 px table: ~8 min, 2 cores
  python benchmarks/step_bench.py --size small --attention xla   # the materialised attention
  python benchmarks/step_bench.py --size sd21 --device cuda --resolution 512 --batch 8 \
      --dtype bfloat16 --attention cudnn                     # GPU: prints MFU (see README.md)

Needs the `test` extra (torch, diffusers, transformers) and this checkout's idfuse_jax on the path
(`pip install -e .`, or PYTHONPATH=. from the repository root).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_models import MIB, Torch, machine, save_and_load
from diffusers import DDPMScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from idfuse_jax import (
    build,
    config_lib,
    diffusion,
    method,
    metrics,
    presets,
    sharding,
    train_lib,
    weights,
)
from idfuse_jax.models import attention as attention_lib
from idfuse_jax.models import clip, unet, vae

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TOKENS = 77
LATENT_CHANNELS = 4

_CROSS_DOWN, _CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
_SD21_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(_CROSS_DOWN,) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + (_CROSS_UP,) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)
# diffusers UNet kwargs, transformers CLIPTextConfig kwargs, latent side, batch, CLIP image width.
# fmt: off
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), down_block_types=(_CROSS_DOWN, "DownBlock2D"),
                  up_block_types=("UpBlock2D", _CROSS_UP), layers_per_block=1,
                  attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
                  use_linear_projection=True),
        text=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2),
        latent=8, batch=2, image_width=32, repeats=20,
    ),
    "small": dict(
        unet=dict(block_out_channels=(64, 128, 256), down_block_types=(_CROSS_DOWN,) * 2 +
                  ("DownBlock2D",), up_block_types=("UpBlock2D",) + (_CROSS_UP,) * 2,
                  layers_per_block=1, attention_head_dim=8, cross_attention_dim=256,
                  norm_num_groups=8, use_linear_projection=True),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8),
        latent=32, batch=2, image_width=256, repeats=5,
    ),
    # SD 2.1-base: UNet 866 M, OpenCLIP ViT-H text tower (23 layers of 1024), ViT-H image
    # embeddings (1024); 256 px = 32x32 latents.
    "sd21": dict(
        unet=_SD21_UNET,
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu"),
        latent=32, batch=2, image_width=1024, repeats=3,
    ),
}
# fmt: on
# A float32 sd21 step on CPU holds both frameworks' copies of the weights and activations.
SD21_CPU_BYTES = 20 * 2**30
TORCH_UNET_LORA = re.compile(r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")
TORCH_TEXT_LORA = re.compile(r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)")


@dataclasses.dataclass
class Result:
    size: str
    torch_s: float
    jax_s: float
    compile_s: float
    jax_args_mib: float
    jax_temp_mib: float
    torch_peak_mib: float | None
    flops: float | None
    jax_out_mib: float = 0.0
    jax_peak_mib: float | None = None  # the device's measured peak (accelerators only)


def bench_config(dtype: str, attention: str) -> Any:
    """The library's default config (loss weights, LoRA, optimiser) at this dtype/attention."""
    config = config_lib.sibling_module(str(CONFIGS / "default.py"), "default").get_config()
    config.model.dtype, config.model.attention = dtype, attention
    return config


def timed_pair(fn_a, fn_b, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of two blocking callables, called in turn after `warmup` calls each
    (`fn_b` None: nan)."""
    fns = [fn for fn in (fn_a, fn_b) if fn is not None]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    medians = [statistics.median(ts) for ts in times]
    return medians[0], medians[1] if len(medians) > 1 else float("nan")


# --------------------------------------------------------------------------------------------
# The PyTorch reference step


class LoRALinear(torch.nn.Module):
    """base(x) + (alpha / r) * x A^T B^T, B zero-initialised (diffusers' LoRALinearLayer)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.down.T) @ self.up.T)


def add_lora(model: torch.nn.Module, pattern: re.Pattern, rank: int, alpha: float) -> list:
    """Wrap every Linear whose dotted name matches `pattern`; returns the LoRA parameters."""
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    params = []
    for name in filter(pattern.fullmatch, targets):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        wrapped = LoRALinear(getattr(owner, child), rank, alpha)
        setattr(owner, child, wrapped)
        params += [wrapped.down, wrapped.up]
    return params


class TorchIdFuse(torch.nn.Module):
    """The IEDM adapter and FFM as idfuse_jax.models.adapter / ffm compute them (either may be
    absent, as a method preset says: `idfuse_jax.presets`)."""

    def __init__(
        self, image_width: int, text_width: int, experts: int, adapter: bool = True,
        ffm: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.has_ffm = ffm
        if adapter:
            self.mask = torch.nn.Parameter(torch.zeros(image_width))
            self.fc1 = torch.nn.Linear(image_width, image_width)
            self.fc2 = torch.nn.Linear(image_width, image_width)
        self.proj = (
            torch.nn.Linear(image_width, text_width)
            if adapter and image_width != text_width
            else None
        )
        if ffm:
            d = text_width
            self.router = torch.nn.Linear(d, experts)
            self.w_in = torch.nn.Parameter(torch.randn(experts, d, d) / d**0.5)
            self.b_in = torch.nn.Parameter(torch.zeros(experts, d))
            self.w_out = torch.nn.Parameter(torch.zeros(experts, d, d))
            self.b_out = torch.nn.Parameter(torch.zeros(experts, d))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)

    def adapt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        gated = torch.sigmoid(self.mask) * image_embeds
        return self.project(self.fc2(torch.relu(self.fc1(gated))) + gated)

    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_ffm:
            return x
        weights = torch.softmax(self.router(x), dim=-1)
        hidden = torch.nn.functional.gelu(torch.einsum("btd,kdh->btkh", x, self.w_in) + self.b_in)
        mixed = torch.einsum("btkh,khd->btd", weights[..., None] * hidden, self.w_out)
        return x + mixed + weights @ self.b_out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()


def torch_idfuse(spec: dict, config) -> TorchIdFuse:
    """The adapter and FFM of the config's method preset at the size `spec`."""
    preset = presets.of(config)
    return TorchIdFuse(
        spec["image_width"], spec["text"]["hidden_size"], config.method.num_experts,
        adapter=preset.image_branch, ffm=preset.ffm,
    )  # fmt: skip


def ddpm_scheduler() -> DDPMScheduler:
    """diffusers' DDPM schedule with the library's SD training settings."""
    ddpm_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDPMScheduler(**{k: build.SD_SCHEDULE[k] for k in ddpm_keys})


def torch_loss(
    config, idfuse: TorchIdFuse, torch_unet, torch_text, scheduler, x: dict, draws=None
) -> torch.Tensor:
    """The training loss of the config's method preset (`method.training_loss` in PyTorch).

    `x`: the subject_inputs tensors; `draws`: the batch's (scaled latents, noise, timesteps),
    NCHW, or None to draw them with torch's generator.
    """
    preset, w, mse = presets.of(config), config.loss.weights, torch.nn.functional.mse_loss
    f_s = torch_text(x["prompt_ids"]).last_hidden_state  # [1, T, D]
    if draws is None:
        mean, logvar = x["latent_mean"], x["latent_logvar"]
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
    else:
        latents, noise, t = draws
    batch = latents.shape[0]
    noisy = scheduler.add_noise(latents, noise, t)
    f_i = idfuse.adapt(x["image_embeds"]) if preset.image_branch else None
    full = idfuse.fuse(f_s) if f_i is None else idfuse.fuse(f_s + f_i[:, None])
    conds = [full.expand(batch, -1, -1)]
    if preset.text_only:
        conds.append(idfuse.fuse(f_s).expand(batch, -1, -1))
    n = len(conds)
    preds = torch_unet(torch.cat([noisy] * n), torch.cat([t] * n), torch.cat(conds)).sample
    preds = preds.chunk(n)
    denoise = mse(preds[0], noise)
    if preset.text_only:
        denoise = denoise + config.loss.text_only_weight * mse(preds[1], noise)
    loss = w.denoise * denoise
    pooled = f_s.mean(1).expand(batch, -1)
    if "text_image" in preset.terms:
        loss = loss + w.text_image * _cos(pooled, f_i)
    if preset.explicit:
        with torch.no_grad():
            f_bg = idfuse.project(x["background_embeds"])
        if "image_background" in preset.terms:
            loss = loss - w.image_background * _cos(f_i, f_bg)
        loss = loss + w.text_background * _cos(pooled, f_bg)
    return loss


def torch_step_fn(spec, config, torch_unet, torch_text, th: Torch, inputs: dict):
    """A closure running one PyTorch training step (forward, backward, clip, AdamW)."""
    m = config.method
    idfuse = torch_idfuse(spec, config).to(th.device)
    trainable = add_lora(torch_unet, TORCH_UNET_LORA, m.lora_rank, m.lora_alpha)
    if presets.text_lora_targets(config):
        trainable += add_lora(torch_text, TORCH_TEXT_LORA, m.lora_rank, m.lora_alpha)
    torch_unet.to(th.device).train()
    torch_text.to(th.device).train()
    trainable += list(idfuse.parameters())
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.optim.learning_rate,
        betas=(config.optim.b1, config.optim.b2),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    scheduler = ddpm_scheduler()
    x = {k: th.tensor(v) for k, v in inputs.items()}

    # bfloat16 as JAX runs it: float32 parameters and optimiser, bfloat16 compute (autocast).
    autocast = functools.partial(
        torch.autocast, th.device.type, torch.bfloat16, enabled=config.model.dtype == "bfloat16"
    )

    def step() -> float:
        with autocast():
            loss = torch_loss(config, idfuse, torch_unet, torch_text, scheduler, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return th.sync(loss.item())

    return step


# --------------------------------------------------------------------------------------------
# The idfuse_jax step


def subject_inputs(spec: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-subject features as prepare_subject_features leaves them (NCHW latents for torch)."""
    b, side, width = spec["batch"], spec["latent"], spec["image_width"]
    ids = rng.integers(1, 400, (1, TOKENS))
    ids[0, 8] = 49407  # the largest id: the EOS position of the legacy pooling rule
    return {
        "latent_mean": rng.standard_normal((b, LATENT_CHANNELS, side, side), np.float32),
        "latent_logvar": rng.uniform(-4, -2, (b, LATENT_CHANNELS, side, side)).astype(np.float32),
        "image_embeds": rng.standard_normal((b, width), np.float32),
        "background_embeds": rng.standard_normal((b, width), np.float32),
        "prompt_ids": ids,
    }


def jax_models(spec, config, unet_module, text_module) -> build.Models:
    """The library's Models around loaded UNet and text encoder (VAE / image tower unused)."""
    text_width = spec["text"]["hidden_size"]
    image_config = clip.CLIPVisionConfig(projection_dim=spec["image_width"])
    return build.Models(
        unet=unet_module,
        vae=vae.AutoencoderKL(vae.VAEConfig(latent_channels=LATENT_CHANNELS)),
        text_encoder=text_module,
        image_encoder=clip.CLIPVisionTransformer(image_config),
        idfuse=build.idfuse_module(config, spec["image_width"], text_width),
        tokenizer=None,
        schedule=diffusion.Schedule.from_config(build.SD_SCHEDULE),
    )


def jax_subject(spec: dict, inputs: dict) -> method.SubjectFeatures:
    """`subject_inputs` as the step takes them (NHWC latents)."""
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    return method.SubjectFeatures(
        latent_mean=nhwc(inputs["latent_mean"]),
        latent_logvar=nhwc(inputs["latent_logvar"]),
        image_embeds=jnp.asarray(inputs["image_embeds"]),
        background_embeds=jnp.asarray(inputs["background_embeds"]),
        prompt_ids=jnp.asarray(inputs["prompt_ids"], jnp.int32),
        num_items=spec["batch"],
        decouple=jnp.ones((spec["batch"],), jnp.float32),
    )


def jax_step_fn(spec, config, models, frozen, inputs: dict):
    """(compiled step, its arguments, compile seconds, model FLOPs): the step training runs,
    `train_lib.jit_subjects_step` with one subject on one device, the state donated."""
    subject = jax_subject(spec, inputs)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    state, key = train_lib.initial_state(config, models, frozen, 1, mesh)
    frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
    jitted = lambda models: train_lib.jit_subjects_step(models, config, mesh, frozen_shardings)
    steps = jnp.full((1,), config.train.steps, jnp.int32)
    args = (state, frozen, method.stack_subjects([subject], 1), jnp.arange(spec["batch"])[None],
            key, steps)  # fmt: skip
    start = time.perf_counter()
    compiled = jitted(models).lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled, args, seconds, train_lib.model_flops(jitted, models, args) or None


def run_size(name: str, spec: dict, args, th: Torch, tmp: pathlib.Path) -> Result:
    spec = dict(spec, batch=args.batch or spec["batch"])
    if args.resolution:
        spec["latent"] = args.resolution // 8
    repeats = args.repeats or spec["repeats"]
    config = bench_config(args.dtype, args.attention)
    dtype = build.DTYPES[args.dtype]
    torch.manual_seed(0)
    torch_unet = TorchUNet(
        **spec["unet"], sample_size=spec["latent"], in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
    )  # fmt: skip
    text_config = transformers.CLIPTextConfig(**spec["text"], vocab_size=49408)
    torch_text = transformers.CLIPTextModel(text_config)
    load = dict(dtype=dtype, attention=args.attention)
    unet_module, unet_params = save_and_load(
        torch_unet, functools.partial(weights.load_unet, **load), tmp / f"{name}_unet"
    )
    text_module, text_params = save_and_load(
        torch_text, functools.partial(weights.load_clip_text, **load), tmp / f"{name}_text"
    )
    inputs = subject_inputs(spec, np.random.default_rng(0))
    models = jax_models(spec, config, unet_module, text_module)
    frozen = {"unet": unet_params, "text": text_params}
    compiled, jax_args, compile_s, flops = jax_step_fn(spec, config, models, frozen, inputs)
    mem = compiled.memory_analysis()
    holder = {"args": jax_args}

    def jax_step() -> None:
        state, *rest = holder["args"]
        state, out = compiled(state, *rest)
        holder["args"] = (state, *rest)
        jax.block_until_ready(out["loss"])

    torch_step = None
    if not args.jax_only:
        torch_step = torch_step_fn(spec, config, torch_unet, torch_text, th, inputs)
    print(f"{name}: jax compiled in {compile_s:.1f} s; timing {repeats} steps", flush=True)
    # Alternate the two steps, so that both see the same load on a shared machine.
    jax_s, torch_s = timed_pair(jax_step, torch_step, args.warmup, repeats)
    torch_peak = None if torch_step is None else th.peak_extra_bytes(torch_step)
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return Result(
        name,
        torch_s,
        jax_s,
        compile_s,
        mem.argument_size_in_bytes / MIB,
        mem.temp_size_in_bytes / MIB,
        None if torch_peak is None else torch_peak / MIB,
        flops,
        mem.output_size_in_bytes / MIB,
        stats["peak_bytes_in_use"] / MIB if "peak_bytes_in_use" in stats else None,
    )


def report(r: Result, device_kind: str) -> None:
    peak = "n/a" if r.torch_peak_mib is None else f"{r.torch_peak_mib:.0f} MiB"
    print(
        f"{r.size}: pytorch {r.torch_s * 1e3:.1f} ms/step, jax {r.jax_s * 1e3:.1f} ms/step "
        f"(compile {r.compile_s:.1f} s); jax memory: arguments {r.jax_args_mib:.0f} MiB, "
        f"XLA temporaries {r.jax_temp_mib:.0f} MiB; pytorch peak rise {peak}"
    )
    if r.jax_peak_mib is not None:
        compiled = r.jax_args_mib + r.jax_temp_mib + r.jax_out_mib
        print(f"{r.size}: jax device peak {r.jax_peak_mib:.0f} MiB measured (since start, "
              f"every program of the run), compiled step {compiled:.0f} MiB "
              f"(arguments + temporaries + outputs)")  # fmt: skip
    if r.flops:
        line = (
            f"{r.size}: {r.flops / 1e9:.1f} GFLOP/step (model, from the cost analysis), "
            f"{r.flops / r.jax_s / 1e12:.3f} TFLOP/s"
        )
        peak_tflops = metrics.peak_tflops(device_kind)
        if peak_tflops:
            line += f", MFU {r.flops / r.jax_s / 1e12 / peak_tflops:.1%} of {peak_tflops:g}"
        print(line)
    print(f"ratio pytorch/jax = {r.torch_s / r.jax_s:.2f}", flush=True)


# --------------------------------------------------------------------------------------------
# Memory of an SD 2.1-base UNet backward at 512 px, from the compiled program alone


def unet512_memory(
    dtype: str, attention: str, batch: int = 1, remat: bool = False
) -> tuple[float, float]:
    """(XLA temporaries GiB, compile s) of grad(mean(unet(x)^2)) w.r.t. the attention
    projections (the LoRA targets) of SD 2.1-base at 512 px; lowered and compiled, never run."""
    config = unet.UNetConfig(
        **_SD21_UNET, sample_size=64, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS
    )
    model = unet.UNet2DConditionModel(
        config, dtype=build.DTYPES[dtype], remat=remat, attention=attention
    )
    params = jax.eval_shape(lambda: weights.init_params(model, jax.random.key(0)))
    flat = traverse_util.flatten_dict(params, sep="/")
    pattern = re.compile(bench_config(dtype, attention).method.unet_lora_targets)
    train = {k: v for k, v in flat.items() if pattern.fullmatch(k)}
    rest = {k: v for k, v in flat.items() if k not in train}

    def loss(train, rest, x, t, c):
        p = traverse_util.unflatten_dict({**rest, **train}, sep="/")
        return jnp.mean(model.apply({"params": p}, x, t, c).astype(jnp.float32) ** 2)

    shapes = (
        jax.ShapeDtypeStruct((batch, 64, 64, LATENT_CHANNELS), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, TOKENS, 1024), jnp.float32),
    )
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(train, rest, *shapes).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis().temp_size_in_bytes / 2**30, seconds


def memory_table(implementations: list[str]) -> None:
    print("SD 2.1-base UNet backward at 512 px, batch 1 (compiled, not run): XLA temporaries")
    print("| attention | model.remat | float32 GiB | bfloat16 GiB |\n|---|---|---:|---:|")
    for remat in (False, True):
        for name in implementations:
            cells = []
            for dtype in ("float32", "bfloat16"):
                temp, seconds = unet512_memory(dtype, name, remat=remat)
                cells.append(f"{temp:.2f}")
                print(f"  ({name} remat={remat} {dtype}: compiled in {seconds:.0f} s)",
                      file=sys.stderr, flush=True)  # fmt: skip
            print(f"| {name} | {str(remat).lower()} | {cells[0]} | {cells[1]} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny,small", help="comma-separated: tiny,small,sd21")
    parser.add_argument(
        "--attention", default="auto",
        help="the JAX step's attention (model.attention); comma-separated: one step each, the "
        "PyTorch step timed beside the first only",
    )  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(build.DTYPES), default="float32")
    parser.add_argument(
        "--repeats", type=int, help="timed steps (default: 20 tiny, 5 small, 3 sd21)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="override the size's batch")
    parser.add_argument("--resolution", type=int, help="override the size's pixels (latents / 8)")
    parser.add_argument("--jax_only", action="store_true", help="skip the PyTorch step")
    parser.add_argument("--torch_threads", type=int, help="PyTorch threads (default: all cores)")
    parser.add_argument(
        "--memory", default="auto",
        help="implementations for the 512 px UNet memory table (comma-separated, 'auto': those "
        "this platform compiles, 'none': skip)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes = [s for s in args.size.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    attentions = args.attention.split(",")
    if bad := [a for a in attentions if a not in attention_lib.IMPLEMENTATIONS]:
        parser.error(f"--attention {bad} not among {attention_lib.IMPLEMENTATIONS}")
    if unknown or (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        parser.error(f"sizes must be among {sorted(SIZES)}, --repeats >= 1, --warmup >= 0")
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or args.device)
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    th = Torch(args.device)
    device_kind = jax.devices()[0].device_kind
    print(f"{machine(th)}; jax {jax.__version__} ({device_kind}), torch {torch.__version__}; "
          f"{args.dtype}, attention {args.attention}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if name == "sd21" and args.device == "cpu" and available < SD21_CPU_BYTES:
                print(f"sd21: skipped, {available / 2**30:.0f} GiB free of the "
                      f"{SD21_CPU_BYTES / 2**30:.0f} GiB it needs on CPU")  # fmt: skip
                continue
            for i, attention in enumerate(attentions):
                run_args = argparse.Namespace(
                    **{**vars(args), "attention": attention, "jax_only": args.jax_only or i > 0}
                )
                print(f"{name}: attention {attention}", flush=True)
                report(run_size(name, SIZES[name], run_args, th, pathlib.Path(tmp)), device_kind)
                gc.collect()
    if args.memory != "none":
        names = (
            ["xla", "blockwise"] + (["cudnn"] if args.device == "cuda" else [])
            if args.memory == "auto"
            else args.memory.split(",")
        )
        memory_table(names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
