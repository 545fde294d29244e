#!/usr/bin/env python
"""The five hot paths of hookkit's engine, in one short run: the figures a change of the engine must keep.

    python benchmarks/bench_hotpaths.py              # ~3 min on 2 CPU cores
    python benchmarks/bench_hotpaths.py --rounds 21  # steadier medians, longer

It measures whatever ``import hookkit`` finds, so two versions compare by running it twice, alternately
(``PYTHONPATH=<other checkout> python benchmarks/bench_hotpaths.py``), on a quiet machine.

1. tiny stack (``bench_capture.py``'s: 150 x Linear(16, 16), batch 1), a capture held open / raw forward hooks
   registered once;
2. the same, a ``with hookkit.capture(...)`` per forward / raw hooks registered and removed per forward;
3. ResNet-50 (batch 2 x 224^2, no_grad), a capture of layer1-4 + avgpool per forward / the bare forward;
4. ResNet-18 (batch 4 x 224^2), forward + backward with a capture of the output gradients of layer1-4 + avgpool
   (``grads=True``) / the bare forward + backward;
5. ResNet-50 (as 3), a capture of 10 op nodes (``layer1.0.add`` ... ``layer3.2.add``) / the bare forward.

Method (as ``bench_capture.py``): one process, variants interleaved round by round with the order rotating, warm-up
rounds dropped; a ratio is the median over rounds of the per-round ratio (paired), with its interquartile range.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import Clock, interleave, ratio, tiny_stack, tiny_variants  # noqa: E402

import hookkit  # noqa: E402

BLOCKS = ["layer1", "layer2", "layer3", "layer4", "avgpool"]
OPS = ["layer1.0.add", "layer1.1.add", "layer1.2.add", "layer2.0.add", "layer2.1.add", "layer2.2.add",
       "layer2.3.add", "layer3.0.add", "layer3.1.add", "layer3.2.add"]


def timed(step):
    def measure(inner: int):
        with Clock() as c:
            for _ in range(inner):
                step()
        return c.dt / inner, c.gc / inner
    return measure


def tiny(rounds: int) -> dict[str, dict[str, float]]:
    """``bench_capture.py``'s tiny stack and its variants, 30 forwards per sample, 4x the rounds of the rest."""
    model, x, linears, make, cap = tiny_stack()
    del cap
    variants = tiny_variants(model, x, linears, make)
    with torch.no_grad():
        samples, _ = interleave(variants, rounds=4 * rounds, warmup=5, inner=30)
    return {"tiny stack held open / raw hooks": ratio(samples, "d", "b"),
            "with per forward / raw register+remove": ratio(samples, "c", "b2")}


def resnets(rounds: int) -> dict[str, dict[str, float]]:
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(0)
    r50 = resnet50().eval()
    x50 = torch.randn(2, 3, 224, 224)
    r18 = resnet18()
    x18 = torch.randn(4, 3, 224, 224)

    def r50_blocks():
        with hookkit.capture(r50, BLOCKS):
            r50(x50)

    def r50_ops():
        with hookkit.capture(r50, OPS):
            r50(x50)

    def r18_bare():
        r18(x18).sum().backward()
        r18.zero_grad(set_to_none=True)

    def r18_grads():
        with hookkit.capture(r18, BLOCKS, grads=True):
            r18(x18).sum().backward()
        r18.zero_grad(set_to_none=True)

    no_grad = {"r50_bare": timed(lambda: r50(x50)), "r50_blocks": timed(r50_blocks), "r50_ops": timed(r50_ops)}
    with torch.no_grad():
        s50, _ = interleave(no_grad, rounds=rounds, warmup=2, inner=2)
    s18, _ = interleave({"r18_bare": timed(r18_bare), "r18_grads": timed(r18_grads)}, rounds=rounds, warmup=2,
                        inner=2)
    return {"ResNet-50 capture of 5 blocks / bare": ratio(s50, "r50_blocks", "r50_bare"),
            "ResNet-18 gradients of 5 blocks / bare (fwd+bwd)": ratio(s18, "r18_grads", "r18_bare"),
            "ResNet-50 capture of 10 op nodes / bare": ratio(s50, "r50_ops", "r50_bare")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds per section (default 11)")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"hookkit {hookkit.__version__} from {Path(hookkit.__file__).parent} | torch {torch.__version__} | "
          f"{args.threads} threads | {args.rounds} rounds | load avg {os.getloadavg()[0]:.2f}")
    results = {**tiny(args.rounds), **resnets(args.rounds)}
    for what, r in results.items():
        print(f"{what:52s} {r['median']:.3f}x  [{r['p25']:.3f}-{r['p75']:.3f}]")


if __name__ == "__main__":
    main()
