"""Inference: KV caches (absorbed MLA), cached prefill/decode, sampling, MTP speculative decoding."""

from moejax.infer.cache import KVCache, bytes_per_token, init_cache
from moejax.infer.generate import Completion, Generator, Stats, for_inference
from moejax.infer.sampling import SamplingParams

__all__ = ["KVCache", "bytes_per_token", "init_cache", "Completion", "Generator", "Stats", "for_inference",
           "SamplingParams"]
