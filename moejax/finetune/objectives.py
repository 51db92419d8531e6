"""Preference objectives on packed pair rows: DPO (sigmoid, label-smoothed) and IPO.

A preference batch holds pairs as consecutive segments of a row (moejax.finetune.data, kind
'preference'): segment 2k + 1 is pair k's chosen completion, segment 2k + 2 its rejected one, both
after the same prompt, with `loss_mask` on the completion tokens. A sequence's log-probability is
the sum over its completion tokens of log p(token | everything before it in its segment).

DPO (Rafailov et al. 2023), with h = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)]:
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    (eps: label smoothing, cDPO)
IPO (Azar et al. 2023), on per-token average log-probabilities:
    loss = (h - 1 / (2 beta))^2
The implicit rewards are beta (log pi - log ref) of each completion; accuracy is the share of pairs
whose chosen reward is the larger. Every term is a sum over the batch's pairs divided by the global
pair count, so that microbatches and data-parallel shards add up to the whole batch's loss (as the
pretraining losses do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import AlignConfig


def token_logps(logits, batch):
    """log p(label) of each next-token target and its validity mask (loss_mask included): [B, T]
    each."""
    from moejax.trainer.step import shifted_targets

    labels, valid = shifted_targets(batch, 1)
    lp = jnp.take_along_axis(
        jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels[..., None], axis=-1
    )
    return lp[..., 0] * valid, valid


def segment_sums(values, segment_ids, num_segments: int):
    """[B, T] values summed per segment 1..num_segments -> [B, num_segments] (segment 0, padding, is
    dropped)."""
    onehot = jax.nn.one_hot(
        segment_ids - 1, num_segments, dtype=jnp.float32
    )  # [B, T, S]; -1 -> zeros
    return jnp.einsum("BTS,BT->BS", onehot, values.astype(jnp.float32))


def pair_logps(logits, batch, max_pairs: int):
    """(chosen, rejected) summed completion log-probs [B, P], their token counts [B, P] each, and
    which pairs exist [B, P] (both completions have a target)."""
    lp, valid = token_logps(logits, batch)
    seg = batch["segment_ids"]
    sums = segment_sums(lp, seg, 2 * max_pairs)
    counts = segment_sums(valid, seg, 2 * max_pairs)
    exists = (counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)
    return (sums[:, 0::2], sums[:, 1::2]), (counts[:, 0::2], counts[:, 1::2]), exists


def count_pairs(batch, max_pairs: int):
    """The number of complete pairs in a batch (float32), for the global normalizer."""
    from moejax.trainer.step import shifted_targets

    _, valid = shifted_targets(batch, 1)
    counts = segment_sums(valid, batch["segment_ids"], 2 * max_pairs)
    return jnp.sum((counts[:, 0::2] > 0) & (counts[:, 1::2] > 0)).astype(jnp.float32)


def dpo_terms(policy, reference, counts, exists, cfg: AlignConfig):
    """Per-pair loss, implicit rewards and margin: policy/reference are (chosen, rejected) [B, P]
    summed log-probs, counts their token counts. Returns (loss [B, P], chosen_reward,
    rejected_reward), zero where no pair."""
    (pc, pr), (rc, rr) = policy, jax.lax.stop_gradient(reference)
    if cfg.dpo_loss == "ipo":
        nc, nr = jnp.maximum(counts[0], 1.0), jnp.maximum(counts[1], 1.0)
        h = (pc - rc) / nc - (pr - rr) / nr
        loss = jnp.square(h - 1.0 / (2.0 * cfg.beta))
    else:
        h = (pc - rc) - (pr - rr)
        eps = cfg.label_smoothing
        loss = -(1.0 - eps) * jax.nn.log_sigmoid(cfg.beta * h) - eps * jax.nn.log_sigmoid(
            -cfg.beta * h
        )
    chosen_r, rejected_r = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
    z = jnp.zeros_like(loss)
    return (
        jnp.where(exists, loss, z),
        jnp.where(exists, jax.lax.stop_gradient(chosen_r), z),
        jnp.where(exists, jax.lax.stop_gradient(rejected_r), z),
    )


def dpo_share(logits, ref_logits, batch, n_pairs, cfg: AlignConfig):
    """This batch's share of the global DPO loss (a sum over its pairs / the global pair count) and
    metric shares (accuracy, margin, chosen/rejected rewards, the chosen completions' NLL per
    pair)."""
    policy, counts, exists = pair_logps(logits, batch, cfg.max_pairs_per_row)
    reference, _, _ = pair_logps(ref_logits, batch, cfg.max_pairs_per_row)
    loss, cr, rr = dpo_terms(policy, reference, counts, exists, cfg)
    n = jnp.maximum(n_pairs, 1.0)
    metrics = {
        "dpo/accuracy": jnp.sum(exists & (cr > rr)) / n,
        "dpo/margin": jnp.sum(cr - rr) / n,
        "dpo/chosen_reward": jnp.sum(cr) / n,
        "dpo/rejected_reward": jnp.sum(rr) / n,
        "dpo/chosen_nll": -jnp.sum(jnp.where(exists, jax.lax.stop_gradient(policy[0]), 0.0)) / n,
    }
    return jnp.sum(loss) / n, metrics
