"""Public grouped-matmul ops `gmm` and `tgmm`: validate shapes at trace time and pick a backend.

Backends (`impl=`):
  pallas_tpu  Mosaic TPU kernels (pallas_tpu.py), default on TPU
  pallas_gpu  Triton GPU kernels (pallas_gpu.py), default on GPU
  tiled       one batched einsum over group-aligned row tiles in plain XLA, default on CPU
  ragged_dot  jax.lax.ragged_dot
  reference   masked dense matmuls (reference.py), for tests
The Pallas backends are wired with jax.custom_vjp: the input gradient is gmm with the transposed
weight, the weight gradient is tgmm. The XLA backends are differentiated by JAX. A Pallas backend on
a platform that cannot run it natively (e.g. pallas_tpu on CPU) runs in Pallas interpret mode.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels.gmm import pallas_gpu, pallas_tpu
from moejax.kernels.gmm.reference import gmm_reference, tgmm_reference

IMPLS = ("pallas_tpu", "pallas_gpu", "tiled", "ragged_dot", "reference")
_PALLAS = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
_NATIVE = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm")}
DEFAULT_TILE = 256  # rows per tile of 'tiled'; 256 beat 64/128/512 on the CPU MoE benchmark


def default_tile(rows: int, groups: int) -> int:
    """DEFAULT_TILE, or less when the groups average fewer rows (decoding: a few tokens), so that
    padding every group to a tile does not multiply the work: the power of two >= rows / groups, at
    least 8."""
    per_group = max(1, -(-rows // groups))
    return min(DEFAULT_TILE, max(8, 1 << (per_group - 1).bit_length()))


def _check_args(lhs, rhs, group_sizes):
    if lhs.ndim != 2:
        raise ValueError(f"gmm: lhs must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be [G, K, N], got shape {rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(
            f"gmm: rhs must be [G, {lhs.shape[1]}, N] to match lhs [M, K]={lhs.shape}, got "
            f"{rhs.shape}"
        )
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"gmm: group_sizes must be int [G], got {group_sizes.dtype}{list(group_sizes.shape)}"
        )
    if group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(
            f"gmm: group_sizes has {group_sizes.shape[0]} groups, fewer than rhs's {rhs.shape[0]}"
        )
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


class _TileLayout(NamedTuple):
    src: jax.Array  # int32 [P] source row of each padded row
    p_valid: jax.Array  # bool [P] padded row holds a real row
    dest: jax.Array  # int32 [M] padded row of each source row (P - 1 when it has none)
    valid: jax.Array  # bool [M] source row belongs to a local group
    tile_group: jax.Array  # int32 [I] local group of each tile


def _tile_layout(
    group_sizes, group_offset, num_rows: int, num_local: int, tile: int
) -> _TileLayout:
    """Where each row goes when every local group is padded to a multiple of `tile` rows.

    Padding is bounded statically (at most num_local * (tile - 1) rows), so the buffer has a static
    P rows. All maps are gathers, in both directions.
    """
    M, G = num_rows, num_local
    Gt = group_sizes.shape[0]
    sizes = _clipped_sizes(group_sizes, M)
    gidx = jnp.arange(Gt)
    local = (gidx >= group_offset) & (gidx < group_offset + G)
    padded = jnp.where(local, (sizes + tile - 1) // tile * tile, 0)  # [Gt]
    pad_start = jnp.cumsum(padded) - padded
    row_start = jnp.cumsum(sizes) - sizes
    row_group = jnp.searchsorted(
        jnp.cumsum(sizes), jnp.arange(M, dtype=jnp.int32), side="right"
    )  # [M]
    g = jnp.minimum(row_group, Gt - 1)
    valid = (row_group < Gt) & local[g]
    P = -(-(M + min(G, M) * (tile - 1)) // tile) * tile
    dest = jnp.where(valid, pad_start[g] + jnp.arange(M) - row_start[g], P - 1).astype(jnp.int32)
    p = jnp.arange(P, dtype=jnp.int32)
    p_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), p, side="right"), Gt - 1)  # [P]
    offset = p - pad_start[p_group]
    p_valid = local[p_group] & (offset < sizes[p_group])
    src = jnp.where(p_valid, row_start[p_group] + offset, 0).astype(jnp.int32)
    tile_group = jnp.clip(p_group[::tile] - group_offset, 0, G - 1).astype(
        jnp.int32
    )  # padding tiles hold zeros
    return _TileLayout(src, p_valid, dest, valid, tile_group)


def _to_tiles(x, lay: _TileLayout, tile: int):
    """[M, C] rows -> [I, tile, C] group-aligned tiles (zeros in padding)."""
    return jnp.where(lay.p_valid[:, None], jnp.take(x, lay.src, axis=0), 0).reshape(
        -1, tile, x.shape[1]
    )


def _from_tiles(tiles, lay: _TileLayout, out_dtype):
    """[I, tile, C] -> [M, C] rows in source order (zeros for rows outside the local groups)."""
    flat = tiles.reshape(-1, tiles.shape[-1])
    return jnp.where(lay.valid[:, None], jnp.take(flat, lay.dest, axis=0), 0.0).astype(out_dtype)


def _tiled_matmul(x_tiles, rhs, lay, out_dtype):
    w = jnp.take(rhs, lay.tile_group, axis=0)  # [I, K, N]
    out = jnp.einsum("IRK,IKN->IRN", x_tiles, w, preferred_element_type=jnp.float32)
    return _from_tiles(out, lay, out_dtype)


def _tiled_tgmm(x_tiles, g_tiles, lay, num_local, out_dtype):
    per_tile = jnp.einsum("IRK,IRN->IKN", x_tiles, g_tiles, preferred_element_type=jnp.float32)
    out = jax.ops.segment_sum(
        per_tile, lay.tile_group, num_segments=num_local, indices_are_sorted=True
    )
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tiled(lhs, rhs, group_sizes, group_offset, out_dtype, tile):
    """Grouped matmul as one batched matmul over row tiles (the megablox layout in plain XLA).

    Each local group's rows are gathered into a buffer where the group starts on a tile boundary, so
    every tile belongs to one group; the tiles are multiplied by their group's weight in a single
    batched einsum and gathered back. The backward pass (custom_vjp) is the same layout with the
    transposed weight, and per-tile lhs^T @ grad summed per group: gathers only, no scatter of rows.
    """
    return _tiled_fwd(lhs, rhs, group_sizes, group_offset, out_dtype, tile)[0]


def _tiled_fwd(lhs, rhs, group_sizes, group_offset, out_dtype, tile):
    lay = _tile_layout(group_sizes, group_offset, lhs.shape[0], rhs.shape[0], tile)
    x_tiles = _to_tiles(lhs, lay, tile)
    return _tiled_matmul(x_tiles, rhs, lay, out_dtype), (x_tiles, rhs, lay)


def _tiled_bwd(out_dtype, tile, res, grad):
    x_tiles, rhs, lay = res
    g_tiles = _to_tiles(grad.astype(x_tiles.dtype), lay, tile)
    w = jnp.take(rhs, lay.tile_group, axis=0)  # [I, K, N]
    d_x = jnp.einsum("IRN,IKN->IRK", g_tiles, w, preferred_element_type=jnp.float32)
    d_lhs = _from_tiles(d_x, lay, x_tiles.dtype)
    d_rhs = _tiled_tgmm(x_tiles, g_tiles, lay, rhs.shape[0], rhs.dtype)
    return d_lhs, d_rhs, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pallas_gmm(lhs, rhs, group_sizes, group_offset, out_dtype, impl, tiles, interpret):
    return _PALLAS[impl].gmm(
        lhs, rhs, group_sizes, group_offset, out_dtype, tiles=tiles, interpret=interpret
    )


def _pallas_gmm_fwd(lhs, rhs, group_sizes, group_offset, out_dtype, impl, tiles, interpret):
    out = _pallas_gmm(lhs, rhs, group_sizes, group_offset, out_dtype, impl, tiles, interpret)
    return out, (lhs, rhs, group_sizes, group_offset)


def _pallas_gmm_bwd(out_dtype, impl, tiles, interpret, res, grad):
    lhs, rhs, group_sizes, group_offset = res
    kern = _PALLAS[impl]
    grad = grad.astype(lhs.dtype)  # kernels take one input dtype; they accumulate in float32
    d_lhs = kern.gmm(
        grad,
        rhs,
        group_sizes,
        group_offset,
        lhs.dtype,
        transpose_rhs=True,
        tiles=tiles,
        interpret=interpret,
    )
    d_rhs = kern.tgmm(
        lhs,
        grad,
        group_sizes,
        group_offset,
        rhs.shape[0],
        rhs.dtype,
        tiles=tiles,
        interpret=interpret,
    )
    return d_lhs, d_rhs, None, None


_pallas_gmm.defvjp(_pallas_gmm_fwd, _pallas_gmm_bwd)


_TARGET: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str):
    """Pick backends for `platform` ('tpu', 'gpu', 'cpu') instead of jax.default_backend().

    For ahead-of-time compilation from another host: inside `with target_platform("tpu"):` the
    default impl is pallas_tpu and it lowers natively (no interpret mode) although the host is a
    CPU.
    """
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def targets_accelerator() -> bool:
    """Whether code is being built for a TPU or GPU (by the backend or by `target_platform`)."""
    return platform() in ("tpu", "gpu", "cuda", "rocm")


def platform() -> str:
    """The platform kernels are built for: `target_platform`'s, else jax.default_backend()."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


