"""Op checks and op names on an FSDP2 model (2 gloo ranks, CPU): the parallel machinery's own ops (FSDP's
all-gather buffers, allocated uninitialised and filled afterwards) are not the model's, so they are neither checked
nor named; the model's own ops still are."""

from __future__ import annotations

import json

import pytest
import torch

from _ranks import needs_gloo, two_ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    two_ranks("_fsdp_ops_worker.py", out)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@needs_gloo
def test_a_healthy_fsdp2_model_raises_and_alerts_nothing_with_freed_memory_full_of_nan(ranks):
    from _fsdp_ops_worker import RUNS

    for rank in ranks:
        assert rank["check_finite"] == ["ok"] * RUNS
        assert rank["alerts"] == []
        assert rank["census_unchanged"]


@needs_gloo
def test_under_fsdp2_op_names_are_the_unsharded_models(ranks):
    for rank in ranks:
        assert rank["names"] == rank["plain_names"]  # layer_names: no all_gather_copy_in, no "0.linear"
        assert rank["ops"] == rank["plain_ops"]  # trace(ops=True), the model called from the user's code
        assert "2.sqrt" in rank["ops"]


@needs_gloo
def test_under_fsdp2_a_nan_the_model_makes_is_still_caught_at_its_op(ranks):
    for rank in ranks:
        assert rank["real_nan"].startswith("'2.sqrt' (torch.sqrt) in '2' (FSDPBlock) produced 128 NaN of 128 values "
                                           "in forward; its inputs were finite.")


@needs_gloo
def test_under_fsdp2_param_grads_are_the_shards_of_the_global_batchs_gradient(ranks):
    from _fsdp_ops_worker import batch, model

    net = model()  # one process on the global batch: the reference
    net(batch()).pow(2).mean().backward()
    for rank in ranks:
        assert rank["grads_are_p_grad"]
        assert set(rank["param_grads"]) == {"0.weight", "0.bias", "2.lin.weight", "2.lin.bias"}
        for name, g in rank["param_grads"].items():
            torch.testing.assert_close(torch.tensor(g), net.get_parameter(name).grad)
