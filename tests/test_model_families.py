"""The README's model table: each family x capture / inputs+kwargs / grads / stop / extract, each cell a test
against torch itself, plus the hook census on every family, also when its forward raises."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import hookkit
from hookkit.core.tree import leaves

from _optional import importorskip_torchvision
from conftest import hook_census


@dataclasses.dataclass
class Family:
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]  # a tensor, or a dict of keyword inputs
    layer: str  # a layer in the middle
    later: str  # a layer that runs after it (stop=True must not run it)
    bad_batch: Callable[[], Any]  # an input the forward rejects


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def first(value):
    return leaves(value)[0]


class CheckpointedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = checkpoint(self.body, self.stem(x), use_reentrant=False)
        return self.head(h.mean(dim=(2, 3)))


def _resnet18():
    return importorskip_torchvision().models.resnet18().eval()


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()


def _tokens():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, 50, (2, 7), generator=g), "attention_mask": mask}


FAMILIES = {
    "torchvision resnet18": Family(_resnet18, lambda: torch.randn(2, 3, 32, 32),
                                   "layer2", "fc", lambda: torch.randn(2, 5)),
    "DataParallel(resnet18)": Family(lambda: nn.DataParallel(_resnet18()),
                                     lambda: torch.randn(2, 3, 32, 32), "layer2", "module.fc",
                                     lambda: torch.randn(2, 5)),
    "HF BERT": Family(_bert, _tokens, "encoder.layer.0", "pooler", lambda: {"input_ids": torch.ones(2, 99).long()}),
    "HF GPT-2": Family(_gpt2, _tokens, "transformer.h.0", "lm_head",
                       lambda: {"input_ids": torch.ones(2, 40).long()}),
    "timm ViT": Family(_timm_vit, lambda: torch.randn(2, 3, 32, 32), "blocks.0", "head", lambda: torch.randn(2, 5)),
    "checkpointed CNN": Family(CheckpointedCNN, lambda: torch.randn(2, 3, 12, 12), "body.0", "head",
                               lambda: torch.randn(2, 5)),
}


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    fam = FAMILIES[request.param]
    return fam, fam.build()


def _module(model, name):
    inner = model.module if isinstance(model, nn.DataParallel) else model
    return inner.get_submodule(name.removeprefix("module."))


def _raw(model, name, batch, *, grad=False):
    """Raw torch hooks: the layer's (args, kwargs) before it runs, its output cloned, and the model output."""
    seen = {}
    m = _module(model, name)
    def pre(mod, a, kw):
        seen.setdefault("in", ([t.clone() for t in leaves(a)], [t.clone() for t in leaves(kw)]))

    def post(mod, a, o):
        seen.setdefault("out", o)

    h1 = m.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = m.register_forward_hook(post)
    try:
        with torch.set_grad_enabled(grad):
            out = call(model, batch)
    finally:
        h1.remove()
        h2.remove()
    return seen, out


def test_capture(family):
    fam, model = family
    batch = fam.batch()
    with hookkit.capture(model, [fam.layer], clone=True) as cap:
        call(model, batch)
    seen, _ = _raw(model, fam.layer, batch)
    torch.testing.assert_close(first(cap[fam.layer]), first(seen["out"]), rtol=1e-5, atol=1e-6)


def test_inputs_and_kwargs(family):
    fam, model = family
    batch = fam.batch()
    with hookkit.capture(model, [fam.layer], inputs=True, clone=True) as cap:
        call(model, batch)
    seen, _ = _raw(model, fam.layer, batch)
    args, kwargs = seen["in"]
    mine_args = leaves(cap.inputs[fam.layer])
    mine_kwargs = leaves(cap.kwargs[fam.layer])
    assert len(mine_args) == len(args) and len(mine_kwargs) == len(kwargs)
    for a, b in zip(mine_args + mine_kwargs, args + kwargs, strict=True):
        torch.testing.assert_close(a, b)


