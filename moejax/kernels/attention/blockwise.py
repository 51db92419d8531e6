"""Blockwise causal attention in plain JAX: an online softmax over key blocks, never a [T, T] array.

This is FlashAttention-2's algorithm (Dao, 2023) written with jnp and one lax.scan, so it runs on
every platform and is the CPU default. Queries are cut into blocks of `block_q` rows and keys into
blocks of `block_kv`; only the (query block, key block) pairs with some key at or before some query
run (a static list), so causal attention does about half the reference's work at long lengths.
Each pair builds its causal and same-document mask [B, bq, bk] from positions and segment ids.
Running maxima and normalizers are float32.

The backward pass (custom_vjp) recomputes each pair's probabilities from the saved log-sum-exp, so
what is kept between passes is O(T): q, k, v, the output and the log-sum-exp. Grouped heads (GQA)
stay grouped ([B, T, Nkv, Q, H]: query heads n = kv * Q + q, as the reference reshapes), and the
value head dim may differ from the query/key one (MLA: 192 / 128 at V3 shape) natively.
A length that is not a multiple of the blocks is padded with segment id -1 (never equal to a real
id, so no real query sees a padded key) and cut off again.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(jnp.finfo(jnp.float32).min)


def pad_rows(x, T: int, value=0):
    """x [B, T0, ...] padded along axis 1 to T rows of `value` (x itself when T0 == T)."""
    if x.shape[1] == T:
        return x
    return jnp.pad(
        x, [(0, 0), (0, T - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value
    )


def _pairs(nq: int, nk: int, bq: int, bk: int, kv_major: bool) -> np.ndarray:
    """int32 [P, 3]: (query block i, key block j, first) for every pair of causal self-attention
    over nq query and nk key blocks whose key block starts at or before query block i's last row;
    `first` marks the first pair of its run (of i when query-major, of j when kv_major), where the
    accumulators restart."""
    pairs = pairs_from_starts([i * bq for i in range(nq)], bq, bk, kv_major)
    return pairs[pairs[:, 1] < nk]


def pairs_from_starts(starts, bq: int, bk: int, kv_major: bool) -> np.ndarray:
    """As `_pairs`, for query blocks whose first rows sit at the given natural positions (keys in
    natural order from 0): query block i meets key blocks 0 .. (starts[i] + bq - 1) // bk."""
    pairs = [(i, j) for i, s in enumerate(starts) for j in range((s + bq - 1) // bk + 1)]
    if kv_major:
        pairs.sort(key=lambda p: (p[1], p[0]))
    run = 1 if kv_major else 0
    rows = [
        (i, j, int(n == 0 or pairs[n - 1][run] != (i, j)[run])) for n, (i, j) in enumerate(pairs)
    ]
    return np.asarray(rows, np.int32)


def _e(grouped: bool, spec: str) -> str:
    """An einsum spec as written (grouped heads, axis Q), or without Q for one query head per KV
    head: 4-D einsums are markedly faster than the grouped form on XLA:CPU."""
    return spec if grouped else spec.replace("Q", "")


class Rows(NamedTuple):
    """Which rows meet which: segment ids and sequence positions of the query rows (qseg, qpos
    [B, Tq] / [Tq]) and key rows (kseg, kpos [B, Tk] / [Tk]), and the (query block, key block,
    first) pairs to visit, query-major for the forward pass and key-major for the backward pass
    (int32 [P, 3], see `_pairs`). A query attends to keys of its segment at positions <= its
    own. One device's rows of a context-parallel attention are not contiguous (context.py), so
    positions and pairs are data here, not derived from block indices."""

    qseg: jax.Array
    kseg: jax.Array
    qpos: jax.Array
    kpos: jax.Array
    fwd_pairs: jax.Array
    bwd_pairs: jax.Array


def self_rows(seg, bq: int, bk: int) -> Rows:
    """Rows of causal self-attention over one whole sequence: positions 0..T-1 on both sides."""
    T = seg.shape[1]
    pos = jnp.arange(T, dtype=jnp.int32)
    return Rows(
        seg,
        seg,
        pos,
        pos,
        jnp.asarray(_pairs(T // bq, T // bk, bq, bk, kv_major=False)),
        jnp.asarray(_pairs(T // bq, T // bk, bq, bk, kv_major=True)),
    )


def _pair_logits(qi, kj, rows: Rows, i, j, bq: int, bk: int, scale: float):
    """Masked scaled scores of one pair, float32 [B, Nkv, Q, bq, bk] ([B, Nkv, bq, bk] ungrouped).

    qi: [B, bq, Nkv, Q, H] or [B, bq, Nkv, H]; kj: [B, bk, Nkv, H]."""
    g = qi.ndim == 5
    s = jnp.einsum(_e(g, "BTKQH,BSKH->BKQTS"), qi, kj, preferred_element_type=jnp.float32) * scale
    qpos = jax.lax.dynamic_slice_in_dim(rows.qpos, i * bq, bq, axis=-1)  # [bq] or [B, bq]
    kpos = jax.lax.dynamic_slice_in_dim(rows.kpos, j * bk, bk, axis=-1)
    sq = jax.lax.dynamic_slice_in_dim(rows.qseg, i * bq, bq, axis=1)  # [B, bq]
    sk = jax.lax.dynamic_slice_in_dim(rows.kseg, j * bk, bk, axis=1)  # [B, bk]
    mask = (qpos[..., :, None] >= kpos[..., None, :]) & (
        sq[:, :, None] == sk[:, None, :]
    )  # [B, bq, bk]
    return jnp.where(mask[(slice(None),) + (None,) * (s.ndim - 3)], s, NEG)


def _forward(q, k, v, rows: Rows, scale: float, bq: int, bk: int):
    """q [B, Tq, Nkv, Q, H], k [B, Tk, Nkv, H], v [B, Tk, Nkv, Hv] (lengths multiples of the
    blocks) -> out [B, Tq, Nkv, Q, Hv] in v's dtype, lse float32 [B, Nkv, Q, Tq]. Without the Q
    axis in q (one query head per KV head), out and lse have none either. A query row no pair
    visits (none in `rows.fwd_pairs`) is left at zero."""
    B, T = q.shape[:2]
    heads = q.shape[2:-1]  # (K, Q) or (K,)
    g = q.ndim == 5
    Hv = v.shape[-1]

    def step(carry, pair):
        out, lse, m, row_sum, acc = carry
        i, j, first = pair[0], pair[1], pair[2] > 0
        qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)  # [B, bq, K, Q, H]
        kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)  # [B, bk, K, H]
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)  # [B, bk, K, Hv]
        s = _pair_logits(qi, kj, rows, i, j, bq, bk, scale)  # [B, K, Q, bq, bk]
        m = jnp.where(first, NEG, m)
        row_sum = jnp.where(first, 0.0, row_sum)
        acc = jnp.where(first, 0.0, acc)
        m_new = jnp.maximum(m, s.max(axis=-1))  # [B, K, Q, bq]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        row_sum = alpha * row_sum + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum(
            _e(g, "BKQTS,BSKH->BKQTH"), p.astype(v.dtype), vj, preferred_element_type=jnp.float32
        )
        # written after every pair of the run; the run's last write is the result
        o = jnp.moveaxis(acc / row_sum[..., None], -2, 1).astype(out.dtype)  # [B, bq, K, Q, Hv]
        out = jax.lax.dynamic_update_slice_in_dim(out, o, i * bq, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m_new + jnp.log(row_sum), i * bq, axis=-1)
        return (out, lse, m_new, row_sum, acc), None

    init = (
        jnp.zeros((B, T, *heads, Hv), v.dtype),
        jnp.zeros((B, *heads, T), jnp.float32),
        jnp.full((B, *heads, bq), NEG, jnp.float32),
        jnp.zeros((B, *heads, bq), jnp.float32),
        jnp.zeros((B, *heads, bq, Hv), jnp.float32),
    )
    (out, lse, *_), _ = jax.lax.scan(step, init, rows.fwd_pairs)
    return out, lse


def _backward(q, k, v, rows: Rows, out, lse, do, scale: float, bq: int, bk: int):
    """Gradients of _forward's output: dq [B, Tq, Nkv, Q, H] (or without Q, as q), dk, dv in the
    inputs' dtypes."""
    B, _, K = q.shape[:3]
    T = k.shape[1]
    H, Hv = q.shape[-1], v.shape[-1]
    g = q.ndim == 5
    # rowsum(dO * O) [B, K, (Q,) T]: a product and a sum, not an einsum (XLA:CPU ran that as B*K*T
    # one-element dots, 80 ms per layer at the small benchmark's shape)
    delta = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, -1)

    def step(carry, pair):
        dq, dk, dv, dk_acc, dv_acc = carry
        i, j, first = pair[0], pair[1], pair[2] > 0
        qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)  # [B, bq, K, Q, H]
        doi = jax.lax.dynamic_slice_in_dim(do, i * bq, bq, axis=1)  # [B, bq, K, Q, Hv]
        kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)  # [B, bk, K, H]
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)  # [B, bk, K, Hv]
        lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=-1)  # [B, K, Q, bq]
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=-1)
        s = _pair_logits(qi, kj, rows, i, j, bq, bk, scale)
        p = jnp.exp(s - lse_i[..., None])  # [B, K, Q, bq, bk]; 0 where masked
        dk_acc = jnp.where(first, 0.0, dk_acc)
        dv_acc = jnp.where(first, 0.0, dv_acc)
        dv_acc = dv_acc + jnp.einsum(
            _e(g, "BKQTS,BTKQH->BSKH"), p.astype(do.dtype), doi, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum(_e(g, "BTKQH,BSKH->BKQTS"), doi, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
        dq_i = (
            jnp.einsum(_e(g, "BKQTS,BSKH->BTKQH"), ds, kj, preferred_element_type=jnp.float32)
            * scale
        )
        dq = jax.lax.dynamic_update_slice_in_dim(
            dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dq_i, i * bq, axis=1
        )
        dk_acc = (
            dk_acc
            + jnp.einsum(_e(g, "BKQTS,BTKQH->BSKH"), ds, qi, preferred_element_type=jnp.float32)
            * scale
        )
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_acc, j * bk, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_acc, j * bk, axis=1)
        return (dq, dk, dv, dk_acc, dv_acc), None

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros((B, T, K, H), jnp.float32),
        jnp.zeros((B, T, K, Hv), jnp.float32),
        jnp.zeros((B, bk, K, H), jnp.float32),
        jnp.zeros((B, bk, K, Hv), jnp.float32),
    )
    (dq, dk, dv, _, _), _ = jax.lax.scan(step, init, rows.bwd_pairs)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash(q, k, v, rows: Rows, scale, bq, bk):
    """The online-softmax attention of q [B, Tq, Nkv, (Q,) H] over k, v [B, Tk, Nkv, H|Hv] for the
    rows and pairs in `rows`, with the memory-light backward pass."""
    return _forward(q, k, v, rows, scale, bq, bk)[0]


