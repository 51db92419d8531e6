"""Token permutation for dropless MoE: sort (token, k) assignments by expert, and combine back.

Every row movement here is a gather whose inverse is known, and the backward pass is the inverse
gather (`gather_rows`), never the scatter-add JAX would derive from a gather: scatters are slow on
XLA:CPU (a serial loop) and on TPU, and their transposes keep zero-filled float32 buffers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gather_rows(x, idx, ok, inv, inv_ok):
    """out[i] = x[idx[i]] where ok[i], else 0; for a one-to-one map (each row of x read by at most
    one i) whose inverse is row j -> inv[j] where inv_ok[j]. The backward pass gathers the output's
    gradient with the inverse instead of scattering it.

    Args:
      x: [N, ...]; idx, ok: int / bool [M]; inv, inv_ok: int / bool [N].
    """
    return _masked_take(x, idx, ok)


def _masked_take(x, idx, ok):
    out = jnp.take(x, idx, axis=0, mode="clip")
    return jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 1)), out, jnp.zeros((), x.dtype))


def _gather_rows_fwd(x, idx, ok, inv, inv_ok):
    return _masked_take(x, idx, ok), (inv, inv_ok, jnp.zeros((), x.dtype))


def _gather_rows_bwd(res, g):
    inv, inv_ok, like = res
    return _masked_take(g, inv, inv_ok).astype(like.dtype), None, None, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def permute_rows(x, perm, inv=None):
    """x[perm] for a permutation `perm` (inv: its inverse, computed when not given); the backward
    pass is g[inv]."""
    n = perm.shape[0]
    if inv is None:
        inv = inverse(perm)
    every = jnp.ones((n,), bool)
    return gather_rows(x, perm, every, inv, every)


def inverse(perm):
    """The inverse of a permutation of 0..n-1 (one scatter of indices, not of rows)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _repeat_sorted(x, order, K: int):
    """x[order // K]: row m of x read once for each of its K assignments."""
    return jnp.take(x, order // K, axis=0, mode="clip")


def _repeat_sorted_fwd(x, order, K):
    return _repeat_sorted(x, order, K), (order, jnp.zeros((), x.dtype))


def _repeat_sorted_bwd(K, res, g):
    order, like = res
    # assignment m*K + k sits at sorted row inverse[m*K + k]: sum its K rows per token
    per = jnp.take(g, inverse(order), axis=0, mode="clip")
    M = order.shape[0] // K
    return per.reshape((M, K) + g.shape[1:]).sum(1).astype(like.dtype), None


_repeat_sorted.defvjp(_repeat_sorted_fwd, _repeat_sorted_bwd)


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
    xs = _repeat_sorted(x, order, K)  # [M*K, D]
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
    per_assignment = permute_rows(ys, inverse(order), order).reshape(M, K, ys.shape[-1])
    return jnp.einsum("MKD,MK->MD", per_assignment.astype(jnp.float32), weights.astype(jnp.float32))
