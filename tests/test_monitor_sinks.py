"""hookkit.monitor()'s sinks (hookkit/monitoring/sinks.py), on synthetic records: the JSON Lines schema read back (also
after kill -9), TensorBoard events read back by tensorboard's own EventAccumulator, a W&B offline run read back from its
own .wandb file with wandb's own protobuf schema, callables, and make_sinks' choices and errors.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import hookkit
from hookkit.monitoring.records import read_jsonl
from hookkit.monitoring.sinks import (
    CallableSink,
    JsonlSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    make_sinks,
)

ROOT = Path(__file__).resolve().parents[1]


def record(step: int, *, nan: bool = False, histograms: bool = True) -> dict:
    """A record as hookkit.monitor() hands it to the sinks."""
    rng = np.random.default_rng(step)
    act = rng.standard_normal(1000).astype(np.float32)
    grad = rng.standard_normal(50).astype(np.float32)
    if nan:
        act[:3] = [np.nan, np.inf, -np.inf]
    return {
        "step": step,
        "time": 1764150000.0 + step,
        "layers": {
            "layer1": {"act_mean": float("nan") if nan else 0.5 + step, "act_std": 1.25, "act_absmax": float("inf")
                       if nan else 3.0, "zero_frac": 0.125, "nan": 1 if nan else 0, "inf": 2 if nan else 0,
                       "grad_norm": None if step == 0 else 2.0 * step},
            "fc": {"act_mean": -1.0, "act_std": 0.0, "act_absmax": 1.0, "zero_frac": 0.0, "nan": 0, "inf": 0,
                   "grad_norm": float("-inf") if nan else 0.25},
        },
        "params": {"layer1.0.conv1.weight": {"grad_norm": None if step == 0 else 0.75, "weight_norm": 10.0 + step,
                                             "update_ratio": None if step == 0 else 1e-3}},
        "histograms": {"layer1/activation": act, "layer1.0.conv1.weight/grad": grad} if histograms else {},
        "alerts": [{"kind": "nonfinite", "step": step, "where": "layer1", "op": "layer1.0.add", "what": "activation",
                    "message": f"layer1 produced 1 NaN and 2 Inf at step {step}"}] if nan else [],
    }


# -- JSON Lines -------------------------------------------------------------------------------------------------------


def test_jsonl_round_trip_keeps_statistics_none_nonfinite_alerts_and_bins_histograms(tmp_path):
    sink = JsonlSink(tmp_path / "run" / "monitor.jsonl")
    records = [record(0), record(100, nan=True), record(200)]
    for r in records:
        sink.write(r)
    sink.close()
    sink.close()  # idempotent

    lines = (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:  # valid JSON for any reader: no NaN/Infinity literals
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} in the file"))
    back = read_jsonl(tmp_path / "run" / "monitor.jsonl")
    assert [r["step"] for r in back] == [0, 100, 200]
    for original, read in zip(records, back, strict=True):
        assert read["time"] == original["time"] and read["alerts"] == original["alerts"]
        for section in ("layers", "params"):
            assert read[section].keys() == original[section].keys()
            for name, stats in original[section].items():
                for stat, value in stats.items():
                    got = read[section][name][stat]
                    if value is None:
                        assert got is None
                    elif isinstance(value, float) and math.isnan(value):
                        assert isinstance(got, float) and math.isnan(got)
                    else:
                        assert got == value and type(got) is type(value), (name, stat)
        for name, values in original["histograms"].items():
            finite = values[np.isfinite(values)]
            counts, edges = np.histogram(finite, bins=30)
            hist = read["histograms"][name]
            assert hist["counts"] == counts.tolist() and np.allclose(hist["edges"], edges)
            assert hist["nonfinite"] == values.size - finite.size
    assert back[1]["layers"]["layer1"]["act_absmax"] == math.inf
    assert back[1]["layers"]["fc"]["grad_norm"] == -math.inf
    assert back[1]["histograms"]["layer1/activation"]["nonfinite"] == 3


def test_jsonl_histogram_with_no_finite_value_has_empty_bins(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    r = record(0)
    r["histograms"] = {"empty": np.zeros(0, np.float32), "nan": np.full(4, np.nan, np.float32)}
    sink.write(r)
    sink.close()
    assert read_jsonl(tmp_path / "m.jsonl")[0]["histograms"] == {
        "empty": {"edges": [], "counts": [], "nonfinite": 0},
        "nan": {"edges": [], "counts": [], "nonfinite": 4},
    }


def test_jsonl_message_that_reads_nan_stays_a_string(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    r = record(1, nan=True)
    r["alerts"][0]["message"] = "nan"
    sink.write(r)
    sink.close()
    assert read_jsonl(tmp_path / "m.jsonl")[0]["alerts"][0]["message"] == "nan"


def test_read_jsonl_skips_a_torn_last_line_and_the_sink_cuts_it_before_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.write(record(0))
    sink.close()
    full = path.read_bytes()
    with open(path, "ab") as f:  # what a torn write at power loss leaves
        f.write(full[: len(full) // 2])
    assert [r["step"] for r in read_jsonl(path)] == [0]

    sink = JsonlSink(path)  # a resumed run appends after the last complete line
    sink.write(record(1))
    sink.close()
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]
    assert path.read_bytes().count(b"\n") == 2


def test_read_jsonl_rejects_a_broken_line_that_is_not_the_last(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"line 2: not a JSON record"):
        read_jsonl(path)


def test_read_jsonl_rejects_a_line_that_is_json_but_not_an_object(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: not a JSON record \(a JSON list, not an object\)"):
        read_jsonl(path)


def test_jsonl_write_after_close_raises(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.close()
    with pytest.raises(hookkit.UsageError, match="closed"):
        sink.write(record(0))


_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_monitor_sinks import record
    from hookkit.monitoring.sinks import JsonlSink
    sink = JsonlSink(sys.argv[1])
    step = 0
    while True:
        sink.write(record(step, nan=step % 2 == 1))
        if step == 2:
            print("3 written", flush=True)
            if sys.argv[3] == "then_waits":
                time.sleep(600)
        step += 1
    """
)


