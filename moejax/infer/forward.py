"""The decoder run with a KV cache: prefill and decode steps, MLA decoded with absorbed weights.

`forward(model, tokens, cache, ...)` runs new tokens [B, T] at positions cache.lengths[b] + t,
writes their cache entries and attends over everything cached before them. Two phases:

  prefill  (the cache is empty) attention stays inside the new block, MLA expanded as in training
  decode   attention reads the cache; MLA either absorbed (default) or expanded

Absorbed MLA (DeepSeek-V2 §2.1.3). With the cached latent c [S, R] and W_UK, W_UV the key and value
halves of wkv_b [R, N, Hn + Hv], a head's nope score is q_nope . (c W_UK) = (q_nope W_UK^T) . c, and
its output is softmax(.) (c W_UV) = (softmax(.) c) W_UV. So the query is projected into the latent
space once per new token, scores and the weighted sum run over the R-wide latent shared by all
heads, and the result is lifted by W_UV: per step O(S R N) work on a cache of R + Hr values per
token instead of rebuilding N (Hn + Hv) values for each of the S cached tokens (expanded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.infer import cache as cache_lib
from moejax.infer.cache import KVCache
from moejax.model import dsa
from moejax.model import v4 as v4_lib
from moejax.model.attention import MLA
from moejax.model.layers import apply_rope, dtype_of, rms_norm, rope_cos_sin
from moejax.model.transformer import RESIDUAL, Block, Transformer, segments_of

NEG = jnp.finfo(jnp.float32).min


def _two_part_softmax(logits_c, logits_n):
    """Softmax over cached and new keys together: ([..., S], [..., T]) -> the probabilities of each
    part."""
    probs = jax.nn.softmax(jnp.concatenate([logits_c, logits_n], axis=-1), axis=-1)
    return probs[..., : logits_c.shape[-1]], probs[..., logits_c.shape[-1] :]


def _masks(start, T: int, S: int):
    """Cached positions before the block ([B, 1, 1, S]: s < start[b]) and causal inside it ([1, 1,
    T, T])."""
    cached = (jnp.arange(S)[None] < start[:, None])[:, None, None]
    return cached, jnp.tril(jnp.ones((T, T), bool))[None, None]


def attend_cached(q, k_c, v_c, k_n, v_n, start, scale: float, masks=None):
    """Grouped attention over the cache (k_c, v_c [B, Nkv, S, H], head-major: positions < start) and
    the new block (k_n, v_n [B, T, Nkv, H], causal) without concatenating them: q [B, T, N,
    H] -> [B, T, N, Hv].

    The einsums keep XLA's natural dot order (batch dims B, Nkv first), so the cache is never
    transposed. masks: the keys to read ([B, T, S] cached, [B, T, T] new), as _mla_absorbed.
    """
    B, T, N, H = q.shape
    Nkv, S = k_c.shape[1], k_c.shape[2]
    qg = q.reshape(B, T, Nkv, N // Nkv, H)  # [B, T, Nkv, Q, H]
    cached, causal = _masks(start, T, S)  # [B, 1, 1, S], [1, 1, T, T]
    if masks is not None:
        cached, causal = masks[0][:, None], masks[1][:, None]
    lc = jnp.einsum("BTKQH,BKSH->BKTQS", qg, k_c, preferred_element_type=jnp.float32) * scale
    ln = jnp.einsum("BTKQH,BUKH->BKTQU", qg, k_n, preferred_element_type=jnp.float32) * scale
    pc, pn = _two_part_softmax(
        jnp.where(cached[..., None, :], lc, NEG), jnp.where(causal[:, :, :, None, :], ln, NEG)
    )
    out = jnp.einsum(
        "BKTQS,BKSH->BKTQH", pc.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32
    ) + jnp.einsum(
        "BKTQU,BUKH->BKTQH", pn.astype(v_n.dtype), v_n, preferred_element_type=jnp.float32
    )
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N, v_c.shape[-1]).astype(v_c.dtype)


# --------------------------------------------------------------------------------------------- MLA


def _mla_project(attn: MLA, x, cos, sin):
    """Queries and this block's cache entries, exactly as MLA.__call__ computes them."""
    cfg = attn.cfg
    cd = dtype_of(cfg.compute_dtype)
    R, Hn = cfg.kv_lora_rank, cfg.qk_nope_head_dim
    if cfg.q_lora_rank:
        q_lat = jnp.einsum(
            "BTD,DR->BTR", x, attn.wq_a[...].astype(cd), preferred_element_type=jnp.float32
        )
        q_lat = attn.q_norm(q_lat).astype(cd)
        q = jnp.einsum(
            "BTR,RNH->BTNH", q_lat, attn.wq_b[...].astype(cd), preferred_element_type=jnp.float32
        )
    else:
        q = jnp.einsum(
            "BTD,DNH->BTNH", x, attn.wq[...].astype(cd), preferred_element_type=jnp.float32
        )
    q = q.astype(cd)
    q_nope, q_rope = q[..., :Hn], apply_rope(q[..., Hn:], cos, sin, cfg.rope_interleave)
    kv_a = jnp.einsum(
        "BTD,DR->BTR", x, attn.wkv_a[...].astype(cd), preferred_element_type=jnp.float32
    )
    latent = attn.kv_norm(kv_a[..., :R]).astype(cd)  # [B, T, R]
    k_rope = apply_rope(kv_a[..., None, R:].astype(cd), cos, sin, cfg.rope_interleave)[
        :, :, 0
    ]  # [B, T, Hr]
    new = {"latent": latent, "rope": k_rope}
    index = None
    if cfg.index_topk:  # DeepSeek Sparse Attention: the indexer's queries, and its keys to cache
        iq, iw, new["index_k"] = attn.indexer.project(x, q_lat, cos, sin)
        index = (iq, iw)
    return q_nope, q_rope, new, index


