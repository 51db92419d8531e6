"""DeepSeekMoE layer: fine-grained routed experts + shared experts, three dispatch strategies.

`MoE.__call__` returns `(y, aux)`. aux holds the weighted balance loss (`aux_loss`), each loss
unweighted, the per-expert token counts (`expert_counts` [E]) and `drop_fraction`.

Strategies (cfg.moe_impl), all computing sum_k w_k * expert_{e_k}(x) for each token:
  dense     every expert on every token, masked: the readable reference
  capacity  GShard/Switch buffers of C = ceil(capacity_factor * M * K / E) rows per expert; the
            lowest-weight assignments are dropped first
  dropless  sort assignments by expert, grouped matmul (moejax.kernels.gmm); on a mesh (inside
            the train step) the experts run in shard_map with an all-to-all over 'expert' (moe_ep.py)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels, sharding
from moejax.config import ModelConfig
from moejax.model import moe_ep
from moejax.model import router as router_lib
from moejax.model.layers import MLP, dtype_of, param, swiglu


class RouterBias(nnx.Variable):
    """Non-trainable aux-loss-free balancing bias; changed only by `router.update_router_bias`."""


def experts_dense(x, expert_ids, weights, w_gate_up, w_down, compute_dtype):
    """Reference: every expert on every token. x [M, D] -> [M, D] float32."""
    E = w_gate_up.shape[0]
    combine = jnp.einsum("MKE,MK->ME", jax.nn.one_hot(expert_ids, E, dtype=jnp.float32), weights)  # [M, E]
    h = jnp.einsum("MD,EDXF->MEXF", x.astype(compute_dtype), w_gate_up.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
    h = swiglu(h).astype(compute_dtype)  # [M, E, F]
    out = jnp.einsum("MEF,EFD->MED", h, w_down.astype(compute_dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("MED,ME->MD", out, combine)


def capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def experts_capacity(x, expert_ids, weights, w_gate_up, w_down, compute_dtype, capacity_factor, token_mask):
    """Token-dropping dispatch into per-expert buffers [E, C, D].

    Returns y [M, D] float32 and the fraction of real (unmasked) assignments dropped.
    """
    M, K = expert_ids.shape
    E, D = w_gate_up.shape[0], x.shape[1]
    A = M * K
    C = capacity(A, E, capacity_factor)
    flat_e = expert_ids.reshape(A)
    flat_w = weights.reshape(A)
    valid = jnp.repeat(token_mask > 0, K)  # [A]
    # Priority: real assignments by weight, highest first; padding last.
    priority = jnp.where(valid, flat_w, -1.0)
    by_priority = jnp.argsort(-priority, stable=True)  # [A]
    order = by_priority[jnp.argsort(flat_e[by_priority], stable=True)]  # by expert, then priority
    counts = jnp.bincount(flat_e, length=E)
    starts = jnp.cumsum(counts) - counts  # [E]
    pos_sorted = jnp.arange(A) - starts[flat_e[order]]  # rank within its expert
    position = jnp.zeros((A,), jnp.int32).at[order].set(pos_sorted.astype(jnp.int32))  # [A]
    keep = position < C
    slot = jnp.where(keep, flat_e * C + position, E * C)  # dropped -> a spare row
    tokens = jnp.arange(A) // K
    buf = jnp.zeros((E * C + 1, D), compute_dtype).at[slot].set(x[tokens].astype(compute_dtype))
    buf = buf[: E * C].reshape(E, C, D)  # [E, C, D]
    h = jnp.einsum("ECD,EDXF->ECXF", buf, w_gate_up.astype(compute_dtype), preferred_element_type=jnp.float32)
    h = swiglu(h).astype(compute_dtype)
    out = jnp.einsum("ECF,EFD->ECD", h, w_down.astype(compute_dtype), preferred_element_type=jnp.float32)
    out = jnp.concatenate([out.reshape(E * C, D), jnp.zeros((1, D), out.dtype)])  # [E*C+1, D]
    per_assignment = out[slot].reshape(M, K, D) * flat_w.reshape(M, K, 1)
    n_valid = jnp.maximum(valid.sum(), 1)
    dropped = jnp.sum(valid & ~keep) / n_valid
    return per_assignment.sum(axis=1), dropped


def experts_dropless(x, expert_ids, weights, w_gate_up, w_down, compute_dtype, gmm_impl=None):
    """Sort by expert, grouped matmuls, weighted combine. x [M, D] -> [M, D] float32."""
    E, D, _, F = w_gate_up.shape
    xs, order, group_sizes = kernels.permute(x.astype(compute_dtype), expert_ids, E)  # [M*K, D]
    h = kernels.gmm(xs, w_gate_up.reshape(E, D, 2 * F).astype(compute_dtype), group_sizes,
                    preferred_element_type=jnp.float32, impl=gmm_impl)  # [M*K, 2F]
    h = swiglu(h.reshape(-1, 2, F)).astype(compute_dtype)  # [M*K, F]
    ys = kernels.gmm(h, w_down.astype(compute_dtype), group_sizes, preferred_element_type=jnp.float32,
                     impl=gmm_impl)  # [M*K, D]
    return kernels.unpermute(ys, order, weights)


class MoE(nnx.Module):
    """Routed experts [E, D, 2, F] / [E, F, D], a float32 router [D, E], optional shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.cfg = cfg
        self.w_router = nnx.Param(
            cfg.initializer_range * jax.random.normal(rngs.params(), (D, E), jnp.float32),
            logical_axes=("embed", None))
        if cfg.use_score_correction_bias:
            self.bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,))
        self.w_gate_up = param(rngs, (E, D, 2, F), ("expert", "embed", None, "expert_mlp"), cfg)
        self.w_down = param(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), cfg)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, F * cfg.n_shared_experts, rngs=rngs)

    def __call__(self, x, token_mask=None, rng=None):
        """x [B, T, D] -> (y [B, T, D] float32, aux). token_mask [B, T] marks real tokens;
        rng enables router jitter (training)."""
        cfg = self.cfg
        B, T, D = x.shape
        cd = dtype_of(cfg.compute_dtype)
        xf = x.reshape(B * T, D)  # [M, D]
        mask = jnp.ones((B * T,), jnp.float32) if token_mask is None else token_mask.reshape(B * T).astype(jnp.float32)
        router_in = xf.astype(jnp.float32)
        if rng is not None and cfg.router_jitter > 0:
            noise = jax.random.uniform(rng, router_in.shape, jnp.float32, 1 - cfg.router_jitter, 1 + cfg.router_jitter)
            router_in = router_in * noise
        with jax.named_scope("router"):
            logits = jnp.dot(router_in, self.w_router[...].astype(jnp.float32))  # [M, E]
            bias = self.bias[...] if cfg.use_score_correction_bias else None
            r = router_lib.route(logits, bias, cfg)
        drop = jnp.zeros((), jnp.float32)
        with jax.named_scope("experts"):
            if cfg.moe_impl == "dense":
                y = experts_dense(xf, r.expert_ids, r.weights, self.w_gate_up[...], self.w_down[...], cd)
            elif cfg.moe_impl == "capacity":
                y, drop = experts_capacity(xf, r.expert_ids, r.weights, self.w_gate_up[...], self.w_down[...], cd,
                                           cfg.capacity_factor, mask)
            else:
                impl = None if cfg.gmm_impl == "auto" else cfg.gmm_impl
                active = sharding.active()
                if active and active[0] is not None and moe_ep.can_shard(*active, B, cfg.n_routed_experts):
                    k = r.expert_ids.shape[-1]
                    y, drop = moe_ep.experts_ep(
                        x, r.expert_ids.reshape(B, T, k), r.weights.reshape(B, T, k), self.w_gate_up[...],
                        self.w_down[...], cd, mesh=active[0], rules=active[1], exchange=cfg.ep_exchange,
                        capacity_factor=cfg.capacity_factor, gmm_impl=impl)
                    y = y.reshape(B * T, D)
                else:
                    if active and impl is None and kernels.default_impl().startswith("pallas"):
                        impl = "ragged_dot"  # a Pallas kernel cannot be partitioned by GSPMD outside shard_map
                    y = experts_dropless(xf, r.expert_ids, r.weights, self.w_gate_up[...], self.w_down[...], cd, impl)
        if cfg.n_shared_experts:
            y = y + self.shared(xf)
        aux = self.losses(r, mask, B)
        aux["drop_fraction"] = drop
        return y.reshape(B, T, D), aux

    def losses(self, r: router_lib.Routing, mask, batch: int):
        cfg = self.cfg
        zero = jnp.zeros((), jnp.float32)
        switch = router_lib.switch_loss(r, cfg, mask) if cfg.aux_loss_coef else zero
        seq = router_lib.sequence_balance_loss(r, cfg, mask, batch) if cfg.seq_aux_loss_coef else zero
        z = router_lib.router_z_loss(r, mask) if cfg.router_z_loss_coef else zero
        total = cfg.aux_loss_coef * switch + cfg.seq_aux_loss_coef * seq + cfg.router_z_loss_coef * z
        return {
            "aux_loss": total,
            "switch_loss": switch,
            "seq_aux_loss": seq,
            "z_loss": z,
            "expert_counts": router_lib.expert_counts(r.expert_ids, cfg.n_routed_experts, mask),
        }
