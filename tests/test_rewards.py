"""GRPO's verifiable rewards and group advantages (moejax.finetune.rewards)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from moejax.config import ConfigError, GRPOConfig
from moejax.finetune import rewards as R


def test_arithmetic_task_is_deterministic_and_correct():
    a, b = R.arithmetic_task(50, seed=3), R.arithmetic_task(50, seed=3)
    assert a == b and a != R.arithmetic_task(50, seed=4)
    for p in a:
        x, op, y = p["prompt"].removeprefix("What is ").split("?")[0].split()
        assert str(R.OPS[op](int(x), int(y))) == p["answer"]


def test_copied_demonstrations_replace_a_share_of_answers_by_the_first_operand():
    train, _ = R.arithmetic_split(20, "+-", 64)
    noisy = R.copy_demonstrations(train, 0.5)
    assert R.copy_demonstrations(train, 0.0) is train and noisy == R.copy_demonstrations(train, 0.5)
    assert [p["prompt"] for p in noisy] == [p["prompt"] for p in train]
    copied = 0
    for clean, p in zip(train, noisy):
        a, op, b = R.PROBLEM.match(p["prompt"]).groups()
        assert clean["answer"] == str(R.OPS[op](int(a), int(b)))
        assert p["answer"] in (clean["answer"], a)
        copied += p is not clean
    assert 0.4 < copied / len(train) < 0.6
    with pytest.raises(ConfigError, match="grpo.demo_copy"):
        GRPOConfig(demo_copy=1.5)


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


def test_the_sft_set_plants_the_copying_slip_in_its_own_file(tmp_path):
    import json

    from moejax.finetune import instructions

    clean = instructions.build_arithmetic(str(tmp_path), 10, "+-", 20)
    noisy = instructions.build_arithmetic(str(tmp_path), 10, "+-", 20, copy=0.5)
    assert clean != noisy

    def answers(path):
        with open(path) as f:
            return [json.loads(line)["messages"][1]["content"] for line in f]

    train, _ = R.arithmetic_split(10, "+-", 20)
    assert answers(clean) == [R.solution(p) for p in train]
    assert answers(noisy) == [R.solution(p) for p in R.copy_demonstrations(train, 0.5)]
    assert answers(noisy) != answers(clean)
