"""The experts' SwiGLU FFN over rows grouped by expert, as loops over contiguous row chunks (the
CPU path).

    y[r] = (silu(x[r] @ Wg[e]) * (x[r] @ Wu[e])) @ Wd[e]     for the rows r of each group e

Each group's rows are cut where they lie in the sorted array (no copy into a padded tile layout)
into chunks of three power-of-two sizes: as many chunks of `tile` rows as fit, then at most one
chunk each of tile / 2 and tile / 4 rows (the remainder's binary digits), then one chunk of
tile / 4 rows, masked, for the rows left. So fewer than tile / 4 rows per group are computed in
vain, where the 'tiled' layout pads every group to a whole tile (a quarter of the rows at 512 rows
per group and tiles of 256). A chunk runs both matmuls and the activation while its rows are in
cache and reads its expert's weights in place; every chunk size is one `fori_loop` over the chunks
of that size (one static shape per loop) that visits only the chunks that exist.

The backward pass is the same loops. It recomputes a chunk's gate/up activations (nothing of size
[rows, F] is kept between the passes; keeping them, as PyTorch's autograd does, measured no
faster) and adds each chunk's weight gradient into its group's float32 sum. Rows past the groups
give zeros, as in `gmm`.

On TPU and GPU the Pallas gmm kernels run instead (moe_ep.expert_ffn picks). Measurements are in
benchmarks/RESULTS.md (benchmarks/moe_layer.py, train_throughput.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels.gmm import ops

MAX_TILE = 1024
MIN_CHUNK = 8
# chunk sizes per call: tile, tile / 2, tile / 4 (not below MIN_CHUNK). Measured at the small
# benchmark's expert shape (512 rows per group, tile 256): (256, 128, 64) 403 ms, down to 8 (six
# loops) 427 ms, (256, 128) 436 ms; more loops cost more in weight reads than they save in rows.
LEVELS = 3


def loop_tile(rows: int, groups: int) -> int:
    """Rows of the largest chunk: the largest power of two up to the groups' mean size, from
    MIN_CHUNK to MAX_TILE. Against half the mean (the tiles of the earlier padded layout), side by
    side: 2-7% faster at 512-768 rows per group; 2048 rows per group run fastest with 1024."""
    per_group = max(1, -(-rows // groups))
    return max(MIN_CHUNK, min(MAX_TILE, 1 << (per_group.bit_length() - 1)))


def _swiglu(h, limit, dtype):
    from moejax.model.layers import swiglu  # (the model's activation; model imports kernels)

    return swiglu(h.reshape(h.shape[0], 2, -1), limit).astype(dtype)


def _up(x, w1):
    return jnp.dot(x, w1, preferred_element_type=jnp.float32)


def _contract(a, b, dims):
    """a and b contracted over dims ((a's,), (b's,)) in float32, the operands promoted to one
    dtype (float32 gradients meet bfloat16 rows and weights)."""
    dt = jnp.promote_types(a.dtype, b.dtype)
    return jax.lax.dot_general(
        a.astype(dt), b.astype(dt), (dims, ((), ())), preferred_element_type=jnp.float32
    )


def _dot_nt(a, b):
    """a @ b.T (XLA:CPU takes the transposed operand as it lies)."""
    return _contract(a, b, ((1,), (1,)))


def _dot_tn(a, b):
    """a.T @ b: a weight gradient summed over a chunk's rows."""
    return _contract(a, b, ((0,), (0,)))


