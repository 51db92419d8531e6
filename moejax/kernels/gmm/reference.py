"""Pure-jnp reference for the grouped matmul, with the same signature as the fast op.

Semantics shared by every gmm backend:
  rows [0, M) are split into consecutive groups of group_sizes[g] rows (int32 [G_total]);
  rows of global group g use rhs[g - group_offset] when group_offset <= g < group_offset + G_local,
  and give zeros otherwise (an expert-parallel shard computes only its own experts).
  Negative sizes count as 0; rows past sum(group_sizes), or past M, are zero. No size can make an
  out-of-bounds read or write; `moejax.kernels.gmm(..., validate=True)` turns such sizes into
  errors.
"""

from __future__ import annotations

import jax.numpy as jnp


def group_ids(group_sizes, num_rows: int):
    """Global group of each row, int32 [M]; rows past the last group get len(group_sizes)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)  # [G]
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right").astype(
        jnp.int32
    )


def gmm_reference(lhs, rhs, group_sizes, *, group_offset=0, preferred_element_type=None):
    """[M, K] x [G_local, K, N] -> [M, N], one masked dense matmul per local group."""
    out_dtype = preferred_element_type or lhs.dtype
    gid = group_ids(group_sizes, lhs.shape[0]) - group_offset  # [M] local group id
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        prod = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32)  # [M, N]
        out = out + jnp.where((gid == g)[:, None], prod, 0.0)
    return out.astype(out_dtype)


def tgmm_reference(
    lhs, grad, group_sizes, *, group_offset=0, num_groups=None, preferred_element_type=None
):
    """Transposed grouped matmul: [M, K]^T x [M, N] per group -> [G_local, K, N] (weight
    gradient)."""
    out_dtype = preferred_element_type or lhs.dtype
    G = num_groups if num_groups is not None else group_sizes.shape[0] - group_offset
    gid = group_ids(group_sizes, lhs.shape[0]) - group_offset
    outs = []
    for g in range(G):
        masked = jnp.where((gid == g)[:, None], lhs, 0).astype(lhs.dtype)
        outs.append(jnp.dot(masked.T, grad, preferred_element_type=jnp.float32))
    return jnp.stack(outs).astype(out_dtype)
