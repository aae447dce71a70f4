"""Methods as presets over the one trainer: IdFuse, its ablations, and the baselines it is
compared with, all trained, checkpointed, exported, sampled and evaluated by the same code.

  python -m idfuse_jax.train --config configs/tiny.py --workdir runs/db \
      --config.method.preset=disenbooth

A preset says which parts of the method exist; every other field (loss weights, LoRA targets
and rank, optimiser, steps) keeps its meaning and applies to the parts that exist. The name is
stored in the run's config.json, so `sample` and `evaluate` build what was trained (without FFM:
the conditioning path without it). The parts (DESIGN.md §1):

- image_branch: the IEDM adapter f_i = A(E_I(x_i)) added to f_s in training (f_com = f_s + f_i),
  and L2 = cos(pool(f_s), f_i). Without it the training conditioning is f_s alone.
- ffm: the FFM experts on the conditioning (f_r = FFM(f_com)); without it f_com goes to the UNet
  as it is, at training and at inference.
- explicit: explicit decoupling: masks and inpainted backgrounds are prepared, f'_i = E_I(x'_i)
  enters L4 = cos(pool(f_s), f'_i) and, with the image branch, L3 = -cos(f_i, f'_i). Without
  it no photo is segmented or inpainted.
- text_only: DisenBooth's weak denoising with the text-only conditioning (loss.text_only_weight);
  meaningless without the image branch (both paths would be the same).
- text_lora: whether `method.text_lora="auto"` trains text-encoder LoRA.

The ablations follow the paper's wording (arXiv 2505.22360: IEDM = implicit adapter + explicit
inpainting with L2-L4; FFM = the experts on f_com): "w/o explicit decoupling" removes the masks,
inpainting, L3 and L4 but keeps the adapter and L2; "w/o FFM" passes f_s + f_i on without the
experts; "w/o the image branch" removes the adapter and with it L2 and L3, keeping explicit
decoupling's L4 (text against background) and the FFM on f_s. DisenBooth (ICLR 2024, its
published train_disenbooth.py) is the adapter with its mask, L2 and the weak text-only
denoising, no FFM, no L3/L4, UNet LoRA only. DreamBooth-LoRA is LoRA on the plain text
conditioning, optionally with prior preservation (config.prior).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from idfuse_jax.errors import ConfigError

TEXT_LORA_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Which parts of the method a preset trains (see the module docstring)."""

    description: str
    image_branch: bool = True
    ffm: bool = True
    explicit: bool = True
    text_only: bool = True
    text_lora: bool = True

    @property
    def terms(self) -> tuple[str, ...]:
        """The loss terms (`losses.TERMS` names) the method has, in `losses.TERMS` order."""
        present = {
            "denoise": True,
            "text_image": self.image_branch,
            "image_background": self.image_branch and self.explicit,
            "text_background": self.explicit,
        }
        return tuple(name for name, on in present.items() if on)


PRESETS: dict[str, Preset] = {
    "idfuse": Preset("IdFuse: IEDM (adapter + explicit decoupling, L1-L4) and FFM"),
    "idfuse_no_explicit": Preset(
        "IdFuse without explicit decoupling: no masks or inpainting, no L3/L4", explicit=False
    ),
    "idfuse_no_ffm": Preset("IdFuse without FFM: f_s + f_i passed on without experts", ffm=False),
    "idfuse_no_image_branch": Preset(
        "IdFuse without the adapter's image branch: FFM(f_s), L1 and L4",
        image_branch=False,
        text_only=False,
    ),
    "disenbooth": Preset(
        "DisenBooth: adapter with its mask, L2, weak text-only denoising, UNet LoRA",
        ffm=False,
        explicit=False,
        text_lora=False,
    ),
    "dreambooth_lora": Preset(
        "DreamBooth-LoRA: UNet LoRA on the plain text conditioning (prior preservation: "
        "config.prior)",
        image_branch=False,
        ffm=False,
        explicit=False,
        text_only=False,
        text_lora=False,
    ),
}


def get(name: str) -> Preset:
    """The preset called `name`; a ConfigError listing the names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"config.method.preset={name!r} is not one of {list(PRESETS)}")
    return PRESETS[name]


def of(config: ml_collections.ConfigDict) -> Preset:
    """The preset of a config (configs written before presets existed are IdFuse's)."""
    return get(config.method.get("preset", "idfuse"))


def text_lora_targets(config: ml_collections.ConfigDict) -> str:
    """The text-encoder LoRA pattern in effect: method.text_lora_targets, unless
    method.text_lora (or, for "auto", the preset) switches text-encoder LoRA off."""
    choice = config.method.get("text_lora", "auto")
    if choice not in TEXT_LORA_CHOICES:
        raise ConfigError(
            f"config.method.text_lora={choice!r} is not one of {list(TEXT_LORA_CHOICES)}"
        )
    on = of(config).text_lora if choice == "auto" else choice == "on"
    return config.method.text_lora_targets if on else ""


def text_only_weight(config: ml_collections.ConfigDict) -> float:
    """loss.text_only_weight where the method has the weak text-only denoising, else 0."""
    return float(config.loss.text_only_weight) if of(config).text_only else 0.0


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse combinations a preset cannot train (one line naming the fields)."""
    preset = of(config)
    text_lora_targets(config)
    name = config.method.preset
    if config.method.background == "explicit" and not (preset.image_branch and preset.explicit):
        raise ConfigError(
            f"config.method.background='explicit' needs the image branch and explicit "
            f"decoupling, which config.method.preset={name!r} has not"
        )
    if config.prior.class_images and not config.prior.prompt:
        raise ConfigError("config.prior.class_images > 0 needs config.prior.prompt")
