"""Every torchvision classification model, every leaf module: hookkit's values equal raw hooks that clone."""

from __future__ import annotations

import pytest
import torch

import hookkit
from hookkit._tree import map_leaves

from _optional import importorskip_torchvision
from conftest import hook_census

torchvision = importorskip_torchvision()  # the whole file is about torchvision's models

MODELS = torchvision.models.list_models(module=torchvision.models)

# Small inputs keep the whole sweep within CI's budget; ViTs are built for the small size they are fed.
_SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56}


def _build(name):
    size = _SIZE.get(name, 64)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval(), torch.randn(1, 3, size, size)


def _leaf_names(model):
    return [n for n, m in model.named_modules() if n and not list(m.children())]


def _equal(a, b) -> bool:
    la, lb = [], []
    map_leaves(la.append, a)
    map_leaves(lb.append, b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_leaf_of_every_classification_model_matches_raw_hooks(name):
    model, x = _build(name)
    leaves = _leaf_names(model)
    modules = dict(model.named_modules())
    before = hook_census(model)

    ref: dict[str, list] = {n: [] for n in leaves}
    handles = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: ref[n].append(map_leaves(lambda t: t.detach().clone(), o))
        )
        for n in leaves
    ]
    try:
        with torch.no_grad(), hookkit.capture(model, leaves) as lazy:
            with hookkit.capture(model, leaves, clone=True) as copied:
                model(x)
    finally:
        for h in handles:
            h.remove()
    assert hook_census(model) == before

    detected = 0
    for n in leaves:
        if not ref[n]:
            assert n not in copied and n not in lazy
            continue
        copies = copied.calls(n)
        assert len(copies) == len(ref[n])
        assert all(_equal(a, b) for a, b in zip(copies, ref[n], strict=True)), n
        try:
            lazy_calls = lazy.calls(n)
        except hookkit.ModifiedInPlaceError:
            detected += 1  # a later in-place op changed it: reading says so instead of returning it
            continue
        assert all(_equal(a, b) for a, b in zip(lazy_calls, ref[n], strict=True)), f"{n} silently differs"
    if any(getattr(m, "inplace", False) for m in model.modules()):
        assert detected > 0, "in-place activations in this model must have been detected somewhere"
