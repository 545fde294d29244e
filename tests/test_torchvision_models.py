"""Every torchvision classification model, every module (containers and the root too), every call, in each grad
mode: a default capture (copy-on-write) holds what raw hooks that clone hold, with no ModifiedInPlaceError, though
ReLU(inplace=True), ``out += identity`` and friends overwrite the tensors later; ``clone=True`` holds the same."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import hookkit
from hookkit.core.tree import map_leaves

from _optional import importorskip_torchvision
from conftest import hook_census

torchvision = importorskip_torchvision()  # the whole file is about torchvision's models

MODELS = torchvision.models.list_models(module=torchvision.models)
MODES = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference_mode": torch.inference_mode}
# Inference tensors keep no version counter (the backstop for writes hookkit cannot see), so under inference_mode
# a default capture copies at hook time, as clone=True does, and makes no copies on write.
EAGER = "inference_mode"

# Small inputs keep the whole sweep within CI's budget; ViTs are built for the small size they are fed. no_grad
# runs at that size; grad and inference_mode at 32 x 32 where the model accepts it (the check is per module and per
# call, so a smaller map loses nothing, and each model is built once for its three modes).
_SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56}
_TOO_SMALL_AT_32 = {"alexnet", "inception_v3", "maxvit_t"}


@functools.lru_cache(maxsize=1)  # the modes of one model run one after another (mode is the inner parameter)
def _build(name):
    kwargs = {"image_size": _SIZE.get(name, 64)} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _input(name, mode):
    size = _SIZE.get(name, 64)
    if mode != "no_grad" and name not in _TOO_SMALL_AT_32 and not name.startswith("vit_"):
        size = 32
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _free_the_last_model():
    yield
    _build.cache_clear()


def _leaves(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_leaves(found.append, value)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _equal(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_default_capture_of_every_module_of_every_classification_model_matches_raw_hooks(name, mode):
    model, x = _build(name), _input(name, mode)
    names = [n for n, _ in model.named_modules()]  # "" (the model itself) and every container included
    modules = dict(model.named_modules())
    before, depth = hook_census(model), torch._C._len_torch_function_stack()

    ref: dict[str, list] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: ref[n].append(map_leaves(lambda t: t.detach().clone(), o))
        )
        for n in names
    ]
    try:  # clone=True rides along under no_grad (tests/test_copy_on_write.py has it in every mode)
        with MODES[mode](), hookkit.capture(model, names) as lazy:
            with hookkit.capture(model, names, clone=True) if mode == "no_grad" else contextlib.nullcontext() as copied:
                model(x)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before
    assert torch._C._len_torch_function_stack() == depth

    stored = 0
    for n in names:
        if not ref[n]:
            assert n not in lazy and (copied is None or n not in copied), n
            continue
        stored += sum(len(_leaves(v)) for v in ref[n])
        if copied is not None:
            assert len(copied.calls(n)) == len(ref[n]), n
            assert all(_equal(a, b) for a, b in zip(copied.calls(n), ref[n], strict=True)), f"clone=True: {n}"
        lazy_calls = lazy.calls(n)  # copy-on-write: no ModifiedInPlaceError, ever, on these models
        assert len(lazy_calls) == len(ref[n]), n
        assert all(_equal(a, b) for a, b in zip(lazy_calls, ref[n], strict=True)), f"default capture: {n}"
    assert lazy.copies <= stored, "at most one copy per stored tensor"
    if mode != EAGER and any(getattr(m, "inplace", False) for m in model.modules()):
        assert lazy.copies > 0, "this model writes in place into module outputs: some stored tensor was copied"
