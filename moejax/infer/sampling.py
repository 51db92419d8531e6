"""Sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, per request.

Each row of a batch carries its own parameters (`SamplingParams`, stacked by `rows`), so one
compiled step serves any mix of requests. The order is Hugging Face's: repetition penalty on the raw
logits, then temperature, top-k, top-p, min-p. Randomness is per request: row b's key at position p
is fold_in(key(seed_b), p), so a request gives the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = (
        1.0  # > 1 discourages tokens of the prompt and the output (CTRL / HF rule)
    )
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # the output ends before the first of these strings
    seed: int = 0

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "max_new_tokens": self.max_new_tokens >= 1,
        }
        allowed = {
            "temperature": ">= 0",
            "top_k": ">= 0",
            "top_p": "in (0, 1]",
            "min_p": "in [0, 1]",
            "repetition_penalty": "> 0",
            "max_new_tokens": ">= 1",
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"sampling.{name}: must be {allowed[name]}, got {getattr(self, name)!r}"
                )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"sampling.seed: must be in [0, 2**32), got {self.seed}")


def rows(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row parameter arrays for a batch."""
    return {
        "temperature": np.array([p.temperature for p in params], np.float32),
        "top_k": np.array([p.top_k for p in params], np.int32),
        "top_p": np.array([p.top_p for p in params], np.float32),
        "min_p": np.array([p.min_p for p in params], np.float32),
        "penalty": np.array([p.repetition_penalty for p in params], np.float32),
        "max_new": np.array([p.max_new_tokens for p in params], np.int32),
        "seed": np.array([p.seed for p in params], np.uint32),
    }


def keys(seed, position, salt: int = 0):
    """Row b's key for the token at `position` [B] (salt separates draws of one step)."""

    def one(s, p):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(s), p), salt)

    return jax.vmap(one)(seed, position)


def penalize(logits, presence, penalty):
    """HF's repetition penalty: logits [B, V] of tokens present [B, V] divided by penalty [B] when
    positive, multiplied when negative."""
    p = penalty[:, None]
    hit = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(presence, hit, logits)


def mode(params: list[SamplingParams]) -> str:
    """What a batch needs, so that a compiled step does only that: 'greedy' (argmax only), 'plain'
    (temperature and min-p: no sort) or 'full' (top-k / top-p: one sort of the vocabulary per
    step)."""
    if all(p.temperature <= 0 for p in params):
        return "greedy"
    if any(p.temperature > 0 and (p.top_k or p.top_p < 1) for p in params):
        return "full"
    return "plain"


def filtered(logits, r, mode: str = "full"):
    """Temperature-scaled logits [B, V] with tokens outside top-k, top-p and min-p set to -inf
    (rows with temperature 0 are returned unscaled: they are greedy). mode 'plain' skips
    top-k / top-p."""
    V = logits.shape[-1]
    t = r["temperature"]
    x = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)[:, None]
    top = jnp.max(x, axis=-1, keepdims=True)
    min_p = r["min_p"][:, None]
    cut = jnp.where(min_p > 0, top + jnp.log(jnp.maximum(min_p, 1e-30)), -jnp.inf)
    if mode == "full":
        desc = -jnp.sort(-x, axis=-1)  # [B, V] largest first
        k = jnp.where(r["top_k"] > 0, jnp.minimum(r["top_k"], V), V)
        in_k = jnp.arange(V)[None] < k[:, None]
        desc = jnp.where(in_k, desc, -jnp.inf)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
        p = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # probability mass ranked above each token
        # the first token is always kept; top_p = 1 keeps all (a float32 cumsum can reach 1 before
        # the tail)
        keep = in_k & ((before < r["top_p"][:, None]) | (r["top_p"][:, None] >= 1.0))
        p_cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        cut = jnp.maximum(cut, jnp.maximum(kth, p_cut))
    return jnp.where(x >= cut, x, -jnp.inf)


def distribution(logits, r, mode: str = "full"):
    """The sampling distribution [B, V] (float32): one-hot on the argmax for greedy rows."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    if mode == "greedy":
        return greedy
    probs = jax.nn.softmax(filtered(logits, r, mode), axis=-1)
    return jnp.where((r["temperature"] > 0)[:, None], probs, greedy)


def choose(key, logits, r, mode: str = "full"):
    """One token per row [B] int32: argmax for greedy rows, else a draw from the filtered
    distribution. key: per-row keys [B]."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return best
    drawn = jax.vmap(jax.random.categorical)(key, filtered(logits, r, mode))
    return jnp.where(r["temperature"] > 0, drawn, best).astype(jnp.int32)


def draw(key, probs):
    """One token per row from probabilities [B, V] (rows summing to 0 are not expected)."""
    return jax.vmap(jax.random.categorical)(key, jnp.log(probs)).astype(jnp.int32)


def speculative_accept(key_u, key_r, p, q, draft, greedy, all_greedy: bool = False):
    """Speculative sampling's rule for one drafted token per row.

    The draft d [B] was drawn from q [B, V]; p [B, V] is the target distribution. Accept d with
    probability min(1, p(d) / q(d)); otherwise draw from max(p - q, 0) renormalized. The result is
    distributed as p (Leviathan et al. 2023, Chen et al. 2023). Greedy rows (p one-hot) accept iff d
    is p's argmax; all_greedy (static) skips the random draws. Returns (accepted bool [B], token
    int32 [B]).
    """
    best = jnp.argmax(p, axis=-1)
    if all_greedy:  # no randomness to draw
        return best == draft, best.astype(jnp.int32)
    p_d = jnp.take_along_axis(p, draft[:, None], axis=1)[:, 0]
    q_d = jnp.take_along_axis(q, draft[:, None], axis=1)[:, 0]
    u = jax.vmap(jax.random.uniform)(key_u)
    accept = jnp.where(greedy, best == draft, u * q_d < p_d)
    residual = jnp.maximum(p - q, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    other = jnp.where(greedy, best, draw(key_r, residual))
    return accept, jnp.where(accept, draft, other).astype(jnp.int32)


def token_logprob(logits, tokens):
    """log softmax(logits)[token] per row: the model's own (unprocessed) log-probability."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
