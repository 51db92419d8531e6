"""Timing helpers shared by the benchmarks: warm up, then the median of several timed repeats."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def time_fn(fn, *args, iters: int = 10, repeats: int = 3, warmup: int = 2) -> float:
    """Median seconds per call of a jitted fn (blocks on the result)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def matmul_peak(dtype=jnp.bfloat16, size: int | None = None) -> float:
    """Measured FLOP/s of one square matmul (bf16 in, float32 accumulation) on the default
    device."""
    on_cpu = jax.default_backend() == "cpu"
    n = size or (1024 if on_cpu else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
    sec = time_fn(f, a, b, iters=3 if on_cpu else 20)
    return 2 * n**3 / sec


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"
