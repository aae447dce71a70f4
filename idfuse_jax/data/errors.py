"""The one error type of the data side."""


class DataError(ValueError):
    """Bad input data; the one-line message names the file or folder at fault."""
