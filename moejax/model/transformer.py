"""The decoder: embeddings, stacked blocks run with a scan, final norm, LM head, and MTP.

Layers are grouped into segments of consecutive layers of one kind ('dense' or 'moe'); each
segment's parameters are stacked on a leading layer axis and applied with `jax.lax.scan`, so
compile time does not grow with depth. DeepSeek-V3 is two segments: first_k_dense_replace dense
layers, then the MoE layers.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import config as config_lib
from moejax import sharding
from moejax.config import ExecutionConfig, ModelConfig
from moejax.kernels.attention import context
from moejax.model import moe as moe_lib
from moejax.model import v4 as v4_lib
from moejax.model.attention import GQA, MLA
from moejax.model.layers import MLP, RMSNorm, dtype_of, param, rope_cos_sin
from moejax.model.moe import MoE
from moejax.model.router import RouterBias

# What each of config.REMAT_POLICIES saves ('none' does not rematerialize at all).
REMAT_POLICIES = {
    "full": None,  # save nothing
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}
assert set(REMAT_POLICIES) | {"none"} == set(config_lib.REMAT_POLICIES), "one list of policies"


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + ffn(norm(.)); ffn dense or MoE."""

    def __init__(
        self,
        cfg: ModelConfig,
        kind: str,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        self.kind = kind
        self.layout = layout  # sharding.Layout: the residual stream is pinned to it (None: no mesh)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        attention = MLA if cfg.attention_type == "mla" else GQA
        self.attn = attention(cfg, rngs=rngs, layout=layout, execution=execution)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.ffn = (
            MoE(cfg, rngs=rngs, layout=layout, execution=execution)
            if kind == "moe"
            else MLP(cfg, cfg.intermediate_size, rngs=rngs, layout=layout, fp8=execution.fp8)
        )
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(
        self, x, cos, sin, segment_ids, token_mask, rng=None, route=None, replay: bool = False
    ):
        """x [B, T, D] -> (x, aux); aux is {} for dense layers. route/replay: MoE.__call__'s
        (routing replay)."""
        cd = self.compute_dtype
        # the layer's rng: router jitter (MoE) as before; folded for the LoRA adapters' dropout
        attn_rng = None if rng is None else jax.random.fold_in(rng, 1)
        with jax.named_scope("attention"):
            h, attn_aux = self.attn(
                self.attn_norm(x).astype(cd), cos, sin, segment_ids, rng=attn_rng, return_aux=True
            )
        x = (x.astype(jnp.float32) + h).astype(cd)
        with jax.named_scope("ffn"):
            hn = self.ffn_norm(x).astype(cd)
            if self.kind == "moe":
                h, aux = self.ffn(hn, token_mask, rng, route=route, replay=replay)
            else:
                h, aux = self.ffn(hn, None if rng is None else jax.random.fold_in(rng, 2)), {}
        return sharding.constrain((x.astype(jnp.float32) + h).astype(cd), self.layout, RESIDUAL), {
            **aux,
            **attn_aux,
        }


RESIDUAL = ("batch", "sequence", None)  # logical axes of the residual stream [B, T, D]


def make_stack(
    cfg: ModelConfig,
    kind: str,
    n: int,
    rngs: nnx.Rngs,
    layout=None,
    execution: ExecutionConfig = ExecutionConfig(),
    v4_kind: tuple | None = None,
) -> Block:
    """n Blocks with parameters stacked on a leading layer axis. v4_kind: the kinds of one
    DeepSeek-V4 group (v4.groups): n // len(v4_kind) v4.V4Group are stacked instead."""
    if v4_kind is not None:
        n //= len(v4_kind)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n)
    def create(r):
        if v4_kind is not None:
            return v4_lib.V4Group(cfg, v4_kind, rngs=r, layout=layout, execution=execution)
        return Block(cfg, kind, rngs=r, layout=layout, execution=execution)

    return create(rngs)


def segments_of(cfg: ModelConfig) -> list[tuple[str, int]]:
    """Runs of consecutive layers of one kind, e.g. [('dense', 1), ('moe', 26)]. DeepSeek-V4's
    layers are all 'moe'; its segments repeat a pattern of attention types and routing
    (v4.groups), each ('moe', its layers)."""
    if cfg.attention_type == "v4":
        return [("moe", len(kinds) * r) for kinds, r in v4_lib.groups(cfg)]
    return [(k, len(list(g))) for k, g in itertools.groupby(cfg.layer_kinds())]


def stack_depths(cfg: ModelConfig) -> list[tuple[str, int]]:
    """segments_of with each segment's stacked depth: its layers, or for DeepSeek-V4 its groups
    (what a pipeline splits over 'stage')."""
    return [(k, n // len(v) if v else n) for (k, n), v in zip(segments_of(cfg), v4_kinds(cfg))]


def v4_kinds(cfg: ModelConfig) -> list:
    """Each segment's v4_kind for make_stack: the (attention type, hash-routed) of each layer of
    one DeepSeek-V4 group (None for every segment of other models)."""
    if cfg.attention_type == "v4":
        return [kinds for kinds, _ in v4_lib.groups(cfg)]
    return [None] * len(segments_of(cfg))


def run_stack(
    stack: Block,
    n: int,
    x,
    cos,
    sin,
    segment_ids,
    token_mask,
    rng,
    cfg: ModelConfig,
    ex: ExecutionConfig,
    mesh=None,
    routes=None,
    replay: bool = False,
):
    """Applies n stacked blocks in order; returns x and the per-layer aux stacked on axis 0.
    On a mesh with a 'stage' axis the layers run as a pipeline. routes: int [n, B, T, K] recorded
    expert choices of these (MoE) layers, compared with the router's and, with replay, used
    (MoE.__call__)."""
    stages = mesh.shape.get("stage", 1) if mesh is not None else 1
    if (
        stages > 1 and n % stages == 0
    ):  # (an indivisible stack is replicated over 'stage': sharding.stage_fallback)
        if routes is not None:
            raise ValueError(
                "routing replay is not supported with a pipeline ('stage' mesh axis > 1)"
            )
        return run_stack_pipelined(
            stack, n, x, cos, sin, segment_ids, token_mask, rng, cfg, ex, mesh
        )
    return _scan_stack(stack, n, x, cos, sin, segment_ids, token_mask, rng, ex, routes, replay)


def _scan_stack(
    stack: Block,
    n: int,
    x,
    cos,
    sin,
    segment_ids,
    token_mask,
    rng,
    ex: ExecutionConfig,
    routes=None,
    replay: bool = False,
):
    graphdef, state = nnx.split(stack)
    rngs = None if rng is None else jax.random.split(rng, n)

    def body(h, xs):
        layer_state, layer_rng, layer_route = xs
        block = nnx.merge(graphdef, layer_state)
        return block(h, cos, sin, segment_ids, token_mask, layer_rng, layer_route, replay)

    if ex.remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[ex.remat_policy], prevent_cse=False)
    if ex.scan_layers:
        return jax.lax.scan(body, x, (state, rngs, routes))
    auxs = []
    for i in range(n):
        x, aux = body(x, jax.tree.map(lambda a, i=i: a[i], (state, rngs, routes)))
        auxs.append(aux)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxs)


def run_stack_pipelined(
    stack: Block,
    n: int,
    x,
    cos,
    sin,
    segment_ids,
    token_mask,
    rng,
    cfg: ModelConfig,
    ex: ExecutionConfig,
    mesh,
):
    """GPipe-style pipeline over the mesh's 'stage' axis.

    The stacked layers are already split over 'stage' (rule layers -> stage): stage s holds layers
    [s*n/S, (s+1)*n/S). The batch is cut into M microbatches (execution.pipeline_microbatches,
    default S); in step t = 0 .. M+S-2 stage s runs its layers on microbatch t - s (idle outside
    [0, M)), then passes its activations to stage s+1 with a ppermute. The last stage's outputs are
    broadcast back to every stage (psum), and each stage's per-layer aux, summed over microbatches,
    is gathered into [n, ...]. The MoE statistics are sums (moe.SUM_STATS), exact over microbatches;
    the Switch loss, a per-batch mean, is averaged over them. Inside a stage the expert-parallel
    exchange is a shard_map nested over the remaining mesh axes (moe_ep.experts_ep).
    """
    S = mesh.shape["stage"]
    M = ex.pipeline_microbatches or S
    B = x.shape[0]
    if B % M:
        raise ValueError(
            f"pipeline: the batch of {B} rows does not split into pipeline_microbatches={M}"
        )
    graphdef, state = nnx.split(stack)
    rngs = None if rng is None else jax.random.split(rng, n)
    per_mb = (x, cos, sin, segment_ids, token_mask)
    # microbatch j = rows j, j + M, ...: each keeps the batch sharding of its rows (no resharding)
    per_mb = jax.tree.map(
        lambda a: a.reshape((B // M, M) + a.shape[1:]).swapaxes(0, 1), per_mb
    )  # [M, B / M, ...]
    out_dtype = x.dtype

    def stage(state, rngs, per_mb):
        xs, cos, sin, segment_ids, token_mask = per_mb
        s = jax.lax.axis_index("stage")
        local = n // S

        def run_layers(h, i):
            args = jax.tree.map(lambda a: a[i], (cos, sin, segment_ids, token_mask))
            sub = nnx.merge(graphdef, state)
            if rngs is None:
                return _scan_stack(sub, local, h, *args, None, ex)
            return _scan_stack_rngs(sub, local, h, *args, rngs, ex)

        aux_shape = jax.eval_shape(run_layers, xs[0], 0)[1]
        aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
        init = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs), aux0)

        def step(t, carry):
            buf, outs, aux_acc = carry
            i = t - s
            valid = (i >= 0) & (i < M)
            ic = jnp.clip(i, 0, M - 1)
            h_in = jnp.where(s == 0, xs[jnp.clip(t, 0, M - 1)], buf)
            h, aux = run_layers(h_in, ic)
            aux_acc = jax.tree.map(
                lambda acc, a: acc + jnp.where(valid, a, 0).astype(acc.dtype), aux_acc, aux
            )
            outs = jnp.where(
                (s == S - 1) & valid, jax.lax.dynamic_update_index_in_dim(outs, h, ic, 0), outs
            )
            buf = jax.lax.ppermute(h, "stage", [(j, (j + 1) % S) for j in range(S)])
            return buf, outs, aux_acc

        _, outs, aux_acc = jax.lax.fori_loop(0, M + S - 1, step, init)
        outs = jax.lax.psum(jnp.where(s == S - 1, outs, 0).astype(jnp.float32), "stage").astype(
            out_dtype
        )
        aux_acc = jax.tree.map(lambda a: jax.lax.all_gather(a, "stage", tiled=True), aux_acc)
        return outs, aux_acc

    stage_spec = jax.tree.map(lambda _: P("stage"), state)
    rng_spec = None if rngs is None else P("stage")
    outs, aux = jax.shard_map(
        stage,
        mesh=mesh,
        in_specs=(stage_spec, rng_spec, P()),
        out_specs=(P(), P()),
        axis_names={"stage"},
        check_vma=False,
    )(state, rngs, per_mb)
    kl = aux.get("indexer_kl")  # sparse attention's indexer KL: a sum over query tokens
    if "expert_counts" in aux:
        aux = {k: aux[k] for k in moe_lib.SUM_STATS} | {k: aux[k] / M for k in moe_lib.MEAN_STATS}
        aux = moe_lib.with_means(aux, cfg)
    else:
        aux = {}
    if kl is not None:
        aux["indexer_kl"] = kl
    return outs.swapaxes(0, 1).reshape((B,) + outs.shape[2:]), aux


def _scan_stack_rngs(stack, n, x, cos, sin, segment_ids, token_mask, rngs, ex: ExecutionConfig):
    """_scan_stack with one key per layer given (the pipeline splits the segment's keys by
    stage)."""
    graphdef, state = nnx.split(stack)

    def body(h, xs):
        layer_state, layer_rng = xs
        return nnx.merge(graphdef, layer_state)(h, cos, sin, segment_ids, token_mask, layer_rng)

    if ex.remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[ex.remat_policy], prevent_cse=False)
    return jax.lax.scan(body, x, (state, rngs))


