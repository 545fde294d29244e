"""Clear errors, raised before anything is registered."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hookkit

from _optional import importorskip_torchvision
from conftest import hook_census


@pytest.fixture
def resnet():
    return importorskip_torchvision().models.resnet18()


def test_unknown_name_lists_close_names_and_points_to_layer_names(resnet):
    before = hook_census(resnet)
    with pytest.raises(LookupError) as info:
        hookkit.capture(resnet, ["conv1", "layer1.0.cnv1"])
    err = info.value
    assert isinstance(err, hookkit.LayerNotFoundError) and isinstance(err, hookkit.HookkitError)
    msg = str(err)
    assert "'layer1.0.cnv1'" in msg and "'layer1.0.conv1'" in msg and "layer_names" in msg
    assert hook_census(resnet) == before  # conv1 was valid, but nothing got registered


def test_glob_matching_nothing_is_an_error(resnet):
    with pytest.raises(hookkit.LayerNotFoundError, match=r"no pattern 'layer9\.\*'.*layer_names"):
        hookkit.capture(resnet, "layer9.*")


def test_star_stays_inside_one_dotted_part(resnet):
    with pytest.raises(hookkit.LayerNotFoundError, match=r"\*\*"):
        hookkit.capture(resnet, "layer1.*.conv9")
    cap = hookkit.capture(resnet, "layer1.*.conv1")
    assert sorted(cap.selected) == ["layer1.0.conv1", "layer1.1.conv1"]


def test_class_matching_nothing_lists_the_classes_present(resnet):
    with pytest.raises(hookkit.LayerNotFoundError, match="LSTM.*Conv2d"):
        hookkit.capture(resnet, nn.LSTM)


def test_predicate_matching_nothing_is_an_error(resnet):
    with pytest.raises(hookkit.LayerNotFoundError, match="predicate"):
        hookkit.capture(resnet, lambda name, m: False)


def test_module_object_not_in_the_model_is_an_error(resnet):
    with pytest.raises(hookkit.LayerNotFoundError, match="module object Linear"):
        hookkit.capture(resnet, nn.Linear(2, 2))


def test_non_module_model_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hookkit.capture(lambda x: x, "fc")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hookkit.layer_names({"fc": 1})


def test_bad_layer_spec_type_and_empty_list(resnet):
    with pytest.raises(TypeError, match="cannot select layers with int"):
        hookkit.capture(resnet, ["conv1", 3])
    with pytest.raises(ValueError, match="empty"):
        hookkit.capture(resnet, [])


def test_reading_a_layer_that_never_ran_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x)

    model = Branchy()
    with hookkit.capture(model, ["a", "b"]) as cap:
        model(torch.randn(1, 2))
    assert "b" not in cap and list(cap) == ["a"]
    with pytest.raises(KeyError, match="'b' never ran inside the capture block"):
        cap["b"]
    with pytest.raises(KeyError, match="'c' is not one of the captured layers"):
        cap["c"]
    assert cap.get("b") is None


def test_error_messages_are_not_wrapped_in_quotes_like_plain_key_errors():
    model = nn.Sequential(nn.Linear(2, 2))
    cap = hookkit.capture(model, "0")
    with pytest.raises(KeyError) as info:
        cap["0"]
    assert str(info.value).startswith("'0' never ran")


def test_script_module_is_refused_with_a_pointer_to_the_eager_model():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(hookkit.UnsupportedModelError, match="TorchScript.*eager"):
        hookkit.capture(scripted, "0")
    model = nn.Sequential(nn.Linear(2, 2))
    model.inner = torch.jit.script(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(hookkit.UnsupportedModelError, match="'inner' is a TorchScript"):
        hookkit.capture(model, "0")


def test_compiled_model_is_refused_instead_of_silently_recording_nothing():
    model = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(hookkit.UnsupportedModelError, match=r"torch.compile.*_orig_mod"):
        hookkit.capture(compiled, "_orig_mod.0")
    in_place = nn.Sequential(nn.Linear(2, 2))
    in_place.compile(backend="eager")
    with pytest.raises(hookkit.UnsupportedModelError, match=r"Module.compile\(\)"):
        hookkit.capture(in_place, "0")
    with pytest.raises(hookkit.UnsupportedModelError):
        hookkit.hooks(in_place, forward={"0": lambda *a: None})


def test_hooks_refuses_bad_input_before_registering_anything(resnet):
    before = hook_census(resnet)
    with pytest.raises(hookkit.LayerNotFoundError):
        hookkit.hooks(resnet, forward={"conv1": lambda *a: None, "nope": lambda *a: None})
    with pytest.raises(TypeError, match="not a function"):
        hookkit.hooks(resnet, forward={"conv1": "print"})
    with pytest.raises(ValueError, match="no hook functions"):
        hookkit.hooks(resnet)
    assert hook_census(resnet) == before


def test_entering_a_capture_twice_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2))
    cap = hookkit.capture(model, "0")
    with cap:
        pass
    with pytest.raises(RuntimeError, match="entered once"), cap:
        pass


def test_layer_names_lists_every_alias():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(shared))
    assert hookkit.layer_names(model) == ["0", "1", "1.0"]
