"""A reward model: the MoE transformer with a scalar head, trained on preference pairs
(Bradley-Terry).

The reward of a sequence is w . h + b, where h is the final-normed hidden state at its last token
(the answer's EOS) and (w, b) the `RewardHead` parameters. For a pair,

    loss = -log sigmoid(r(chosen) - r(rejected))

averaged over the batch's pairs (shares of the global pair count, as every moejax loss); pairwise
accuracy is the share of pairs ranked right. Pairs are packed as in DPO (moejax.finetune.data, kind
'preference': chosen in segment 2k + 1, rejected in 2k + 2). With LoRA the base is frozen and the
head trains with the adapters. `score` gives the reward of every segment of a batch (GRPO's optional
reward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RewardHead(nnx.Param):
    """The scalar reward projection's weight [D] or bias [] (trainable, also under LoRA)."""


def add_head(model, seed: int = 0):
    """Gives a Transformer a reward head (`reward_w` ~ N(0, 1/D), `reward_b` = 0, as TRL initializes
    its score head: a zero weight would leave the trunk without gradient at the start); in place,
    returns the model."""
    D = model.cfg.hidden_size
    w = jax.random.normal(jax.random.key(seed), (D,), jnp.float32) / jnp.sqrt(D)
    model.reward_w = RewardHead(w, logical_axes=("embed",))
    model.reward_b = RewardHead(jnp.zeros((), jnp.float32), logical_axes=())
    return model


def last_positions(segment_ids, num_segments: int):
    """Index of the last token of segments 1..num_segments in each row [B, S] (0 for an absent
    segment)."""
    T = segment_ids.shape[1]
    onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.int32)  # [B, T, S]
    return jnp.max(onehot * jnp.arange(T, dtype=jnp.int32)[None, :, None], axis=1)


def score(model, tokens, positions, segment_ids, num_segments: int, rng=None):
    """Rewards of segments 1..num_segments [B, S] float32 (and the model's aux outputs)."""
    _, aux = model(tokens, positions, segment_ids, rng=rng, return_hidden=True)
    h = aux["hidden"].astype(jnp.float32)  # [B, T, D]
    idx = last_positions(segment_ids, num_segments)  # [B, S]
    h_last = jnp.take_along_axis(h, idx[..., None], axis=1)  # [B, S, D]
    return jnp.einsum("BSD,D->BS", h_last, model.reward_w[...]) + model.reward_b[...], aux


def reward_share(model, batch, n_pairs, max_pairs: int, rng=None):
    """This batch's share of the Bradley-Terry loss over the global pair count, metric shares, and
    aux."""
    from moejax.finetune.objectives import segment_sums
    from moejax.trainer.step import shifted_targets

    r, aux = score(
        model, batch["tokens"], batch["positions"], batch["segment_ids"], 2 * max_pairs, rng
    )
    _, valid = shifted_targets(batch, 1)
    counts = segment_sums(valid, batch["segment_ids"], 2 * max_pairs)
    exists = (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)  # [B, P]
    diff = r[:, 0::2] - r[:, 1::2]
    n = jnp.maximum(n_pairs, 1.0)
    loss = jnp.sum(jnp.where(exists, -jax.nn.log_sigmoid(diff), 0.0)) / n
    d = jax.lax.stop_gradient(diff)
    metrics = {
        "reward/accuracy": jnp.sum(exists & (d > 0)) / n,
        "reward/margin": jnp.sum(jnp.where(exists, d, 0.0)) / n,
        "reward/chosen": jnp.sum(jnp.where(exists, jax.lax.stop_gradient(r[:, 0::2]), 0.0)) / n,
    }
    return loss, metrics, aux
