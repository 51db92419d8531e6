"""FP8 matmuls with DeepSeek-V3's fine-grained scaling (DeepSeek-V3 report, section 3.3).

Every operand of a matmul is quantized to float8 E4M3 with its own scale per small tile, scale =
amax / 448 (E4M3's largest finite value), so one outlier costs the precision of 128 values rather
than of the whole tensor:

  forward  y = x w        x in 1 x 128 tiles (a row's 128 consecutive values of the contraction
                          dim), w in 128 x 128 blocks
  dgrad    dx = dy w^T    dy in 1 x 128 tiles (along the output dim it contracts), w's blocks
  wgrad    dw = x^T dy    x and dy in 128 x 1 tiles (128 consecutive rows of one column: the
                          contraction is over rows here)

E4M3 on all tensors, gradients included: the report adopts it over the E4M3-forward / E5M2-gradient
split ("we adopt the E4M3 format on all tensors for higher precision"), the per-tile scales taking
care of the range E5M2 would otherwise buy. Products accumulate in float32; master weights and the
optimizer stay float32 (the train state's), and gradients reach them straight through the
quantization. DeepSeek keeps the embedding, the output head, the router, normalization and the
attention core in higher precision; moejax quantizes what the report quantizes: the attention
projections, the dense FFN and the experts (through the grouped matmul).

How it computes: each operand is quantized to E4M3 and dequantized (`qdq`), then multiplied in the
compute dtype with float32 accumulation. The numbers are those of an FP8 matmul with per-tile
scales and float32 accumulation (up to the compute dtype's rounding of each dequantized value, exact
in float32); the speed is not, since no fused FP8 kernel runs: on CPU and TPU v5 there are no FP8
matmul units, and a Hopper/Blackwell kernel with block scales is not built here.

`quantize_weight` / `dequantize_weight` use the layout of DeepSeek-V3's FP8 checkpoints (weight
[out, in] in E4M3, `weight_scale_inv` [ceil(out / 128), ceil(in / 128)]), the one
`moejax.convert.safetensors_io.dequantize_fp8` reads.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.gmm.ops import gmm, tgmm

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
BLOCK = 128


def has_fp8_units(device) -> bool:
    """Whether a device has FP8 matmul units: NVIDIA compute capability >= 8.9 (Ada, Hopper,
    Blackwell), AMD MI300 and later, TPU v7 (Ironwood)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    cc = getattr(device, "compute_capability", None)
    if cc:
        major, minor = (int(p) for p in str(cc).split(".")[:2])
        return (major, minor) >= (8, 9)
    return "mi300" in kind or "mi325" in kind or "mi355" in kind or "tpu7" in kind.replace(" ", "")


def fallback_note(device, compute_dtype: str) -> str:
    """What execution.fp8 does on this device, for the run's log."""
    units = (
        "it has FP8 matmul units, which moejax does not use yet (no fused FP8 kernel)"
        if has_fp8_units(device)
        else "it has no FP8 matmul units"
    )
    return (
        f"execution.fp8 on {getattr(device, 'device_kind', device)}: {units}; FP8 numerics run "
        f"emulated (E4M3 quantize/dequantize per tile, {compute_dtype} matmuls with float32 "
        "accumulation), at the speed of the compute dtype or below"
    )


