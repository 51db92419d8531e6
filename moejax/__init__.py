"""moejax: DeepSeek-style Mixture-of-Experts language models in JAX.

Dimension letters used in einsum strings and parameter names across the project:

  B batch            T query length        S key length         D model (hidden)
  N heads            H head dim            F FFN hidden         E experts
  K top-k            G groups              C capacity           V vocab
  R latent rank      L layers              M rows (flattened tokens, B*T or B*T*K)
  Q query heads per key/value head (GQA)   P rotary pairs (rope dim / 2)
  Z rank of a LoRA adapter (moejax.finetune.lora)
"""

__version__ = "0.1.0"

__all__ = ["ModelConfig", "__version__"]


def __getattr__(name):  # lazy, so that `moejax.data` worker processes do not import jax
    if name == "ModelConfig":
        from moejax.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
