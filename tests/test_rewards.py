"""GRPO's verifiable rewards and group advantages (moejax.finetune.rewards)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from moejax.finetune import rewards as R


def test_arithmetic_task_is_deterministic_and_correct():
    a, b = R.arithmetic_task(50, seed=3), R.arithmetic_task(50, seed=3)
    assert a == b and a != R.arithmetic_task(50, seed=4)
    for p in a:
        x, op, y = p["prompt"].removeprefix("What is ").split("?")[0].split()
        assert str(R.OPS[op](int(x), int(y))) == p["answer"]


@pytest.mark.parametrize(
    "completion,answer,exact,fmt",
    [
        ("12 + 30 = 42\n#### 42", "42", 1.0, 1.0),
        (
            "#### 41\nno wait\n#### 1,042",
            "1042",
            1.0,
            1.0,
        ),  # the last '####' counts, commas ignored
        ("the answer is 42", "42", 0.0, 0.0),
        (
            "#### 42 because",
            "42",
            1.0,
            0.0,
        ),  # right number, but the completion does not end with it
        ("#### -7", "-7", 1.0, 1.0),
        ("#### 4.50", "4.5", 1.0, 1.0),
    ],
)
def test_rule_rewards(completion, answer, exact, fmt):
    assert R.exact_answer(completion, answer) == exact
    assert R.answer_format(completion, answer) == fmt


def test_failing_reward_functions_are_counted_never_raised():
    def boom(c, a):
        raise RuntimeError("judge down")

    def text(c, a):
        return "good"

    def nan(c, a):
        return float("nan")

    counts = collections.Counter()
    out = R.score(
        [R.exact_answer, boom, text, nan],
        [1.0, 1.0, 1.0, 1.0],
        ["#### 3", "#### 4"],
        ["3", "3"],
        counts,
    )
    assert out.tolist() == [1.0, 0.0] and np.isfinite(out).all()
    assert counts == {
        "boom raised RuntimeError": 2,
        "text returned a non-number": 2,
        "nan returned a non-number": 2,
    }


def test_group_advantages():
    r = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1], np.float32)  # three groups of four
    counts = collections.Counter()
    adv = R.group_advantages(r, 4, "grpo", counts=counts).reshape(3, 4)
    np.testing.assert_allclose(adv[0], (r[:4] - 0.5) / (0.5 + 1e-4), rtol=1e-6)
    assert (adv[1] == 0).all() and counts["groups with equal rewards (zero advantage)"] == 1
    np.testing.assert_allclose(adv.sum(axis=1), 0, atol=1e-6)
    dr = R.group_advantages(r, 4, "dr_grpo").reshape(3, 4)
    np.testing.assert_allclose(dr[2], r[8:] - 0.25)
    with pytest.raises(ValueError, match="grpo.loss"):
        R.group_advantages(r, 4, "ppo")
