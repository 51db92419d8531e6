"""Parameter counts and model FLOPs per token, from the config alone (no memory)."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from moejax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int  # main model, without MTP modules
    activated: int  # parameters one token touches (top-k of the routed experts)
    mtp: int  # extra parameters of the MTP modules (embedding and head are shared)
    embedding: int  # token embedding + untied LM head
    activated_matmul: int  # activated parameters used in matmuls, excluding the embedding lookup


def _expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts from the abstract model (jax.eval_shape: nothing is allocated)."""
    from moejax.model.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    sizes = {
        path: int(np.prod(v.get_value().shape))
        for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    total = sum(sizes.values()) - mtp
    n_moe = cfg.layer_kinds().count("moe")
    inactive = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * _expert_params(cfg)
    activated = total - inactive
    emb = sizes[("embed",)] + sizes.get(("lm_head",), 0)
    norms = sum(n for p, n in sizes.items() if "norm" in "/".join(map(str, p)))
    # The LM head is a matmul; the embedding lookup is not.
    activated_matmul = (
        activated
        - sizes[("embed",)]
        - norms
        + (sizes[("embed",)] if cfg.tie_word_embeddings else 0)
    )
    return ParamCounts(
        total=total, activated=activated, mtp=mtp, embedding=emb, activated_matmul=activated_matmul
    )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV per token under a causal mask (half the full square)."""
    if cfg.attention_type == "mla":
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.gqa_head_dim
    return 2.0 * cfg.num_heads * (qk + v) * seq_len / 2


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token, the standard way: 6 x activated matmul parameters plus
    3 x the causal attention term per layer; the MTP modules add their block, projection and
    head."""
    c = param_counts(cfg)
    layers = cfg.num_layers
    dense = 6.0 * c.activated_matmul + 3.0 * layers * attention_flops_per_token(cfg, seq_len)
    if cfg.mtp_depth:
        block = _mtp_block_activated(cfg)
        head = cfg.hidden_size * cfg.vocab_size
        dense += cfg.mtp_depth * (
            6.0 * (block + 2 * cfg.hidden_size**2 + head)
            + 3.0 * attention_flops_per_token(cfg, seq_len)
        )
    return dense


def _mtp_block_activated(cfg: ModelConfig) -> int:
    from moejax.model.transformer import Block

    kind = "moe" if cfg.n_routed_experts else "dense"
    abstract = nnx.eval_shape(lambda: Block(cfg, kind, rngs=nnx.Rngs(0)))
    n = sum(
        int(np.prod(v.get_value().shape))
        for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    )
    if kind == "moe":
        n -= (cfg.n_routed_experts - cfg.num_experts_per_tok) * _expert_params(cfg)
    return n
