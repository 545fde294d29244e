#!/usr/bin/env python
"""Cost of op-node capture and of copy-on-write snapshots, vs a bare forward, raw hooks and torchlens (CPU).

Run by hand (not part of the test suite):

    python benchmarks/bench_ops.py                           # full run, ~10 min on 2 busy CPU cores
    python benchmarks/bench_ops.py --quick                   # ~2-3 min: fewer rounds, small ResNet input (noisier)
    python benchmarks/bench_ops.py --torchlens /tmp/tl       # also time torchlens on the same 10 op nodes
    python benchmarks/bench_ops.py --profile                 # also cProfile the hookkit variants
    python benchmarks/bench_ops.py --only tiny,memory        # some sections only

Sections:
  1. ResNet-50 (torchvision, random init, eval, no_grad): capture of 10 op nodes (the ``out += identity`` of the
     first 10 bottlenecks, ``layer1.0.add`` ... ``layer3.2.add``; target <= 1.10x bare), of 9 of those plus the
     root-scope ``flatten`` (the function mode then covers the whole forward), and a default capture of 5 blocks
     (layer1-4, avgpool; target <= 1.02x bare). Beside the measured ratios, an estimate built from pieces timed
     precisely, as bench_capture.py does: hookkit's cost per forward taken on a 1x3x32x32 input (where it is not
     drowned by convolutions) plus its copy-on-write copies cloned at the real size, over the bare forward.
  2. Tiny stack, defined as in bench_capture.py: 150 x Linear(16, 16) in an nn.Sequential, input 1 x 16; capture of
     all 150 in a ``with`` block per forward vs raw forward hooks registered and removed per forward (target 1.15x).
  3. Memory: a default all-module capture of ResNet-50 with grad enabled, one forward, vs ``clone=True``: bytes of
     the distinct storages the capture holds after the block, and ``cap.copies`` (copy-on-write copies made).
  4. torchlens (only with ``--torchlens``; it runs last, so its import and its wrapping of torch's functions cannot
     touch sections 1-3): ``torchlens.trace`` saving the same 10 ``+=`` results (its labels ``iadd_1`` ...
     ``iadd_10``), with ``unwrap_when_done=True`` so that torch's functions are restored after each call
     (``torchlens.extract``, the shorter spelling, leaves them wrapped for the rest of the process).

Method: that of bench_capture.py, whose helpers this file imports. Everything runs in one process; variants are
interleaved round by round with a rotating order, after warm-up rounds that are discarded; a ratio X/Y is the
median over rounds of the per-round ratio (paired), with its interquartile range in brackets; the time the cyclic
garbage collector spends inside timed regions is measured and shown per variant. ``torch.set_num_threads`` is fixed
and printed. Values are checked before timing, against raw hooks that clone: each ``add`` against bn3's output plus
the block's identity (the value before the ReLU(inplace=True) that overwrites it), ``flatten`` against fc's input, the
blocks against their outputs; torchlens against the same references and hookkit.
Variants that need op nodes are skipped, with the reason, on a hookkit without them.

torchlens, installed next to (not into) the project's environment, with the deps the .venv lacks:

    .venv/bin/pip install --target /tmp/tl --no-deps torchlens graphviz   # torchlens 2.36.1, graphviz 0.21
    # its other deps (numpy, packaging, safetensors, tqdm, typing_extensions, pillow) are already in .venv
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import hookkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import (  # noqa: E402  (the shared timing method and output helpers)
    TINY_DEPTH,
    TINY_LABELS,
    VARIANT_HEADER,
    Clock,
    Sample,
    _loadavg,
    _nbytes_unique,
    _time_once,
    fmt_r,
    fmt_t,
    interleave,
    micro,
    ratio,
    resnet_variants,
    say,
    summary,
    table,
    tiny_stack,
    tiny_variants,
    variant_rows,
)

perf = time.perf_counter

BLOCKS10 = ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3",
            "layer3.0", "layer3.1", "layer3.2"]
OPS10 = [f"{b}.add" for b in BLOCKS10]            # torchvision's node names for `out += identity`
OPS_FLAT = OPS10[:9] + ["flatten"]                 # 9 of them + the root-scope torch.flatten
TL_LABELS = [f"iadd_{i}" for i in range(1, 11)]    # torchlens's labels for the same 10 ops
COARSE = ["layer1", "layer2", "layer3", "layer4", "avgpool"]


def verdict(r: dict[str, float], target: float) -> str:
    return "ok" if r["median"] <= target else "MISSED"


def resnet50() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def pick_input(model: nn.Module, cfg: dict[str, Any]) -> tuple[int, int, str]:
    """bench_capture.py's rule: batch 8 x 224, reduced while one bare forward takes > 1.5 s (quick: fixed small)."""
    if cfg.get("picked"):
        return cfg["picked"]
    if cfg["resnet_input"] is not None:
        b, p = cfg["resnet_input"]
        return b, p, "fixed by --quick / --input"
    tried, t = [], 0.0
    with torch.no_grad():
        for b, p in ((8, 224), (4, 224), (4, 160)):
            x = torch.randn(b, 3, p, p)
            model(x)  # warm-up
            t = min(_time_once(model, x) for _ in range(2))
            tried.append(f"{b}x{p}px: {t:.2f} s")
            if t <= 1.5:
                break
    note = "as specified" if len(tried) == 1 else "reduced, forward > 1.5 s at " + ", ".join(tried[:-1])
    if t > 1.5:
        note += f"; still {t:.2f} s at {b}x{p}px, the smallest size tried"
    cfg["picked"] = (b, p, note + " (picked by section 1)")
    return b, p, note


