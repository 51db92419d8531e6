"""Direct preference optimization of a base (or SFT'd) model on preference pairs.

The pairs are {"prompt", "chosen", "rejected"} JSONL rows (prompt: a string or a list of messages;
the completions: strings or one assistant message), rendered with the chat template; or the built-in
set (moejax.finetune.instructions.build_preferences: a docstring preferred over its own words
shuffled). Each pair is packed as two consecutive segments of a row; the reference is the frozen
base (with LoRA: the adapters off). The run reports held-out preference accuracy (`val_accuracy`).

  python -m moejax.finetune --config experiments/dpo.py --workdir runs/dpo  # LoRA on runs/sft
  python -m moejax.finetune --config experiments/dpo.py --config.lora.rank=0 --workdir runs/dpo_full
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft_lora").get_config()
    c.base = "runs/sft"  # the SFT recipe's output (experiments/sft.py); any base works
    c.sft.data = "builtin"  # preference pairs
    c.align.method = "dpo"
    c.model.router.bias_update_rate = (
        0.0  # the reference is the frozen base, routing biases included
    )
    c.align.beta = 0.1
    c.align.dpo_loss = "sigmoid"  # or 'ipo'
    c.align.label_smoothing = 0.0  # > 0: conservative DPO
    c.align.max_pairs_per_row = 8
    c.lora.dropout = 0.0  # the policy and the reference see the same inputs
    c.train.steps = 40
    c.train.eval_every = 20
    c.train.ckpt_every = 20
    c.train.num_samples = 2
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 4
    return c