def _sparse_masks(attn: MLA, index, cached_k, new_k, start):
    """DeepSeek Sparse Attention in a decode step: the keys each new query reads, bool ([B, T, S]
    cached, [B, T, T] new), chosen together among the cached positions before `start` and the
    causal new ones."""
    T, S = new_k.shape[1], cached_k.shape[1]
    in_cache, causal = _masks(start, T, S)
    scores = jnp.concatenate([dsa.score(*index, cached_k), dsa.score(*index, new_k)], axis=-1)
    B = start.shape[0]
    allowed = jnp.concatenate(
        [jnp.broadcast_to(in_cache[:, 0], (B, T, S)), jnp.broadcast_to(causal[:, 0], (B, T, T))],
        axis=-1,
    )
    mask = dsa.attention_mask(attn.cfg, scores, allowed)
    return mask[..., :S], mask[..., S:]


def _mla_keys_values(attn: MLA, latent, k_rope):
    """Per-head keys and values rebuilt from latents [B, S, R] and rotary keys [B, S, Hr] (as in
    training)."""
    cfg = attn.cfg
    cd = dtype_of(cfg.compute_dtype)
    kv = jnp.einsum(
        "BSR,RNH->BSNH", latent, attn.wkv_b[...].astype(cd), preferred_element_type=jnp.float32
    )
    kv = kv.astype(cd)
    k_nope, v = (
        kv[..., : cfg.qk_nope_head_dim],
        kv[..., cfg.qk_nope_head_dim :],
    )  # [B, S, N, Hn], [B, S, N, Hv]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:-1] + k_rope.shape[-1:])
    return jnp.concatenate([k_nope, k_rope], axis=-1), v


def _mla_absorbed(attn: MLA, q_nope, q_rope, cached: dict, new: dict, start, masks=None):
    """Attention in the latent space: W_UK folded into the query, W_UV applied after the weighted
    sum. masks: the keys to read ([B, T, S] cached, [B, T, T] new; sparse attention), default
    every cached position before `start` and the causal new ones."""
    cfg = attn.cfg
    cd = dtype_of(cfg.compute_dtype)
    Hn = cfg.qk_nope_head_dim
    w_kv = attn.wkv_b[...].astype(cd)
    w_uk, w_uv = w_kv[..., :Hn], w_kv[..., Hn:]  # [R, N, Hn], [R, N, Hv]
    q_lat = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk, preferred_element_type=jnp.float32).astype(
        cd
    )

    def logits(part):
        lat = jnp.einsum(
            "BTNR,BSR->BNTS", q_lat, part["latent"], preferred_element_type=jnp.float32
        )
        return (
            lat
            + jnp.einsum("BTNH,BSH->BNTS", q_rope, part["rope"], preferred_element_type=jnp.float32)
        ) * cfg.softmax_scale

    T, S = q_nope.shape[1], cached["latent"].shape[1]
    in_cache, causal = _masks(start, T, S)
    if masks is not None:
        in_cache, causal = masks[0][:, None], masks[1][:, None]
    pc, pn = _two_part_softmax(
        jnp.where(in_cache, logits(cached), NEG), jnp.where(causal, logits(new), NEG)
    )
    # [B, N, T, R]: the dot's natural output order (a BTNR output makes XLA:CPU transpose inside the
    # dot, 8x slower)
    o_lat = jnp.einsum(
        "BNTS,BSR->BNTR", pc.astype(cd), cached["latent"], preferred_element_type=jnp.float32
    ) + jnp.einsum(
        "BNTS,BSR->BNTR", pn.astype(cd), new["latent"], preferred_element_type=jnp.float32
    )
    return jnp.einsum(
        "BNTR,RNH->BTNH", o_lat.astype(cd), w_uv, preferred_element_type=jnp.float32
    ).astype(cd)


