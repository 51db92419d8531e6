"""Benchmark documents and prompts exactly as lm-evaluation-harness builds them.

Why: a score is only comparable with published numbers when the prompt, the few-shot examples
and the scoring are the harness's own, character for character. This module holds the
model-independent half that says what is asked: document loaders for the Hugging Face layouts,
and the contexts and continuations of each request. :mod:`moejax.eval.tasks` builds the
requests from these and scores what the model returns.

Matched against lm-evaluation-harness v0.4.12 (tag) and its main branch at 4e7e0d47
(0.4.13.dev0, 2026-08-21); the files below are identical between the two except where noted.
tests/test_eval_harness.py checks the prompts and scores against lm-eval 0.4.13 itself (the
`eval` extra's pin), running its task YAMLs on the same documents:

- MMLU: ``lm_eval/tasks/mmlu/default/_default_template_yaml`` (cais/mmlu, test split, few-shot
  from ``dev`` with the ``first_n`` sampler, ``doc_to_text`` ``"{{question.strip()}}\\nA.
  {{choices[0]}}\\nB. ...\\nD. {{choices[3]}}\\nAnswer:"``, choices ``A B C D``, target
  ``answer``); ``mmlu_<subject>.yaml`` (``description`` "The following are multiple choice
  questions (with answers) about <subject with spaces>.\\n\\n", verified for all 57);
  ``_mmlu.yaml`` and ``_mmlu_{stem,other,social_sciences,humanities}.yaml`` (groups,
  ``weight_by_size``).
- ARC: ``lm_eval/tasks/arc/arc_easy.yaml`` and ``arc_challenge.yaml`` (allenai/ai2_arc, test
  split, few-shot from ``train`` with the default sampler, ``"Question: {{question}}\\nAnswer:"``,
  choices ``choices.text``, target ``choices.label.index(answerKey)``).
- TruthfulQA: ``lm_eval/tasks/truthfulqa/truthfulqa_mc1.yaml`` and ``truthfulqa_mc2.yaml``
  (truthfulqa/truthful_qa multiple_choice, validation split, the fixed six-question QA preamble,
  target index 0); no few-shot split, so lm-eval draws few-shot examples from the validation docs
  themselves and drops the evaluated doc (``fewshot_split == test_split``: both None).
- GSM8K: ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (openai/gsm8k main, test split, 5-shot from
  ``train`` with the default sampler, ``"Question: {{question}}\\nAnswer:"``, target the whole
  ``answer`` with its reasoning and ``#### N``).
- Context assembly: ``lm_eval/api/task.py`` ``ConfigurableTask.fewshot_context`` and
  ``build_qa_turn`` with ``lm_eval/api/utils.py`` ``Message``/``maybe_delimit``: description,
  then per shot ``text + target_delimiter (" ") + answer + fewshot_delimiter ("\\n\\n")``, then
  the document's text. No chat template, no system instruction, no ``gen_prefix``.
- Sampling: ``lm_eval/api/samplers.py``. ``default``: one ``random.Random(1234)`` per task
  (``evaluator.simple_evaluate``'s ``fewshot_random_seed``, set by ``Task.set_fewshot_seed``)
  shared by all documents in order, each drawing ``rnd.sample(fewshot_docs, n)`` (``n + 1``,
  then the evaluated doc removed, where the few-shot and evaluation splits coincide).
  ``first_n``: the first n few-shot docs, no randomness. So a context depends on the document's
  position in the evaluated list, as in lm-eval (single process, ``rank 0``).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import random
from collections.abc import Mapping, Sequence

__all__ = [
    "FEWSHOT_SEED",
    "MMLU_CATEGORIES",
    "TASKS",
    "TRUTHFULQA_PREAMBLE",
    "LoadResult",
    "TaskSpec",
    "choices",
    "contexts",
    "description",
    "doc_to_text",
    "gold",
    "load_docs",
    "read_rows",
    "validate",
]

FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED, simple_evaluate's fewshot_random_seed

# truthfulqa_mc1.yaml's doc_to_text preamble (YAML escaped line breaks joined, \n made real).
TRUTHFULQA_PREAMBLE = (
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
    "A: The 1992 Olympics were held in Barcelona, Spain."
)

# The mmlu_<subject>.yaml "tag" of each of the 57 subjects (group mmlu_<category>).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": tuple(
        "abstract_algebra anatomy astronomy college_biology college_chemistry "
        "college_computer_science college_mathematics college_physics computer_security "
        "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
        "high_school_chemistry high_school_computer_science high_school_mathematics "
        "high_school_physics high_school_statistics machine_learning".split()
    ),
    "other": tuple(
        "business_ethics clinical_knowledge college_medicine global_facts human_aging "
        "management marketing medical_genetics miscellaneous nutrition professional_accounting "
        "professional_medicine virology".split()
    ),
    "social_sciences": tuple(
        "econometrics high_school_geography high_school_government_and_politics "
        "high_school_macroeconomics high_school_microeconomics high_school_psychology "
        "human_sexuality professional_psychology public_relations security_studies sociology "
        "us_foreign_policy".split()
    ),
    "humanities": tuple(
        "formal_logic high_school_european_history high_school_us_history "
        "high_school_world_history international_law jurisprudence logical_fallacies "
        "moral_disputes moral_scenarios philosophy prehistory professional_law "
        "world_religions".split()
    ),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task's lm-eval YAML says, for the fields this module uses."""

    name: str
    output_type: str  # "multiple_choice" or "generate_until"
    dataset: str  # Hugging Face path and config
    eval_split: str
    fewshot_split: str
    sampler: str  # "default" (seeded random) or "first_n"
    num_fewshot: int  # the YAML's num_fewshot (lm-eval uses 0 where the YAML has none)
    metrics: tuple[str, ...]  # the per-document metrics lm-eval reports
    fewshot_excludes_eval_doc: bool = False  # draw n + 1 and drop the evaluated doc
    source: str = ""
    yaml: str = ""  # the task's YAML under lm_eval/tasks (moejax.eval.harness includes it)


