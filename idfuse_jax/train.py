"""Personalise a Stable Diffusion model on one subject with IEDM + FFM.

  python -m idfuse_jax.train --config configs/tiny.py --workdir runs/tiny
  python -m idfuse_jax.train --config configs/dog.py --workdir runs/dog --config.train.steps=500

Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from idfuse_jax import errors, train_lib

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and weights go.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with bad --config overrides as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for a key the (locked) config does not have.
        key = str(e).strip("\"'")
        print(
            f"error: unknown config key {key!r} in a --config override; "
            "configs/default.py lists every field",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    except (TypeError, ValueError) as e:
        print(f"error: bad --config override: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax logs every file it writes at INFO; keep its warnings, drop the chatter.
    std_logging.getLogger("absl").addFilter(
        lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
    )
    try:
        train_lib.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except errors.USER_ERRORS as e:
        # Bad input, not a bug: one line naming the culprit, no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
