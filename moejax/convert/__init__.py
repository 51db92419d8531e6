"""Hugging Face checkpoints in and out: `from_hf(path, mesh, rules, dtype)` and `to_hf(model,
config, path)`.

Supported architectures: DeepseekV3 (incl. the MTP layer, e_score_correction_bias and FP8
block-quantized weights), DeepseekV2 (incl. V2-Lite), DeepSeekMoE v1 ('deepseek': deepseek-moe-16b,
remote code only), Mixtral, Qwen3-MoE. Reads both the per-expert on-disk names and transformers'
fused in-memory layout.

Both directions stream: loading reads only the tensor regions each device shard needs and places
them directly (load.py, regions.py); saving gathers and writes one Hugging Face tensor at a time
(export.py). Host memory stays at about one shard / one tensor, never the model.
"""

from __future__ import annotations

from moejax.convert.export import to_hf
from moejax.convert.hf_config import UnsupportedConfig, from_hf_config, hf_model_type, to_hf_config
from moejax.convert.load import from_hf, target_shardings

__all__ = [
    "from_hf",
    "to_hf",
    "from_hf_config",
    "to_hf_config",
    "hf_model_type",
    "UnsupportedConfig",
    "target_shardings",
]
