"""Sampling continuations from a trained model (full recompute per token; no KV cache yet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(graphdef, params, router, rest, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
           seed: int = 0) -> list[str]:
    """Returns one continuation per prompt (temperature sampling; 0 = greedy)."""
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    B = len(encoded)
    L = max(len(e) for e in encoded) + max_new_tokens
    buf = np.full((B, L), tokenizer.pad_id, np.int32)
    lengths = np.array([len(e) for e in encoded])
    for i, e in enumerate(encoded):
        buf[i, : len(e)] = e

    @jax.jit
    def next_logits(tokens, lengths):
        model = nnx.merge(graphdef, params, router, rest)
        seg = (jnp.arange(L)[None] < lengths[:, None]).astype(jnp.int32)  # pad after the prefix
        logits, _ = model(tokens, segment_ids=seg)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]

    key = jax.random.key(seed)
    start = lengths.copy()
    done = np.zeros(B, bool)
    for _ in range(max_new_tokens):
        logits = next_logits(jnp.asarray(buf), jnp.asarray(lengths))
        key, sub = jax.random.split(key)
        if temperature > 0:
            nxt = np.asarray(jax.random.categorical(sub, logits / temperature))
        else:
            nxt = np.asarray(jnp.argmax(logits, -1))
        for i in range(B):
            if not done[i]:
                buf[i, lengths[i]] = nxt[i]
                lengths[i] += 1
                done[i] = nxt[i] == tokenizer.eos_id
        if done.all():
            break
    return [tokenizer.decode([t for t in buf[i, start[i]:lengths[i]] if t != tokenizer.eos_id]) for i in range(B)]
