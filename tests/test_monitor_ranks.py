"""hookkit.monitor() under DDP with a NaN on one rank only (2 gloo processes, tests/_monitor_nonfinite_worker.py):
the job never hangs, every rank takes the same decision at the same step under each ``on_nonfinite``, and rank 0's
log and ``mon.alerts`` hold every rank's alert, each naming the rank that saw it.

Each worker's process group has a 20 s timeout and each launch a wall-clock limit, so a rank left waiting in a
collective fails the test instead of blocking it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

HERE = Path(__file__).resolve().parent
STEPS = 6  # as the worker's
# scenario: every, the NaN's step, and the alerts rank 0 must hold: (rank, layer) in rank order
SCENARIOS = {
    "unrecorded": (4, 3, [(1, "0")]),
    "recorded": (2, 2, [(1, "0")]),
    "both": (4, 3, [(0, "2"), (1, "0")]),
}


def launch(out: Path, mode: str, timeout: float = 240) -> list[dict[str, dict]]:
    """Both ranks' results per scenario; fails (never blocks) when a rank hangs or dies."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "_monitor_nonfinite_worker.py"), str(out), mode],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"on_nonfinite={mode!r}: a rank hung past {timeout} s: " +
                    "\n".join(p.communicate()[0][-3000:] for p in procs))
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outs)
    return [{name: json.loads((out / f"{name}-rank-{r}.json").read_text()) for name in SCENARIOS} for r in range(2)]


@pytest.mark.parametrize("mode", ["warn", "stop", "raise", "raise-caught"])
def test_a_nan_on_one_rank_never_hangs_and_every_rank_takes_the_same_decision(tmp_path, mode):
    ranks = launch(tmp_path, mode)
    for name, (every, nan_step, want) in SCENARIOS.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        ctx = (mode, name)
        # the job went on together: both ranks reached the collective after the loop, in step
        assert r0["all_reduce"] == r1["all_reduce"] == 2.0, ctx
        assert r0["params"] == r1["params"], ctx  # DDP kept the replicas equal: the same steps on each rank
        assert r0["census_kept"] and r1["census_kept"], ctx  # every hook off on every rank, also after a raise
        for key in ("loop_steps", "mon_steps", "should_stop", "warnings", "error", "error_layer", "error_rank",
                    "caught_at", "saved"):
            assert r0[key] == r1[key], (ctx, key, r0[key], r1[key])
        # the same decision, taken at the NaN's step
        first_rank, first_layer = want[0]
        if mode == "warn":
            assert r0["loop_steps"] == r0["mon_steps"] == STEPS and not r0["should_stop"] and r0["error"] is None
            [message] = r0["warnings"]
            assert f"step {nan_step}, rank {first_rank}: '{first_layer}' produced NaN or Inf" in message, ctx
        elif mode == "stop":
            assert r0["should_stop"] and r0["loop_steps"] == r0["mon_steps"] == nan_step + 1, ctx
            assert r0["error"] is None and r0["warnings"] == []
        elif mode == "raise":
            assert r0["loop_steps"] == nan_step + 1 and not r0["should_stop"], ctx
            assert f"step {nan_step}, rank {first_rank}: '{first_layer}' produced NaN or Inf" in r0["error"], ctx
            assert (r0["error_layer"], r0["error_rank"]) == (first_layer, first_rank), ctx
        else:  # raise-caught: every rank caught it at the same step, saved together, and trained on
            assert r0["caught_at"] == nan_step and r0["saved"] and r0["loop_steps"] == STEPS, ctx
            assert (r0["error_layer"], r0["error_rank"]) == (first_layer, first_rank), ctx
            assert (tmp_path / f"ckpt-{name}.pt").is_file()
        if len(want) > 1:  # the message says that other ranks saw one too
            text = r0["warnings"][0] if mode == "warn" else r0["error"] or ""
            if mode in ("warn", "raise", "raise-caught"):
                assert "rank 1 too" in text, (ctx, text)
        # every rank's alert, naming its rank, in rank 0's mon.alerts, rank 0's log, and the same on rank 1
        got = [(a["rank"], a["where"], a["step"]) for a in r0["alerts"]]
        assert got == [(rank, layer, nan_step) for rank, layer in want], ctx
        assert all(f"rank {a['rank']}" in a["message"] for a in r0["alerts"]), ctx
        assert r1["alerts"] == r0["alerts"], ctx
        last = STEPS - 1 if mode in ("warn", "raise-caught") else nan_step
        wanted_steps = sorted({s for s in range(0, last + 1, every)} | {nan_step})
        if mode == "raise-caught":  # the monitor closed at the NaN's step
            wanted_steps = [s for s in wanted_steps if s <= nan_step]
        assert [r["step"] for r in r0["jsonl"]] == wanted_steps, ctx  # each once: only rank 0 writes
        logged = [r for r in r0["jsonl"] if r["alerts"]]
        assert [r["step"] for r in logged] == [nan_step] and logged[0]["alerts"] == r0["alerts"], ctx
        assert [r["step"] for r in r0["records"]] == wanted_steps and r1["records"] == [], ctx
