"""The pure train step: `train_step(state, batch) -> (state, metrics)`, and the eval step.

The train state is a pytree dict: step, params (nnx.State of Params, float32 master weights),
router (nnx.State of the aux-loss-free biases), opt_state, rng (raw key data) and nonfinite
(the count of consecutive skipped steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax import sharding
from moejax.config import Config
from moejax.model import RouterBias, Transformer


def split_model(model: Transformer):
    """graphdef, params, router biases, everything else (empty for the current model)."""
    return nnx.split(model, nnx.Param, RouterBias, ...)


def init_state(cfg: Config, tx: optax.GradientTransformation):
    """Builds the model from cfg.train.seed and returns (graphdef, rest, state)."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params, router, rest = split_model(model)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "router": router,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        "nonfinite": jnp.zeros((), jnp.int32),
    }
    return graphdef, rest, state


def token_loss(logits, labels, valid):
    """Mean cross-entropy over valid positions; logits [B, T, V] float32, labels/valid [B, T]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    valid = valid.astype(jnp.float32)
    return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1.0), valid.sum()


def shifted_targets(batch, shift: int):
    """Labels `shift` tokens ahead and where they are valid (same document, not padding).

    Returns labels [B, T] and valid [B, T] (positions t + shift >= T are invalid).
    """
    tokens, seg = batch["tokens"], batch["segment_ids"]
    B, T = tokens.shape
    pad = jnp.zeros((B, shift), tokens.dtype)
    labels = jnp.concatenate([tokens[:, shift:], pad], axis=1)
    seg_ahead = jnp.concatenate([seg[:, shift:], jnp.zeros((B, shift), seg.dtype)], axis=1)
    valid = (seg > 0) & (seg_ahead == seg)
    return labels, valid


def loss_fn(params, router, rest, batch, rng, *, graphdef, cfg: Config):
    model = nnx.merge(graphdef, params, router, rest)
    mcfg = cfg.model
    logits, aux = model(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng,
                        return_mtp=mcfg.mtp_depth > 0)
    labels, valid = shifted_targets(batch, 1)
    ce, ntok = token_loss(logits, labels, valid)
    loss = ce + aux["aux_loss"]
    metrics = {"ce_loss": ce, "aux_loss": aux["aux_loss"], "tokens": ntok}
    if mcfg.mtp_depth:
        mtp = []
        for k in range(mcfg.mtp_depth):
            lab, val = shifted_targets(batch, k + 2)
            mtp.append(token_loss(aux["mtp_logits"][k], lab, val)[0])
        mtp_loss = jnp.mean(jnp.stack(mtp))
        loss = loss + mcfg.mtp_loss_weight * mtp_loss
        metrics["mtp_loss"] = mtp_loss
    if cfg.train.logit_z_loss:
        z = jax.nn.logsumexp(logits, axis=-1)
        zl = jnp.sum(jnp.square(z) * valid) / jnp.maximum(valid.sum(), 1.0)
        loss = loss + cfg.train.logit_z_loss * zl
        metrics["logit_z_loss"] = zl
    metrics["loss"] = loss
    stats = {k: aux[k] for k in ("expert_counts", "drop_fraction") if k in aux}
    return loss, (metrics, stats)


def _tree_select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_train_step(graphdef, rest, tx, sched, cfg: Config, state_shardings=None, batch_sharding=None):
    """Returns the jitted, state-donating train step; with shardings, the state keeps them."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, cfg=cfg), has_aux=True)
    n_micro = cfg.train.microbatches

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params, router = state["params"], state["router"]
        if n_micro == 1:
            (_, (metrics, stats)), grads = grad_fn(params, router, rest, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:]), batch)

            def body(acc, xs):
                mb, i = xs
                (_, (m, s)), g = grad_fn(params, router, rest, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, (g, m, s)), None

            shapes = jax.eval_shape(grad_fn, params, router, rest, jax.tree.map(lambda x: x[0], micro), rng)
            (_, (m_shape, s_shape)), g_shape = shapes
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (g_shape, m_shape, s_shape))
            (grads, metrics, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n_micro)))
            grads = jax.tree.map(lambda g: g / n_micro, grads)
            metrics = {k: (v if k == "tokens" else v / n_micro) for k, v in metrics.items()}
            stats = {"expert_counts": stats["expert_counts"], "drop_fraction": stats["drop_fraction"] / n_micro} \
                if stats else stats
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_router = router
        if stats and cfg.model.use_score_correction_bias:
            model = nnx.merge(graphdef, params, router, rest)
            model.update_router_biases(stats["expert_counts"])
            new_router = nnx.state(model, RouterBias)
        new_state = {
            "step": state["step"] + 1,
            "params": _tree_select(finite, new_params, params),
            "router": _tree_select(finite, new_router, router),
            "opt_state": _tree_select(finite, new_opt, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        }
        metrics = dict(metrics, grad_norm=grad_norm, lr=sched(state["step"]), skipped=(~finite).astype(jnp.int32))
        if stats:
            metrics.update(moe_stats(stats, router))
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    mesh = batch_sharding.mesh

    def meshed_step(state, batch):
        with sharding.activate(mesh, sharding.rules_for(cfg.mesh)):
            return train_step(state, batch)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(meshed_step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated))


def moe_stats(stats, router):
    """Per MoE layer [L_moe]: max/mean load, coefficient of variation, drop fraction, bias range."""
    counts = stats["expert_counts"]
    mean = counts.mean(-1)
    out = {
        "moe/max_over_mean_load": counts.max(-1) / jnp.maximum(mean, 1e-9),
        "moe/load_cv": counts.std(-1) / jnp.maximum(mean, 1e-9),
        "moe/drop_fraction": stats["drop_fraction"],
    }
    biases = [v.get_value() for _, v in nnx.to_flat_state(router)]
    if biases:
        flat = jnp.concatenate([b.reshape(-1, b.shape[-1]) for b in biases])  # [L_moe (+MTP), E]
        out["moe/bias_range"] = flat.max(-1) - flat.min(-1)
    return out


def make_eval_step(graphdef, rest, cfg: Config, mesh=None):
    """Validation loss; with a mesh, traced with it active (the expert-parallel MoE path)."""

    def eval_step(params, router, batch):
        if mesh is None:
            loss, (metrics, _) = loss_fn(params, router, rest, batch, None, graphdef=graphdef, cfg=cfg)
        else:
            with sharding.activate(mesh, sharding.rules_for(cfg.mesh)):
                loss, (metrics, _) = loss_fn(params, router, rest, batch, None, graphdef=graphdef, cfg=cfg)
        return metrics["ce_loss"], metrics["tokens"]

    return jax.jit(eval_step)
