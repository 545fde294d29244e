"""hookkit's exception classes: one base class, a few precise subclasses."""

from __future__ import annotations

from typing import Any

__all__ = [
    "HookkitError",
    "LayerNotFoundError",
    "NotRecordedError",
    "ModifiedInPlaceError",
    "GradientUnavailableError",
    "UnsupportedModelError",
    "NonFiniteError",
    "ExtractError",
    "SummaryError",
    "ModelSpecError",
    "ImageFolderError",
    "CommandLineError",
    "EditError",
    "SavedCaptureError",
    "PlotError",
    "ArgumentError",
    "ArgumentTypeError",
    "UsageError",
    "SampleIndexError",
]


class HookkitError(Exception):
    """Base class of every error hookkit raises on its own account."""


class ArgumentError(HookkitError, ValueError):
    """An argument of a public function (or a command-line option) whose value cannot work; the message names the
    parameter, the value given, what is accepted and the fix. Raised before anything is changed."""


class ArgumentTypeError(HookkitError, TypeError):
    """An argument of a public function of a type it does not take; the message names the parameter, the type given
    and the types accepted. Raised before anything is changed."""


class LayerNotFoundError(HookkitError, LookupError):
    """A layer spec (name, glob, class or predicate) matched no module of the model."""


class NotRecordedError(HookkitError, KeyError):
    """A value was asked for that the capture did not record (layer never ran, no backward...)."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class UsageError(HookkitError, RuntimeError):
    """A hookkit object used out of order: a ``with`` block entered twice, ``step()`` outside its block, a sink
    written after ``close()``; the message says what to call instead."""


class SampleIndexError(HookkitError, IndexError):
    """A sample index outside the rows a ``Features`` holds; the message gives the valid range."""


class ModifiedInPlaceError(HookkitError, RuntimeError):
    """A stored tensor was changed in place after capture, so it no longer holds what the layer produced."""


class GradientUnavailableError(HookkitError, RuntimeError):
    """hookkit could not isolate a gradient (e.g. a module modified its own input in place twice)."""


class UnsupportedModelError(HookkitError, TypeError):
    """The model is of a kind whose module hooks torch does not run (TorchScript, compiled)."""


class NonFiniteError(HookkitError, FloatingPointError):
    """A module produced NaN or Inf: ``layer``, ``phase`` (``"forward"`` / ``"backward"``), ``call`` (which call
    of the layer in its forward of the model, from 0; the message names it as FX does: ``relu_1`` for call 1) and
    the ``stats`` of the offending tensor tell where and what; ``rank``: under ``torch.distributed``, the rank whose
    data made it (``monitor`` raises it on every rank together), else None."""

    def __init__(self, message: str, *, layer: str, phase: str, call: int, stats: Any,
                 rank: int | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.phase = phase
        self.call = call
        self.stats = stats
        self.rank = rank


class ExtractError(HookkitError, RuntimeError):
    """Extraction could not go on: bad data, a batch the model rejects, an output folder that does not fit."""

class SummaryError(HookkitError, RuntimeError):
    """The model's forward raised during ``summary()``; the message names the module it failed in."""

class ModelSpecError(HookkitError, ValueError):
    """A model spec or weights file that cannot be turned into an ``nn.Module``."""

class ImageFolderError(HookkitError, ValueError):
    """An image folder could not be used: missing, empty, unreadable, or holding an image that does not decode."""

class CommandLineError(HookkitError, ValueError):
    """A command-line value that cannot work (an --out that is a file, an input too large for memory); the message
    names the option, what was wrong and the fix."""


class PlotError(HookkitError, ValueError):
    """A monitor run that cannot be read (no such run, an empty or unreadable file) or a statistic it does not
    hold; the message names what was found and the fix."""


class EditError(HookkitError, RuntimeError):
    """An edit (``hookkit.patch`` / ``add`` / ``ablate``) that cannot apply: a value whose shape does not fit the
    layer's output, or an edit whose layer (or call) never ran inside its block; the message names the layer, the
    shapes or the calls seen, and the fix."""


class SavedCaptureError(HookkitError, ValueError):
    """A capture file that cannot be written or read (no such file or folder, truncated or corrupted, not written by
    hookkit, of a newer format) or a tensor that a capture file cannot hold; the message names the path or layer."""


for _cls in (HookkitError, LayerNotFoundError, NotRecordedError, ModifiedInPlaceError, GradientUnavailableError,
             UnsupportedModelError, NonFiniteError, ExtractError, SummaryError, ModelSpecError, ImageFolderError,
             CommandLineError, PlotError, EditError, SavedCaptureError, ArgumentError, ArgumentTypeError, UsageError,
             SampleIndexError):
    _cls.__module__ = "hookkit"  # tracebacks say hookkit.NonFiniteError, the name users import
