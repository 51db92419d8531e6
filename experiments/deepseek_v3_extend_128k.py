"""DeepSeek-V3's second long-context extension stage (report §4.3): from the 32K stage to 128K
tokens, the same YaRN settings, 1000 steps at batch 480 and learning rate 7.3e-6; data prepared at
128K.

  python -m moejax.finetune --config experiments/deepseek_v3_extend_128k.py \\
      --config.base=gs://BUCKET/runs/v3-32k --config.data.source=gs://BUCKET/data/long-128k \\
      --workdir gs://BUCKET/runs/v3-128k
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "deepseek_v3_extend_32k").get_config()
    c.data.seq_len = 131072
    c.train.batch_size = 480
    # 512 v5p chips (python -m moejax.plan, 69 GiB of 95 per chip): the sequence split 32 ways,
    # experts 16 ways, one 128K row per expert group and microbatch
    c.mesh.context = 32
    c.mesh.expert = 16
    c.train.microbatches = 30
    return c