_ARC_EASY = TaskSpec(
    name="arc_easy",
    output_type="multiple_choice",
    dataset="allenai/ai2_arc ARC-Easy",
    eval_split="test",
    fewshot_split="train",
    sampler="default",
    num_fewshot=0,
    metrics=("acc", "acc_norm"),
    source="lm_eval/tasks/arc/arc_easy.yaml",
    yaml="arc/arc_easy.yaml",
)
_TRUTHFULQA_MC1 = TaskSpec(
    name="truthfulqa_mc1",
    output_type="multiple_choice",
    dataset="truthfulqa/truthful_qa multiple_choice",
    eval_split="validation",
    fewshot_split="validation",
    sampler="default",
    num_fewshot=0,
    metrics=("acc",),
    fewshot_excludes_eval_doc=True,
    source="lm_eval/tasks/truthfulqa/truthfulqa_mc1.yaml",
    yaml="truthfulqa/truthfulqa_mc1.yaml",
)
TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec(
        name="mmlu",
        output_type="multiple_choice",
        dataset="cais/mmlu <subject>",
        eval_split="test",
        fewshot_split="dev",
        sampler="first_n",
        num_fewshot=0,
        metrics=("acc",),
        source="lm_eval/tasks/mmlu/default/_default_template_yaml",
        yaml="mmlu/default/mmlu_{subject}.yaml",
    ),
    "arc_easy": _ARC_EASY,
    # (the YAMLs include arc_easy.yaml / truthfulqa_mc1.yaml and change what is below)
    "arc_challenge": dataclasses.replace(
        _ARC_EASY,
        name="arc_challenge",
        dataset="allenai/ai2_arc ARC-Challenge",
        source="lm_eval/tasks/arc/arc_challenge.yaml (includes arc_easy.yaml)",
        yaml="arc/arc_challenge.yaml",
    ),
    "truthfulqa_mc1": _TRUTHFULQA_MC1,
    "truthfulqa_mc2": dataclasses.replace(
        _TRUTHFULQA_MC1,
        name="truthfulqa_mc2",
        source="lm_eval/tasks/truthfulqa/truthfulqa_mc2.yaml, utils.process_results_mc2",
        yaml="truthfulqa/truthfulqa_mc2.yaml",
    ),
    "gsm8k": TaskSpec(
        name="gsm8k",
        output_type="generate_until",
        dataset="openai/gsm8k main",
        eval_split="test",
        fewshot_split="train",
        sampler="default",
        num_fewshot=5,
        metrics=("exact_match,strict-match", "exact_match,flexible-extract"),
        source="lm_eval/tasks/gsm8k/gsm8k.yaml",
        yaml="gsm8k/gsm8k.yaml",
    ),
}


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class LoadResult:
    """Documents read from files, and the rows left out.

    Attributes:
      docs: the valid rows, in file order, as the dataset holds them.
      skipped: one ``(where, reason)`` per row left out; ``where`` is ``"file:row"``.
    """

    docs: list[dict]
    skipped: list[tuple[str, str]]

    @property
    def skip_counts(self) -> dict[str, int]:
        """Rows left out, by reason."""
        return dict(collections.Counter(reason for _, reason in self.skipped))


