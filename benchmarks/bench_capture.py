#!/usr/bin/env python
"""Overhead of ``hookkit.capture`` vs hand-written forward hooks and vs a bare forward (CPU).

Run by hand (not part of the test suite):

    python benchmarks/bench_capture.py            # full run, ~3-4 min on 2 CPU cores
    python benchmarks/bench_capture.py --quick    # < 1 min, fewer rounds and a small ResNet input (noisier)
    python benchmarks/bench_capture.py --save     # also write benchmarks/results-<hostname>.json
    python benchmarks/bench_capture.py --profile  # also cProfile the tiny-stack hookkit variants

Method: everything runs in one process. Variants are interleaved round by round (A B C D, then B C D A, ... the
order rotates so no variant always runs first), after warm-up rounds that are discarded. One sample = the mean time
per forward over ``inner`` consecutive forwards, timed with ``time.perf_counter``; a variant's figure is the median
over rounds, and a ratio X/Y is the median over rounds of the per-round ratio (paired, so slow drifts of a shared
machine cancel), with its interquartile range in brackets. The garbage collector runs as it would in a user's
loop (one ``gc.collect()`` before each section, none between samples), and the time it spends inside the timed
regions is measured with ``gc.callbacks`` and shown per variant: hookkit's cyclic garbage is part of its cost.
Timing runs under ``torch.no_grad()`` (not ``inference_mode``: hookkit copies inference tensors, see the breakdown);
the memory section runs with grad enabled. The thread count is fixed with ``torch.set_num_threads`` and printed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import re
import socket
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import hookkit

perf = time.perf_counter


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------

class _GcMeter:
    """Seconds the cyclic garbage collector ran while ``armed`` (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.armed = False
        self.total = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = perf()
        elif self.armed:
            self.total += perf() - self._t0


GC = _GcMeter()


class Clock:
    """``with Clock() as c: ...`` -> ``c.dt`` wall seconds and ``c.gc`` seconds of GC inside the block."""

    def __enter__(self) -> Clock:
        self._gc0 = GC.total
        GC.armed = True
        self._t0 = perf()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.dt = perf() - self._t0
        GC.armed = False
        self.gc = GC.total - self._gc0


Sample = tuple[float, float]  # (seconds per forward, GC seconds per forward)


def interleave(variants: dict[str, Callable[[int], Sample]], *, rounds: int, warmup: int, inner: int
               ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every variant once per round, rotating the order; return per-round seconds-per-forward (aligned by
    round) and the mean GC seconds per forward of each variant.

    Each variant is ``measure(inner) -> (s/forward, gc s/forward)``; it does its own untimed setup / teardown.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gcs: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            s, g = variants[name](inner)
            if r >= warmup:
                samples[name].append(s)
                gcs[name].append(g)
    return samples, {n: statistics.fmean(v) for n, v in gcs.items()}


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summary(samples: list[float], gc_s: float) -> dict[str, float]:
    p25, med, p75 = quantiles(samples)
    return {"median_s": med, "p25_s": p25, "p75_s": p75, "iqr_pct": 100 * (p75 - p25) / med, "n": len(samples),
            "mean_s": statistics.fmean(samples), "gc_mean_s": gc_s}


def ratio(samples: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    per_round = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
    p25, med, p75 = quantiles(per_round)
    of_medians = statistics.median(samples[num]) / statistics.median(samples[den])
    return {"median": med, "p25": p25, "p75": p75, "of_medians": of_medians}


def micro(fn: Callable[[], Any], *, number: int, repeat: int) -> float:
    """Median over ``repeat`` of the mean seconds per call of ``fn`` (for cheap, precise things)."""
    out = []
    for _ in range(repeat):
        gc.collect()
        t0 = perf()
        for _ in range(number):
            fn()
        out.append((perf() - t0) / number)
    return statistics.median(out)


def fmt_t(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_r(r: dict[str, float]) -> str:
    return f"{r['median']:.3f}x [{r['p25']:.3f}-{r['p75']:.3f}]"


def variant_rows(labels: dict[str, str], stats: dict[str, dict[str, float]]) -> list[list[str]]:
    return [[labels[k], fmt_t(s["median_s"]), f"{s['iqr_pct']:.0f}%", fmt_t(s["mean_s"]), fmt_t(s["gc_mean_s"])]
            for k, s in stats.items()]


VARIANT_HEADER = ["variant", "per forward: median", "IQR/median", "mean", "of which GC (mean)"]


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------

try:
    from rich.console import Console
    from rich.table import Table

    _console: Any = Console(highlight=False, width=132)
except Exception:  # pragma: no cover - rich is a dependency, but stay usable without it
    _console = None


def say(msg: str = "") -> None:
    if _console is not None:
        _console.print(msg, markup=False)
    else:
        print(msg)
    sys.stdout.flush()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    if _console is not None:
        t = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        _console.print(t)
        sys.stdout.flush()
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


# ----------------------------------------------------------------------------------------------------------------
# 1. Tiny stack: 150 x Linear(16, 16), batch 1
# ----------------------------------------------------------------------------------------------------------------

def raw_hook_factory(store: dict[str, torch.Tensor]) -> Callable[[str], Callable[..., None]]:
    """What a user writes by hand: keep each layer's detached output in a dict keyed by name."""
    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[name] = output.detach()
        return hook
    return make


TINY_DEPTH = 150
TINY_LABELS = {
    "a": "(a) bare model",
    "b": "(b) raw forward hooks, registered once",
    "b2": "(b') raw hooks, register+remove per forward",
    "c": "(c) hookkit.capture, `with` per forward",
    "d": "(d) hookkit.capture held open",
}


def tiny_stack() -> tuple[nn.Module, torch.Tensor, list, Callable, Any]:
    """The tiny stack (150 x Linear(16, 16) in an nn.Sequential, input 1 x 16), checked once: hookkit and raw hooks
    record the same thing. Returns the model, the input, its (name, Linear) pairs, the raw-hook factory, and the
    checked capture (for a caller that reads more of it)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(TINY_DEPTH)]).eval()
    x = torch.randn(1, 16)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    store: dict[str, torch.Tensor] = {}
    make = raw_hook_factory(store)
    with torch.no_grad():
        hs = [m.register_forward_hook(make(n)) for n, m in linears]
        with hookkit.capture(model, nn.Linear) as cap:
            model(x)
        for h in hs:
            h.remove()
    assert len(cap) == TINY_DEPTH and all(torch.equal(cap[n], store[n]) for n, _ in linears)
    return model, x, linears, make, cap


def tiny_variants(model: nn.Module, x: torch.Tensor, linears: list, make: Callable) -> dict[str, Callable]:
    """The tiny stack's five variants (labels in ``TINY_LABELS``), each timing ``inner`` forwards."""

    def bare(inner: int) -> Sample:
        with Clock() as c:
            for _ in range(inner):
                model(x)
        return c.dt / inner, c.gc / inner

    def raw(inner: int) -> Sample:
        hs = [m.register_forward_hook(make(n)) for n, m in linears]  # registered outside the timed region
        with Clock() as c:
            for _ in range(inner):
                model(x)
        for h in hs:
            h.remove()
        return c.dt / inner, c.gc / inner

    def raw_per_fwd(inner: int) -> Sample:
        with Clock() as c:
            for _ in range(inner):
                hs = [m.register_forward_hook(make(n)) for n, m in linears]
                model(x)
                for h in hs:
                    h.remove()
        return c.dt / inner, c.gc / inner

    def hk_per_fwd(inner: int) -> Sample:
        with Clock() as c:
            for _ in range(inner):
                with hookkit.capture(model, nn.Linear):
                    model(x)
        return c.dt / inner, c.gc / inner

    def hk_open(inner: int) -> Sample:
        with hookkit.capture(model, nn.Linear):  # opened / closed outside the timed region
            with Clock() as c:
                for _ in range(inner):
                    model(x)
        return c.dt / inner, c.gc / inner

    return {"a": bare, "b": raw, "b2": raw_per_fwd, "c": hk_per_fwd, "d": hk_open}


def bench_tiny(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    depth = TINY_DEPTH
    model, x, linears, make, cap = tiny_stack()
    del cap
    variants = tiny_variants(model, x, linears, make)
    labels = TINY_LABELS
    t0 = perf()
    with torch.no_grad():
        samples, gcs = interleave(variants, rounds=cfg["tiny_rounds"], warmup=cfg["tiny_warmup"],
                                  inner=cfg["tiny_inner"])
    wall = perf() - t0
    stats = {k: summary(v, gcs[k]) for k, v in samples.items()}
    ratios = {
        "c/b": ratio(samples, "c", "b"),
        "d/b": ratio(samples, "d", "b"),
        "b/a": ratio(samples, "b", "a"),
        "c/b'": ratio(samples, "c", "b2"),
        "d/a": ratio(samples, "d", "a"),
    }
    per_hook = {
        "raw_us": 1e6 * (stats["b"]["median_s"] - stats["a"]["median_s"]) / depth,
        "hookkit_us": 1e6 * (stats["d"]["median_s"] - stats["a"]["median_s"]) / depth,
    }
    setup = {
        "hookkit_us": 1e6 * (stats["c"]["median_s"] - stats["d"]["median_s"]),
        "raw_us": 1e6 * (stats["b2"]["median_s"] - stats["b"]["median_s"]),
    }
    table(
        f"1. Tiny stack: {depth} x Linear(16,16), input 1x16, no_grad; "
        f"{cfg['tiny_rounds']} rounds x {cfg['tiny_inner']} forwards ({wall:.0f} s)",
        VARIANT_HEADER,
        variant_rows(labels, stats),
    )
    target = 1.15
    verdict = lambda r: "ok" if r["median"] <= target else "MISSED"  # noqa: E731
    table(
        "   ratios (median of per-round ratios [IQR])",
        ["ratio", "value", f"target <= {target}"],
        [
            ["c/b  hookkit `with` per forward / raw hooks", fmt_r(ratios["c/b"]), verdict(ratios["c/b"])],
            ["d/b  hookkit held open / raw hooks", fmt_r(ratios["d/b"]), verdict(ratios["d/b"])],
            ["b/a  raw hooks / bare", fmt_r(ratios["b/a"]), ""],
            ["c/b' hookkit `with` / raw register+remove per fwd", fmt_r(ratios["c/b'"]), ""],
            ["d/a  hookkit held open / bare", fmt_r(ratios["d/a"]), ""],
        ],
    )
    say(
        f"   per hooked call, over bare: raw {per_hook['raw_us']:.2f} us, hookkit {per_hook['hookkit_us']:.2f} us; "
        f"per `with` block: hookkit setup+teardown {setup['hookkit_us']:.0f} us, "
        f"raw register+remove {setup['raw_us']:.0f} us"
    )
    results["tiny"] = {
        "depth": depth, "rounds": cfg["tiny_rounds"], "inner": cfg["tiny_inner"], "wall_s": wall,
        "variants": {labels[k]: v for k, v in stats.items()}, "ratios": ratios,
        "per_hooked_call_us": per_hook, "per_with_block_us": setup,
    }
    _tiny_breakdown(model, x, linears, make, cfg, results)
    if cfg["profile"]:
        _tiny_profile(model, x, cfg)


def _tiny_breakdown(model: nn.Module, x: torch.Tensor, linears: list, make: Callable, cfg: dict, results: dict) -> None:
    """Precise per-piece costs: one hook call, and the pieces of a `with hookkit.capture(...)` block."""
    from hookkit.core.select import check_model, resolve  # private, only to attribute the cost

    n_calls, rep = cfg["micro_number"], cfg["micro_repeat"]
    n_blk = max(20, n_calls // 200)
    lin = linears[0][1]
    with torch.no_grad():
        y = lin(x)
    with torch.inference_mode():
        y_inf = lin(x)
    raw = raw_hook_factory({})("0")

    def hk_hook_cost(out: torch.Tensor) -> float:
        with hookkit.capture(model, nn.Linear):  # the open capture keeps one small record per call
            hook = list(lin._forward_hooks.values())[-1]
            return micro(lambda: hook(lin, (x,), out), number=n_calls, repeat=rep)

    def enter_exit() -> float:  # register + remove only: the Capture objects are built outside the timed loop
        out = []
        for _ in range(rep):
            caps = [hookkit.capture(model, nn.Linear) for _ in range(n_blk)]
            gc.collect()
            t0 = perf()
            for c in caps:
                c.__enter__()
                c.__exit__(None, None, None)
            out.append((perf() - t0) / n_blk)
        return statistics.median(out)

    def raw_reg() -> None:
        hs = [m.register_forward_hook(raw) for _, m in linears]
        for h in hs:
            h.remove()

    pieces = {
        "raw hook fn, one call": micro(lambda: raw(lin, (x,), y), number=n_calls, repeat=rep),
        "hookkit hook fn, one call": hk_hook_cost(y),
        "hookkit hook fn, one call, inference tensor (-> clone)": hk_hook_cost(y_inf),
        "hookkit.capture(model, nn.Linear): construct only": micro(lambda: hookkit.capture(model, nn.Linear),
                                                                   number=n_blk, repeat=rep),
        "  of which check_model(model)": micro(lambda: check_model(model), number=n_blk, repeat=rep),
        "  of which resolve(model, nn.Linear)": micro(lambda: resolve(model, nn.Linear), number=n_blk, repeat=rep),
        "hookkit __enter__ + __exit__ only (register+remove 150)": enter_exit(),
        "raw: register + remove 150 hooks": micro(raw_reg, number=n_blk, repeat=rep),
    }
    # Is a finished Capture freed by reference counting, or left for the cyclic GC (which then has to run)?
    gc.collect()
    with torch.no_grad(), hookkit.capture(model, nn.Linear) as cap:
        model(x)
    ref = weakref.ref(cap)
    del cap
    freed_by_refcount = ref() is None
    left_for_gc = gc.collect()
    t0 = perf()
    gc.collect()
    full_gc = perf() - t0
    table(
        "   breakdown (tight loops; median of repeats)",
        ["piece", "time"],
        [[k, fmt_t(v)] for k, v in pieces.items()] + [["one full gc.collect() in this process", fmt_t(full_gc)]],
    )
    say(f"   a finished Capture is freed by refcount: {freed_by_refcount}; objects left for the cyclic GC per "
        f"`with` block: {left_for_gc} (gc tracks {len(gc.get_objects())} objects here)")
    results["tiny"]["breakdown_s"] = pieces
    results["tiny"]["gc"] = {"capture_freed_by_refcount": freed_by_refcount,
                             "objects_left_for_gc_per_block": left_for_gc, "full_collect_s": full_gc}


def _tiny_profile(model: nn.Module, x: torch.Tensor, cfg: dict) -> None:
    n = cfg["profile_forwards"]
    strip = [str(Path(torch.__file__).resolve().parent.parent) + os.sep,
             str(Path(hookkit.__file__).resolve().parent.parent) + os.sep]

    def one_block() -> None:
        with hookkit.capture(model, nn.Linear):
            model(x)

    for title, held_open in (("(d) held open", True), ("(c) `with` per forward", False)):
        prof = cProfile.Profile()
        with torch.no_grad():
            if held_open:
                with hookkit.capture(model, nn.Linear):
                    prof.enable()
                    for _ in range(n):
                        model(x)
                    prof.disable()
            else:
                prof.enable()
                for _ in range(n):
                    one_block()
                prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        text = buf.getvalue()
        text = text[text.find("   ncalls"):] if "   ncalls" in text else text
        for s in strip:
            text = text.replace(s, "")
        print(f"\n   cProfile of {title}, {n} forwards, by tottime (cProfile inflates small Python calls):")
        print("\n".join("   " + line for line in text.rstrip().splitlines()))
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------
# 2. ResNet-50
# ----------------------------------------------------------------------------------------------------------------

def resnet_variants(model: nn.Module, x: torch.Tensor, specs: dict[str, Any]) -> dict[str, Callable[[int], Sample]]:
    """'a': the bare forward; one more per spec: a `with hookkit.capture(model, spec)` block per forward."""
    def bare(inner: int) -> Sample:
        with Clock() as c:
            for _ in range(inner):
                model(x)
        return c.dt / inner, c.gc / inner

    def hk(spec: Any) -> Callable[[int], Sample]:
        def run(inner: int) -> Sample:
            with Clock() as c:
                for _ in range(inner):
                    with hookkit.capture(model, spec):
                        model(x)
            return c.dt / inner, c.gc / inner
        return run

    return {"a": bare} | {k: hk(spec) for k, spec in specs.items()}


def bench_resnet(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    coarse = ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]

    # Input: batch 8 x 224, reduced if one bare forward takes > 1.5 s on this machine (quick: a fixed small input).
    if cfg["resnet_input"] is not None:
        batch, px = cfg["resnet_input"]
        note = "--quick: small input"
    else:
        tried = []
        with torch.no_grad():
            for b, p in ((8, 224), (4, 224), (4, 160)):
                x = torch.randn(b, 3, p, p)
                model(x)  # warm-up
                t = min(_time_once(model, x) for _ in range(2))
                batch, px = b, p
                tried.append(f"{b}x{p}px: {t:.2f} s")
                if t <= 1.5:
                    break
        note = "as specified" if len(tried) == 1 else "reduced, forward > 1.5 s at " + ", ".join(tried[:-1])
        if t > 1.5:
            note += f"; still {t:.2f} s at {batch}x{px}px, the smallest size tried"
    x = torch.randn(batch, 3, px, px)

    store: dict[str, torch.Tensor] = {}
    make = raw_hook_factory(store)

    def raw_convs(inner: int) -> Sample:
        hs = [m.register_forward_hook(make(n)) for n, m in convs]  # registered outside the timed region
        with Clock() as c:
            for _ in range(inner):
                # A fresh dict per forward, like a capture per `with` block: the stored activations of one
                # forward are all freed together. (Overwriting one shared dict frees each old tensor just as its
                # successor is allocated, which the allocator likes better: ~6% faster on ResNet-50 8x224 here,
                # for raw hooks and hookkit alike -- a cost of keeping results, not of hooking.)
                store.clear()
                model(x)
        for h in hs:
            h.remove()
        return c.dt / inner, c.gc / inner

    variants = resnet_variants(model, x, {"b": coarse, "c": nn.Conv2d}) | {"d": raw_convs}
    labels = {
        "a": "(a) bare forward",
        "b": "(b) hookkit.capture 5 blocks (layer1-4, avgpool)",
        "c": f"(c) hookkit.capture every Conv2d ({len(convs)})",
        "d": f"(d) raw hooks on every Conv2d ({len(convs)})",
    }
    t0 = perf()
    with torch.no_grad():
        samples, gcs = interleave(variants, rounds=cfg["resnet_rounds"], warmup=cfg["resnet_warmup"], inner=1)
    wall = perf() - t0
    stats = {k: summary(v, gcs[k]) for k, v in samples.items()}
    ratios = {
        "b/a": ratio(samples, "b", "a"),
        "c/a": ratio(samples, "c", "a"),
        "d/a": ratio(samples, "d", "a"),
        "c/d": ratio(samples, "c", "d"),
    }
    # The hook overhead is far below a shared machine's run-to-run noise, so also build it from precisely timed
    # pieces: an empty `with` block (construct, register, remove) + n hooked calls at the per-call cost of part 1.
    rep = cfg["micro_repeat"]
    blk_b = micro(lambda: _empty_block(model, coarse), number=50, repeat=rep)
    blk_c = micro(lambda: _empty_block(model, nn.Conv2d), number=50, repeat=rep)
    per_call = results.get("tiny", {}).get("per_hooked_call_us", {})
    hk_call, raw_call = per_call.get("hookkit_us", float("nan")) * 1e-6, per_call.get("raw_us", float("nan")) * 1e-6
    bare_med = stats["a"]["median_s"]
    est = {
        "b/a": 1 + (blk_b + len(coarse) * hk_call) / bare_med,
        "c/a": 1 + (blk_c + len(convs) * hk_call) / bare_med,
        "d/a": 1 + len(convs) * raw_call / bare_med,
    }
    est["c/d"] = est["c/a"] / est["d/a"]
    table(
        f"2. ResNet-50 eval, input {batch}x3x{px}x{px} ({note}), no_grad; {cfg['resnet_rounds']} rounds x 1 forward "
        f"({wall:.0f} s)",
        VARIANT_HEADER,
        variant_rows(labels, stats),
    )
    table(
        "   ratios: measured = median of per-round ratios [IQR]; estimated = 1 + (precisely timed overhead) / bare",
        ["ratio", "measured", "estimated", "target"],
        [
            ["b/a  hookkit 5 blocks / bare", fmt_r(ratios["b/a"]), f"{est['b/a']:.5f}x", "<= 1.03"],
            ["c/a  hookkit every conv / bare", fmt_r(ratios["c/a"]), f"{est['c/a']:.5f}x", ""],
            ["d/a  raw every conv / bare", fmt_r(ratios["d/a"]), f"{est['d/a']:.5f}x", ""],
            ["c/d  hookkit / raw, every conv", fmt_r(ratios["c/d"]), f"{est['c/d']:.5f}x", ""],
        ],
    )
    say(f"   empty `with hookkit.capture(...)` block on ResNet-50: 5 blocks {fmt_t(blk_b)}, "
        f"every Conv2d {fmt_t(blk_c)}")
    results["resnet50"] = {
        "input": [batch, 3, px, px], "size_note": note, "rounds": cfg["resnet_rounds"], "wall_s": wall,
        "variants": {labels[k]: v for k, v in stats.items()}, "ratios_measured": ratios, "ratios_estimated": est,
        "empty_block_s": {"5 blocks": blk_b, "every Conv2d": blk_c},
    }


def _time_once(model: nn.Module, x: torch.Tensor) -> float:
    t0 = perf()
    model(x)
    return perf() - t0


def _empty_block(model: nn.Module, spec: Any) -> None:
    with hookkit.capture(model, spec):
        pass


# ----------------------------------------------------------------------------------------------------------------
# 3. Memory: detach=True keeps no autograd graph
# ----------------------------------------------------------------------------------------------------------------

class _Box:
    """Holds one tensor autograd saved for backward; a weakref to it tells whether the graph is still alive."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        # Detached: holding a saved *output* itself would make a C++ reference cycle (Box -> tensor -> its grad_fn
        # -> saved variable -> Box) that keeps every graph alive; torch avoids that cycle when no hooks are set.
        self.t = t.detach()


def _nbytes_unique(tensors: list[torch.Tensor], skip: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors``, leaving out storages in ``skip`` (the model's weights)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def bench_memory(cfg: dict[str, Any], results: dict[str, Any]) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(cfg["mem_batch"], 3, 224, 224)
    every = lambda name, module: True  # noqa: E731 - every named submodule
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}

    # Activation size: every output of every submodule call (ReLUs run 3x per bottleneck), numel * element_size.
    act_bytes = 0

    def count(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        nonlocal act_bytes
        act_bytes += o.numel() * o.element_size()

    hs = [m.register_forward_hook(count) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()

    rows, out_json = [], {}
    for detach, clone in ((True, False), (True, True), (False, True)):
        boxes: list[weakref.ref] = []

        def pack(t: torch.Tensor) -> _Box:
            b = _Box(t)
            boxes.append(weakref.ref(b))  # noqa: B023  (pack is used only inside this iteration)
            return b

        gc.collect()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
            with hookkit.capture(model, every, detach=detach, clone=clone) as cap:
                out = model(x)
        n_saved = len(boxes)
        del out
        gc.collect()
        alive = [b.t for b in (r() for r in boxes) if b is not None]
        readable: list[torch.Tensor] = []
        layers_ok = in_place = 0
        for name in cap:
            try:
                readable += cap.calls(name)  # every call (a bottleneck's ReLU runs 3 times)
                layers_ok += 1
            except hookkit.ModifiedInPlaceError:
                in_place += 1
        no_graph = sum(t.grad_fn is None and not t.requires_grad for t in readable)
        stored = sum(t.numel() * t.element_size() for t in readable)
        alive_bytes = _nbytes_unique(alive, weights)
        rows.append([
            f"detach={detach}, clone={clone}",
            f"{layers_ok} / {in_place}",
            f"{no_graph} / {len(readable)}",
            f"{stored / 2**20:.1f} MiB",
            f"{len(alive)} / {n_saved}",
            f"{alive_bytes / 2**20:.1f} MiB",
        ])
        out_json[f"detach={detach},clone={clone}"] = {
            "layers_readable": layers_ok, "layers_modified_in_place": in_place,
            "stored_tensors_readable": len(readable),
            "readable_without_graph": no_graph, "stored_bytes_readable": stored,
            "saved_tensors_total": n_saved, "saved_tensors_alive_after_del_out": len(alive),
            "saved_bytes_alive_excl_weights": alive_bytes,
        }
        del cap, readable, alive
    gc.collect()
    table(
        f"3. Memory: ResNet-50, input {cfg['mem_batch']}x3x224x224, grad enabled, capture of all 150 submodules; "
        f"all their outputs (every call) = {act_bytes / 2**20:.1f} MiB",
        ["capture", "layers readable / modified in place", "stored tensors w/o grad_fn & grad",
         "stored (readable, numel*size)", "saved-for-backward alive after `del out`", "their bytes (excl. weights)"],
        rows,
    )
    say("   clone=False: outputs later overwritten by ReLU(inplace) or `out += identity` are copied just before the "
        "write (copy-on-write); the rest alias the activations.")
    results["memory"] = {"input": [cfg["mem_batch"], 3, 224, 224], "activations_bytes": act_bytes, **out_json}


# ----------------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, small ResNet input; under a minute")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results-<hostname>.json")
    ap.add_argument("--profile", action="store_true", help="cProfile the tiny-stack hookkit variants")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8),
                    help="torch.set_num_threads (default: the CPU count, at most 8)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = dict(tiny_rounds=12, tiny_warmup=2, tiny_inner=12, resnet_input=(2, 160), resnet_rounds=3,
                   resnet_warmup=0, micro_number=3000, micro_repeat=5, mem_batch=1, profile_forwards=100)
    else:
        cfg = dict(tiny_rounds=100, tiny_warmup=5, tiny_inner=30, resnet_input=None, resnet_rounds=15,
                   resnet_warmup=1, micro_number=20000, micro_repeat=9, mem_batch=2, profile_forwards=300)
    cfg["profile"] = args.profile

    host = socket.gethostname() or "local"
    say(
        f"hookkit {hookkit.__version__} | torch {torch.__version__} | python {platform.python_version()} | "
        f"{platform.machine()} {os.cpu_count()} CPUs | host {host} | "
        f"torch.set_num_threads({torch.get_num_threads()}) | "
        f"{'quick' if args.quick else 'full'} run | timing under torch.no_grad() | load avg {_loadavg()}"
    )
    results: dict[str, Any] = {
        "meta": {
            "hookkit": hookkit.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "host": host, "threads": torch.get_num_threads(),
            "mode": "quick" if args.quick else "full", "grad_mode": "no_grad (timing), enabled (memory)",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg_start": _loadavg(), "config": cfg,
        }
    }
    t0 = perf()
    bench_tiny(cfg, results)
    say()
    bench_resnet(cfg, results)
    say()
    bench_memory(cfg, results)
    results["meta"]["total_s"] = perf() - t0
    results["meta"]["load_avg_end"] = _loadavg()
    say(f"\ntotal {perf() - t0:.0f} s | load avg {_loadavg()}")
    if args.save:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host) or "local"
        path = Path(__file__).resolve().parent / f"results-{safe}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        say(f"wrote {path}")


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


if __name__ == "__main__":
    main()
