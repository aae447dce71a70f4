"""Sample a subject trained with idfuse_jax in PyTorch, with a diffusers StableDiffusionPipeline.

  python examples/diffusers_sample.py --pipeline weights/sd21-base --workdir runs/dog \
      --prompt "a sks dog in the snow" --out dog.png [--reference photo.jpg \
      --image_encoder weights/clip-vit-h-14]

A training run leaves two files in its workdir:
  idfuse_lora.safetensors     UNet and text-encoder LoRA in diffusers' format, for
                              `pipe.load_lora_weights` (rank and alpha in its metadata);
  idfuse_weights.safetensors  everything trained, among it the adapter and FFM (`idfuse.*`).
diffusers knows nothing of the FFM, so the prompt embeddings are built here and passed in:
prompt_embeds = FFM(text_encoder(prompt)) and negative_prompt_embeds = FFM(text_encoder("")),
as idfuse_jax's sampler conditions the UNet (with `--reference`, the background-preserving
variant: FFM(text_encoder(prompt) + A(E_I(reference)))). The adapter A and the FFM are a few
lines of torch below, reading the exported tensors (Flax layout: Dense kernels are [in, out]).

Needs torch, diffusers, transformers (`pip install -e '.[test]'`), not idfuse_jax's JAX code.
`--reference` embeds the photo with transformers' CLIPImageProcessor, whose resampling differs
slightly from idfuse_jax's own preprocessing.
"""

from __future__ import annotations

import json
import pathlib

import torch
from absl import app, flags
from safetensors.torch import load_file

from idfuse_jax.cli import fail, parse_flags

LORA_FILE = "idfuse_lora.safetensors"
WEIGHTS_FILE = "idfuse_weights.safetensors"


class IdFuse:
    """The trained IEDM adapter and FFM, from the `idfuse.*` tensors of idfuse_weights."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = {k.removeprefix("idfuse."): v.float() for k, v in tensors.items()
                  if k.startswith("idfuse.")}  # fmt: skip
        # Presets without FFM (idfuse_no_ffm, disenbooth, dreambooth_lora) store none: then
        # the conditioning goes to the UNet as it is.
        self.has_ffm = "ffm.w_in" in self.t

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> IdFuse:
        return cls(load_file(str(path)))

    def _dense(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.t[f"{name}.kernel"] + self.t[f"{name}.bias"]

    def adapt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """A(f) = MLP(σ(m)⊙f) + σ(m)⊙f, then the projection to the text width if there is one."""
        gated = torch.sigmoid(self.t["adapter.mask"]) * image_embeds.float()
        out = self._dense(torch.relu(self._dense(gated, "adapter.fc1")), "adapter.fc2") + gated
        return self._dense(out, "adapter.proj") if "adapter.proj.kernel" in self.t else out

    def ffm(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k softmax(router(x))_k (x + MLP_k(x)) per token, for x [B, T, D] (x without FFM)."""
        x = x.float()
        if not self.has_ffm:
            return x
        w = torch.softmax(self._dense(x, "ffm.router"), dim=-1)  # [B, T, K]
        hidden = torch.nn.functional.gelu(
            torch.einsum("btd,kdh->btkh", x, self.t["ffm.w_in"]) + self.t["ffm.b_in"]
        )
        mixed = torch.einsum("btkh,khd->btd", w[..., None] * hidden, self.t["ffm.w_out"])
        return x + mixed + w @ self.t["ffm.b_out"]


def load_trained(pipe, workdir: str | pathlib.Path) -> IdFuse:
    """Load a workdir's LoRA into `pipe` (UNet and text encoder) and return its adapter/FFM."""
    workdir = pathlib.Path(workdir)
    pipe.load_lora_weights(str(workdir), weight_name=LORA_FILE)
    return IdFuse.from_file(workdir / WEIGHTS_FILE)


@torch.no_grad()
def prompt_embeds(
    pipe, idfuse: IdFuse, prompts: list[str], reference_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """FFM(E_T(prompt)) [B, 77, D], or FFM(E_T(prompt) + A(reference_embeds)) given [1, D_img]."""
    ids = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    features = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float()
    if reference_embeds is not None:
        features = features + idfuse.adapt(reference_embeds.to(features.device))[:, None, :]
    return idfuse.ffm(features).to(pipe.unet.dtype)


@torch.no_grad()
def reference_image_embeds(image_encoder_folder: str, photo: str) -> torch.Tensor:
    """E_I(photo): CLIP image_embeds [1, D_img] from a CLIPVisionModelWithProjection or CLIPModel
    folder."""
    import transformers
    from PIL import Image

    config = transformers.CLIPVisionConfig.from_pretrained(image_encoder_folder)
    top = json.loads((pathlib.Path(image_encoder_folder) / "config.json").read_text())
    if "vision_config" in top:  # a CLIPModel: its visual projection has the top-level width
        config.projection_dim = top.get("projection_dim", config.projection_dim)
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(
        image_encoder_folder, config=config
    )
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": encoder.config.image_size},
        crop_size={"height": encoder.config.image_size, "width": encoder.config.image_size},
    )
    with Image.open(photo) as image:
        pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    return encoder(pixel_values=pixels).image_embeds


def generate(pipe, idfuse: IdFuse, prompt: str, *, reference_embeds=None, negative: str = "",
             **kwargs):  # fmt: skip
    """pipe(...) with the FFM conditioning; kwargs go to the pipeline (num_inference_steps, ...)."""
    cond = prompt_embeds(pipe, idfuse, [prompt], reference_embeds)
    uncond = prompt_embeds(pipe, idfuse, [negative])
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **kwargs).images


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that importing this
    module next to other absl programs defines nothing)."""
    flags.DEFINE_string(
        "pipeline", None, "The diffusers pipeline folder the subject was trained on."
    )
    flags.DEFINE_string("workdir", None, "The training workdir (idfuse_lora/idfuse_weights files).")
    flags.DEFINE_string("prompt", None, "The prompt, with the subject's token (e.g. 'a sks dog').")
    flags.DEFINE_string("reference", None, "Optional photo whose background the images keep.")
    flags.DEFINE_string("image_encoder", None, "The CLIP image-encoder folder (with --reference).")
    flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
    flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance.")
    flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
    flags.DEFINE_string("out", "sample.png", "Output PNG.")
    flags.mark_flags_as_required(["pipeline", "workdir", "prompt"])


def main(argv: list[str]) -> None:
    del argv
    import diffusers

    if flags.FLAGS.reference and not flags.FLAGS.image_encoder:
        fail("--reference needs --image_encoder (the CLIP folder the run trained with)")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(flags.FLAGS.pipeline,
                                                             safety_checker=None)  # fmt: skip
    idfuse = load_trained(pipe, flags.FLAGS.workdir)
    reference = None
    if flags.FLAGS.reference:
        reference = reference_image_embeds(flags.FLAGS.image_encoder, flags.FLAGS.reference)
    (image,) = generate(
        pipe,
        idfuse,
        flags.FLAGS.prompt,
        reference_embeds=reference,
        num_inference_steps=flags.FLAGS.num_steps,
        guidance_scale=flags.FLAGS.guidance_scale,
        generator=torch.Generator().manual_seed(flags.FLAGS.seed),
    )
    image.save(flags.FLAGS.out)
    print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
