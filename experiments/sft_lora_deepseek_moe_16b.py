"""The seed's recipe as one command: LoRA SFT of DeepSeekMoE 16B (deepseek-ai/deepseek-moe-16b-base,
a Hugging Face folder you downloaded) on one machine with several accelerators.

  python -m moejax.finetune --config experiments/sft_lora_deepseek_moe_16b.py \\
      --config.base=/path/to/deepseek-moe-16b-base --config.sft.data=chats.jsonl \\
      --workdir runs/moe16b_lora

The base is read straight into its shardings (bf16, FSDP over the machine's devices, experts split
over the expert axis); only the adapters (243M, 1.46% of the weights, at rank 16 on attention and
every expert) and their AdamW moments are trained and checkpointed. Plan the memory first:
  python -m moejax.plan --config experiments/sft_lora_deepseek_moe_16b.py --topology v5p-8
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft_lora").get_config()
    sibling(__file__, "deepseek_moe_16b").model_overrides(
        c.model
    )  # the architecture (the base's wins anyway)
    c.base = ""  # required: --config.base=/path/to/deepseek-moe-16b-base
    c.model.param_dtype = (
        "bfloat16"  # frozen base weights in bf16 (32 GB); adapters train in bf16 + fp32 moments
    )
    c.model.compute_dtype = "bfloat16"
    c.execution.remat_policy = "full"
    c.data.seq_len = 2048
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = ("attn/", "ffn/experts/", "ffn/shared/")
    c.train.batch_size = 16
    c.train.microbatches = 4
    c.train.steps = 1000
    c.train.eval_every = 200
    c.train.ckpt_every = 200
    c.train.temperature = 0.7
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 30
    c.mesh.fsdp = -1
    c.mesh.expert = (
        1  # e.g. --config.mesh.expert=8 with 8 devices: experts split, no weight gathers
    )
    return c
