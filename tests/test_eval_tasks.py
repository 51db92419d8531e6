"""lm-evaluation-harness-exact requests and scoring (moejax.eval.formats, moejax.eval.tasks).

The expected strings are written out by hand from lm-eval's task YAMLs (v0.4.12 /
0.4.13.dev0): a test fails if a single character of a prompt moves. The few-shot indices are
those lm-eval's ContextSampler draws with random.Random(1234) (``rnd.sample(docs, n)`` per
evaluated document, in order): [3, 0] then [0, 3] from 4 docs; [1, 0] then [0, 2] from 3.
"""

import gzip
import json
import math
import statistics
import sys

import pytest

from moejax.eval import formats, tasks

MMLU_DESC = "The following are multiple choice questions (with answers) about {}.\n\n"


def _mmlu(question, choices, answer, subject="high_school_mathematics"):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


def _arc(i, question, texts, labels, key):
    return {
        "id": f"Mercury_{i}",
        "question": question,
        "choices": {"text": texts, "label": labels},
        "answerKey": key,
    }


def _tqa(question, mc1, mc2):
    return {
        "question": question,
        "mc1_targets": {"choices": mc1, "labels": [1] + [0] * (len(mc1) - 1)},
        "mc2_targets": {"choices": [c for c, _ in mc2], "labels": [label for _, label in mc2]},
    }


# ------------------------------------------------------------------------------------------------
# Requests


