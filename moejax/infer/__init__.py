"""Inference: KV caches (absorbed MLA), cached prefill/decode, sampling, MTP speculative decoding,
weight quantization (moejax.infer.quantize), a content-safety filter (moejax.infer.safety) and
request batching for the server (moejax.infer.engine)."""

from moejax.infer.cache import KVCache, bytes_per_token, init_cache
from moejax.infer.generate import Completion, Generator, Stats, for_inference
from moejax.infer.safety import SafetyFilter
from moejax.infer.sampling import SamplingParams

__all__ = [
    "KVCache",
    "bytes_per_token",
    "init_cache",
    "Completion",
    "Generator",
    "Stats",
    "for_inference",
    "SamplingParams",
    "SafetyFilter",
]
