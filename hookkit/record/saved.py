"""Captures on disk: ``write(recording, path)`` writes one ``.safetensors`` file (``Capture.save``), ``read(path)``
reads the ``Recording`` back (``hookkit.load`` wraps it in a ``Capture``). This module reads and writes files and
checks what a caller passed; ``record.encode`` turns values into the manifest, ``record.decode`` turns it back.

The seams: a capture (``record.recording.Capture``) reads a ``Recording`` of ``Call`` records (``core.engine``).
Saving walks that recording (nested values through ``core.tree``, in-place edits checked through
``core.snapshot.check_guards``, as a read would), and loading builds a new ``Recording`` of ``Call`` records that the
very same capture class reads: a loaded capture answers ``cap[name]``, ``cap.calls(name)``, ``cap.inputs`` ...
exactly as the live one did. This module imports nothing of ``record.recording``: the dependency runs one way.

The file: the tensors, contiguous and on the CPU, under keys ``"<layer>/<kind>/<call>/<i>"`` (one key for a tensor
stored in several places), and in the safetensors header's metadata, under ``"hookkit"``, a JSON manifest
(``record.encode.FORMAT``; its SHA-256 under ``"hookkit.sha256"``) that holds the SHA-256 of each tensor's bytes
(``"sha256"``: key -> hex digest; safetensors itself checks no data) and, per layer and kind, each call's nested
structure: containers as ``{"type": "tuple" | "list" | "namedtuple" | "dict" | "dataclass", ...}`` (with ``"module"``
and ``"qualname"`` of their class where it is not a plain tuple, list or dict), tensors as ``{"type": "tensor", "key",
"dtype", "shape"}``, enum members as ``{"type": "enum", "module", "qualname", "name"}`` (a file that holds one is of
format 2, which older hookkits refuse with "upgrade"), and numbers, strings, booleans and None as themselves; per layer,
``"forward"`` holds the number of the model's forward each call ran in (what ``cap[name]`` reads: the first call of the
last forward). safetensors is optional (``pip install 'hookkit[save]'``): it is imported only when a capture is saved or
loaded.

A file to load is untrusted input: ``record.manifest`` bounds the manifest's nesting before it is parsed and checks
every node before anything is built from it (``save`` runs the same check, so it never writes what ``load`` refuses),
and ``record.classes`` rebuilds the classes it names without importing a module or running a class's code.
"""


from __future__ import annotations

import hashlib
import json
import os
import reprlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hookkit._errors import ArgumentError, ArgumentTypeError, SavedCaptureError
from hookkit._version import __version__
from hookkit.core.engine import Recording
from hookkit.core.fs import replace_file
from hookkit.record.classes import Classes
from hookkit.record.decode import Decoder, rebuild
from hookkit.record.encode import FORMAT, Encoder, FileTensors, digest, manifest
from hookkit.record.manifest import Malformed, TooLarge, check, parse

__all__ = ["write", "read"]

_INSTALL = "pip install 'hookkit[save]'"


def _safetensors() -> Any:
    """``safetensors.torch`` and ``safe_open``, imported now: safetensors is an optional dependency."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"saving and loading captures needs safetensors, which is not installed: {_INSTALL}") \
            from exc
    return safetensors


def write(rec: Recording, path: str | os.PathLike[str]) -> None:
    """Write ``rec`` to one ``.safetensors`` file at ``path``: under a temporary name in the same folder, synced, then
    renamed over ``path`` (``core.fs.replace_file``), so a file already at ``path`` is replaced whole or left as it
    was, never half-written. ``Capture.save`` documents what is kept and what is raised."""
    target = Path(os.fspath(path))
    folder = target.parent
    if not folder.is_dir():
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: the folder {str(folder)!r} does not "
                                "exist. Create it first (os.makedirs(folder, exist_ok=True)).")
    if target.is_dir():
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: that is a folder; give a file name, "
                                "e.g. os.path.join(folder, 'capture.safetensors').")
    st = _safetensors()
    files = FileTensors(st)
    enc = Encoder(files)
    found = manifest(rec, enc, files)
    if enc.not_saved:
        shown = "; ".join(enc.not_saved[:5]) + ("; ..." if len(enc.not_saved) > 5 else "")
        warnings.warn(f"{len(enc.not_saved)} value(s) in the capture are not tensors, containers, numbers, strings, "
                      f"dtypes, devices or enum members, and are saved as hookkit NotSaved placeholders: {shown}",
                      stacklevel=3)
    found["sha256"] = {key: digest(t) for key, t in files.tensors.items()}
    try:  # what load checks, so that every file save writes loads
        check(found)
    except TooLarge as exc:
        raise SavedCaptureError(f"cannot save the capture to {str(target)!r}: it holds what a capture file does not "
                                f"({exc}); leave that layer out. Nothing was written.") from None
    text = json.dumps(found, separators=(",", ":"), allow_nan=False)
    metadata = {"format": "pt", "hookkit": text, "hookkit.sha256": hashlib.sha256(text.encode()).hexdigest()}
    _write_atomically(st, files.tensors, metadata, target)

def _write_atomically(st: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> None:
    try:
        replace_file(target, lambda tmp: st.torch.save_file(tensors, str(tmp), metadata=metadata))
    except (OSError, st.SafetensorError) as exc:
        raise SavedCaptureError(f"could not save the capture to {str(target)!r}: {exc}. Any file that was "
                                "there before is unchanged.") from exc



def read(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True,
         classes: Iterable[type] = ()) -> tuple[Recording, str]:
    """The recording in the file at ``path``, and the path as messages show it; ``hookkit.load`` documents the
    arguments, what comes back and what is raised. Warns (for ``load``'s caller) where a class is not rebuilt."""
    file, shown = _load_path(path)
    target = _load_device(device)
    if not isinstance(verify, bool):
        raise ArgumentTypeError(f"hookkit.load: verify must be True or False, got {type(verify).__name__} "
                                f"{verify!r}.")
    allowed = _load_classes(classes)
    if not file.exists():
        raise SavedCaptureError(f"cannot load a capture from {shown}: no such file.")
    if file.is_dir():
        raise SavedCaptureError(f"cannot load a capture from {shown}: that is a folder, not a file.")
    st = _safetensors()
    try:  # read and checked on the CPU, where the bytes are, then moved
        with st.safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            manifest = _read_manifest(metadata, shown, len(keys))
            tensors = {key: f.get_tensor(key) for key in keys}
    except (st.SafetensorError, OSError, UnicodeDecodeError) as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: it is not a readable safetensors file; it is "
                                f"truncated, corrupted, or of another format (safetensors says: {exc}).") from exc
    if verify:
        _check_digests(manifest, tensors, shown)
    if target.type != "cpu":
        tensors = {key: t.to(target) for key, t in tensors.items()}
    dec = Decoder(tensors, Classes(allowed))
    try:
        rec = rebuild(manifest, dec)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not fit the file "
                                f"({exc}); the file is corrupted.") from None
    refused = dec.classes.refused
    if refused:
        shown_classes = "; ".join(f"{name} ({'; '.join(why)})" for name, why in sorted(refused.items()))
        warnings.warn(f"hookkit.load({shown}): values of {len(refused)} class(es) come back as plain tuples / lists "
                      f"/ dicts: {shown_classes} (an enum's members as NotSaved placeholders). To get them back as "
                      "they were saved, import the module that defines a class before loading, or pass the class: "
                      "hookkit.load(path, classes=[...]).", stacklevel=3)
    return rec, shown


