"""Run in a process with 8 CPU devices (see test_context_parallel.py). Context parallelism against
one device:

  reorder    to_balanced / from_balanced are the balanced permutation and its inverse, with other
             axes sharded too
  attention  the attention op on a sequence split 8, 4 and 2 ways (with batch and head axes), MHA,
             GQA and MLA's head dims, packed documents: output and gradients equal the one-device
             reference, blockwise and reference local computations
  balance    every device visits the same number of (query block, key block) pairs, and together
             exactly the pairs causal attention needs
  steps      two train steps of the DeepSeek-V3-shaped tiny model (MLA, MoE, MTP), of a GQA model
             and of the first in FP8, on layouts mixing context with fsdp, expert and tensor: loss,
             gradient norm and parameters equal one device's
  memory     a long sequence's train step needs several times less temporary memory per device
             with context=8 than on one device

Prints one JSON line of results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.config import Config, MeshConfig
from moejax.kernels.attention import attention, context
from moejax.kernels.attention.blockwise import _pairs
from moejax.kernels.attention.reference import attention_reference
from moejax.trainer import setup
from tests.helpers import tiny_config
from tests.sharded_check import ONE, _close, one_step


def layout_of(mesh_cfg: MeshConfig):
    mesh = sharding.make_mesh(mesh_cfg)
    return sharding.layout(mesh, sharding.rules_for(mesh_cfg))


def check_reorder():
    for mesh_cfg in (MeshConfig(fsdp=1, context=8), MeshConfig(fsdp=2, context=4)):
        lay = layout_of(mesh_cfg)
        C = mesh_cfg.context
        x = jnp.arange(4 * 32 * 3).reshape(4, 32, 3)
        with jax.set_mesh(lay.mesh):
            to = jax.jit(lambda x, lay=lay: context.to_balanced(x, lay))(x)
            back = jax.jit(
                lambda x, lay=lay: context.from_balanced(context.to_balanced(x, lay), lay)
            )(x)
            swapped = jax.jit(lambda x, lay=lay: context.to_balanced(x, lay, axis=0))(
                x.transpose(1, 0, 2)
            )
        order = context.balanced_order(32, C)
        np.testing.assert_array_equal(np.asarray(to), np.asarray(x)[:, order])
        np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
        np.testing.assert_array_equal(
            np.asarray(swapped), np.asarray(x)[:, order].transpose(1, 0, 2)
        )
    return True


ATTN_LAYOUTS = {
    "context8": MeshConfig(fsdp=1, context=8),
    "context4_tensor2": MeshConfig(fsdp=1, context=4, tensor=2),
    "fsdp2_context2_tensor2": MeshConfig(fsdp=2, context=2, tensor=2),
}
SHAPES = {  # (heads, kv heads, qk head dim, v head dim)
    "mha": (4, 4, 16, 16),
    "gqa": (4, 2, 16, 16),
    "gqa_one_kv": (4, 1, 16, 16),  # one KV head: the tensor axis cannot split it
    "mla": (4, 4, 24, 16),
}


def _ref_loss(q, k, v, seg, w):
    o = attention_reference(q, k, v, seg, scale=0.3)
    return jnp.sum(jnp.sin(o) * w), o


def _ctx_loss(q, k, v, seg, w, lay, impl):
    b = functools.partial(context.to_balanced, layout=lay)
    o = attention(
        b(q), b(k), b(v), b(seg), scale=0.3, impl=impl, layout=lay, block=4, balanced=True
    )
    o = context.from_balanced(o, lay)
    return jnp.sum(jnp.sin(o) * w), o


def check_attention():
    B, T = 2, 64
    out = {}
    seg = np.ones((B, T), np.int32)
    seg[0, 20:] = 2
    seg[0, 50:] = 3
    seg[1, 40:] = 0  # padding
    seg = jnp.asarray(seg)
    for sname, (N, Nkv, H, Hv) in SHAPES.items():
        ks = jax.random.split(jax.random.key(len(out)), 4)
        q = jax.random.normal(ks[0], (B, T, N, H))
        k = jax.random.normal(ks[1], (B, T, Nkv, H))
        v = jax.random.normal(ks[2], (B, T, Nkv, Hv))
        w = jax.random.normal(ks[3], (B, T, N, Hv))
        grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
        (_, ref_out), ref_g = grad(_ref_loss)(q, k, v, seg, w)
        for lname, mesh_cfg in ATTN_LAYOUTS.items():
            lay = layout_of(mesh_cfg)
            # (the reference local form once per shape: the blockwise one is what runs)
            for impl in ("blockwise", "reference") if lname == "context8" else ("blockwise",):
                loss = functools.partial(_ctx_loss, lay=lay, impl=impl)
                with jax.set_mesh(lay.mesh):
                    fn = jax.jit(grad(loss))
                    (_, o), g = fn(q, k, v, seg, w)
                    hlo = fn.lower(q, k, v, seg, w).as_text()
                name = f"{sname}/{lname}/{impl}"
                assert "all-gather" in hlo or "all_gather" in hlo, name
                np.testing.assert_allclose(o, ref_out, atol=2e-5, rtol=2e-5, err_msg=name)
                for a, r in zip(g, ref_g):
                    np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5, err_msg=name)
                out[name] = float(jnp.max(jnp.abs(o - ref_out)))
        # rows in natural order (the generator's prefill) on a context layout: attended whole
        lay = layout_of(ATTN_LAYOUTS["context8"])
        with jax.set_mesh(lay.mesh):
            o = jax.jit(
                lambda q, k, v, seg, lay=lay: attention(q, k, v, seg, scale=0.3, layout=lay)
            )(q, k, v, seg)
        np.testing.assert_allclose(o, ref_out, atol=2e-5, rtol=2e-5, err_msg=f"{sname}/natural")
        out[f"{sname}/natural"] = float(jnp.max(jnp.abs(o - ref_out)))
    return out


def check_balance():
    for T, C, b in ((64, 8, 4), (64, 4, 4), (256, 4, 8), (96, 2, 24)):
        fwd, bwd = context.pair_tables(T, C, b)
        assert fwd.shape == bwd.shape and fwd.shape[0] == C
        whole = {(i, j) for i, j, _ in _pairs(T // b, T // b, b, b, kv_major=False)}
        t = T // (2 * C)
        seen = set()
        for c in range(C):
            chunks = (c, 2 * C - 1 - c)
            n = t // b

            def nat(i, chunks=chunks, n=n):  # local query block -> natural block
                return chunks[i // n] * n + i % n

            seen |= {(nat(i), j) for i, j, _ in fwd[c]}
            assert {(i, j) for i, j, _ in fwd[c]} == {(i, j) for i, j, _ in bwd[c]}
        assert seen == whole, (T, C, b)
        assert fwd.shape[1] * C == len(whole), (T, C, b)
    return True


STEP_LAYOUTS = {
    "context8": MeshConfig(fsdp=1, context=8),
    "expert2_context2_fsdp2": MeshConfig(fsdp=2, expert=2, context=2),
    "tensor2_context2_fsdp2": MeshConfig(fsdp=2, context=2, tensor=2),
}


def check_steps():
    base = tiny_config()
    gqa = dataclasses.replace(
        base,
        model=base.model.replace(
            attention_type="gqa",
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            qk_norm=True,
            mtp_depth=0,
        ),
    )
    fp8 = dataclasses.replace(base, execution=base.execution.replace(fp8=True))
    out, refs = {}, {}
    for mname, cfg in (("mla_mtp", base), ("gqa", gqa), ("mla_fp8", fp8)):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4))
        ref_state, ref_m, _ = refs[mname] = one_step(cfg, ONE, jax.devices()[:1])
        layouts = {
            "mla_mtp": STEP_LAYOUTS,
            "gqa": {"tensor2_context4": MeshConfig(fsdp=1, context=4, tensor=2)},
            # FP8 tiles over sharded activations and weights (fsdp, context, expert)
            "mla_fp8": {"expert2_context2_fsdp2": STEP_LAYOUTS["expert2_context2_fsdp2"]},
        }[mname]
        for lname, mesh_cfg in layouts.items():
            state, m, ts = one_step(cfg, mesh_cfg)
            name = f"{mname}/{lname}"
            if mname == "mla_fp8":
                plain = refs["mla_mtp"][0]
                out[f"{name} (layout, fp8 effect)"] = _close_fp8(
                    state, m, ref_state, ref_m, plain, name
                )
            else:
                _close(state, m, ref_state, ref_m, name)
            out[name] = float(m["loss"])
    return out


def _rel_diff(a_state, b_state) -> float:
    """||a - b|| / ||b|| over all parameters."""
    pairs = [
        (np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(a_state["params"]), jax.tree.leaves(b_state["params"]))
    ]
    num = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
    return (num / sum(float(np.sum(b**2)) for _, b in pairs)) ** 0.5


def _close_fp8(state, m, ref_state, ref_m, plain_state, name):
    """FP8's weight-gradient tiles are 128 rows x 1 column: which tokens share a scale follows the
    rows a device holds (balanced order, expert-sorted), so a layout's update differs from one
    device's by quantization noise (the forward tiles are per token and equal). After two steps
    the layout's parameters are closer to one device's FP8 run than FP8 itself moved them from the
    plain run's."""
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(
        float(m["grad_norm"]), float(ref_m["grad_norm"]), rtol=2e-2, err_msg=name
    )
    layout, fp8_effect = _rel_diff(state, ref_state), _rel_diff(ref_state, plain_state)
    assert layout < 0.5 * fp8_effect, (name, layout, fp8_effect)
    return layout, fp8_effect


