"""hookkit: safe, pleasant PyTorch module hooks.

    with hookkit.capture(model, ["conv1", "layer4"]) as cap:
        model(x)
    cap["conv1"]

This file is the whole public API. The package's map:

    core/        the engine: every hook registration (engine, handles, op taps), layer selection, snapshots,
                 nested outputs, hook census, torch shims, argument checks, stats, atomic file writing
    record/      Capture, the one result type (recording); capture() fills it, load() / merge() make one
    debug/       trace(), check_finite(), summary(), graph()
    extraction/  extract(), length_batches(), load_features(): row stores, token files, ranks, resume, the writer,
                 bfloat16 storage, the loader back for training; feature grids
    monitoring/  monitor(): statistics per step, sinks (JSON Lines, TensorBoard, W&B), plots
    intervene/   hooks(), patch / add / ablate, patching_sweep()
    cli/         the ``hookkit`` command and its loaders of models, images and texts
    _errors.py   every hookkit exception; _version.py the version
"""

from hookkit._errors import (
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
    SampleIndexError,
    SavedCaptureError,
    SummaryError,
    UnsupportedModelError,
    UsageError,
)
from hookkit._version import __version__
from hookkit.core.census import hook_census
from hookkit.core.select import layer_names
from hookkit.debug.graph import AutogradGraph, GraphNode, graph
from hookkit.debug.summary import Summary, SummaryRow, summary
from hookkit.debug.trace import CheckFinite, Trace, TraceEvent, check_finite, trace
from hookkit.extraction.batches import LengthBatches, length_batches
from hookkit.extraction.extract import Features, extract
from hookkit.extraction.grid import feature_grid, save_feature_grid
from hookkit.extraction.load import load_features
from hookkit.intervene.edits import Edit, Edits, ablate, add, edits, patch
from hookkit.intervene.hooks import Hooks, hooks
from hookkit.intervene.sweep import Sweep, patching_sweep
from hookkit.monitoring.monitor import Monitor, monitor
from hookkit.monitoring.plot import plot_run
from hookkit.record.capture import CaptureBlock, capture
from hookkit.record.join import concat_calls
from hookkit.record.merge import merge
from hookkit.record.recording import Capture, Store, load

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
    "load_features",
    "length_batches",
    "monitor",
    "plot_run",
    "load",
    "merge",
    "patching_sweep",
    "feature_grid",
    "save_feature_grid",
    "summary",
    "Capture",
    "CaptureBlock",
    "Store",
    "Hooks",
    "Edit",
    "Edits",
    "Trace",
    "TraceEvent",
    "CheckFinite",
    "AutogradGraph",
    "GraphNode",
    "Features",
    "LengthBatches",
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
    "UsageError",
    "SampleIndexError",
    "__version__",
]
