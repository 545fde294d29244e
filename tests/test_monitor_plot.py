"""Drawing and tabulating a ``hookkit.monitor`` run (issue 12): ``plot_run`` chooses lines or a heatmap per panel,
log scales for norms and ratios, marks non-finite values and alerts; ``summary_table`` shows last / range / first
non-finite per layer; ``hookkit plot`` prints the table, writes the PNG, and turns every problem into exit code 2.

The runs are synthetic ``monitor.jsonl`` files written here, in the format ``hookkit.monitoring.sinks`` writes
(non-finite floats as ``"nan"`` / ``"inf"`` strings or ``null``), so these tests do not depend on the monitor itself;
the example that does is run at the end, once ``hookkit.monitor`` exists.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import hookkit
import hookkit.cli.plot
from hookkit import HookkitError, PlotError
from hookkit.cli import run
from hookkit.monitoring.plot import MAX_LINES, _draw, plot_run, read_run, summary_table

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib: pip install 'hookkit[plot]'")
ROOT = Path(__file__).resolve().parents[1]


def layer_stats(i: int, step: int) -> dict:
    return {"act_mean": 0.1 * i, "act_std": 1.0 + i + step / 100, "act_absmax": 3.0 + i, "zero_frac": 0.5,
            "nan": 0, "inf": 0, "grad_norm": 0.01 * (i + 1)}


def param_stats(i: int, step: int) -> dict:
    return {"grad_norm": 0.1 * (i + 1), "weight_norm": 2.0 + i,
            "update_ratio": None if step == 0 else 10.0 ** -(i % 4 + 1)}


def make_run(folder: Path, *, layers: int = 3, params: int = 4, steps: tuple[int, ...] = (0, 10, 20, 30),
             edit=None) -> Path:
    """A run folder with ``monitor.jsonl``: layers ``l0..``, parameters ``l<k>.weight``; ``edit(record)`` changes
    a record before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "monitor.jsonl", "w") as f:
        for step in steps:
            record = {"step": step, "time": 1764150000.0 + step,
                      "layers": {f"l{i}": layer_stats(i, step) for i in range(layers)},
                      "params": {f"l{i % max(layers, 1)}.w{i}": param_stats(i, step) for i in range(params)},
                      "histograms": {}, "alerts": []}
            if edit is not None:
                edit(record)
            f.write(json.dumps(record) + "\n")
    return folder


def render(table) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def cli(argv: list[str]) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    return run(["plot", *argv], console=console), console.file.getvalue()


