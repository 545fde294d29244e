"""Threads: captures on separate model copies never see each other; on one shared model, hooks belong to the
module, not the thread, so every open capture records every thread's calls (documented in the README)."""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn as nn

import hookkit

from conftest import hook_census


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh())


def run_in_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def test_two_copies_in_two_threads_do_not_see_each_other():
    a, b = model(), copy.deepcopy(model())
    xa, xb = torch.ones(1, 3), -torch.ones(1, 3)
    both_open = threading.Barrier(2)
    results = {}

    def work(name, m, x):
        with hookkit.capture(m, ["0"]) as cap:
            both_open.wait()
            for _ in range(50):
                m(x)
            both_open.wait()
        results[name] = cap

    run_in_threads([lambda: work("a", a, xa), lambda: work("b", b, xb)])
    assert len(results["a"].calls("0")) == len(results["b"].calls("0")) == 50
    torch.testing.assert_close(results["a"]["0"], a[0](xa).detach())
    torch.testing.assert_close(results["b"]["0"], b[0](xb).detach())


def test_one_shared_model_two_threads_every_open_capture_sees_every_call():
    m = model()
    before = hook_census(m)
    both_open = threading.Barrier(2)
    both_ran = threading.Barrier(2)
    results = {}

    def work(name, x):
        with hookkit.capture(m, ["0"]) as cap:
            both_open.wait()
            m(x)
            both_ran.wait()
        results[name] = cap

    run_in_threads([lambda: work("a", torch.ones(1, 3)), lambda: work("b", -torch.ones(1, 3))])
    assert hook_census(m) == before
    for cap in results.values():
        inputs = sorted(float(c.sum()) for c in cap.calls("0"))
        assert len(inputs) == 2  # its own call and the other thread's
    assert sorted(float(c.sum()) for c in results["a"].calls("0")) == sorted(
        float(c.sum()) for c in results["b"].calls("0"))
