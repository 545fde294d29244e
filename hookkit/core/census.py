"""``hook_census()``: everything a hook library could leave changed on a model and in torch, as plain data.

The tests compare a census before and after every hookkit block; users can do the same around their own code.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.nn.modules.module as _module_mod

from hookkit.core import check as _check
from hookkit.core.compat import function_mode_stack

__all__ = ["hook_census"]

_TENSOR_HOOK_DICTS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def hook_census(model: nn.Module) -> dict[str, Any]:
    """Every hook of every module of ``model``, and torch's global hook state, as data: two censuses are equal only
    if nothing was added, removed, swapped or flipped in between.

    Examples:
        >>> import torch, torch.nn as nn, hookkit
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> before = hookkit.hook_census(model)
        >>> with hookkit.capture(model, ["0"], grads=True):
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> hookkit.hook_census(model) == before
        True
        >>> handle = model[1].register_forward_hook(lambda *a: None)   # a hook left behind shows up
        >>> hookkit.hook_census(model) == before
        False

    What it holds, keyed by a readable name (``"0._forward_hooks"``, ``"param 0.weight._backward_hooks"``):

    - each module's hook dicts (every attribute with "hook" in its name: forward, pre, backward, always-called,
      with-kwargs, state-dict and load-state-dict hooks, and any a later torch adds) as (id, hook identity) pairs,
      its ``_is_full_backward_hook`` flag and its ``training`` flag;
    - each parameter's and buffer's tensor hooks;
    - torch's global module hooks and flags (``torch.nn.modules.module._global_*``);
    - dynamo's whole config (``skip_nnmodule_hook_guards`` among it), grad, inference and anomaly mode, and this
      thread's stack of torch function modes (op taps push one inside a forward).

    The first call imports ``torch._dynamo`` (as importing torchvision does) so that its config can be compared.
    """
    _check.instance("hookkit.hook_census", "model", model, nn.Module, "a torch.nn.Module")
    import torch._dynamo  # noqa: F401  (its config is part of the census)

    census: dict[str, Any] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        where = name or "<root>"
        for attr, value in sorted(vars(module).items()):
            if "hook" not in attr:
                continue
            if isinstance(value, dict):
                census[f"{where}.{attr}"] = [(k, v if isinstance(v, bool) else id(v)) for k, v in value.items()]
            else:
                census[f"{where}.{attr}"] = value
        census[f"{where}.training"] = module.training
    tensors: list[tuple[str, Any]] = [(f"param {n}", p) for n, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(f"buffer {n}", b) for n, b in model.named_buffers(remove_duplicate=False)]
    for label, t in tensors:
        for attr in _TENSOR_HOOK_DICTS:
            census[f"{label}.{attr}"] = list((getattr(t, attr, None) or {}).keys())
    for attr in sorted(vars(_module_mod)):
        if attr.startswith("_global_"):
            value = getattr(_module_mod, attr)
            census[f"torch.{attr}"] = [(k, id(v)) for k, v in value.items()] if isinstance(value, dict) else value
    census["dynamo.config"] = torch._dynamo.config.get_config_copy()
    census["grad_enabled"] = torch.is_grad_enabled()
    census["inference_mode"] = torch.is_inference_mode_enabled()
    census["anomaly"] = torch.is_anomaly_enabled()
    census["torch function modes"] = [id(m) for m in function_mode_stack()]  # this thread's, bottom first
    return census
