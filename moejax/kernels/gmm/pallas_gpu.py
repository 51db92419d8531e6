"""Pallas GPU kernels (Triton lowering) for gmm and tgmm.

gmm grid (visits, N tiles): a visit owns the rows of one group inside one [tm] row tile (see
schedule.py), loops over K in [tk] steps accumulating in float32 registers, and stores only its own
rows with a masked store, so visits that share a tile never write the same row. Rows before and
after the local groups are visits of two framing groups that store zeros; rows past M and columns
past N are masked, so no shape needs padding.

tgmm grid (local groups, K tiles, N tiles): each program loops over its group's row tiles (a dynamic
trip count) accumulating lhs^T @ grad; an empty group stores zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moejax.kernels.gmm import schedule as sched

# (tm, tk, tn): powers of two, >= 16 for tensor-core dots. Picked on an H200
# (benchmarks/RESULTS.md).
DEFAULT_TILES = (128, 64, 128)
TGMM_TILES = (64, 128, 128)  # tgmm's tm is its contraction step
DEFAULT_WARPS = 8
DEFAULT_STAGES = 3


def _pow2(dim: int, want: int) -> int:
    """want, shrunk to the next power of two >= dim when dim is small (never below 16)."""
    return max(16, min(want, pl.next_power_of_2(dim)))


def _in_range(start, size, dim):
    """Mask of the indices start + [0, size) below dim, or None when dim is a multiple of size."""
    return None if dim % size == 0 else (start + jnp.arange(size)) < dim


def _mask(rows, cols, shape):
    """[R, C] mask from a row mask [R] and a column mask [C] (None means all true); None if both
    are."""
    if rows is None and cols is None:
        return None
    r = jnp.ones((shape[0],), jnp.bool_) if rows is None else rows
    c = jnp.ones((shape[1],), jnp.bool_) if cols is None else cols
    return r[:, None] & c[None, :]


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _params(warps, stages):
    return plgpu.CompilerParams(
        num_warps=warps or DEFAULT_WARPS, num_stages=stages or DEFAULT_STAGES
    )


def gmm(
    lhs,
    rhs,
    group_sizes,
    group_offset,
    out_dtype,
    *,
    transpose_rhs=False,
    tiles=None,
    interpret=None,
    num_warps=None,
    num_stages=None,
):
    """[M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] out_dtype."""
    M, K = lhs.shape
    G = rhs.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiles or DEFAULT_TILES
    tm, tk, tn = _pow2(M, tm), _pow2(K, tk), _pow2(N, tn)
    s = sched.gmm_schedule(group_sizes, group_offset, G, M, tm)
    V = s.group.shape[0]
    nk = pl.cdiv(K, tk)
    prec = _precision(lhs.dtype)

    def kernel(group_ref, tile_ref, start_ref, end_ref, nv_ref, lhs_ref, rhs_ref, out_ref):
        v, j = pl.program_id(0), pl.program_id(1)
        g = group_ref[v]
        active = v < nv_ref[0]
        local = (g >= 1) & (g <= G)
        r0 = tile_ref[v] * tm
        rows = r0 + jnp.arange(tm)
        mine = (rows >= start_ref[g]) & (rows < end_ref[g])
        n_in = _in_range(j * tn, tn, N)
        store_mask = _mask(mine, n_in, (tm, tn))
        w = jnp.clip(g - 1, 0, G - 1)

        def body(kk, acc):
            k_in = _in_range(kk * tk, tk, K)  # None when every K tile is full (no mask needed)
            a = plgpu.load(
                lhs_ref.at[pl.ds(r0, tm), pl.ds(kk * tk, tk)],
                mask=_mask(mine, k_in, (tm, tk)),
                other=0,
            )
            if transpose_rhs:
                b_mask = _mask(n_in, k_in, (tn, tk))
                b = plgpu.load(
                    rhs_ref.at[w, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                    mask=b_mask,
                    other=None if b_mask is None else 0,
                )
                return acc + plgpu.dot(a, b, trans_b=True, precision=prec)
            b_mask = _mask(k_in, n_in, (tk, tn))
            b = plgpu.load(
                rhs_ref.at[w, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                mask=b_mask,
                other=None if b_mask is None else 0,
            )
            return acc + plgpu.dot(a, b, precision=prec)

        @pl.when(active & local)
        def _():
            acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((tm, tn), jnp.float32))
            plgpu.store(
                out_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)],
                acc.astype(out_ref.dtype),
                mask=store_mask,
            )

        @pl.when(active & ~local)
        def _():
            plgpu.store(
                out_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)],
                jnp.zeros((tm, tn), out_ref.dtype),
                mask=store_mask,
            )

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(V, pl.cdiv(N, tn)),
        compiler_params=_params(num_warps, num_stages),
        interpret=bool(interpret),
        name="moejax_gmm",
    )(s.group, s.tile, s.starts, s.ends, s.num_visits, lhs, rhs)


def tgmm(
    lhs,
    grad,
    group_sizes,
    group_offset,
    num_groups: int,
    out_dtype,
    *,
    tiles=None,
    interpret=None,
    num_warps=None,
    num_stages=None,
):
    """Per local group g: lhs[rows_g]^T @ grad[rows_g] -> [num_groups, K, N] out_dtype."""
    M, K = lhs.shape
    N = grad.shape[1]
    tm, tk, tn = tiles or TGMM_TILES
    tm, tk, tn = _pow2(M, tm), _pow2(K, tk), _pow2(N, tn)
    starts, ends = sched.local_bounds(group_sizes, group_offset, num_groups, M)
    prec = _precision(lhs.dtype)

    def kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref):
        g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        lo, hi = start_ref[g], end_ref[g]
        k_in, n_in = _in_range(i * tk, tk, K), _in_range(j * tn, tn, N)

        def body(t, acc):
            rows = t * tm + jnp.arange(tm)
            mine = (rows >= lo) & (rows < hi)
            a = plgpu.load(
                lhs_ref.at[pl.ds(t * tm, tm), pl.ds(i * tk, tk)],
                mask=_mask(mine, k_in, (tm, tk)),
                other=0,
            )
            b = plgpu.load(
                grad_ref.at[pl.ds(t * tm, tm), pl.ds(j * tn, tn)],
                mask=_mask(mine, n_in, (tm, tn)),
                other=0,
            )
            return acc + plgpu.dot(a, b, trans_a=True, precision=prec)

        acc = jax.lax.fori_loop(
            lo // tm, (hi + tm - 1) // tm, body, jnp.zeros((tk, tn), jnp.float32)
        )
        plgpu.store(
            out_ref.at[g, pl.ds(i * tk, tk), pl.ds(j * tn, tn)],
            acc.astype(out_ref.dtype),
            mask=_mask(k_in, n_in, (tk, tn)),
        )

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, K, N), out_dtype),
        grid=(num_groups, pl.cdiv(K, tk), pl.cdiv(N, tn)),
        compiler_params=_params(num_warps, num_stages),
        interpret=bool(interpret),
        name="moejax_tgmm",
    )(starts, ends, lhs, grad)
