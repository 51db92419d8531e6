"""The DeepSeek-style MoE transformer in Flax NNX."""

from moejax.model.moe import MoE
from moejax.model.router import RouterBias
from moejax.model.transformer import Transformer

__all__ = ["MoE", "RouterBias", "Transformer"]
