"""Type aliases shared across the package."""

import os
from typing import Any

Params = Any  # a nested dict of arrays (a Flax parameter tree)
PathLike = str | os.PathLike  # str, pathlib.Path or etils epath.Path (local or gs://)
