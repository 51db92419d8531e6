"""The lm-evaluation-harness backend (`--model moejax`): lm-eval's own task definitions, run on
local fixture files through moejax, give the numbers moejax's own scorer gives (acc, acc_norm, mc2
to 1e-6; the same GSM8K prompts and answers); rolling log-likelihoods equal direct forwards; the
command line runs end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")  # the eval extra

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from moejax.eval import fixtures, harness  # noqa: E402
from moejax.eval import tasks as tasks_lib  # noqa: E402
from moejax.eval.run import EvalConfig, evaluate  # noqa: E402
from moejax.model import Transformer  # noqa: E402
from tests.helpers import TINY_MLA, run_module, saved_checkpoint  # noqa: E402
from tests.test_eval_lm import CharTokenizer  # noqa: E402

CFG = TINY_MLA.replace(mtp_depth=0, initializer_range=0.3, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("harness"))
    data = fixtures.write(root + "/data")  # the Hub layout; ARC, MMLU, TruthfulQA, GSM8K
    data.pop("mbpp")
    data.pop("arc_challenge")
    names = harness.write_local_tasks(data, root + "/tasks")
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lm = harness.MoejaxLM(model=model, tokenizer=CharTokenizer(), batch_size=8, max_gen_toks=12)
    return dict(root=root, data=data, names=names, model=model, lm=lm)


def _lm_eval(setup, tasks, num_fewshot=None):
    return lm_eval.simple_evaluate(
        model=setup["lm"],
        tasks=tasks,
        num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=setup["root"] + "/tasks"),
        log_samples=True,
        bootstrap_iters=0,
    )


def _ours(setup, tasks, num_fewshot=-1):
    cfg = EvalConfig(
        tasks=tasks,
        data={t: setup["data"][t] for t in tasks},
        num_fewshot=num_fewshot,
        max_gen_toks=12,
        batch_size=8,
    )
    return evaluate(cfg, setup["model"], CharTokenizer())["results"]


def test_lm_eval_scores_equal_moejax_scores(setup):
    assert sorted(setup["names"]) == sorted(
        [
            "arc_easy_local",
            "mmlu_elementary_mathematics_local",
            "mmlu_high_school_computer_science_local",
            "truthfulqa_mc1_local",
            "truthfulqa_mc2_local",
            "gsm8k_local",
        ]  # fmt: skip
    )
    theirs = _lm_eval(setup, setup["names"])  # each task's own few-shot count (GSM8K: 5)
    ours = _ours(setup, ("arc_easy", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k"))
    got = theirs["results"]
    pairs = [
        ("arc_easy_local", "arc_easy", "acc"),
        ("arc_easy_local", "arc_easy", "acc_norm"),
        ("mmlu_high_school_computer_science_local", "mmlu_high_school_computer_science", "acc"),
        ("mmlu_elementary_mathematics_local", "mmlu_elementary_mathematics", "acc"),
        ("truthfulqa_mc1_local", "truthfulqa_mc1", "acc"),
        ("truthfulqa_mc2_local", "truthfulqa_mc2", "acc"),  # lm-eval's mc2 is reported as acc
        ("gsm8k_local", "gsm8k", "exact_match,strict-match"),
        ("gsm8k_local", "gsm8k", "exact_match,flexible-extract"),
    ]
    for their_task, our_task, metric in pairs:
        key = metric if "," in metric else f"{metric},none"
        assert got[their_task][key] == pytest.approx(ours[our_task][metric]["value"], abs=1e-6), (
            their_task,
            metric,
        )
    # mc2 is a continuous score: equal to 1e-6 means equal log-likelihoods, not a lucky argmax
    assert 0 < got["truthfulqa_mc2_local"]["acc,none"] < 1
    # the same prompts: GSM8K's 5-shot contexts (lm-eval's sampler) and greedy answers
    samples = theirs["samples"]["gsm8k_local"]
    docs = [json.loads(x) for x in open(setup["data"]["gsm8k"] + "/test.jsonl")]
    shots = [json.loads(x) for x in open(setup["data"]["gsm8k"] + "/train.jsonl")]
    requests = tasks_lib.build_requests("gsm8k", docs, fewshot_docs=shots, max_gen_toks=12)
    for s in samples:
        ((ctx, kwargs),) = s["arguments"]
        assert ctx == requests[s["doc_id"]].context
        assert list(kwargs["until"]) == list(requests[s["doc_id"]].until)
        texts = setup["lm"].lm.generate_until([requests[s["doc_id"]]])
        assert s["resps"][0][0] == texts[0]


def test_few_shot_selection_equals_lm_evals(setup):
    """ARC's random few-shot draw (seed 1234, the document itself excluded) and MMLU's first_n."""
    names = ["arc_easy_local", "mmlu_high_school_computer_science_local"]
    theirs = _lm_eval(setup, names, num_fewshot=2)
    ours = _ours(setup, ("arc_easy", "mmlu"), num_fewshot=2)
    for their_task, our_task, metric in [
        ("arc_easy_local", "arc_easy", "acc_norm"),
        ("mmlu_high_school_computer_science_local", "mmlu_high_school_computer_science", "acc"),
    ]:
        got = theirs["results"][their_task][f"{metric},none"]
        assert got == pytest.approx(ours[our_task][metric]["value"], abs=1e-6)
    docs = [json.loads(x) for x in open(setup["data"]["arc_easy"] + "/test.jsonl")]
    shots = [json.loads(x) for x in open(setup["data"]["arc_easy"] + "/train.jsonl")]
    requests = tasks_lib.build_requests("arc_easy", docs, num_fewshot=2, fewshot_docs=shots)
    for s in theirs["samples"]["arc_easy_local"]:
        assert {a[0] for a in s["arguments"]} == {requests[s["doc_id"]].context}


def _direct(model, tokens, n):
    """Sum of the last n tokens' log-probabilities from one unpadded forward pass."""
    logits = model(jnp.asarray([tokens[:-1]], jnp.int32))[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return float(logp[np.arange(len(tokens) - 1), tokens[1:]][-n:].sum())


def test_loglikelihood_rolling_equals_direct_forwards(setup):
    """Perplexity requests: one window equals a forward over BOS + text; a text longer than
    max_length is lm-eval's disjoint windows, each scored as an unpadded forward would."""
    model, tok = setup["model"], CharTokenizer()
    lm = harness.MoejaxLM(model=model, tokenizer=tok, batch_size=4, max_length=16, pad_to=8)
    texts = ["short text", "a longer text that needs three windows of sixteen tokens", ""]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood_rolling(reqs)
    ids = tok.encode(texts[0])
    assert got[0] == pytest.approx(_direct(model, [1, *ids], len(ids)), abs=1e-4)
    windows = list(
        map(
            lm_eval.utils.make_disjoint_window,
            lm_eval.utils.get_rolling_token_windows(tok.encode(texts[1]), 1, 16, 1),
        )
    )
    assert len(windows) == 4
    want = sum(_direct(model, [*c, *t], len(t)) for c, t in windows)
    assert got[1] == pytest.approx(want, abs=1e-4)
    assert got[2] == 0.0  # nothing to predict (as lm-eval's HFLM)


def test_generation_kwargs_and_bad_model_args():
    from types import SimpleNamespace

    lm = harness.MoejaxLM.__new__(harness.MoejaxLM)
    lm.max_gen_toks, lm.seed, lm.lm = 256, 3, SimpleNamespace(max_length=512)
    p = lm.sampling_params({"until": "Q:", "do_sample": False, "temperature": 0.7}, index=2)
    assert p.temperature == 0.0 and p.stop == ("Q:",) and p.max_new_tokens == 256
    p = lm.sampling_params({"until": [], "temperature": 0.6, "top_p": 0.9, "max_gen_toks": 7})
    assert (p.temperature, p.top_p, p.max_new_tokens, p.stop) == (0.6, 0.9, 7, ())
    assert lm.sampling_params({"do_sample": True}, index=1).temperature == 1.0
    assert lm.sampling_params({"do_sample": True}, index=1).seed == 4
    assert lm.sampling_params({"max_new_tokens": 9}).max_new_tokens == 9  # lm-eval's aliases
    with pytest.raises(ValueError, match=r"max_gen_toks=512 leaves no room .*max_length=512"):
        lm.sampling_params({"max_gen_toks": 512})
    with pytest.raises(ValueError, match="model_args.batch_size: must be >= 1, got 0"):
        harness.MoejaxLM(model=object(), tokenizer=object(), batch_size=0)
    with pytest.raises(ValueError, match="model_args: unknown pretraind"):
        harness.MoejaxLM(pretraind="x")
    with pytest.raises(ValueError, match="model_args.pretrained"):
        harness.MoejaxLM()
    with pytest.raises(ValueError, match="no local lm-eval task for 'hellaswag'"):
        harness.write_local_tasks({"hellaswag": "x"}, "/tmp/unused")


@pytest.mark.slow
def test_command_line_runs_a_saved_checkpoint(setup, tmp_path):
    """`python -m moejax.eval.harness --model moejax --model_args pretrained=...`: lm-eval's own
    command line, on a moejax checkpoint with a sentencepiece tokenizer."""
    ckpt, tok = saved_checkpoint(str(tmp_path), CFG)
    r = run_module(
        "moejax.eval.harness",
        "--model",
        "moejax",
        "--model_args",
        f"pretrained={ckpt},tokenizer={tok}",
        "--tasks",
        "arc_easy_local",
        "--include_path",
        setup["root"] + "/tasks",
        "--batch_size",
        "4",
        "--limit",
        "3",
        "--output_path",
        str(tmp_path / "out"),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = [
        os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if "results" in f
    ]
    got = json.load(open(result))["results"]["arc_easy_local"]
    assert 0 <= got["acc_norm,none"] <= 1 and got["alias"] == "arc_easy_local"
