"""The pure train step: `train_step(state, batch) -> (state, metrics)`, and the eval step.

The train state is a pytree dict: step, params (nnx.State of Params, float32 master weights),
router (nnx.State of the aux-loss-free biases), opt_state, rng (raw key data) and nonfinite
(the count of consecutive skipped steps). moejax.trainer.setup builds it, sharded, from a config.

Losses are token-weighted: each term is a sum over valid tokens divided once by the global count
(`normalizers`), so gradient accumulation, pipeline microbatches and the data-parallel layout give
the same loss and update as one pass over the whole batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.config import Config
from moejax.kernels.gmm.ops import platform
from moejax.model import RouterBias, Transformer
from moejax.model.moe import balance_loss
from moejax.model.router import HashTable


def split_model(model: Transformer):
    """graphdef, params, router biases, everything else (empty for the current model)."""
    return nnx.split(model, nnx.Param, RouterBias, ...)


def token_loss_sum(logits, labels, valid):
    """Cross-entropy summed over valid positions; logits [B, T, V] float32, labels/valid [B, T]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(ce * valid.astype(jnp.float32))


def shifted_targets(batch, shift: int):
    """Labels `shift` tokens ahead and where they are valid (same document, not padding, and, in
    fine-tuning batches, a token the batch's `loss_mask` trains on).

    Returns labels [B, T] and valid [B, T] (positions t + shift >= T are invalid).
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    B, T = tokens.shape

    def ahead(x):  # [B, T] -> x[:, t + shift], zero past the end
        return jnp.concatenate([x[:, shift:], jnp.zeros((B, shift), x.dtype)], axis=1)

    labels = ahead(tokens)
    valid = (seg > 0) & (ahead(seg) == seg)
    if "loss_mask" in batch:
        valid = valid & (ahead(batch["loss_mask"]) > 0)
    return labels, valid


def normalizers(batch, cfg: Config, microbatches: int = 1) -> dict:
    """Global counts that every loss term is divided by, once, from the whole batch: valid
    next-token targets (`tokens`), valid targets of each MTP depth (`mtp` [depth]), real tokens
    (`real`, for the router z-loss), sequences holding tokens (`sequences`, the sequence-wise
    balance loss), and the number of gradient-accumulation microbatches (the Switch loss, a batch
    mean, is averaged over them). Computed on the global batch, they make the loss independent of
    how the batch is split."""
    seg = batch["segment_ids"]
    out = {
        "tokens": shifted_targets(batch, 1)[1].sum().astype(jnp.float32),
        "real": (seg > 0).sum().astype(jnp.float32),
        "sequences": (seg > 0).any(axis=1).sum().astype(jnp.float32),
        "microbatches": jnp.float32(microbatches),
    }
    if cfg.model.mtp_depth:
        out["mtp"] = jnp.stack(
            [shifted_targets(batch, k + 2)[1].sum() for k in range(cfg.model.mtp_depth)]
        ).astype(jnp.float32)
    if cfg.align.method in ("dpo", "reward"):
        from moejax.finetune.objectives import count_pairs

        out["pairs"] = count_pairs(batch, cfg.align.max_pairs_per_row)
    if cfg.align.method == "grpo":
        from moejax.finetune.grpo import completion_counts

        out.update(completion_counts(batch))
    return out


def _moe_aux_loss(aux, cfg: Config, norm):
    if "expert_counts" not in aux:
        return jnp.zeros((), jnp.float32)
    return balance_loss(
        aux,
        cfg.model,
        sequences=norm["sequences"],
        tokens=norm["real"],
        switch_weight=1.0 / norm["microbatches"],
    )


def _indexer_loss(aux, norm):
    """DeepSeek Sparse Attention's indexer KL: per query token, averaged over layers (0 without an
    indexer). It trains only the indexers (their inputs and the attention target are detached)."""
    if "indexer_kl" not in aux:
        return None
    return aux["indexer_kl"].mean() / jnp.maximum(norm["real"], 1.0)


def _with_moe_terms(loss, metrics, aux, batch, cfg: Config, norm):
    """A preference objective's (loss, (metrics, stats)) with the MoE balance loss (and the sparse
    attention indexer's loss) added, as loss_fn returns."""
    aux_loss = _moe_aux_loss(aux, cfg, norm)
    metrics.update(
        ce_loss=loss,
        aux_loss=aux_loss,
        tokens=shifted_targets(batch, 1)[1].sum().astype(jnp.float32),
    )
    metrics["loss"] = loss + aux_loss
    if (ikl := _indexer_loss(aux, norm)) is not None:
        metrics["indexer_kl"] = ikl
        metrics["loss"] = metrics["loss"] + ikl
    stats = {k: aux[k] for k in ("expert_counts", "dropped", "token_count") if k in aux}
    return metrics["loss"], (metrics, stats)


