"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer, its top-k key selection, the
sparse MLA attention over the selected keys and the indexer's KL loss.

For query t the indexer scores every key s it may see (causal, same packed document):

    I[t, s] = sum_h w[t, h] * relu(q_I[t, h] . k_I[s] / sqrt(index_head_dim)),
    w = x W_w / sqrt(index_n_heads),  q_I = q_lat W_qI,  k_I = LayerNorm(x W_kI),

with half-split rotary on the first qk_rope_head_dim dims of q_I and k_I (unlike MLA's interleaved
pairs), as transformers' `deepseek_v32` computes it. The reference code's Hadamard rotation of q_I
and k_I is orthogonal, so it leaves every dot product and the scores unchanged; its FP8 scoring is a
speed choice and is not reproduced. Attention then keeps the top `index_topk` keys of each query
(all of them when fewer exist).

Training (DeepSeek-V3.2 report, section 2.1): the indexer sees its inputs detached, so it learns
only from its own loss, the KL divergence from the main attention's distribution (summed over
heads, L1-normalized) to softmax(I[t, :]), over every visible key in the dense warm-up
(`model.dsa_stage='warmup'`, attention dense, the rest of the model frozen by the optimizer) and
over the selected keys in sparse training (`'sparse'`). The main model never gets a gradient from
that loss.

Two forms compute the same function. `sparse_mla` (the sparse stage's default) runs MLA in its MQA
form over the gathered top-k latents, in query blocks under a rematerialized scan: attention costs
O(T k) and nothing of size [T, S] outlives a block, though the indexer's scores still cost O(T^2)
compute (one [block, S] slab at a time), as in DeepSeek's own design. The reference form
(`attend` on `select`'s mask, the [T, S] scores and mask materialized like
`kernels.attention.reference`) runs in the dense warm-up, under attention_impl='reference', with
FP8 projections or LoRA on wkv_b (where W_UK / W_UV are not plain weights), and is the oracle the
tests hold the gathered form to. No Pallas kernel yet: the gather and the block scan are XLA's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model.layers import apply_rope, dtype_of, param

INDEX_NORM_EPS = 1e-6  # transformers' and the reference's LayerNorm(index_head_dim, eps=1e-6)


class LayerNorm(nnx.Module):
    """LayerNorm with a scale and a bias, in float32 (the indexer's key norm)."""

    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("norm",), cfg, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), cfg, init="zeros")

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + INDEX_NORM_EPS)
        return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Indexer(nnx.Module):
    """The lightning indexer of one MLA layer (parameter names as transformers' `indexer.*`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, Hi, Di = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
        self.cfg = cfg
        # index heads are few and small: replicated over the tensor axis, sharded like the other
        # projections of the embedding / query latent
        self.wq_b = param(rngs, (cfg.q_lora_rank, Hi, Di), ("q_lora", None, None), cfg)
        self.wk = param(rngs, (D, Di), ("embed", None), cfg)
        self.k_norm = LayerNorm(Di, cfg, rngs=rngs)
        self.weights_proj = param(rngs, (D, Hi), ("embed", None), cfg)

    def __call__(self, x, q_lat, cos, sin):
        """x [B, T, D] (the layer's normed input) and q_lat [B, T, Rq] (the normed query latent),
        both detached here -> index scores float32 [B, T, S=T]."""
        q, w, k = self.project(x, q_lat, cos, sin)
        return score(q, w, k)

    def project(self, x, q_lat, cos, sin):
        """The indexer's queries float32 [B, T, Hi, Di], head weights float32 [B, T, Hi] and keys
        [B, T, Di] (in the compute dtype: what a generator caches) for the positions cos/sin
        rotate to."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        Hr, Di, Hi = cfg.qk_rope_head_dim, cfg.index_head_dim, cfg.index_n_heads
        x = jax.lax.stop_gradient(x).astype(cd)
        q_lat = jax.lax.stop_gradient(q_lat).astype(cd)
        q = jnp.einsum(
            "BTR,RHK->BTHK", q_lat, self.wq_b[...].astype(cd), preferred_element_type=jnp.float32
        ).astype(cd)
        k = jnp.einsum(
            "BSD,DK->BSK", x, self.wk[...].astype(cd), preferred_element_type=jnp.float32
        ).astype(cd)
        k = self.k_norm(k).astype(cd)[:, :, None, :]  # [B, S, 1, Di]
        q = jnp.concatenate([apply_rope(q[..., :Hr], cos, sin, False), q[..., Hr:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., :Hr], cos, sin, False), k[..., Hr:]], axis=-1)
        # (the head weights stay float32, as transformers keeps weights_proj)
        w = jnp.einsum(
            "BTD,DH->BTH",
            x.astype(jnp.float32),
            self.weights_proj[...].astype(jnp.float32),
            preferred_element_type=jnp.float32,
        ) * (Hi**-0.5)
        return q.astype(jnp.float32) * Di**-0.5, w, k[:, :, 0]


def score(q, w, k):
    """Index scores float32 [B, T, S] of queries q [B, T, Hi, Di] (scaled) with head weights w
    [B, T, Hi] against keys k [B, S, Di]."""
    logits = jnp.einsum(
        "BTHK,BSK->BTHS", q, k.astype(jnp.float32), preferred_element_type=jnp.float32
    )
    return jnp.einsum("BTH,BTHS->BTS", w, jax.nn.relu(logits))


def attention_mask(cfg: ModelConfig, scores, allowed):
    """The keys attention reads: the indexer's top index_topk of `allowed` in sparse training and
    inference, every allowed key in the dense warm-up."""
    return select(scores, allowed, cfg.index_topk) if cfg.dsa_stage == "sparse" else allowed


