"""What every command line (train, sample, prepare, evaluate) shares: absl flag parsing and
bad input turned into one line on stderr and `EXIT_USER_ERROR`, with no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

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
