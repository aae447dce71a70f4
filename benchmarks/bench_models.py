"""Speed and memory of our Flax models beside their PyTorch references (diffusers, transformers).

Each model is built at random in PyTorch, saved with `save_pretrained` and loaded through our
loaders, so both sides do identical work on identical weights. Per op: median wall time of
--repeats calls after --warmup calls (JAX: the ahead-of-time compiled function, compile time
apart; torch: eager, forwards under `torch.inference_mode`), memory, and the relative error
between the two outputs (a sanity check; --size small fails above 1e-4).

  python benchmarks/bench_models.py --size small             # idle 2-core CPU: about 20 s
  python benchmarks/bench_models.py --size sd --device cuda  # SD 1.5 shapes, 512 px, on a GPU
  python benchmarks/bench_models.py --size sd2 --device cuda # SD 2.1 shapes (OpenCLIP-H text)

Needs the `test` extra (torch, diffusers, transformers). Writes benchmarks/results_<size>.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from idfuse_jax import weights

SMALL_TOLERANCE = 1e-4
MIB = 2**20
TOKENS = 77
# The UNet's backward pass differentiates w.r.t. the attention projections, which LoRA adapts.
TORCH_TRAINABLE = re.compile(r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _clip(width: int, layers: int, heads: int, act: str, **extra: Any) -> dict[str, Any]:
    """transformers CLIP text/vision kwargs (every real CLIP has a 4x wide MLP)."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, hidden_act=act, **extra)  # fmt: skip


# fmt: off
_CROSS_DOWN, _CROSS_UP = ("CrossAttnDownBlock2D",), ("CrossAttnUpBlock2D",)
_SD_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest are diffusers' defaults
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
_SD2_UNET = dict(_SD_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True, upcast_attention=True)
# Per size: diffusers / transformers model kwargs, batch, and default repeats.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(
        unet=dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                  attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
                  down_block_types=_CROSS_DOWN * 2 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + _CROSS_UP * 2),
        vae=dict(block_out_channels=(16, 32), norm_num_groups=8, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2),
        text=_clip(32, 2, 4, "quick_gelu", vocab_size=100),
        vision=_clip(32, 2, 4, "quick_gelu", image_size=32, patch_size=4, projection_dim=32),
        batch=2, repeats=10,
    ),
    "sd": dict(
        unet=_SD_UNET, vae=_SD_VAE, text=_clip(768, 12, 12, "quick_gelu"),
        vision=_clip(1024, 24, 16, "quick_gelu", image_size=224, patch_size=14,
                     projection_dim=768),
        batch=1, repeats=5,
    ),
    "sd2": dict(
        unet=_SD2_UNET, vae=_SD_VAE, text=_clip(1024, 23, 16, "gelu"),
        vision=_clip(1280, 32, 16, "gelu", image_size=224, patch_size=14, projection_dim=1024),
        batch=1, repeats=5,
    ),
}
# fmt: on


@dataclasses.dataclass
class Row:
    model: str
    op: str
    torch_ms: float
    jax_ms: float
    compile_s: float
    args_mib: float | None  # weights + inputs: the same on both sides
    jax_extra_mib: float | None  # XLA temp + output buffers
    torch_extra_mib: float | None  # peak above the resident baseline
    rel_err: float


def rel_err(ours: Any, ref: Any) -> float:
    """Max abs difference over the reference's max abs value."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy().transpose(0, 2, 3, 1)


class Torch:
    """Device placement, synchronisation and peak memory for the PyTorch side."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def sync(self, out: Any) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def peak_extra_bytes(self, fn: Callable[[], Any]) -> float | None:
        """CUDA: the allocator's peak above what was allocated before. CPU: the rise of the
        process's peak RSS (VmHWM, reset through /proc/self/clear_refs) after glibc's free heap
        is handed back to the OS, so that the call's allocations show; still a lower bound."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.sync(fn())
            return torch.cuda.max_memory_allocated() - base
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            pathlib.Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None  # not Linux, or not allowed: n/a rather than a wrong number
        base = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - base) * 1024


def _proc_status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, Any]:
    """Median wall time of `fn` (which must block until done) and its last output."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), out


@dataclasses.dataclass
class Case:
    """One op measured on both sides; `compare(torch_out, jax_out)` gives the relative error."""

    model: str
    op: str
    torch_fn: Callable[[], Any]
    jax_fn: Callable[..., Any]
    jax_args: tuple[Any, ...]
    compare: Callable[[Any, Any], float]


