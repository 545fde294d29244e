"""Every mistake in an argument of a public function is a hookkit error, raised before anything changes.

One table: for each public function (and the public methods a user calls on results), a valid call, then one bad
value per parameter, of the wrong type (an ``ArgumentTypeError``, a ``TypeError``) or of a wrong value (an
``ArgumentError``, a ``ValueError``; a name that matches nothing is a ``LayerNotFoundError``, a ``LookupError``).
Each bad call must raise a ``HookkitError`` naming the parameter, leave the model's hooks as they were and write
nothing. A test compares the table with the signatures, so a parameter added later cannot go unchecked.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit import ArgumentError, ArgumentTypeError, HookkitError, LayerNotFoundError


class TokenNet(nn.Module):
    """Per-token layers over dict batches ``{"x": [N, T, 4], "attention_mask": [N, T]}`` (ragged features)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Env:
    """What the calls need: a model, its input, results of valid calls, and a folder to write into."""

    def __init__(self, tmp: Path) -> None:
        torch.manual_seed(0)
        self.tmp = tmp
        self.model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        self.x = torch.randn(3, 4)
        with hookkit.capture(self.model, ["0", "2"]) as cap:
            self.model(self.x)
        self.cap = cap
        self.saved = tmp / "cap.safetensors"
        if HAVE["safetensors"]:
            cap.save(self.saved)
        self.loss = self.model(self.x).sum()
        self.maps = torch.randn(2, 3, 5, 5)
        self.feats = hookkit.extract(self.model, ["0"], [self.x[:2], self.x[2:]], progress=False)
        self.disk = hookkit.extract(self.model, ["0"], [self.x], out=tmp / "feats", progress=False)
        token_net = TokenNet()
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        self.tokens = hookkit.extract(token_net, ["net.1"], [{"x": torch.randn(2, 3, 4), "attention_mask": mask}],
                                      progress=False)
        self.sweep = hookkit.patching_sweep(self.model, self.x, self.x + 1, ["0"], metric, positions=[0, 1],
                                            dim=1)
        self.run = tmp / "run"
        with hookkit.monitor(self.model, every=1, log=self.run, summary=False) as mon:
            for _ in range(2):
                self.model(self.x).sum().backward()
                mon.step()
        self.model.zero_grad(set_to_none=True)
        self.out = tmp / "out"  # where a call may write: must not appear after a refused call


def metric(out: torch.Tensor) -> torch.Tensor:
    return out[:, 0].sum()


def fn(module: Any, args: Any, output: Any) -> None:
    return None


