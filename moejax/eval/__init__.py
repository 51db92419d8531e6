"""Evaluation: sandboxed execution of generated code, pass@k, HumanEval and MBPP.

``moejax.eval.sandbox`` runs untrusted programs confined (namespaces, Landlock, resource
limits); ``moejax.eval.code`` builds HumanEval / MBPP programs and scores them with the
unbiased pass@k estimator.
"""
