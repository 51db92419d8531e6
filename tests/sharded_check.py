"""Run in a process with 8 CPU devices (see test_sharding.py). Checks, each against one device:

  init      the train state is created by one jitted, sharded program (DeepSeek-V2-Lite tiny,
            fsdp x expert)
  exchange  the expert-parallel layer under every exchange and expert rule equals the single-device
            layer (dropless: the dropless path, in one round or several; capacity, ragged:
            `experts_capacity` on a routing that overflows), forward, gradients and drop fraction;
            the dropless rounds' temporaries shrink with their buffers; a rule the exchange cannot
            honour is refused
  presets   every mesh preset's train step (the pipeline's two stages too) matches one device, with
            the shardings the rules give
  restore   a checkpoint saved on one mesh restores onto another (Orbax resharding)
  dsa       DeepSeek Sparse Attention's train step (sparse and warm-up) equals one device

Prints one JSON line of results. The parent test also fails on XLA's "Involuntary full
rematerialization" warnings, which every step compiled here would print to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.config import Config, ExecutionConfig, MeshConfig
from moejax.experiment import load_config_file
from moejax.model.moe import MoE
from moejax.trainer import setup
from tests.helpers import ROOT, tiny_config

# The named layouts of moejax.sharding, plus pure data parallelism.
PRESETS = dict(sharding.PRESETS, data=MeshConfig(data=8, fsdp=1))
ONE = MeshConfig(fsdp=1)


def _batch(cfg):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    seg = np.repeat(
        np.array(
            [[1] * (T // 2) + [2] * (T // 2 - 3) + [0] * (T - T // 2 - (T // 2 - 3))], np.int32
        ),
        B,
        0,
    )
    seg[1, T // 4 :] = 0  # uneven valid counts
    pos = np.tile(
        np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32), (B, 1)
    )
    return {
        "tokens": rng.integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
    }


def one_step(cfg, mesh_cfg, devices=None):
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    ts = setup.build(cfg, sharding.make_mesh(mesh_cfg, devices))
    state = ts.init_state()
    step = ts.train_step()
    batch = jax.device_put(_batch(cfg), ts.batch_sharding)
    state, m = step(state, batch)
    state, m = step(state, batch)  # a second step exercises the optimizer state
    return state, m, ts


def _close(state, m, ref_state, ref_m, name, atol=3e-5):
    """Loss and gradient norm after two steps, then every parameter (atol: Adam's normalized
    update turns a gradient's last-bit differences into up to ~lr-sized ones where the gradient is
    near zero; V4's checks allow 1e-4)."""
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(
        float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=2e-4, err_msg=name
    )
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-4, err_msg=name)
    for a, b in zip(jax.tree.leaves(state["router"]), jax.tree.leaves(ref_state["router"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# ------------------------------------------------------------------------------------------- init


def check_init():
    """DeepSeek-V2-Lite tiny on fsdp=2 x expert=4: the state comes from one jitted program whose
    outputs are the shards; nothing is built eagerly, nothing moves from the host, no device holds
    more than its shards."""
    from moejax.model import transformer

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v2_lite_tiny.py"))
    cd.mesh.fsdp, cd.mesh.expert = 2, 4
    cfg = Config.from_dict(cd)
    built = []
    real_init = transformer.Transformer.__init__

    def spy(self, *a, **k):
        built.append(
            isinstance(jnp.zeros(()), jax.core.Tracer)
        )  # True when traced (eval_shape / jit)
        real_init(self, *a, **k)

    transformer.Transformer.__init__ = spy
    try:
        ts = setup.build(cfg)
        with jax.transfer_guard("disallow"):  # no host -> device copy of anything
            state = ts.init_state()
            jax.block_until_ready(state)
    finally:
        transformer.Transformer.__init__ = real_init
    assert built and all(built), f"a Transformer was built eagerly: {built}"
    init = jax.jit(lambda: setup._init(cfg, ts.tx, ts.mesh, ts.rules), out_shardings=ts.shardings)
    with jax.set_mesh(ts.mesh):
        mem = init.lower().compile().memory_analysis()
    per_device = ts.state_bytes_per_device()
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ts.abstract))
    n_leaves = len(jax.tree.leaves(ts.abstract))
    assert per_device <= mem.output_size_in_bytes <= per_device + 64 * n_leaves, (
        mem.output_size_in_bytes,
        per_device,
    )
    assert per_device < 0.5 * total, (
        per_device,
        total,
    )  # fsdp=2 halves the dense part, experts split 8 ways
    assert mem.temp_size_in_bytes < per_device, (mem.temp_size_in_bytes, per_device)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(ts.abstract)):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
        for shard in leaf.addressable_shards:
            assert shard.data.shape == want.sharding.shard_shape(want.shape)
    return {
        "state_bytes_total": total,
        "state_bytes_per_device": per_device,
        "init_temp_bytes_per_device": mem.temp_size_in_bytes,
    }