def visible(segment_ids, T: int):
    """bool [B or 1, T, S]: causal, within the same packed document (padding sees nothing)."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, :, None] > 0)


def select(scores, allowed, topk: int):
    """The top-`topk` visible keys of each query: bool [B, T, S] (every visible key when fewer
    exist; ties go to the earlier key)."""
    B, T, S = scores.shape
    k = min(topk, S)
    masked = jnp.where(allowed, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)  # [B, T, k]
    b = jnp.arange(B)[:, None, None]
    t = jnp.arange(T)[None, :, None]
    chosen = jnp.zeros((B, T, S), bool).at[b, t, idx].set(True)
    return chosen & allowed


def attend(q, k, v, mask, scale: float):
    """Softmax attention under an explicit mask: q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv],
    mask bool [B, T, S] -> (out [B, T, N, Hv] in v's dtype, the heads' mean attention float32
    [B, T, S], detached: the indexer's target)."""
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "BNTS,BSNH->BTNH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    ).astype(v.dtype)
    target = jax.lax.stop_gradient(jnp.where(mask, probs.mean(axis=1), 0.0))
    return out, target


def indexer_kl(scores, target, mask):
    """sum over query tokens that see a key (padding sees none) of
    KL(target[t] || softmax(scores[t] over mask[t])): float32 scalar. target rows are
    distributions over mask (the main attention, detached)."""
    logq = jax.nn.log_softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    logq = jnp.where(mask, logq, 0.0)
    kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * logq, axis=-1)  # [B, T]
    rows = jnp.broadcast_to(mask.any(-1), kl.shape)
    return jnp.sum(jnp.where(rows, kl, 0.0))


def sparse_mla(q_nope, q_rope, latent, k_rope, w_kv, index, segment_ids, cfg: ModelConfig, block):
    """Sparse attention in MLA's MQA form (what the V3.2 report trains with): each query reads only
    its top-k keys, gathered from the shared latent + rotary key (kv_lora_rank + qk_rope_head_dim
    values per position) with W_UK folded into the query and W_UV applied after the weighted sum.

    The queries run in blocks of `block` under a scan with rematerialization: per block, the
    indexer's scores against every key, the top-k, the gather, attention and the indexer's KL over
    the selected keys. Nothing of size [T, S] outlives a block, and attention costs
    O(T k (kv_lora_rank + qk_rope_head_dim)) per head instead of O(T^2 (qk + v head dims)).

    q_nope [B, T, N, Hn], q_rope [B, T, N, Hr] (rotated); latent [B, S, R] (normed), k_rope
    [B, S, Hr] (rotated); w_kv = wkv_b [R, N, Hn + Hv]; index = Indexer.project's (q, w, k);
    segment_ids [B, T] or None. Returns (out [B, T, N, Hv] in latent's dtype, the indexer KL
    summed over query tokens), equal to `attend` + `indexer_kl` on `select`'s mask.
    """
    B, T, N, Hn = q_nope.shape
    R = latent.shape[-1]
    cd = latent.dtype
    iq, iw, ik = index
    k = min(cfg.index_topk, T)
    w_uk, w_uv = w_kv[..., :Hn].astype(cd), w_kv[..., Hn:].astype(cd)
    q_abs = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk, preferred_element_type=jnp.float32)
    q_cat = jnp.concatenate([q_abs.astype(cd), q_rope.astype(cd)], axis=-1)  # [B, T, N, R+Hr]
    kv = jnp.concatenate([latent, k_rope.astype(cd)], axis=-1)  # [B, S, R+Hr]: one shared head
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
    bq = max(1, min(block, T))
    nb = -(-T // bq)
    pad = nb * bq - T

    def blocks(x, fill=0):  # [B, T, ...] -> [nb, B, bq, ...] (padded queries are segment 0)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape((B, nb, bq) + x.shape[2:]).swapaxes(0, 1)

    def body(kl, xs):
        qc, qb, wb, sq, t0 = xs
        qpos = t0 + jnp.arange(bq)
        scores = score(qb, wb, ik)  # [B, bq, S]
        allowed = (
            (jnp.arange(T)[None, None, :] <= qpos[None, :, None])
            & (seg[:, None, :] == sq[:, :, None])
            & (sq[:, :, None] > 0)
        )
        _, idx = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), k)  # [B, bq, k]
        valid = jnp.take_along_axis(allowed, idx, axis=-1)
        g = jax.vmap(lambda a, i: a[i])(kv, idx)  # [B, bq, k, R+Hr]
        logits = jnp.einsum("BTNC,BTKC->BTNK", qc, g, preferred_element_type=jnp.float32)
        neg = jnp.finfo(jnp.float32).min
        logits = jnp.where(valid[:, :, None], logits * cfg.softmax_scale, neg)
        p = jax.nn.softmax(logits, axis=-1)
        o_lat = jnp.einsum(
            "BTNK,BTKR->BTNR", p.astype(cd), g[..., :R], preferred_element_type=jnp.float32
        )
        out = jnp.einsum(
            "BTNR,RNH->BTNH", o_lat.astype(cd), w_uv, preferred_element_type=jnp.float32
        ).astype(cd)
        target = jax.lax.stop_gradient(jnp.where(valid, p.mean(axis=2), 0.0))
        kl = kl + indexer_kl(jnp.take_along_axis(scores, idx, axis=-1), target, valid)
        return kl, out

    body = jax.checkpoint(body, prevent_cse=False)
    xs = (blocks(q_cat), blocks(iq), blocks(iw), blocks(seg), jnp.arange(nb) * bq)
    kl, out = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    out = out.swapaxes(0, 1).reshape((B, nb * bq) + out.shape[3:])[:, :T]
    return out, kl
