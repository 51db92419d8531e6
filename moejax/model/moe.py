"""DeepSeekMoE layer: fine-grained routed experts + shared experts, three dispatch strategies.

`MoE.__call__` returns `(y, aux)`. aux holds the weighted balance loss (`aux_loss`), each loss
unweighted, the per-expert token counts (`expert_counts` [E]), `drop_fraction`, and the sums and
counts behind them (SUM_STATS), from which a caller combines microbatches exactly.

Strategies (execution.moe_impl), all computing sum_k w_k * expert_{e_k}(x) for each token:
  dense     every expert on every token, masked: the readable reference
  capacity  GShard/Switch buffers of C = ceil(capacity_factor * M * K / E) rows per expert; the
            lowest-weight assignments are dropped first, padding never dispatched
  dropless  sort assignments by expert, grouped matmul (moejax.kernels.gmm); on a mesh of several
            devices the experts run in shard_map with an all-to-all over the expert axes
            (moe_ep.py); with at most E assignments (decoding) each gathers its expert's weights
            (experts_gather)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels, sharding
from moejax.config import ExecutionConfig, ModelConfig
from moejax.model import layers, moe_ep
from moejax.model import router as router_lib
from moejax.model.layers import MLP, dtype_of, param, swiglu
from moejax.model.moe_ep import capacity


def experts_dense(x, expert_ids, weights, w_gate_up, w_down, compute_dtype, limit=0.0):
    """Reference: every expert on every token. x [M, D] -> [M, D] float32."""
    E = w_gate_up.shape[0]
    combine = jnp.einsum(
        "MKE,MK->ME", jax.nn.one_hot(expert_ids, E, dtype=jnp.float32), weights
    )  # [M, E]
    h = jnp.einsum(
        "MD,EDXF->MEXF",
        x.astype(compute_dtype),
        w_gate_up.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    h = swiglu(h, limit).astype(compute_dtype)  # [M, E, F]
    out = jnp.einsum(
        "MEF,EFD->MED", h, w_down.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    return jnp.einsum("MED,ME->MD", out, combine)


def experts_capacity(
    x, expert_ids, weights, w_gate_up, w_down, compute_dtype, capacity_factor, token_mask, limit=0.0
):
    """Token-dropping dispatch into per-expert buffers [E, C, D]: the reference capacity policy.

    Each expert takes at most C = ceil(capacity_factor * M * K / E) assignments, the highest routing
    weights first (ties: the earlier assignment); padding (token_mask == 0) is never dispatched and
    never counted. The expert-parallel exchanges apply exactly this policy over the global batch
    (moe_ep).

    Returns y [M, D] float32 and the number of real assignments dropped (float32).
    """
    M, K = expert_ids.shape
    E, D = w_gate_up.shape[0], x.shape[1]
    A = M * K
    C = capacity(A, E, capacity_factor)
    flat_e = expert_ids.reshape(A)
    flat_w = weights.reshape(A)
    valid = jnp.repeat(token_mask > 0, K)  # [A]
    # Priority: real assignments by weight, highest first; padding last (and never kept).
    priority = jnp.where(valid, flat_w, -jnp.inf)
    by_priority = jnp.argsort(-priority, stable=True)  # [A]
    order = by_priority[jnp.argsort(flat_e[by_priority], stable=True)]  # by expert, then priority
    counts = jnp.bincount(flat_e, length=E)
    starts = jnp.cumsum(counts) - counts  # [E]
    pos_sorted = jnp.arange(A) - starts[flat_e[order]]  # rank within its expert
    position = jnp.zeros((A,), jnp.int32).at[order].set(pos_sorted.astype(jnp.int32))  # [A]
    keep = valid & (position < C)
    slot = jnp.where(keep, flat_e * C + position, E * C)  # dropped -> a spare row
    tokens = jnp.arange(A) // K
    buf = jnp.zeros((E * C + 1, D), compute_dtype).at[slot].set(x[tokens].astype(compute_dtype))
    buf = buf[: E * C].reshape(E, C, D)  # [E, C, D]
    h = jnp.einsum(
        "ECD,EDXF->ECXF", buf, w_gate_up.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    h = swiglu(h, limit).astype(compute_dtype)
    out = jnp.einsum(
        "ECF,EFD->ECD", h, w_down.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    out = jnp.concatenate([out.reshape(E * C, D), jnp.zeros((1, D), out.dtype)])  # [E*C+1, D]
    per_assignment = out[slot].reshape(M, K, D) * flat_w.reshape(M, K, 1)
    dropped = jnp.sum(valid & ~keep).astype(jnp.float32)
    return per_assignment.sum(axis=1), dropped


def experts_dropless(
    x,
    expert_ids,
    weights,
    w_gate_up,
    w_down,
    compute_dtype,
    gmm_impl=None,
    lora=None,
    fp8=False,
    limit=0.0,
):
    """Sort by expert, grouped matmuls (moe_ep.expert_ffn, with the LoRA adapters if any), weighted
    combine. x [M, D] -> [M, D] float32."""
    E = w_gate_up.shape[0]
    xs, order, group_sizes = kernels.permute(x.astype(compute_dtype), expert_ids, E)  # [M*K, D]
    ys = moe_ep.expert_ffn(
        xs,
        group_sizes,
        w_gate_up.astype(compute_dtype),
        w_down.astype(compute_dtype),
        gmm_impl=gmm_impl,
        lora=lora,
        fp8=fp8,
        limit=limit,
    )  # [M*K, D]
    return kernels.unpermute(ys, order, weights)


def experts_gather(x, expert_ids, weights, w_gate_up, w_down, compute_dtype, lora=None, limit=0.0):
    """Each assignment gathers its expert's weights: x [M, D] -> [M, D] float32.

    Reads M*K experts' weights instead of running E groups: the fast path when M*K <= E (decoding a
    few tokens), where a grouped matmul's per-group fixed cost dominates. `MoE` picks it by that
    rule.
    """
    cd = compute_dtype
    x = x.astype(cd)
    g = w_gate_up[expert_ids].astype(cd)  # [M, K, D, 2, F]
    h = jnp.einsum("MD,MKDXF->MKXF", x, g, preferred_element_type=jnp.float32)
    if (
        lora is not None
    ):  # the gathered adapters (no dropout: a few tokens are decoding, not training)
        z = jnp.einsum(
            "MD,MKDZ->MKZ", x, lora.a_gu[expert_ids].astype(cd), preferred_element_type=jnp.float32
        )
        h = h + lora.scale * jnp.einsum(
            "MKZ,MKZXF->MKXF",
            z.astype(cd),
            lora.b_gu[expert_ids].astype(cd),
            preferred_element_type=jnp.float32,
        )
    h = swiglu(h, limit).astype(cd)  # [M, K, F]
    out = jnp.einsum(
        "MKF,MKFD->MKD", h, w_down[expert_ids].astype(cd), preferred_element_type=jnp.float32
    )
    if lora is not None:
        z = jnp.einsum(
            "MKF,MKFZ->MKZ", h, lora.a_d[expert_ids].astype(cd), preferred_element_type=jnp.float32
        )
        out = out + lora.scale * jnp.einsum(
            "MKZ,MKZD->MKD",
            z.astype(cd),
            lora.b_d[expert_ids].astype(cd),
            preferred_element_type=jnp.float32,
        )
    return jnp.einsum("MKD,MK->MD", out, weights.astype(jnp.float32))


# Per-layer statistics of one MoE call. Sums add up exactly over microbatches and pipeline
# microbatches; the Switch loss (a product of two batch means) cannot be split and is averaged over
# microbatches.
# Every statistic a MoE call returns is declared here, once: a new one (a new auxiliary loss) that
# is not, or one declared and not returned, stops the trace (MoE.__call__) instead of silently
# dropping out of the pipeline's microbatch combination and the logged metrics.
STATS = {
    "expert_counts": "sum",
    "seq_aux_sum": "sum",
    "seq_count": "sum",
    "z_sum": "sum",
    "token_count": "sum",
    "dropped": "sum",
    "switch_loss": "mean",
}
SUM_STATS = tuple(k for k, kind in STATS.items() if kind == "sum")
MEAN_STATS = tuple(k for k, kind in STATS.items() if kind == "mean")


def check_stats(stats: dict) -> None:
    if set(stats) != set(STATS):
        extra, missing = sorted(set(stats) - set(STATS)), sorted(set(STATS) - set(stats))
        raise ValueError(
            "MoE statistics must match moejax.model.moe.STATS: "
            + "; ".join(
                ([f"not declared: {', '.join(extra)}"] if extra else [])
                + ([f"declared but not returned: {', '.join(missing)}"] if missing else [])
            )
        )


def _per_layer_loss(stats, cfg: ModelConfig, sequences, tokens, switch_weight=1.0):
    total = cfg.router.aux_loss_coef * switch_weight * stats["switch_loss"]
    total = total + cfg.router.seq_aux_loss_coef * stats["seq_aux_sum"] / jnp.maximum(
        sequences, 1.0
    )
    return total + cfg.router.z_loss_coef * stats["z_sum"] / jnp.maximum(tokens, 1.0)


def balance_loss(stats, cfg: ModelConfig, *, sequences, tokens, switch_weight=1.0):
    """The weighted balance losses, summed over layers, from the per-layer stats (arrays [L] or
    scalars): Switch loss x switch_weight, sequence-wise sums / `sequences`, router z
    sums / `tokens`."""
    return jnp.sum(_per_layer_loss(stats, cfg, sequences, tokens, switch_weight))


def with_means(stats, cfg: ModelConfig):
    """Adds the per-layer means (seq_aux_loss, z_loss, drop_fraction) and this batch's weighted
    aux_loss."""
    out = dict(stats)
    out["seq_aux_loss"] = stats["seq_aux_sum"] / jnp.maximum(stats["seq_count"], 1.0)
    out["z_loss"] = stats["z_sum"] / jnp.maximum(stats["token_count"], 1.0)
    out["drop_fraction"] = stats["dropped"] / jnp.maximum(
        stats["token_count"] * cfg.num_experts_per_tok, 1.0
    )
    out["aux_loss"] = _per_layer_loss(stats, cfg, stats["seq_count"], stats["token_count"])
    return out


class MoE(nnx.Module):
    """Routed experts [E, D, 2, F] / [E, F, D], a float32 router [D, E], optional shared experts.

    The dispatch is chosen once, here: execution.moe_impl, except that dropless on a mesh of several
    devices runs expert-parallel (moe_ep.py) over the axes the rules give the logical 'expert' axis.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        layout=None,
        execution: ExecutionConfig = ExecutionConfig(),
        hashed: bool = False,
    ):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.execution = execution  # dispatch, grouped-matmul backend, exchange, capacity
        self.layout = layout  # sharding.Layout (None: no mesh)
        self.dispatch = execution.moe_impl
        if execution.moe_impl == "dropless" and layout is not None:
            sharding.expert_axes(
                layout.mesh, layout.rule_table
            )  # a rule the exchange cannot honour fails here
            self.dispatch = "expert_parallel"
        # first: it draws the first init key. hashed: DeepSeek-V4's frozen token -> experts table
        self.hashed = hashed
        router = router_lib.HashRouter if hashed else router_lib.Router
        self.router = router(cfg, rngs=rngs)
        self.w_gate_up = param(rngs, (E, D, 2, F), ("expert", "embed", None, "expert_mlp"), cfg)
        self.w_down = param(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), cfg)
        if cfg.n_shared_experts:
            self.shared = MLP(
                cfg, F * cfg.n_shared_experts, rngs=rngs, layout=layout, fp8=execution.fp8
            )

    def __call__(
        self,
        x,
        token_mask=None,
        rng=None,
        route=None,
        replay: bool = False,
        record: bool = False,
        ids=None,
    ):
        """x [B, T, D] -> (y [B, T, D] float32, aux). token_mask [B, T] marks real tokens;
        rng enables router jitter (training).

        route: int [B, T, K] experts chosen for these tokens elsewhere (the sampler's, for RL): aux
        then holds `route_mismatch`, how many of those assignments this router does not make; with
        replay=True the layer uses them (gate weights from this router's scores); `route_count` is
        how many were recorded (a token whose row is -1 was not, and keeps this router's choice).
        record=True puts this call's choice in aux['route'] [B, T, K]. ids: the token ids [B, T]
        (hash routing reads them)."""
        cfg = self.cfg
        B, T, D = x.shape
        cd = dtype_of(cfg.compute_dtype)
        xf = x.reshape(B * T, D)  # [M, D]
        mask2 = (
            jnp.ones((B, T), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        )
        mask = mask2.reshape(B * T)
        with jax.named_scope("router"):
            r = self.router(xf, rng, None if ids is None else ids.reshape(B * T))
            if route is not None:
                route = route.reshape(B * T, -1).astype(jnp.int32)
                mismatch = router_lib.disagreement(r, route, mask)
                if replay:
                    r = router_lib.replayed(r, route, cfg)
        with jax.named_scope("experts"):
            y, dropped = self._experts(x, xf, r, mask, mask2, cd, rng)
        if cfg.n_shared_experts:
            y = y + self.shared(xf, None if rng is None else jax.random.fold_in(rng, 4))
        stats = self.stats(r, mask, B)
        stats["dropped"] = dropped
        check_stats(stats)
        aux = with_means(stats, cfg)
        if route is not None:
            aux["route_mismatch"], aux["route_count"] = mismatch
        if record:
            aux["route"] = r.expert_ids.reshape(B, T, -1)
        return y.reshape(B, T, D), aux

    def expert_lora(self, rng=None) -> moe_ep.ExpertLoRA | None:
        """The routed experts' LoRA adapters (moejax.finetune.lora adds them), or None."""
        gu, dn = layers.adapters(self, "w_gate_up"), layers.adapters(self, "w_down")
        if gu is None and dn is None:
            return None
        E, D, _, F = self.w_gate_up.shape[-4:]
        z = (gu or dn)[0].shape[-1]
        zeros = (jnp.zeros((E, D, z)), jnp.zeros((E, z, 2, F))) if gu is None else gu[:2]
        zeros_d = (jnp.zeros((E, F, z)), jnp.zeros((E, z, D))) if dn is None else dn[:2]
        scale, dropout = (gu or dn)[2:]
        return moe_ep.ExpertLoRA(
            *zeros,
            *zeros_d,
            scale=scale,
            dropout=dropout,
            rng=None if rng is None else jax.random.fold_in(rng, 3),
        )

    def _experts(self, x, xf, r: router_lib.Routing, mask, mask2, cd, rng=None):
        """Routed experts by this layer's dispatch: (y [M, D] float32, real assignments dropped)."""
        cfg, ex, wgu, wd = self.cfg, self.execution, self.w_gate_up[...], self.w_down[...]
        lora = self.expert_lora(rng)
        zero = jnp.zeros((), jnp.float32)
        if lora is not None and self.dispatch in ("dense", "capacity"):
            wgu, wd = lora.merged(
                wgu, wd
            )  # the references run the merged weights (no adapter dropout)
            lora = None
        lim = cfg.swiglu_limit
        if self.dispatch == "dense":
            return experts_dense(xf, r.expert_ids, r.weights, wgu, wd, cd, lim), zero
        if self.dispatch == "capacity":
            return experts_capacity(
                xf, r.expert_ids, r.weights, wgu, wd, cd, ex.capacity_factor, mask, lim
            )
        impl = None if ex.gmm_impl == "auto" else ex.gmm_impl
        B, T, D = x.shape
        if self.dispatch == "dropless" and B * T * cfg.num_experts_per_tok <= cfg.n_routed_experts:
            return experts_gather(
                xf, r.expert_ids, r.weights, wgu, wd, cd, lora, lim
            ), zero  # a few tokens: decoding
        # A batch the batch axes do not divide (e.g. sampling 3 prompts) is left to GSPMD. Inside a
        # pipeline stage (a shard_map over 'stage') the exchange is a shard_map nested over the
        # remaining axes.
        if self.dispatch == "expert_parallel" and moe_ep.can_shard(
            self.layout.mesh, self.layout.rule_table, B, cfg.n_routed_experts, T
        ):
            k = r.expert_ids.shape[-1]
            mesh, _ = self.layout.region()
            y, dropped = moe_ep.experts_ep(
                x,
                r.expert_ids.reshape(B, T, k),
                r.weights.reshape(B, T, k),
                mask2,
                wgu,
                wd,
                cd,
                mesh=mesh,
                rules=self.layout.rule_table,
                exchange=ex.ep_exchange,
                capacity_factor=ex.capacity_factor,
                capacity_scope=ex.capacity_scope,
                dropless_buffer=ex.dropless_buffer,
                gmm_impl=impl,
                lora=lora,
                fp8=ex.fp8,
                limit=lim,
            )
            return y.reshape(B * T, D), dropped
        if (
            self.dispatch == "expert_parallel"
            and impl is None
            and kernels.default_impl().startswith("pallas")
        ):
            impl = "ragged_dot"  # a Pallas kernel cannot be partitioned by GSPMD outside shard_map
        return experts_dropless(
            xf, r.expert_ids, r.weights, wgu, wd, cd, impl, lora, ex.fp8, lim
        ), zero

    def stats(self, r: router_lib.Routing, mask, batch: int):
        """This call's SUM_STATS and MEAN_STATS (without 'dropped', which the dispatch gives)."""
        cfg = self.cfg
        zero = jnp.zeros((), jnp.float32)
        seq_sum, seq_count = router_lib.sequence_balance_terms(r, cfg, mask, batch)
        z_sum, tokens = router_lib.router_z_terms(r, mask)
        return {
            "switch_loss": router_lib.switch_loss(r, cfg, mask)
            if cfg.router.aux_loss_coef
            else zero,
            "seq_aux_sum": seq_sum if cfg.router.seq_aux_loss_coef else zero,
            "seq_count": seq_count,
            "z_sum": z_sum if cfg.router.z_loss_coef else zero,
            "token_count": tokens,
            "expert_counts": router_lib.expert_counts(r.expert_ids, cfg.n_routed_experts, mask),
        }
