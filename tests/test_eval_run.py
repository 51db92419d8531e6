"""`moejax.eval`: all six benchmarks on fixture files in the Hub layouts, end to end (a tiny
random model; the numbers are a random model's, the plumbing is real: log-likelihoods, few-shot
contexts, generation, the sandbox, results.json / results.md)."""

from __future__ import annotations

import json
import os

import pytest
from flax import nnx

from moejax.config import ConfigError
from moejax.eval.run import EvalConfig, evaluate, split_files
from moejax.model import Transformer
from tests.helpers import ROOT, TINY_MLA, run_module, saved_checkpoint
from tests.test_eval_lm import CharTokenizer

CFG = TINY_MLA.replace(mtp_depth=0, initializer_range=0.3, max_position_embeddings=1024)


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _fixtures(root) -> dict[str, str]:
    arc = [
        {
            "id": f"a{i}",
            "question": f"Which one is {i}?",
            "choices": {"text": [str(i), "none", "many more"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(4)
    ]
    _write(f"{root}/ai2_arc/ARC-Easy/test.jsonl", arc[:3] + ["{not json"])
    _write(f"{root}/ai2_arc/ARC-Easy/train.jsonl", arc)
    mmlu = [
        {
            "question": f"{i} + 1 = ?",
            "subject": subject,
            "answer": 1,
            "choices": [str(i), str(i + 1), str(i + 2), "7"],
        }  # fmt: skip
        for subject in ("elementary_mathematics", "world_religions")
        for i in range(3)
    ]
    _write(f"{root}/mmlu/all/test.jsonl", mmlu)
    _write(f"{root}/mmlu/all/dev.jsonl", mmlu)
    tqa = [
        {
            "question": f"Is {i} a number?",
            "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
            "mc2_targets": {"choices": ["Yes.", "It is.", "No."], "labels": [1, 1, 0]},
        }
        for i in range(3)
    ]
    _write(f"{root}/truthful_qa/multiple_choice/validation.jsonl", tqa)
    gsm = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
           for i in range(3)]  # fmt: skip
    _write(f"{root}/gsm8k/main/test.jsonl", gsm)
    _write(f"{root}/gsm8k/main/train.jsonl", gsm)

    def mbpp(task_id):
        return {"task_id": task_id, "text": f"Add one (task {task_id}).",
                "code": "def f(x):\n    return x + 1",
                "test_list": ["assert f(1) == 2", "assert f(2) == 3", "assert f(0) == 1"],
                "test_setup_code": "", "challenge_test_list": []}  # fmt: skip

    _write(f"{root}/mbpp/full/test.jsonl", [mbpp(i) for i in (11, 12, 13)] + [{"task_id": 14}])
    _write(f"{root}/mbpp/full/prompt.jsonl", [mbpp(i) for i in (1, 2, 3, 4)])
    # the original single file: ids 1-10 are the few-shot pool, 11-510 the test problems
    _write(f"{root}/mbpp.jsonl", [mbpp(i) for i in (1, 2, 3, 4, 11, 12, 600)])
    return {
        "arc_easy": f"{root}/ai2_arc/ARC-Easy",
        "mmlu": f"{root}/mmlu/all",
        "truthfulqa_mc1": f"{root}/truthful_qa/multiple_choice",
        "truthfulqa_mc2": f"{root}/truthful_qa/multiple_choice",
        "gsm8k": f"{root}/gsm8k/main",
        "mbpp": f"{root}/mbpp/full",
    }


def test_the_six_benchmarks_run_end_to_end(tmp_path):
    data = _fixtures(str(tmp_path / "data"))
    cfg = EvalConfig(
        tasks=(
            "mmlu",
            "arc_easy",
            "truthfulqa_mc1",
            "truthfulqa_mc2",
            "gsm8k",
            "humaneval",
            "mbpp",
        ),
        data=data,
        num_fewshot=1,
        limit=2,
        max_gen_toks=16,
        code_max_tokens=16,
        batch_size=8,
        workers=2,
        output=str(tmp_path / "out"),
    )
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    report = evaluate(cfg, model, CharTokenizer())
    r = report["results"]
    for task, metric in [
        ("mmlu", "acc"),
        ("arc_easy", "acc_norm"),
        ("truthfulqa_mc1", "acc"),
        ("truthfulqa_mc2", "acc"),
        ("gsm8k", "exact_match,strict-match"),
        ("gsm8k", "exact_match,flexible-extract"),
        ("humaneval", "pass@1"),
        ("mbpp", "pass@1"),
    ]:
        v = r[task][metric]
        n = 4 if task == "mmlu" else 2  # lm-eval's limit is per MMLU subject
        assert 0.0 <= v["value"] <= 1.0 and v["n"] == n, (task, metric, v)
    assert "mmlu_elementary_mathematics" in r and "mmlu_stem" in r  # subjects and groups
    # a random model writes no working code: every program ran in the sandbox and failed
    assert r["humaneval"]["pass@1"]["value"] == 0.0 and r["mbpp"]["pass@1"]["value"] == 0.0
    assert report["isolation"]  # which confinement the programs ran under
    (skipped,) = report["skipped"]["arc_easy/test"].items()  # the bad row, counted
    assert skipped[0].startswith("invalid JSON") and skipped[1] == 1
    assert report["skipped"]["mbpp/test"] == {"missing or not str: text": 1}
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["results"].keys() == r.keys()
    table = open(tmp_path / "out" / "results.md").read()
    assert "| arc_easy | acc_norm |" in table and "| humaneval | pass@1 |" in table


def test_correct_code_passes_through_the_whole_code_path(tmp_path, monkeypatch):
    """The code tasks' plumbing (prompt -> completion -> program -> sandbox -> pass@k) with an
    oracle for completions: HumanEval's canonical solutions and MBPP's reference code pass."""
    from moejax.eval import code, lm

    canonical = {p["prompt"]: p["canonical_solution"] for p in code.load_humaneval()}

    seen = []

    def oracle(self, prompts, params):
        seen.extend(prompts)
        return [canonical.get(p, "def f(x):\n    return x + 1\n[DONE]\nmore") for p in prompts]

    monkeypatch.setattr(lm.ModelLM, "complete", oracle)
    root = str(tmp_path / "data")
    data = _fixtures(root)
    cfg = EvalConfig(tasks=("humaneval", "mbpp"), data=data, limit=3, samples=2, ks=(1, 2))
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    r = evaluate(cfg, model, CharTokenizer())["results"]
    assert r["humaneval"]["pass@1"]["value"] == 1.0 and r["humaneval"]["pass@2"]["n"] == 3
    assert r["mbpp"]["pass@1"]["value"] == 1.0 and r["mbpp"]["pass@1"]["n"] == 3
    # MBPP's prompt: lm-eval's three examples (task ids 2, 3, 4 of the prompt split), then the task
    prompt = seen[-1]
    assert [f"(task {i})" in prompt for i in (1, 2, 3, 4)] == [False, True, True, True]
    assert prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Add")
    # the original single mbpp.jsonl: the test ids only, the same few-shot examples
    seen.clear()
    cfg = EvalConfig(tasks=("mbpp",), data={"mbpp": f"{root}/mbpp.jsonl"}, num_fewshot=2)
    r = evaluate(cfg, model, CharTokenizer())["results"]
    assert r["mbpp"]["pass@1"]["n"] == 2 and len(seen) == 2 and seen[0].count("[DONE]") == 2


def test_bad_config_and_missing_data_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="tasks: unknown 'hellaswag'"):
        EvalConfig(tasks=("hellaswag",))
    with pytest.raises(ConfigError, match="data.arcc: not a task"):
        EvalConfig(data={"arcc": "x"})
    with pytest.raises(FileNotFoundError, match="no such data file or folder"):
        split_files(str(tmp_path / "nowhere"), "test")
    data = _fixtures(str(tmp_path / "data"))  # GSM8K's default 5 shots from a 3-row train split
    with pytest.raises(ConfigError, match="gsm8k draws 5 examples from its 'train' split, which"):
        evaluate(
            EvalConfig(tasks=("gsm8k",), data=data),
            Transformer(CFG, rngs=nnx.Rngs(0)),
            CharTokenizer(),
        )
    r = run_module(
        "moejax.eval",
        "--config",
        os.path.join(ROOT, "experiments", "eval.py"),
        "--config.tasks=arc_easy,hellaswag",
        timeout=120,
    )
    assert r.returncode == 2 and "error: tasks: unknown 'hellaswag'" in r.stderr, r.stderr


@pytest.mark.slow
def test_the_readme_command_runs_all_six_benchmarks_on_the_fixture_files(tmp_path):
    """README: `python -m moejax.eval.fixtures DIR`, then `python -m moejax.eval ...
    --config.data_root=DIR`: every task found in the Hub layout, scored, written."""
    r = run_module("moejax.eval.fixtures", str(tmp_path / "data"), timeout=60)
    assert r.returncode == 0 and "openai/gsm8k/main" in r.stdout, r.stderr
    ckpt, tok = saved_checkpoint(str(tmp_path), CFG)
    r = run_module(
        "moejax.eval",
        "--config",
        os.path.join(ROOT, "experiments", "eval.py"),
        f"--config.model={ckpt}",
        f"--config.tokenizer={tok}",
        f"--config.data_root={tmp_path}/data",
        "--config.limit=2",
        "--config.max_gen_toks=16",
        "--config.code_max_tokens=16",
        f"--config.output={tmp_path}/out",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.load(open(tmp_path / "out" / "results.json"))
    tasks = ("mmlu", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")
    for task in (*tasks, "humaneval", "mbpp"):
        assert task in saved["results"], task
    assert saved["results"]["gsm8k"]["exact_match,strict-match"]["n"] == 2
    assert "skipped" not in saved  # the fixture files are clean
    assert "| mbpp | pass@1 |" in open(tmp_path / "out" / "results.md").read()
