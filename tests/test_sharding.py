"""Sharding: mesh/rule errors here; the 8-device equivalence runs in a subprocess (device count is
fixed when jax starts)."""

from __future__ import annotations

import json
import math

import pytest

from moejax import sharding
from moejax.config import MeshConfig
from tests.helpers import run_mesh_check


def test_mesh_resolution_and_errors():
    assert sharding.resolve_mesh(MeshConfig(fsdp=-1, tensor=2), 8)["fsdp"] == 4
    with pytest.raises(sharding.ShardingError, match="axes multiply to 4 but there are 8 devices"):
        sharding.resolve_mesh(MeshConfig(fsdp=2, tensor=2), 8)
    with pytest.raises(sharding.ShardingError, match="only one axis may be -1"):
        sharding.resolve_mesh(MeshConfig(fsdp=-1, data=-1), 8)
    # a stage count dividing no layer stack would pipeline nothing (DeepSeek-V3: 3 dense, 58 MoE)
    sharding.check_pipeline(2, [("dense", 3), ("moe", 58)])  # the MoE stack is pipelined
    with pytest.raises(
        sharding.ShardingError,
        match=r"mesh.stage=4 divides none of the layer stacks \(dense 3, moe 58\).*"
        r"divide a stack: \[2, 3, 29, 58\]",
    ):
        sharding.check_pipeline(4, [("dense", 3), ("moe", 58)])


def test_indivisible_experts_name_the_parameter():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    from moejax.model.moe import MoE
    from tests.helpers import tiny_config

    layer = nnx.eval_shape(
        lambda: MoE(
            tiny_config().model.replace(n_routed_experts=6).with_router(n_group=1),
            rngs=nnx.Rngs(0),
        )
    )
    state = nnx.state(layer, nnx.Param)
    mesh = Mesh(
        np.array(jax.devices()[:1]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES
    )
    fake = type(
        "FakeMesh", (), {"shape": {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1, "stage": 1}}
    )()
    spec = sharding.spec_for(("expert", "embed", None, "expert_mlp"), sharding.DEFAULT_RULES, mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, None, None)  # size-1 axes are dropped
    sh = jax.tree.map(
        lambda v: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")),
        nnx.to_pure_dict(state),
    )
    vals = jax.tree.map(lambda v: jnp.zeros(v.shape), nnx.to_pure_dict(state))
    with pytest.raises(
        sharding.ShardingError, match=r"w_down.*dimension 6 is not divisible by mesh axes expert"
    ):
        sharding.check_divisible({"w_down": vals["w_down"]}, {"w_down": sh["w_down"]}, fake)


@pytest.mark.slow
def test_8_devices_match_one_device():
    """tests/sharded_check.py on 8 CPU devices: sharded init, every exchange and expert rule, every
    preset (pipeline included), restore onto another mesh, sparse attention's two stages,
    DeepSeek-V4 on two layouts; and XLA never had to replicate a tensor to reshard it."""
    out = run_mesh_check("tests.sharded_check")
    results = out["presets"]
    assert set(results) == {
        "fsdp",
        "data",
        "fsdp_tensor",
        "expert_fsdp",
        "expert_tensor",
        "pipeline",
        "restore",
    }
    for name, res in results.items():
        if name == "restore":
            continue
        ratio = res["param_bytes_per_device"] / res["param_bytes_total"]
        if name == "data":
            assert ratio == 1.0  # pure data parallelism replicates by design
        else:
            assert ratio < 0.6, (name, ratio)  # nothing large is accidentally replicated
    assert results["fsdp"]["param_bytes_per_device"] < 0.2 * results["fsdp"]["param_bytes_total"]
    assert (
        "expert" in results["expert_fsdp"]["w_gate_up_spec"]
        and "fsdp" in results["expert_fsdp"]["w_gate_up_spec"]
    )
    assert "tensor" in results["fsdp_tensor"]["w_gate_up_spec"]
    assert "tensor" in results["restore"] and "expert" in results["restore"]
    assert out["init"]["init_temp_bytes_per_device"] < out["init"]["state_bytes_per_device"]
    assert out["exchange"]["capacity cf=0.5 global default"] > 5  # assignments dropped
    dsa = out["dsa"]  # DeepSeek Sparse Attention: both stages equal one device (checked there)
    assert dsa["sparse"]["indexer_kl"] > 0 and dsa["warmup"]["indexer_kl"] > 0
    assert "fsdp" in dsa["sparse"]["wk_spec"]  # the indexer's key projection sharded like embed
    assert dsa["pipeline_indexer_kl"] > 0  # carried through the pipeline (equal: checked there)
    assert "index_topk" in dsa["context"] and "context axis" in dsa["context"]
    v4 = out["v4"]  # DeepSeek-V4: two layouts equal one device (checked there)
    assert v4["indexer_kl"] > 0 and "tensor" in v4["expert_tensor"]
    assert "attention_type='v4'" in v4["context"] and "context axis" in v4["context"]
    print(json.dumps(out["seconds"]))


def test_rules_from_the_config_and_hybrid_mesh_sizes():
    from moejax.config import MeshConfig

    rules = sharding.rules_for(MeshConfig(rules="embed=fsdp+expert, expert_mlp=none"))
    assert (
        rules["embed"] == ("fsdp", "expert")
        and rules["expert_mlp"] is None
        and rules["vocab"] == "tensor"
    )
    with pytest.raises(sharding.ShardingError, match="unknown mesh axis 'fsdq'"):
        sharding.rules_for(MeshConfig(rules="embed=fsdq"))
    with pytest.raises(sharding.ShardingError, match="logical one of"):
        sharding.rules_for(MeshConfig(rules="hidden=fsdp"))
    # ici x dcn: 2 slices of 8 devices, fsdp filling each slice and data across them
    assert sharding.resolve_mesh(MeshConfig(fsdp=-1, tensor=2, dcn_data=2), 16) == {
        "data": 2,
        "fsdp": 4,
        "expert": 1,
        "context": 1,
        "tensor": 2,
        "stage": 1,
    }
    with pytest.raises(sharding.ShardingError, match="dcn degrees multiply to 3"):
        sharding.resolve_mesh(MeshConfig(dcn_data=3), 16)
    for name, preset in sharding.PRESETS.items():
        assert math.prod(sharding.resolve_mesh(preset, 8).values()) == 8, name
