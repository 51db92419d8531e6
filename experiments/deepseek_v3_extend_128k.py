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
    # 512 v5p chips: the sequence split 16 ways, heads and expert hidden 4 ways (each device
    # gathers the keys and values of 32 heads over the whole 128K sequence), experts 8 ways, one
    # 128K row per expert group and microbatch. moejax.compile: 80.5 GiB of 95 per chip (the
    # planner: 69.9); context 32 without tensor parallelism needs 122 GiB
    c.mesh.context = 16
    c.mesh.tensor = 4
    c.mesh.expert = 8
    c.train.microbatches = 60
    return c
