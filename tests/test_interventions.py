"""Interventions and explanations built on hookkit: Grad-CAM (examples/gradcam.py) and a head ablation with a
replacing forward hook (examples/ablate_head.py), each checked against the same computation with raw torch hooks.

The Hugging Face tests need the optional `hf` extra (transformers) and skip cleanly without it; the model is built
from a small config with random weights, nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookkit

from _optional import importorskip_torchvision, needs_torchvision
from conftest import hook_census

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SELF_ATTN = "encoder.layer.0.attention.self"
HEADS, HIDDEN, HEAD = 4, 32, 2
D = HIDDEN // HEADS
COLS = slice(HEAD * D, (HEAD + 1) * D)  # head 2's columns of the context output


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"hookkit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- Grad-CAM ------------------------------------------------------------------------------------------------------
def gradcam_by_raw_hooks(model: nn.Module, x: torch.Tensor, layer: str, target: int | None) -> torch.Tensor:
    """Grad-CAM from scratch: a raw forward hook keeps the live output, torch.autograd.grad gives dy/dA."""
    kept = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    cls = int(logits[0].argmax()) if target is None else target
    (grad,) = torch.autograd.grad(logits[0, cls], kept[0])
    act = kept[0].detach()[0]
    weights = grad[0].mean(dim=(1, 2))
    cam = torch.relu(torch.einsum("c,chw->hw", weights, act))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam - cam.min()) / (cam.max() - cam.min())


@pytest.fixture(scope="module")
def gradcam_mod():
    importorskip_torchvision()  # the example draws with torchvision
    return load_example("gradcam")


@pytest.fixture
def resnet():
    return importorskip_torchvision().models.resnet18(weights=None).eval()


@pytest.mark.parametrize("layer, target", [("layer4", None), ("layer4", 7), ("layer3", 123)])
def test_gradcam_equals_the_formula_by_raw_hooks(gradcam_mod, resnet, layer, target):
    x = gradcam_mod.picture(224, seed=1).sub(0.45).div(0.225).unsqueeze(0)
    before = hook_census(resnet)
    cam = gradcam_mod.gradcam(resnet, x, layer=layer, target=target)
    assert hook_census(resnet) == before
    assert all(p.grad is None for p in resnet.parameters())  # the backward touched no parameter's .grad
    assert cam.shape == (224, 224) and not cam.requires_grad
    assert cam.min() == 0 and cam.max() == 1
    expected = gradcam_by_raw_hooks(resnet, x, layer, target)
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-5)
    # The map depends on the class: a different target gives a different map (the gradient is really used).
    other = gradcam_by_raw_hooks(resnet, x, layer, 999 if target != 999 else 0)
    assert not torch.allclose(cam, other, atol=1e-3)


def test_gradcam_default_target_is_the_top_class_and_takes_a_3d_image(gradcam_mod, resnet):
    x = torch.randn(3, 224, 224)
    with torch.no_grad():
        top = int(resnet(x[None]).argmax())
    torch.testing.assert_close(gradcam_mod.gradcam(resnet, x), gradcam_mod.gradcam(resnet, x[None], target=top),
                               rtol=0, atol=0)
    with torch.no_grad():  # the caller's no_grad does not stop the backward pass it needs
        cam = gradcam_mod.gradcam(resnet, x, target=top)
    torch.testing.assert_close(cam, gradcam_by_raw_hooks(resnet, x[None], "layer4", top), rtol=1e-5, atol=1e-5)


@needs_torchvision
def test_gradcam_example_runs_and_writes_its_png(tmp_path):
    out = tmp_path / "cam"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "gradcam.py"), "--out", str(out)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top class" in proc.stdout and "cam from layer4: shape (224, 224), min 0.000, max 1.000" in proc.stdout
    for name in ("input.png", "heatmap.png", "overlay.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [out]  # --out was honoured: nothing else in the current folder


# -- head ablation in BERT -----------------------------------------------------------------------------------------
@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def bert(transformers):
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=37, attn_implementation="eager")
    return transformers.BertModel(config).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 100, (2, 7))


@pytest.fixture(scope="module")
def ablate_mod():
    pytest.importorskip("transformers")
    return load_example("ablate_head")


def no_hooks_anywhere(model: nn.Module) -> bool:
    return all(not getattr(m, d) for m in model.modules() for d in (
        "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"))


def test_bert_self_attention_output_structure(bert, ids):
    """What the hook has to deal with in this transformers version: (context [B, T, hidden], weights [B, H, T, T])."""
    with torch.no_grad(), hookkit.capture(bert, [SELF_ATTN]) as cap:
        bert(input_ids=ids)
    out = cap[SELF_ATTN]
    assert isinstance(out, tuple) and isinstance(out[0], torch.Tensor)
    assert out[0].shape == (2, 7, HIDDEN)
    assert len(out) == 1 or out[1] is None or out[1].shape == (2, HEADS, 7, 7)


def test_head_ablation_zeroes_exactly_that_head_and_matches_a_raw_hook(bert, ids, ablate_mod):
    assert no_hooks_anywhere(bert)
    with torch.no_grad():
        before_census = hook_census(bert)  # taken in the same grad mode (the census compares it too)
        with hookkit.capture(bert, [SELF_ATTN]) as plain:
            base = bert(input_ids=ids).last_hidden_state
        with hookkit.hooks(bert, forward={SELF_ATTN: ablate_mod.zero_head(HEAD)}) as h:
            assert len(h) == 1 and len(bert.encoder.layer[0].attention.self._forward_hooks) == 1
            # capture registers its hook after the user's, and torch runs forward hooks in registration order:
            # nested inside hooks(), capture records the output as *replaced* by zero_head.
            with hookkit.capture(bert, [SELF_ATTN]) as cap:
                ablated = bert(input_ids=ids).last_hidden_state
        assert hook_census(bert) == before_census
        again = bert(input_ids=ids).last_hidden_state

    ctx, ctx0 = cap[SELF_ATTN][0], plain[SELF_ATTN][0]
    assert ctx0[..., COLS].abs().max() > 1e-3  # unablated, the head does contribute
    assert torch.all(ctx[..., COLS] == 0)
    keep = torch.ones(HIDDEN, dtype=torch.bool)
    keep[COLS] = False
    torch.testing.assert_close(ctx[..., keep], ctx0[..., keep], rtol=0, atol=0)  # the other heads are untouched
    # the rest of the tuple passes through as it was
    for a, b in zip(cap[SELF_ATTN][1:], plain[SELF_ATTN][1:], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)

    assert not torch.allclose(ablated, base, atol=1e-4)  # the ablation reaches the final output
    torch.testing.assert_close(again, base, rtol=0, atol=0)  # hooks gone: the original outputs again

    # The same ablation written by hand with a raw torch hook gives the same final output, bit for bit.
    def raw(module, args, output):
        context = output[0].clone()
        context.view(*context.shape[:-1], HEADS, D)[..., HEAD, :] = 0
        return (context, *output[1:])

    handle = bert.encoder.layer[0].attention.self.register_forward_hook(raw)
    try:
        with torch.no_grad():
            manual = bert(input_ids=ids).last_hidden_state
    finally:
        handle.remove()
    torch.testing.assert_close(manual, ablated, rtol=0, atol=0)
    assert no_hooks_anywhere(bert)


def test_capture_registered_before_the_replacing_hook_sees_the_original_output(bert, ids, ablate_mod):
    with torch.no_grad():
        with hookkit.capture(bert, [SELF_ATTN]) as plain:
            bert(input_ids=ids)
        with hookkit.capture(bert, [SELF_ATTN]) as outer:  # registered first: runs before zero_head
            with hookkit.hooks(bert, forward={SELF_ATTN: ablate_mod.zero_head(HEAD)}):
                with hookkit.capture(bert, [SELF_ATTN]) as inner:  # registered last: sees zero_head's result
                    bert(input_ids=ids)
    torch.testing.assert_close(outer[SELF_ATTN][0], plain[SELF_ATTN][0], rtol=0, atol=0)
    assert outer[SELF_ATTN][0][..., COLS].abs().max() > 0
    assert torch.all(inner[SELF_ATTN][0][..., COLS] == 0)
    assert no_hooks_anywhere(bert)


def test_zero_head_handles_a_bare_tensor_and_a_one_tuple(ablate_mod):
    class Attn(nn.Module):
        num_attention_heads = HEADS

        def __init__(self, as_tuple: bool) -> None:
            super().__init__()
            self.as_tuple = as_tuple

        def forward(self, x):
            return (x * 1,) if self.as_tuple else x * 1

    x = torch.randn(2, 3, HIDDEN)
    expected = x.clone()
    expected[..., COLS] = 0
    for as_tuple in (False, True):
        model = nn.Sequential(Attn(as_tuple))
        with hookkit.hooks(model, forward={"0": ablate_mod.zero_head(HEAD)}):
            y = model(x)
        assert isinstance(y, tuple) == as_tuple
        torch.testing.assert_close(y[0] if as_tuple else y, expected, rtol=0, atol=0)
        assert no_hooks_anywhere(model)


def test_ablate_head_example_runs(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ablate_head.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "forward=1" in proc.stdout
    assert "after the block: 0 forward hook(s); outputs equal the original again: True" in proc.stdout
