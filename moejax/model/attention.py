"""Attention: DeepSeek's Multi-head Latent Attention (MLA) and standard MHA/GQA (+ Qwen3 QK-norm).

Both take x [B, T, D], rotary cos/sin [B, T, P] and segment ids [B, T] (causal attention within
each packed document) and return [B, T, D]. The attention itself is `moejax.kernels.attention`'s op,
its backend chosen by `execution.attention_impl`; softmax statistics are float32 on every backend.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import sharding
from moejax.config import ExecutionConfig, ModelConfig
from moejax.kernels.attention import attention
from moejax.model import dsa
from moejax.model.layers import (
    RMSNorm,
    adapters,
    apply_rope,
    dtype_of,
    param,
    project,
    rms_norm,
)


def _attend(self, q, k, v, segment_ids, balanced: bool = False):
    """The configured attention backend on q [B, T, N, H], k [B, T, Nkv, H], v [B, T, Nkv, Hv].
    balanced: rows in the context-parallel order (Transformer.__call__; the generator's prefill
    passes natural order)."""
    ex = self.execution
    return attention(
        q,
        k,
        v,
        segment_ids,
        scale=self.cfg.softmax_scale,
        impl=ex.attention_impl,
        layout=self.layout,
        block=ex.attention_block or None,
        balanced=balanced,
    )


class MLA(nnx.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3).

    Queries go through a low-rank bottleneck (q_lora_rank; 0 = a plain projection). Keys and
    values are rebuilt from one compressed latent of rank kv_lora_rank, and a decoupled rotary key
    of qk_rope_head_dim is shared by all heads.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        D, N = cfg.hidden_size, cfg.num_heads
        R, Hn, Hr, Hv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.cfg = cfg
        self.execution = execution  # the attention backend
        self.fp8 = execution.fp8  # FP8 projections (layers.project)
        self.layout = layout  # sharding.Layout: activations pinned to it (None: no mesh)
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), cfg)  # [D, Rq]
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, rngs=rngs)
            self.wq_b = param(
                rngs, (cfg.q_lora_rank, N, Hn + Hr), ("q_lora", "heads", "head_dim"), cfg
            )
        else:
            self.wq = param(rngs, (D, N, Hn + Hr), ("embed", "heads", "head_dim"), cfg)  # [D, N, H]
        self.wkv_a = param(rngs, (D, R + Hr), ("embed", "kv_lora"), cfg)  # [D, R + Hr]
        self.kv_norm = RMSNorm(R, cfg, rngs=rngs)
        self.wkv_b = param(
            rngs, (R, N, Hn + Hv), ("kv_lora", "heads", "head_dim"), cfg
        )  # [R, N, Hn+Hv]
        self.wo = param(rngs, (N, Hv, D), ("heads", "head_dim", "embed"), cfg)  # [N, Hv, D]
        if cfg.index_topk:  # DeepSeek Sparse Attention (V3.2)
            self.indexer = dsa.Indexer(cfg, rngs=rngs)

    _attend = _attend

    def _sparse_mqa(self) -> bool:
        """DeepSeek Sparse Attention runs gathered, in MLA's MQA form (dsa.sparse_mla), in the
        sparse stage; the reference form (dense scores and mask) under attention_impl='reference',
        in the dense warm-up, and where W_UK / W_UV are not plain weights (LoRA on wkv_b, FP8)."""
        return (
            self.cfg.dsa_stage == "sparse"
            and self.execution.attention_impl != "reference"
            and not self.fp8
            and adapters(self, "wkv_b") is None
        )

    def __call__(self, x, cos, sin, segment_ids, rng=None, return_aux: bool = False):
        """segment_ids: int [B, T] or None (one document per row); rng: LoRA dropout (training).
        return_aux: return (y, aux), aux {'indexer_kl': the sparse-attention indexer's KL loss
        summed over this layer's query tokens} ({} without an indexer)."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        R, Hn = cfg.kv_lora_rank, cfg.qk_nope_head_dim
        x = x.astype(cd)
        rows, heads = ("batch", "sequence", None), ("batch", "sequence", "heads", None)
        if cfg.q_lora_rank:
            q_lat = project(self, "wq_a", "BTD,DR->BTR", x, cd, rng)
            q_lat = sharding.constrain(
                self.q_norm(sharding.constrain(q_lat, self.layout, rows)).astype(cd),
                self.layout,
                rows,
            )
            q = project(self, "wq_b", "BTR,RNH->BTNH", q_lat, cd, rng)
        else:
            q = project(self, "wq", "BTD,DNH->BTNH", x, cd, rng)
        q = sharding.constrain(q.astype(cd), self.layout, heads)
        q_nope, q_rope = q[..., :Hn], q[..., Hn:]

        kv_a = project(self, "wkv_a", "BTD,DR->BTR", x, cd, rng)
        kv_a = sharding.constrain(kv_a, self.layout, rows)
        kv_lat, k_rope = kv_a[..., :R], kv_a[..., R:]  # [B, T, R], [B, T, Hr]
        kv_lat = sharding.constrain(self.kv_norm(kv_lat).astype(cd), self.layout, rows)
        kv = project(self, "wkv_b", "BSR,RNH->BSNH", kv_lat, cd, rng)
        kv = sharding.constrain(kv.astype(cd), self.layout, heads)
        k_nope, v = kv[..., :Hn], kv[..., Hn:]  # [B, S, N, Hn], [B, S, N, Hv]

        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(
            k_rope[:, :, None, :].astype(cd), cos, sin, cfg.rope_interleave
        )  # [B, S, 1, Hr]
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate(
            [k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:-1] + k_rope.shape[-1:])], axis=-1
        )
        aux = {}
        if cfg.index_topk and self._sparse_mqa():
            out, aux["indexer_kl"] = dsa.sparse_mla(
                q_nope,
                q_rope,
                kv_lat,
                k_rope[:, :, 0],
                self.wkv_b[...],
                self.indexer.project(x, q_lat, cos, sin),
                segment_ids,
                cfg,
                self.execution.attention_block or 128,
            )
        elif cfg.index_topk:  # the reference form (and the dense warm-up)
            allowed = dsa.visible(segment_ids, x.shape[1])
            scores = self.indexer(x, q_lat, cos, sin)
            mask = dsa.attention_mask(cfg, scores, allowed)
            out, target = dsa.attend(q, k, v, mask, cfg.softmax_scale)
            aux["indexer_kl"] = dsa.indexer_kl(scores, target, mask)
        else:
            out = self._attend(q, k, v, segment_ids, balanced=True)  # [B, T, N, Hv]
        out = checkpoint_name(sharding.constrain(out, self.layout, heads), "attn_out")
        y = project(self, "wo", "BTNH,NHD->BTD", out, cd, rng)
        y = sharding.constrain(y, self.layout, rows)
        return (y, aux) if return_aux else y


