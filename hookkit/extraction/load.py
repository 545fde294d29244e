"""``load_features(out)``: the ``Features`` of a finished ``extract(..., out=out)``, opened without the model.

It reads the folder's ``manifest.json`` (``extraction.manifest``) and opens the files as ``extract()`` does when a
finished run is called again (``extraction.npyfolder.open_finished``: the same layers in the same order, arrays,
offsets, manifest). An unfinished folder is refused with what is missing and how to finish it: the ``hookkit extract``
command line that wrote it (recorded in the manifest as ``"command"``), or the ``hookkit.extract(...)`` call its
settings describe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hookkit._errors import ExtractError
from hookkit.core import check as _check
from hookkit.extraction.manifest import MANIFEST, read_manifest, rows_written
from hookkit.extraction.npyfolder import open_finished
from hookkit.extraction.rowstore import Features

__all__ = ["load_features"]


def load_features(out: str | os.PathLike) -> Features:
    """The features a finished ``hookkit.extract(..., out=out)`` wrote, without the model or the data.

    Examples:
        >>> import tempfile, torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> folder = tempfile.mkdtemp()
        >>> _ = hookkit.extract(model, ["1"], [torch.randn(3, 4)], out=folder, progress=False)
        >>> hookkit.load_features(folder)["1"].shape
        (3, 8)

    Args:
        out: the folder given to ``extract(..., out=...)`` (or ``hookkit extract --out``).

    Returns:
        ``Features``, the same as the run that wrote the folder returned: the same layers in the same order,
        ``feats[layer]`` (a read-only numpy memmap), ``feats.torch(layer)``, ``feats.offsets(layer)`` of a ragged
        layer, ``feats.manifest`` and ``feats.path(layer)``.

    Raises:
        ExtractError: ``out`` is not an extraction folder (no ``manifest.json``), or its extraction is not finished
            (the message says how many rows are written and gives the ``hookkit.extract(...)`` call or the
            ``hookkit extract`` command to run again to finish it), or a finished file is missing or was changed.
    """
    _check.path("hookkit.load_features", "out", out)
    folder = Path(out)
    shown = str(os.fspath(out))
    if not folder.is_dir():
        what = "a file" if folder.exists() else "missing"
        raise ExtractError(f"out={shown!r} is {what}, not an extraction folder: pass the folder that "
                           "hookkit.extract(..., out=DIR) or `hookkit extract --out DIR` wrote.")
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / "progress").is_dir():
            raise ExtractError(f"{shown!r} holds no {MANIFEST}: the extraction into it stopped before its first "
                               "batch was written. To finish it, run the same hookkit.extract(...) call (the same "
                               f"model, layers, data and options) again with out={shown!r}.")
        raise ExtractError(f"{shown!r} holds no {MANIFEST}, so it is not an extraction folder: pass the folder that "
                           "hookkit.extract(..., out=DIR) or `hookkit extract --out DIR` wrote.")
    try:
        layers = [str(n) for n in manifest["settings"]["layers"]]
        finished = bool(manifest.get("complete"))
    except (KeyError, TypeError):
        raise ExtractError(f"{folder / MANIFEST} is not a hookkit manifest (it names no layers): pass the folder "
                           "that hookkit.extract(..., out=DIR) wrote.") from None
    if not finished:
        written, _ = rows_written(folder)
        samples = (manifest.get("data") or {}).get("samples")
        of = f" of {samples}" if samples is not None else ""
        raise ExtractError(f"the extraction in {shown!r} is not finished: {written}{of} rows are written, and its "
                           f"files are still .partial. To finish it (only the missing rows are computed), "
                           f"{_how_to_run(manifest, shown)}")
    try:
        return open_finished(folder, manifest, layers)
    except ExtractError as exc:
        raise ExtractError(f"{exc} {_how_to_run(manifest, shown, again=True)}") from None


def _how_to_run(manifest: dict[str, Any], out: str, *, again: bool = False) -> str:
    """How to run the extraction that wrote ``manifest`` again: the command line it records, or the
    ``hookkit.extract`` call its settings describe (``again``: after the folder was deleted)."""
    command = manifest.get("command")
    if isinstance(command, dict) and command.get("line"):
        where = f" in {command['cwd']}" if command.get("cwd") else ""
        if again:
            return f"It was written by this command (run{where}): {command['line']}"
        return f"run the command that wrote it again{where}: {command['line']}"
    call = _call(manifest.get("settings", {}), out)
    model = (manifest.get("settings", {}).get("model") or {}).get("class", "?")
    data = (manifest.get("data") or {}).get("samples")
    same = f"with the same model (a {model}) and the same data" + (f" ({data} samples)" if data is not None else "")
    if again:
        return f"It was written by {call}, {same}."
    return f"run the same call again with this folder as out=: {call}, {same}."


def _call(settings: dict[str, Any], out: str) -> str:
    """``hookkit.extract(model, layers, data, out=..., <the options that were not the defaults>)``."""
    parts = ["model", repr(list(settings.get("layers", []))), "data", f"out={out!r}"]
    for option in ("pool", "select", "dtype", "mask", "dataset_id"):
        value = settings.get(option)
        if value is not None:
            parts.append(f"{option}={_shown(value)}")
    if settings.get("stop") is False:
        parts.append("stop=False")
    return f"hookkit.extract({', '.join(parts)})"


def _shown(value: Any) -> str:
    """An option as the manifest describes it (``extraction.fingerprint.describe_option``), written as Python."""
    if isinstance(value, dict) and "callable" in value:
        return f"<{value['callable']}>"  # a callable, kept by name and code digest
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value.startswith("torch."):
        return value  # a dtype: torch.bfloat16
    return repr(value)