def test_mmlu_two_shot_request_is_lm_evals():
    dev = [
        _mmlu("What is 1+1?", ["1", "2", "3", "4"], 1),
        _mmlu("Who wrote Hamlet?", ["a", "b", "c", "d"], 0, subject="world_religions"),
        _mmlu(" Solve x + 3 = 7.\n", ["x = 1", "x = 2", "x = 3", "x = 4"], 3),
        _mmlu("Unused third shot", ["1", "2", "3", "4"], 2),
    ]
    doc = _mmlu("  What is 2 * 3? ", ["5", "6", "7", "8"], 1)
    (req,) = tasks.build_requests("mmlu", [doc], num_fewshot=2, fewshot_docs=dev)
    assert req.context == (
        "The following are multiple choice questions (with answers) about high school "
        "mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Solve x + 3 = 7.\nA. x = 1\nB. x = 2\nC. x = 3\nD. x = 4\nAnswer: D\n\n"
        "What is 2 * 3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    assert req.continuations == (" A", " B", " C", " D")
    assert (req.gold, req.subtask) == (1, "mmlu_high_school_mathematics")
    # Zero-shot (the YAML's default): description and question only.
    (req0,) = tasks.build_requests("mmlu", [doc])
    assert req0.context == MMLU_DESC.format("high school mathematics") + (
        "What is 2 * 3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    with pytest.raises(ValueError, match="few-shot docs of subject"):
        tasks.build_requests("mmlu", [doc], num_fewshot=4, fewshot_docs=dev)


def test_arc_two_shot_requests_follow_the_seeded_sampler():
    train = [
        _arc(0, "Which is a gas?", ["ice", "steam"], ["A", "B"], "B"),
        _arc(1, "Not drawn?", ["x", "y"], ["A", "B"], "A"),
        _arc(2, "Also not drawn?", ["x", "y"], ["A", "B"], "A"),
        _arc(3, "What do plants need?", ["light", "salt", "sand"], ["1", "2", "3"], "1"),
    ]
    test = [
        _arc(10, "Which planet is red?", ["Venus", "Mars", "Earth", "Pluto"], list("ABCD"), "B"),
        _arc(11, "How many legs has a cat?", ["2", "4", "6", "8", "10"], list("12345"), "2"),
    ]
    shot3 = "Question: What do plants need?\nAnswer: light\n\n"
    shot0 = "Question: Which is a gas?\nAnswer: steam\n\n"
    r0, r1 = tasks.build_requests("arc_easy", test, num_fewshot=2, fewshot_docs=train)
    assert r0.context == shot3 + shot0 + "Question: Which planet is red?\nAnswer:"
    assert r1.context == shot0 + shot3 + "Question: How many legs has a cat?\nAnswer:"
    assert r0.continuations == (" Venus", " Mars", " Earth", " Pluto")
    assert (r0.gold, r1.gold) == (1, 1)  # answerKey "B" among A-D; "2" among 1-5
    assert r1.choices == ("2", "4", "6", "8", "10")
    # Another seed draws other shots; ARC-Challenge builds the same prompts.
    other = tasks.build_requests("arc_easy", test, num_fewshot=2, fewshot_docs=train, seed=0)
    assert [r.context for r in other] != [r0.context, r1.context]
    rc = tasks.build_requests("arc_challenge", test, num_fewshot=2, fewshot_docs=train)
    assert [r.context for r in rc] == [r0.context, r1.context]


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
)


def test_truthfulqa_requests_are_lm_evals():
    doc = _tqa(
        "What happens if you crack your knuckles a lot?",
        ["Nothing in particular happens.", "You will get arthritis."],
        [("Nothing in particular happens.", 1), ("Nothing.", 1), ("You will get arthritis.", 0)],
    )
    (mc1,) = tasks.build_requests("truthfulqa_mc1", [doc])
    (mc2,) = tasks.build_requests("truthfulqa_mc2", [doc])
    ctx = TRUTHFULQA_PROMPT + "Q: What happens if you crack your knuckles a lot?\nA:"
    assert mc1.context == mc2.context == ctx
    assert mc1.continuations == (" Nothing in particular happens.", " You will get arthritis.")
    assert mc1.gold == 0 and mc1.labels is None
    assert mc2.continuations[1] == " Nothing." and mc2.labels == (1, 1, 0)


def test_truthfulqa_fewshot_draws_from_its_own_docs_without_the_doc():
    docs = [_tqa(f"Q{i}?", [f"T{i}", "F"], [(f"T{i}", 1), ("F", 0)]) for i in range(3)]
    # lm-eval samples n + 1 = 2 of the 3 validation docs ([1, 0], then [0, 2]) and drops the
    # evaluated one, keeping the first n = 1.
    got = formats.contexts("truthfulqa_mc1", docs, num_fewshot=1)
    shot = lambda i: TRUTHFULQA_PROMPT + f"Q: Q{i}?\nA: T{i}\n\n"
    assert got[0] == shot(1) + TRUTHFULQA_PROMPT + "Q: Q0?\nA:"
    assert got[1] == shot(0) + TRUTHFULQA_PROMPT + "Q: Q1?\nA:"


def test_gsm8k_request_is_lm_evals():
    train = [
        {"question": "Tom has 2 apples.", "answer": "He has 2.\n#### 2"},
        {"question": "Ann has 3 pens and buys 4.", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Unused?", "answer": "#### 0"},
    ]
    doc = {"question": "Bo reads 5 pages a day. How many in 3 days?", "answer": "5*3=15\n#### 15"}
    (req,) = tasks.build_requests("gsm8k", [doc], num_fewshot=2, fewshot_docs=train)
    assert req.context == (
        "Question: Ann has 3 pens and buys 4.\nAnswer: 3+4=<<3+4=7>>7\n#### 7\n\n"
        "Question: Tom has 2 apples.\nAnswer: He has 2.\n#### 2\n\n"
        "Question: Bo reads 5 pages a day. How many in 3 days?\nAnswer:"
    )
    assert req.until == ("Question:", "</s>", "<|im_end|>")
    assert (req.do_sample, req.temperature, req.max_gen_toks) == (False, 0.0, 256)
    assert req.target == "5*3=15\n#### 15"
    assert formats.TASKS["gsm8k"].num_fewshot == 5
    with pytest.raises(ValueError, match="need fewshot_docs"):
        tasks.build_requests("gsm8k", [doc])


def test_encode_pair_and_stop_strings():
    words = lambda s: s.replace(" ", " _").split()  # a toy tokenizer: space joins the next word
    assert tasks.encode_pair("Answer:", " B", words) == (["Answer:"], ["_B"])
    assert tasks.encode_pair("Answer: ", "B", words) == (["Answer:"], ["_B"])
    with pytest.raises(ValueError):
        tasks.encode_pair("", " B", words)
    text = "6 * 3 = 18.\n#### 18\n\nQuestion: next</s>"
    assert tasks.truncate_at_stop(text, tasks.GSM8K_UNTIL) == "6 * 3 = 18.\n#### 18\n\n"


# ------------------------------------------------------------------------------------------------
# Metrics


def test_acc_and_acc_norm_disagree_when_length_normalization_flips():
    choices = ["cat", "a domestic feline animal"]  # 3 and 24 characters
    lls = [-3.0, -6.0]  # raw: "cat" wins; per character: -1.0 vs -0.25, the long one wins
    assert tasks.mc_scores(lls, choices, gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert tasks.mc_scores(lls, choices, gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert tasks.mc_scores([-1.0, -1.0], ["ab", "cd"], gold=0)["acc"] == 1.0  # first of ties
    doc = _arc(0, "Q?", choices, ["A", "B"], "B")
    (req,) = tasks.build_requests("arc_easy", [doc])
    assert tasks.score(req, lls) == {"acc": 0.0, "acc_norm": 1.0}
    (mmlu_req,) = tasks.build_requests("mmlu", [_mmlu("Q", ["1", "2", "3", "4"], 2)])
    assert tasks.score(mmlu_req, [-4.0, -3.0, -1.0, -2.0]) == {"acc": 1.0}  # MMLU: acc only


def test_mc1_and_mc2_against_hand_computation():
    doc = _tqa("Q?", ["t", "f1", "f2"], [("t1", 1), ("t2", 1), ("f1", 0), ("f2", 0)])
    (mc1,) = tasks.build_requests("truthfulqa_mc1", [doc])
    assert tasks.score(mc1, [-1.0, -0.5, -3.0]) == {"acc": 0.0}
    assert tasks.score(mc1, [-0.4, -0.5, -3.0]) == {"acc": 1.0}
    lls = [-1.0, -2.0, -0.5, -3.0]
    p = [math.exp(x) for x in lls]
    expected = (p[0] + p[1]) / (p[0] + p[1] + p[2] + p[3])  # split at the first 0 label
    (mc2,) = tasks.build_requests("truthfulqa_mc2", [doc])
    assert tasks.score(mc2, lls)["acc"] == pytest.approx(expected, rel=1e-12)
    # Very unlikely answers (exp underflows to 0 in lm-eval's form): still the same mass.
    shifted = [x - 1000.0 for x in lls]
    assert tasks.mc2_score(shifted, [1, 1, 0, 0]) == pytest.approx(expected, rel=1e-12)
    # Labels not sorted: the mass on label 1 (lm-eval >= 0.4.9's mask).
    assert tasks.mc2_score([0.0, 0.0, 0.0], [0, 1, 0]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "generation, strict, flexible, em_strict, em_flexible",
    [
        ("12 * 100 + 34 = 1234.\n#### 1,234", "1,234", "1,234", 1.0, 1.0),
        ("The answer is $1,234.", "[invalid]", "$1,234.", 0.0, 1.0),
        ("He pays 7 + 8 = 15 dollars, so the total is 1234", "[invalid]", "1234", 0.0, 1.0),
        ("#### 1234\nThen 5 more.", "1234", "5", 1.0, 0.0),  # flexible takes the last number
        ("#### -1234.00", "-1234.00", "-1234.00", 0.0, 0.0),  # exact match is on strings
        ("No number at all", "[invalid]", "[invalid]", 0.0, 0.0),
    ],
)
def test_gsm8k_strict_and_flexible_extraction(generation, strict, flexible, em_strict, em_flexible):
    assert tasks.gsm8k_extract(generation, "strict") == strict
    assert tasks.gsm8k_extract(generation, "flexible") == flexible
    got = tasks.gsm8k_scores(generation, "So 12 * 100 + 34 = 1,234 in all.\n#### 1234")
    assert got == {
        "exact_match,strict-match": em_strict,
        "exact_match,flexible-extract": em_flexible,
    }


def test_gsm8k_dollar_answer_and_exact_match_normalization():
    target = "Janet makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    got = tasks.gsm8k_scores("She sells 9 eggs at $2, so the answer is $18.", target)
    assert got == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}
    (req,) = tasks.build_requests("gsm8k", [{"question": "Q", "answer": target}], num_fewshot=0)
    # The stop string ends the answer before the next question's numbers.
    assert tasks.score(req, "#### 18\n\nQuestion: 3 + 4 = 7") == {
        "exact_match,strict-match": 1.0,
        "exact_match,flexible-extract": 1.0,
    }
    assert tasks.exact_match("ABC.", "abc", regexes_to_ignore=[r"\.$"], ignore_case=True) == 1.0
    assert tasks.exact_match("a,b!", "ab", ignore_punctuation=True) == 1.0
    assert tasks.exact_match("ABC", "abc") == 0.0


# ------------------------------------------------------------------------------------------------
# Aggregation


def test_stderr_is_sample_stdev_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.25]
    expected = statistics.stdev(values) / math.sqrt(len(values))
    assert tasks.mean_stderr(values) == pytest.approx(expected, rel=1e-12)
    assert tasks.mean_stderr([1.0]) is None


def test_evaluate_groups_mmlu_and_writes_a_table():
    docs = [_mmlu(f"q{i}", ["1", "2", "3", "4"], 0) for i in range(4)] + [
        _mmlu(f"p{i}", ["1", "2", "3", "4"], 0, subject="philosophy") for i in range(2)
    ]
    arc = [_arc(i, f"q{i}", ["yes", "no"], ["A", "B"], "A") for i in range(3)]
    requests = tasks.build_requests("mmlu", docs) + tasks.build_requests("arc_easy", arc)
    right, wrong = [0.0, -1.0, -1.0, -1.0], [-1.0, 0.0, -1.0, -1.0]
    outputs = [right, right, right, wrong, right, wrong, [0.0, -1.0], [-1.0, 0.0], [-0.5, -0.4]]
    results = tasks.evaluate(requests, outputs)
    assert list(results) == [
        "mmlu",
        "mmlu_stem",
        "mmlu_humanities",
        "mmlu_high_school_mathematics",
        "mmlu_philosophy",
        "arc_easy",
    ]
    math_acc = results["mmlu_high_school_mathematics"]["acc"]
    phil_acc = results["mmlu_philosophy"]["acc"]
    assert (math_acc["value"], math_acc["n"], phil_acc["value"]) == (0.75, 4, 0.5)
    se = lambda v: statistics.stdev(v) / math.sqrt(len(v))
    assert math_acc["stderr"] == pytest.approx(se([1, 1, 1, 0]))
    group = results["mmlu"]["acc"]
    assert group["value"] == pytest.approx((0.75 * 4 + 0.5 * 2) / 6) and group["n"] == 6
    pooled = math.sqrt(
        ((4 - 1) * se([1, 1, 1, 0]) ** 2 * 4 + (2 - 1) * se([1, 0]) ** 2 * 2) / (6 - 2) / 6
    )
    assert group["stderr"] == pytest.approx(pooled)
    stem = results["mmlu_stem"]["acc"]
    assert (stem["value"], stem["n"]) == (0.75, 4)
    assert stem["stderr"] == pytest.approx(math_acc["stderr"])
    arc_res = results["arc_easy"]
    assert arc_res["acc"]["value"] == pytest.approx(1 / 3)
    assert arc_res["acc_norm"]["value"] == pytest.approx(2 / 3)  # "no" (2 chars) vs "yes" (3)

    table = tasks.markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| task | metric | value | stderr | n |"
    assert f"| mmlu | acc | 0.6667 | {pooled:.4f} | 6 |" in lines
    assert "| arc_easy | acc_norm | 0.6667 | 0.3333 | 3 |" in lines
    single = tasks.evaluate(requests[-1:], outputs[-1:])
    assert "| arc_easy | acc | 0.0000 | N/A | 1 |" in tasks.markdown_table(single)
    with pytest.raises(ValueError, match="outputs"):
        tasks.evaluate(requests, outputs[:-1])


# ------------------------------------------------------------------------------------------------
# Loading


def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_loaders_read_jsonl_and_skip_bad_rows(tmp_path):
    mmlu = _write_jsonl(
        tmp_path / "mmlu.jsonl",
        [
            _mmlu("ok", ["1", "2", "3", "4"], 3),
            _mmlu("bad answer", ["1", "2", "3", "4"], 4),
            _mmlu("three choices", ["1", "2", "3"], 0),
            _mmlu("other subject", ["1", "2", "3", "4"], 0, subject="virology"),
        ],
        raw_lines=["{not json", "", "[1, 2]"],
    )
    got = formats.load_docs("mmlu", mmlu)
    assert [d["question"] for d in got.docs] == ["ok", "other subject"]
    assert got.skip_counts == {
        "answer is not an int in [0, 4)": 1,
        "choices has 3 entries, the template needs 4": 1,
        "invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "not a JSON object": 1,
    }
    assert got.skipped[0][0].endswith("mmlu.jsonl:1")
    assert [d["question"] for d in formats.load_docs("mmlu", mmlu, subject="virology").docs] == [
        "other subject"
    ]

    arc = [
        _arc(0, "q", ["a", "b"], ["1", "2"], "2"),
        _arc(1, "q", ["a", "b"], ["A", "B"], "E"),
        _arc(2, "q", ["a", "b"], ["A"], "A"),
    ]
    arc_path = tmp_path / "arc.jsonl.gz"
    with gzip.open(arc_path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in arc) + "\n")
    got = formats.load_docs("arc_challenge", [arc_path, arc_path])  # two shards
    assert len(got.docs) == 2 and len(got.skipped) == 4
    assert "answerKey 'E' not among labels" in got.skipped[0][1]

    good = _tqa("q", ["t", "f"], [("t", 1), ("f", 0)])
    bad = _tqa("q", ["t", "f"], [("t", 1), ("f", 0)])
    bad["mc2_targets"]["labels"] = [1]
    unsorted = _tqa("q", ["t", "f"], [("t", 1), ("f", 0)])
    unsorted["mc1_targets"]["labels"] = [0, 1]
    tqa = _write_jsonl(tmp_path / "tqa.jsonl", [good, bad, unsorted])
    assert len(formats.load_docs("truthfulqa_mc1", tqa).docs) == 2
    mc2 = formats.load_docs("truthfulqa_mc2", tqa)
    assert len(mc2.docs) == 2 and mc2.skip_counts == {"mc2_targets: 2 choices but 1 labels": 1}

    gsm = _write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [{"question": "q", "answer": "#### 3"}, {"question": "q", "answer": "3"}, {"answer": "x"}],
    )
    got = formats.load_docs("gsm8k", gsm)
    assert len(got.docs) == 1
    assert got.skip_counts == {
        "answer has no '#### ' final answer": 1,
        "question missing or not a string": 1,
    }


def test_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such data file: .*missing.jsonl"):
        formats.load_docs("gsm8k", tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="parquet, .jsonl"):
        formats.load_docs("gsm8k", tmp_path / "x.csv")
    with pytest.raises(ValueError, match="unknown task"):
        formats.load_docs("hellaswag", tmp_path / "x.csv")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow"):
        formats.load_docs("gsm8k", tmp_path / "x.parquet")


def test_loaders_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        _arc(0, "Which?", ["a", "b", "c"], ["A", "B", "C"], "C"),
        _arc(1, "Bad key?", ["a", "b"], ["A", "B"], "D"),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    got = formats.load_docs("arc_easy", tmp_path / "test-00000-of-00001.parquet")
    assert got.docs == rows[:1] and len(got.skipped) == 1
    (req,) = tasks.build_requests("arc_easy", got.docs)
    assert req.gold == 2 and req.continuations == (" a", " b", " c")
