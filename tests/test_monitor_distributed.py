"""hookkit.monitor across processes: under DDP (also with no_sync() accumulation), FSDP2 (also with bfloat16 mixed
precision) and tensor parallel, over 2 gloo ranks and 3 (an uneven split of the batch and of the shards), every
statistic rank 0 logs equals the one a single process logs on the global batch, and each parameter's grad norm is
that of the gradient the optimizer stepped with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hookkit
from hookkit import hook_census

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _monitor_dist_worker as worker  # noqa: E402

MODES = ["ddp", "ddp_nosync", "fsdp", "fsdp_bf16", "tp", "tp_dtensor", "refuse_2d"]


def launch(tmp: Path, nproc: int, batch: int, modes: list[str]) -> dict[str, dict]:
    """Rank 0's results per mode, from one torchrun launch (a 60 s process-group timeout in the worker, and a hang
    of the whole launch fails the test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), str(HERE / "_monitor_dist_worker.py"), str(tmp), str(batch),
           *modes]
    try:
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the ranks hung: {e.output!r:.2000}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp / f"rank-{r}.json").read_text()) for r in range(nproc)]
    for r, results in enumerate(ranks):  # every hook off on every rank, and only rank 0 writes
        assert all(got["census_kept"] for got in results.values()), r
        assert r == 0 or all(got.get("sunk") in (None, []) for got in results.values()), r
    return ranks[0]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return launch(tmp_path_factory.mktemp("two"), 2, 8, MODES)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return launch(tmp_path_factory.mktemp("three"), 3, 10, ["ddp", "fsdp", "tp"])  # 10 rows: 4, 3, 3


def reference(batch: int, micros: int) -> list[dict]:
    """One process, the global batch, the same model, data and optimizer; monitor's records and the norms of the
    gradients the optimizer stepped with."""
    model = worker.make_model()
    census = hook_census(model)
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    stepped = []
    with hookkit.monitor(model, ["fc1", "act", "fc2"], every=worker.EVERY, summary=False) as mon:
        for step, xs in enumerate(worker.global_batches(batch)):
            for x in xs[:micros]:
                model(x).pow(2).mean().backward()
            if step % worker.EVERY == 0:
                stepped.append({n: float(p.grad.double().norm()) for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
            mon.step()
    assert hook_census(model) == census
    return [dict(r, stepped=s) for r, s in zip(mon.records, stepped, strict=True)]


def check(got: dict, batch: int, micros: int, *, rel: float, zero_abs: float = 1e-9, abs_: float = 1e-9) -> None:
    want = reference(batch, micros)
    assert [r["step"] for r in got["sunk"]] == [r["step"] for r in want] == [0, 2]
    for record, stepped, ref in zip(got["sunk"], got["stepped"], want, strict=True):
        assert set(record["layers"]) == set(ref["layers"]) == {"fc1", "act", "fc2"}
        for layer, stats in ref["layers"].items():
            for key, value in stats.items():
                tol = zero_abs if key == "zero_frac" else abs_
                assert record["layers"][layer][key] == pytest.approx(value, rel=rel, abs=tol), (layer, key)
        assert set(record["params"]) == set(ref["params"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        for name, stats in ref["params"].items():
            for key, value in stats.items():
                assert record["params"][name][key] == pytest.approx(value, rel=rel), (name, key)
            # the gradient this run's optimizer stepped with (the reduced one; its whole, for a DTensor)
            assert record["params"][name]["grad_norm"] == pytest.approx(stepped[name], rel=1e-5), name
            assert stepped[name] == pytest.approx(ref["stepped"][name], rel=rel), name


@pytest.mark.parametrize("mode", ["ddp", "ddp_nosync", "fsdp", "tp", "tp_dtensor"])
def test_two_ranks_log_the_global_batchs_statistics(two_ranks, mode):
    check(two_ranks[mode], 8, worker.MICRO if mode == "ddp_nosync" else 1, rel=1e-4)


def test_fsdp2_with_bfloat16_mixed_precision_logs_the_fp32_reference_within_bf16_rounding(two_ranks):
    # bfloat16 keeps 8 bits of mantissa: activations and gradients within a few 0.1 % (a mean near 0 within 1e-3
    # of values about 1), a ReLU zero may flip
    check(two_ranks["fsdp_bf16"], 8, 1, rel=3e-2, zero_abs=0.02, abs_=1e-3)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "tp"])
def test_three_ranks_and_an_uneven_split_log_the_global_batchs_statistics(three_ranks, mode):
    check(three_ranks[mode], 10, 1, rel=1e-4)


def test_a_two_dimensional_mesh_is_refused_before_any_hook_naming_the_parameter(two_ranks):
    got = two_ranks["refuse_2d"]
    assert got["error"] is not None and "'fc1.weight'" in got["error"] and "2-dimensional" in got["error"]
    assert got["census_kept"]
