"""LoRA fine-tuning: the SFT recipe with the base frozen and rank-8 adapters on attention (MLA's
low-rank projections included), the shared experts and every routed expert (per-expert factors
inside the grouped matmul). Checkpoints hold the adapters and their optimizer state only.

  python -m moejax.finetune --config experiments/sft_lora.py --workdir runs/sft_lora
  # merged, for transformers:
  python -m moejax.finetune.export --workdir runs/sft_lora --out runs/sft_lora_hf
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft").get_config()
    c.lora.rank = 8  # Z
    c.lora.alpha = 16.0  # updates are scaled by alpha / rank
    c.lora.dropout = 0.05
    c.lora.targets = ("attn/", "ffn/experts/", "ffn/shared/")  # regexes over parameter paths
    c.optim.lr = 2e-3  # adapters start at zero and take larger steps than full fine-tuning
    return c
