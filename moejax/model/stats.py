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


def keys_per_query(cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query attends to, averaged over the positions of a causal row: T / 2 dense (the usual
    half square); with DeepSeek Sparse Attention's top-k (sparse stage), query t reads
    min(k, t + 1) keys."""
    T, k = seq_len, cfg.index_topk
    if not k or cfg.dsa_stage != "sparse" or k >= T:
        return T / 2
    return (k * (k + 1) / 2 + (T - k) * k) / T


def _mean_over_positions(f, T: int) -> float:
    """f(t) averaged over the positions t = 0 .. T - 1 of a causal row."""
    t = np.arange(T)
    return float(np.mean(f(t)))


def v4_keys_per_query(cfg: ModelConfig, layer_type: str, seq_len: int) -> tuple[float, float]:
    """(keys attended, compressed entries the indexer scores) per query of one DeepSeek-V4 layer,
    averaged over a causal row of seq_len: the sliding window's min(W, t + 1) keys, plus on HCA
    every complete entry (floor((t + 1) / m)), on CSA min(index_topk, floor((t + 1) / m)) of the
    entries the indexer scores."""
    T, W = seq_len, cfg.sliding_window
    window = _mean_over_positions(lambda t: np.minimum(W, t + 1), T)
    m = cfg.compress_rate(layer_type)
    if not m:
        return window, 0.0
    entries = _mean_over_positions(lambda t: (t + 1) // m, T)
    if layer_type == "heavily_compressed_attention":
        return window + entries, 0.0
    chosen = _mean_over_positions(lambda t: np.minimum(cfg.index_topk, (t + 1) // m), T)
    return window + chosen, entries


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV per token over the keys it attends to (causal: about half the
    full square; sparse attention: its top-k keys), per layer (DeepSeek-V4: averaged over its
    layers, whose types attend over different keys)."""
    if cfg.attention_type == "v4":
        per = [v4_keys_per_query(cfg, t, seq_len)[0] for t in cfg.v4_layer_types]
        return 2.0 * cfg.num_heads * 2 * cfg.head_dim * float(np.mean(per))
    if cfg.attention_type == "mla":
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.gqa_head_dim
    return 2.0 * cfg.num_heads * (qk + v) * keys_per_query(cfg, seq_len)


def indexer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of DeepSeek Sparse Attention's index scores per token: a q.k of index_head_dim
    per index head and the weighted head sum, over every visible key (T / 2 on average).
    Its projections are parameters (counted with them)."""
    if not cfg.index_topk:
        return 0.0
    if cfg.attention_type == "v4":  # CSA layers score the compressed entries (mean over layers)
        per = [v4_keys_per_query(cfg, t, seq_len)[1] for t in cfg.v4_layer_types]
        return 2.0 * cfg.index_n_heads * (cfg.index_head_dim + 1) * float(np.mean(per))
    return 2.0 * cfg.index_n_heads * (cfg.index_head_dim + 1) * seq_len / 2


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token, the standard way: 6 x activated matmul parameters plus
    3 x the causal attention term per layer; the MTP modules add their block, projection and
    head."""
    c = param_counts(cfg)
    layers = cfg.num_layers
    # DeepSeek Sparse Attention: the indexer's inputs are detached, so its projections get weight
    # gradients but pass none back (4x, not 6x, their parameters); its scores run forward and
    # backward (3x). In the dense warm-up the rest of the model gets no update, but its backward
    # still runs to reach nothing: counted as training anyway, as the step computes it.
    ix_params = _indexer_params(cfg)  # (per layer: V4 averages over its layers)
    per_layer = 3.0 * (
        attention_flops_per_token(cfg, seq_len) + indexer_flops_per_token(cfg, seq_len)
    )
    dense = 6.0 * c.activated_matmul - 2.0 * layers * ix_params + layers * per_layer
    if cfg.mtp_depth:
        block = _mtp_block_activated(cfg)
        head = cfg.hidden_size * cfg.vocab_size
        dense += cfg.mtp_depth * (
            6.0 * (block + 2 * cfg.hidden_size**2 + head) - 2.0 * ix_params + per_layer
        )
    return dense


def _indexer_params(cfg: ModelConfig) -> int:
    """Matmul parameters of one layer's lightning indexer (DeepSeek Sparse Attention; DeepSeek-V4:
    a CSA indexer with its own compressor, averaged over the layers)."""
    if not cfg.index_topk:
        return 0
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    if cfg.attention_type == "v4":
        n_csa = cfg.v4_layer_types.count("compressed_sparse_attention")
        one = cfg.q_lora_rank * Hi * Di + cfg.hidden_size * (Hi + 2 * 2 * Di)
        return one * n_csa / cfg.num_layers
    return cfg.q_lora_rank * Hi * Di + cfg.hidden_size * (Di + Hi)


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