# -------------------------------------------------------------------------------------- exchanges

# logical 'expert' axis onto various mesh axes of fsdp=2 x expert=4 (x tensor=2 for the last)
RULES = {
    "default": ("", MeshConfig(fsdp=2, expert=4)),
    "expert=fsdp": ("expert=fsdp", MeshConfig(fsdp=2, expert=4)),
    "expert=expert+fsdp": ("expert=expert+fsdp", MeshConfig(fsdp=2, expert=4)),
    "expert=fsdp+expert": ("expert=fsdp+expert,embed=none", MeshConfig(fsdp=2, expert=4)),
    "expert=none": ("expert=none", MeshConfig(fsdp=2, expert=4)),
    "expert_mlp=none": ("expert_mlp=none", MeshConfig(fsdp=1, expert=4, tensor=2)),
    "expert_tensor": ("", MeshConfig(fsdp=1, expert=4, tensor=2)),
    "data_expert": ("", MeshConfig(data=2, fsdp=1, expert=4)),
    "expert8": ("", MeshConfig(fsdp=1, expert=8)),
}


def check_exchanges():
    """Expert-parallel MoE layer vs the single-device layer, forward + gradients + dropped count, on
    a routing that overflows the capacity (capacity_factor 0.5) with padding rows. The 'group'
    capacity scope equals the single-device layer run on each expert-parallel group's rows."""
    base = tiny_config().model.replace(
        n_routed_experts=8,
        num_experts_per_tok=2,
        router=tiny_config().model.router.replace(n_group=1, topk_group=1),
        hidden_size=32,
        moe_intermediate_size=16,
        n_shared_experts=1,
    )
    x = jax.random.normal(jax.random.key(1), (8, 16, base.hidden_size))
    mask = jnp.ones((8, 16)).at[2, 5:].set(0).at[5, :].set(0)
    _, state = nnx.split(MoE(base, rngs=nnx.Rngs(0)))

    def run(ex, mesh, rules, rows=slice(None)):
        """((loss, (y, dropped)), (param grads, x grads)) of the layer executed as `ex` on batch
        rows `rows`."""
        layout = sharding.layout(mesh, rules)
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda: MoE(base, rngs=nnx.Rngs(0), layout=layout, execution=ex))
        )
        m = mask[rows]

        def f(state, x):
            y, aux = nnx.merge(graphdef, state)(x, m)
            return jnp.sum(jnp.sin(y) * m[..., None]), (y * m[..., None], aux["dropped"])

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x[rows])

    def per_group(ex):  # the single-device layer on each half of the batch (fsdp=2's two groups)
        (la, (ya, da)), (ga, xa) = run(ex, None, None, slice(0, 4))
        (lb, (yb, db)), (gb, xb) = run(ex, None, None, slice(4, 8))
        return (
            (la + lb, (jnp.concatenate([ya, yb]), da + db)),
            (jax.tree.map(jnp.add, ga, gb), jnp.concatenate([xa, xb])),
        )

    refs, out = {}, {}

    def check(tag, got, ref):
        (_, (y, dropped)), (gs, gx) = got
        (_, (ref_y, ref_dropped)), (ref_gs, ref_gx) = ref
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(ref_y), atol=2e-5, rtol=1e-4, err_msg=tag
        )
        assert float(dropped) == float(ref_dropped), (tag, float(dropped), float(ref_dropped))
        np.testing.assert_allclose(
            np.asarray(gx), np.asarray(ref_gx), atol=2e-5, rtol=1e-4, err_msg=tag
        )
        for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(ref_gs)):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4, err_msg=tag
            )
        out[tag] = float(dropped)

    # dropless_buffer: 0 is one round of [n, A] buffers; 0.25 is [n, A / 16] with 4 expert shards,
    # and some pair of shards carries at least the even share A / 4, so at least 4 rounds run
    # (more for the fuller pairs of this skewed routing); 2.0 is the default
    for exchange, cf, scope, buf in (
        ("dropless", 1.0, "global", 0.0),
        ("dropless", 1.0, "global", 0.25),
        ("dropless", 1.0, "global", 2.0),
        ("capacity", 0.5, "global", 0.0),
        ("ragged", 0.5, "global", 0.0),
        ("capacity", 8.0, "global", 0.0),
        ("capacity", 0.5, "group", 0.0),
        ("ragged", 0.5, "group", 0.0),
    ):
        ref_ex = ExecutionConfig(
            moe_impl="dropless" if exchange == "dropless" else "capacity", capacity_factor=cf
        )
        if exchange == "capacity" and cf < 1 and scope == "global":
            cases = RULES
        elif scope == "group":
            cases = {k: RULES[k] for k in ("default", "expert8")}
        elif exchange == "dropless" and buf != 0.25:
            cases = {k: RULES[k] for k in ("default",)}
        else:
            cases = {k: RULES[k] for k in ("default", "expert=expert+fsdp")}
        for name, (rule_str, mc) in cases.items():
            split = scope == "group" and mc.expert < 8  # two expert-parallel groups of 4 devices
            key = (ref_ex.moe_impl, cf, split)
            if key not in refs:
                refs[key] = per_group(ref_ex) if split else run(ref_ex, None, None)
            rules = sharding.rules_for(dataclasses.replace(mc, rules=rule_str))
            ex = ExecutionConfig(
                moe_impl="dropless",
                ep_exchange=exchange,
                capacity_factor=cf,
                capacity_scope=scope,
                dropless_buffer=buf,
            )
            tag = f"{exchange} cf={cf} {scope} {name}" + (f" buffer={buf}" if buf else "")
            check(tag, run(ex, sharding.make_mesh(mc), rules), refs[key])
    assert out["capacity cf=0.5 global default"] > 5  # the routing overflows
    assert out["capacity cf=8.0 global default"] == 0.0
    y_group, y_global = (
        refs[("capacity", 0.5, True)][0][1][0],
        refs[("capacity", 0.5, False)][0][1][0],
    )
    # the two scopes keep different assignments
    assert float(jnp.abs(y_group - y_global).max()) > 0.05 * float(jnp.abs(y_global).max())
    out["ties across shards"] = check_capacity_ties()
    out["dropless temporaries MiB"] = check_dropless_memory()
    # a rule the exchange cannot honour is refused at construction, with one line
    try:
        MoE(
            base,
            rngs=nnx.Rngs(0),
            layout=sharding.layout(
                sharding.make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2)),
                sharding.rules_for(MeshConfig(rules="expert=tensor")),
            ),
        )
    except sharding.ShardingError as e:
        assert "'tensor' does not split the batch" in str(e) and "\n" not in str(e), e
        out["refused expert=tensor"] = str(e)
    else:
        raise AssertionError("expert=tensor was not refused")
    return out


