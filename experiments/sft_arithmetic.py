"""SFT on the built-in arithmetic task: the starting point of GRPO (experiments/grpo.py).

Every training problem of `moejax.finetune.rewards.arithmetic_split` ("What is 7 + 12? End with
'#### <answer>'.") as a chat turn answered by its '#### <answer>' line; the held-out problems GRPO
scores are left out. The recipe's task is a + b with operands below 100 (10,000 problems, too many
to memorize): 1000 steps teach the format and addition (measured: 95% of the held-out sums right
greedily, 88% when sampled at temperature 1), and GRPO then raises the held-out rates
(benchmarks/RESULTS.md).

  python -m moejax.finetune --config experiments/sft_arithmetic.py --workdir runs/sft_arithmetic
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft").get_config()
    c.base = "runs/default"
    c.sft.data = "arithmetic"  # made from the grpo section's task (max_value, ops, held_out)
    # a + b with operands below 100: 10,000 problems, too many for the default model to memorize, so
    # what it learns (and what RL then improves) carries over to the held-out ones
    c.grpo.max_value = 100
    c.grpo.ops = "+"
    c.grpo.held_out = 256  # the problems GRPO scores (never trained on)
    c.data.seq_len = 64  # a problem and its answer take ~30 tokens: several per row
    c.train.steps = 1000  # ~9 minutes on 2 cores
    c.train.batch_size = 16
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    c.train.num_samples = 2
    c.train.sample_tokens = 12
    c.optim.lr = 1e-3
    return c
