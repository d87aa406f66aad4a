"""Built-in passes, one module each. Importing this package registers them."""

from . import evaluate  # noqa: F401