def check_dropless_memory():
    """The dropless exchange in rounds holds one round's buffers: on 8 expert shards with 1024
    assignments of width 256 per device (float32), one round of worst-case buffers is [8, 1024,
    256] = 8 MiB each (send, receive, results, results back), rounds of the even share (buffer
    1.0) are [8, 128, 256]. The compiled layer's forward + backward temporaries must shrink with
    them."""
    model = tiny_config().model
    cfg = model.replace(
        n_routed_experts=16,
        num_experts_per_tok=4,
        router=model.router.replace(n_group=1, topk_group=1),
        hidden_size=256,
        moe_intermediate_size=64,
        n_shared_experts=0,
    )
    mc = MeshConfig(fsdp=1, expert=8)
    layout = sharding.layout(sharding.make_mesh(mc), sharding.rules_for(mc))
    x = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
    temp = {}
    for buf in (0.0, 1.0):
        ex = ExecutionConfig(moe_impl="dropless", dropless_buffer=buf)
        graphdef, state = nnx.split(
            nnx.eval_shape(lambda ex=ex: MoE(cfg, rngs=nnx.Rngs(0), layout=layout, execution=ex))
        )

        def f(state, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(state, x).compile()
        temp[buf] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    # one round's four buffers alone are 32 MiB; the rounds' are 4 MiB
    assert temp[0.0] > 32 and temp[1.0] < temp[0.0] - 24, temp
    return temp


def check_capacity_ties():
    """moe_ep.capacity_keep with the assignments split over 8 shards (both nesting orders of two
    axes) and many exactly tied weights: the same choice as a sort of the whole batch by (weight
    desc, position)."""
    from jax.sharding import PartitionSpec as P

    from moejax.model import moe_ep

    rng = np.random.default_rng(0)
    A, Ex = 8 * 40, 5
    ids = rng.integers(0, Ex, A).astype(np.int32)
    w = rng.choice(np.array([0.5, 0.25, 1.0, 0.125], np.float32), A)
    valid = rng.random(A) > 0.1
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
    checked = 0
    for axes in (("fsdp", "expert"), ("expert", "fsdp")):
        sizes = tuple(mesh.shape[a] for a in axes)
        for cap in (3, 17, 50):
            f = jax.shard_map(
                lambda i, w, v: moe_ep.capacity_keep(i, w, v, Ex, cap, axes, sizes),  # noqa: B023 - run in this iteration
                mesh=mesh,
                in_specs=(P(axes),) * 3,
                out_specs=P(axes),
                check_vma=False,
            )
            keep = np.asarray(jax.jit(f)(ids, w, valid))
            want = np.zeros(A, bool)
            for e in range(Ex):
                rows = sorted(
                    (a for a in range(A) if ids[a] == e and valid[a]), key=lambda a: (-w[a], a)
                )
                want[rows[:cap]] = True
            np.testing.assert_array_equal(keep, want, err_msg=f"{axes} cap={cap}")
            checked += 1
    return checked


# -------------------------------------------------------------------------------- pipeline, presets


def step_config():
    """The tiny default (MLA, dense + MoE layers, MTP) at batch 16: one dense layer, which two
    pipeline stages do not divide, and two MoE layers, which they do."""
    base = tiny_config()
    return dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, batch_size=16),
        model=base.model.replace(num_heads=4, num_layers=3, first_k_dense_replace=1, mtp_depth=1),
        execution=base.execution.replace(pipeline_microbatches=4),
    )


