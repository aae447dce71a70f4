"""Type aliases shared across the package."""

import pathlib
from typing import Any

Params = Any  # a nested dict of arrays (a Flax parameter tree)
PathLike = str | pathlib.Path
