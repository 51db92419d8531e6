"""Fine-tuning entry point.

  python -m moejax.finetune --config experiments/sft.py [--config.base=PATH] [--workdir DIR]

Recipes: experiments/sft.py (full SFT), sft_lora.py (LoRA SFT), sft_arithmetic.py (SFT on the
built-in arithmetic task), continual.py (continual pretraining with replay), dpo.py (DPO),
reward.py (a Bradley-Terry reward model), grpo.py (GRPO on verifiable rewards, from an SFT'd base).
Re-running with the same workdir resumes; SIGTERM/SIGINT saves and exits, as in pretraining.
"""

from __future__ import annotations

import sys


def main(argv):
    from absl import flags, logging

    from moejax import distributed, sharding
    from moejax.config import Config, ConfigError
    from moejax.finetune.runner import BaseError, run
    from moejax.train import TrainingError
    from moejax.trainer.checkpoint import IncompatibleCheckpoint

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        cfg = Config.from_dict(flags.FLAGS.config)
        distributed.initialize()
        run(cfg, flags.FLAGS.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (
        BaseError,
        TrainingError,
        IncompatibleCheckpoint,
        sharding.ShardingError,
        FileNotFoundError,
        ValueError,
    ) as e:  # bad data files, tokenizer files or templates (LoadError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _entry():
    from moejax.experiment import config_cli

    config_cli(
        main,
        lambda flags: flags.DEFINE_string(
            "workdir", "runs/sft", "where checkpoints, metrics and TensorBoard events go"
        ),
    )


if __name__ == "__main__":
    _entry()