def reference_logits(graphdef, params, router, rest, ref, batch):
    """The reference model's logits on a batch, without gradient: `ref` (a frozen copy of the base's
    parameters), or, with LoRA (ref None), the same model with its adapters set to zero: exactly the
    frozen base."""
    ref_params = jax.lax.stop_gradient(
        ref if ref is not None else jax.tree.map(jnp.zeros_like, params)
    )
    logits, _ = nnx.merge(graphdef, ref_params, router, rest)(
        batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    return jax.lax.stop_gradient(logits)


def dpo_loss_fn(params, router, rest, batch, rng, norm, ref=None, *, graphdef, cfg: Config):
    """loss_fn for cfg.align.method == 'dpo': the policy and the reference on the same pair rows.
    The reference is `ref` (a frozen copy of the base's parameters), or, with LoRA (ref None), the
    same model with its adapters set to zero: exactly the frozen base."""
    from moejax.finetune.objectives import dpo_share

    model = nnx.merge(graphdef, params, router, rest)
    tokens, pos, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    logits, aux = model(tokens, pos, seg, rng=rng)
    ref_logits = reference_logits(graphdef, params, router, rest, ref, batch)
    loss, metrics = dpo_share(logits, ref_logits, batch, norm["pairs"], cfg.align)
    return _with_moe_terms(loss, metrics, aux, batch, cfg, norm)


def reward_loss_fn(params, router, rest, batch, rng, norm, ref=None, *, graphdef, cfg: Config):
    """loss_fn for cfg.align.method == 'reward': Bradley-Terry on the pair rows
    (moejax.finetune.reward)."""
    from moejax.finetune.reward import reward_share

    model = nnx.merge(graphdef, params, router, rest)
    loss, metrics, aux = reward_share(model, batch, norm["pairs"], cfg.align.max_pairs_per_row, rng)
    return _with_moe_terms(loss, metrics, aux, batch, cfg, norm)


def grpo_loss_fn(params, router, rest, batch, rng, norm, ref=None, *, graphdef, cfg: Config):
    """loss_fn for cfg.align.method == 'grpo' (moejax.finetune.grpo): the policy over the rollout
    rows (on the sampler's experts with grpo.routing_replay) and, for the KL penalty, the reference
    (as in DPO)."""
    from moejax.finetune.grpo import grpo_share, split_routes

    g = cfg.grpo
    model = nnx.merge(graphdef, params, router, rest)
    tokens, pos, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    # (a pipeline does not carry the records: no disagreement metric there, and replay is refused up
    # front)
    routes = (
        None
        if cfg.mesh.stage > 1
        else split_routes(batch.get("routes"), cfg.model.num_experts_per_tok)
    )
    logits, aux = model(tokens, pos, seg, rng=rng, routes=routes, replay_routes=g.routing_replay)
    ref_logits = (
        reference_logits(graphdef, params, router, rest, ref, batch) if g.beta > 0 else None
    )
    loss, metrics = grpo_share(logits, ref_logits, batch, norm, g, g.max_new_tokens)
    if "route_mismatch" in aux:
        metrics["grpo/router_disagreement"] = aux["route_mismatch"].sum() / jnp.maximum(
            norm["rl_routes"], 1.0
        )
    return _with_moe_terms(loss, metrics, aux, batch, cfg, norm)


def loss_fn(params, router, rest, batch, rng, norm, ref=None, *, graphdef, cfg: Config):
    """This batch's (or microbatch's) share of the global loss: every term is a sum over its tokens
    (sequences) divided by the global count in `norm` (see `normalizers`), so that the shares of any
    split of a batch add up to the loss of the whole batch, and so do their gradients.

    Returns (loss, (metrics, stats)); metrics are shares too (sum them over microbatches).
    """
    if cfg.align.method == "dpo":
        return dpo_loss_fn(params, router, rest, batch, rng, norm, ref, graphdef=graphdef, cfg=cfg)
    if cfg.align.method == "reward":
        return reward_loss_fn(params, router, rest, batch, rng, norm, graphdef=graphdef, cfg=cfg)
    if cfg.align.method == "grpo":
        return grpo_loss_fn(params, router, rest, batch, rng, norm, ref, graphdef=graphdef, cfg=cfg)
    model = nnx.merge(graphdef, params, router, rest)
    mcfg = cfg.model
    logits, aux = model(
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        rng=rng,
        return_mtp=mcfg.mtp_depth > 0,
    )
    labels, valid = shifted_targets(batch, 1)
    ntok = jnp.maximum(norm["tokens"], 1.0)
    ce = token_loss_sum(logits, labels, valid) / ntok
    aux_loss = _moe_aux_loss(aux, cfg, norm)
    loss = ce + aux_loss
    metrics = {"ce_loss": ce, "aux_loss": aux_loss, "tokens": valid.sum().astype(jnp.float32)}
    if (ikl := _indexer_loss(aux, norm)) is not None:
        loss = loss + ikl
        metrics["indexer_kl"] = ikl
    if mcfg.mtp_depth:
        mtp = []
        for k in range(mcfg.mtp_depth):
            lab, val = shifted_targets(batch, k + 2)
            mtp.append(
                token_loss_sum(aux["mtp_logits"][k], lab, val) / jnp.maximum(norm["mtp"][k], 1.0)
            )
        mtp_loss = jnp.mean(jnp.stack(mtp))
        loss = loss + mcfg.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    if cfg.train.logit_z_loss:
        z = jax.nn.logsumexp(logits, axis=-1)
        zl = jnp.sum(jnp.square(z) * valid) / ntok
        loss = loss + cfg.train.logit_z_loss * zl
        metrics["logit_z_loss"] = zl
    metrics["loss"] = loss
    stats = {k: aux[k] for k in ("expert_counts", "dropped", "token_count") if k in aux}
    return loss, (metrics, stats)


def _tree_select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _skip_nonfinite(finite, tx, grads, opt_state, params):
    """(params, opt_state) after tx's update where `finite`, else as they were.

    On CPU a conditional skips the update: XLA:CPU ran the select over every parameter and moment
    as a memory pass of its own (the small benchmark's optimizer, 116M parameters: 1.7x the time
    of the conditional, ~0.25 s of a ~9 s step; `python -m benchmarks.cpu_ops`). Accelerators keep
    the select, which their compilers are expected to fuse into the update's elementwise kernels;
    a conditional there would read the predicate back to the host on GPU (neither measured: no
    accelerator was at hand)."""

    def update(_):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    if platform() == "cpu":
        return jax.lax.cond(finite, update, lambda _: (params, opt_state), None)
    new_params, new_opt = update(None)
    return _tree_select(finite, new_params, params), _tree_select(finite, new_opt, opt_state)


def applied_lr(opt_state, sched):
    """The learning rate the next update applies: the schedule at the optimizer's own step count
    (which does not advance on a skipped non-finite step, unlike state['step'])."""
    found = [
        s
        for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(s, optax.ScaleByScheduleState)
    ]
    if not found:
        raise ValueError(
            "applied_lr: the optimizer has no schedule state (optax.scale_by_schedule)"
        )
    return sched(found[0].count)


def make_train_step(
    graphdef, rest, tx, sched, cfg: Config, state_shardings=None, batch_sharding=None
):
    """Returns the jitted, state-donating train step; with shardings, the state keeps them. The
    model in graphdef carries its mesh and rules (moejax.trainer.setup builds it so)."""
    loss = functools.partial(loss_fn, graphdef=graphdef, cfg=cfg)
    warmup = cfg.model.index_topk and cfg.model.dsa_stage == "warmup"
    if warmup:
        # DeepSeek Sparse Attention's dense warm-up trains the indexers alone: the other weights
        # enter as constants, so no backward pass runs through them (their update is zero anyway)
        def loss(params, *args, _loss=loss, **kw):
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: (
                    x if "indexer" in jax.tree_util.keystr(p) else jax.lax.stop_gradient(x)
                ),
                params,
            )
            return _loss(params, *args, **kw)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    n_micro = cfg.train.microbatches

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params, router = state["params"], state["router"]
        rest_ = state.get("frozen", rest)  # LoRA: the frozen base weights travel in the state
        ref = state.get("reference")  # DPO without LoRA: the base's parameters
        norm = normalizers(batch, cfg, n_micro)
        if n_micro == 1:
            (_, (metrics, stats)), grads = grad_fn(params, router, rest_, batch, rng, norm, ref)
        else:
            # microbatch j = rows j, j + n_micro, ...: each device keeps its own rows in every
            # microbatch
            micro = jax.tree.map(
                lambda x: x.reshape((x.shape[0] // n_micro, n_micro) + x.shape[1:]).swapaxes(0, 1),
                batch,
            )  # [n_micro, B / n_micro, T]

            def body(acc, xs):
                mb, i = xs
                (_, (m, s)), g = grad_fn(
                    params, router, rest_, mb, jax.random.fold_in(rng, i), norm, ref
                )
                return jax.tree.map(jnp.add, acc, (g, m, s)), None

            shapes = jax.eval_shape(
                grad_fn, params, router, rest_, jax.tree.map(lambda x: x[0], micro), rng, norm, ref
            )
            (_, (m_shape, s_shape)), g_shape = shapes
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (g_shape, m_shape, s_shape))
            # every share is already divided by the global counts: the sums are the whole batch's
            # values
            (grads, metrics, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new_params, new_opt = _skip_nonfinite(finite, tx, grads, state["opt_state"], params)
        new_router = router
        if (
            stats
            and cfg.model.router.use_score_correction_bias
            and jax.tree.leaves(router)
            and not warmup  # (the warm-up changes nothing but the indexers)
        ):
            # merge a copy: the update writes into the merged model's Variables, which would
            # otherwise be `router`'s own, and a skipped step must keep the old biases
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, router), rest_)
            model.update_router_biases(stats["expert_counts"])
            new_router = nnx.state(model, RouterBias)
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "router": _tree_select(finite, new_router, router),
            "opt_state": new_opt,
            "rng": state["rng"],
            "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        }
        for k in ("frozen", "reference"):  # carried unchanged
            if k in state:
                new_state[k] = state[k]
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            lr=applied_lr(state["opt_state"], sched),
            skipped=(~finite).astype(jnp.int32),
        )
        if stats:
            metrics.update(moe_stats(stats, router, cfg.model.num_experts_per_tok))
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        train_step,
        donate_argnums=0,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
    )


