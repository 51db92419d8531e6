"""Pallas Mosaic TPU kernels for gmm and tgmm (the megablox design: scalar-prefetched visit
schedule).

gmm grid (N tiles, visits, K tiles): each visit multiplies one [tm, tk] row tile by its group's
[tk, tn] weight tile into a float32 VMEM accumulator; on the last K step the rows of the visit's
group are merged into the output tile, which stays resident in VMEM while consecutive visits of the
same tile fill in their own rows.

tgmm grid (K tiles, N tiles, visits): each visit adds lhs_tile^T @ grad_tile (rows masked to its
group) into the accumulator; on a group's last visit the accumulator becomes that group's [tk, tn]
output block. Every local group is visited at least once, so empty groups write zeros.

Rows are padded to a multiple of tm in the wrapper. K and N tiles must divide K and N (or be the
whole dimension), as Mosaic requires for lane-aligned blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels.gmm import schedule as sched

DEFAULT_TILES = (128, 128, 128)  # (tm, tk, tn)


def _lane_tile(dim: int, want: int) -> int:
    """Largest multiple of 128 <= want dividing dim, or the whole dimension."""
    t = (min(want, dim) // 128) * 128
    while t >= 128:
        if dim % t == 0:
            return t
        t -= 128
    return dim


def _row_tile(m: int, want: int, dtype) -> int:
    sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
    return max(sub, min(want, -(-m // sub) * sub))


def _pad_rows(x, rows):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _interpret(interpret):
    if interpret is True:
        return pltpu.InterpretParams(out_of_bounds_reads="raise")
    return interpret or False


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
):
    """[M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] out_dtype."""
    M, K = lhs.shape
    G = rhs.shape[0]
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiles or DEFAULT_TILES
    tm, tk, tn = _row_tile(M, tm, lhs.dtype), _lane_tile(K, tk), _lane_tile(N, tn)
    num_tiles = -(-M // tm)
    s = sched.gmm_schedule(group_sizes, group_offset, G, M, tm)
    V = s.group.shape[0]
    nk = K // tk

    def kernel(group_ref, tile_ref, start_ref, end_ref, nv_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        v, k = pl.program_id(1), pl.program_id(2)
        g = group_ref[v]
        active = v < nv_ref[0]
        local = (g >= 1) & (g <= G)

        @pl.when(k == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active & local)
        def _():
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...], rhs_ref[...], dims, preferred_element_type=jnp.float32
            )

        @pl.when(active & (k == nk - 1))
        def _():
            tile = tile_ref[v]
            rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mine = (rows >= start_ref[g]) & (rows < end_ref[g])
            first = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile)
            prev = jnp.where(first, 0.0, out_ref[...].astype(jnp.float32))
            val = jnp.where(local, acc_ref[...], 0.0)
            out_ref[...] = jnp.where(mine, val, prev).astype(out_ref.dtype)

    def rhs_map(n, v, k, group_ref, tile_ref, *_):
        g = jnp.clip(group_ref[v] - 1, 0, G - 1)
        return (g, n, k) if transpose_rhs else (g, k, n)

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tiles * tm, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(N // tn, V, nk),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda n, v, k, group_ref, tile_ref, *_: (tile_ref[v], k)),
                pl.BlockSpec(rhs_block, rhs_map),
            ],
            out_specs=pl.BlockSpec(
                (tm, tn), lambda n, v, k, group_ref, tile_ref, *_: (tile_ref[v], n)
            ),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name="moejax_gmm",
    )
    out = call(s.group, s.tile, s.starts, s.ends, s.num_visits, _pad_rows(lhs, num_tiles * tm), rhs)
    return out[:M]


def tgmm(
    lhs, grad, group_sizes, group_offset, num_groups: int, out_dtype, *, tiles=None, interpret=None
):
    """Per local group g: lhs[rows_g]^T @ grad[rows_g] -> [num_groups, K, N] out_dtype."""
    M, K = lhs.shape
    N = grad.shape[1]
    tm, tk, tn = tiles or DEFAULT_TILES
    tm, tk, tn = _row_tile(M, tm, lhs.dtype), _lane_tile(K, tk), _lane_tile(N, tn)
    num_tiles = -(-M // tm)
    s = sched.tgmm_schedule(group_sizes, group_offset, num_groups, M, tm)
    V = s.group.shape[0]

    def kernel(
        group_ref, tile_ref, start_ref, end_ref, nv_ref, lhs_ref, grad_ref, out_ref, acc_ref
    ):
        v = pl.program_id(2)
        nv = nv_ref[0]
        g = group_ref[v]
        active = v < nv

        @pl.when(active & ((v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g)))
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active)
        def _():
            tile = tile_ref[v]
            rows_k = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
            rows_n = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            lo, hi = start_ref[g], end_ref[g]
            x = jnp.where((rows_k >= lo) & (rows_k < hi), lhs_ref[...], 0)
            dy = jnp.where((rows_n >= lo) & (rows_n < hi), grad_ref[...], 0)
            acc_ref[...] += jax.lax.dot_general(
                x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )

        last = (v == nv - 1) | (group_ref[jnp.minimum(v + 1, V - 1)] != g)

        @pl.when(active & last)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, K, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(K // tk, N // tn, V),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda k, n, v, group_ref, tile_ref, *_: (tile_ref[v], k)),
                pl.BlockSpec((tm, tn), lambda k, n, v, group_ref, tile_ref, *_: (tile_ref[v], n)),
            ],
            out_specs=pl.BlockSpec(
                (None, tk, tn), lambda k, n, v, group_ref, tile_ref, *_: (group_ref[v], k, n)
            ),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret(interpret),
        name="moejax_tgmm",
    )
    rows = num_tiles * tm
    return call(
        s.group, s.tile, s.starts, s.ends, s.num_visits, _pad_rows(lhs, rows), _pad_rows(grad, rows)
    )
