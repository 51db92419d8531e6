"""GRPO (DeepSeek-R1's recipe) on the built-in arithmetic task, from the arithmetic SFT run.

Each round samples 8 completions of 16 problems at temperature 1 with the KV-cache generator
(sharing the train state's arrays), scores them with the rule rewards (exact answer after '####',
and the format), and takes group-normalized advantages; the policy loss is the clipped ratio against
the sampler's probabilities with a k3 KL penalty to the base. The MoE's routing replay (the
sampler's experts reused in the policy pass) is an option; the router disagreement with the sampler
is logged either way. Held-out exact match (`val_reward` greedy, `val_reward_sampled` at the rollout
temperature) is logged every eval_every steps.

  python -m moejax.finetune --config experiments/sft_arithmetic.py --workdir runs/sft_arithmetic
  python -m moejax.finetune --config experiments/grpo.py --workdir runs/grpo
  python -m moejax.finetune --config experiments/grpo.py --config.grpo.routing_replay=True \\
      --workdir runs/grpo_r3
  python -m moejax.finetune --config experiments/grpo.py --config.grpo.loss=dapo \\
      --config.grpo.epsilon_high=0.28 --config.grpo.beta=0 --workdir runs/dapo
"""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "sft").get_config()
    c.base = "runs/sft_arithmetic"
    c.sft.data = ""  # GRPO generates its batches
    c.align.method = "grpo"
    c.model.router.bias_update_rate = (
        0.0  # the KL reference is the frozen base, routing biases included
    )
    g = c.grpo
    # or a JSONL file of {"prompt", "answer"} rows (the last grpo.held_out are held out)
    g.task = "arithmetic"
    g.max_value, g.ops = 100, "+"  # experiments/sft_arithmetic.py's task
    g.held_out = 256  # the split experiments/sft_arithmetic.py left out (never trained on)
    g.group_size = 8  # completions per prompt
    g.max_new_tokens = 12
    g.temperature = 1.0
    g.loss = "grpo"  # 'grpo', 'dr_grpo' or 'dapo'
    g.epsilon = 0.2
    g.beta = 0.04  # k3 KL to the base (0: no reference pass)
    # optimizer steps per rollout round (the second one is off-policy: the clip and replay matter)
    g.iterations = 2
    g.rewards = ("exact_answer", "answer_format")
    g.reward_weights = (1.0, 0.1)
    g.routing_replay = False
    g.dynamic_sampling = 4  # DAPO: up to 4 more draws replace groups whose rewards are all equal
    c.data.seq_len = 64  # prompt + completion rows
    c.train.batch_size = 128  # completions per round: 16 prompts x 8
    c.train.steps = 60
    c.train.log_every = 1
    c.train.eval_every = 10
    c.train.ckpt_every = 20
    c.train.num_samples = 0
    c.optim.lr = 3e-5  # RL moves a trained model gently (1e-4 lowered the held-out reward here)
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    return c