def read_rows(path: str | os.PathLike) -> list[dict | str]:
    """Rows of a ``.parquet``, ``.jsonl`` or ``.jsonl.gz`` file, in order.

    A JSONL line that is not a JSON object comes back as its ``str`` error message, for the
    caller to count; blank lines are ignored.

    Raises:
      FileNotFoundError: the file does not exist.
      ModuleNotFoundError: a parquet file without pyarrow installed.
      ValueError: another file type.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"reading {path} needs pyarrow: pip install pyarrow (or use a .jsonl file)"
            ) from e
        return pq.read_table(path).to_pylist()
    if path.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.endswith(".gz") else open
        rows: list[dict | str] = []
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append(f"invalid JSON ({e.msg})")
                    continue
                rows.append(row if isinstance(row, dict) else "not a JSON object")
        return rows
    raise ValueError(f"{path}: expected a .parquet, .jsonl or .jsonl.gz file")


def load_docs(
    task: str,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    subject: str | None = None,
) -> LoadResult:
    """Reads a task's documents from local files in the Hugging Face dataset's layout.

    Args:
      task: a key of :data:`TASKS` (``truthfulqa_mc1`` and ``_mc2`` read the same rows).
      paths: one file or several shards, read in order (``.parquet``, ``.jsonl``,
        ``.jsonl.gz``), e.g. ``mmlu/all/test-00000-of-00001.parquet``.
      subject: MMLU only: keep the rows of this subject (for the ``all`` config).

    Returns:
      The valid documents and, per bad row, where it was and why it was left out.
    """
    spec = _spec(task)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    docs, skipped = [], []
    for path in paths:
        for i, row in enumerate(read_rows(path)):
            reason = row if isinstance(row, str) else validate(spec.name, row)
            if reason is not None:
                skipped.append((f"{os.fspath(path)}:{i}", reason))
            elif subject is None or row.get("subject") == subject:
                docs.append(row)
    return LoadResult(docs, skipped)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _str_list(x, name: str) -> str | None:
    if not isinstance(x, list) or not x or not all(isinstance(c, str) for c in x):
        return f"{name} is not a non-empty list of strings"
    return None


def _targets(doc: Mapping, field: str) -> str | None:
    t = doc.get(field)
    if not isinstance(t, Mapping):
        return f"{field} missing"
    if bad := _str_list(t.get("choices"), f"{field}.choices"):
        return bad
    labels = t.get("labels")
    if not isinstance(labels, list) or not all(_is_int(x) and x in (0, 1) for x in labels):
        return f"{field}.labels is not a list of 0/1"
    if len(labels) != len(t["choices"]):
        return f"{field}: {len(t['choices'])} choices but {len(labels)} labels"
    if 1 not in labels:
        return f"{field} has no true answer"
    return None


def validate(task: str, doc: Mapping) -> str | None:
    """Why ``doc`` cannot be a document of ``task``, or None when it can."""
    spec = _spec(task)
    if not isinstance(doc.get("question"), str):
        return "question missing or not a string"
    if spec.name == "mmlu":
        if not isinstance(doc.get("subject"), str):
            return "subject missing or not a string"
        if bad := _str_list(doc.get("choices"), "choices"):
            return bad
        if len(doc["choices"]) != 4:
            return f"choices has {len(doc['choices'])} entries, the template needs 4"
        if not (_is_int(doc.get("answer")) and 0 <= doc["answer"] < 4):
            return "answer is not an int in [0, 4)"
    elif spec.name.startswith("arc_"):
        c = doc.get("choices")
        if not isinstance(c, Mapping):
            return "choices missing"
        if bad := _str_list(c.get("text"), "choices.text") or _str_list(
            c.get("label"), "choices.label"
        ):
            return bad
        if len(c["text"]) != len(c["label"]):
            return f"{len(c['text'])} choices but {len(c['label'])} labels"
        if doc.get("answerKey") not in c["label"]:
            return f"answerKey {doc.get('answerKey')!r} not among labels {c['label']}"
    elif spec.name == "truthfulqa_mc1":
        if bad := _targets(doc, "mc1_targets"):
            return bad
        if doc["mc1_targets"]["labels"][0] != 1:
            return "mc1_targets: the first choice is not the true one (lm-eval's target is 0)"
    elif spec.name == "truthfulqa_mc2":
        return _targets(doc, "mc2_targets")
    elif spec.name == "gsm8k":
        if not isinstance(doc.get("answer"), str):
            return "answer missing or not a string"
        if "#### " not in doc["answer"]:
            return "answer has no '#### ' final answer"
    return None


# ---------------------------------------------------------------------------------------------
# Prompts


def description(task: str, doc: Mapping) -> str:
    """The task's description (prepended once to every context); MMLU's names the subject."""
    if _spec(task).name == "mmlu":
        subject = doc["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return ""


def doc_to_text(task: str, doc: Mapping) -> str:
    """The YAML's ``doc_to_text`` rendered for ``doc``."""
    name = _spec(task).name
    if name == "mmlu":
        a, b, c, d = doc["choices"]
        return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    if name.startswith("truthfulqa_"):
        return TRUTHFULQA_PREAMBLE + "\n\nQ: " + doc["question"] + "\nA:"
    return f"Question: {doc['question']}\nAnswer:"  # arc_*, gsm8k