def _mla_step(attn: MLA, x, cos, sin, cached, start, prefill: bool, absorbed: bool):
    cfg = attn.cfg
    cd = dtype_of(cfg.compute_dtype)
    q_nope, q_rope, new, index = _mla_project(attn, x, cos, sin)
    if (
        prefill
    ):  # the cache holds nothing before this block: attend inside it, expanded as in training
        k, v = _mla_keys_values(attn, new["latent"], new["rope"])
        q = jnp.concatenate([q_nope, q_rope], -1)
        if index is not None:
            T = x.shape[1]
            scores = dsa.score(*index, new["index_k"])
            mask = dsa.attention_mask(cfg, scores, dsa.visible(None, T))
            out = dsa.attend(q, k, v, mask, cfg.softmax_scale)[0]
        else:
            out = attn._attend(q, k, v, None)
    else:
        cached = {name: cache_lib.read(cached, name, cd) for name in cache_lib.entry_shapes(cfg)}
        masks = (
            None
            if index is None
            else _sparse_masks(attn, index, cached["index_k"], new["index_k"], start)
        )
        if absorbed:
            out = _mla_absorbed(attn, q_nope, q_rope, cached, new, start, masks)
        else:
            k_c, v_c = (
                a.transpose(0, 2, 1, 3)
                for a in _mla_keys_values(attn, cached["latent"], cached["rope"])
            )
            k_n, v_n = _mla_keys_values(attn, new["latent"], new["rope"])
            out = attend_cached(
                jnp.concatenate([q_nope, q_rope], -1),
                k_c,
                v_c,
                k_n,
                v_n,
                start,
                cfg.softmax_scale,
                masks,
            )
    y = jnp.einsum(
        "BTNH,NHD->BTD", out, attn.wo[...].astype(cd), preferred_element_type=jnp.float32
    )
    return y, new


# --------------------------------------------------------------------------------------------- GQA


def _gqa_step(attn, x, cos, sin, cached, start, prefill: bool):
    cfg = attn.cfg
    cd = dtype_of(cfg.compute_dtype)
    q = jnp.einsum("BTD,DNH->BTNH", x, attn.wq[...].astype(cd), preferred_element_type=jnp.float32)
    k = jnp.einsum("BSD,DNH->BSNH", x, attn.wk[...].astype(cd), preferred_element_type=jnp.float32)
    v = jnp.einsum("BSD,DNH->BSNH", x, attn.wv[...].astype(cd), preferred_element_type=jnp.float32)
    if cfg.qk_norm:
        q = rms_norm(q, attn.q_norm[...], cfg.rms_norm_eps)
        k = rms_norm(k, attn.k_norm[...], cfg.rms_norm_eps)
    q = apply_rope(q.astype(cd), cos, sin, cfg.rope_interleave)
    k = apply_rope(k.astype(cd), cos, sin, cfg.rope_interleave)
    v = v.astype(cd)
    if prefill:
        out = attn._attend(q, k, v, None)
    else:
        kc, vc = cache_lib.read(cached, "k", cd), cache_lib.read(cached, "v", cd)
        out = attend_cached(q, kc, vc, k, v, start, cfg.softmax_scale)
    y = jnp.einsum(
        "BTNH,NHD->BTD", out, attn.wo[...].astype(cd), preferred_element_type=jnp.float32
    )
    return y, {"k": k, "v": v}