def _flash_fwd(q, k, v, rows, scale, bq, bk):
    out, lse = _forward(q, k, v, rows, scale, bq, bk)
    return out, (q, k, v, rows, out, lse)


def _flash_bwd(scale, bq, bk, res, do):
    q, k, v, rows, out, lse = res
    dq, dk, dv = _backward(q, k, v, rows, out, lse, do, scale, bq, bk)
    return dq, dk, dv, jax.tree.map(lambda _: None, rows)


flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q, k, v, segment_ids, *, scale: float, block_q: int = 512, block_kv: int = 512
):
    """Causal attention within packed documents, one (query block, key block) pair at a time.

    Args:
      q: [B, T, N, H]; k: [B, T, Nkv, H]; v: [B, T, Nkv, Hv]; N a multiple of Nkv.
      segment_ids: int [B, T] (tokens attend to earlier tokens of the same id) or None (one
        document).
      block_q, block_kv: rows per query / key block (cut to T when T is shorter).
    Returns:
      [B, T, N, Hv] in v's dtype.
    """
    B, T, N, H = q.shape
    Nkv, Hv = k.shape[2], v.shape[-1]
    if max(block_q, block_kv) % min(block_q, block_kv):
        raise ValueError(
            f"attention[blockwise]: block_q={block_q} and block_kv={block_kv} must divide one "
            "another"
        )
    lo, hi = min(block_q, block_kv), max(block_q, block_kv)
    # padded length: T itself when one block covers it, else a multiple of the smaller block (the
    # larger cut to it) when that is within the larger block, else a multiple of the larger block
    Tp = T if T <= lo else -(-T // lo) * lo if T <= hi else -(-T // hi) * hi
    bq, bk = min(block_q, Tp), min(block_kv, Tp)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q, k, v = (pad_rows(a, Tp) for a in (q, k, v))
    seg = pad_rows(seg, Tp, value=-1)
    qg = (
        q if N == Nkv else q.reshape(B, Tp, Nkv, N // Nkv, H)
    )  # [B, Tp, Nkv, Q, H]: query heads grouped
    out = flash(qg, k, v, self_rows(seg, bq, bk), float(scale), bq, bk)  # [B, Tp, Nkv, (Q,) Hv]
    return out.reshape(B, Tp, N, Hv)[:, :T]
