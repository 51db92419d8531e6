"""Public grouped-matmul op: validates shapes at trace time and picks a backend.

Backends: 'ragged_dot' (jax.lax.ragged_dot, differentiable by JAX) and 'reference' (masked dense,
for tests). Pallas TPU/GPU kernels plug in here under their own names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from moejax.kernels.gmm.reference import gmm_reference

IMPLS = ("ragged_dot", "reference")


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


def _ragged_dot(lhs, rhs, group_sizes, group_offset, out_dtype):
    """Frames the local groups with two zero-weight groups (rows before them and rows after),
    so that any sizes map every row to some weight and nothing is read out of bounds."""
    M = lhs.shape[0]
    G = rhs.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), M)  # clip to the rows that exist
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    clipped = ends - starts  # [G_total]
    before = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < group_offset, clipped, 0))
    local = jax.lax.dynamic_slice_in_dim(clipped, group_offset, G)
    after = M - before - local.sum()
    ext_sizes = jnp.concatenate([before[None], local, after[None]]).astype(jnp.int32)  # [G + 2]
    zero = jnp.zeros((1,) + rhs.shape[1:], rhs.dtype)
    ext_rhs = jnp.concatenate([zero, rhs, zero])  # [G + 2, K, N]
    out = jax.lax.ragged_dot(lhs, ext_rhs, ext_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def gmm(lhs, rhs, group_sizes, *, group_offset=0, preferred_element_type=None, impl=None, validate=False):
    """Grouped matmul [M, K] x [G, K, N] -> [M, N]; see moejax/kernels/gmm/reference.py for semantics.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G_local, K, N] weights of the local groups.
      group_sizes: int32 [G_total] rows per group (G_total >= G_local + group_offset).
      group_offset: first global group this call computes (expert parallelism).
      preferred_element_type: output dtype (accumulation is always float32); default lhs.dtype.
      impl: backend name, one of IMPLS; default picks the fastest for the platform.
      validate: raise (via checkify) if sizes are negative or sum past M.
    """
    _check_args(lhs, rhs, group_sizes)
    out_dtype = preferred_element_type or lhs.dtype
    impl = impl or "ragged_dot"
    if impl not in IMPLS:
        raise ValueError(f"gmm: impl must be one of {IMPLS}, got {impl!r}")
    if validate:
        checkify.check(jnp.all(group_sizes >= 0), "gmm: group_sizes has a negative entry")
        checkify.check(jnp.sum(group_sizes) <= lhs.shape[0], "gmm: group_sizes sum past the number of rows")
    if impl == "reference":
        return gmm_reference(lhs, rhs, group_sizes, group_offset=group_offset, preferred_element_type=out_dtype)
    return _ragged_dot(lhs, rhs, group_sizes, group_offset, out_dtype)