# -- the valid call of each function, taking the parameters to change as keywords -----------------------------------
def _kw(defaults: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    unknown = set(changed) - set(defaults)
    assert not unknown, f"not a parameter of the valid call: {unknown}"
    return {**defaults, **changed}


def call_capture(e: Env, **o: Any) -> Any:
    return hookkit.capture(**_kw(dict(model=e.model, layers=["0"], inputs=False, grads=False, detach=True,
                                      clone=False, to=None, stop=False, param_grads=False), o))


def call_hooks(e: Env, **o: Any) -> Any:
    return hookkit.hooks(**_kw(dict(model=e.model, forward={"0": fn}, forward_pre=None, backward=None,
                                    backward_pre=None, with_kwargs=False, always_call=False, prepend=False), o))


def call_edits(e: Env, **o: Any) -> Any:
    return hookkit.edits(**_kw(dict(model=e.model, edits={"0": hookkit.ablate()}), o))


def call_patch(e: Env, **o: Any) -> Any:
    return hookkit.patch(**_kw(dict(value=torch.zeros(4), index=None, call=None, out=0), o))


def call_add(e: Env, **o: Any) -> Any:
    return hookkit.add(**_kw(dict(vector=torch.zeros(4), scale=1.0, index=None, call=None, out=0), o))


def call_ablate(e: Env, **o: Any) -> Any:
    return hookkit.ablate(**_kw(dict(kind="zero", over=0, mean=None, index=None, call=None, out=0), o))


def call_layer_names(e: Env, **o: Any) -> Any:
    kw = _kw(dict(model=e.model), o)
    return hookkit.layer_names(kw["model"], e.x)


def call_hook_census(e: Env, **o: Any) -> Any:
    return hookkit.hook_census(**_kw(dict(model=e.model), o))


def call_concat_calls(e: Env, **o: Any) -> Any:
    return hookkit.concat_calls(**_kw(dict(values=[e.x, e.x], dim=1), o))


def call_trace(e: Env, **o: Any) -> Any:
    from rich.console import Console

    console = Console(file=io.StringIO())
    return hookkit.trace(**_kw(dict(model=e.model, layers=None, console=console, backward=True, inputs=True,
                                    stats=True, ops=False), o))


def call_check_finite(e: Env, **o: Any) -> Any:
    return hookkit.check_finite(**_kw(dict(model=e.model, layers=None, backward=True, ops=True), o))


def call_graph(e: Env, **o: Any) -> Any:
    return hookkit.graph(**_kw(dict(tensor=e.loss, params=dict(e.model.named_parameters()), max_depth=None), o))


def call_length_batches(e: Env, **o: Any) -> Any:
    return hookkit.length_batches(**_kw(dict(lengths=[3, 1, 2], batch_size=2, max_tokens=None), o))


def call_extract(e: Env, **o: Any) -> Any:
    return hookkit.extract(**_kw(dict(model=e.model, layers=["0"], data=[e.x[:2], e.x[2:]], out=e.out, pool=None,
                                      select=None, dtype=None, mask=None, dataset_id=None, progress=False,
                                      stop=True), o))


def call_monitor(e: Env, **o: Any) -> Any:
    return hookkit.monitor(**_kw(dict(model=e.model, layers=None, every=1, log=None, sinks=None, params=True,
                                      histograms=False, on_nonfinite="warn", ops=False, summary=False,
                                      console=None), o))


def call_plot_run(e: Env, **o: Any) -> Any:
    return hookkit.plot_run(**_kw(dict(run=e.run, out=e.out / "plot.png", stats=("grad_norm",), heatmap=None), o))


def call_load(e: Env, **o: Any) -> Any:
    return hookkit.load(**_kw(dict(path=e.saved, device="cpu", verify=True, classes=()), o))


def call_merge(e: Env, **o: Any) -> Any:
    return hookkit.merge(**_kw(dict(captures=[e.cap, e.cap], dim=0), o))


def call_patching_sweep(e: Env, **o: Any) -> Any:
    return hookkit.patching_sweep(**_kw(dict(model=e.model, clean=e.x, corrupt=e.x + 1, layers=["0"], metric=metric,
                                             positions=None, dim=1, batch=16, forward=None), o))


def call_feature_grid(e: Env, **o: Any) -> Any:
    return hookkit.feature_grid(**_kw(dict(activation=e.maps, sample=0, channels=None, nrow=None, padding=1,
                                           normalize="channel", cmap=None), o))


def call_save_feature_grid(e: Env, **o: Any) -> Any:
    return hookkit.save_feature_grid(**_kw(dict(activation=e.maps, path=e.out / "grid.png", sample=0, channels=None,
                                                nrow=None, padding=1, normalize="channel", cmap=None, title=None,
                                                annotate=True), o))


def call_summary(e: Env, **o: Any) -> Any:
    kw = _kw(dict(model=e.model, layers=None, depth=None, timing=True), o)
    return hookkit.summary(kw.pop("model"), e.x, **kw)


def call_store_calls(e: Env, **o: Any) -> Any:
    return e.cap.calls(**_kw(dict(name="0"), o))


def call_store_getitem(e: Env, **o: Any) -> Any:
    return e.cap[_kw(dict(name="0"), o)["name"]]


def call_store_get(e: Env, **o: Any) -> Any:
    return e.cap.get(**_kw(dict(name="0", default=None), o))


def call_capture_save(e: Env, **o: Any) -> Any:
    return e.cap.save(**_kw(dict(path=e.tmp / "again.safetensors"), o))


def call_features_getitem(e: Env, **o: Any) -> Any:
    return e.feats[_kw(dict(layer="0"), o)["layer"]]


def call_features_offsets(e: Env, **o: Any) -> Any:
    return e.tokens.offsets(**_kw(dict(layer="net.1"), o))


def call_features_tokens(e: Env, **o: Any) -> Any:
    return e.tokens.tokens(**_kw(dict(layer="net.1", i=0), o))


def call_features_path(e: Env, **o: Any) -> Any:
    return e.disk.path(**_kw(dict(layer="0"), o))


def call_features_torch(e: Env, **o: Any) -> Any:
    return e.disk.torch(**_kw(dict(layer="0"), o))


def call_load_features(e: Env, **o: Any) -> Any:
    return hookkit.load_features(**_kw(dict(out=e.tmp / "feats"), o))


def call_sweep_save_png(e: Env, **o: Any) -> Any:
    return e.sweep.save_png(**_kw(dict(path=e.out / "sweep.png", title=None, labels=None), o))


CALLS: dict[str, Callable[..., Any]] = {
    "capture": call_capture, "hooks": call_hooks, "edits": call_edits, "patch": call_patch, "add": call_add,
    "ablate": call_ablate, "layer_names": call_layer_names, "hook_census": call_hook_census,
    "concat_calls": call_concat_calls, "trace": call_trace, "check_finite": call_check_finite, "graph": call_graph,
    "extract": call_extract, "monitor": call_monitor, "plot_run": call_plot_run, "load": call_load,
    "merge": call_merge, "patching_sweep": call_patching_sweep, "feature_grid": call_feature_grid,
    "save_feature_grid": call_save_feature_grid, "summary": call_summary,
    "Store.calls": call_store_calls, "Store.__getitem__": call_store_getitem, "Store.get": call_store_get,
    "Capture.save": call_capture_save, "Features.__getitem__": call_features_getitem,
    "Features.offsets": call_features_offsets, "Features.tokens": call_features_tokens,
    "Features.path": call_features_path, "Sweep.save_png": call_sweep_save_png,
    "Features.torch": call_features_torch, "load_features": call_load_features,
    "length_batches": call_length_batches,
}

# Classes a user builds through the function of the same name: the same table covers their constructors.
CONSTRUCTORS = {"CaptureBlock": "capture", "Edits": "edits", "Trace": "trace", "CheckFinite": "check_finite",
                "Monitor": "monitor", "LengthBatches": "length_batches"}
# Result types: hookkit builds them and hands them to the user, whose methods are in the table above.
RESULTS = {"Capture", "Store", "Edit", "Hooks", "TraceEvent", "AutogradGraph", "GraphNode", "Features", "Sweep",
           "Summary", "SummaryRow"}
# Parameters handed on to the user's own model or function, unchecked by hookkit (the model's forward judges them).
HANDED_ON = {("layer_names", "example_args"), ("layer_names", "example_kwargs"), ("summary", "example_inputs"),
             ("summary", "forward_kwargs"), ("Store.get", "default")}
# Parameters whose bad values are tested beside the code that checks them (see the comments in BAD).
CHECKED_ELSEWHERE: set[tuple[str, str]] = set()


def _made(value: Any) -> bool:
    """A bad value written as ``lambda e: ...``: made from the Env when the test runs."""
    return getattr(value, "__name__", "") == "<lambda>"


@dataclass(frozen=True)
class Bad:
    function: str
    param: str
    value: Any  # or a function of the Env
    error: type[Exception]  # ArgumentTypeError, ArgumentError, or a more precise hookkit class
    names: str = ""  # what the message must name (default: the parameter)

    @property
    def id(self) -> str:
        value = "made" if _made(self.value) else repr(self.value)
        return f"{self.function}-{self.param}-{value[:30]}"


T, V = ArgumentTypeError, ArgumentError
model_bads = [("model", "resnet18", T), ("model", None, T)]
layer_bads = [("layers", 3, T), ("layers", [], V), ("layers", "a[z-a]", V),
              ("layers", ["nope"], LayerNotFoundError, "nope")]
index_bads = [("index", "a", T), ("call", -1, V), ("call", "1", T), ("call", True, T), ("out", 1.5, T)]


def rows(function: str, *bads: tuple[Any, ...]) -> list[Bad]:
    return [Bad(function, *b) for b in bads]


BAD = [
    *rows("capture", *model_bads, *layer_bads, ("inputs", "yes", T), ("grads", 1, T), ("detach", None, T),
          ("clone", "no", T), ("to", "nodevice", V), ("to", 3, T), ("to", ("cpu", "meta"), V), ("stop", "yes", T),
          ("param_grads", [], T)),
    *rows("hooks", *model_bads, ("forward", ["0"], T), ("forward", {"0": 3}, T), ("forward", {"nope": fn},
          LayerNotFoundError, "nope"), ("forward_pre", {"0": "f"}, T), ("backward", fn, T),
          ("backward_pre", {"0": 3}, T), ("with_kwargs", "yes", T), ("always_call", 1, T), ("prepend", None, T)),
    *rows("edits", *model_bads, ("edits", {}, V), ("edits", [("0", hookkit.ablate())], T), ("edits", {"0": 3}, T),
          ("edits", {"nope": hookkit.ablate()}, LayerNotFoundError, "nope")),
    *rows("patch", ("value", [0.0], T), *index_bads),
    *rows("add", ("vector", [0.0], T), ("scale", "2", T), *index_bads),
    *rows("ablate", ("kind", "one", V), ("kind", 0, V), ("over", "x", T), ("mean", 3, T),
          ("mean", lambda e: torch.zeros(4), V), *index_bads),
    *rows("layer_names", *model_bads),
    *rows("hook_census", *model_bads),
    *rows("concat_calls", ("values", [], V), ("values", 3, T), ("values", lambda e: [e.x, (e.x, e.x)], V),
          ("dim", "1", T), ("dim", 5, V)),
    *rows("trace", *model_bads, *layer_bads, ("console", io.StringIO(), T), ("backward", "yes", T),
          ("inputs", 1, T), ("stats", None, T), ("ops", "no", T)),
    *rows("check_finite", *model_bads, *layer_bads, ("backward", "yes", T), ("ops", 1, T)),
    *rows("graph", ("tensor", 3.0, T), ("params", 3, T), ("params", {"w": 3}, T), ("max_depth", -1, V),
          ("max_depth", "2", T)),
    *rows("length_batches", ("lengths", [3, -1], V), ("lengths", [3, 1.5], T), ("batch_size", 0, V),
          ("batch_size", "2", T), ("max_tokens", 0, V), ("max_tokens", 2.5, T)),
    *rows("extract", *model_bads, ("layers", 3, T), ("layers", [], V), ("layers", "a[z-a]", V),
          ("layers", ["nope"], LayerNotFoundError, "nope"), ("data", 3, T), ("out", 3, T), ("pool", "mean", V),
          ("select", 1.5, T), ("select", {"nope": 0}, V), ("dtype", "float128x", V), ("mask", 3, T),
          ("dataset_id", 3, T), ("progress", "yes", T), ("stop", None, T)),
    # checked in test_monitor.py: monitor's model, every, log, sinks, params, histograms, on_nonfinite, ops, summary
    # and console (the options monitor checks when the block is made)
    *rows("monitor", *layer_bads, *model_bads, ("every", 0, V), ("every", "10", T), ("log", 3, T),
          ("sinks", ["nope"], V), ("sinks", 3, T), ("params", "yes", T), ("histograms", 1, T),
          ("on_nonfinite", "explode", V), ("ops", "yes", T), ("summary", None, T), ("console", io.StringIO(), T)),
    *rows("plot_run", ("run", 3, T), ("run", lambda e: e.tmp / "nothing", hookkit.PlotError, "nothing"),
          ("out", 3, T), ("out", lambda e: e.tmp, V), ("out", lambda e: e.out / "plot.jpg", V),
          ("stats", ["nope"], hookkit.PlotError, "nope"), ("stats", 3, T), ("heatmap", "yes", T)),
    # checked in test_saved.py: load's path, device and verify (a file's reader checks its own arguments)
    *rows("load", ("path", lambda e: e.tmp / "nothing", hookkit.SavedCaptureError, "nothing"), ("path", 3, T),
          ("device", 3, T), ("device", "nodevice", V), ("verify", "yes", T), ("classes", 3, T),
          ("classes", [3], T)),
    *rows("merge", ("captures", [], V), ("captures", 3, T), ("captures", [3], T), ("dim", "0", T), ("dim", 5, V)),
    *rows("patching_sweep", *model_bads, ("clean", 3, V), ("corrupt", lambda e: e.x[:2], V),
          ("corrupt", lambda e: (e.x,), V), ("layers", 3, T), ("layers", [], V), ("layers", "a[z-a]", V),
          ("layers", ["nope"], LayerNotFoundError, "nope"), ("metric", 3, T), ("positions", "0", V),
          ("positions", [99], V), ("dim", "1", T), ("batch", 0, V), ("batch", "4", T), ("forward", 3, T)),
    *rows("feature_grid", ("activation", [1.0], T), ("activation", lambda e: torch.zeros(5), V), ("sample", 9, V),
          ("sample", "0", T), ("channels", "all", T), ("channels", [], V), ("channels", [7], V), ("nrow", 0, V),
          ("nrow", 1.5, T), ("padding", -1, V), ("padding", "1", T), ("normalize", "none", V),
          ("cmap", "jet", V)),
    *rows("save_feature_grid", ("activation", [1.0], T), ("path", 3, T), ("path", lambda e: e.out / "grid.jpg", V),
          ("sample", 9, V), ("channels", [7], V), ("nrow", 0, V), ("padding", -1, V), ("normalize", "none", V),
          ("cmap", "jet", V), ("title", 3, T), ("annotate", "yes", T)),
    *rows("summary", *model_bads, ("layers", 3, T), ("layers", [], V), ("layers", "a[z-a]", V),
          ("layers", ["nope"], LayerNotFoundError, "nope"), ("depth", 0, V), ("depth", "2", T), ("timing", "yes", T)),
    *rows("Store.calls", ("name", 3, T, "3"), ("name", "nope", hookkit.NotRecordedError, "nope")),
    *rows("Store.__getitem__", ("name", 3, T, "3"), ("name", "nope", hookkit.NotRecordedError, "nope")),
    *rows("Store.get", ("name", 3, T, "3")),
    *rows("Capture.save", ("path", 3, T), ("path", lambda e: e.tmp / "no" / "such" / "c.safetensors",
                                            hookkit.SavedCaptureError, "no")),
    *rows("Features.__getitem__", ("layer", "nope", hookkit.NotRecordedError, "nope"), ("layer", 3, T, "3")),
    *rows("Features.offsets", ("layer", "nope", hookkit.NotRecordedError, "nope"), ("layer", 3, T, "3")),
    *rows("Features.tokens", ("layer", "nope", hookkit.NotRecordedError, "nope"), ("i", "0", T), ("i", 1.0, T)),
    *rows("Features.path", ("layer", "nope", hookkit.NotRecordedError, "nope")),
    *rows("Features.torch", ("layer", "nope", hookkit.NotRecordedError, "nope"), ("layer", 3, T, "3")),
    *rows("load_features", ("out", 3, T), ("out", lambda e: e.tmp / "nowhere", hookkit.ExtractError, "nowhere"),
          ("out", lambda e: e.tmp, hookkit.ExtractError, "not an extraction folder")),
    *rows("Sweep.save_png", ("path", 3, T), ("labels", ["a"], V), ("labels", 3, T), ("title", 3, T)),
]


# -- the table covers every public function and each of its parameters ---------------------------------------------
def _public_functions() -> dict[str, Callable[..., Any]]:
    found = {}
    for name in hookkit.__all__:
        obj = getattr(hookkit, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) or name == "__version__":
            continue
        if isinstance(obj, type):
            assert name in CONSTRUCTORS or name in RESULTS, f"public class {name}: in neither CONSTRUCTORS nor RESULTS"
            continue
        found[name] = obj
    return found


def _method(qualname: str) -> Callable[..., Any]:
    cls, method = qualname.split(".")
    return getattr(getattr(hookkit, cls), method)


def test_the_table_has_a_bad_value_for_every_parameter_of_every_public_function():
    functions = {**_public_functions(), **{q: _method(q) for q in CALLS if "." in q}}
    assert set(functions) == set(CALLS), "every public function has a valid call in CALLS"
    for cls, function in CONSTRUCTORS.items():
        own = list(inspect.signature(getattr(hookkit, cls)).parameters)
        assert own == list(inspect.signature(getattr(hookkit, function)).parameters), (
            f"hookkit.{cls}(...) takes other parameters than hookkit.{function}(...)")
    covered = {(b.function, b.param) for b in BAD} | HANDED_ON | CHECKED_ELSEWHERE
    missing = [(name, p) for name, f in functions.items() for p in inspect.signature(f).parameters
               if p != "self" and (name, p) not in covered]
    assert not missing, f"parameters with no bad value in BAD: {missing}"


# -- valid calls work (so that each bad call fails for its one bad value) --------------------------------------------
def _finish(result: Any) -> None:
    """Remove the hooks a context manager made if a call returned one (a valid call, or a bad one not refused)."""
    if not hasattr(result, "__exit__"):
        return
    if hasattr(result, "remove"):
        result.remove()
    elif hasattr(result, "close"):
        result.close()


# What a function's valid call needs beyond the core; without it, its rows skip (CI's torch-2.13 environment).
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("safetensors", "matplotlib", "torchvision")}
NEEDS = {"load": "safetensors", "Capture.save": "safetensors", "plot_run": "matplotlib", "Sweep.save_png": "matplotlib",
         "feature_grid": "torchvision", "save_feature_grid": "torchvision"}