def check_memory():
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, batch_size=1),
        data=dataclasses.replace(cfg.data, seq_len=2048),
    )

    def temp_bytes(mesh_cfg, devices=None):
        c = dataclasses.replace(cfg, mesh=mesh_cfg)
        ts = setup.build(c, sharding.make_mesh(mesh_cfg, devices))
        with jax.set_mesh(ts.mesh):
            compiled = ts.train_step().lower(ts.abstract, ts.abstract_batch()).compile()
            mem = compiled.memory_analysis()
        return mem.temp_size_in_bytes

    one = temp_bytes(ONE, jax.devices()[:1])
    ctx = temp_bytes(MeshConfig(fsdp=1, context=8))
    assert ctx < one / 3, (ctx, one)
    return {"temp_bytes_one_device": one, "temp_bytes_context8": ctx}


def _refused(cfg, match: str):
    try:
        setup.build(cfg)
    except sharding.ShardingError as e:
        assert match in str(e), e
    else:
        raise AssertionError(f"accepted: {cfg.mesh}, seq_len {cfg.data.seq_len}")


def check_errors():
    cfg = dataclasses.replace(tiny_config(), mesh=MeshConfig(fsdp=1, context=8))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=40))
    _refused(cfg, "data.seq_len=40 must be a multiple of 2 x the context ways")
    cfg = Config.from_dict(
        dict(dataclasses.asdict(tiny_config()), mesh=dict(fsdp=1, context=2, stage=2, expert=2))
    )
    _refused(cfg, "context parallelism inside a pipeline is not supported")
    return True


def main():
    assert jax.device_count() == 8, jax.device_count()
    which = sys.argv[1:] or ["reorder", "attention", "balance", "steps", "memory", "errors"]
    results, seconds = {}, {}
    for name in which:
        t0 = time.time()
        results[name] = globals()[f"check_{name}"]()
        seconds[name] = round(time.time() - t0, 1)
    print(json.dumps({"results": results, "seconds": seconds}))


if __name__ == "__main__":
    main()
