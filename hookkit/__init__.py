"""hookkit: safe, pleasant PyTorch module hooks.

    with hookkit.capture(model, ["conv1", "layer4"]) as cap:
        model(x)
    cap["conv1"]
"""

__version__ = "0.1.0"

from ._capture import Capture, Store, capture, concat_calls
from ._census import hook_census
from ._edits import Edits, ablate, add, edits, patch
from ._errors import (
    ArgumentError,
    ArgumentTypeError,
    CommandLineError,
    EditError,
    ExtractError,
    GradientUnavailableError,
    HookkitError,
    ImageFolderError,
    LayerNotFoundError,
    ModelSpecError,
    ModifiedInPlaceError,
    NonFiniteError,
    NotRecordedError,
    PlotError,
    SavedCaptureError,
    SummaryError,
    UnsupportedModelError,
)
from ._extract import Features, extract
from ._graph import AutogradGraph, GraphNode, graph
from ._grid import feature_grid, save_feature_grid
from ._hooks import Hooks, hooks
from ._monitor import Monitor, monitor
from ._plot import plot_run
from ._saved import ReadOnlyCapture, load, merge
from ._select import layer_names
from ._summary import Summary, SummaryRow, summary
from ._sweep import Sweep, patching_sweep
from ._trace import CheckFinite, Trace, TraceEvent, check_finite, trace

__all__ = [
    "capture",
    "hooks",
    "edits",
    "patch",
    "add",
    "ablate",
    "layer_names",
    "hook_census",
    "concat_calls",
    "trace",
    "check_finite",
    "graph",
    "extract",
    "monitor",
    "plot_run",
    "load",
    "merge",
    "patching_sweep",
    "feature_grid",
    "save_feature_grid",
    "summary",
    "Capture",
    "Store",
    "ReadOnlyCapture",
    "Hooks",
    "Edits",
    "Trace",
    "TraceEvent",
    "CheckFinite",
    "AutogradGraph",
    "GraphNode",
    "Features",
    "Monitor",
    "Sweep",
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
    "ExtractError",
    "ModelSpecError",
    "ImageFolderError",
    "CommandLineError",
    "PlotError",
    "EditError",
    "SavedCaptureError",
    "ArgumentError",
    "ArgumentTypeError",
    "__version__",
]