def bench(case: Case, th: Torch, warmup: int, repeats: int) -> Row:
    start = time.perf_counter()
    compiled = jax.jit(case.jax_fn).lower(*case.jax_args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()  # None where the backend does not say
    run_jax = lambda: jax.block_until_ready(compiled(*case.jax_args))
    jax_ms, jax_out = median_ms(run_jax, warmup, repeats)
    torch_ms, torch_out = median_ms(lambda: th.sync(case.torch_fn()), warmup, repeats)
    torch_extra = th.peak_extra_bytes(case.torch_fn)
    row = Row(case.model, case.op, torch_ms, jax_ms, compile_s,
              mem and mem.argument_size_in_bytes / MIB,
              mem and (mem.temp_size_in_bytes + mem.output_size_in_bytes) / MIB,
              None if torch_extra is None else torch_extra / MIB,
              case.compare(torch_out, jax_out))  # fmt: skip
    print(f"  {row.model} {row.op}: torch {torch_ms:.2f} ms, jax {jax_ms:.2f} ms "
          f"(compile {compile_s:.1f} s), rel err {row.rel_err:.1e}", flush=True)  # fmt: skip
    return row


def save_and_load(model: Any, loader: Callable[..., Any], folder: pathlib.Path) -> tuple:
    """Save the torch model as its library does; load it with ours onto JAX's default device."""
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    module, params = loader(folder)
    return module, jax.device_put(params)


def unet_cases(spec: dict, th: Torch, tmp: pathlib.Path) -> Iterator[Case]:
    cfg, batch = spec["unet"], spec["batch"]
    model = TorchUNet(**cfg)
    module, params = save_and_load(model, weights.load_unet, tmp / "unet")
    model.to(th.device)
    rng = np.random.default_rng(0)
    side = cfg["sample_size"]
    x = rng.standard_normal((batch, side, side, 4)).astype(np.float32)
    ctx = rng.standard_normal((batch, TOKENS, cfg["cross_attention_dim"])).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int32)
    tx, tt, tc = th.tensor(x.transpose(0, 3, 1, 2)), th.tensor(t), th.tensor(ctx)

    def torch_forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(tx, tt, tc).sample

    def jax_forward(p: Any, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        return module.apply({"params": p}, x, t, c)

    compare = lambda ref, ours: rel_err(ours, to_nhwc(ref))
    yield Case("UNet", "forward", torch_forward, jax_forward, (params, x, t, ctx), compare)

    model.requires_grad_(False)
    names = sorted(n for n, _ in model.named_parameters() if TORCH_TRAINABLE.fullmatch(n))
    trainable = [model.get_parameter(n).requires_grad_(True) for n in names]
    paths = [(*weights.torch_key_to_path(n)[:-1], "kernel") for n in names]
    frozen = traverse_util.flatten_dict(params)
    train = {p: frozen.pop(p) for p in paths}

    def torch_grad() -> list[torch.Tensor]:
        for p in trainable:
            p.grad = None
        model(tx, tt, tc).sample.pow(2).mean().backward()
        return [p.grad for p in trainable]

    def jax_grad(train: dict, frozen: dict, x: jax.Array, t: jax.Array, c: jax.Array) -> dict:
        def loss(train: dict) -> jax.Array:
            p = traverse_util.unflatten_dict({**frozen, **train})
            return jnp.mean(module.apply({"params": p}, x, t, c) ** 2)

        return jax.grad(loss)(train)

    def compare_grads(ref: list[torch.Tensor], ours: dict) -> float:
        ours_flat = np.concatenate([np.asarray(ours[p]).T.ravel() for p in paths])
        return rel_err(ours_flat, np.concatenate([g.cpu().numpy().ravel() for g in ref]))

    op = f"fwd+bwd, grads of {len(paths)} attn projections"
    yield Case("UNet", op, torch_grad, jax_grad, (train, frozen, x, t, ctx), compare_grads)


def vae_cases(spec: dict, th: Torch, tmp: pathlib.Path) -> Iterator[Case]:
    cfg = spec["vae"]
    model = TorchVAE(**cfg)
    module, params = save_and_load(model, weights.load_vae, tmp / "vae")
    model.to(th.device)
    side = cfg["sample_size"]
    image = np.random.default_rng(1).uniform(-1, 1, (spec["batch"], side, side, 3))
    image = image.astype(np.float32)
    timage = th.tensor(image.transpose(0, 3, 1, 2))

    def torch_encode() -> torch.Tensor:
        with torch.inference_mode():
            return model.encode(timage).latent_dist.mean

    def jax_encode(p: Any, x: jax.Array) -> jax.Array:
        return module.apply({"params": p}, x, method="encode")[0]

    compare = lambda ref, ours: rel_err(ours, to_nhwc(ref))
    yield Case("VAE", "encode (latent mean)", torch_encode, jax_encode, (params, image), compare)


def clip_cases(spec: dict, th: Torch, tmp: pathlib.Path) -> Iterator[Case]:
    rng = np.random.default_rng(2)
    # SD 1.x's legacy token ids (eos_token_id=2: pool at the largest id), for every size.
    text_cfg = transformers.CLIPTextConfig(**{"vocab_size": 49408, **spec["text"]},
                                           max_position_embeddings=TOKENS, bos_token_id=0,
                                           eos_token_id=2, pad_token_id=1)  # fmt: skip
    vision_cfg = transformers.CLIPVisionConfig(**spec["vision"])
    ids = rng.integers(0, text_cfg.vocab_size, (spec["batch"], TOKENS)).astype(np.int32)
    side = vision_cfg.image_size
    pixels = rng.standard_normal((spec["batch"], side, side, 3)).astype(np.float32)
    towers = [  # name, torch model, our loader, input, torch input, output compared
        ("CLIP text", transformers.CLIPTextModel(text_cfg), weights.load_clip_text, ids,
         th.tensor(ids.astype(np.int64)), "last_hidden_state"),
        ("CLIP vision", transformers.CLIPVisionModelWithProjection(vision_cfg),
         weights.load_clip_vision, pixels, th.tensor(pixels.transpose(0, 3, 1, 2)),
         "image_embeds"),
    ]  # fmt: skip
    for name, model, loader, x, tx, field in towers:
        module, params = save_and_load(model, loader, tmp / name.replace(" ", "_"))
        model.to(th.device)

        def torch_forward(model: Any = model, tx: torch.Tensor = tx, field: str = field) -> Any:
            with torch.inference_mode():
                return getattr(model(tx), field)

        def jax_forward(p: Any, x: jax.Array, module: Any = module, field: str = field) -> Any:
            return getattr(module.apply({"params": p}, x), field)

        compare = lambda ref, ours: rel_err(ours, ref.float().cpu().numpy())
        yield Case(name, f"forward ({field})", torch_forward, jax_forward, (params, x), compare)


def machine(th: Torch) -> str:
    if th.device.type == "cuda":
        return f"{torch.cuda.get_device_name(th.device)}; JAX on {jax.devices()[0].device_kind}"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), torch threads {threads}"


