"""DataParallel / DistributedDataParallel: layer names work with or without the `module.` prefix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

import hookkit

from _optional import needs_torchvision, torchvision
from conftest import hook_census

HERE = Path(__file__).resolve().parent


@needs_torchvision
def test_dataparallel_names_with_and_without_prefix():
    inner = torchvision.models.resnet18().eval()
    model = nn.DataParallel(inner)  # on a CPU-only machine it simply calls the wrapped model
    x = torch.randn(2, 3, 32, 32)
    assert hookkit.layer_names(model) == hookkit.layer_names(inner)
    before = hook_census(model)
    with hookkit.capture(model, ["layer1", "module.fc"]) as cap:
        y = model(x)
    assert hook_census(model) == before
    assert list(cap) == ["layer1", "fc"]
    torch.testing.assert_close(cap["fc"], y)
    torch.testing.assert_close(cap["module.fc"], y)
    assert "module.layer1" in cap and "layer1" in cap


def test_unwrapped_models_do_not_strip_a_real_module_prefix():
    model = nn.Sequential()
    model.add_module("module", nn.Linear(2, 2))
    with hookkit.capture(model, ["module"]) as cap:
        model(torch.ones(1, 2))
    assert "module" in cap and "module.module" not in cap


def test_distributed_data_parallel_under_torchrun_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import torch, torch.nn as nn, torch.distributed as dist, hookkit\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(0)\n"
        "model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)))\n"
        "x = torch.randn(3, 4) + dist.get_rank()\n"
        "before = hookkit.hook_census(model)\n"
        "with hookkit.capture(model, ['module.0', '2'], grads=True) as cap:\n"
        "    y = model(x)\n"
        "    y.sum().backward()\n"
        "ref = model.module[0](x)\n"
        "assert torch.allclose(cap['0'], ref) and torch.allclose(cap['module.2'], y)\n"
        "assert cap.grads['2'].shape == (3, 1)\n"
        "assert hookkit.hook_census(model) == before\n"
        f"open(r'{tmp_path}' + f'/rank-{{dist.get_rank()}}.ok', 'w').close()\n"
        "dist.barrier()\n"
        "import os\n"
        "os._exit(0)  # skip C++ teardown: gloo + DDP can abort at interpreter exit ('terminate called...')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank-0.ok").exists() and (tmp_path / "rank-1.ok").exists()