def check_presets_and_restore():
    """Every mesh preset's train step (two steps) against one device: loss, gradient norm,
    parameters, router biases; shardings as the rules say; nothing large replicated. The pipeline
    preset (two stages x expert 2 x fsdp 2) runs the two MoE layers as a pipeline and the dense
    layer, replicated, outside it."""
    from moejax.model import transformer

    cfg = step_config()
    ref_state, ref_m, _ = one_step(cfg, ONE, jax.devices()[:1])
    results = {}
    saved = None
    for name, mc in PRESETS.items():
        calls = []
        real = transformer.run_stack_pipelined
        transformer.run_stack_pipelined = lambda *a, **k: calls.append(a[1]) or real(*a, **k)  # noqa: B023 - used and restored in this iteration
        try:
            state, m, ts = one_step(cfg, mc)
        finally:
            transformer.run_stack_pipelined = real
        assert calls == ([2] if name == "pipeline" else []), (name, calls)
        _close(state, m, ref_state, ref_m, name)
        # every parameter and Adam moment ends with the sharding the rules give
        want = jax.tree.leaves(
            ts.shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)
        )
        got = jax.tree.leaves(state)
        assert all(g.sharding.is_equivalent_to(w, g.ndim) for g, w in zip(got, want)), name
        total = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
        per_device = max(
            sum(
                s.data.nbytes
                for x in jax.tree.leaves(state["params"])
                for s in x.addressable_shards
                if s.device == d
            )
            for d in jax.devices()
        )
        w = state["params"]["segments"][1]["ffn"]["w_gate_up"].get_value()
        results[name] = {
            "param_bytes_per_device": per_device,
            "param_bytes_total": total,
            "w_gate_up_spec": str(w.sharding.spec),
        }
        if name == "pipeline":
            dense = state["params"]["segments"][0]["ffn"]["w_gate_up"].get_value()
            assert "stage" in str(w.sharding.spec) and "stage" not in str(dense.sharding.spec)
        if name == "fsdp":
            saved = state
    results["restore"] = check_restore(cfg, saved)
    return results


def check_dsa():
    """DeepSeek Sparse Attention (V3.2) on fsdp=2 x expert=2 x tensor=2, sparse and warm-up stages:
    the train step equals one device (loss with the indexer KL, gradient norm, parameters); the
    indexers are sharded as their logical axes say; as a pipeline (stage=2, the sparse stage) too; a
    context axis is refused with one line."""
    from moejax.config import ConfigError

    out = {}
    mesh = MeshConfig(fsdp=2, expert=2, tensor=2)
    for stage in ("sparse", "warmup"):
        base = step_config()
        cfg = dataclasses.replace(
            base,
            model=base.model.replace(
                index_topk=8, index_n_heads=2, index_head_dim=16, dsa_stage=stage
            ),
        )
        ref_state, ref_m, _ = one_step(cfg, ONE, jax.devices()[:1])
        state, m, _ = one_step(cfg, mesh)
        _close(state, m, ref_state, ref_m, f"dsa {stage}")
        wk = state["params"]["segments"][1]["attn"]["indexer"]["wk"].get_value()
        out[stage] = {"indexer_kl": float(m["indexer_kl"]), "wk_spec": str(wk.sharding.spec)}
        if stage == "sparse":  # the two MoE layers as a pipeline: the indexer KL carried through
            state, m, _ = one_step(cfg, PRESETS["pipeline"])
            _close(state, m, ref_state, ref_m, "dsa pipeline")
            out["pipeline_indexer_kl"] = float(m["indexer_kl"])
    try:
        one_step(cfg, MeshConfig(context=2, fsdp=4))
        out["context"] = "accepted"
    except ConfigError as e:
        out["context"] = str(e)
    return out