def grouped_swiglu(rows, group_sizes, wgu, wd, *, limit: float = 0.0, tile: int | None = None):
    """rows [M, D] sorted by group; group_sizes int [G_total >= G] (groups past G and rows past the
    groups give zeros); wgu [G, D, 2, F] (gate, up); wd [G, F, D] -> [M, D] float32. rows and the
    weights share one dtype (the matmuls accumulate in float32). tile: rows of the largest chunk
    (a power of two; default loop_tile)."""
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
    if tile is not None and (tile < 1 or tile & (tile - 1)):
        raise ValueError(f"grouped_swiglu: tile must be a power of two, got {tile}")
    M = rows.shape[0]
    if M == 0:
        return jnp.zeros(rows.shape, jnp.float32)
    tile = tile or loop_tile(M, G)
    c = min(tile, 1 << (M.bit_length() - 1))  # no chunk longer than the rows
    sizes = [c]
    while len(sizes) < LEVELS and sizes[-1] // 2 >= MIN_CHUNK:
        sizes.append(sizes[-1] // 2)
    return _looped(rows, group_sizes, wgu, wd, float(limit), tuple(sizes))


def _chunks(group_sizes, M: int, G: int, sizes: tuple[int, ...]):
    """The chunk lists, one per loop: (chunk rows c, first rows, groups, valid rows or None for
    whole chunks, count). The first size repeats within a group; each smaller one is used once by
    the groups whose remainder has that binary digit; a last loop of the smallest size takes the
    rows left, masked (valid rows < c)."""
    assert all(a == 2 * b for a, b in zip(sizes, sizes[1:])), sizes  # binary digits
    n = ops._clipped_sizes(group_sizes, M)[:G]
    start = jnp.cumsum(n) - n
    c0 = sizes[0]
    q = n // c0
    cum = jnp.cumsum(q)
    i = jnp.arange(max(1, M // c0), dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, i, side="right"), G - 1).astype(jnp.int32)
    out = [(c0, start[g] + (i - (cum - q)[g]) * c0, g, None, cum[-1])]
    off, rem = start + q * c0, n - q * c0
    for c in sizes[1:]:
        has = rem >= c
        (idx,) = jnp.nonzero(has, size=G, fill_value=0)
        out.append((c, off[idx], idx.astype(jnp.int32), None, jnp.sum(has)))
        off, rem = off + has * c, rem - has * c
    c = sizes[-1]
    has = rem > 0
    (idx,) = jnp.nonzero(has, size=G, fill_value=0)
    out.append((c, off[idx], idx.astype(jnp.int32), rem[idx], jnp.sum(has)))
    return out


def _chunk_rows(rows, c: int, starts, groups, valid, i):
    """Chunk i of a loop: its group, where it reads and writes, its mask (None for a whole chunk)
    and its rows, zero where they are not the group's (another group's, or padding of any value:
    an inf there would make NaN weight gradients)."""
    at, mask = _window(rows.shape[0], c, starts[i], None if valid is None else valid[i])
    x = jax.lax.dynamic_slice_in_dim(rows, at, c)
    if mask is not None:
        x = jnp.where(mask, x, 0)
    return groups[i], at, mask, x


def _window(M: int, c: int, s, valid):
    """Where a chunk of c rows starting at row s reads and writes (clamped so that it stays within
    the M rows) and, for a masked chunk, which of its rows are the group's ([c, 1] bool)."""
    if valid is None:
        return s, None
    at = jnp.minimum(s, M - c)
    r = at + jnp.arange(c) - s
    return at, ((r >= 0) & (r < valid))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _looped(rows, group_sizes, wgu, wd, limit, sizes):
    return _looped_fwd(rows, group_sizes, wgu, wd, limit, sizes)[0]


def _looped_fwd(rows, group_sizes, wgu, wd, limit, sizes):
    G, D, _, F = wgu.shape
    M = rows.shape[0]
    w1 = wgu.reshape(G, D, 2 * F)
    out = jnp.zeros((M, D), jnp.float32)
    for c, starts, groups, valid, count in _chunks(group_sizes, M, G, sizes):

        def body(i, out, c=c, starts=starts, groups=groups, valid=valid):
            g, at, mask, x = _chunk_rows(rows, c, starts, groups, valid, i)
            h = _up(x, w1[g])
            y = jnp.dot(_swiglu(h, limit, rows.dtype), wd[g], preferred_element_type=jnp.float32)
            if mask is not None:
                y = jnp.where(mask, y, jax.lax.dynamic_slice_in_dim(out, at, c))
            return jax.lax.dynamic_update_slice_in_dim(out, y, at, 0)

        out = jax.lax.fori_loop(0, count, body, out)
    return out, (rows, group_sizes, wgu, wd)


def _looped_bwd(limit, sizes, res, dy):
    rows, group_sizes, wgu, wd = res
    G, D, _, F = wgu.shape
    M = rows.shape[0]
    w1 = wgu.reshape(G, D, 2 * F)
    dy = dy.astype(jnp.float32)
    carry = (
        jnp.zeros((M, D), jnp.float32),
        jnp.zeros(w1.shape, jnp.float32),
        jnp.zeros(wd.shape, jnp.float32),
    )
    for c, starts, groups, valid, count in _chunks(group_sizes, M, G, sizes):

        def body(i, carry, c=c, starts=starts, groups=groups, valid=valid):
            dx_all, dw1, dwd = carry
            g, at, mask, x = _chunk_rows(rows, c, starts, groups, valid, i)
            dyc = jax.lax.dynamic_slice_in_dim(dy, at, c)
            if mask is not None:
                dyc = jnp.where(mask, dyc, 0.0)
            a, act_vjp = jax.vjp(lambda h: _swiglu(h, limit, rows.dtype), _up(x, w1[g]))
            (dh,) = act_vjp(_dot_nt(dyc, wd[g]).astype(a.dtype))
            d2 = _dot_tn(a, dyc)
            dx = _dot_nt(dh, w1[g])
            d1 = _dot_tn(x, dh)
            if mask is not None:
                dx = jnp.where(mask, dx, jax.lax.dynamic_slice_in_dim(dx_all, at, c))
            dx_all = jax.lax.dynamic_update_slice_in_dim(dx_all, dx, at, 0)
            dw1 = jax.lax.dynamic_update_index_in_dim(dw1, dw1[g] + d1, g, 0)
            dwd = jax.lax.dynamic_update_index_in_dim(dwd, dwd[g] + d2, g, 0)
            return dx_all, dw1, dwd

        carry = jax.lax.fori_loop(0, count, body, carry)
    dx, dw1, dwd = carry
    return (
        dx.astype(rows.dtype),
        None,
        dw1.reshape(wgu.shape).astype(wgu.dtype),
        dwd.astype(wd.dtype),
    )


_looped.defvjp(_looped_fwd, _looped_bwd)