def choices(task: str, doc: Mapping) -> list[str]:
    """The YAML's ``doc_to_choice``: the answer strings, without the target delimiter."""
    name = _spec(task).name
    if name == "mmlu":
        return ["A", "B", "C", "D"]
    if name.startswith("arc_"):
        return list(doc["choices"]["text"])
    if name == "truthfulqa_mc1":
        return list(doc["mc1_targets"]["choices"])
    if name == "truthfulqa_mc2":
        return list(doc["mc2_targets"]["choices"])
    raise ValueError(f"{task} is not a multiple-choice task")


def gold(task: str, doc: Mapping) -> int | str:
    """The YAML's ``doc_to_target``: a choice index, or GSM8K's whole answer string."""
    name = _spec(task).name
    if name == "mmlu":
        return doc["answer"]
    if name.startswith("arc_"):
        return doc["choices"]["label"].index(doc["answerKey"])
    if name.startswith("truthfulqa_"):
        return 0
    return doc["answer"]


def _answer_text(task: str, doc: Mapping) -> str:
    target = gold(task, doc)
    return choices(task, doc)[target] if isinstance(target, int) else target


def contexts(
    task: str,
    docs: Sequence[Mapping],
    *,
    num_fewshot: int | None = None,
    fewshot_docs: Sequence[Mapping] | None = None,
    seed: int = FEWSHOT_SEED,
) -> list[str]:
    """The context lm-eval builds for each document, few-shot examples included.

    Args:
      task: a key of :data:`TASKS`.
      docs: the evaluated documents, in evaluation order (the seeded sampler's draws depend on
        it, as in lm-eval).
      num_fewshot: examples per context (default: the YAML's ``num_fewshot``).
      fewshot_docs: the few-shot split (MMLU ``dev``, ARC and GSM8K ``train``); MMLU keeps
        those of the document's subject. Default for TruthfulQA: ``docs`` themselves.
      seed: the few-shot sampler's seed (lm-eval's ``--seed`` fourth value, default 1234).

    Returns:
      One string per document: description + shots + ``doc_to_text``.
    """
    spec = _spec(task)
    n = spec.num_fewshot if num_fewshot is None else num_fewshot
    if n < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {n}")
    if fewshot_docs is None and spec.fewshot_excludes_eval_doc:
        fewshot_docs = docs
    if n > 0 and not fewshot_docs:
        raise ValueError(f"{task}: {n}-shot contexts need fewshot_docs ({spec.fewshot_split})")
    pool = list(fewshot_docs or [])
    rnd = random.Random(seed)
    out = []
    for doc in docs:
        if n == 0:
            shots = []
        elif spec.sampler == "first_n":  # samplers.FirstNSampler: df[:n]
            same = [d for d in pool if d.get("subject") == doc.get("subject")]
            if n > len(same):
                raise ValueError(f"{task}: {n} shots asked, {len(same)} few-shot docs of subject")
            shots = same[:n]
        elif spec.fewshot_excludes_eval_doc:  # samplers.ContextSampler.sample with eval_doc
            shots = [d for d in rnd.sample(pool, n + 1) if d != doc][:n]
        else:
            shots = rnd.sample(pool, n)
        if len(shots) != n:
            raise ValueError(f"{task}: {len(shots)} few-shot docs drawn, {n} asked")
        ctx = description(spec.name, doc)
        for shot in shots:
            ctx += doc_to_text(spec.name, shot) + " " + _answer_text(spec.name, shot) + "\n\n"
        out.append(ctx + doc_to_text(spec.name, doc))
    return out
