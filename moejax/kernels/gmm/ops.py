"""Public grouped-matmul op: validates shapes at trace time and picks a backend.

Backends: 'ragged_dot' (jax.lax.ragged_dot, differentiable by JAX) and 'reference' (masked dense,
for tests). Pallas TPU/GPU kernels plug in here under their own names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels.gmm.reference import gmm_reference

IMPLS = ("tiled", "ragged_dot", "reference")
DEFAULT_TILE = 128


def _check_args(lhs, rhs, group_sizes):
    if lhs.ndim != 2:
        raise ValueError(f"gmm: lhs must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be [G, K, N], got shape {rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"gmm: rhs must be [G, {lhs.shape[1]}, N] to match lhs [M, K]={lhs.shape}, got {rhs.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be int [G], got {group_sizes.dtype}{list(group_sizes.shape)}")
    if group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(f"gmm: group_sizes has {group_sizes.shape[0]} groups, fewer than rhs's {rhs.shape[0]}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"gmm: lhs and rhs dtypes differ ({lhs.dtype} vs {rhs.dtype})")


def _clipped_sizes(group_sizes, num_rows):
    """Sizes with negatives as 0 and the total clipped to the rows that exist, int32 [G_total]."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
    return ends - jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])


def _ragged_dot(lhs, rhs, group_sizes, group_offset, out_dtype):
    """Frames the local groups with two zero-weight groups (rows before them and rows after),
    so that any sizes map every row to some weight and nothing is read out of bounds."""
    M = lhs.shape[0]
    G = rhs.shape[0]
    clipped = _clipped_sizes(group_sizes, M)  # [G_total]
    before = jnp.sum(jnp.where(jnp.arange(clipped.shape[0]) < group_offset, clipped, 0))
    local = jax.lax.dynamic_slice_in_dim(clipped, group_offset, G)
    after = M - before - local.sum()
    ext_sizes = jnp.concatenate([before[None], local, after[None]]).astype(jnp.int32)  # [G + 2]
    zero = jnp.zeros((1,) + rhs.shape[1:], rhs.dtype)
    ext_rhs = jnp.concatenate([zero, rhs, zero])  # [G + 2, K, N]
    out = jax.lax.ragged_dot(lhs, ext_rhs, ext_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _tiled(lhs, rhs, group_sizes, group_offset, out_dtype, tile):
    """Grouped matmul as one batched matmul over row tiles (the megablox layout in plain XLA).

    Each local group's rows are scattered into a buffer where the group starts on a tile boundary
    (padding each group to a multiple of `tile` rows), so every tile belongs to one group; the tiles
    are multiplied by their group's weight in a single batched einsum and gathered back.
    Padding is bounded statically: at most G_local * (tile - 1) rows.
    """
    M, K = lhs.shape
    G, _, N = rhs.shape
    Gt = group_sizes.shape[0]
    sizes = _clipped_sizes(group_sizes, M)
    gidx = jnp.arange(Gt)
    local = (gidx >= group_offset) & (gidx < group_offset + G)
    padded = jnp.where(local, (sizes + tile - 1) // tile * tile, 0)  # [Gt]
    pad_start = jnp.cumsum(padded) - padded
    row_start = jnp.cumsum(sizes) - sizes
    row_group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(M, dtype=jnp.int32), side="right")  # [M]
    g = jnp.minimum(row_group, Gt - 1)
    valid = (row_group < Gt) & local[g]
    P = -(-(M + min(G, M) * (tile - 1)) // tile) * tile  # static bound on padded rows
    dest = jnp.where(valid, pad_start[g] + jnp.arange(M) - row_start[g], P)  # [M]; P = spare row
    # Gather (not scatter) the buffer: the source row of every padded row, or none for padding.
    p = jnp.arange(P, dtype=jnp.int32)
    p_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), p, side="right"), Gt - 1)  # [P]
    offset = p - pad_start[p_group]
    p_valid = local[p_group] & (offset < sizes[p_group])
    src = jnp.where(p_valid, row_start[p_group] + offset, 0)
    buf = jnp.where(p_valid[:, None], jnp.take(lhs, src, axis=0), 0).reshape(P // tile, tile, K)  # [I, tile, K]
    tile_local = jnp.clip(p_group[::tile] - group_offset, 0, G - 1)  # [I]; tiles past the end hold zeros
    w = jnp.take(rhs, tile_local, axis=0)  # [I, K, N]
    out = jnp.einsum("IRK,IKN->IRN", buf, w, preferred_element_type=jnp.float32).reshape(P, N)
    res = jnp.where(valid[:, None], jnp.take(out, jnp.minimum(dest, P - 1), axis=0), 0.0)
    return res.astype(out_dtype)


def gmm(lhs, rhs, group_sizes, *, group_offset=0, preferred_element_type=None, impl=None, validate=False,
        tile=None):
    """Grouped matmul [M, K] x [G, K, N] -> [M, N]; see moejax/kernels/gmm/reference.py for semantics.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G_local, K, N] weights of the local groups.
      group_sizes: int32 [G_total] rows per group (G_total >= G_local + group_offset).
      group_offset: first global group this call computes (expert parallelism).
      preferred_element_type: output dtype (accumulation is always float32); default lhs.dtype.
      impl: backend name, one of IMPLS; default picks the fastest for the platform.
      validate: raise (via checkify) if sizes are negative or sum past M.
      tile: rows per tile of the 'tiled' backend (default 128).
    """
    _check_args(lhs, rhs, group_sizes)
    out_dtype = preferred_element_type or lhs.dtype
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"gmm: impl must be one of {IMPLS}, got {impl!r}")
    if validate:
        checkify.check(jnp.all(group_sizes >= 0), "gmm: group_sizes has a negative entry")
        checkify.check(jnp.sum(group_sizes) <= lhs.shape[0], "gmm: group_sizes sum past the number of rows")
    if impl == "reference":
        return gmm_reference(lhs, rhs, group_sizes, group_offset=group_offset, preferred_element_type=out_dtype)
    if impl == "tiled":
        return _tiled(lhs, rhs, group_sizes, group_offset, out_dtype, tile or DEFAULT_TILE)
    return _ragged_dot(lhs, rhs, group_sizes, group_offset, out_dtype)


def default_impl() -> str:
    """ragged_dot where XLA has a native grouped matmul (GPU, TPU); the tiled einsum elsewhere."""
    return "ragged_dot" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "tiled"