class GQA(nnx.Module):
    """Multi-head / grouped-query attention with optional per-head QK RMSNorm (Qwen3)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        D, N, Nkv, H = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.cfg = cfg
        self.execution = execution  # the attention backend
        self.fp8 = execution.fp8  # FP8 projections (layers.project)
        self.layout = layout  # sharding.Layout: activations pinned to it (None: no mesh)
        self.wq = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg)
        self.wk = param(rngs, (D, Nkv, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wv = param(rngs, (D, Nkv, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), cfg)
        if cfg.qk_norm:
            self.q_norm = param(rngs, (H,), ("norm",), cfg, init="ones")
            self.k_norm = param(rngs, (H,), ("norm",), cfg, init="ones")

    _attend = _attend

    def __call__(self, x, cos, sin, segment_ids, rng=None, return_aux: bool = False):
        """segment_ids: int [B, T] or None (one document per row); rng: LoRA dropout (training).
        return_aux: return (y, {}) (MLA's signature)."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        x = x.astype(cd)
        q = project(self, "wq", "BTD,DNH->BTNH", x, cd, rng)
        k = project(self, "wk", "BSD,DNH->BSNH", x, cd, rng)
        v = project(self, "wv", "BSD,DNH->BSNH", x, cd, rng)
        heads = ("batch", "sequence", "heads", None)
        kv_heads = ("batch", "sequence", "kv_heads", None)
        q = sharding.constrain(q, self.layout, heads)
        k = sharding.constrain(k, self.layout, kv_heads)
        v = sharding.constrain(v, self.layout, kv_heads)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q.astype(cd), cos, sin, cfg.rope_interleave)
        k = apply_rope(k.astype(cd), cos, sin, cfg.rope_interleave)
        out = self._attend(q, k, v.astype(cd), segment_ids, balanced=True)
        out = checkpoint_name(sharding.constrain(out, self.layout, heads), "attn_out")
        y = project(self, "wo", "BTNH,NHD->BTD", out, cd, rng)
        y = sharding.constrain(y, self.layout, ("batch", "sequence", None))
        return (y, {}) if return_aux else y