# -------------------------------------------------------------------------------------- DeepSeek-V4


def _v4_attn_step(attn: v4_lib.V4Attention, x, ctx, cached, start, prefill: bool):
    """V4 attention of the new tokens over every cached position and themselves: the training
    computation (V4Attention.attend) with the cache as its keys. Returns (y, new entries)."""
    B, T = x.shape[:2]
    q, q_lat, kv, raw = attn.project(x, ctx)
    new = {"kv": kv, **raw}
    ones = jnp.ones((B, T), jnp.int32)
    if prefill:
        keys = v4_lib.Keys(kv, raw, ctx.positions, ones)
    else:
        cols = start[:, None] + jnp.arange(T)[None]
        rows = jnp.arange(B)[:, None]
        full = {
            name: cached[name].at[rows, cols].set(v.astype(cached[name].dtype), mode="drop")
            for name, v in new.items()
        }
        S = full["kv"].shape[1]
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        seg = (pos < (start + T)[:, None]).astype(jnp.int32)  # written positions only
        keys = v4_lib.Keys(full["kv"], {k: full[k] for k in raw}, pos, seg)
    y, _ = attn.attend(x, q, q_lat, ctx, ones, keys)
    return y, new


def _v4_group_step(group, x, ctx, token_mask, cached, start, prefill: bool, record: bool):
    """A V4 group's layers in order; their cache entries named 'j/name' (cache.entry_shapes),
    their expert choices stacked [p, B, T, K] under 'route'."""
    new, routes = {}, []
    for j, block in enumerate(group.blocks):
        mine = (
            None
            if prefill
            else {k.split("/")[1]: v for k, v in cached.items() if k.startswith(f"{j}/")}
        )
        x, entries = _v4_block_step(block, x, ctx, token_mask, mine, start, prefill, record)
        if record:
            routes.append(entries.pop("route"))
        new.update({f"{j}/{k}": v for k, v in entries.items()})
    if record:
        new["route"] = jnp.stack(routes)
    return x, new


def _v4_block_step(block, x, ctx, token_mask, cached, start, prefill: bool, record: bool):
    cd = block.compute_dtype
    post, comb, h = block.attn_hc(x)
    a, new = _v4_attn_step(block.attn, block.attn_norm(h).astype(cd), ctx, cached, start, prefill)
    x = v4_lib.mix(post, a, comb, x).astype(cd)
    post, comb, h = block.ffn_hc(x)
    f, aux = block.ffn(block.ffn_norm(h).astype(cd), token_mask, record=record, ids=ctx.ids)
    if record:
        new = dict(new, route=aux["route"])
    x = v4_lib.mix(post, f, comb, x).astype(cd)
    return sharding.constrain(x, block.layout, v4_lib.STREAMS), new


# ------------------------------------------------------------------------------------------- blocks


def block_step(
    block: Block,
    x,
    cos,
    sin,
    token_mask,
    cached,
    start,
    prefill: bool,
    absorbed: bool,
    record: bool = False,
):
    """Block.__call__ with cached attention: x [B, T, D] -> (x, this block's new cache entries [B,
    T, ...]). cached: this layer's cache {name: [B, S, ...]} (None with prefill). record: a MoE
    layer's expert choices join the entries as 'route' [B, T, K]. (A DeepSeek-V4 block reads a
    v4.Context in cos's place.)"""
    if isinstance(block, v4_lib.V4Group):
        return _v4_group_step(block, x, cos, token_mask, cached, start, prefill, record)
    cd = block.compute_dtype
    h = block.attn_norm(x).astype(cd)
    if isinstance(block.attn, MLA):
        h, new = _mla_step(block.attn, h, cos, sin, cached, start, prefill, absorbed)
    else:
        h, new = _gqa_step(block.attn, h, cos, sin, cached, start, prefill)
    x = (x.astype(jnp.float32) + h).astype(cd)
    hn = block.ffn_norm(x).astype(cd)
    if block.kind == "moe":
        h, aux = block.ffn(hn, token_mask, record=record)
        if record:
            new = dict(new, route=aux["route"])
    else:
        h = block.ffn(hn)
    return sharding.constrain((x.astype(jnp.float32) + h).astype(cd), block.layout, RESIDUAL), new


