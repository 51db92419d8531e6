"""DeepSeek-V4: hybrid compressed attention, manifold-constrained hyper-connections, hash routing.

What each piece computes follows transformers' `deepseek_v4` (5.25) exactly; the tests hold the
two to 1e-4 on tiny random models.

Attention (`V4Attention`). One key/value head of head_dim, read as both key and value; queries
through a low-rank bottleneck (q_lora_rank, its latent RMS-normed) and an unweighted RMSNorm per
head; interleaved rotary on the *last* qk_rope_head_dim dims of each head, undone on the output
(rotation by -position) because the values carry it too; a learned sink logit per head (gpt-oss
style: it takes softmax mass and adds no value); a grouped low-rank output projection (o_groups
groups of heads, each to o_lora_rank, then one linear to hidden_size). Each layer attends over
  - a sliding window: the key's own position and the sliding_window - 1 before it, and
  - by its layer type (config.V4_LAYER_TYPES), compressed entries:
    'heavily_compressed_attention' (HCA) every entry, each a softmax-gated sum of one window of
    compress_rate_hca tokens; 'compressed_sparse_attention' (CSA) the index_topk entries a
    lightning indexer picks, each gated over 2 * compress_rate_csa tokens (the window and the one
    before it: two series per token, Ca for the next entry and Cb for its own).
A query sees an entry only once its whole window is in the past: entry w (window [w m, (w+1) m))
is visible from position p when (w + 1) m <= p + 1. Entries are RMS-normed and rotated at their
window's first position with the compressed layers' rope (compress_rope_theta, YaRN when
configured, attention factor 1); the main rope (rope_theta, unscaled) rotates sliding layers.

Packed rows: windows are aligned to each document's positions (a document's tokens 0..m-1 make its
first window, as if it were alone in its row), a window that does not fit in its document makes no
entry, and a query sees only its own document's entries, so a packed document computes what it
computes alone. Entries are gathered from the window starts of each row (at most T // m of them).

Indexer training. transformers defines only the forward pass, where the indexer's top-k has no
gradient. moejax trains the indexer as DeepSeek-V3.2 does (moejax.model.dsa): on detached inputs,
by the KL divergence from the main attention's distribution over the selected entries (summed over
heads, L1-normalized) to the softmax of its scores over them (aux 'indexer_kl', per layer).

Hyper-connections (`HyperConnection`): the residual is hc_mult streams [B, T, n, D]. Before each
attention or MoE sublayer a one-layer map of the RMS-normed streams gives pre [n] (sigmoid + eps:
the streams' weights into the sublayer), post [n] (2 sigmoid: the sublayer output's weight into
each stream) and comb [n, n] (softmax + eps, then Sinkhorn-Knopp to doubly stochastic); the new
streams are post * out + comb^T streams. `HyperHead` collapses the streams before the final norm.

MoE: all layers; the first num_hash_layers route by a frozen token -> experts table
(router.HashRouter), the rest by sqrt(softplus(logits)) top-k with the aux-loss-free bias; the
routed and shared experts clamp their SwiGLU pre-activations at swiglu_limit.

Two forms compute the same function: `blocked_attention` (training: query blocks under a
rematerialized scan, each reading its window rows, on HCA every entry, on CSA its gathered top-k;
nothing of size [T, T]) and `reference_attention` (the [T, T + entries] scores materialized: the
tests' oracle, execution.attention_impl='reference', and the generator, whose queries are few).
No Pallas kernel: the gathers and the block scan are XLA's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import sharding
from moejax.config import ExecutionConfig, ModelConfig
from moejax.model import dsa
from moejax.model.layers import RMSNorm, dtype_of, param, project, rope_inv_freq
from moejax.model.moe import MoE

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
STREAMS = ("batch", "sequence", None, None)  # logical axes of the residual streams [B, T, n, D]


class Context(NamedTuple):
    """What every V4 block reads besides its input (passed where other blocks take rotary cos)."""

    main_cos: jax.Array  # [B, T, P] the sliding layers' rope at the tokens' positions
    main_sin: jax.Array
    comp_cos: jax.Array  # [B, T, P] the compressed layers' rope
    comp_sin: jax.Array
    positions: jax.Array  # int [B, T]
    ids: jax.Array  # int [B, T] token ids (hash routing)


def rope_tables(cfg: ModelConfig):
    """(main, compress) inverse frequencies [P]: the main rope is rope_theta without scaling; the
    compressed layers' is compress_rope_theta with the configured rope_type (YaRN's attention
    factor is not applied, as V4 does)."""
    main, _ = rope_inv_freq(cfg.replace(rope_type="default"))
    comp, _ = rope_inv_freq(cfg.replace(rope_theta=cfg.compress_rope_theta))
    return main, comp


def _cos_sin(positions, inv_freq):
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs), jnp.sin(freqs)


def context(input_ids, positions, cfg: ModelConfig) -> Context:
    main, comp = rope_tables(cfg)
    return Context(*_cos_sin(positions, main), *_cos_sin(positions, comp), positions, input_ids)


def rope_tail(x, cos, sin):
    """Interleaved rotary on the last 2P dims of x [..., H] (pairs (x0, x1), (x2, x3), ...), the
    layout kept: V4 reads the rotated slice back out of the attention output. cos / sin broadcast
    against x[..., :P]."""
    P2 = 2 * cos.shape[-1]
    head, tail = x[..., :-P2], x[..., -P2:].astype(jnp.float32)
    x1, x2 = tail[..., 0::2], tail[..., 1::2]
    rot = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(tail.shape)
    return jnp.concatenate([head, rot.astype(x.dtype)], axis=-1)


def unit_rms(x, eps: float):
    """RMSNorm without a weight (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


# ------------------------------------------------------------------------------- compression


class Windows(NamedTuple):
    """The complete windows of each row, in order: start row, validity, first position, document."""

    start: jax.Array  # int [B, S]
    ok: jax.Array  # bool [B, S]
    pos: jax.Array  # int [B, S] the window's first position (w * m)
    seg: jax.Array  # int [B, S]
    prev_ok: jax.Array  # bool [B, S] the same document has a window just before (CSA's Ca)


def windows(positions, segment_ids, m: int) -> Windows:
    """Complete windows of m tokens aligned to document positions: a window starts at a token
    whose position is a multiple of m and holds the next m tokens of its document."""
    B, T = positions.shape
    S = T // m
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if S == 0:
        z = jnp.zeros((B, 0), jnp.int32)
        return Windows(z, z.astype(bool), z, z, z.astype(bool))
    last = jnp.arange(T) + m - 1
    inside = last < T
    lc = jnp.minimum(last, T - 1)
    end_seg = jnp.take_along_axis(seg, jnp.broadcast_to(lc, (B, T)), axis=1)
    end_pos = jnp.take_along_axis(positions, jnp.broadcast_to(lc, (B, T)), axis=1)
    starts = (
        (positions % m == 0)
        & inside
        & (end_seg == seg)
        & (end_pos == positions + m - 1)
        & (seg > 0)
    )
    idx = jax.vmap(lambda s: jnp.nonzero(s, size=S, fill_value=0)[0])(starts).astype(jnp.int32)
    ok = jnp.arange(S)[None] < starts.sum(axis=1, keepdims=True)
    pos = jnp.take_along_axis(positions, idx, axis=1)
    wseg = jnp.take_along_axis(seg, idx, axis=1)
    prev = jnp.maximum(idx - m, 0)  # the window before: same document, m positions earlier
    prev_ok = (
        ok
        & (idx >= m)
        & (jnp.take_along_axis(seg, prev, axis=1) == wseg)
        & (jnp.take_along_axis(positions, prev, axis=1) == pos - m)
    )
    return Windows(idx, ok, pos, wseg, prev_ok)


def visible(w: Windows, positions, segment_ids, m: int):
    """bool [B, T, S]: query t may read entry s (its document's, window wholly at or before t)."""
    seg = jnp.ones_like(positions) if segment_ids is None else segment_ids
    return (
        w.ok[:, None, :]
        & (w.seg[:, None, :] == seg[:, :, None])
        & (w.pos[:, None, :] + m <= positions[:, :, None] + 1)
    )


class Compressor(nnx.Module):
    """Softmax-gated compression of windows of m tokens into entries of `dim` (one series per
    token, or two with overlap: Ca into the next window's entry, Cb into its own)."""

    def __init__(self, cfg: ModelConfig, dim: int, m: int, overlap: bool, *, rngs: nnx.Rngs):
        D, c = cfg.hidden_size, 2 if overlap else 1
        self.m, self.overlap, self.dim = m, overlap, dim
        self.wkv = param(rngs, (D, c, dim), ("embed", None, "head_dim"), cfg)
        self.wgate = param(rngs, (D, c, dim), ("embed", None, "head_dim"), cfg)
        # [m, c * dim] as Hugging Face stores it
        self.position_bias = nnx.Param(
            jnp.zeros((m, c * dim), jnp.float32), logical_axes=(None,) * 2
        )
        self.norm = RMSNorm(dim, cfg, rngs=rngs)

    def raw(self, x, cd):
        """Each token's two projections (values, gate logits) [B, T, c * dim] float32: what the
        generator caches."""
        B, T, _ = x.shape
        kv = project(self, "wkv", "BTD,DCH->BTCH", x, cd)
        gate = project(self, "wgate", "BTD,DCH->BTCH", x, cd)
        return kv.reshape(B, T, -1), gate.reshape(B, T, -1)

    def compress(self, kv, gate, w: Windows, cos_sin_at):
        """The raw projections of a row's tokens [B, S, c * dim] -> its windows' entries
        [B, n_windows, dim] float32 (normed, rotated at each window's first position)."""
        m, c = self.m, 2 if self.overlap else 1
        kv = kv.astype(jnp.float32).reshape(kv.shape[:2] + (c, self.dim))
        gate = gate.astype(jnp.float32).reshape(gate.shape[:2] + (c, self.dim))
        rows = w.start[:, :, None] + jnp.arange(m)  # [B, W, m]
        take = jax.vmap(lambda a, r: a[r])  # a [S, ...], r [W, m] -> [W, m, ...]
        bias = self.position_bias[...].reshape(m, c, self.dim)
        if self.overlap:
            prev = jnp.maximum(rows - m, 0)
            ca, ga = take(kv[:, :, 0], prev), take(gate[:, :, 0], prev) + bias[:, 0]
            cb, gb = take(kv[:, :, 1], rows), take(gate[:, :, 1], rows) + bias[:, 1]
            ga = jnp.where(w.prev_ok[:, :, None, None], ga, -jnp.inf)
            vals, gates = jnp.concatenate([ca, cb], axis=2), jnp.concatenate([ga, gb], axis=2)
        else:
            vals, gates = take(kv[:, :, 0], rows), take(gate[:, :, 0], rows) + bias[:, 0]
        probs = jax.nn.softmax(gates, axis=2)
        entry = self.norm(jnp.sum(vals * probs, axis=2))  # [B, W, dim] float32
        cos, sin = cos_sin_at(w.pos)
        return rope_tail(entry, cos, sin)


class V4Indexer(nnx.Module):
    """CSA's lightning indexer: its own overlapping compressor at index_head_dim, queries from the
    query latent (index_n_heads heads, rotated with the compressed rope), per-head weights from
    x; I[t, s] = sum_h w[t, h] relu(q[t, h] . k[s]) / sqrt(Di) with w = x W / sqrt(Hi)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, Rq, Hi, Di = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
        self.compressor = Compressor(cfg, Di, cfg.compress_rate_csa, True, rngs=rngs)
        self.wq_b = param(rngs, (Rq, Hi, Di), ("q_lora", None, None), cfg)
        self.weights_proj = param(rngs, (D, Hi), ("embed", None), cfg)

    def queries(self, x, q_lat, comp_cos, comp_sin, cd):
        """The queries' index heads (float32 [B, T, Hi, Di], rotated, scaled by 1 / sqrt(Di)) and
        head weights ([B, T, Hi], scaled by 1 / sqrt(Hi)); x and q_lat are detached by the
        caller."""
        Hi, Di = self.wq_b.shape[-2:]
        q = project(self, "wq_b", "BTR,RHI->BTHI", q_lat, cd)
        q = rope_tail(q, comp_cos[:, :, None], comp_sin[:, :, None]) * Di**-0.5
        return q, project(self, "weights_proj", "BTD,DH->BTH", x, cd) * Hi**-0.5


def index_scores(q, weights, keys):
    """I[t, s] = sum_h w[t, h] relu(q[t, h] . k[s]): float32 [B, T, W] (V4Indexer.queries)."""
    s = jax.nn.relu(jnp.einsum("BTHI,BSI->BTHS", q, keys.astype(jnp.float32)))
    return jnp.einsum("BTHS,BTH->BTS", s, weights)


def top_k_mask(scores, allowed, k: int):
    """bool [B, T, S]: the top-k allowed entries of each query by score (all when fewer); ties go
    to the earlier entry."""
    S = scores.shape[-1]
    if k >= S:
        return allowed
    masked = jnp.where(allowed, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)  # [B, T, k]
    chosen = jnp.zeros(allowed.shape, bool)
    chosen = jax.vmap(jax.vmap(lambda c, i: c.at[i].set(True)))(chosen, idx)
    return chosen & allowed


class Keys(NamedTuple):
    """What a V4 layer attends over: every key position's rotated key/value, the raw projections
    of its compressors (V4Attention.RAW names) and where each sits."""

    kv: jax.Array  # [B, S, H]
    raw: dict  # name -> [B, S, .]
    pos: jax.Array  # int [B, S]
    seg: jax.Array  # int [B, S]; 0: no token (padding, or not written yet)


class V4Attention(nnx.Module):
    """DeepSeek-V4 attention of one layer type (the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_type: str,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        D, N, H, Rq = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank
        G, Ro = cfg.o_groups, cfg.o_lora_rank
        self.cfg, self.layer_type, self.layout = cfg, layer_type, layout
        self.execution = execution
        self.fp8 = execution.fp8
        self.wq_a = param(rngs, (D, Rq), ("embed", "q_lora"), cfg)
        self.q_norm = RMSNorm(Rq, cfg, rngs=rngs)
        self.wq_b = param(rngs, (Rq, N, H), ("q_lora", "heads", "head_dim"), cfg)
        self.wkv = param(rngs, (D, H), ("embed", "head_dim"), cfg)
        self.kv_norm = RMSNorm(H, cfg, rngs=rngs)
        # [N / G, H, G, Ro]: group g maps its heads' outputs to Ro
        self.wo_a = param(rngs, (N // G, H, G, Ro), (None, "head_dim", "heads", None), cfg)
        self.wo_b = param(rngs, (G, Ro, D), ("heads", None, "embed"), cfg)
        self.sinks = nnx.Param(jnp.zeros((N,), jnp.float32), logical_axes=("heads",))
        self.m = cfg.compress_rate(layer_type)
        if self.m:
            self.compressor = Compressor(cfg, H, self.m, layer_type == CSA, rngs=rngs)
        if layer_type == CSA:
            self.indexer = V4Indexer(cfg, rngs=rngs)

    def rope(self, ctx: Context):
        if self.layer_type == "sliding_attention":
            return ctx.main_cos, ctx.main_sin
        return ctx.comp_cos, ctx.comp_sin

    def project(self, x, ctx: Context, rng=None):
        """x [B, T, D] -> (q [B, T, N, H] rotated, q_lat [B, T, Rq], this block's Keys entries:
        kv [B, T, H] rotated and the raw compressor projections)."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        x = x.astype(cd)
        rows, heads = ("batch", "sequence", None), ("batch", "sequence", "heads", None)
        cos, sin = self.rope(ctx)
        q_lat = project(self, "wq_a", "BTD,DR->BTR", x, cd, rng)
        q_lat = sharding.constrain(self.q_norm(q_lat).astype(cd), self.layout, rows)
        q = project(self, "wq_b", "BTR,RNH->BTNH", q_lat, cd, rng)
        q = unit_rms(q, cfg.rms_norm_eps).astype(cd)
        q = sharding.constrain(rope_tail(q, cos[:, :, None], sin[:, :, None]), self.layout, heads)
        kv = self.kv_norm(project(self, "wkv", "BTD,DH->BTH", x, cd, rng))
        kv = rope_tail(kv, cos, sin).astype(cd)  # [B, T, H]
        raw = {}
        if self.m:
            raw["ckv"], raw["cgate"] = self.compressor.raw(x, cd)
        if self.layer_type == CSA:  # (the indexer's inputs are detached)
            raw["ikv"], raw["igate"] = self.indexer.compressor.raw(jax.lax.stop_gradient(x), cd)
        return q, q_lat, kv, raw

    def attend(self, x, q, q_lat, ctx: Context, q_seg, keys: Keys, rng=None, blocked=False):
        """The queries (x [B, T, D], q, q_lat from `project`, at ctx.positions in documents q_seg
        [B, T]) over `keys` -> (y [B, T, D] float32, aux). blocked: the queries are the keys (a
        training batch): run `blocked_attention` instead of the reference form."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        B, T, _ = x.shape
        cos, sin = self.rope(ctx)
        comp = None
        if self.m:
            w = windows(keys.pos, keys.seg, self.m)
            inv = rope_tables(cfg)[1]

            def at(p):
                return _cos_sin(p, inv)

            entries = self.compressor.compress(keys.raw["ckv"], keys.raw["cgate"], w, at)
            index = None
            if self.layer_type == CSA:
                index_keys = self.indexer.compressor.compress(
                    keys.raw["ikv"], keys.raw["igate"], w, at
                )
                iq, iw = self.indexer.queries(
                    jax.lax.stop_gradient(x),
                    jax.lax.stop_gradient(q_lat),
                    ctx.comp_cos,
                    ctx.comp_sin,
                    cd,
                )
                index = (iq, iw, index_keys)
            comp = (entries.astype(cd), w, index)
        sinks = self.sinks[...].astype(jnp.float32)
        if blocked:
            out, kl = blocked_attention(
                q,
                keys.kv,
                ctx.positions,
                q_seg,
                comp,
                sinks,
                cfg,
                self.m,
                self.execution.attention_block or 128,
            )
        else:
            out, kl = reference_attention(q, ctx.positions, q_seg, keys, comp, sinks, cfg, self.m)
        aux = {"indexer_kl": kl} if self.layer_type == CSA else {}
        out = rope_tail(out, cos[:, :, None], -sin[:, :, None]).astype(cd)
        heads = ("batch", "sequence", "heads", None)
        out = checkpoint_name(sharding.constrain(out, self.layout, heads), "attn_out")
        G = cfg.o_groups
        out = out.reshape(B, T, G, cfg.num_heads // G, cfg.head_dim)
        z = project(self, "wo_a", "BTGNH,NHGR->BTGR", out, cd, rng)
        y = project(self, "wo_b", "BTGR,GRD->BTD", z.astype(cd), cd, rng)
        return sharding.constrain(y, self.layout, ("batch", "sequence", None)), aux

    def __call__(self, x, ctx: Context, segment_ids, rng=None):
        """x [B, T, D] (a training batch: keys are its own tokens) -> (y [B, T, D] float32, aux:
        {'indexer_kl'} on CSA layers). The blocked form unless execution.attention_impl is
        'reference'."""
        B, T, _ = x.shape
        q, q_lat, kv, raw = self.project(x, ctx, rng)
        seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
        # (padding, segment 0, is never a key; its own rows are ignored by every loss)
        keys = Keys(kv, raw, ctx.positions, seg)
        blocked = self.execution.attention_impl != "reference"
        return self.attend(x, q, q_lat, ctx, seg, keys, rng, blocked=blocked)


def _softmax_with_sink(logits, sinks):
    """Softmax over the last axis of logits [B, N, T, S] (-inf where masked) with one more logit
    per head, the sink, whose probability is dropped: probs [B, N, T, S] float32."""
    sink = sinks[None, :, None]  # [1, N, 1]
    top = jnp.maximum(logits.max(axis=-1), sink)
    p = jnp.exp(logits - top[..., None])
    return p / (p.sum(axis=-1) + jnp.exp(sink - top))[..., None]


def reference_attention(q, q_pos, q_seg, keys: Keys, comp, sinks, cfg: ModelConfig, m: int):
    """Every query over every key position and entry, the [T, S + W] scores and mask
    materialized: the oracle (and the generator's form, whose queries are few). q [B, T, N, H];
    comp: (entries [B, W, H], Windows, index (q, w, keys) or None) or None. Returns (out [B, T,
    N, H] float32 before the output rotation, the indexer KL summed over query tokens)."""
    cd = q.dtype
    same = keys.seg[:, None, :] == q_seg[:, :, None]  # [B, T, S]
    dist = q_pos[:, :, None] - keys.pos[:, None, :]
    mask = same & (keys.seg[:, None, :] > 0) & (dist >= 0) & (dist < cfg.sliding_window)
    kk, kl = keys.kv, jnp.zeros((), jnp.float32)
    if comp is not None:
        entries, w, index = comp
        chosen = visible(w, q_pos, q_seg, m)  # [B, T, W]
        if index is not None:
            scores = index_scores(*index)
            chosen = top_k_mask(scores, chosen, cfg.index_topk)
        kk = jnp.concatenate([kk, entries], axis=1)  # [B, S + W, H]
        mask = jnp.concatenate([mask, chosen], axis=2)
    S = keys.kv.shape[1]
    logits = jnp.einsum("BTNH,BSH->BNTS", q, kk, preferred_element_type=jnp.float32)
    probs = _softmax_with_sink(
        jnp.where(mask[:, None], logits * cfg.softmax_scale, -jnp.inf), sinks
    )
    out = jnp.einsum("BNTS,BSH->BTNH", probs.astype(cd), kk, preferred_element_type=jnp.float32)
    if comp is not None and comp[2] is not None:
        target = probs[..., S:].sum(axis=1)  # [B, T, W] over the chosen entries
        target = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-30)
        kl = dsa.indexer_kl(scores, jax.lax.stop_gradient(target), chosen)
    return out, kl


def blocked_attention(q, kv, pos, seg, comp, sinks, cfg: ModelConfig, m: int, block: int):
    """reference_attention for a training batch (the queries are the keys), one block of queries
    at a time under a rematerialized scan: each block reads only its sliding-window rows (its own
    and the sliding_window - 1 before it), on HCA every entry, on CSA the index_topk entries the
    indexer picks, gathered. Nothing of size [T, T] is ever built: per block the scores are
    [bq, bq + W - 1 + entries read] per head, and the indexer's ReLU scores [bq, Hi, entries]. The
    same function as the reference (tested), at O(T (W + entries read)) attention cost."""
    B, T, N, H = q.shape
    W = cfg.sliding_window
    if comp is not None and comp[0].shape[1] == 0:  # a row shorter than one window: no entries
        comp = None
    bq = min(block, T)
    pad = -T % bq  # queries (and keys) past T: segment 0, they see nothing and are dropped
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv = jnp.pad(kv, ((0, 0), (0, pad), (0, 0)))
        pos, seg = jnp.pad(pos, ((0, 0), (0, pad))), jnp.pad(seg, ((0, 0), (0, pad)))
        if comp is not None and comp[2] is not None:
            iq, iw, ik = comp[2]
            iq = jnp.pad(iq, ((0, 0), (0, pad), (0, 0), (0, 0)))
            comp = (comp[0], comp[1], (iq, jnp.pad(iw, ((0, 0), (0, pad), (0, 0))), ik))
    P = W - 1  # rows before a block that its window reaches
    kvp = jnp.pad(kv, ((0, 0), (P, 0), (0, 0)))
    posp = jnp.pad(pos, ((0, 0), (P, 0)))
    segp = jnp.pad(seg, ((0, 0), (P, 0)))  # (segment 0: never a key)
    scale = cfg.softmax_scale

    def body(kl, s0):
        def rows(a, n, start=s0):
            return jax.lax.dynamic_slice_in_dim(a, start, n, axis=1)

        qb, pq, sq = rows(q, bq), rows(pos, bq), rows(seg, bq)
        kb, pk, sk = rows(kvp, bq + P), rows(posp, bq + P), rows(segp, bq + P)
        dist = pq[:, :, None] - pk[:, None, :]
        mask = (sk[:, None, :] == sq[:, :, None]) & (sk[:, None, :] > 0) & (dist >= 0) & (dist < W)
        ls = jnp.einsum("BTNH,BSH->BNTS", qb, kb, preferred_element_type=jnp.float32)
        parts = [(jnp.where(mask[:, None], ls * scale, -jnp.inf), kb, "BNTS,BSH->BTNH")]
        if comp is not None:
            entries, w, index = comp
            vis = (
                w.ok[:, None, :]
                & (w.seg[:, None, :] == sq[:, :, None])
                & (w.pos[:, None, :] + m <= pq[:, :, None] + 1)
            )  # [B, bq, W]
            if index is None:  # HCA: every entry
                lc = jnp.einsum("BTNH,BSH->BNTS", qb, entries, preferred_element_type=jnp.float32)
                parts.append(
                    (jnp.where(vis[:, None], lc * scale, -jnp.inf), entries, "BNTS,BSH->BTNH")
                )
            else:  # CSA: the top-k entries, gathered
                iq, iw, ik = index
                scores = index_scores(rows(iq, bq), rows(iw, bq), ik)  # [B, bq, W]
                k = min(cfg.index_topk, scores.shape[-1])
                _, idx = jax.lax.top_k(jnp.where(vis, scores, -jnp.inf), k)  # [B, bq, k]
                valid = jnp.take_along_axis(vis, idx, axis=-1)
                picked = jax.vmap(lambda e, i: e[i])(entries, idx)  # [B, bq, k, H]
                lc = jnp.einsum("BTNH,BTKH->BNTK", qb, picked, preferred_element_type=jnp.float32)
                parts.append(
                    (jnp.where(valid[:, None], lc * scale, -jnp.inf), picked, "BNTK,BTKH->BTNH")
                )
        sizes = [p[0].shape[-1] for p in parts]
        probs = _softmax_with_sink(jnp.concatenate([p[0] for p in parts], axis=-1), sinks)
        out, at = 0.0, 0
        for (_, vals, spec), n in zip(parts, sizes):
            pr = probs[..., at : at + n]
            out = out + jnp.einsum(
                spec, pr.astype(qb.dtype), vals, preferred_element_type=jnp.float32
            )
            at += n
        if comp is not None and comp[2] is not None:
            target = pr.sum(axis=1)  # [B, bq, k]: the chosen entries' share, over heads
            target = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-30)
            score_k = jnp.take_along_axis(scores, idx, axis=-1)
            kl = kl + dsa.indexer_kl(score_k, jax.lax.stop_gradient(target), valid)
        return kl, out

    body = jax.checkpoint(body, prevent_cse=False)
    kl, out = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(0, T + pad, bq))
    return out.swapaxes(0, 1).reshape(B, T + pad, N, H)[:, :T], kl


# ------------------------------------------------------------------------------- hyper-connections


class HyperConnection(nnx.Module):
    """mHC weights of one sublayer from the streams: fn [n, D, (2 + n) n], base, scale [3]
    (float32, as V4 keeps them)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, D = cfg.hc_mult, cfg.hidden_size
        k = (2 + n) * n
        self.n, self.iters, self.eps, self.norm_eps = (
            n,
            cfg.hc_sinkhorn_iters,
            cfg.hc_eps,
            cfg.rms_norm_eps,
        )
        self.fn = nnx.Param(
            cfg.initializer_range * jax.random.normal(rngs.params(), (n, D, k), jnp.float32),
            logical_axes=(None, "embed", None),
        )
        self.base = nnx.Param(jnp.zeros((k,), jnp.float32), logical_axes=(None,))
        self.scale = nnx.Param(jnp.ones((3,), jnp.float32), logical_axes=(None,))

    def __call__(self, streams):
        """streams [B, T, n, D] -> (post [B, T, n], comb [B, T, n, n] float32, collapsed [B, T, D]
        in the streams' dtype)."""
        n, eps = self.n, self.eps
        B, T = streams.shape[:2]
        flat = unit_rms(streams.reshape(B, T, -1), self.norm_eps).reshape(streams.shape)
        mix = jnp.einsum("BTnD,nDk->BTk", flat, self.fn[...])
        base, scale = self.base[...], self.scale[...]
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
        post = 2 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
        comb = jax.nn.softmax(comb.reshape(B, T, n, n), axis=-1) + eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        for _ in range(self.iters - 1):  # Sinkhorn-Knopp: rows, then columns
            comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        collapsed = jnp.einsum("BTn,BTnD->BTD", pre, streams.astype(jnp.float32))
        return post, comb, collapsed.astype(streams.dtype)


def mix(post, out, comb, streams):
    """New streams post * out + comb^T streams: [B, T, n, D] float32."""
    return post[..., None] * out[:, :, None, :].astype(jnp.float32) + jnp.einsum(
        "BTjk,BTjD->BTkD", comb, streams.astype(jnp.float32)
    )


class HyperHead(nnx.Module):
    """The final collapse of the streams: fn [n, D, n], base [n], scale [1] (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, D = cfg.hc_mult, cfg.hidden_size
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nnx.Param(
            cfg.initializer_range * jax.random.normal(rngs.params(), (n, D, n), jnp.float32),
            logical_axes=(None, "embed", None),
        )
        self.base = nnx.Param(jnp.zeros((n,), jnp.float32), logical_axes=(None,))
        self.scale = nnx.Param(jnp.ones((1,), jnp.float32), logical_axes=(None,))

    def __call__(self, streams):
        B, T = streams.shape[:2]
        flat = unit_rms(streams.reshape(B, T, -1), self.norm_eps).reshape(streams.shape)
        mixes = jnp.einsum("BTnD,nDk->BTk", flat, self.fn[...])
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.eps
        return jnp.einsum("BTn,BTnD->BTD", pre, streams.astype(jnp.float32)).astype(streams.dtype)


# ------------------------------------------------------------------------------- the block


class V4Block(nnx.Module):
    """One V4 layer: hyper-connected attention, then hyper-connected MoE (hash-routed or not)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_type: str,
        hashed: bool,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        self.kind = "moe"
        self.layout = layout
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = V4Attention(cfg, layer_type, rngs=rngs, layout=layout, execution=execution)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs, layout=layout, execution=execution, hashed=hashed)
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(
        self, x, ctx: Context, _sin, segment_ids, token_mask, rng=None, route=None, replay=False
    ):
        """x [B, T, n, D] streams -> (streams, aux). (The signature is Block's: ctx in cos's
        place.)"""
        cd = self.compute_dtype
        attn_rng = None if rng is None else jax.random.fold_in(rng, 1)
        with jax.named_scope("attention"):
            post, comb, h = self.attn_hc(x)
            a, attn_aux = self.attn(self.attn_norm(h).astype(cd), ctx, segment_ids, attn_rng)
            x = mix(post, a, comb, x).astype(cd)
        with jax.named_scope("ffn"):
            post, comb, h = self.ffn_hc(x)
            f, aux = self.ffn(
                self.ffn_norm(h).astype(cd),
                token_mask,
                rng,
                route=route,
                replay=replay,
                ids=ctx.ids,
            )
            x = mix(post, f, comb, x).astype(cd)
        return sharding.constrain(x, self.layout, STREAMS), {**aux, **attn_aux}


Kind = tuple  # (attention layer type, hash-routed)


def groups(cfg: ModelConfig, max_period: int = 4) -> list[tuple[tuple[Kind, ...], int]]:
    """The V4 layers as segments of a repeating pattern: [(kinds of one group, repeats)], in
    order. Each segment is scanned over its repeats (one compiled body however deep the model),
    so the period is chosen greedily to cover the most layers (the shortest on a tie): V4-Flash's
    43 layers are [(sliding, hash)] x 2, [(CSA, hash)] x 1, [(HCA), (CSA)] x 20."""
    kinds = [(t, i < cfg.num_hash_layers) for i, t in enumerate(cfg.v4_layer_types)]
    out, i = [], 0
    while i < len(kinds):
        best = (1, 1)  # (period, repeats)
        for p in range(1, max_period + 1):
            unit, r = kinds[i : i + p], 0
            if len(unit) < p:
                break
            while kinds[i + r * p : i + (r + 1) * p] == unit:
                r += 1
            if (p == 1 or r >= 2) and p * r > best[0] * best[1]:
                best = (p, r)
        p, r = best
        out.append((tuple(kinds[i : i + p]), r))
        i += p * r
    return out


class V4Group(nnx.Module):
    """One repeat of a segment's pattern: consecutive V4 layers run in order (transformer.py
    stacks the groups and scans them). aux: each MoE statistic stacked over the group's layers
    [p, ...], the indexer KL over its CSA layers [c]."""

    def __init__(
        self,
        cfg: ModelConfig,
        kinds: tuple[Kind, ...],
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        self.kind = "moe"
        self.blocks = nnx.List(
            [V4Block(cfg, t, h, rngs=rngs, layout=layout, execution=execution) for t, h in kinds]
        )

    def __call__(
        self, x, ctx: Context, _sin, segment_ids, token_mask, rng=None, route=None, replay=False
    ):
        """Block.__call__'s signature; route: [p, B, T, K] (one per layer of the group)."""
        auxs = []
        for j, block in enumerate(self.blocks):
            r = None if rng is None else jax.random.fold_in(rng, j)
            x, aux = block(
                x,
                ctx,
                None,
                segment_ids,
                token_mask,
                r,
                None if route is None else route[j],
                replay,
            )
            auxs.append(aux)
        kl = [a.pop("indexer_kl") for a in auxs if "indexer_kl" in a]
        out = jax.tree.map(lambda *a: jnp.stack(a), *auxs)
        if kl:
            out["indexer_kl"] = jnp.stack(kl)
        return x, out