def quantize(x, block: tuple[int, int]):
    """x [M, N] -> (E4M3 values [M, N], float32 scales [ceil(M / bm), ceil(N / bn)]) with one scale
    per bm x bn tile (a partial tile at the edge has its own); x ~= values * scale per tile."""
    M, N = x.shape
    bm, bn = max(1, min(block[0], M)), max(1, min(block[1], N))
    Mp, Np = -(-M // bm) * bm, -(-N // bn) * bn
    xf = jnp.pad(x.astype(jnp.float32), ((0, Mp - M), (0, Np - N)))
    tiles = xf.reshape(Mp // bm, bm, Np // bn, bn)
    amax = jnp.max(jnp.abs(tiles), axis=(1, 3))  # [Mp / bm, Np / bn]
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = (tiles / scale[:, None, :, None]).astype(E4M3)
    return q.reshape(Mp, Np)[:M, :N], scale


def dequantize(q, scale, block: tuple[int, int], dtype=jnp.float32):
    """The inverse of `quantize`: values [M, N] times their tile's scale."""
    M, N = q.shape
    bm, bn = max(1, min(block[0], M)), max(1, min(block[1], N))
    s = jnp.repeat(jnp.repeat(scale, bm, axis=0), bn, axis=1)[:M, :N]
    return (q.astype(jnp.float32) * s).astype(dtype)


def qdq(x, block: tuple[int, int], dtype=None):
    """x [M, N] through E4M3 with per-tile scales and back, in `dtype` (default x's)."""
    return dequantize(*quantize(x, block), block, dtype or x.dtype)


def quantize_weight(w):
    """A weight [out, in] as DeepSeek-V3's FP8 checkpoints store it: (E4M3 [out, in],
    weight_scale_inv float32 [ceil(out / 128), ceil(in / 128)]), 128 x 128 blocks."""
    return quantize(w, (BLOCK, BLOCK))


def dequantize_weight(w_fp8, scale_inv, dtype=jnp.float32):
    return dequantize(w_fp8, scale_inv, (BLOCK, BLOCK), dtype)


ROW_TILE = (1, BLOCK)  # activations and output gradients in the forward pass and dgrad
COL_TILE = (BLOCK, 1)  # both operands of wgrad
W_BLOCK = (BLOCK, BLOCK)


@contextlib.contextmanager
def block_size(n: int):
    """Tiles of n instead of 128 for what is traced inside (tests and benchmarks: a tiny model's
    64-wide rows then hold several tiles, as V3's 7168-wide ones hold 56)."""
    global ROW_TILE, COL_TILE, W_BLOCK
    saved = ROW_TILE, COL_TILE, W_BLOCK
    ROW_TILE, COL_TILE, W_BLOCK = (1, n), (n, 1), (n, n)
    try:
        yield
    finally:
        ROW_TILE, COL_TILE, W_BLOCK = saved


def _mm(a, b, out_dtype):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_dot(x, w, out_dtype):
    """x [M, K] @ w [K, N] in FP8 with fine-grained scales (module docstring); float32
    accumulation, result in out_dtype."""
    return _mm(qdq(x, ROW_TILE), qdq(w, W_BLOCK), out_dtype)


def _dot_fwd(x, w, out_dtype):
    # the residuals are the operands themselves (what a plain matmul keeps); the backward pass
    # quantizes them again rather than keeping a second, dequantized copy of the weight
    return fp8_dot(x, w, out_dtype), (x, w)


def _dot_bwd(out_dtype, res, dy):
    x, w = res
    wq = qdq(w, W_BLOCK)
    cd = x.dtype
    dx = _mm(qdq(dy, ROW_TILE, cd), wq.T, cd)
    dw = _mm(qdq(x, COL_TILE).T, qdq(dy, COL_TILE, cd), wq.dtype)
    return dx, dw


fp8_dot.defvjp(_dot_fwd, _dot_bwd)


def _qdq_groups(w):
    """Each group's [K, N] weight in 128 x 128 blocks: w [G, K, N]."""
    return jax.vmap(lambda wg: qdq(wg, W_BLOCK))(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_gmm(lhs, rhs, group_sizes, out_dtype, impl=None):
    """Grouped matmul lhs [M, K] x rhs [G, K, N] (rows sorted by group, `kernels.gmm`) in FP8:
    lhs in 1 x 128 tiles, each expert's weight in 128 x 128 blocks, float32 accumulation. In wgrad
    the 128 x 1 tiles run over the sorted rows, so a tile may straddle two experts' rows."""
    return gmm(
        qdq(lhs, ROW_TILE),
        _qdq_groups(rhs),
        group_sizes,
        preferred_element_type=out_dtype,
        impl=impl,
    )


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, impl):
    return fp8_gmm(lhs, rhs, group_sizes, out_dtype, impl), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, impl, res, dy):
    lhs, rhs, group_sizes = res
    rq = _qdq_groups(rhs)
    cd = lhs.dtype
    dlhs = gmm(
        qdq(dy, ROW_TILE, cd),
        rq.swapaxes(1, 2),
        group_sizes,
        preferred_element_type=jnp.float32,
        impl=impl,
    ).astype(cd)
    drhs = tgmm(
        qdq(lhs, COL_TILE),
        qdq(dy, COL_TILE, cd),
        group_sizes,
        num_groups=rq.shape[0],
        preferred_element_type=jnp.float32,
        impl=impl,
    ).astype(rq.dtype)
    return dlhs, drhs, None


fp8_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def fp8_einsum(spec: str, x, w, out_dtype=jnp.float32):
    """`jnp.einsum(spec, x, w)` for the projections' specs, whose contracted dims are x's trailing
    and w's leading ones in the same order ('BTD,DNH->BTNH', 'BTNH,NHD->BTD', '...D,DXF->...XF'),
    as one `fp8_dot` over the flattened dims."""
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    nc = sum(1 for c in ws if c in xs)
    if not (nc and xs.endswith(ws[:nc]) and out == xs[: len(xs) - nc] + ws[nc:]):
        raise ValueError(
            f"fp8_einsum: {spec!r} must contract x's trailing and w's leading dims in order"
        )
    K = int(np.prod(w.shape[:nc]))
    lead, tail = x.shape[: x.ndim - nc], w.shape[nc:]
    y = fp8_dot(x.reshape(-1, K), w.reshape(K, -1), jnp.dtype(out_dtype))
    return y.reshape(*lead, *tail)
