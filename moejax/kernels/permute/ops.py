"""Token permutation for dropless MoE: sort (token, k) assignments by expert, and combine back."""

from __future__ import annotations

import jax.numpy as jnp


def permute(x, expert_ids, num_experts: int):
    """Gathers one row per (token, k) assignment, sorted by expert.

    Args:
      x: [M, D] tokens.  expert_ids: int [M, K].
    Returns:
      xs [M*K, D] rows sorted by expert; order int32 [M*K], the assignment index (m*K + k) of each
      sorted row; group_sizes int32 [E].
    """
    M, K = expert_ids.shape
    flat = expert_ids.reshape(M * K)  # [M*K]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [M*K]
    xs = jnp.take(x, order // K, axis=0)  # [M*K, D]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return xs, order, group_sizes


def unpermute(ys, order, weights):
    """Weighted combine of expert outputs back to token order.

    Args:
      ys: [M*K, D] rows in the sorted order from `permute`.  order: int32 [M*K].
      weights: [M, K] combine weights.
    Returns:
      [M, D] float32, sum_k weights[m, k] * output of assignment (m, k).
    """
    M, K = weights.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    per_assignment = jnp.take(ys, inverse, axis=0).reshape(M, K, ys.shape[-1])  # [M, K, D]
    return jnp.einsum("MKD,MK->MD", per_assignment.astype(jnp.float32), weights.astype(jnp.float32))
