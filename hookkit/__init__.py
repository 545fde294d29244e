"""hookkit: safe, pleasant PyTorch module hooks.

    with hookkit.capture(model, ["conv1", "layer4"]) as cap:
        model(x)
    cap["conv1"]
"""

from ._errors import (
    GradientUnavailableError,
    HookkitError,
    LayerNotFoundError,
    ModifiedInPlaceError,
    NotRecordedError,
    UnsupportedModelError,
)
from ._select import layer_names
from .capture import Capture, Store, capture
from .hooks import Hooks, hooks

__version__ = "0.1.0"

__all__ = [
    "capture",
    "hooks",
    "layer_names",
    "Capture",
    "Store",
    "Hooks",
    "HookkitError",
    "LayerNotFoundError",
    "NotRecordedError",
    "ModifiedInPlaceError",
    "GradientUnavailableError",
    "UnsupportedModelError",
    "__version__",
]
