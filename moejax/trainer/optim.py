"""AdamW with a weight-decay mask, warmup + cosine or warmup-stable-decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from moejax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm]
        )
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warm, max(total_steps, warm + 1), end_value=floor
        )
    # warmup-stable-decay: linear warmup, flat, then linear decay over the last decay_fraction of
    # steps
    decay = max(1, int(round(total_steps * cfg.decay_fraction)))
    stable_end = max(warm, total_steps - decay)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warm),
            optax.constant_schedule(peak),
            optax.linear_schedule(peak, floor, total_steps - stable_end),
        ],
        [warm, stable_end],
    )


def decay_mask(params: nnx.State, cfg: OptimConfig):
    """True for parameters that get weight decay. Norm scales, embeddings/LM head and biases are
    excluded unless the config says otherwise."""

    def wants_decay(path, _):
        names = _names(path)  # (nnx Variables flatten to their value attribute)
        leaf = names[-1]
        joined = "/".join(names)
        if "norm" in joined and not cfg.decay_norms:
            return False
        if leaf in ("embed", "lm_head") and not cfg.decay_embeddings:
            return False
        if leaf.startswith("b_") or leaf == "bias":
            return cfg.decay_biases
        return True

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def _names(path) -> list[str]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[:-1] if names and names[-1] == "value" else names


def make_optimizer(cfg: OptimConfig, params: nnx.State, total_steps: int, trainable=None):
    """Returns (optax transformation, schedule). trainable: a predicate on a parameter's path names;
    the others get no update and no optimizer state (DeepSeek Sparse Attention's warm-up trains
    only the indexers)."""
    sched = schedule(cfg, total_steps)
    if trainable is not None:
        tx, _ = make_optimizer(cfg, params, total_steps)
        labels = jax.tree_util.tree_map_with_path(
            lambda p, _: "train" if trainable(_names(p)) else "frozen", params
        )
        if "train" not in jax.tree.leaves(labels):
            raise ValueError("make_optimizer: `trainable` selects no parameter")
        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), sched
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            sched,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params, cfg),
        )
    )
    return optax.chain(*parts), sched
