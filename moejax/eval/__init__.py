"""Evaluation: MMLU, ARC, TruthfulQA, GSM8K (lm-evaluation-harness-exact), HumanEval and MBPP.

``formats`` (documents and prompts as lm-eval builds them) and ``tasks`` (requests, metrics,
aggregation) are model-independent; ``lm`` computes log-likelihoods and generations on a moejax
model; ``sandbox`` runs generated programs confined and ``code`` scores them by pass@k; ``run``
ties them together (``python -m moejax.eval --config experiments/eval.py``).
"""
