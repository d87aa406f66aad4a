"""User-facing errors: the CLI prints them as one line, without a traceback."""


class DeftcompressError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""

    exit_code = 1


class RecipeError(DeftcompressError):
    """A recipe (or a config built in Python) is invalid. Raised before any model loads."""

    exit_code = 2


class ArchitectureError(DeftcompressError):
    """The model family is not in the architecture table, or a module is missing."""


class DataError(DeftcompressError):
    """A data file or data set is missing or malformed (bad input: exit 2)."""

    exit_code = 2


class CheckpointError(DeftcompressError):
    """A model checkpoint is missing, incomplete or not in safetensors format (bad input: exit 2)."""

    exit_code = 2
