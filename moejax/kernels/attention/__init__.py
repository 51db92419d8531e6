"""Causal attention behind one op with backends (reference, blockwise, splash, pallas_gpu,
cudnn)."""

from moejax.kernels.attention.blockwise import blockwise_attention
from moejax.kernels.attention.ops import IMPLS, attention, default_impl
from moejax.kernels.attention.reference import (
    attend,
    attention_mask,
    attention_reference,
)

__all__ = [
    "IMPLS",
    "attend",
    "attention",
    "attention_mask",
    "attention_reference",
    "blockwise_attention",
    "default_impl",
]
