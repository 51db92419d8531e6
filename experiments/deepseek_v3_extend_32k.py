"""DeepSeek-V3's first long-context extension stage (report §4.3): from the 4K pretraining run to
32K tokens with YaRN (s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1), 1000 steps at batch
1920 and a constant learning rate of 7.3e-6. The data must be prepared at 32K
(`python -m moejax.data.prepare` with seq_len = 32768) with the base's tokenizer.

  python -m moejax.finetune --config experiments/deepseek_v3_extend_32k.py \\
      --config.base=gs://BUCKET/runs/v3-pretrain --config.data.source=gs://BUCKET/data/long-32k \\
      --workdir gs://BUCKET/runs/v3-32k
  python -m moejax.plan --config experiments/deepseek_v3_extend_32k.py --topology v5p-1024

The mesh below is for 512 v5p chips; on another pod change mesh.* and train.microbatches (each
microbatch should hold about one row per expert group).
"""

from moejax.experiment import base_config, sibling


def get_config():
    c = base_config()
    sibling(__file__, "deepseek_v3").model_overrides(
        c.model
    )  # the base's architecture (the run reads it from the base)
    c.execution.remat_policy = "full"
    c.extend.rope_factor = 40.0
    c.extend.original_length = 4096
    c.extend.beta_fast = 32.0
    c.extend.beta_slow = 1.0
    c.extend.mscale = 1.0
    c.extend.mscale_all_dim = 1.0
    c.data.seq_len = 32768
    c.train.batch_size = 1920
    c.train.steps = 1000
    c.optim.lr = 7.3e-6
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.1
    # 512 v5p chips: the sequence split 8 ways (context parallelism, load-balanced), experts 32
    # ways, one 32K row per expert group and microbatch; the capacity exchange bounds the MoE
    # buffers. moejax.compile: 79.9 GiB of 95 per chip (the planner: 75.1)
    c.mesh.fsdp = -1
    c.mesh.expert = 32
    c.mesh.context = 8
    c.train.microbatches = 30
    c.execution.ep_exchange = "ragged"
    c.execution.capacity_scope = "group"
    return c
