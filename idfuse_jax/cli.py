"""What every command line (train, sample, prepare, evaluate) shares: absl flag parsing and
bad input turned into one line on stderr and `EXIT_USER_ERROR`, with no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from absl import flags

from idfuse_jax.config_lib import renamed_key_message
from idfuse_jax.errors import EXIT_USER_ERROR, UserError

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """One line `error: message` on stderr, then exit with `EXIT_USER_ERROR`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_or_fail(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs); a `UserError` becomes `fail(...)`, anything else keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e))


# The flags `evaluate` and `compare` share: the metric models and how the images are drawn.
EVALUATION_FLAGS = ("dino", "clip", "num_images", "num_steps", "guidance_scale", "seed",
                    "max_prompts", "batch_size")  # fmt: skip


def define_evaluation_flags() -> None:
    """Define `EVALUATION_FLAGS`. --dino and --clip are checked by `evaluation.run.evaluate`
    (optional with --toybench, whose ground-truth scores need neither)."""
    flags.DEFINE_string("dino", None, "A transformers ViTModel folder (facebook/dino-vits16).")
    flags.DEFINE_string(
        "clip", None, "A transformers CLIPModel folder (openai/clip-vit-base-patch32)."
    )
    flags.DEFINE_integer("num_images", 4, "Images per prompt (the protocol: 4).")
    flags.DEFINE_integer("num_steps", None, "Sampler steps (default: each run's sample.num_steps).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance (default: each run's).")
    flags.DEFINE_integer("seed", 0, "Seed from which every image's own seed is derived.")
    flags.DEFINE_integer("max_prompts", None, "Only the first N prompts (default: all 25).")
    flags.DEFINE_integer("batch_size", 4, "Images generated per device per batch.")


def evaluation_flag_values() -> dict[str, Any]:
    """{name: value} of `EVALUATION_FLAGS`, as `evaluation.run.evaluate` takes them."""
    return {name: flags.FLAGS[name].value for name in EVALUATION_FLAGS}


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or `--config` override as one line, not a traceback.

    Pass as `app.run(main, flags_parser=parse_flags)`.
    """
    for arg in argv[1:]:
        if arg.startswith("--config."):
            message = renamed_key_message(arg[len("--config.") :].split("=", 1)[0])
            if message:
                fail(f"{message} (in {arg})")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key the (locked) config does not have.
        key = str(e).strip("\"'")
        fail(
            f"unknown config key {key!r} in a --config override; configs/default.py lists "
            "every field"
        )
    except (TypeError, ValueError) as e:
        fail(f"bad --config override: {e}")
