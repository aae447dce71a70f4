"""The errors that mean bad input (config, data, weights, mesh) or a diverged run, not a bug.

Command-line programs print these as one line and exit non-zero; anything else is a bug and keeps
its traceback.
"""

from idfuse_jax.config_lib import ConfigError
from idfuse_jax.data.errors import DataError
from idfuse_jax.diffusion import ScheduleConfigError
from idfuse_jax.models.clip import ModelConfigError
from idfuse_jax.models.lora import LoRAError
from idfuse_jax.sharding import MeshError
from idfuse_jax.tokenizer import TokenizerError
from idfuse_jax.weights import WeightsError


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


USER_ERRORS = (
    ConfigError,
    DataError,
    LoRAError,
    MeshError,
    ModelConfigError,
    ScheduleConfigError,
    TokenizerError,
    WeightsError,
    NonFiniteError,
)