@pytest.mark.parametrize("then", ["then_waits", "goes_on_writing"])
def test_jsonl_after_kill_9_mid_run_every_written_record_is_a_complete_line(tmp_path, then):
    path = tmp_path / "m.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(Path(__file__).parent), then],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "3 written\n"
    finally:
        os.kill(writer.pid, signal.SIGKILL)  # no close(), no atexit, no buffer flushed by Python
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert data.endswith(b"\n"), "kill -9 left a partial line"
    back = read_jsonl(path)
    assert len(back) == data.count(b"\n")
    assert [r["step"] for r in back] == list(range(len(back)))
    if then == "then_waits":
        assert len(back) == 3  # each write reached the file before write() returned
    else:
        assert len(back) >= 3
    assert math.isnan(back[1]["layers"]["layer1"]["act_mean"])


# -- TensorBoard ------------------------------------------------------------------------------------------------------


def test_tensorboard_events_read_back_by_tensorboard_have_the_tags_steps_and_values(tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'hookkit[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    records = [record(0), record(10, nan=True), record(20)]
    for r in records:
        sink.write(r)
    sink.close()
    sink.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    expected = {f"{name}/{stat}" for section in ("layers", "params") for name, stats in records[0][section].items()
                for stat in stats}
    assert set(tags["scalars"]) == expected
    assert set(tags["histograms"]) == {"layer1/activation", "layer1.0.conv1.weight/grad"}

    def scalars(tag):
        return [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]

    assert scalars("layer1/act_mean")[0] == (0, 0.5, 1764150000.0)
    assert math.isnan(scalars("layer1/act_mean")[1][1]) and scalars("layer1/act_mean")[2][:2] == (20, 20.5)
    assert scalars("layer1/act_absmax")[1][1] == math.inf
    # None is left out: no grad_norm/update_ratio at step 0
    assert [s for s, _, _ in scalars("layer1/grad_norm")] == [10, 20]
    assert scalars("layer1.0.conv1.weight/update_ratio") == [(10, pytest.approx(1e-3), 1764150010.0),
                                                             (20, pytest.approx(1e-3), 1764150020.0)]
    assert [s for s, _, _ in scalars("layer1.0.conv1.weight/weight_norm")] == [0, 10, 20]

    hist = events.Histograms("layer1/activation")
    assert [h.step for h in hist] == [0, 10, 20]
    assert hist[1].histogram_value.num == 997  # the 3 non-finite values left out
    assert hist[0].histogram_value.num == 1000
    assert hist[0].histogram_value.sum == pytest.approx(float(records[0]["histograms"]["layer1/activation"].sum()),
                                                        rel=1e-4)

    texts = events.Tensors("alerts/text_summary")
    assert [t.step for t in texts] == [10]
    assert b"layer1 produced 1 NaN and 2 Inf at step 10" in texts[0].tensor_proto.string_val[0]


# -- Weights & Biases (offline) ---------------------------------------------------------------------------------------


def _wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict]:
    """The history rows of a finished offline run, from its .wandb file (wandb 0.31 has no Python reader of it: the
    file is a LevelDB-style log of 32 KiB blocks after a 7-byte ':W&B' header; each chunk is a record of wandb's own
    protobuf schema, wandb.proto.wandb_internal_pb2.Record). ``run.finish()`` can return before wandb's service
    process has written the file (seen: 1 in 4 runs), so this waits for the run's exit record."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        kinds, rows = _read_wandb_log(path.read_bytes())
        if "exit" in kinds:
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"{path}: no exit record {timeout}s after run.finish(); records: {kinds}")
        time.sleep(0.05)


def _read_wandb_log(data: bytes) -> tuple[list[str], list[dict]]:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, pending, kinds, rows = 7, b"", [], []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind not in (1, 4):
            continue
        rec = pb.Record.FromString(pending)
        kinds.append(rec.WhichOneof("record_type"))
        if kinds[-1] != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            value = json.loads(item.value_json, parse_constant=float)
            first, *rest = list(item.nested_key) or [item.key]  # wandb 0.31 writes every key as nested_key
            if rest:
                row.setdefault(first, {})[rest[-1]] = value
            else:
                row[first] = value
        rows.append(row)
    return kinds, rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs wandb: pip install 'hookkit[wandb]'")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()


def test_wandb_offline_run_history_has_the_keys_steps_values_and_histograms(tmp_path, wandb_offline):
    wandb = wandb_offline
    sink = WandbSink(mode="offline", dir=str(tmp_path), project="hookkit-test")
    assert wandb.run is sink.run
    records = [record(0), record(10, nan=True), record(20)]
    for r in records:
        sink.write(r)
    run_dir = Path(sink.run.dir).parent
    sink.close()
    sink.close()
    assert wandb.run is None  # it finished the run it started

    rows = _wandb_history(run_dir)
    assert [row["_step"] for row in rows] == [0, 10, 20]
    assert rows[0]["layer1/act_mean"] == 0.5 and rows[2]["layer1/act_mean"] == 20.5
    assert math.isnan(rows[1]["layer1/act_mean"]) and rows[1]["layer1/act_absmax"] == math.inf
    assert "layer1/grad_norm" not in rows[0] and rows[1]["layer1/grad_norm"] == 20.0
    assert rows[2]["layer1.0.conv1.weight/update_ratio"] == pytest.approx(1e-3)
    hist = rows[0]["layer1/activation"]
    counts, edges = np.histogram(records[0]["histograms"]["layer1/activation"], bins=30)
    assert hist["_type"] == "histogram" and hist["values"] == counts.tolist() and np.allclose(hist["bins"], edges)
    assert sum(rows[1]["layer1/activation"]["values"]) == 997
    assert "alerts" not in rows[0] and "step 10" in rows[1]["alerts"]


def test_wandb_sink_logs_to_the_active_run_and_leaves_it_running(tmp_path, wandb_offline):
    wandb = wandb_offline
    run = wandb.init(mode="offline", dir=str(tmp_path), project="hookkit-test")
    sink = WandbSink()
    assert sink.run is run
    sink.write(record(5, histograms=False))
    sink.close()
    assert wandb.run is run  # not finished: the user started it
    run.log({"loss": 1.0}, step=6)
    run.finish()
    rows = _wandb_history(Path(run.dir).parent)
    assert [row["_step"] for row in rows] == [5, 6] and rows[0]["fc/act_std"] == 0.0


# -- callables and make_sinks -----------------------------------------------------------------------------------------


def test_callable_sink_hands_each_record_to_the_function():
    seen = []
    sink = CallableSink(seen.append)
    r = record(3)
    sink.write(r)
    sink.close()
    sink.close()
    assert seen == [r] and isinstance(sink, Sink)
    with pytest.raises(TypeError, match="callable"):
        CallableSink("not callable")  # type: ignore[arg-type]


def test_make_sinks_log_folder_gives_jsonl_first_and_names_add_tensorboard_in_the_same_folder(tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'hookkit[tensorboard]'")
    seen = []

    class Mine:
        def write(self, record):
            seen.append(record["step"])

        def close(self):
            seen.append("closed")

    mine = Mine()
    sinks = make_sinks(tmp_path / "exp1", ["tensorboard", "jsonl", "tensorboard", mine, print])
    assert [type(s).__name__ for s in sinks] == ["JsonlSink", "TensorBoardSink", "Mine", "CallableSink"]
    assert sinks[2] is mine and sinks[3].fn is print
    assert sinks[0].path == tmp_path / "exp1" / "monitor.jsonl"
    for sink in sinks[:3]:
        sink.write(record(0, histograms=False))
        sink.close()
    assert seen == [0, "closed"] and len(read_jsonl(tmp_path / "exp1" / "monitor.jsonl")) == 1
    assert list((tmp_path / "exp1").glob("events.out.tfevents.*"))


def test_make_sinks_defaults_single_names_and_no_log():
    assert make_sinks(None, None) == []
    assert [type(s).__name__ for s in make_sinks(None, print)] == ["CallableSink"]


@pytest.mark.parametrize(
    ("log", "sinks", "error", "match"),
    [
        ("LOG", ["tensorbord"], ValueError, r"unknown sink 'tensorbord'; expected one of 'jsonl', 'tensorboard', "),
        ("LOG", [42], TypeError, r"sink item 42 \(int\) is not a sink; expected one of 'jsonl'"),
        ("LOG", 42, TypeError, r"sinks must be a list"),
        (None, ["jsonl"], ValueError, r"sink 'jsonl' writes into the log folder, but log=None"),
        (None, ["tensorboard"], ValueError, r"sink 'tensorboard' writes into the log folder, but log=None"),
    ],
)
def test_make_sinks_rejects_bad_items_before_creating_anything(tmp_path, log, sinks, error, match):
    folder = tmp_path / "exp1"
    with pytest.raises(error, match=match):
        make_sinks(folder if log else None, ["jsonl", *sinks] if isinstance(sinks, list) and log else sinks)
    assert not folder.exists()


def test_make_sinks_names_the_pip_extra_when_the_package_is_missing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'hookkit\[wandb\]'"):
        make_sinks(tmp_path / "exp1", ["wandb"])
    assert not (tmp_path / "exp1").exists()


def test_tensorboard_sink_without_tensorboard_names_the_pip_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if it were absent
    with pytest.raises(ImportError, match=r"pip install 'hookkit\[tensorboard\]'"):
        TensorBoardSink(tmp_path)


def test_wandb_sink_without_wandb_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'hookkit\[wandb\]'"):
        WandbSink()


def test_tensorboard_leaves_out_a_histogram_with_no_finite_value(tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard: pip install 'hookkit[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    r = record(0)
    r["histograms"] = {"empty": np.zeros(0, np.float32), "nan": np.full(4, np.nan, np.float32), "ok": np.ones(3)}
    sink.write(r)
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    assert events.Tags()["histograms"] == ["ok"]