def moe_stats(stats, router, top_k: int):
    """Per MoE layer [L_moe]: max/mean load, coefficient of variation, drop fraction, bias range."""
    counts = stats["expert_counts"]
    mean = counts.mean(-1)
    out = {
        "moe/max_over_mean_load": counts.max(-1) / jnp.maximum(mean, 1e-9),
        "moe/load_cv": counts.std(-1) / jnp.maximum(mean, 1e-9),
        "moe/drop_fraction": stats["dropped"] / jnp.maximum(stats["token_count"] * top_k, 1.0),
    }
    biases = [  # (V4's hash-routing tables are router state too, but no bias)
        v.get_value() for _, v in nnx.to_flat_state(router) if not isinstance(v, HashTable)
    ]
    if biases:
        flat = jnp.concatenate([b.reshape(-1, b.shape[-1]) for b in biases])  # [L_moe (+MTP), E]
        out["moe/bias_range"] = flat.max(-1) - flat.min(-1)
    return out


def _unit_counts():
    one = jnp.float32(1.0)
    return {"tokens": one, "real": one, "sequences": one, "microbatches": one}


def make_eval_step(graphdef, rest, cfg: Config):
    """Validation: (summed next-token cross-entropy, valid targets) of a batch; sum both over
    batches."""

    def eval_step(params, router, batch, frozen=None, reference=None):
        """{'loss': summed loss, 'count': its count} (next-token: tokens; DPO: pairs, plus 'correct'
        pairs)."""
        rest_ = rest if frozen is None else frozen
        if cfg.align.method in ("dpo", "reward"):
            norm = {"pairs": jnp.float32(1.0)}  # sums: divide by 1
            fn = dpo_loss_fn if cfg.align.method == "dpo" else reward_loss_fn
            _, (m, _) = fn(
                params,
                router,
                rest_,
                batch,
                None,
                dict(norm, **_unit_counts()),
                reference,
                graphdef=graphdef,
                cfg=cfg,
            )
            from moejax.finetune.objectives import count_pairs

            return {
                "loss": m["ce_loss"],
                "count": count_pairs(batch, cfg.align.max_pairs_per_row),
                "correct": m[f"{cfg.align.method}/accuracy"],
            }
        model = nnx.merge(graphdef, params, router, rest_)
        logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        labels, valid = shifted_targets(batch, 1)
        return {
            "loss": token_loss_sum(logits, labels, valid),
            "count": valid.sum().astype(jnp.float32),
        }

    return jax.jit(eval_step)
