"""A long-context extension stage on a laptop: the README's default run (trained at 256 tokens)
continues at 1024 tokens with YaRN (4x), as DeepSeek-V3 extended 4K to 32K and 128K
(experiments/deepseek_v3_extend_32k.py). The built-in corpus is packed again at 1024; at the end
the run prints the validation loss at 1024 of the base and of the extended model.

  python -m moejax.train --config experiments/moe.py --workdir runs/default
  python -m moejax.finetune --config experiments/extend_tiny.py --workdir runs/extend_tiny
"""

from moejax.experiment import base_config


def get_config():
    c = base_config()
    c.base = "runs/default"
    c.extend.rope_factor = 4.0  # 256 -> 1024; original_length: the base run's data.seq_len
    c.data.seq_len = 1024
    c.train.batch_size = 4
    c.train.steps = 60
    c.train.eval_every = 20
    c.train.ckpt_every = 60
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 5
    c.optim.schedule = "cosine"
    return c
