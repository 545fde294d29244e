"""hookkit.monitor(): statistics against the same formulas computed by hand from raw hooks, the first non-finite
output at its exact step and layer, hooks that come off on every exit path, and what unrecorded steps leave hooked."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import hookkit
from hookkit import hook_census

LAYERS = ["0", "1", "2", "3"]


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(12, 6, generator=g) for _ in range(n)]


def by_hand(model: nn.Sequential, xs: list[torch.Tensor], lr: float = 0.1) -> dict[int, dict]:
    """Train with plain SGD, computing every statistic of every step with raw hooks and float64 formulas."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out: dict[int, dict] = {}
    for step, x in enumerate(xs):
        acts: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        handles = []
        for name in LAYERS:
            def fwd(module, args, output, name=name, acts=acts, grads=grads):
                acts[name] = output.detach().double().clone()
                output.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().double().clone()))
            handles.append(model[int(name)].register_forward_hook(fwd))
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        model(x).pow(2).mean().backward()
        grad_norms = {n: float(p.grad.double().norm()) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for h in handles:
            h.remove()
        layers = {}
        for name, a in acts.items():
            layers[name] = {"act_mean": float(a.mean()), "act_std": float(a.std()), "act_absmax": float(a.abs().max()),
                            "zero_frac": float((a == 0).double().mean()), "nan": 0, "inf": 0,
                            "grad_norm": float(grads[name].norm())}
        params = {}
        for n, p in model.named_parameters():
            w = p.detach().double()
            params[n] = {"grad_norm": grad_norms[n], "weight_norm": float(w.norm()),
                         "update_ratio": float((w - before[n]).norm() / w.norm())}
        out[step] = {"layers": layers, "params": params}
    return out


def train(model: nn.Module, xs: list[torch.Tensor], mon: hookkit.Monitor, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x in xs:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
        if mon.should_stop:
            break


def test_statistics_equal_the_formulas_by_hand_across_optimizer_steps():
    xs = batches(7)
    want = by_hand(small_model(), xs)
    model = small_model()
    with hookkit.monitor(model, LAYERS, every=3, summary=False) as mon:
        train(model, xs, mon)
    assert [r["step"] for r in mon.records] == [0, 3, 6]
    for record in mon.records:
        expected = want[record["step"]]
        assert set(record["layers"]) == set(LAYERS)
        assert set(record["params"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # those of the layers
        for group in ("layers", "params"):
            for name, stats in expected[group].items():
                if name not in record[group]:
                    continue
                for key, value in stats.items():
                    got = record[group][name][key]
                    assert got == pytest.approx(value, rel=1e-6, abs=1e-9), (record["step"], group, name, key)
    # the ReLU's dead units are counted, and its update-free parameters are not listed
    assert 0.2 < mon.records[0]["layers"]["1"]["zero_frac"] < 0.8
    assert set(mon.records[0]["params"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_layer_called_twice_per_step_pools_both_calls():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(5, 4)
    with hookkit.monitor(model, ["0"], every=1, params=False, summary=False) as mon:
        model(x).sum().backward()
        mon.step()
    with torch.no_grad():
        first = shared(x)
        both = torch.cat([first, shared(torch.relu(first))]).double()
    stats = mon.records[0]["layers"]["0"]
    assert stats["act_mean"] == pytest.approx(float(both.mean()))
    assert stats["act_std"] == pytest.approx(float(both.std()))


@pytest.mark.parametrize("at_step, layer", [(7, "2"), (5, "0"), (11, "3")])
def test_a_nan_injected_at_a_step_and_layer_is_reported_at_exactly_that_step_and_layer(at_step, layer):
    model = small_model()
    steps = [0]

    def inject(module, args, output):
        if steps[0] == at_step:
            output = output.clone()
            output[0, 0] = float("nan")
            return output
        return None

    model[int(layer)].register_forward_hook(inject)
    with pytest.warns(UserWarning, match=rf"step {at_step}: '{layer}' produced NaN"):
        with hookkit.monitor(model, LAYERS, every=5, summary=False) as mon:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for x in batches(14):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                mon.step()
                steps[0] += 1
    assert [(a["step"], a["where"]) for a in mon.alerts] == [(at_step, layer)]
    record = next(r for r in mon.records if r["alerts"])
    assert record["step"] == at_step and record["alerts"][0]["where"] == layer


def test_raise_and_stop_end_the_run_at_the_first_nonfinite_output_with_every_hook_off():
    for mode in ("raise", "stop"):
        model = small_model()
        before = hook_census(model)
        xs = batches(6)
        xs[4] = xs[4].clone()
        xs[4][0, 0] = float("inf")
        if mode == "raise":
            with pytest.raises(hookkit.NonFiniteError, match="step 4: '0' produced NaN or Inf"):
                with hookkit.monitor(model, LAYERS, every=100, on_nonfinite=mode, summary=False) as mon:
                    train(model, xs, mon)
        else:
            with hookkit.monitor(model, LAYERS, every=100, on_nonfinite=mode, summary=False) as mon:
                train(model, xs, mon)
            assert mon.should_stop and mon.steps == 5
        assert hook_census(model) == before


def test_hooks_come_off_when_training_raises_mid_run_on_a_recorded_step():
    model = small_model()
    before = hook_census(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hookkit.monitor(model, LAYERS, every=2, summary=False) as mon:
            for i, x in enumerate(batches(5)):
                out = model(x)
                if i == 2:  # a recorded step, its hooks in place
                    raise RuntimeError("boom")
                out.sum().backward()
                mon.step()
    assert hook_census(model) == before
    assert [r["step"] for r in mon.records] == [0]


def test_unrecorded_steps_keep_only_the_light_forward_hooks():
    model = small_model()
    before = hook_census(model)
    with hookkit.monitor(model, LAYERS, every=4, summary=False) as mon:
        x = batches(1)[0]
        recorded = hook_census(model)
        assert mon.recording
        model(x).sum().backward()
        mon.step()  # step 1 is not recorded
        during = hook_census(model)
        assert not mon.recording
        for name in LAYERS:  # fewer forward hooks than on a recorded step, and no parameter hooks
            assert 0 < len(during[f"{name}._forward_hooks"]) < len(recorded[f"{name}._forward_hooks"])
        assert any(v for k, v in recorded.items() if k.startswith("param "))
        assert all(not v for k, v in during.items() if k.startswith("param "))
    assert hook_census(model) == before


class KeepsWeakRefs(nn.Module):
    """``small_model``'s layers, noting a weak reference to the storage of every layer output of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_model()
        self.outputs: list = []

    def forward(self, x):
        from torch.multiprocessing.reductions import StorageWeakRef

        for layer in self.net:
            x = layer(x)
            self.outputs.append(StorageWeakRef(x.untyped_storage()))
        return x


@pytest.mark.parametrize("ops", [False, True])
def test_the_every_step_check_keeps_no_layer_output_past_its_step(ops):
    """The non-finite check of every step sums each output and keeps nothing else, so memory does not grow with the
    run: after many steps, recorded or not, the output of every layer of every finished step has been freed."""
    import gc

    model = KeepsWeakRefs()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with hookkit.monitor(model, ["net.0", "net.1", "net.2", "net.3"], every=10, ops=ops, summary=False) as mon:
        for x in batches(30):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
        gc.collect()
        alive = [i for i, ref in enumerate(model.outputs) if not ref.expired()]
        assert len(model.outputs) == 30 * 5 and alive == [], f"{len(alive)} layer outputs outlived their step"
    assert [r["step"] for r in mon.records] == [0, 10, 20]


def test_default_layers_are_every_submodule_and_bad_options_are_refused_before_any_hook():
    model = small_model()
    with hookkit.monitor(model, every=1, summary=False) as mon:
        model(batches(1)[0]).sum().backward()
        mon.step()
    assert set(mon.records[0]["layers"]) == {"0", "1", "2", "3", "4"}
    nested = nn.Sequential(small_model(), nn.Sigmoid())  # every submodule, as trace and summary: not the children
    with hookkit.monitor(nested, every=1, summary=False) as mon:
        nested(batches(1)[0]).sum().backward()
        mon.step()
    assert set(mon.records[0]["layers"]) == {"0", "0.0", "0.1", "0.2", "0.3", "0.4", "1"}
    before = hook_census(model)
    for kwargs, error, match in [({"every": 0}, ValueError, "every=0"), ({"on_nonfinite": "ignore"}, ValueError,
                                 "on_nonfinite"), ({"layers": ["nope"]}, hookkit.LayerNotFoundError, "nope")]:
        with pytest.raises(error, match=match):
            hookkit.monitor(model, **kwargs)
        assert hook_census(model) == before


def test_step_outside_the_block_is_an_error():
    mon = hookkit.monitor(small_model(), every=1, summary=False)
    with pytest.raises(RuntimeError, match="inside"):
        mon.step()


def test_no_nonfinite_no_warning_and_the_summary_is_printed_at_the_end():
    import io

    from rich.console import Console

    model = small_model()
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hookkit.monitor(model, LAYERS, every=2, console=Console(file=buf, width=160)) as mon:
            train(model, batches(4), mon)
    assert "2" in buf.getvalue() and mon.alerts == []
    assert all(math.isfinite(r["layers"]["0"]["act_mean"]) for r in mon.records)


def test_under_ddp_every_rank_finishes_the_same_reduced_statistics_and_only_rank_0_writes(tmp_path):
    """Each rank's numbers (each its own data) are reduced before any statistic is finished, so every rank holds the
    same record; rank 0 alone hands it to the sinks (the values against one process on the global batch:
    tests/test_monitor_distributed.py)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(here / "_monitor_worker.py"), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["sunk"] == []  # only rank 0 writes
    sunk = ranks[0]["sunk"]
    assert [r["step"] for r in sunk] == [0, 2]
    for i, record in enumerate(sunk):
        for r in range(2):
            own = ranks[r]["own"][i]
            assert own["layers"] == record["layers"] and own["params"] == record["params"], r
        assert all(v is not None for stats in record["layers"].values() for v in stats.values())


class SqrtBlock(nn.Module):
    """A block whose own forward has ops: the sqrt makes NaN once its input goes negative."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.shift = 0.0

    def forward(self, x):
        h = self.lin(x)
        return torch.sqrt(h.abs() - self.shift) * 2


@pytest.mark.parametrize("ops", [True, False])
def test_with_ops_the_alert_names_the_op_inside_the_layer_at_its_step(ops):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), SqrtBlock(), nn.Linear(4, 1))
    before = hook_census(model)
    with pytest.warns(UserWarning, match=r"step 3: "), hookkit.monitor(
            model, ["0", "1", "2"], every=2, ops=ops, summary=False) as mon:
        for step in range(5):
            model[1].shift = 1e6 if step == 3 else 0.0  # only step 3 takes the sqrt of negative numbers
            model(torch.randn(8, 4)).sum().backward()
            model.zero_grad()
            mon.step()
    assert hook_census(model) == before
    [alert] = mon.alerts
    assert (alert["step"], alert["where"]) == (3, "1")
    if ops:
        assert alert["op"] == "1.sqrt (torch.sqrt)"
        assert "'1.sqrt' (torch.sqrt) in '1' (SqrtBlock)" in alert["message"]
    else:
        assert alert["op"] is None and "ops=True" in alert["message"]


@pytest.mark.parametrize(("option", "error", "match"), [
    ({"console": "io"}, hookkit.ArgumentTypeError, r"console= takes a rich.console.Console, got StringIO"),
    ({"console": print}, hookkit.ArgumentTypeError, r"console= takes a rich.console.Console"),
    ({"every": 2.0}, hookkit.ArgumentTypeError, r"every=2.0 \(float\)"),
    ({"every": True}, hookkit.ArgumentTypeError, r"every=True"),
    ({"every": -3}, hookkit.ArgumentError, r"every=-3: record every N-th step"),
    ({"params": "yes"}, hookkit.ArgumentTypeError, r"params='yes' \(str\): params= takes True or False"),
    ({"histograms": 1}, hookkit.ArgumentTypeError, r"histograms=1 \(int\)"),
    ({"ops": None}, hookkit.ArgumentTypeError, r"ops=None"),
    ({"summary": "no"}, hookkit.ArgumentTypeError, r"summary='no'"),
    ({"on_nonfinite": "Raise"}, hookkit.ArgumentError, r"on_nonfinite='Raise': use 'warn', 'raise' or 'stop'"),
    ({"on_nonfinite": 0}, hookkit.ArgumentTypeError, r"on_nonfinite=0 \(int\)"),
    ({"log": 3}, hookkit.ArgumentTypeError, r"log=3 \(int\): log= takes a folder"),
    ({"log": ""}, hookkit.ArgumentError, r"log='': name a folder"),
    ({"log": "{file}"}, hookkit.ArgumentError, r"is not a folder; pass a folder for monitor.jsonl"),
    ({"log": "{file}/run"}, hookkit.ArgumentError, r"lies below .*a_file.txt', which is not a folder"),
    ({"sinks": ["jsonl", "csv"]}, hookkit.ArgumentError, r"unknown sink 'csv'"),
    ({"sinks": [3]}, hookkit.ArgumentTypeError, r"sink item 3 \(int\) is not a sink"),
])
def test_every_bad_option_is_refused_when_the_block_is_made_before_any_hook_or_file(tmp_path, option, error, match):
    """A mistake in an option is found when ``monitor(...)`` is called, not when the block ends after the training
    loop ran (a StringIO as console used to fail with AttributeError at the end)."""
    import io

    (tmp_path / "a_file.txt").write_text("not a folder")
    key, value = next(iter(option.items()))
    value = io.StringIO() if value == "io" else value
    value = value.format(file=tmp_path / "a_file.txt") if isinstance(value, str) else value
    kwargs = {"log": str(tmp_path / "run"), key: value} if key != "log" else {key: value}
    model = small_model()
    census = hook_census(model)
    modes = torch.overrides._get_current_function_mode_stack()
    with pytest.raises(error, match=match) as info:
        hookkit.monitor(model, LAYERS, **kwargs)
    assert isinstance(info.value, hookkit.HookkitError)
    assert hook_census(model) == census and torch.overrides._get_current_function_mode_stack() == modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt"]  # no run folder, no monitor.jsonl


def test_a_model_that_is_no_module_is_refused_naming_it(tmp_path):
    with pytest.raises(hookkit.ArgumentTypeError, match=r"model='resnet18' \(str\): monitor watches an nn.Module"):
        hookkit.monitor("resnet18", log=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stringio_console_is_refused_before_the_training_loop_runs():
    import io

    model = small_model()
    steps = []
    with pytest.raises(hookkit.ArgumentTypeError, match="Console"):
        with hookkit.monitor(model, LAYERS, every=1, console=io.StringIO()) as mon:
            for x in batches(3):
                model(x).sum().backward()
                mon.step()
                steps.append(1)
    assert steps == []  # refused when the block was made: no step of the loop ran