def check_v4():
    """DeepSeek-V4 (sliding, CSA and HCA layers, a hash-routed layer, 2 hyper-connection streams,
    a segment of two scanned [CSA, HCA] groups) on fsdp=2 x expert=2 x tensor=2 and on
    expert=4 x tensor=2: the train step equals one device
    (loss with the indexer KL, gradient norm, parameters, router biases and hash tables); a
    context axis is refused with one line."""
    from moejax.config import ConfigError

    base = step_config()
    m = base.model
    model = m.replace(
        attention_type="v4",
        head_dim=16,
        qk_rope_head_dim=8,
        o_groups=2,
        o_lora_rank=16,
        num_layers=5,
        layer_types=(  # segments: [sliding], [CSA, HCA] x 2
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ),
        compress_rate_csa=4,
        compress_rate_hca=8,
        sliding_window=8,
        index_topk=4,
        index_n_heads=4,
        index_head_dim=16,
        num_hash_layers=1,
        hc_mult=2,
        first_k_dense_replace=0,
        mtp_depth=0,
        swiglu_limit=10.0,
        router=m.router.replace(score_func="sqrtsoftplus", n_group=1, topk_group=1),
    )
    cfg = dataclasses.replace(base, model=model)
    ref_state, ref_m, _ = one_step(cfg, ONE, jax.devices()[:1])
    out = {"indexer_kl": float(ref_m["indexer_kl"])}
    for name, mesh in (
        ("fsdp_expert_tensor", MeshConfig(fsdp=2, expert=2, tensor=2)),
        ("expert_tensor", PRESETS["expert_tensor"]),
        ("pipeline", PRESETS["pipeline"]),  # the two [CSA, HCA] groups as a pipeline
    ):
        state, metrics, _ = one_step(cfg, mesh)
        _close(state, metrics, ref_state, ref_m, f"v4 {name}", atol=1e-4)
        wo_a = state["params"]["segments"][1]["blocks"][0]["attn"]["wo_a"].get_value()
        out[name] = str(wo_a.sharding.spec)
    try:
        one_step(cfg, MeshConfig(context=2, fsdp=4))
        out["context"] = "accepted"
    except ConfigError as e:
        out["context"] = str(e)
    return out


def check_restore(cfg, state):
    """Saved from the fsdp=8 layout, restored into expert=4 x tensor=2: same values, the new
    shardings."""
    from moejax.trainer.checkpoint import Checkpointer

    with tempfile.TemporaryDirectory() as d:
        src = dataclasses.replace(cfg, mesh=PRESETS["fsdp"])
        ck = Checkpointer(d, src)
        ck.save(2, state, {"position": 7}, force=True)
        ck.close()
        dst = dataclasses.replace(cfg, mesh=PRESETS["expert_tensor"])
        ts = setup.build(dst)
        ck = Checkpointer(d, dst)
        ck.check_compatible(2)
        restored, data = ts.restore(ck, 2)
        ck.close()
    assert data == {"position": 7}
    for a, b, want in zip(
        jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(ts.abstract)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(want.sharding, a.ndim)
    w = restored["params"]["segments"][1]["ffn"]["w_gate_up"].get_value()
    return str(w.sharding.spec)


def main():
    assert jax.device_count() == 8, jax.devices()
    only = [a[2:] for a in sys.argv[1:] if a.startswith("--")]
    checks = {
        "init": check_init,
        "exchange": check_exchanges,
        "presets": check_presets_and_restore,
        "dsa": check_dsa,
        "v4": check_v4,
    }
    results, seconds = {}, {}
    for name, f in checks.items():
        if not only or name in only:
            t = time.perf_counter()
            results[name] = f()
            seconds[name] = round(time.perf_counter() - t, 1)
    results["seconds"] = seconds
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