def _resolve(impl, interpret):
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"gmm: impl must be one of {IMPLS}, got {impl!r}")
    if impl in _NATIVE and interpret is None:
        interpret = platform() not in _NATIVE[impl]
    return impl, interpret


def gmm(
    lhs,
    rhs,
    group_sizes,
    *,
    group_offset=0,
    preferred_element_type=None,
    impl=None,
    validate=False,
    tile=None,
    tiles=None,
    interpret=None,
):
    """Grouped matmul [M, K] x [G, K, N] -> [M, N]; see moejax/kernels/gmm/reference.py for
    semantics.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G_local, K, N] weights of the local groups.
      group_sizes: int32 [G_total] rows per group (G_total >= G_local + group_offset).
      group_offset: first global group this call computes (expert parallelism).
      preferred_element_type: output dtype (accumulation is always float32); default lhs.dtype.
      impl: backend name, one of IMPLS; default picks the fastest for the platform.
      validate: raise (via checkify) if sizes are negative or sum past M.
      tile: rows per tile of the 'tiled' backend (default: default_tile(M, G)).
      tiles: (tm, tk, tn) block sizes of a Pallas backend (default: the backend's DEFAULT_TILES).
      interpret: run a Pallas backend in interpret mode; default: when the platform is not its own.
    """
    _check_args(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    impl, interpret = _resolve(impl, interpret)
    if validate:
        _validate(group_sizes, lhs.shape[0])
    if impl in _PALLAS:
        return _pallas_gmm(
            lhs,
            rhs,
            group_sizes,
            jnp.asarray(group_offset, jnp.int32),
            out_dtype,
            impl,
            tuple(tiles) if tiles else None,
            interpret,
        )
    if impl == "reference":
        return gmm_reference(
            lhs, rhs, group_sizes, group_offset=group_offset, preferred_element_type=out_dtype
        )
    if impl == "tiled":
        return _tiled(
            lhs,
            rhs,
            group_sizes,
            jnp.asarray(group_offset, jnp.int32),
            out_dtype,
            tile or default_tile(lhs.shape[0], rhs.shape[0]),
        )
    return _ragged_dot(lhs, rhs, group_sizes, group_offset, out_dtype)


def tgmm(
    lhs,
    grad,
    group_sizes,
    *,
    group_offset=0,
    num_groups=None,
    preferred_element_type=None,
    impl=None,
    validate=False,
    tiles=None,
    interpret=None,
):
    """Transposed grouped matmul: per local group g, lhs[rows_g]^T @ grad[rows_g] -> [G_local, K,
    N].

    The weight gradient of gmm. num_groups defaults to len(group_sizes) - group_offset (static
    ints). 'tiled' sums per-tile products per group; 'ragged_dot' is the vjp of its gmm.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
        raise ValueError(
            f"tgmm: lhs must be [M, K] and grad [M, N] with the same M, got {lhs.shape} and "
            f"{grad.shape}"
        )
    if lhs.dtype != grad.dtype:
        raise ValueError(f"tgmm: lhs and grad dtypes differ ({lhs.dtype} vs {grad.dtype})")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"tgmm: group_sizes must be int [G], got {group_sizes.dtype}{list(group_sizes.shape)}"
        )
    if num_groups is None:
        if not isinstance(group_offset, int):
            raise ValueError("tgmm: num_groups is required when group_offset is a traced value")
        num_groups = group_sizes.shape[0] - group_offset
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    impl, interpret = _resolve(impl, interpret)
    if validate:
        _validate(group_sizes, lhs.shape[0])
    if impl in _PALLAS:
        return _PALLAS[impl].tgmm(
            lhs,
            grad,
            group_sizes,
            jnp.asarray(group_offset, jnp.int32),
            num_groups,
            out_dtype,
            tiles=tuple(tiles) if tiles else None,
            interpret=interpret,
        )
    if impl == "reference":
        return tgmm_reference(
            lhs,
            grad,
            group_sizes,
            group_offset=group_offset,
            num_groups=num_groups,
            preferred_element_type=out_dtype,
        )
    if impl == "tiled":
        lay = _tile_layout(
            group_sizes,
            jnp.asarray(group_offset, jnp.int32),
            lhs.shape[0],
            num_groups,
            DEFAULT_TILE,
        )
        return _tiled_tgmm(
            _to_tiles(lhs, lay, DEFAULT_TILE),
            _to_tiles(grad, lay, DEFAULT_TILE),
            lay,
            num_groups,
            out_dtype,
        )
    zeros = jnp.zeros((num_groups, lhs.shape[1], grad.shape[1]), lhs.dtype)
    _, vjp = jax.vjp(
        lambda w: gmm(
            lhs,
            w,
            group_sizes,
            group_offset=group_offset,
            impl=impl,
            preferred_element_type=grad.dtype,
        ),
        zeros,
    )
    return vjp(grad)[0].astype(out_dtype)


def _validate(group_sizes, num_rows):
    checkify.check(jnp.all(group_sizes >= 0), "gmm: group_sizes has a negative entry")
    checkify.check(jnp.sum(group_sizes) <= num_rows, "gmm: group_sizes sum past the number of rows")


def default_impl() -> str:
    """The Pallas kernels on TPU and GPU; the tiled einsum on CPU (6x faster than ragged_dot
    there)."""
    backend = platform()
    if backend == "tpu":
        return "pallas_tpu"
    if backend in _NATIVE["pallas_gpu"]:
        return "pallas_gpu"
    return "tiled"