def _run_segment(stack: Block, x, cos, sin, token_mask, layers: dict, start, prefill, absorbed):
    """The stacked layers in a scan that reads each layer's cache slice and returns the new entries
    [L, B, T, ...]; they are written after the scan, so a decode step reads the cache once and
    writes only the new positions (in place: the cache is donated)."""
    graphdef, state = nnx.split(stack)
    record = "route" in layers  # the cache records this MoE segment's expert choices
    grouped = isinstance(stack, v4_lib.V4Group)  # V4: stacked groups of layers; routes per layer
    xs = {k: v for k, v in layers.items() if k != "route"} if grouped else layers

    def body(h, xs):
        layer_state, cached = xs
        return block_step(
            nnx.merge(graphdef, layer_state),
            h,
            cos,
            sin,
            token_mask,
            cached,
            start,
            prefill,
            absorbed,
            record,
        )

    x, new = jax.lax.scan(body, x, (state, None if prefill else xs))
    if grouped and record:  # [groups, p, B, T, K] -> per layer
        new["route"] = new["route"].reshape((-1,) + new["route"].shape[2:])
    return x, cache_lib.write(layers, new, start)


def _positions(start, T: int):
    return start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]


def forward(
    model: Transformer,
    tokens,
    cache: KVCache,
    *,
    prefill: bool = False,
    absorbed: bool = True,
    token_mask=None,
):
    """Runs new tokens through the decoder with the cache.

    Args:
      tokens: int [B, T], row b's at positions cache.lengths[b] + t.
      cache: the model's cache; with prefill=True it must be empty (lengths 0).
      token_mask: [B, T] real tokens (right padding 0), for the MoE statistics only.
    Returns:
      hidden [B, T, D] after the final norm (float32; `model.head` gives logits, MTP drafts from it)
      and the cache with the new entries written. `lengths` is left to the caller, which knows how
      many were kept.
    """
    cfg = model.cfg
    B, T = tokens.shape
    start = cache.lengths
    v4 = cfg.attention_type == "v4"
    if v4:  # V4 blocks read a v4.Context in cos's place
        cos, sin = v4_lib.context(tokens, _positions(start, T), cfg), None
    else:
        cos, sin = rope_cos_sin(_positions(start, T), cfg)
    token_mask = (
        jnp.ones((B, T), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    )
    x = model.embed_tokens(tokens)
    if v4:  # hc_mult residual streams
        x = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (cfg.hc_mult,) + x.shape[2:])
    segments = []
    for (kind, _n), stack, layers in zip(segments_of(cfg), model.segments, cache.segments):
        with jax.named_scope(f"segment_{kind}"):
            x, layers = _run_segment(
                stack, x, cos, sin, token_mask, layers, start, prefill, absorbed
            )
        segments.append(layers)
    return model.norm(model.hc_head(x) if v4 else x), cache._replace(segments=segments)


def mtp_forward(
    model: Transformer,
    hidden,
    next_tokens,
    cache: KVCache,
    start,
    *,
    prefill: bool = False,
    absorbed: bool = True,
):
    """The first MTP depth run with its cache: position i combines the main model's final-normed
    hidden h_i [B, T, D] with the embedding of token i + 1 (next_tokens [B, T]) and predicts token
    i + 2.

    Returns the MTP hidden after its final norm [B, T, D] and the cache with the depth's entries
    written.
    """
    cfg = model.cfg
    m = model.mtp[0]
    B, T = next_tokens.shape
    cd = dtype_of(cfg.compute_dtype)
    cos, sin = rope_cos_sin(_positions(start, T), cfg)
    e = m.enorm(model.embed_tokens(next_tokens))
    z = jnp.concatenate([e, m.hnorm(hidden)], axis=-1).astype(cd)  # [B, T, 2D]
    z = jnp.einsum(
        "BTX,XD->BTD", z, m.eh_proj[...].astype(cd), preferred_element_type=jnp.float32
    ).astype(cd)
    layers = cache.mtp[0]
    cached = None if prefill else jax.tree.map(lambda a: a[0], layers)
    h, new = block_step(
        m.block, z, cos, sin, jnp.ones((B, T), jnp.float32), cached, start, prefill, absorbed
    )
    layers = cache_lib.write(layers, jax.tree.map(lambda a: a[None], new), start)
    return m.norm(h), cache._replace(mtp=[layers] + list(cache.mtp[1:]))
