"""Context parallelism (moejax/kernels/attention/context.py): the load-balanced layout here; the
8-device equivalence with one device runs in a subprocess (tests/context_check.py), the TPU
compile in test_tpu_aot.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moejax import sharding
from moejax.config import MeshConfig
from moejax.kernels.attention import context
from tests.helpers import run_mesh_check


def test_balanced_order_gives_each_device_an_early_and_a_late_chunk():
    order = context.balanced_order(16, 4)  # 8 chunks of 2 rows; device c: chunks c and 7 - c
    np.testing.assert_array_equal(
        order.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    )
    assert sorted(order) == list(range(16))


def test_every_device_visits_as_many_block_pairs_and_together_all():
    from tests.context_check import check_balance

    assert check_balance()
    # contiguous chunks would give the last of 4 devices 7x the first one's pairs; balanced: equal
    fwd, _ = context.pair_tables(64, 4, 8)  # 8 blocks of 8 rows: 36 causal pairs, 9 each
    assert fwd.shape == (4, 9, 3)


def test_context_axis_in_rules_and_mesh():
    sizes = sharding.resolve_mesh(MeshConfig(fsdp=-1, context=4), 8)
    assert sizes["context"] == 4 and sizes["fsdp"] == 2
    abstract = sharding.abstract_mesh(MeshConfig(fsdp=2, context=4), 8)
    rules = sharding.rules_for(MeshConfig())
    assert sharding.sequence_axes(abstract, rules) == ("context",)
    # parameters are sharded over the context axis as over fsdp; activations over positions
    assert sharding.spec_for(("embed", "mlp"), rules, abstract)[0] == ("fsdp", "context")
    assert tuple(sharding.spec_for(("batch", "sequence"), rules, abstract)) == ("fsdp", "context")
    with pytest.raises(sharding.ShardingError, match="must be a multiple of 2 x the context ways"):
        sharding.check_context(abstract, rules, 36)
    sharding.check_context(abstract, rules, 40)


@pytest.mark.slow
def test_8_devices_context_parallel_matches_one_device():
    """tests/context_check.py on 8 CPU devices: reorder, attention (MHA, GQA, MLA dims, packed) and
    train steps (MLA + MoE + MTP, GQA) on context layouts mixed with fsdp, expert and tensor equal
    one device; a long sequence's temporaries shrink; bad layouts are refused."""
    out = run_mesh_check("tests.context_check")
    res = out["results"]
    assert len(res["attention"]) == 4 * 3 + 4 + 4  # + each shape in natural order
    assert len(res["steps"]) == 6  # 5 layouts + the FP8 layout's (noise, FP8 effect)
    mem = res["memory"]
    assert mem["temp_bytes_context8"] < mem["temp_bytes_one_device"] / 3
    print(json.dumps(out["seconds"]))