class MTPModule(nnx.Module):
    """One multi-token-prediction depth (DeepSeek-V3): [enorm(emb(t_{i+k})); hnorm(h_i)] -> eh_proj
    -> one decoder block -> final norm; embedding and LM head are the main model's."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg, rngs=rngs)
        self.hnorm = RMSNorm(D, cfg, rngs=rngs)
        self.eh_proj = param(rngs, (2 * D, D), (None, "embed"), cfg)  # [2D, D]
        kind = "moe" if cfg.n_routed_experts else "dense"
        self.block = Block(cfg, kind, rngs=rngs, layout=layout, execution=execution)
        self.norm = RMSNorm(D, cfg, rngs=rngs)


class Transformer(nnx.Module):
    """DeepSeek-V3-style decoder (also Mixtral, Qwen3-MoE, DeepSeek-V2 by config).

    `logits, aux = model(input_ids)` gives float32 logits [B, T, V]. aux holds `aux_loss` (the
    weighted balance losses summed over MoE layers), per-MoE-layer stats stacked on a leading axis
    (`expert_counts` [L_moe, E], `drop_fraction` [L_moe], ...), `mtp_logits` [depth, B, T, V]
    when called with return_mtp=True (MTP depth k at position i predicts token i + k + 1), and
    with DeepSeek Sparse Attention `indexer_kl` [layers (+ MTP blocks run)]: each layer's indexer
    KL summed over its query tokens.

    `Transformer(cfg, rngs=..., mesh=mesh, rules=rules)` builds it for a device mesh (default: the
    mesh of an enclosing `jax.set_mesh`, else none): activations are pinned to the layout the rules
    give and the dropless MoE runs expert-parallel. The layout is fixed at construction (a static
    attribute), and so is `execution` (how it computes: dispatch, kernels, remat, scan; the
    parameters do not depend on it).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        mesh=None,
        rules=None,
        execution: ExecutionConfig | None = None,
    ):
        self.cfg = cfg
        self.execution = execution = execution or ExecutionConfig()
        # the layout is fixed here, from the arguments or an enclosing jax.set_mesh(...)
        layout = sharding.layout(mesh if mesh is not None else sharding.context_mesh(), rules)
        self.layout = layout
        if (cfg.index_topk or cfg.attention_type == "v4") and layout is not None:
            seq = sharding.sequence_axes(layout.mesh, layout.rule_table)
            if seq:
                what = (
                    "model.attention_type='v4' (DeepSeek-V4)"
                    if cfg.attention_type == "v4"
                    else "model.index_topk (DeepSeek Sparse Attention)"
                )
                raise config_lib.ConfigError(
                    f"{what} runs on data / fsdp / expert / tensor / stage meshes for now, not "
                    f"with a context axis ({'+'.join(seq)}): its keys (and V4's compressed "
                    "entries) are not gathered over the sequence"
                )
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = param(rngs, (V, D), ("vocab", "embed"), cfg)  # [V, D]
        self.segments = nnx.List(
            [
                make_stack(cfg, kind, n, rngs, layout, execution, v4_kind)
                for (kind, n), v4_kind in zip(segments_of(cfg), v4_kinds(cfg))
            ]
        )
        if cfg.attention_type == "v4":  # the final collapse of the hyper-connection streams
            self.hc_head = v4_lib.HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(D, cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (D, V), ("embed", "vocab"), cfg)  # [D, V]
        self.mtp = nnx.List(
            [
                MTPModule(cfg, rngs=rngs, layout=layout, execution=execution)
                for _ in range(cfg.mtp_depth)
            ]
        )

    @property
    def mesh(self):
        """The mesh the model was built for (None: one device)."""
        return None if self.layout is None else self.layout.mesh

    # ---------------------------------------------------------------------------------------

    def embed_tokens(self, ids):
        """int [B, T] -> [B, T, D] in the compute dtype, sharded like the residual stream."""
        # the table as the lookup reads it: D gathered (FSDP), vocab still split over 'tensor'
        table = sharding.constrain(self.embed[...], self.layout, ("vocab", None))  # [V, D]
        x = jnp.take(table, ids, axis=0).astype(dtype_of(self.cfg.compute_dtype))
        return sharding.constrain(x, self.layout, RESIDUAL)

    def head(self, h):
        """Final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        cd = dtype_of(self.cfg.compute_dtype)
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum(
            "BTD,DV->BTV", h.astype(cd), w.astype(cd), preferred_element_type=jnp.float32
        )

    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        *,
        rng=None,
        return_mtp=False,
        return_hidden=False,
        routes=None,
        replay_routes: bool = False,
    ):
        """Forward pass.

        Args:
          input_ids: int [B, T].
          positions: int [B, T] rotary positions (default 0..T-1; restart per packed document).
          segment_ids: int [B, T] document ids of packed rows; 0 marks padding (default all 1).
          rng: a PRNG key for training-time randomness (router jitter); None is deterministic.
          return_mtp: also compute the multi-token-prediction logits.
          routes: int [L_moe, B, T, K] expert choices recorded for these tokens by the main stack's
            MoE layers (the generator's, for RL): aux['route_mismatch'] [L_moe] counts the recorded
            assignments each router does not make; replay_routes=True runs the experts on the
            recorded choices (routing replay).
        Returns:
          logits float32 [B, T, V] and the aux dict.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        # None stays None for attention (one document per row: cuDNN takes only that)
        token_mask = (
            jnp.ones((B, T), jnp.float32)
            if segment_ids is None
            else (segment_ids > 0).astype(jnp.float32)
        )
        # context parallelism: token-level inputs into the balanced order (each device an early
        # and a late chunk); the hidden states go back to natural order before the LM head
        bal = functools.partial(context.to_balanced, layout=self.layout)
        unbal = functools.partial(context.from_balanced, layout=self.layout)
        ids = bal(input_ids)
        positions, token_mask = bal(positions), bal(token_mask)
        segment_ids = None if segment_ids is None else bal(segment_ids)
        routes = None if routes is None else bal(routes, axis=2)
        v4 = cfg.attention_type == "v4"
        if v4:  # V4 blocks read a v4.Context where others read the rotary cos (and no sin)
            cos, sin = v4_lib.context(ids, positions, cfg), None
        else:
            cos, sin = rope_cos_sin(positions, cfg)
        residual = v4_lib.STREAMS if v4 else RESIDUAL
        rngs = (
            [None] * (len(self.segments) + len(self.mtp))
            if rng is None
            else list(jax.random.split(rng, len(self.segments) + len(self.mtp)))
        )

        x = self.embed_tokens(ids)
        if v4:  # hc_mult copies of the embedding
            x = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (cfg.hc_mult,) + x.shape[2:])
            x = sharding.constrain(x, self.layout, residual)
        moe_aux, index_kl = [], []  # (index_kl: DeepSeek Sparse Attention's per-layer KL sums)
        first = 0  # the first MoE layer of this segment, in `routes`
        for i, ((kind, n), stack, v4_kind) in enumerate(
            zip(segments_of(cfg), self.segments, v4_kinds(cfg))
        ):
            seg_routes = None if routes is None or kind != "moe" else routes[first : first + n]
            first += n if kind == "moe" else 0
            p = 1 if v4_kind is None else len(v4_kind)  # (V4: groups of p layers are scanned)
            if seg_routes is not None and v4_kind is not None:
                seg_routes = seg_routes.reshape((n // p, p) + seg_routes.shape[1:])
            with jax.named_scope(f"segment_{i}_{kind}"):
                x, aux = run_stack(
                    stack,
                    n // p,
                    x,
                    cos,
                    sin,
                    segment_ids,
                    token_mask,
                    rngs[i],
                    cfg,
                    self.execution,
                    self.mesh,
                    seg_routes,
                    replay_routes,
                )
                x = sharding.constrain(
                    x, self.layout, residual
                )  # (a pipeline's output has no layout of its own)
            if v4_kind is not None:  # [groups, p, ...] -> per layer (indexer KL: per CSA layer)
                aux = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), aux)
            if "indexer_kl" in aux:
                aux = dict(aux)
                index_kl.append(aux.pop("indexer_kl"))
            if kind == "moe":
                moe_aux.append(aux)
        h_bal = self.norm(self.hc_head(x) if v4 else x)
        h = unbal(h_bal)
        logits = self.head(h)

        out = {}
        mtp_logits = []
        if return_mtp and self.mtp:
            prev = h_bal
            for k, m in enumerate(self.mtp, start=1):
                with jax.named_scope(f"mtp_{k}"):
                    shifted = bal(
                        jnp.concatenate(
                            [input_ids[:, k:], jnp.zeros((B, k), input_ids.dtype)], axis=1
                        )
                    )
                    e = m.enorm(self.embed_tokens(shifted))
                    cd = dtype_of(cfg.compute_dtype)
                    z = jnp.concatenate([e, m.hnorm(prev)], axis=-1).astype(cd)  # [B, T, 2D]
                    z = jnp.einsum(
                        "BTX,XD->BTD",
                        z,
                        m.eh_proj[...].astype(cd),
                        preferred_element_type=jnp.float32,
                    )
                    z = sharding.constrain(z, self.layout, RESIDUAL)
                    prev, aux = m.block(
                        z.astype(cd),
                        cos,
                        sin,
                        segment_ids,
                        token_mask,
                        rngs[len(self.segments) + k - 1],
                    )
                    if "indexer_kl" in aux:
                        aux = dict(aux)
                        index_kl.append(aux.pop("indexer_kl")[None])
                    if aux:
                        moe_aux.append(jax.tree.map(lambda a: a[None], aux))
                    mtp_logits.append(self.head(unbal(m.norm(prev))))
            out["mtp_logits"] = jnp.stack(mtp_logits)
        if moe_aux:
            # (route_mismatch / route_count: the main stack's layers only; the MTP blocks are not
            # replayed)
            stats = {k: jnp.concatenate([a[k] for a in moe_aux if k in a]) for k in moe_aux[0]}
            out.update(stats)
            out["aux_loss"] = stats["aux_loss"].sum()
        else:
            out["aux_loss"] = jnp.zeros((), jnp.float32)
        if index_kl:
            out["indexer_kl"] = jnp.concatenate(index_kl)  # [layers (+ MTP blocks)]
        if return_hidden:
            out["hidden"] = h
        return logits, out

    # ---------------------------------------------------------------------------------------

    def num_moe_layers(self) -> int:
        return sum(n for kind, n in segments_of(self.cfg) if kind == "moe")

    def update_router_biases(self, expert_counts):
        """Aux-loss-free balancing step for every MoE layer (main stack first, then MTP blocks).

        Args:
          expert_counts: [L_moe (+ MTP MoE blocks), E] token counts over the whole global batch,
            as returned in aux['expert_counts'].
        """
        if not self.cfg.router.use_score_correction_bias or not self.cfg.n_routed_experts:
            return
        rate = self.cfg.router.bias_update_rate
        i = 0
        for (kind, n), stack, v4_kind in zip(
            segments_of(self.cfg), self.segments, v4_kinds(self.cfg)
        ):
            if kind == "moe" and v4_kind is not None:  # V4 groups: layer j of every group
                counts = expert_counts[i : i + n].reshape((n // len(v4_kind), len(v4_kind), -1))
                for j, block in enumerate(stack.blocks):
                    block.ffn.router.update_bias(counts[:, j], rate)
                i += n
            elif kind == "moe":
                stack.ffn.router.update_bias(expert_counts[i : i + n], rate)
                i += n
        if expert_counts.shape[0] > i:  # counts include the MTP blocks
            for m in self.mtp:
                m.block.ffn.router.update_bias(expert_counts[i], rate)
                i += 1


def router_bias_state(model: Transformer) -> nnx.State:
    return nnx.state(model, RouterBias)
