"""Every attention backend against the materialized reference, forward and gradients, on generated
inputs: packed documents, lengths that are no multiple of the blocks, GQA, MLA's unequal head dims,
bfloat16. The Pallas backends (splash for TPU, Triton flash attention for GPU) run in interpret mode
here."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ExecutionConfig, ModelConfig
from moejax.kernels.attention import attention, attention_reference, blockwise_attention
from moejax.kernels.attention.blockwise import _pairs
from moejax.model.transformer import Transformer
from tests.helpers import ROOT

TOL = {jnp.float32: {"fwd": 2e-5, "grad": 5e-5}, jnp.bfloat16: {"fwd": 3e-2, "grad": 6e-2}}


def _inputs(B, T, N, Nkv, H, Hv, dtype, packed, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, Nkv, H), dtype)
    v = jax.random.normal(ks[2], (B, T, Nkv, Hv), dtype)
    seg = None
    if packed:  # documents of random lengths, a padding tail (segment 0) on the last row
        seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.08, (B, T)), axis=1).astype(jnp.int32) + 1
        seg = seg.at[-1, T - T // 5 :].set(0)
    cot = jax.random.normal(ks[4], (B, T, N, Hv), jnp.float32)
    return q, k, v, seg, cot


def _compare(fn, B, T, N, Nkv, H, Hv, dtype=jnp.float32, packed=True, scale=0.25):
    q, k, v, seg, cot = _inputs(B, T, N, Nkv, H, Hv, dtype, packed)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, seg).astype(jnp.float32) * cot)

    ref = lambda q, k, v, s: attention_reference(q, k, v, s, scale=scale)
    with jax.default_matmul_precision("highest"):  # (GPUs default float32 dots to TF32)
        _compare_in(fn, ref, q, k, v, seg, cot, B, T, N, Hv, dtype, loss)


def _compare_in(fn, ref, q, k, v, seg, cot, B, T, N, Hv, dtype, loss):
    out, want = fn(q, k, v, seg), ref(q, k, v, seg)
    assert out.shape == want.shape == (B, T, N, Hv) and out.dtype == v.dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol["fwd"], rtol=tol["fwd"]
    )
    got_g = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want_g = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got_g, want_g):
        w = np.asarray(w, np.float32)
        err = np.abs(np.asarray(g, np.float32) - w).max() / (np.abs(w).max() + 1e-6)
        assert err < tol["grad"], f"d{name}: relative error {err:.2e}"


# B, T, N, Nkv, H, Hv, block: MHA, MLA dims (H != Hv), GQA, MQA, partial blocks, block > T, unequal
# blocks
CASES = [
    (2, 64, 4, 4, 16, 16, 16),
    (2, 61, 4, 4, 24, 16, 16),
    (1, 100, 6, 2, 16, 8, 32),
    (2, 50, 4, 1, 8, 8, 16),
    (1, 33, 2, 2, 8, 8, 64),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}N{}Nkv{}H{}Hv{}blk{}".format(*c))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blockwise_matches_reference(case, dtype):
    B, T, N, Nkv, H, Hv, block = case
    fn = lambda q, k, v, s: blockwise_attention(
        q, k, v, s, scale=0.25, block_q=block, block_kv=block
    )
    _compare(fn, B, T, N, Nkv, H, Hv, dtype)


def test_blockwise_unequal_blocks_and_one_document():
    fn = lambda q, k, v, s: blockwise_attention(q, k, v, s, scale=0.3, block_q=32, block_kv=8)
    _compare(fn, 2, 70, 4, 2, 16, 12, packed=True, scale=0.3)
    fn = lambda q, k, v, s: blockwise_attention(q, k, v, s, scale=0.3, block_q=8, block_kv=32)
    _compare(fn, 2, 70, 4, 4, 16, 12, packed=False, scale=0.3)


def test_causal_pairs_skip_blocks_above_the_diagonal():
    pairs = _pairs(4, 4, 16, 16, kv_major=False)
    assert [tuple(p[:2]) for p in pairs] == [
        (i, j) for i in range(4) for j in range(i + 1)
    ]  # 10 of 16
    assert list(pairs[:, 2]) == [1, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    kv = _pairs(4, 4, 16, 16, kv_major=True)
    assert sorted(map(tuple, kv[:, :2])) == sorted(map(tuple, pairs[:, :2])) and kv[0, 2] == 1
    # query blocks of 32 over key blocks of 16: key block j runs for queries i with 16 j <= 32
    # i + 31
    assert [tuple(p[:2]) for p in _pairs(2, 4, 32, 16, kv_major=False)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
    ]


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _shapes(sub)


def test_blockwise_never_builds_a_sequence_squared_array():
    """Forward and backward of T = 1024 in blocks of 128: no intermediate has two sequence-long dims
    (the reference's scores and mask are [B, N, T, T] and [B, 1, T, T])."""
    T = 1024
    q, k, v, seg, _ = _inputs(1, T, 2, 2, 16, 16, jnp.float32, packed=True)
    f = lambda q, k, v: blockwise_attention(
        q, k, v, seg, scale=0.25, block_q=128, block_kv=128
    ).sum()
    shapes = list(_shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert shapes and not [s for s in shapes if sum(d >= T for d in s) >= 2]
    ref = lambda q, k, v: attention_reference(q, k, v, seg, scale=0.25).sum()
    assert any(
        sum(d >= T for d in s) >= 2 for s in _shapes(jax.make_jaxpr(jax.grad(ref))(q, k, v).jaxpr)
    )


@pytest.mark.parametrize(
    "case", [(2, 200, 2, 2, 24, 16), (1, 130, 4, 2, 32, 32)], ids=["mla-dims", "gqa"]
)
def test_splash_interpret_matches_reference(case):
    interpret = jax.default_backend() != "tpu"
    fn = lambda q, k, v, s: attention(
        q, k, v, s, scale=0.25, impl="splash", block=128, interpret=interpret
    )
    _compare(fn, *case)


@pytest.mark.parametrize(
    "case",
    [(2, 100, 2, 2, 24, 16), (1, 70, 4, 2, 16, 16), (1, 40, 2, 2, 8, 16)],
    ids=["mla-dims", "gqa", "v-wider"],
)
def test_pallas_gpu_interpret_matches_reference(case):
    interpret = jax.default_backend() not in (
        "gpu",
        "cuda",
        "rocm",
    )  # compiled by Triton in gpu_check.sh
    fn = lambda q, k, v, s: attention(
        q, k, v, s, scale=0.25, impl="pallas_gpu", block=32, interpret=interpret
    )
    _compare(fn, *case)


def test_bad_backend_shapes_and_platform_fail_in_one_line():
    q, k, v, seg, _ = _inputs(1, 16, 2, 2, 8, 8, jnp.float32, packed=True)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'reference', 'blockwise'"):
        attention(q, k, v, seg, scale=1.0, impl="flash")
    with pytest.raises(
        ValueError, match=r"attention\[cudnn\]: needs a GPU.*\(1, 16, 2, 8\).*impl='blockwise'"
    ):
        attention(q, k, v, None, scale=1.0, impl="cudnn")
    with pytest.raises(ValueError, match=r"attention\[blockwise\]: k must be \[1, 16, Nkv, 8\]"):
        attention(q, k[:, :8], v[:, :8], seg, scale=1.0, impl="blockwise")
    with pytest.raises(ValueError, match=r"3 query heads are not a multiple of 2 KV heads"):
        attention(jnp.zeros((1, 16, 3, 8)), k, v, seg, scale=1.0)
    with pytest.raises(ValueError, match=r"segment_ids must be \[1, 16\]"):
        attention(q, k, v, seg[:, :4], scale=1.0)
    with pytest.raises(
        ValueError,
        match=r"attention\[splash\]: cannot run on platform 'cpu' \(q \(1, 16, 2, 8\)\).*"
        r"impl='blockwise'",
    ):
        attention(q, k, v, seg, scale=1.0, impl="splash")
    with pytest.raises(ValueError, match=r"attention\[pallas_gpu\]: cannot run on platform 'cpu'"):
        attention(q, k, v, seg, scale=1.0, impl="pallas_gpu")
    with pytest.raises(ValueError, match=r"execution\.attention_impl.*'blockwise'"):
        ExecutionConfig(attention_impl="flash")
    with pytest.raises(ValueError, match=r"execution\.attention_block"):
        ExecutionConfig(attention_block=-1)


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_model_loss_and_grads_equal_across_backends(attention_type):
    kw = {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "first_k_dense_replace": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "attention_type": attention_type,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    }
    if attention_type == "gqa":
        kw.update(num_kv_heads=2)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 50), 0, 128)
    seg = jnp.concatenate([jnp.ones((2, 20), jnp.int32), jnp.full((2, 30), 2, jnp.int32)], axis=1)
    got = {}
    for impl in ("reference", "blockwise"):
        model = Transformer(
            ModelConfig(**kw),
            rngs=nnx.Rngs(0),
            execution=ExecutionConfig(attention_impl=impl, attention_block=16),
        )
        loss, grads = nnx.value_and_grad(lambda m: m(ids, segment_ids=seg)[0].mean())(model)
        got[impl] = (float(loss), jax.tree.leaves(nnx.state(grads)))
    assert abs(got["reference"][0] - got["blockwise"][0]) < 1e-6
    for a, b in zip(got["reference"][1], got["blockwise"][1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


MESH_CHECK = r"""
import jax, jax.numpy as jnp, numpy as np
from moejax import sharding
from moejax.config import MeshConfig
from moejax.kernels.attention import attention, attention_reference
mesh = sharding.make_mesh(MeshConfig(fsdp=2, tensor=2))
layout = sharding.layout(mesh, sharding.rules_for(MeshConfig(fsdp=2, tensor=2)))
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q = jax.random.normal(ks[0], (4, 128, 4, 24)); k = jax.random.normal(ks[1], (4, 128, 4, 24))
v = jax.random.normal(ks[2], (4, 128, 4, 16))
seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.05, (4, 128)), axis=1).astype(jnp.int32)
f = lambda impl: jax.jit(jax.value_and_grad(
    lambda q, k, v: jnp.sum(attention(q, k, v, seg, scale=0.2, impl=impl, layout=layout, block=128,
                                   interpret=impl == "splash") ** 2), (0, 1, 2)))
want = f("reference")(q, k, v)
for impl in ("splash", "blockwise"):
    got = f(impl)(q, k, v)
    err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert err < 1e-5, (impl, err)
    print(impl, "ok", err)
"""


def test_pallas_backend_runs_in_shard_map_on_a_mesh():
    """splash (interpret) on a 2 x 2 mesh (batch over 'fsdp', heads over 'tensor') gives the
    reference."""
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", MESH_CHECK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "splash ok" in out.stdout and "blockwise ok" in out.stdout


@pytest.mark.parametrize(
    "T,blocks,want",
    [(3, (512, 512), 3), (300, (512, 128), 384), (1000, (512, 512), 1024), (130, (64, 64), 192)],
)
def test_blockwise_pads_no_further_than_its_blocks_need(T, blocks, want):
    """A short row is one block of its own length (prefill of a 3-token prompt must not run 512
    rows)."""
    q, k, v, seg, _ = _inputs(1, T, 2, 2, 2, 2, jnp.float32, packed=True)  # every other dim <= 3
    f = lambda q: blockwise_attention(
        q, k, v, seg, scale=0.25, block_q=blocks[0], block_kv=blocks[1]
    )
    longest = max(max(s, default=0) for s in _shapes(jax.make_jaxpr(f)(q).jaxpr))
    assert longest == want
