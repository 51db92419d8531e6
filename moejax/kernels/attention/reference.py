"""Reference attention: the whole [T, S] score matrix in float32 and a materialized boolean mask.

Readable and exact; the fast backends (ops.py) are tested against it. The generator's prefill
(moejax/infer) calls `attend` with its own masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids):
    """Causal mask that also forbids attention across packed documents.

    Args:
      segment_ids: int [B, T]; tokens attend only to earlier tokens with the same id.
    Returns:
      bool [B, 1, T, T].
    """
    T = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return (causal[None] & same)[:, None]


def attend(q, k, v, mask, scale: float):
    """Softmax attention with grouped heads.

    Args:
      q: [B, T, N, H] queries; k: [B, S, Nkv, H]; v: [B, S, Nkv, Hv]; N a multiple of Nkv.
      mask: bool [B, 1, T, S].
    Returns:
      [B, T, N, Hv] in v's dtype.
    """
    B, T, N, H = q.shape
    Nkv = k.shape[2]
    if Nkv == N:  # MHA / MLA: 4-D einsums are markedly faster than the grouped form on XLA:CPU
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("BNTS,BSNH->BTNH", probs, v, preferred_element_type=jnp.float32).astype(
            v.dtype
        )
    q = q.reshape(B, T, Nkv, N // Nkv, H)  # [B, T, Nkv, Q, H]
    logits = jnp.einsum("BTNQH,BSNH->BNQTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BNQTS,BSNH->BTNQH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, v.shape[-1]).astype(v.dtype)


def attention_reference(q, k, v, segment_ids, *, scale: float):
    """Causal attention within packed documents, the mask materialized.

    Args:
      q: [B, T, N, H]; k: [B, T, Nkv, H]; v: [B, T, Nkv, Hv]; segment_ids: int [B, T] or None (one
        document).
    Returns:
      [B, T, N, Hv] in v's dtype.
    """
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return attend(q, k, v, attention_mask(segment_ids), scale)
