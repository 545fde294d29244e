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
    NonFiniteError,
    NotRecordedError,
    UnsupportedModelError,
)
from ._select import layer_names
from .capture import Capture, Store, capture
from .graph import AutogradGraph, GraphNode, graph
from .hooks import Hooks, hooks
from .summary import Summary, SummaryError, SummaryRow, summary
from .trace import CheckFinite, Trace, TraceEvent, check_finite, trace

__version__ = "0.1.0"

__all__ = [
    "capture",
    "hooks",
    "layer_names",
    "trace",
    "check_finite",
    "graph",
    "summary",
    "Capture",
    "Store",
    "Hooks",
    "Trace",
    "TraceEvent",
    "CheckFinite",
    "AutogradGraph",
    "GraphNode",
    "Summary",
    "SummaryRow",
    "HookkitError",
    "LayerNotFoundError",
    "NotRecordedError",
    "ModifiedInPlaceError",
    "GradientUnavailableError",
    "UnsupportedModelError",
    "NonFiniteError",
    "SummaryError",
    "__version__",
]
