"""KV caches for generation.

MLA layers cache only what DeepSeek-V2 §2.1.3 says decoding needs: the normalized latent
(kv_lora_rank values) and the rotated decoupled key (qk_rope_head_dim values) per token, shared by
every head: 576 values per token per layer at DeepSeek-V3's shape. Keys and values are never rebuilt
for the cache: the decode step absorbs the up-projections into the query and the output
(moejax.infer.forward). GQA/MHA layers cache keys and values per KV head.

A cache is a pytree (`KVCache`): per layer segment a dict of arrays stacked on a leading layer axis,
the same for each MTP depth, and `lengths` [B], the number of positions of each row already written.
Rows are right-padded: row b holds positions 0 .. lengths[b] - 1, whatever lies beyond is stale and
masked. MLA entries are [L, B, S, ...]; GQA keys and values are head-major [L, B, Nkv, S, H], the
order the attention dots consume without a transpose. With `int8=True` every cached vector is stored
as int8 with one float32 scale per token (and KV head).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig


class KVCache(NamedTuple):
    # per layer segment: {name: [L, B, S, R] or [L, B, Nkv, S, H]} (+ name + '_scale' when int8;
    # + 'route' [L, B, S, K] when recording a MoE segment's expert choices)
    segments: list
    mtp: list  # per MTP depth: {name: [1, B, S, ...]}
    lengths: jax.Array  # int32 [B]: positions written per row

    @property
    def max_len(self) -> int:
        name, x = next(iter(self.segments[0].items()))
        return x.shape[3 if name in HEAD_MAJOR else 2]


HEAD_MAJOR = ("k", "v")  # stored [L, B, Nkv, S, H]


# DeepSeek-V4's raw compressor projections: cached in float32 whatever the cache dtype (the gate
# logits go through a softmax, as in training)
V4_RAW = ("ckv", "cgate", "ikv", "igate")


def entry_shapes(cfg: ModelConfig, v4_kind=None) -> dict[str, tuple[int, ...]]:
    """Per-token shape of each cached tensor of one layer (v4_kind: a DeepSeek-V4 segment's
    kinds, transformer.v4_kinds: then of one group, layer j's entries named 'j/name').

    DeepSeek-V4 caches each position's rotated key/value `kv` [head_dim] and, on compressed
    layers, the raw projections its compressors pool (`ckv` / `cgate`, and the CSA indexer's
    `ikv` / `igate`); a step compresses the windows from them, so any prefix length, padding and
    per-row length needs no window bookkeeping. (That keeps every position, not only the sliding
    window and the compressed entries as transformers' cache does: simpler and exact, more memory.)
    """
    if cfg.attention_type == "v4":
        from moejax.model.v4 import CSA

        out = {}
        for j, (layer_type, _hashed) in enumerate(v4_kind):
            out[f"{j}/kv"] = (cfg.head_dim,)
            if cfg.compress_rate(layer_type):
                c = 2 if layer_type == CSA else 1
                out[f"{j}/ckv"] = out[f"{j}/cgate"] = (c * cfg.head_dim,)
            if layer_type == CSA:
                out[f"{j}/ikv"] = out[f"{j}/igate"] = (2 * cfg.index_head_dim,)
        return out
    if cfg.attention_type == "mla":
        out = {"latent": (cfg.kv_lora_rank,), "rope": (cfg.qk_rope_head_dim,)}
        if cfg.index_topk:  # DeepSeek Sparse Attention: the indexer's key (rotated, normed)
            out["index_k"] = (cfg.index_head_dim,)
        return out
    return {"k": (cfg.kv_heads, cfg.gqa_head_dim), "v": (cfg.kv_heads, cfg.gqa_head_dim)}


def _layer_cache(
    cfg: ModelConfig, layers: int, batch: int, max_len: int, dtype, int8: bool, v4_kind=None
) -> dict:
    out = {}
    if v4_kind is not None:  # stacked by group (transformer.make_stack)
        layers //= len(v4_kind)
    for name, shape in entry_shapes(cfg, v4_kind).items():
        full = (layers, batch) + (
            (shape[0], max_len) + shape[1:] if name in HEAD_MAJOR else (max_len,) + shape
        )
        kind = jnp.float32 if name.split("/")[-1] in V4_RAW else dtype
        out[name] = jnp.zeros(full, jnp.int8 if int8 else kind)
        if int8:  # one scale per token (and per KV head): the last axis is quantized together
            out[name + "_scale"] = jnp.zeros(full[:-1], jnp.float32)
    return out


def route_dtype(cfg: ModelConfig):
    return jnp.int16 if cfg.n_routed_experts < 2**15 else jnp.int32


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    *,
    dtype=None,
    int8: bool = False,
    mtp: bool = False,
    routes: bool = False,
) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions (dtype: the compute dtype by
    default). mtp=True adds a cache for each MTP depth (speculative decoding drafts with it).
    routes=True also records the experts each MoE layer chose for every position ('route' [L, B, S,
    K], routing replay for RL)."""
    from moejax.model.transformer import segments_of, v4_kinds

    if int8 and cfg.attention_type == "v4":
        raise ValueError(
            "kv_int8: DeepSeek-V4 caches are not quantized (its compressor gate logits are cached "
            "raw); use a bfloat16 or float32 cache"
        )
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    segs = [
        _layer_cache(cfg, n, batch, max_len, dtype, int8, kind)
        for (_, n), kind in zip(segments_of(cfg), v4_kinds(cfg))
    ]
    if routes:
        for seg, (kind, n) in zip(segs, segments_of(cfg)):
            if kind == "moe":
                seg["route"] = jnp.full(
                    (n, batch, max_len, cfg.num_experts_per_tok), -1, route_dtype(cfg)
                )  # -1: none
    depths = [
        _layer_cache(cfg, 1, batch, max_len, dtype, int8)
        for _ in range(cfg.mtp_depth if mtp else 0)
    ]
    return KVCache(segs, depths, jnp.zeros((batch,), jnp.int32))


def bytes_per_token(
    cfg: ModelConfig, dtype="bfloat16", *, int8: bool = False, mtp: bool = False
) -> int:
    """Cache bytes one token occupies over all layers (MLA at V3 shape: 576 x 61 x dtype size)."""
    if cfg.attention_type == "v4":
        from moejax.model.transformer import segments_of, v4_kinds

        total = 0
        for (_, n), kinds in zip(segments_of(cfg), v4_kinds(cfg)):
            for name, shape in entry_shapes(cfg, kinds).items():
                size = 4 if name.split("/")[-1] in V4_RAW else jnp.dtype(dtype).itemsize
                total += n // len(kinds) * int(np.prod(shape)) * size
        return total
    per_layer = 0
    for shape in entry_shapes(cfg).values():
        n = int(np.prod(shape))
        per_layer += n + 4 * int(np.prod(shape[:-1])) if int8 else n * jnp.dtype(dtype).itemsize
    return per_layer * (cfg.num_layers + (cfg.mtp_depth if mtp else 0))


def quantize(x):
    """Symmetric int8 over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def write(layers: dict, entries: dict, start) -> dict:
    """Writes every layer's new entries {name: [L, B, T, ...]} at positions start[b] ..
    start[b] + T - 1 of the stacked cache; writes past S are dropped (the caller sizes the cache so
    that kept positions always fit)."""
    out = dict(layers)
    for name, new in entries.items():
        L, B, T = new.shape[:3]
        cols = start[:, None] + jnp.arange(T)[None]  # [B, T]
        if name in HEAD_MAJOR:  # [L, B, T, Nkv, H] -> [L, B, Nkv, T, H] at [:, b, k, cols[b, t]]
            new = new.swapaxes(2, 3)
            K = new.shape[2]
            index = (
                slice(None),
                jnp.arange(B)[:, None, None],
                jnp.arange(K)[None, :, None],
                cols[:, None, :],
            )
        else:
            index = (slice(None), jnp.arange(B)[:, None], cols)
        if name + "_scale" in layers:
            q, scale = quantize(new)
            out[name] = out[name].at[index].set(q, mode="drop")
            out[name + "_scale"] = out[name + "_scale"].at[index].set(scale, mode="drop")
        else:
            out[name] = out[name].at[index].set(new.astype(out[name].dtype), mode="drop")
    return out


def read(layer: dict, name: str, dtype):
    """One layer's cached `name` [B, S, ...] in dtype (dequantized when stored as int8)."""
    x = layer[name]
    if name + "_scale" in layer:
        return (x.astype(jnp.float32) * layer[name + "_scale"][..., None]).astype(dtype)
    return x.astype(dtype)