def op_nodes_missing(model: nn.Module) -> str | None:
    """None if this hookkit captures op nodes, else why not (variants that need them are then skipped)."""
    try:
        with torch.no_grad(), hookkit.capture(model, ["layer1.0.add"]) as cap:
            model(torch.randn(1, 3, 64, 64))
        cap["layer1.0.add"]
    except Exception as e:  # any failure means: not available here
        return f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    return None


def raw_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """By raw hooks that clone: the outputs of the named modules; 'fc.in' (what `flatten` gave fc); and for each
    bottleneck B among ``names``, 'B.add' = the value of its `out += identity` (bn3's output + the block's input or
    downsample's output, before the ReLU(inplace=True) that overwrites it)."""
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
            out[name] = o.detach().clone()
        return hook

    def keep_input(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, a: tuple) -> None:
            out[name] = a[0].detach().clone()
        return hook

    hs = [mods[n].register_forward_hook(keep(n)) for n in names]
    hs.append(mods["fc"].register_forward_pre_hook(keep_input("fc.in")))
    blocks = [n for n in names if hasattr(mods[n], "bn3")]
    for b in blocks:
        hs.append(mods[b].register_forward_pre_hook(keep_input(f"{b}.in")))
        hs.append(mods[f"{b}.bn3"].register_forward_hook(keep(f"{b}.bn3")))
        if mods[b].downsample is not None:
            hs.append(mods[f"{b}.downsample"].register_forward_hook(keep(f"{b}.downsample")))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    for b in blocks:
        out[f"{b}.add"] = out[f"{b}.bn3"] + out.get(f"{b}.downsample", out[f"{b}.in"])
    return out


def check_values(model: nn.Module, has_ops: bool) -> dict[str, int]:
    """Assert that every timed capture stores the right values (small input); return copies made per forward."""
    x = torch.randn(2, 3, 64, 64)
    ref = raw_outputs(model, BLOCKS10 + COARSE, x)
    copies: dict[str, int] = {}
    specs: dict[str, list[str]] = {"blocks": COARSE}
    if has_ops:
        specs.update(ops10=OPS10, ops_flat=OPS_FLAT)
    for key, spec in specs.items():
        with torch.no_grad(), hookkit.capture(model, spec) as cap:
            model(x)
        for name in spec:
            # an op node's value is the one before the ReLU(inplace=True) after it (it has negative values)
            assert torch.equal(cap[name], ref["fc.in" if name == "flatten" else name]), name
            assert not name.endswith(".add") or bool((cap[name] < 0).any()), name
        copies[key] = getattr(cap, "copies", -1)
    return copies


