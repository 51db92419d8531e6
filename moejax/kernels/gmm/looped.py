"""The experts' SwiGLU FFN over rows grouped by expert, as one loop over row tiles (the CPU path).

    y[r] = (silu(x[r] @ Wg[e]) * (x[r] @ Wu[e])) @ Wd[e]     for the rows r of each group e

Rows are laid out as the 'tiled' gmm backend lays them (ops._tile_layout: every group starts on a
tile boundary), but instead of one batched einsum per matmul over tiles with their weights gathered
([tiles, K, N] copies of the weights, padding tiles included), a `fori_loop` visits only the tiles
that hold rows and runs both matmuls and the activation of one tile while its rows are in cache,
reading each weight in place. The backward pass is the same loop: it rebuilds the tile's gate/up
activations (nothing of size [rows, F] is kept), and adds each tile's weight gradient (in the
weights' dtype) into its group's float32 sum. Rows past the groups give zeros, as in `gmm`.

On the 2-core CPU machine the MoE layer's forward + backward at 8 experts takes 1.24x the dense
FFN's time with this loop, against 1.51x with two 'tiled' gmms; 2.10x against 2.27x at 128
experts; about the same at 64 (benchmarks/moe_layer.py, RESULTS.md). On TPU and GPU the Pallas
gmm kernels run instead (moe_ep.expert_ffn picks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels.gmm import ops

MAX_TILE = 1024


def loop_tile(rows: int, groups: int) -> int:
    """Rows per tile: the largest power of two up to half the groups' mean size (padding then
    costs at most a quarter of the rows on average), from 256 (smaller tiles cost more per row
    than their padding saves, measured at 128 experts) to MAX_TILE; fewer rows (decoding) take
    ops.default_tile's small tiles."""
    per_group = max(1, -(-rows // groups))
    if per_group < 512:
        return ops.default_tile(rows, groups)
    return min(MAX_TILE, 1 << ((per_group // 2).bit_length() - 1))


def _tile_ffn(x, wgu, wd, limit):
    """One tile: x [R, D], wgu [D, 2F], wd [F, D] -> [R, D] float32."""
    from moejax.model.layers import swiglu  # (the model's activation; model imports kernels)

    h = jnp.dot(x, wgu, preferred_element_type=jnp.float32)
    a = swiglu(h.reshape(h.shape[0], 2, -1), limit).astype(x.dtype)
    return jnp.dot(a, wd, preferred_element_type=jnp.float32)


def grouped_swiglu(rows, group_sizes, wgu, wd, *, limit: float = 0.0, tile: int | None = None):
    """rows [M, D] sorted by group; group_sizes int [G_total >= G] (groups past G and rows past the
    groups give zeros); wgu [G, D, 2, F] (gate, up); wd [G, F, D] -> [M, D] float32. rows and the
    weights share one dtype (the matmuls accumulate in float32)."""
    G, D, two, F = wgu.shape
    if rows.ndim != 2 or rows.shape[1] != D or two != 2 or wd.shape != (G, F, D):
        raise ValueError(
            f"grouped_swiglu: rows [M, {D}], wgu [G, D, 2, F] and wd [G, F, D] expected, got "
            f"{rows.shape}, {wgu.shape}, {wd.shape}"
        )
    if (
        group_sizes.ndim != 1
        or not jnp.issubdtype(group_sizes.dtype, jnp.integer)
        or group_sizes.shape[0] < G
    ):
        raise ValueError(
            f"grouped_swiglu: group_sizes must be int [G_total >= {G}], got "
            f"{group_sizes.dtype}{list(group_sizes.shape)}"
        )
    if not (rows.dtype == wgu.dtype == wd.dtype):
        raise ValueError(
            f"grouped_swiglu: rows and weights dtypes differ ({rows.dtype}, {wgu.dtype}, "
            f"{wd.dtype})"
        )
    if rows.shape[0] == 0:
        return jnp.zeros(rows.shape, jnp.float32)
    tile = tile or loop_tile(rows.shape[0], G)
    return _looped(rows, group_sizes, wgu, wd, float(limit), tile)


def _layout(rows, group_sizes, G: int, tile: int):
    lay = ops._tile_layout(group_sizes, 0, rows.shape[0], G, tile)
    sizes = ops._clipped_sizes(group_sizes, rows.shape[0])[:G]
    return lay, jnp.sum((sizes + tile - 1) // tile)  # the tiles that hold rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _looped(rows, group_sizes, wgu, wd, limit, tile):
    return _looped_fwd(rows, group_sizes, wgu, wd, limit, tile)[0]


def _looped_fwd(rows, group_sizes, wgu, wd, limit, tile):
    G, D, _, F = wgu.shape
    w1 = wgu.reshape(G, D, 2 * F)
    lay, used = _layout(rows, group_sizes, G, tile)
    x_t = ops._to_tiles(rows, lay, tile)  # [I, R, D]
    out = jnp.zeros(x_t.shape, jnp.float32)

    def body(i, out):
        g = lay.tile_group[i]
        return jax.lax.dynamic_update_index_in_dim(
            out, _tile_ffn(x_t[i], w1[g], wd[g], limit), i, 0
        )

    out = jax.lax.fori_loop(0, used, body, out)
    return ops._from_tiles(out, lay, jnp.float32), (x_t, wgu, wd, lay, used)


def _looped_bwd(limit, tile, res, dy):
    x_t, wgu, wd, lay, used = res
    G, D, _, F = wgu.shape
    w1 = wgu.reshape(G, D, 2 * F)
    dy_t = ops._to_tiles(dy.astype(jnp.float32), lay, tile)

    def body(i, carry):
        dx_t, dw1, dwd = carry
        g = lay.tile_group[i]
        _, vjp = jax.vjp(lambda x, a, b: _tile_ffn(x, a, b, limit), x_t[i], w1[g], wd[g])
        dx, d1, d2 = vjp(dy_t[i])
        dx_t = jax.lax.dynamic_update_index_in_dim(dx_t, dx.astype(jnp.float32), i, 0)
        dw1 = jax.lax.dynamic_update_index_in_dim(dw1, dw1[g] + d1, g, 0)
        dwd = jax.lax.dynamic_update_index_in_dim(dwd, dwd[g] + d2, g, 0)
        return dx_t, dw1, dwd

    zeros = (
        jnp.zeros(x_t.shape, jnp.float32),
        jnp.zeros(w1.shape, jnp.float32),
        jnp.zeros(wd.shape, jnp.float32),
    )
    dx_t, dw1, dwd = jax.lax.fori_loop(0, used, body, zeros)
    return (
        ops._from_tiles(dx_t, lay, x_t.dtype),
        None,
        dw1.reshape(wgu.shape).astype(wgu.dtype),
        dwd.astype(wd.dtype),
    )


_looped.defvjp(_looped_fwd, _looped_bwd)
