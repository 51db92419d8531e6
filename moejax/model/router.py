"""The router: its module (`Router`: weight, correction bias, jitter) and the top-k routing rule
(float32): softmax or sigmoid scores, group-limited selection, correction bias.

A new router is a new module here with the same call, `Router(x [M, D], rng) -> Routing`; the MoE
layer (moejax.model.moe) owns one and never looks inside it.

The selection rule follows DeepSeek-V2/V3 (and their Hugging Face ports) exactly:
  scores = softmax(logits) or sigmoid(logits)                              [M, E]
  choice = scores + bias        (bias: aux-loss-free balancing, selection only)
  groups: score of a group = max(choice) without a bias, sum of its top-2 with one;
          keep the topk_group best groups, mask the rest to -inf
  top-k experts by choice; weights gathered from the *unbiased* scores
  norm_topk_prob: weights /= (sum + 1e-20); then weights *= routed_scaling_factor
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig


class RouterBias(nnx.Variable):
    """Non-trainable router state: the aux-loss-free balancing bias (changed only by
    `update_router_bias`) and DeepSeek-V4's hash-routing table (`HashTable`, never changed)."""


class HashTable(RouterBias):
    """DeepSeek-V4's frozen token id -> expert ids table, int32 [V, K] (never trained)."""


class Routing(NamedTuple):
    expert_ids: jax.Array  # int32 [M, K]
    weights: jax.Array  # float32 [M, K]
    scores: jax.Array  # float32 [M, E], unbiased
    logits: jax.Array  # float32 [M, E]


