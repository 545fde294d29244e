"""Run by tests/test_extract_crash.py: a server that imports torch once and forks one child per extract() run, so
that the test can kill -9 many runs without paying torch's import (seconds) for each.

Protocol: the test writes one JSON object per line on stdin (``{"out": DIR, "n": N, "batch": B, "sleep": S,
"inject": null | "tear:K" | "rename", "ragged": false}``; ``ragged``: tests/test_extract_tokens.py's token model on
padded, masked batches, whose layers ``RAGGED_LAYERS`` are stored as ragged tokens); the server forks a child,
which prints ``started <pid>``,
``begin`` just before it calls ``hookkit.extract``, ``next <i>`` before its data yields batch i, ``batch`` each time
the model runs, ``finished`` and ``error <text>`` at the end; the server reaps the child and prints
``exit <pid> <code>`` (``-9`` for kill -9). EOF on stdin ends the server.

``inject`` makes the child kill -9 itself at a moment an outside timer rarely hits:
  ``tear:K``  in the middle of the K-th ``os.pwrite`` (half of its bytes written, the rest not);
  ``rename``  just after the first ``<layer>.npy`` is renamed into place, before the other layer's rename.
Every line goes out in one ``write(2)``, so a kill -9 never leaves half a line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.nn as nn

import hookkit

LAYERS = ["1", "3"]
RAGGED_LAYERS = ["net.1", "net.3"]


def model_and_batches(n: int, batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    return model, [(x[i:i + batch], torch.zeros(len(x[i:i + batch]))) for i in range(0, n, batch)]


def say(*words: object) -> None:
    """One line to the test in one write(2): a kill -9 right after it never leaves half a line behind."""
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # pragma: no cover - never reached


def _inject(inject: str | None) -> None:
    if not inject:
        return
    if inject.startswith("tear:"):
        at = int(inject.split(":")[1])
        real = os.pwrite
        count = [0]

        def torn(fd, data, offset):
            count[0] += 1
            if count[0] < at:
                return real(fd, data, offset)
            view = memoryview(data).cast("B")
            half = max(1, len(view) // 2)
            real(fd, view[:half], offset)
            say("torn")
            _die()

        os.pwrite = torn
    elif inject == "rename":
        for attr in ("replace", "rename"):
            real_move = getattr(os, attr)

            def move(src, dst, *args, _real=real_move, **kwargs):
                result = _real(src, dst, *args, **kwargs)
                if os.fspath(dst).endswith(".npy"):
                    say("renamed", os.path.basename(os.fspath(dst)))
                    _die()
                return result

            setattr(os, attr, move)
    else:
        raise ValueError(inject)


def child(job: dict) -> None:
    torch.set_num_threads(1)  # the same kernels in every run: rows are bit-identical whichever run computed them
    if job.get("ragged"):
        from test_extract_tokens import TokenNet, padded, sequences

        torch.manual_seed(0)
        model, batches, layers = TokenNet().eval(), padded(sequences(job["n"]), job["batch"]), RAGGED_LAYERS
        first = model.net[0]
    else:
        model, batches = model_and_batches(job["n"], job["batch"])
        layers, first = LAYERS, model[0]
    sleep = job.get("sleep", 0.0)

    def data():
        for i, b in enumerate(batches):
            say("next", i)
            yield b
            if sleep:
                time.sleep(sleep)

    first.register_forward_hook(lambda m, a, o: say("batch"))
    _inject(job.get("inject"))
    say("begin")
    hookkit.extract(model, layers, data(), out=job["out"], progress=False)
    say("finished")


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            say("started", os.getpid())
            try:
                child(job)
            except BaseException as exc:  # reported to the test, which fails with it
                say("error", f"{type(exc).__name__}: {exc}".replace("\n", " "))
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        say("exit", pid, code)


if __name__ == "__main__":
    serve()