def _load_path(path: Any) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"hookkit.load: path must be a file name (a str or a pathlib.Path), got "
                                f"{type(path).__name__} {reprlib.repr(path)}.")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"hookkit.load: path must be a file name as text, got {type(name).__name__} "
                                f"{reprlib.repr(name)}; decode it first (os.fsdecode).")
    return Path(name), repr(name)


def _load_device(device: Any) -> torch.device:
    """``device`` as a torch.device this machine has, checked before the file is read."""
    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(f"hookkit.load: device must be a str or a torch.device, got {type(device).__name__} "
                                f"{reprlib.repr(device)}.")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ArgumentError(f"hookkit.load: device={device!r} is not a device ({exc}); give one such as 'cpu', "
                            "'cuda', 'cuda:1' or 'meta'.") from None
    if target.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=target)
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
            raise ArgumentError(f"hookkit.load: device={device!r} cannot hold tensors on this machine ({exc}); "
                                "load on 'cpu' (the default), or on a device it has.") from None
    return target


def _load_classes(classes: Any) -> list[type]:
    if isinstance(classes, (str, bytes, type)) or not isinstance(classes, Iterable):
        raise ArgumentTypeError(f"hookkit.load: classes must be a list of classes (classes=[MyOutput]), got "
                                f"{type(classes).__name__} {reprlib.repr(classes)}.")
    found = list(classes)
    for i, cls in enumerate(found):
        if not isinstance(cls, type):
            raise ArgumentTypeError(f"hookkit.load: classes must hold classes, but item {i} is a "
                                    f"{type(cls).__name__} {reprlib.repr(cls)}; pass the class itself "
                                    "(classes=[MyOutput]), not its name or an instance.")
    return found


def _check_digests(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], shown: str) -> None:
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise SavedCaptureError(f"cannot load a capture from {shown}: its manifest's checksums do not list the "
                                f"file's {len(tensors)} tensor(s); the file is corrupted.")
    bad = [key for key, t in tensors.items() if digest(t) != digests[key]]
    if bad:
        shown_keys = ", ".join(repr(k) for k in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: the bytes of {len(bad)} of its {len(tensors)} tensor(s) do not "
            f"match their SHA-256 in the manifest ({shown_keys}); the file's data is corrupted. Save the capture "
            "again, or load(..., verify=False) to read it as it is.")


def _read_manifest(metadata: dict[str, str], shown: str, n_tensors: int) -> dict[str, Any]:
    if "hookkit" not in metadata:
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: it is a safetensors file ({n_tensors} tensor(s)) without a hookkit "
            "manifest, so it was not written by Capture.save. Read its tensors with safetensors.torch.load_file.")
    text = metadata["hookkit"]
    try:
        manifest = parse(text)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest {exc}; the file is "
                                "corrupted.") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest has no format version; "
                                "the file is corrupted.")
    if version > FORMAT:
        raise SavedCaptureError(
            f"cannot load a capture from {shown}: it was written by a newer hookkit "
            f"({str(manifest.get('hookkit'))[:40]}, "
            f"capture format {version}); this hookkit ({__version__}) reads format {FORMAT} and older. Upgrade "
            "hookkit: pip install -U hookkit.")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("hookkit.sha256") or metadata.get("format") != "pt":
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest does not match its "
                                "checksum (or its metadata was changed); the file is corrupted.")
    try:
        check(manifest)
    except Malformed as exc:
        raise SavedCaptureError(f"cannot load a capture from {shown}: its hookkit manifest is not what "
                                f"Capture.save writes ({exc}); the file is corrupted or was made by hand.") from None
    return manifest