# ----------------------------------------------------------------------------------------------------------------
# 1. ResNet-50: op nodes and 5 blocks vs bare
# ----------------------------------------------------------------------------------------------------------------


def paired_diff(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round difference num - den (seconds)."""
    return statistics.median(a - b for a, b in zip(samples[num], samples[den], strict=True))


def bench_resnet(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    model = resnet50()
    missing = op_nodes_missing(model)
    copies = check_values(model, missing is None)
    batch, px, note = pick_input(model, cfg)
    x = torch.randn(batch, 3, px, px)
    specs: dict[str, Any] = {"d": COARSE} if missing else {"b": OPS10, "c": OPS_FLAT, "d": COARSE}
    labels = {
        "a": "(a) bare forward",
        "b": "(b) hookkit.capture 10 op nodes (layer1.0.add ... layer3.2.add)",
        "c": "(c) hookkit.capture 9 of those + root-scope flatten",
        "d": "(d) hookkit.capture default, 5 blocks (layer1-4, avgpool)",
    }
    t0 = perf()
    with torch.no_grad():
        samples, gcs = interleave(resnet_variants(model, x, specs), rounds=cfg["resnet_rounds"],
                                  warmup=cfg["resnet_warmup"], inner=1)
    wall = perf() - t0
    stats = {k: summary(samples[k], gcs[k]) for k in sorted(samples)}

    # The overhead is far below a shared machine's run-to-run noise, so also build it from pieces timed precisely:
    # hookkit's cost per forward (hooks, function mode, setup) barely depends on the input size, so take it as the
    # paired difference capture - bare on a 1x3x32x32 input (cheap convolutions, many forwards), and add what does
    # grow with the input, the copy-on-write copies, as clones of tensors of the real size (fastest of repeats).
    # One thread there: hookkit's cost is Python on one thread, and at that size a second torch thread only adds
    # waits for a descheduled sibling on a shared machine.
    xs = torch.randn(1, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t1 = perf()
    try:
        with torch.no_grad():
            small, _ = interleave(resnet_variants(model, xs, specs), rounds=cfg["small_rounds"],
                                  warmup=cfg["small_warmup"], inner=cfg["small_inner"])
    finally:
        torch.set_num_threads(threads)
    wall_small = perf() - t1
    adds = raw_outputs(model, BLOCKS10, x)  # 'B.add': what the copies copy, at this size
    rep = cfg["micro_repeat"]
    n_copied = {"b": copies.get("ops10", 0), "c": copies.get("ops_flat", 0), "d": copies["blocks"]}
    est, per_fwd, clone_s = {}, {}, {}
    for k, spec in specs.items():
        copied = [adds[n] for n in spec if n.endswith(".add")][: max(n_copied[k], 0)]
        clone_s[k] = min(micro(lambda c=copied: [t.clone() for t in c], number=3, repeat=1)
                         for _ in range(rep)) if copied else 0.0
        per_fwd[k] = paired_diff(small, k, "a")
        est[k] = 1 + (per_fwd[k] + clone_s[k]) / stats["a"]["median_s"]
    table(
        f"1. ResNet-50 eval, input {batch}x3x{px}x{px} ({note}), no_grad; {cfg['resnet_rounds']} rounds x 1 forward "
        f"({wall:.0f} s)",
        VARIANT_HEADER,
        variant_rows({k: labels[k] for k in stats}, stats),
    )
    rows, ratios = [], {}
    for k, what, target in (("b", "10 op nodes", 1.10), ("c", "9 ops + flatten", 1.10), ("d", "5 blocks", 1.02)):
        if k not in specs:
            rows.append([f"{k}/a  hookkit {what} / bare", "skipped", "", "", "", "", f"<= {target}", ""])
            continue
        r = ratios[f"{k}/a"] = ratio(samples, k, "a")
        rows.append([f"{k}/a  hookkit {what} / bare", fmt_r(r), f"{r['of_medians']:.3f}x", f"{est[k]:.4f}x",
                     fmt_t(per_fwd[k]), f"{n_copied[k]}: {fmt_t(clone_s[k])}", f"<= {target}",
                     f"{verdict(r, target)} / {'ok' if est[k] <= target else 'MISSED'}"])
    table("   ratios: measured = median of per-round ratios [IQR], and ratio of medians; estimated = 1 + (hookkit's "
          "cost per forward at 1x3x32x32 + its copies at this size) / bare",
          ["ratio", "measured", "of medians", "estimated", "hookkit per fwd", "copies: clone time", "target",
           "measured / est."], rows)
    say(f"   hookkit's cost per forward = median paired difference over {cfg['small_rounds']} rounds x "
        f"{cfg['small_inner']} forwards of 1x3x32x32, 1 thread ({wall_small:.0f} s; bare "
        f"{fmt_t(statistics.median(small['a']))} per forward there)")
    if missing is not None:
        say(f"   op-node variants skipped: this hookkit has no op nodes ({missing})")
    results["resnet50"] = {"input": [batch, 3, px, px], "size_note": note, "wall_s": wall, "ratios": ratios,
                           "variants": {labels[k]: v for k, v in stats.items()}, "copies": copies,
                           "estimated": est, "hookkit_per_forward_s": per_fwd, "clone_s": clone_s,
                           "op_nodes_missing": missing}


# ----------------------------------------------------------------------------------------------------------------
# 2. Tiny stack (bench_capture.py's definition)
# ----------------------------------------------------------------------------------------------------------------

def bench_tiny(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    depth = TINY_DEPTH
    model, x, linears, make, cap = tiny_stack()
    copies = getattr(cap, "copies", -1)
    del cap
    variants = tiny_variants(model, x, linears, make)
    labels = TINY_LABELS
    t0 = perf()
    with torch.no_grad():
        samples, gcs = interleave(variants, rounds=cfg["tiny_rounds"], warmup=cfg["tiny_warmup"],
                                  inner=cfg["tiny_inner"])
    wall = perf() - t0
    stats = {k: summary(v, gcs[k]) for k, v in samples.items()}
    ratios = {"c/b'": ratio(samples, "c", "b2"), "d/b": ratio(samples, "d", "b"), "c/b": ratio(samples, "c", "b"),
              "b'/a": ratio(samples, "b2", "a")}
    table(
        f"2. Tiny stack: {depth} x Linear(16,16), input 1x16, no_grad; "
        f"{cfg['tiny_rounds']} rounds x {cfg['tiny_inner']} forwards ({wall:.0f} s)",
        VARIANT_HEADER,
        variant_rows(labels, stats),
    )

    # Precise pieces (tight loops): what a `with` block adds to a held-open capture, and what registering and
    # removing the raw hooks adds to hooks registered once; estimated c/b' = (d + hookkit block) / (b + raw block).
    def hk_block() -> None:
        with hookkit.capture(model, nn.Linear):
            pass

    def raw_block() -> None:
        hs = [m.register_forward_hook(make(n)) for n, m in linears]
        for h in hs:
            h.remove()

    # Is a finished block's garbage freed by reference counting, or left for the cyclic GC (which then has to run)?
    gc.collect()
    with torch.no_grad(), hookkit.capture(model, nn.Linear) as cap:
        model(x)
    del cap
    left_for_gc = gc.collect()
    blk_hk = micro(hk_block, number=50, repeat=cfg["micro_repeat"])
    blk_raw = micro(raw_block, number=50, repeat=cfg["micro_repeat"])
    est = (stats["d"]["median_s"] + blk_hk) / (stats["b"]["median_s"] + blk_raw)
    table(
        "   ratios (median of per-round ratios [IQR])",
        ["ratio", "value", "estimated", "target", ""],
        [
            ["c/b' hookkit `with` per forward / raw register+remove per fwd", fmt_r(ratios["c/b'"]), f"{est:.3f}x",
             "<= 1.15", verdict(ratios["c/b'"], 1.15) + " / " + ("ok" if est <= 1.15 else "MISSED")],
            ["d/b  hookkit held open / raw hooks registered once", fmt_r(ratios["d/b"]), "", "", ""],
            ["c/b  hookkit `with` per forward / raw hooks registered once", fmt_r(ratios["c/b"]), "", "", ""],
            ["b'/a raw register+remove per fwd / bare", fmt_r(ratios["b'/a"]), "", "", ""],
        ],
    )
    say(f"   an empty `with hookkit.capture(model, nn.Linear)` block {fmt_t(blk_hk)}, raw register+remove of 150 hooks "
        f"{fmt_t(blk_raw)} (tight loops); measured `with` block over held open "
        f"{fmt_t(stats['c']['median_s'] - stats['d']['median_s'])}; copy-on-write copies per forward: {copies}; "
        f"objects a finished `with` block leaves for the cyclic GC: {left_for_gc}")
    results["tiny"] = {"depth": depth, "wall_s": wall, "ratios": ratios, "copies": copies, "estimated_c/b'": est,
                       "objects_left_for_gc_per_block": left_for_gc,
                       "empty_block_s": {"hookkit": blk_hk, "raw": blk_raw},
                       "variants": {labels[k]: v for k, v in stats.items()}}


# ----------------------------------------------------------------------------------------------------------------
# 3. Memory: default (copy-on-write) vs clone=True
# ----------------------------------------------------------------------------------------------------------------

def bench_memory(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    model = resnet50()
    x = torch.randn(cfg["mem_batch"], 3, 224, 224)
    every = lambda name, module: True  # noqa: E731 - every named submodule
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    rows, out_json = [], {}
    for clone in (False, True):
        gc.collect()
        with torch.enable_grad(), hookkit.capture(model, every, clone=clone) as cap:
            out = model(x)
        del out
        gc.collect()
        held: list[torch.Tensor] = []
        unreadable = 0
        for name in cap:
            try:
                held += cap.calls(name)  # every call (a bottleneck's ReLU runs 3 times)
            except hookkit.ModifiedInPlaceError:
                unreadable += 1
        unique = _nbytes_unique(held, weights)
        logical = sum(t.numel() * t.element_size() for t in held)
        n_copies = getattr(cap, "copies", None)
        label = "default (clone=False)" if not clone else "clone=True"
        rows.append([label, f"{len(cap)}", f"{unreadable}", f"{len(held)}", f"{logical / 2**20:.1f} MiB",
                     f"{unique / 2**20:.1f} MiB", "n/a" if n_copies is None else str(n_copies)])
        out_json[label] = {"layers": len(cap), "layers_modified_in_place": unreadable, "tensors": len(held),
                           "bytes_numel_x_size": logical, "bytes_unique_storages": unique, "copies": n_copies}
        del cap, held
    gc.collect()
    d, c = out_json["default (clone=False)"], out_json["clone=True"]
    table(
        f"3. Memory: ResNet-50, input {cfg['mem_batch']}x3x224x224, grad enabled, one forward, capture of every "
        "submodule; what the capture holds after the block",
        ["capture", "layers", "ModifiedInPlaceError", "tensors read", "numel*size", "unique storages", "cap.copies"],
        rows,
    )
    ok = d["layers_modified_in_place"] == 0 and d["bytes_unique_storages"] <= c["bytes_unique_storages"]
    say(f"   default / clone=True, unique storage bytes: "
        f"{d['bytes_unique_storages'] / max(c['bytes_unique_storages'], 1):.3f} (target <= 1, every layer readable):"
        f" {'ok' if ok else 'MISSED'}")
    results["memory"] = out_json


# ----------------------------------------------------------------------------------------------------------------
# 4. torchlens on the same 10 op nodes
# ----------------------------------------------------------------------------------------------------------------

def bench_torchlens(cfg: dict[str, Any], results: dict[str, Any], path: str | None) -> None:
    title = "4. torchlens vs hookkit, ResNet-50, the same 10 `+=` results"
    if path is None:
        say(f"{title}: skipped (pass --torchlens [PATH]; see the docstring for the install)")
        return
    if path:
        sys.path.insert(0, path)
    try:
        import torchlens as tl
        from torchlens.options import CaptureOptions
    except Exception as e:
        say(f"{title}: skipped, torchlens does not import ({type(e).__name__}: {e})")
        results["torchlens"] = {"error": repr(e)}
        return
    model = resnet50()
    missing = op_nodes_missing(model)
    opts = CaptureOptions(layers_to_save=TL_LABELS, unwrap_when_done=True)

    def tl_run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        trace = tl.trace(model, x, capture=opts)
        return {lab: trace[lab].out for lab in TL_LABELS}

    try:  # values: torchlens's `iadd_k` == the raw-hook reference == hookkit's op node
        xs = torch.randn(2, 3, 64, 64)
        ref = raw_outputs(model, BLOCKS10, xs)
        with torch.no_grad():
            got = tl_run(xs)
        for lab, op in zip(TL_LABELS, OPS10, strict=True):
            assert torch.equal(got[lab], ref[op]), lab
        if missing is None:
            with torch.no_grad(), hookkit.capture(model, OPS10) as cap:
                model(xs)
            assert all(torch.equal(got[lab], cap[op]) for lab, op in zip(TL_LABELS, OPS10, strict=True))
    except Exception as e:
        say(f"{title}: skipped, torchlens {tl.__version__} fails here ({type(e).__name__}: {str(e)[:200]})")
        results["torchlens"] = {"version": tl.__version__, "error": repr(e)}
        return

    batch, px, note = pick_input(model, cfg)
    x = torch.randn(batch, 3, px, px)

    variants = resnet_variants(model, x, {"b": OPS10} if missing is None else {})

    def tlens(inner: int) -> Sample:
        with Clock() as c:
            for _ in range(inner):
                tl_run(x)
        return c.dt / inner, c.gc / inner

    variants["t"] = tlens
    labels = {"a": "(a) bare forward", "b": "(b) hookkit.capture 10 op nodes",
              "t": f"(t) torchlens {tl.__version__} trace, save {TL_LABELS[0]}..{TL_LABELS[-1]}"}
    t0 = perf()
    with torch.no_grad():
        samples, gcs = interleave(variants, rounds=cfg["tl_rounds"], warmup=cfg["tl_warmup"], inner=1)
    wall = perf() - t0
    stats = {k: summary(samples[k], gcs[k]) for k in sorted(samples)}
    table(f"{title}: input {batch}x3x{px}x{px} ({note}), no_grad; {cfg['tl_rounds']} rounds x 1 forward "
          f"({wall:.0f} s)", VARIANT_HEADER, variant_rows({k: labels[k] for k in stats}, stats))
    ratios = {"t/a": ratio(samples, "t", "a")}
    rows = [["t/a  torchlens / bare", fmt_r(ratios["t/a"])]]
    if "b" in variants:
        ratios.update({"b/a": ratio(samples, "b", "a"), "t/b": ratio(samples, "t", "b")})
        rows += [["b/a  hookkit / bare", fmt_r(ratios["b/a"])], ["t/b  torchlens / hookkit", fmt_r(ratios["t/b"])]]
    else:
        rows.append(["b/a  hookkit / bare", "skipped: this hookkit has no op nodes"])
    table("   ratios (median of per-round ratios [IQR])", ["ratio", "value"], rows)
    results["torchlens"] = {"version": tl.__version__, "input": [batch, 3, px, px], "wall_s": wall,
                            "ratios": ratios, "variants": {labels[k]: v for k, v in stats.items()}}


# ----------------------------------------------------------------------------------------------------------------
# --profile
# ----------------------------------------------------------------------------------------------------------------

def profile(cfg: dict[str, Any]) -> None:
    strip = [str(Path(torch.__file__).resolve().parent.parent) + os.sep,
             str(Path(hookkit.__file__).resolve().parent.parent) + os.sep]
    resnet = resnet50()
    xr = torch.randn(1, 3, 64, 64)
    tiny = nn.Sequential(*[nn.Linear(16, 16) for _ in range(150)]).eval()
    xt = torch.randn(1, 16)
    jobs: list[tuple[str, nn.Module, Any, torch.Tensor, int]] = [
        ("ResNet-50 1x3x64x64, 5 blocks", resnet, COARSE, xr, 20),
        ("tiny stack, `with` per forward", tiny, nn.Linear, xt, cfg["profile_forwards"]),
    ]
    if op_nodes_missing(resnet) is None:
        jobs[1:1] = [("ResNet-50 1x3x64x64, 10 op nodes", resnet, OPS10, xr, 20),
                     ("ResNet-50 1x3x64x64, 9 ops + flatten", resnet, OPS_FLAT, xr, 20)]
    for title, model, spec, x, n in jobs:
        prof = cProfile.Profile()
        with torch.no_grad():
            model(x)
            prof.enable()
            for _ in range(n):
                with hookkit.capture(model, spec):
                    model(x)
            prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
        text = buf.getvalue()
        text = text[text.find("   ncalls"):] if "   ncalls" in text else text
        for s in strip:
            text = text.replace(s, "")
        print(f"\n   cProfile of {title}, {n} forwards, by tottime (cProfile inflates small Python calls):")
        print("\n".join("   " + line for line in text.rstrip().splitlines()))
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------

def _git_rev() -> str:
    root = Path(hookkit.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "hookkit"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    if not rev:
        return f"{root}, not a git checkout"
    return f"{rev[:60]}{' + uncommitted hookkit changes' if dirty else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, small ResNet input")
    ap.add_argument("--input", help="ResNet-50 input as BATCH,PIXELS (default: bench_capture.py's rule)")
    ap.add_argument("--torchlens", nargs="?", const="", default=None, metavar="PATH",
                    help="also time torchlens, importing it from PATH (a pip --target folder) or the environment")
    ap.add_argument("--only", help="comma-separated sections to run, of: resnet, tiny, memory, torchlens")
    ap.add_argument("--profile", action="store_true", help="cProfile the hookkit variants")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8),
                    help="torch.set_num_threads (default: the CPU count, at most 8)")
    args = ap.parse_args()
    if args.only and not set(args.only.split(",")) <= {"resnet", "tiny", "memory", "torchlens"}:
        ap.error(f"--only: unknown section in {args.only!r}")

    torch.set_num_threads(args.threads)
    if args.quick:
        cfg: dict[str, Any] = dict(resnet_input=(2, 160), resnet_rounds=4, resnet_warmup=1, small_rounds=6,
                                   small_warmup=1, small_inner=3, tiny_rounds=12, tiny_warmup=2, tiny_inner=12,
                                   micro_repeat=3, mem_batch=1, tl_rounds=2, tl_warmup=1, profile_forwards=100)
    else:
        cfg = dict(resnet_input=None, resnet_rounds=15, resnet_warmup=1, small_rounds=30, small_warmup=2,
                   small_inner=5, tiny_rounds=100, tiny_warmup=5, tiny_inner=30, micro_repeat=5, mem_batch=2,
                   tl_rounds=5, tl_warmup=1, profile_forwards=300)
    if args.input:
        b, p = (int(v) for v in args.input.split(","))
        cfg["resnet_input"] = (b, p)
    say(
        f"hookkit {hookkit.__version__} ({_git_rev()}) | torch {torch.__version__} | python "
        f"{platform.python_version()} | {platform.machine()} {os.cpu_count()} CPUs | "
        f"torch.set_num_threads({torch.get_num_threads()}) | {'quick' if args.quick else 'full'} run | "
        f"load avg {_loadavg()}"
    )
    results: dict[str, Any] = {}
    t0 = perf()
    sections: dict[str, Callable[[], None]] = {
        "resnet": lambda: bench_resnet(cfg, results),
        "tiny": lambda: bench_tiny(cfg, results),
        "memory": lambda: bench_memory(cfg, results),
        "torchlens": lambda: bench_torchlens(cfg, results, args.torchlens),
    }
    for name in args.only.split(",") if args.only else sections:
        sections[name]()
        say()
    if args.profile:
        profile(cfg)
    say(f"\ntotal {perf() - t0:.0f} s | load avg {_loadavg()}")


if __name__ == "__main__":
    main()
