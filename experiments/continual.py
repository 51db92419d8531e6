"""Continual pretraining with replay: the default model (pretrained on Python code) continues on a
new domain, English prose (the built-in 'builtin-docs': Python's reference documentation), with a
replay share of its old data mixed in by the mixture loader. At the end the run reports forgetting:
the validation loss on each domain before (the base) and after.

  python -m moejax.finetune --config experiments/continual.py --workdir runs/continual
  python -m moejax.finetune --config experiments/continual.py --config.data.source=builtin-docs \\
      --workdir runs/continual_r0   # no replay
"""

from moejax.experiment import base_config


def get_config():
    c = base_config()
    c.base = "runs/default"
    c.data.source = "builtin-docs=0.9,builtin=0.1"  # new domain, 10% replay of the old
    c.data.seq_len = 256
    c.model.router.seq_aux_loss_coef = 1e-4
    c.train.steps = 80
    c.train.batch_size = 8
    c.train.eval_every = 40
    c.train.ckpt_every = 40
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    return c
