"""Personalise a Stable Diffusion model on one subject with IEDM + FFM.

  python -m idfuse_jax.train --config configs/tiny.py --workdir runs/tiny
  python -m idfuse_jax.train --config configs/dog.py --workdir runs/dog --config.train.steps=500

Rerunning the same command resumes from the latest checkpoint in WORKDIR/checkpoints.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from idfuse_jax import cli, train_lib

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and weights go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax (and fsspec for gs:// files) log every file at INFO; keep warnings, drop the chatter.
    chatty = ("/orbax/", "/fsspec/", "/gcsfs/")
    std_logging.getLogger("absl").addFilter(
        lambda record: (
            record.levelno >= std_logging.WARNING
            or not any(part in record.pathname for part in chatty)
        )
    )
    cli.run_or_fail(train_lib.train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
