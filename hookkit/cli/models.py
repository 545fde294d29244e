"""Model specs (``torchvision:resnet18``, ``package.module:factory``) -> an ``nn.Module`` in eval mode, for the CLI.

``hookkit.cli`` (its ``_inputs.build_model``) calls ``load_model`` for every command's MODEL. torchvision is
optional: it is imported only for ``torchvision:NAME`` specs, and its absence is a ``ModelSpecError`` saying what to
install.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from hookkit._errors import ModelSpecError

__all__ = ["load_model"]

_TORCHVISION = "torchvision"
_INSTALL_TORCHVISION = "pip install 'hookkit[torchvision]' (or pip install torchvision)"
_SPEC_HELP = ("use 'torchvision:NAME' (e.g. 'torchvision:resnet18'), 'package.module:factory' for your own model, "
              "or the path of a local Hugging Face model folder")


def load_model(spec: str, *, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build the model a spec names, optionally load a local state_dict into it, and return it in eval mode.

    Examples:
        >>> from hookkit.cli.models import load_model
        >>> type(load_model("torchvision:resnet18")).__name__
        'ResNet'

    Args:
        spec: ``"torchvision:NAME"`` (any name of ``torchvision.models.list_models()``, built with random weights:
            nothing is ever downloaded), ``"package.module:factory"``, where ``factory`` (dotted attributes
            allowed) is an ``nn.Module`` or a callable taking no arguments that returns one, or the path of a local
            Hugging Face model folder (``AutoModel``, local files only; needs transformers).
        weights: a local file written by ``torch.save(model.state_dict(), path)``; loaded with
            ``weights_only=True`` on the CPU, and strictly (every key must match). Default ``None``: keep the
            weights the factory made.

    Returns:
        The model, in eval mode.

    Raises:
        ModelSpecError: the spec is malformed, names nothing, does not yield an ``nn.Module``, or the weights file
            is missing or does not fit the model, or a ``torchvision:`` spec finds no torchvision. The message names
            the spec and the fix.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"a model spec is a string, got {type(spec).__name__} {spec!r}; {_SPEC_HELP}.")
    if os.sep in spec or "/" in spec or os.path.isdir(spec):  # a path: a local Hugging Face model folder
        if weights is not None:
            raise ModelSpecError(f"--weights with the model folder {spec!r}: the folder holds its weights; drop "
                                 "--weights.")
        from hookkit.cli.texts import load_text_model

        return load_text_model(spec)
    source, sep, name = spec.partition(":")
    source, name = source.strip(), name.strip()
    if not sep:
        raise ModelSpecError(f"model spec {spec!r} has no ':'; {_suggest_colon(spec)}.")
    if not source or not name:
        raise ModelSpecError(f"model spec {spec!r} needs a name on both sides of ':'; {_SPEC_HELP}.")
    model = _torchvision_model(spec, name) if source == _TORCHVISION else _user_model(spec, source, name)
    if weights is not None:
        _load_weights(model, spec, weights)
    return model.eval()


def _suggest_colon(spec: str) -> str:
    try:
        torchvision_names = _torchvision_names()
    except ModelSpecError:  # no torchvision: suggest what can be suggested without it
        torchvision_names = ()
    if spec.strip() in torchvision_names:
        return f"did you mean 'torchvision:{spec.strip()}'? (otherwise {_SPEC_HELP})"
    if "." in spec:
        module, _, attr = spec.strip().rpartition(".")
        return f"did you mean '{module}:{attr}'? (otherwise {_SPEC_HELP})"
    return _SPEC_HELP


def _torchvision_models(spec: str | None = None) -> Any:
    """``torchvision.models``, imported now (torchvision is an optional dependency); ``spec``: the spec to name in
    the error."""
    try:
        import torchvision.models
    except ImportError as exc:  # not installed, or built for another torch
        where = f"model spec {spec!r}: " if spec is not None else ""
        raise ModelSpecError(
            f"{where}the torchvision:NAME models need torchvision, which cannot be imported ({exc}); "
            f"{_INSTALL_TORCHVISION}, or name your own model as 'package.module:factory'."
        ) from exc
    return torchvision.models


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    return tuple(_torchvision_models().list_models())


def _torchvision_model(spec: str, name: str) -> nn.Module:
    models = _torchvision_models(spec)
    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        did_you_mean = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelSpecError(
            f"model spec {spec!r}: torchvision has no model {name!r}.{did_you_mean} "
            "See torchvision.models.list_models() for every name."
        )
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # detection / segmentation builders download a backbone by default
    return models.get_model(name, **kwargs)


def _user_model(spec: str, module_name: str, attr_path: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelSpecError(
                f"model spec {spec!r}: cannot import {module_name!r} ({exc}); check the spelling, or add the folder "
                "that holds it to PYTHONPATH (or run hookkit from that folder)."
            ) from exc
        raise ModelSpecError(f"model spec {spec!r}: importing {module_name!r} failed: {exc}.") from exc
    except Exception as exc:
        raise ModelSpecError(
            f"model spec {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in attr_path.split(".")[:i])
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=5, cutoff=0.6)
            did_you_mean = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelSpecError(f"model spec {spec!r}: {where!r} has no attribute {part!r}.{did_you_mean}")
        obj = getattr(obj, part)
    qualname = f"{module_name}.{attr_path}"
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, type) and not issubclass(obj, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {qualname} is the class {obj.__name__}, not a torch.nn.Module subclass; "
            "point the spec at a model class, a factory function or a module object."
        )
    if not callable(obj):
        raise ModelSpecError(
            f"model spec {spec!r}: {qualname} is a {type(obj).__name__}, not an nn.Module or a factory; "
            "point the spec at a callable that takes no arguments and returns an nn.Module."
        )
    try:
        model = obj()
    except Exception as exc:
        raise ModelSpecError(
            f"model spec {spec!r}: calling {qualname}() raised {type(exc).__name__}: {exc}; the factory must take "
            "no arguments and return an nn.Module (wrap it in a function that fills in the arguments)."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {qualname}() returned {type(model).__name__}, not a torch.nn.Module; "
            "point the spec at a callable that returns the model."
        )
    return model


def _load_weights(model: nn.Module, spec: str, weights: str | os.PathLike[str]) -> None:
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise ModelSpecError(
            f"weights file {path!r} for model spec {spec!r} does not exist; pass the path of a file written by "
            "torch.save(model.state_dict(), path)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelSpecError(
            f"weights file {path!r} for model spec {spec!r} cannot be loaded with weights_only=True "
            f"({type(exc).__name__}: {first}); save a plain state_dict: torch.save(model.state_dict(), path)."
        ) from exc
    if not isinstance(state, Mapping):
        raise ModelSpecError(
            f"weights file {path!r} holds a {type(state).__name__}, not a state_dict; save it with "
            "torch.save(model.state_dict(), path)."
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) or (lines[0] if lines else "")
        raise ModelSpecError(
            f"weights file {path!r} does not fit model spec {spec!r}: {detail}. Check that it was saved from the "
            "same architecture."
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if keys:
                shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {label} key(s) ({shown})")
        hint = "Check that it was saved from the same architecture with torch.save(model.state_dict(), path)"
        keys = list(state.keys())
        if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
            hint = "Its keys start with 'module.' (saved from DataParallel/DDP): save model.module.state_dict()"
        elif set(keys) & {"state_dict", "model"}:
            hint = "It looks like a training checkpoint: save the state_dict inside it on its own"
        raise ModelSpecError(f"weights file {path!r} does not fit model spec {spec!r}: {'; '.join(parts)}. {hint}.")
