"""Shared by the tests that run a worker script as 2 gloo ranks, with torchrun's environment set by hand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def two_ranks(worker: str, out: Path, *, timeout: float = 180) -> None:
    """Run ``tests/<worker> OUT`` as ranks 0 and 1; each has ``timeout`` seconds (the workers give their process
    group a 30 s timeout), so a hang fails the test; a rank that fails fails it with the lines the workers printed
    starting with "rank " and the end of both ranks' output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / worker), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"{worker} did not finish in {timeout} s: a rank hangs")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    said = [line for o in outs for line in o.splitlines() if line.startswith("rank ")]  # the workers' own prints
    assert all(p.returncode == 0 for p in procs), "\n".join(said + [o[-2500:] for o in outs])
