"""A reward model: the base with a scalar head trained on preference pairs (Bradley-Terry),
reporting held-out pairwise accuracy (`val_accuracy`). Same data as experiments/dpo.py; LoRA by
default (the head always trains).

  python -m moejax.finetune --config experiments/reward.py --workdir runs/reward
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "dpo").get_config()
    c.align.method = "reward"
    c.train.num_samples = 0  # a reward model does not generate
    c.optim.lr = 1e-3
    return c
