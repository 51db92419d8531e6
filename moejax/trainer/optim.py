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
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[-1] == "value":  # nnx Variables flatten to their value attribute
            names = names[:-1]
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


def make_optimizer(cfg: OptimConfig, params: nnx.State, total_steps: int):
    """Returns (optax transformation, schedule)."""
    sched = schedule(cfg, total_steps)
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