def _skip_without_extra(function: str) -> None:
    extra = NEEDS.get(function)
    if extra is not None and not HAVE[extra]:
        pytest.skip(f"{function} needs {extra}: pip install 'hookkit[save,plot,torchvision]'")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("arguments"))


@pytest.mark.parametrize("function", sorted(CALLS))
def test_the_valid_call_works(env, function):
    _skip_without_extra(function)
    before = hookkit.hook_census(env.model)
    try:
        _finish(CALLS[function](env))
    finally:
        assert hookkit.hook_census(env.model) == before
        _clear(env.out)


def _clear(folder: Path) -> None:
    if folder.exists():
        for p in sorted(folder.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        folder.rmdir()


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_a_bad_argument_is_a_hookkit_error_naming_the_parameter_and_changes_nothing(env, bad):
    _skip_without_extra(bad.function)
    value = bad.value(env) if _made(bad.value) else bad.value
    census = hookkit.hook_census(env.model)
    files = _listing(env.tmp)
    params = [p.detach().clone() for p in env.model.parameters()]
    with pytest.raises(HookkitError) as info:
        _finish(CALLS[bad.function](env, **{bad.param: value}))
    exc = info.value
    assert isinstance(exc, bad.error), f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ArgumentTypeError):
        assert isinstance(exc, TypeError)
    if isinstance(exc, ArgumentError):
        assert isinstance(exc, ValueError)
    assert (bad.names or bad.param) in str(exc), f"the message does not name {bad.names or bad.param!r}: {exc}"
    assert hookkit.hook_census(env.model) == census
    assert _listing(env.tmp) == files, "a refused call wrote or removed a file"
    assert all(torch.equal(a, b) for a, b in zip(params, env.model.parameters(), strict=True))
