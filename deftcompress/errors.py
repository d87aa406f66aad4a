"""User-facing errors: the CLI prints them as one line, without a traceback."""


class DeftcompressError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""

    exit_code = 1


class RecipeError(DeftcompressError):
    """A recipe (or a config built in Python) is invalid. Raised before any model loads."""

    exit_code = 2


class RecipeErrors(RecipeError):
    """Several independent problems of one recipe, found in one pass over it (`validate` prints each on its line;
    elsewhere the first is shown with a count of the rest)."""

    def __init__(self, errors: list[RecipeError]):
        self.errors = list(errors)
        more = len(self.errors) - 1
        super().__init__(str(self.errors[0]) + (f" (and {more} more problem{'s' if more > 1 else ''}: "
                                                 "`deftcompress validate` lists them all)" if more else ""))


def raise_all(errors: list[RecipeError]) -> None:
    """Raise the problems found, one as itself, several together."""
    flat = [e for error in errors for e in (error.errors if isinstance(error, RecipeErrors) else [error])]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise RecipeErrors(flat)


class ArchitectureError(DeftcompressError):
    """The model family is not in the architecture table, or a module is missing."""


class DataError(DeftcompressError):
    """A data file or data set is missing or malformed (bad input: exit 2)."""

    exit_code = 2


class CheckpointError(DeftcompressError):
    """A model checkpoint is missing, incomplete or not in safetensors format (bad input: exit 2)."""

    exit_code = 2
