"""Supervised fine-tuning (every parameter) of a base model on instruction data.

The base is the README's first run (runs/default) unless --config.base names another: a training
workdir, a moejax checkpoint or a Hugging Face folder. Its architecture and tokenizer are the
base's; how to run is this file's: the execution section (dispatch, kernels, remat), the dtypes, and
the training knobs of the router (balance-loss coefficients, bias rate, jitter). The data is the
built-in instruction set (moejax.finetune.instructions: explain-this-function / module questions /
one-line summaries, from the standard library's docstrings) or your JSONL files:

  python -m moejax.finetune --config experiments/sft.py --workdir runs/sft
  python -m moejax.finetune --config experiments/sft.py --config.sft.data=chats.jsonl \\
      --config.base=/path/to/hf_model --workdir runs/my_sft
"""

from moejax.experiment import base_config


def get_config():
    c = base_config()
    c.base = (
        "runs/default"  # the starting weights (a training workdir, moejax checkpoint or HF folder)
    )
    c.sft.data = (
        "builtin"  # or 'a.jsonl,b.jsonl': {"messages": [...]} or {"prompt", "completion"} rows
    )
    c.sft.template = (
        ""  # '' = the base's tokenizer_config.json chat template, else the built-in one
    )
    c.sft.loss_on = "assistant"  # train on answers (and completions) only
    c.data.seq_len = (
        256  # whole examples are packed into rows this long (longer ones are skipped, counted)
    )
    c.model.router.seq_aux_loss_coef = 1e-4  # keep the base's light balance loss
    c.train.steps = 60
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.ckpt_every = 20
    c.train.sample_tokens = 40
    c.train.temperature = 0.0  # greedy samples: the answers the model settled on
    c.optim.lr = 3e-4  # an order of magnitude under pretraining's
    c.optim.warmup_steps = 5
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    return c
