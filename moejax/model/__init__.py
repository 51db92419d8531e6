"""The DeepSeek-style MoE transformer in Flax NNX."""

from moejax.model.moe import MoE, RouterBias
from moejax.model.transformer import Transformer

__all__ = ["MoE", "RouterBias", "Transformer"]
