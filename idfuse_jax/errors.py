"""The errors that mean bad input, not a bug: the bottom of the package (it imports nothing).

Every module raises one of these for input a user can fix (a config value, a photo, a weights
folder) or for a diverged run. Command-line programs print a `UserError` as one line on stderr
and exit with `EXIT_USER_ERROR` (`idfuse_jax.cli`); anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 1


class UserError(ValueError):
    """Bad input or a diverged run; the one-line message names the culprit."""


class ConfigError(UserError):
    """A config key or value, or a combination of options and shapes, that cannot work."""


class DataError(UserError):
    """Bad input data: a photo, mask or folder; the message names the file or folder."""


class WeightsError(UserError):
    """A checkpoint folder (config.json, safetensors, tokenizer, scheduler) we cannot load."""


class NonFiniteError(UserError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""
