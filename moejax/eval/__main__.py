"""Evaluation entry point.

  python -m moejax.eval --config experiments/eval.py --config.model=runs/default \\
      --config.tasks=arc_easy,gsm8k --config.data.arc_easy=/data/ai2_arc/ARC-Easy \\
      --config.data.gsm8k=/data/gsm8k/main --config.output=runs/default/eval

Writes results.json and results.md (a markdown table) to --config.output and prints the table.
"""

from __future__ import annotations

import sys


def main(argv):
    from absl import flags, logging

    from moejax.config import ConfigError
    from moejax.eval.run import EvalConfig, evaluate
    from moejax.infer.load import LoadError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        cfg = EvalConfig.from_dict(flags.FLAGS.config)
        report = evaluate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (LoadError, FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(report["markdown"], end="")
    for task, seconds in report["seconds"].items():
        print(f"[eval] {task}: {seconds:.1f} s")
    if "isolation" in report:
        print(f"[eval] generated code ran with isolation {report['isolation']}")
    for split, counts in report.get("skipped", {}).items():
        print(f"[eval] {split}: skipped rows {counts}")


if __name__ == "__main__":
    from moejax.experiment import config_cli

    config_cli(main, default="experiments/eval.py")
