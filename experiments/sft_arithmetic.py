"""SFT on the built-in arithmetic task: the starting point of GRPO (experiments/grpo.py).

Every training problem of `moejax.finetune.rewards.arithmetic_split` ("What is 7 + 12? End with
'#### <answer>'.") as a chat turn answered by its '#### <answer>' line; the held-out problems GRPO
scores are left out. A short run teaches the format and some of the sums, leaving room for RL to
raise the held-out exact-match rate.

  python -m moejax.finetune --config experiments/sft_arithmetic.py --workdir runs/sft_arithmetic
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft").get_config()
    c.base = "runs/default"
    c.sft.data = "arithmetic"  # made from the grpo section's task (max_value, ops, held_out)
    c.grpo.held_out = 256  # the problems GRPO scores (never trained on): 544 of 800 train
    c.data.seq_len = 64  # a problem and its answer take ~30 tokens: several per row
    c.train.steps = 600  # ~10 minutes on 2 cores: held-out exact match ~40% (greedy)
    c.train.batch_size = 16
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    c.train.num_samples = 2
    c.train.sample_tokens = 12
    c.optim.lr = 1e-3
    return c
