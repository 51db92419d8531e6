"""Verifiable rewards and group advantages for GRPO (DeepSeek-R1's recipe), and a built-in
arithmetic task.

The task: "What is 37 + 45?" style problems the project generates (a seed, digit counts and
operators), with a reference answer. A completion answers with a final line `#### <number>` (GSM8K's
convention). Rule-based rewards, each a function (completion, answer) -> float:

  exact_answer   1 when the number after the last '####' equals the answer (commas and spaces
                 ignored), else 0
  answer_format  1 when the completion ends with a '#### <number>' line, else 0

`score(functions, weights, completions, answers, counts)` sums weighted rewards; a reward function
that raises or returns a non-number (or NaN) scores 0 for that completion and is counted in `counts`
by reason, never a crash or a NaN step. `group_advantages` normalizes within each prompt's group of
completions:

  grpo     (r - mean(r)) / (std(r) + eps)     (DeepSeekMath / R1)
  dr_grpo  r - mean(r)                        (Dr. GRPO: no division by the group's std)

A group whose rewards are all equal has zero advantage (it teaches nothing) and is counted.
"""

from __future__ import annotations

import collections
import math
import random
import re
from collections.abc import Callable, Sequence

import numpy as np

ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
FORMAT = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")
PROBLEM = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_task(n: int, seed: int = 0, digits: int = 2, ops: str = "+-") -> list[dict]:
    """n problems {"prompt", "answer"}: a op b with operands of up to `digits` digits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        op = rng.choice(ops)
        out.append(
            {
                "prompt": f"What is {a} {op} {b}? End with '#### <answer>'.",
                "answer": str(OPS[op](a, b)),
            }
        )
    return out


def arithmetic_split(
    max_value: int, ops: str = "+-", held_out: int = 64, seed: int = 0
) -> tuple[list, list]:
    """(train, held-out) problems {"prompt", "answer"} over every `a op b` with operands in [0,
    max_value), shuffled by `seed`; the held-out ones never appear in training (SFT or RL)."""
    problems = [(a, op, b) for op in ops for a in range(max_value) for b in range(max_value)]
    if held_out >= len(problems):
        from moejax.config import ConfigError

        raise ConfigError(
            f"grpo.held_out={held_out} leaves no training problems (max_value={max_value}, "
            f"ops={ops!r} give {len(problems)})"
        )
    random.Random(seed).shuffle(problems)
    out = [
        {"prompt": f"What is {a} {op} {b}? End with '#### <answer>'.", "answer": str(OPS[op](a, b))}
        for a, op, b in problems
    ]
    return out[held_out:], out[:held_out]


def copy_demonstrations(problems: list[dict], share: float, seed: int = 0) -> list[dict]:
    """The training problems with a `share` of their answers replaced by the problem's first
    operand (chosen by `seed`): the demonstrations of an annotator who sometimes copies a number
    from the question instead of computing. The prompts, and what GRPO's rewards check, stay right:
    an SFT set with a systematic error for RL with a verifiable reward to remove."""
    if share <= 0:
        return problems
    rng = random.Random(f"copy-{seed}")
    return [
        dict(p, answer=PROBLEM.match(p["prompt"]).group(1)) if rng.random() < share else p
        for p in problems
    ]


def solution(problem: dict) -> str:
    """The answer an SFT example teaches: the final '#### <answer>' line."""
    return f"#### {problem['answer']}"


def extract_answer(completion: str) -> str | None:
    found = ANSWER.findall(completion)
    return found[-1].replace(",", "") if found else None


def exact_answer(completion: str, answer: str) -> float:
    got = extract_answer(completion)
    if got is None:
        return 0.0
    try:
        return float(
            math.isclose(float(got), float(answer.replace(",", "")), rel_tol=0, abs_tol=1e-9)
        )
    except ValueError:
        return 0.0


def answer_format(completion: str, answer: str) -> float:
    return float(bool(FORMAT.search(completion.strip())))


REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact_answer": exact_answer,
    "answer_format": answer_format,
}


def score(
    functions: Sequence[Callable],
    weights: Sequence[float],
    completions: Sequence[str],
    answers: Sequence[str],
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """Weighted reward of each completion, float32 [n]. Failures score 0 and are counted by
    reason."""
    counts = counts if counts is not None else collections.Counter()
    out = np.zeros(len(completions), np.float32)
    for fn, w in zip(functions, weights):
        name = getattr(fn, "__name__", "reward")
        for i, (c, a) in enumerate(zip(completions, answers)):
            try:
                r = fn(c, a)
            except Exception as e:  # a user's reward function: any failure is counted, not raised
                counts[f"{name} raised {type(e).__name__}"] += 1
                continue
            if (
                isinstance(r, bool)
                or not isinstance(r, (int, float, np.floating, np.integer))
                or not np.isfinite(r)
            ):
                counts[f"{name} returned a non-number"] += 1
                continue
            out[i] += w * float(r)
    return out


def group_advantages(
    rewards: np.ndarray,
    group_size: int,
    kind: str = "grpo",
    eps: float = 1e-4,
    counts: collections.Counter | None = None,
) -> np.ndarray:
    """rewards [n_groups * group_size] (each prompt's completions consecutive) -> advantages, same
    shape."""
    from moejax.config import GRPO_LOSSES

    if kind not in GRPO_LOSSES:
        raise ValueError(f"grpo.loss: got {kind!r}, allowed: {', '.join(GRPO_LOSSES)}")
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    flat = np.ptp(r, axis=1) == 0
    if counts is not None:
        counts["groups with equal rewards (zero advantage)"] += int(flat.sum())
    if kind == "dr_grpo":
        adv = centered
    else:
        # grpo and dapo normalize by the group's std (DAPO differs in its token-level loss and
        # clipping)
        adv = centered / (r.std(axis=1, keepdims=True) + eps)
    adv[flat] = 0.0
    return adv.reshape(-1)