def panels(fig):
    """The figure's panels, without colorbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")
            and line.get_gid() is None]


# -- reading -------------------------------------------------------------------------------------------------------
def test_a_run_is_its_folder_or_its_jsonl_file_in_step_order(tmp_path):
    make_run(tmp_path / "run", steps=(20, 0, 10))
    assert [r["step"] for r in read_run(tmp_path / "run")] == [0, 10, 20]
    assert read_run(tmp_path / "run") == read_run(tmp_path / "run" / "monitor.jsonl")


def test_a_missing_run_says_what_to_pass(tmp_path):
    with pytest.raises(PlotError, match=r"no monitor run at .*nowhere.*hookkit.monitor\(log=...\)"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(PlotError, match="without monitor.jsonl.*metrics.jsonl"):
        read_run(tmp_path / "other")


def test_an_empty_log_is_an_error_that_says_no_step_was_recorded(tmp_path):
    (tmp_path / "monitor.jsonl").write_text("\n")
    with pytest.raises(PlotError, match="holds no records.*mon.step()"):
        read_run(tmp_path)


def test_a_torn_last_line_is_left_out_with_a_warning_but_a_bad_middle_line_is_an_error(tmp_path):
    make_run(tmp_path)
    with open(tmp_path / "monitor.jsonl", "a") as f:
        f.write('{"step": 40, "lay')
    with pytest.warns(UserWarning, match="cut short"):
        assert [r["step"] for r in read_run(tmp_path)] == [0, 10, 20, 30]
    lines = (tmp_path / "monitor.jsonl").read_text().splitlines()
    (tmp_path / "monitor.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:4]]) + "\n")
    with pytest.raises(PlotError, match="line 2 is not JSON"):
        read_run(tmp_path)


@pytest.mark.parametrize(("line", "match"), [
    ("3", r"line 2 is not JSON of a monitor record \(a JSON integer, not an object\): '3'"),
    ('{"layers": {}}', r"line 2 is not a monitor record \(it has no \"step\", expected an integer\)"),
])
def test_a_line_that_is_not_a_monitor_record_is_an_error(tmp_path, line, match):
    (tmp_path / "monitor.jsonl").write_text('{"step": 0}\n' + line + "\n")
    with pytest.raises(PlotError, match=match):
        read_run(tmp_path)


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda r: r.update(layers=[1, 2]), r'"layers" is a JSON list, expected an object'),
    (lambda r: r.update(layers="l0"), r'"layers" is a JSON string, expected an object'),
    (lambda r: r.update(params=3), r'"params" is a JSON integer, expected an object'),
    (lambda r: r["layers"].update(l1=[0.5]), r'"layers" \'l1\' is a JSON list, expected an object \{statistic'),
    (lambda r: r["params"].update({"l0.w0": None}), r'"params" \'l0.w0\' is null, expected an object'),
    (lambda r: r["layers"]["l0"].update(act_std="big"),
     r'"layers" \'l0\' statistic \'act_std\' is a JSON string \("big"\), expected a number, null, "nan"'),
    (lambda r: r["layers"]["l2"].update(nan=True), r"statistic 'nan' is a JSON boolean"),
    (lambda r: r["params"]["l1.w1"].update(grad_norm={"v": 1}), r"statistic 'grad_norm' is a JSON object"),
    (lambda r: r.update(step="10"), r'"step" is a JSON string, expected an integer'),
    (lambda r: r.update(step=10.0), r'"step" is a JSON number, expected an integer'),
    (lambda r: r.update(step=None), r'"step" is null, expected an integer'),
    (lambda r: r.update(time="noon"), r'"time" is a JSON string, expected a number'),
    (lambda r: r.update(alerts={"step": 10}), r'"alerts" is a JSON object, expected a list of objects'),
    (lambda r: r.update(alerts=5), r'"alerts" is a JSON integer, expected a list'),
    (lambda r: r.update(alerts=["nan at l0"]), r'"alerts" item 0 is a JSON string, expected an object'),
    (lambda r: r.update(alerts=[{"step": "x"}]), r'"alerts" item 0 "step" is a JSON string, expected an integer'),
    (lambda r: r.update(histograms=[]), r'"histograms" is a JSON list, expected an object'),
    (lambda r: r.update(histograms={"l0/activation": [1, 2]}), r"\"histograms\" 'l0/activation' is a JSON list"),
])
def test_a_record_field_of_the_wrong_shape_is_a_plot_error_naming_the_line(tmp_path, capsys, edit, reason):
    """Each field a record holds, of a shape hookkit never writes, is one PlotError naming the line and the field,
    through hookkit.plot_run, read_run and `hookkit plot` (a list as "layers" used to raise AttributeError)."""
    make_run(tmp_path / "run", edit=lambda r: edit(r) if r["step"] == 20 else None)  # line 3 of 4
    match = r"line 3 is not a monitor record \(.*" + reason
    with pytest.raises(PlotError, match=match):
        read_run(tmp_path / "run")
    with pytest.raises(PlotError, match=match):
        hookkit.plot_run(tmp_path / "run")
    code, out = cli([str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("hookkit: error: ") and "monitor.jsonl' line 3 is not a monitor record" in err
    assert not (tmp_path / "run" / "monitor.png").exists()


def test_a_record_hookkit_writes_with_every_kind_of_value_is_read(tmp_path):
    """The shape checks refuse nothing the sink writes: null, "nan", "inf", "-inf", ints and floats."""
    def edit(r):
        r["layers"]["l0"].update(act_std="nan", act_absmax="inf", act_mean="-inf", grad_norm=None, nan=3)
        r["alerts"] = [{"kind": "nonfinite", "step": r["step"], "where": "l0", "op": None, "what": "activation",
                        "message": "nan"}]
        r["histograms"] = {"l0/activation": {"edges": [], "counts": [], "nonfinite": 4}}
    make_run(tmp_path, edit=edit)
    records = read_run(tmp_path)
    assert math.isnan(records[0]["layers"]["l0"]["act_std"]) and records[0]["layers"]["l0"]["act_mean"] == -math.inf


def test_plot_errors_are_hookkit_errors():
    assert issubclass(PlotError, HookkitError) and issubclass(PlotError, ValueError)


# -- the figure ----------------------------------------------------------------------------------------------------
@needs_matplotlib
def test_plot_run_writes_a_png_in_the_run_folder_by_default(tmp_path):
    make_run(tmp_path / "exp1")
    png = plot_run(tmp_path / "exp1")
    assert png == tmp_path / "exp1" / "monitor.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = plot_run(tmp_path / "exp1" / "monitor.jsonl", tmp_path / "pics" / "a.png", stats=["act_std"])
    assert out == tmp_path / "pics" / "a.png" and out.stat().st_size > 0


@needs_matplotlib
def test_one_panel_per_stat_with_a_line_per_layer_or_parameter(tmp_path):
    records = read_run(make_run(tmp_path, layers=3, params=4))
    fig = _draw(records, stats=["grad_norm", "update_ratio", "zero_frac"], heatmap=None)
    grad, ratio, zero = panels(fig)
    # grad_norm is the parameters' when they recorded one; zero_frac is a layer statistic
    assert line_labels(grad) == ["l0.w0", "l1.w1", "l2.w2", "l0.w3"]
    assert line_labels(ratio) == ["l0.w0", "l1.w1", "l2.w2", "l0.w3"]
    assert line_labels(zero) == ["l0", "l1", "l2"]
    assert not any(ax.get_images() for ax in panels(fig))
    assert list(ratio.get_lines()[1].get_xdata()) == [0, 10, 20, 30]
    assert list(ratio.get_lines()[1].get_ydata())[1:] == [1e-2] * 3  # the step-0 null is a gap
    assert math.isnan(ratio.get_lines()[1].get_ydata()[0])


@needs_matplotlib
def test_norms_and_ratios_have_a_log_y_axis_fractions_a_linear_one(tmp_path):
    records = read_run(make_run(tmp_path))
    fig = _draw(records, stats=["grad_norm", "update_ratio", "weight_norm", "zero_frac", "act_mean"], heatmap=None)
    assert [ax.get_yscale() for ax in panels(fig)] == ["log", "log", "log", "linear", "linear"]


@needs_matplotlib
def test_a_prefix_chooses_the_layers_or_the_parameters_grad_norm(tmp_path):
    records = read_run(make_run(tmp_path))
    layer_panel, param_panel = panels(_draw(records, stats=["layer:grad_norm", "param:grad_norm"], heatmap=None))
    assert line_labels(layer_panel) == ["l0", "l1", "l2"]
    assert line_labels(param_panel)[0] == "l0.w0"


@needs_matplotlib
def test_without_parameter_gradients_grad_norm_is_the_layers(tmp_path):
    def no_param_grads(record):
        for stats in record["params"].values():
            stats["grad_norm"] = None

    records = read_run(make_run(tmp_path, edit=no_param_grads))
    (panel,) = panels(_draw(records, stats=["grad_norm"], heatmap=None))
    assert line_labels(panel) == ["l0", "l1", "l2"]


@needs_matplotlib
def test_many_names_make_a_heatmap_whose_image_is_the_values(tmp_path):
    n = MAX_LINES + 1
    records = read_run(make_run(tmp_path, layers=n, params=n))
    fig = _draw(records, stats=["update_ratio", "act_std"], heatmap=None)
    ratio, std = panels(fig)
    assert not line_labels(ratio) and len(ratio.get_images()) == 1
    image = ratio.get_images()[0].get_array()
    assert image.shape == (n, 4)
    assert image.mask[:, 0].all()  # step 0: no update ratio yet
    expected = [[10.0 ** -(i % 4 + 1)] * 3 for i in range(n)]
    assert np.asarray(image[:, 1:]) == pytest.approx(np.array(expected))
    assert type(ratio.get_images()[0].norm).__name__ == "LogNorm"
    std_image = std.get_images()[0]
    assert np.asarray(std_image.get_array()) == pytest.approx(
        np.array([[1.0 + i + s / 100 for s in (0, 10, 20, 30)] for i in range(n)]))
    assert type(std_image.norm).__name__ == "Normalize"
    assert [t.get_text() for t in std.get_yticklabels()] == [f"l{i}" for i in range(n)]


@needs_matplotlib
def test_heatmap_true_draws_few_names_as_a_heatmap_and_false_many_as_lines(tmp_path):
    records = read_run(make_run(tmp_path / "few", layers=2))
    (panel,) = panels(_draw(records, stats=["zero_frac"], heatmap=True))
    assert len(panel.get_images()) == 1 and not line_labels(panel)
    records = read_run(make_run(tmp_path / "many", layers=MAX_LINES + 3))
    (panel,) = panels(_draw(records, stats=["zero_frac"], heatmap=False))
    assert len(line_labels(panel)) == MAX_LINES + 3 and not panel.get_images()


@needs_matplotlib
def test_non_finite_values_are_gaps_marked_with_an_x_at_their_step(tmp_path):
    def blow_up(record):
        if record["step"] == 20:
            record["params"]["l1.w1"]["grad_norm"] = "inf"
            record["layers"]["l2"]["act_std"] = "nan"
            record["layers"]["l2"]["nan"] = 7
            record["alerts"] = [{"kind": "nonfinite", "step": 20, "where": "l2", "op": None, "what": "activation",
                                 "message": "NaN in l2"}]

    records = read_run(make_run(tmp_path, edit=blow_up))
    grad, std = panels(_draw(records, stats=["grad_norm", "act_std"], heatmap=None))
    grad_line = grad.get_lines()[1]
    assert grad_line.get_label() == "l1.w1" and math.isnan(grad_line.get_ydata()[2])
    (mark,) = [line for line in grad.get_lines() if line.get_gid() == "nonfinite"]
    assert list(mark.get_xdata()) == [20] and mark.get_color() == grad_line.get_color()
    assert [list(m.get_xdata()) for m in std.get_lines() if m.get_gid() == "nonfinite"] == [[20]]
    # the alert is a vertical line at step 20 in every panel
    for ax in (grad, std):
        (alert,) = [line for line in ax.get_lines() if line.get_gid() == "alert"]
        assert list(alert.get_xdata()) == [20, 20]
    # in a heatmap the cell is masked and marked
    (heat,) = panels(_draw(records, stats=["act_std"], heatmap=True))
    assert heat.get_images()[0].get_array().mask[2, 2]
    (mark,) = [line for line in heat.get_lines() if line.get_gid() == "nonfinite"]
    assert (list(mark.get_xdata()), list(mark.get_ydata())) == ([20], [2])
    assert plot_run(tmp_path, stats=["grad_norm", "act_std"]).exists()  # and it saves


@needs_matplotlib
def test_null_for_a_non_finite_value_is_drawn_as_a_gap_without_a_mark(tmp_path):
    def null(record):
        record["layers"]["l0"]["act_std"] = None

    records = read_run(make_run(tmp_path, edit=null))
    (panel,) = panels(_draw(records, stats=["act_std"], heatmap=None))
    assert all(math.isnan(v) for v in panel.get_lines()[0].get_ydata())
    assert not [line for line in panel.get_lines() if line.get_gid() == "nonfinite"]


def test_an_unknown_stat_is_refused_with_the_closest_names(tmp_path):
    make_run(tmp_path)
    with pytest.raises(PlotError, match=r"unknown statistic 'update_ration'\. Did you mean 'update_ratio'"):
        plot_run(tmp_path, stats=["update_ration"])
    with pytest.raises(PlotError, match="stats is empty"):
        plot_run(tmp_path, stats=[])


def test_without_matplotlib_plot_run_says_what_to_install(tmp_path, monkeypatch):
    make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install 'hookkit\[plot\]'"):
        plot_run(tmp_path)


# -- the table -----------------------------------------------------------------------------------------------------
def test_summary_table_has_a_row_per_layer_with_last_value_and_range(tmp_path):
    text = render(summary_table(read_run(make_run(tmp_path, layers=2, params=2))))
    assert "hookkit monitor: 4 recorded steps (0-30)" in text
    row = next(line for line in text.splitlines() if "│ l1 " in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    # act std 2.0 + step/100: last 2.3, range 2 - 2.3; update ratio of l1.w1 is 1e-2 from step 10 on
    assert cells == ["l1", "2.3", "4", "0.5", "0.02", "0.01", "-"]
    header = next(line for line in text.splitlines() if "Layer" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]][-2:] == ["update ratio", "non-finite"]


def test_summary_table_shows_the_first_non_finite_step_and_what(tmp_path):
    def blow_up(record):
        if record["step"] >= 20:
            record["layers"]["l0"]["inf"] = 2
            record["layers"]["l0"]["act_absmax"] = "inf"
        if record["step"] == 30:
            record["alerts"] = [{"kind": "nonfinite", "step": 30, "where": "l1", "op": "aten::div", "what": "grad",
                                 "message": "inf"}]

    text = render(summary_table(read_run(make_run(tmp_path, layers=2, edit=blow_up))))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│ l")}
    assert "step 20 (inf, act_absmax)" in rows["l0"] and "│ inf " in rows["l0"]
    assert "step 30 (grad)" in rows["l1"]
    assert "1 alert" in text


def test_summary_table_of_no_records_says_so():
    assert "no recorded steps" in render(summary_table([]))


def test_parameters_outside_the_recorded_layers_are_counted_in_the_caption(tmp_path):
    def extra(record):
        record["params"]["head.bias"] = param_stats(0, record["step"])

    text = render(summary_table(read_run(make_run(tmp_path, edit=extra))))
    assert "1 parameter outside the recorded layers (e.g. head.bias)" in text


# -- the command ---------------------------------------------------------------------------------------------------
@needs_matplotlib
def test_hookkit_plot_prints_the_table_and_writes_the_png(tmp_path):
    make_run(tmp_path / "exp1")
    code, out = cli([str(tmp_path / "exp1")])
    assert code == 0
    assert "hookkit monitor: 4 recorded steps" in out and "│ l2 " in out
    assert f"wrote {tmp_path / 'exp1' / 'monitor.png'}" in out.replace("\n", "")
    assert (tmp_path / "exp1" / "monitor.png").exists()
    code, out = cli([str(tmp_path / "exp1"), "--out", str(tmp_path / "x.png"), "--stats", "act_std", "--heatmap"])
    assert code == 0 and (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["{run}", "--stats", "grad_nrom"], "--stats: unknown statistic 'grad_nrom'. Did you mean 'grad_norm'"),
    (["{tmp}/nowhere"], "no monitor run at"),
    (["{empty}"], "holds no records"),
    (["{run}", "--out", "{tmp}"], "is a folder; pass the PNG file to write"),
    (["{run}", "--out", "{tmp}/x.jpg"], "does not end in .png"),
])
def test_hookkit_plot_mistakes_are_one_error_line_and_exit_code_2(tmp_path, capsys, argv, message):
    make_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "monitor.jsonl").write_text("")
    argv = [a.format(run=tmp_path / "run", tmp=tmp_path, empty=tmp_path / "empty") for a in argv]
    code, out = cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert err.startswith("hookkit: error: ") and message in " ".join(err.split())
    assert not (tmp_path / "run" / "monitor.png").exists()


def test_hookkit_plot_without_matplotlib_prints_the_table_and_the_install_line(tmp_path, monkeypatch, capsys):
    make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, out = cli([str(tmp_path)])
    assert code == 0 and "hookkit monitor: 4 recorded steps" in out  # the table needs no matplotlib
    assert "pip install 'hookkit[plot]'" in " ".join(out.split()) and capsys.readouterr().err == ""
    assert not (tmp_path / "monitor.png").exists()


def test_hookkit_plot_is_listed_in_the_help(capsys):
    assert run(["--help"]) == 0
    assert "plot" in capsys.readouterr().out and hookkit.cli.plot.register


# -- the example ---------------------------------------------------------------------------------------------------
@needs_matplotlib
@pytest.mark.skipif(not hasattr(hookkit, "monitor"), reason="hookkit.monitor has not landed yet")
def test_the_monitor_training_example_runs_and_its_bad_head_stands_out(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "monitor_training.py"), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "monitor.png").exists()
    records = read_run(tmp_path / "run")
    last = records[-1]["params"]
    head = last["head.weight"]["update_ratio"]
    body = max(v["update_ratio"] for k, v in last.items() if not k.startswith("head."))
    assert head > 30 * body, (head, body)


# -- with the real writer and monitor ------------------------------------------------------------------------------
def test_what_the_jsonl_sink_writes_is_read_back_with_its_non_finite_values(tmp_path):
    from hookkit.monitoring.sinks import JsonlSink

    sink = JsonlSink(tmp_path / "monitor.jsonl")
    for step, value in ((0, 1.0), (5, math.nan), (10, math.inf)):
        sink.write({"step": step, "time": 0.0, "layers": {"fc": {"act_std": value, "nan": int(step == 5), "inf": 0}},
                    "params": {"fc.weight": {"grad_norm": value, "weight_norm": 1.0, "update_ratio": None}},
                    "histograms": {}, "alerts": []})
    sink.close()
    records = read_run(tmp_path)
    std = [r["layers"]["fc"]["act_std"] for r in records]
    assert std[0] == 1.0 and math.isnan(float(std[1])) and float(std[2]) == math.inf
    row = next(line for line in render(summary_table(records)).splitlines() if line.startswith("│ fc "))
    assert "│ inf " in row and "step 5 (nan, act_std)" in row


@needs_matplotlib
def test_a_monitored_training_run_is_drawn_with_a_line_per_parameter(tmp_path):
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hookkit.monitor(model, ["0", "2"], every=2, log=tmp_path, summary=False) as mon:
        for _ in range(6):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    records = read_run(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4]
    ratio, zero = panels(_draw(records, stats=["update_ratio", "zero_frac"], heatmap=None))
    assert line_labels(ratio) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert line_labels(zero) == ["0", "2"]
    drawn = ratio.get_lines()[0].get_ydata()
    assert list(drawn[1:]) == pytest.approx([r["params"]["0.weight"]["update_ratio"] for r in records[1:]])


# -- a layer's parameters, grouped ---------------------------------------------------------------------------------
def weights_and_biases(record):
    record["params"] = {f"{layer}.{leaf}": param_stats(i, record["step"])
                        for layer in ("l2", "l0", "l1") for i, leaf in enumerate(("weight", "bias", "gamma"))
                        if leaf != "gamma" or layer == "l1"}


@needs_matplotlib
def test_a_layers_weight_and_bias_share_its_colour_solid_and_dashed_and_sit_together_in_the_legend(tmp_path):
    records = read_run(make_run(tmp_path, layers=3, edit=weights_and_biases))
    params, layers = panels(_draw(records, stats=["update_ratio", "act_std"], heatmap=None))
    lines = {line.get_label(): line for line in params.get_lines() if line.get_gid() is None}
    for layer in ("l0", "l1", "l2"):
        weight, bias = lines[f"{layer}.weight"], lines[f"{layer}.bias"]
        assert weight.get_color() == bias.get_color()
        assert (weight.get_linestyle(), bias.get_linestyle()) == ("-", "--")
    assert lines["l1.gamma"].get_color() == lines["l1.weight"].get_color()
    assert lines["l1.gamma"].get_linestyle() not in ("-", "--")
    assert len({lines[f"{layer}.weight"].get_color() for layer in ("l0", "l1", "l2")}) == 3
    # the layer's own line (its output statistics) has its colour in the other panel
    own = {line.get_label(): line.get_color() for line in layers.get_lines() if line.get_gid() is None}
    assert all(own[layer] == lines[f"{layer}.weight"].get_color() for layer in ("l0", "l1", "l2"))
    # the legend lists the parameters layer by layer, in the order of the layers
    legend = [t.get_text() for t in params.get_legend().get_texts()]
    assert legend == ["l0.weight", "l0.bias", "l1.weight", "l1.bias", "l1.gamma", "l2.weight", "l2.bias"]
