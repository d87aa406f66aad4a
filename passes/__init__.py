"""Built-in passes, one module each. Importing this package registers them."""

from . import evaluate  # noqa: F401
from . import ada_deft, deft  # noqa: F401
from . import depth_prune, magnitude_prune, structured_prune, quantize  # noqa: F401
from . import onnx_export  # noqa: F401
from . import activation_threshold, relufy  # noqa: F401