def table(rows: list[Row]) -> str:
    mib = lambda v: "n/a" if v is None else f"{v:.1f}"
    lines = [
        "| model | op | torch ms | jax ms | ratio | jax compile s "
        "| memory MiB: args / jax extra / torch extra | rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = f"{mib(r.args_mib)} / {mib(r.jax_extra_mib)} / {mib(r.torch_extra_mib)}"
        lines.append(
            f"| {r.model} | {r.op} | {r.torch_ms:.2f} | {r.jax_ms:.2f} | "
            f"{r.torch_ms / r.jax_ms:.2f} | {r.compile_s:.1f} | {memory} | {r.rel_err:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, help="timed calls (default: 10 small, 5 sd)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="default: benchmarks/results_<size>.md")
    args = parser.parse_args(argv)
    spec = SIZES[args.size]
    repeats = spec["repeats"] if args.repeats is None else args.repeats
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    # JAX reads this when its backend starts, so setting it after `import jax` still works.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    th = Torch(args.device)
    print(f"{args.size} on {machine(th)}: {args.warmup} warm-up, {repeats} timed calls")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cases in (unet_cases, vae_cases, clip_cases):
            rows += [bench(c, th, args.warmup, repeats) for c in cases(spec, th, pathlib.Path(tmp))]
            gc.collect()  # free this model on both sides before the next is built
            if th.device.type == "cuda":
                torch.cuda.empty_cache()
    report = (
        f"# Model benchmarks: {args.size}\n\n{datetime.date.today()}, {machine(th)}; float32, "
        f"batch {spec['batch']}, jax {jax.__version__}, torch {torch.__version__}. Median of "
        f"{repeats} calls after {args.warmup} warm-up; ratio = torch ms / jax ms (>1: ours is "
        "faster).\n\n" + table(rows) + "\n"
    )
    print("\n" + report)
    out = args.out or pathlib.Path(__file__).parent / f"results_{args.size}.md"
    out.write_text(report)
    print(f"written to {out}")
    bad = [f"{r.model} {r.op} ({r.rel_err:.1e})" for r in rows if r.rel_err > SMALL_TOLERANCE]
    if args.size == "small" and bad:
        print(f"outputs disagree beyond {SMALL_TOLERANCE:g}: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