class Router(nnx.Module):
    """The gate of a MoE layer: w [D, E] (float32, whatever the parameter dtype), the aux-loss-free
    correction bias [E] (when cfg.router.use_score_correction_bias) and Switch-style
    multiplicative jitter on its inputs (cfg.router.jitter, training only: when a rng is given).
    Its settings are the model config's router section (config.RouterConfig)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E = cfg.hidden_size, cfg.n_routed_experts
        self.cfg = cfg
        self.w = nnx.Param(
            cfg.initializer_range * jax.random.normal(rngs.params(), (D, E), jnp.float32),
            logical_axes=("embed", None),
        )
        if cfg.router.use_score_correction_bias:
            self.bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,))

    def logits(self, x, rng=None):
        """x [M, D] -> float32 logits [M, E] (jittered inputs when rng is given)."""
        cfg = self.cfg
        x = x.astype(jnp.float32)
        if rng is not None and cfg.router.jitter > 0:
            noise = jax.random.uniform(
                rng, x.shape, jnp.float32, 1 - cfg.router.jitter, 1 + cfg.router.jitter
            )
            x = x * noise
        return jnp.dot(x, self.w[...].astype(jnp.float32))

    def __call__(self, x, rng=None, ids=None) -> Routing:
        """x [M, D] -> the Routing of every row (this router's choice, before any replay). ids:
        the rows' token ids [M] (read by HashRouter only)."""
        bias = self.bias[...] if self.cfg.router.use_score_correction_bias else None
        return route(self.logits(x, rng), bias, self.cfg)

    def update_bias(self, counts, rate: float) -> None:
        """The aux-loss-free step on this router's bias from a global batch's expert counts."""
        self.bias[...] = update_router_bias(self.bias[...], counts, rate)


class HashRouter(Router):
    """DeepSeek-V4's hash routing (its first num_hash_layers MoE layers): each token's experts are
    a frozen lookup `table[token id]`; the learned gate only weighs them (scores as `route`,
    gathered at the looked-up experts, normalized and scaled). There is no correction bias.

    A fresh table gives each vocabulary id K distinct experts drawn uniformly (a checkpoint's
    table, e.g. V4's `tid2eid`, replaces it)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, K, V = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size
        self.cfg = cfg
        self.w = nnx.Param(
            cfg.initializer_range * jax.random.normal(rngs.params(), (D, E), jnp.float32),
            logical_axes=("embed", None),
        )
        draw = jax.random.uniform(rngs.params(), (V, E))
        table = jax.lax.top_k(draw, K)[1].astype(jnp.int32)  # K distinct experts per id
        self.table = HashTable(table, logical_axes=("vocab", None))

    def __call__(self, x, rng=None, ids=None) -> Routing:
        if ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids of its rows")
        logits = self.logits(x, rng)
        scores = score(logits, self.cfg)
        expert_ids = jnp.take(self.table[...], ids.reshape(-1), axis=0).astype(jnp.int32)
        return Routing(expert_ids, gate_weights(scores, expert_ids, self.cfg), scores, logits)

    def update_bias(self, counts, rate: float) -> None:
        """Hash routing has no balancing bias: the table is fixed."""


def score(logits, cfg: ModelConfig):
    """Router scores [M, E] float32 from logits by cfg.router.score_func."""
    logits = logits.astype(jnp.float32)
    if cfg.router.score_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if cfg.router.score_func == "sqrtsoftplus":  # DeepSeek-V4
        return jnp.sqrt(jax.nn.softplus(logits))
    return jax.nn.sigmoid(logits)


def route(logits, bias, cfg: ModelConfig) -> Routing:
    """Selects cfg.num_experts_per_tok experts per row.

    Args:
      logits: float32 [M, E] router logits.
      bias: float32 [E] correction bias added for selection only, or None.
    """
    M, E = logits.shape
    logits = logits.astype(jnp.float32)
    scores = score(logits, cfg)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)[None]
    if cfg.router.n_group > 1:
        G = cfg.router.n_group
        grouped = choice.reshape(M, G, E // G)  # [M, G, E/G]
        if bias is None:
            group_scores = grouped.max(axis=-1)  # [M, G]
        else:
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.router.topk_group)  # [M, topk_group]
        group_mask = jnp.zeros((M, G), bool).at[jnp.arange(M)[:, None], top_groups].set(True)
        expert_mask = jnp.repeat(group_mask, E // G, axis=1)  # [M, E]
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, expert_ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)  # [M, K]
    return Routing(
        expert_ids.astype(jnp.int32), gate_weights(scores, expert_ids, cfg), scores, logits
    )


def gate_weights(scores, expert_ids, cfg: ModelConfig):
    """The gate weights of the chosen experts [M, K]: their unbiased scores, normalized
    (norm_topk_prob) and scaled by routed_scaling_factor."""
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if cfg.router.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.router.routed_scaling_factor


def replayed(r: Routing, expert_ids, cfg: ModelConfig) -> Routing:
    """Routing replay (Rollout Routing Replay, arXiv 2510.11370): the experts chosen elsewhere (by
    the sampler, expert_ids int [M, K]; a row of -1 was not recorded and keeps this router's choice)
    with gate weights recomputed from this router's scores, so the router still learns through
    them."""
    expert_ids = jnp.where(
        (expert_ids >= 0).all(axis=-1, keepdims=True), expert_ids, r.expert_ids
    ).astype(jnp.int32)
    return r._replace(expert_ids=expert_ids, weights=gate_weights(r.scores, expert_ids, cfg))


def disagreement(r: Routing, expert_ids, token_mask):
    """(recorded assignments expert_ids [M, K] this routing does not make, recorded assignments),
    over real tokens whose choice was recorded (a row of -1 was not)."""
    recorded = (expert_ids >= 0).all(axis=-1).astype(jnp.float32) * token_mask  # [M]
    same = (expert_ids[:, :, None] == r.expert_ids[:, None, :]).any(axis=-1)  # [M, K]
    return jnp.sum((~same) * recorded[:, None]), jnp.sum(recorded) * expert_ids.shape[-1]


def expert_counts(expert_ids, num_experts: int, token_mask=None):
    """Tokens assigned to each expert, float32 [E]; rows with token_mask == 0 do not count."""
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32).sum(axis=1)  # [M, E]
    if token_mask is not None:
        onehot = onehot * token_mask[:, None]
    return onehot.sum(axis=0)


def balance_probs(routing: Routing, cfg: ModelConfig):
    """Per-token probabilities over experts used by the balance losses: the softmax scores, or
    sigmoid (sqrt-softplus) scores normalised to sum to one (DeepSeek-V3's s'_{i,t})."""
    if cfg.router.score_func == "softmax":
        return routing.scores
    return routing.scores / (routing.scores.sum(axis=-1, keepdims=True) + 1e-20)


def switch_loss(routing: Routing, cfg: ModelConfig, token_mask):
    """Switch Transformer balance loss E * sum_i f_i P_i, with f_i the fraction of the M*K
    assignments that go to expert i and P_i the mean routing probability; 1 when balanced."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    n = jnp.maximum(token_mask.sum(), 1.0)
    f = expert_counts(routing.expert_ids, E, token_mask) / (n * K)
    p = (balance_probs(routing, cfg) * token_mask[:, None]).sum(axis=0) / n
    return E * jnp.sum(f * p)


def sequence_balance_terms(routing: Routing, cfg: ModelConfig, token_mask, batch: int):
    """DeepSeek-V3's sequence-wise balance loss per sequence, sum_i f_i P_i with f_i = E / (K
    T) * count_i and P_i = mean_t s'_{i,t} (1 when balanced). Returns (its sum over the sequences
    that hold tokens, how many those are), so that microbatches and pipeline stages combine it
    exactly."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    M = token_mask.shape[0]
    T = M // batch
    mask = token_mask.reshape(batch, T)
    ntok = jnp.maximum(mask.sum(axis=1), 1.0)  # [B]
    onehot = jax.nn.one_hot(routing.expert_ids, E, dtype=jnp.float32).sum(axis=1)  # [M, E]
    counts = (onehot.reshape(batch, T, E) * mask[..., None]).sum(axis=1)  # [B, E]
    f = counts * E / (K * ntok[:, None])
    p = (balance_probs(routing, cfg).reshape(batch, T, E) * mask[..., None]).sum(axis=1) / ntok[
        :, None
    ]
    per_seq = jnp.sum(f * p, axis=-1)  # [B]
    has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens), has_tokens.sum()


def sequence_balance_loss(routing: Routing, cfg: ModelConfig, token_mask, batch: int):
    """The sequence-wise balance loss averaged over the sequences that hold tokens."""
    total, count = sequence_balance_terms(routing, cfg, token_mask, batch)
    return total / jnp.maximum(count, 1.0)


def router_z_terms(routing: Routing, token_mask):
    """ST-MoE router z-loss terms: (sum of logsumexp(logits)^2 over real tokens, their count)."""
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    return jnp.sum(jnp.square(z) * token_mask), token_mask.sum()


def router_z_loss(routing: Routing, token_mask):
    """ST-MoE router z-loss: mean of logsumexp(logits)^2."""
    total, count = router_z_terms(routing, token_mask)
    return total / jnp.maximum(count, 1.0)


def update_router_bias(bias, counts, rate: float):
    """Auxiliary-loss-free balancing: b_i += rate * sign(mean_load - load_i).

    Args:
      bias: float32 [..., E]; counts: [..., E] token counts over the whole global batch.
    """
    counts = counts.astype(jnp.float32)
    mean = counts.mean(axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - counts)
