"""Run in a process with 8 CPU devices (see test_sharding.py): each mesh preset's train step must
match the single-device step, keep the shardings the rules give, and not replicate parameters."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.config import MeshConfig
from moejax.model import Transformer
from moejax.trainer.optim import make_optimizer
from moejax.trainer.step import init_state, make_train_step

from tests.helpers import tiny_config

# The named layouts of moejax.sharding (the pipeline one is checked with its own config below), plus
# pure data parallelism.
PRESETS = {name: mc for name, mc in sharding.PRESETS.items() if name != "pipeline"}
PRESETS["data"] = MeshConfig(data=8, fsdp=1)


def one_step(cfg, mesh):
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    tx, sched = make_optimizer(cfg.optim, params, cfg.train.steps)
    graphdef, rest, state = init_state(cfg, tx)
    sh = sharding.tree_shardings(state, mesh)
    sharding.check_divisible(state, sh, mesh)
    bsh = sharding.batch_sharding(mesh)
    state = jax.device_put(state, sh)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32),
             "segment_ids": np.repeat(np.array([[1] * (T // 2) + [2] * (T - T // 2)], np.int32), B, 0),
             "positions": np.tile(np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32), (B, 1))}
    step = make_train_step(graphdef, rest, tx, sched, cfg, sh, bsh)
    state, m = step(state, jax.device_put(batch, bsh))
    state, m = step(state, jax.device_put(batch, bsh))  # a second step exercises the optimizer state
    return state, m, sh


def check_capacity_exchange():
    """The expert-parallel MoE layer with the capacity and ragged exchanges (ragged_all_to_all emulated on
    CPU): with room for every row it equals the single-device layer (forward and input gradient); with
    too little room the capacity exchange drops rows and says so."""
    from moejax.model.moe import MoE

    mesh = sharding.make_mesh(MeshConfig(expert=4, fsdp=2))
    out = {}
    ref = g_ref = None  # without a mesh the exchange settings are unused: one reference for all four
    for cf, name, exchange in ((4.0, "roomy", "capacity"), (0.5, "tight", "capacity"), (4.0, "ragged", "ragged"),
                               (0.5, "ragged_tight", "ragged")):
        cfg = tiny_config().model.replace(ep_exchange=exchange, capacity_factor=cf, moe_impl="dropless")
        layer = MoE(cfg, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (8, 16, cfg.hidden_size))
        graphdef, state = nnx.split(layer)

        def f(state, x, meshed):
            def run():
                y, aux = nnx.merge(graphdef, state)(x)
                return jnp.sum(y ** 2), aux["drop_fraction"]
            if meshed:
                with sharding.activate(mesh):
                    return run()
            return run()

        grad_fn = jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True), static_argnums=2)
        if ref is None:
            (ref, _), g_ref = grad_fn(state, x, False)
        (got, drop), g_got = grad_fn(state, x, True)
        out[name] = (float(got), float(ref), float(drop))
        if name in ("roomy", "ragged"):
            np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_ref), atol=1e-5, rtol=1e-4)
            assert float(drop) == 0.0
        elif name == "tight":
            assert 0.0 < float(drop) < 1.0, out
        else:  # ragged with a receive buffer of 1x the local rows: exact where nothing was dropped
            assert 0.0 <= float(drop) < 1.0, out
            if float(drop) == 0.0:
                np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    return out


def check_pipeline():
    """Two pipeline stages (x expert 2 x fsdp 2): the same loss, gradient norm, parameters and router
    biases as one device, with the MoE layer stack split over 'stage' and the single dense layer (which
    two stages do not divide) replicated."""
    base = tiny_config()
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=8),
                              model=base.model.replace(num_heads=4, num_layers=3, first_k_dense_replace=1,
                                                       pipeline_microbatches=4, mtp_depth=1))
    from moejax.model import transformer

    ref_state, ref_m, _ = one_step(cfg, sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    calls = []
    real = transformer.run_stack_pipelined
    transformer.run_stack_pipelined = lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    try:
        state, m, sh = one_step(cfg, sharding.make_mesh(sharding.PRESETS["pipeline"]))
    finally:
        transformer.run_stack_pipelined = real
    assert calls == [2], calls  # the 2 MoE layers ran as a pipeline; the 1 dense layer, replicated, did not
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=2e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=2e-4)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-5, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state["router"]), jax.tree.leaves(ref_state["router"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = state["params"]["segments"][1]["ffn"]["w_gate_up"].get_value()
    assert "stage" in str(w.sharding.spec), w.sharding.spec
    dense = state["params"]["segments"][0]["ffn"]["w_gate_up"].get_value()
    assert "stage" not in str(dense.sharding.spec), dense.sharding.spec
    return str(w.sharding.spec)


def main():
    assert jax.device_count() == 8, jax.devices()
    if "--pipeline-only" in sys.argv:
        print(check_pipeline())
        return
    if "--exchange-only" in sys.argv:
        print(check_capacity_exchange())
        return
    check_capacity_exchange()
    check_pipeline()
    base = tiny_config()
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=8),
                              model=base.model.replace(num_heads=4, mtp_depth=1))
    ref_state, ref_m, _ = one_step(cfg, sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    results = {}
    for name, mc in PRESETS.items():
        mesh = sharding.make_mesh(mc)
        state, m, sh = one_step(cfg, mesh)
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=2e-4, err_msg=name)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-5, rtol=1e-4, err_msg=name)
        for a, b in zip(jax.tree.leaves(state["router"]), jax.tree.leaves(ref_state["router"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        # every parameter and Adam moment ends with the sharding the rules give
        want = jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        got = jax.tree.leaves(state)
        assert all(g.sharding.is_equivalent_to(w, g.ndim) for g, w in zip(got, want)), name
        total = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
        per_device = max(sum(s.data.nbytes for x in jax.tree.leaves(state["params"])
                             for s in x.addressable_shards if s.device == d) for d in jax.devices())
        w = state["params"]["segments"][1]["ffn"]["w_gate_up"].get_value()
        results[name] = {"param_bytes_per_device": per_device, "param_bytes_total": total,
                         "w_gate_up_spec": str(w.sharding.spec)}
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