def test_grads(family):
    fam, model = family
    batch = fam.batch()
    with hookkit.capture(model, [fam.layer], grads=True) as cap:
        first(call(model, batch)).float().pow(2).mean().backward()
    ref = copy.deepcopy(model)
    seen, out = _raw(ref, fam.layer, batch, grad=True)
    (expected,) = torch.autograd.grad(first(out).float().pow(2).mean(), first(seen["out"]))
    torch.testing.assert_close(first(cap.grads[fam.layer]), expected, rtol=1e-4, atol=1e-6)


def test_stop(family):
    fam, model = family
    batch = fam.batch()
    later = []
    h = _module(model, fam.later).register_forward_hook(lambda *a: later.append(1))
    try:
        with hookkit.capture(model, [fam.layer], stop=True) as cap:
            call(model, batch)
    finally:
        h.remove()
    assert later == []
    seen, _ = _raw(model, fam.layer, batch)
    torch.testing.assert_close(first(cap[fam.layer]), first(seen["out"]))


def test_extract(family, tmp_path):
    fam, model = family
    batch = fam.batch()
    feats = hookkit.extract(model, [fam.layer], [batch, batch], out=tmp_path, progress=False)
    seen, _ = _raw(model, fam.layer, batch)
    expected = first(seen["out"]).float()
    name = fam.layer.removeprefix("module.")
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and expected.shape[:2] == mask.shape:  # token outputs of a masked batch: the valid tokens
        expected = expected[mask.bool()]
        counts = mask.sum(1).tolist() * 2
        np.testing.assert_array_equal(feats.offsets(name), np.cumsum([0, *counts]))
    np.testing.assert_allclose(feats[name], np.concatenate([expected.numpy(), expected.numpy()]), rtol=1e-5,
                               atol=1e-5)


def test_census_also_when_the_forward_raises(family):
    fam, model = family
    before = hook_census(model)
    with pytest.raises(Exception):  # noqa: B017  (each family's forward raises its own error)
        with hookkit.capture(model, [fam.layer], inputs=True, grads=True):
            call(model, fam.bad_batch())
    assert hook_census(model) == before
    with hookkit.trace(model, [fam.layer, fam.later], console=_quiet()):
        call(model, fam.batch())
    assert hook_census(model) == before


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def test_timm_forward_features_equals_the_captured_final_norm():
    model = _timm_vit()
    x = torch.randn(2, 3, 32, 32)
    with hookkit.capture(model, ["norm", "blocks.11"]) as cap:
        model(x)
    with torch.no_grad():
        torch.testing.assert_close(cap["norm"], model.forward_features(x))
        intermediates = model.forward_intermediates(x, indices=[11], norm=False, output_fmt="NLC",
                                                    intermediates_only=True)
    torch.testing.assert_close(cap["blocks.11"][:, model.num_prefix_tokens:], intermediates[0])


def test_monitor(family):
    """monitor() on each family: the recorded activation statistics are the layer's own output's, its gradient norm
    is torch.autograd.grad's, and every hook comes off."""
    fam, model = family
    batch = fam.batch()
    before = hook_census(model)
    ref = copy.deepcopy(model)
    with hookkit.monitor(model, [fam.layer], every=1, summary=False) as mon:
        first(call(model, batch)).float().pow(2).mean().backward()
        mon.step()
    assert hook_census(model) == before
    seen, out = _raw(ref, fam.layer, batch, grad=True)
    act = first(seen["out"])
    (grad,) = torch.autograd.grad(first(out).float().pow(2).mean(), act)
    stats = mon.records[0]["layers"][fam.layer.removeprefix("module.")]
    act = act.detach().double()
    assert stats["act_mean"] == pytest.approx(float(act.mean()), rel=1e-4, abs=1e-6)
    assert stats["act_absmax"] == pytest.approx(float(act.abs().max()), rel=1e-4)
    assert stats["grad_norm"] == pytest.approx(float(grad.double().norm()), rel=1e-3)
    params = mon.records[0]["params"].values()
    assert params and any(p["weight_norm"] > 0 for p in params)
    assert all(p["update_ratio"] in (0.0, None) for p in params)  # no optimizer step: nothing moved
