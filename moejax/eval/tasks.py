"""MMLU, ARC, TruthfulQA MC1/MC2 and GSM8K: requests and lm-evaluation-harness-exact scoring.

Why: published numbers for these benchmarks come from lm-evaluation-harness, and small
departures (a missing space before a choice, length-normalizing by tokens instead of
characters, another few-shot draw, a looser answer regex) move scores by points. This module
reproduces the harness's model-independent half; the model side only has to return, per
request, the log-likelihood of each continuation given the context, or a greedy generation.

Flow: :func:`moejax.eval.formats.load_docs` → :func:`build_requests` → (model) →
:func:`score` per document → :func:`evaluate` (per task, MMLU subjects and groups) →
:func:`markdown_table`.

Matched against lm-evaluation-harness v0.4.12 and main at 4e7e0d47 (0.4.13.dev0); prompts and
sampling are documented in :mod:`moejax.eval.formats`. Scoring sources:

- ``lm_eval/api/task.py`` ``ConfigurableTask.construct_requests``: one ``(context,
  " " + choice)`` pair per choice; ``process_results`` (multiple_choice): ``acc`` = argmax of
  the log-likelihoods, ``acc_norm`` = argmax of ll / ``len(choice)`` in characters (the choice
  without the leading space); ``np.argmax`` keeps the first of equal values.
- ``lm_eval/tasks/truthfulqa/utils.py`` ``process_results_mc2`` (since v0.4.9, PR #2768):
  ``p = exp(ll)``, ``p / sum(p)``, summed over ``labels == 1``. Before v0.4.9 it split at the
  first 0 label; both agree on TruthfulQA, whose true answers always come first. Here the
  maximum ll is subtracted before ``exp`` (the same value; lm-eval's form gives NaN once every
  ll is below about -745).
- ``lm_eval/tasks/gsm8k/gsm8k.yaml`` ``filter_list`` and ``lm_eval/filters/extraction.py``
  ``RegexFilter`` (``findall``, ``group_select``, the first non-empty group of a tuple,
  ``strip``, fallback ``"[invalid]"``) then ``take_first``; ``exact_match`` is
  ``lm_eval/api/metrics.py`` ``exact_match_hf_evaluate`` with the YAML's ``ignore_case: true``,
  ``ignore_punctuation: false`` and ``regexes_to_ignore`` applied in order to prediction and
  reference (the whole ``answer``, reasoning included). Generation: ``until`` from the YAML,
  greedy, ``max_gen_toks`` 256 (HFLM's default; the YAML sets none); the text is cut at the
  first stop string as ``lm_eval/models/utils.py`` ``postprocess_generated_text`` does.
- Aggregation: ``lm_eval/api/metrics.py`` ``mean`` and ``mean_stderr`` (sample standard
  deviation / sqrt(n); "N/A" for n < 2, ``evaluator_utils``); groups (MMLU and its four
  categories) from ``lm_eval/api/group.py``: the size-weighted mean of the leaf tasks and
  ``pooled_sample_stderr``.
- Log-likelihood pairs: ``lm_eval/api/model.py`` ``TemplateLM._encode_pair`` (see
  :func:`encode_pair`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moejax.eval import formats

__all__ = [
    "GSM8K_FLEXIBLE",
    "GSM8K_IGNORE",
    "GSM8K_STRICT",
    "GSM8K_UNTIL",
    "GenRequest",
    "MCRequest",
    "build_requests",
    "encode_pair",
    "evaluate",
    "exact_match",
    "gsm8k_extract",
    "gsm8k_scores",
    "markdown_table",
    "mc2_score",
    "mc_scores",
    "mean_stderr",
    "pooled_stderr",
    "regex_extract",
    "score",
    "truncate_at_stop",
]

GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
MAX_GEN_TOKS = 256  # lm_eval.models.huggingface.HFLM.max_gen_toks
FALLBACK = "[invalid]"


@dataclasses.dataclass(frozen=True)
class MCRequest:
    """A multiple-choice document: score ``ll(continuation | context)`` for each continuation.

    Attributes:
      task: the task name (a key of ``formats.TASKS``).
      subtask: where the document is aggregated (``mmlu_<subject>`` for MMLU, else ``task``).
      doc_index: the document's position in the evaluated list.
      context: description + few-shot examples + the question.
      continuations: ``" " + choice`` per choice (lm-eval's target_delimiter).
      choices: the choices without the delimiter (their lengths normalize acc_norm).
      gold: the index of the correct choice.
      labels: TruthfulQA MC2's 0/1 label per choice, else None.
    """

    task: str
    subtask: str
    doc_index: int
    context: str
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    labels: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """A generative document: greedy-decode from ``context`` until a stop string.

    Attributes:
      task, subtask, doc_index, context: as in :class:`MCRequest`.
      target: the reference (GSM8K's whole answer; exact_match strips it to the number).
      until: stop strings; the model side also stops at its own end-of-text token.
      max_gen_toks: the most tokens to generate.
      do_sample, temperature: greedy decoding, as the YAML says.
    """

    task: str
    subtask: str
    doc_index: int
    context: str
    target: str
    until: tuple[str, ...] = GSM8K_UNTIL
    max_gen_toks: int = MAX_GEN_TOKS
    do_sample: bool = False
    temperature: float = 0.0


def build_requests(
    task: str,
    docs: Sequence[Mapping],
    *,
    num_fewshot: int | None = None,
    fewshot_docs: Sequence[Mapping] | None = None,
    seed: int = formats.FEWSHOT_SEED,
    max_gen_toks: int = MAX_GEN_TOKS,
) -> list[MCRequest | GenRequest]:
    """One request per document, as lm-eval builds them (arguments as in ``formats.contexts``).

    Returns:
      :class:`MCRequest` per document for the multiple-choice tasks, :class:`GenRequest` for GSM8K.
    """
    if task not in formats.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(formats.TASKS)}")
    spec = formats.TASKS[task]
    ctxs = formats.contexts(
        task, docs, num_fewshot=num_fewshot, fewshot_docs=fewshot_docs, seed=seed
    )
    requests: list[MCRequest | GenRequest] = []
    for i, (doc, ctx) in enumerate(zip(docs, ctxs)):
        subtask = f"mmlu_{doc['subject']}" if task == "mmlu" else task
        if spec.output_type == "generate_until":
            target = formats.gold(task, doc)
            requests.append(GenRequest(task, subtask, i, ctx, target, max_gen_toks=max_gen_toks))
            continue
        choices = tuple(formats.choices(task, doc))
        labels = tuple(doc["mc2_targets"]["labels"]) if task == "truthfulqa_mc2" else None
        requests.append(
            MCRequest(
                task,
                subtask,
                i,
                ctx,
                tuple(" " + c for c in choices),
                choices,
                formats.gold(task, doc),
                labels,
            )
        )
    return requests


def encode_pair(
    context: str, continuation: str, encode: Callable[[str], Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair, split as lm-eval's causal models do.

    Trailing whitespace of the context moves to the continuation, the whole string is
    encoded once, and the continuation is what follows the context's own encoding.

    Args:
      context: non-empty (lm-eval conditions an empty context on its prefix token instead).
      encode: the tokenizer (with the special tokens lm-eval's ``tok_encode`` adds).
    """
    if not context:
        raise ValueError("empty context: condition on the BOS/prefix token instead")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(encode(context + continuation))
    ctx = list(encode(context))
    return ctx, whole[len(ctx) :]


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """Cuts a generation at every stop string in turn (lm-eval's postprocess_generated_text)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ---------------------------------------------------------------------------------------------
# Per-document metrics


def mc_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice document.

    Args:
      lls: [C] log-likelihood of each continuation (``" " + choice``) given the context.
      choices: [C] the choice strings without the leading space.
      gold: index of the correct choice.
    """
    lls = np.asarray(lls, dtype=np.float64)  # [C]
    if lls.shape != (len(choices),):
        raise ValueError(f"{lls.shape[0]} log-likelihoods for {len(choices)} choices")
    lengths = np.array([float(len(c)) for c in choices])  # [C] characters, as lm-eval
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / lengths))
    return {"acc": float(int(np.argmax(lls)) == gold), "acc_norm": float(pred_norm == gold)}


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: the normalized probability mass of the true answers.

    Args:
      lls: [C] log-likelihood of each mc2 choice.
      labels: [C] 1 for a true answer, 0 for a false one.
    """
    lls = np.asarray(lls, dtype=np.float64)  # [C]
    labels = np.asarray(labels)
    if lls.shape != labels.shape:
        raise ValueError(f"{lls.shape[0]} log-likelihoods for {labels.shape[0]} labels")
    probs = np.exp(lls - lls.max())  # exp(ll) up to a common factor that cancels
    return float(np.sum((probs / probs.sum())[labels == 1]))


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval's ``regex`` filter on one response."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def gsm8k_extract(text: str, mode: str = "strict") -> str:
    """GSM8K's answer filters: ``strict`` (``#### N``) or ``flexible`` (the last number)."""
    if mode == "strict":
        return regex_extract(text, GSM8K_STRICT)
    if mode == "flexible":
        return regex_extract(text, GSM8K_FLEXIBLE, group_select=-1)
    raise ValueError(f"mode is 'strict' or 'flexible', got {mode!r}")


def exact_match(
    prediction: str,
    reference: str,
    *,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
) -> float:
    """lm-eval's exact_match for one document: 1.0 when the normalized strings are equal."""
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def gsm8k_scores(generation: str, target: str) -> dict[str, float]:
    """exact_match under both of gsm8k.yaml's filters, for one generation."""
    kw = dict(regexes_to_ignore=GSM8K_IGNORE, ignore_case=True, ignore_punctuation=False)
    strict = exact_match(gsm8k_extract(generation, "strict"), target, **kw)
    flexible = exact_match(gsm8k_extract(generation, "flexible"), target, **kw)
    return {"exact_match,strict-match": strict, "exact_match,flexible-extract": flexible}


def score(request: MCRequest | GenRequest, output: Sequence[float] | str) -> dict[str, float]:
    """The metrics lm-eval reports for one document of ``request.task``.

    Args:
      request: from :func:`build_requests`.
      output: for an :class:`MCRequest`, [C] log-likelihoods of its continuations; for a
        :class:`GenRequest`, the generated text (cut here at ``until`` if it was not).
    """
    if isinstance(request, GenRequest):
        return gsm8k_scores(truncate_at_stop(output, request.until), request.target)
    if request.task == "truthfulqa_mc2":
        return {"acc": mc2_score(output, request.labels)}
    scores = mc_scores(output, request.choices, request.gold)
    return {m: scores[m] for m in formats.TASKS[request.task].metrics}


# ---------------------------------------------------------------------------------------------
# Aggregation


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample stdev / sqrt(n); None ("N/A") when n < 2.

    Computed in lm-eval's own order of operations (metrics.sample_stddev), so the last digits
    agree with its reports too.
    """
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-eval's pooled_sample_stderr: a group's stderr from its tasks' stderrs and sizes."""
    pooled_var = sum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes)) / (
        sum(sizes) - len(sizes)
    )
    return math.sqrt(pooled_var / sum(sizes))


def _aggregate(per_doc: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    metrics = list(per_doc[0]) if per_doc else []
    out = {}
    for m in metrics:
        values = [s[m] for s in per_doc]
        value = sum(values) / len(values)  # metrics.mean
        out[m] = {"value": value, "stderr": mean_stderr(values), "n": len(values)}
    return out


def _group(members: Sequence[Mapping[str, dict]]) -> dict[str, dict]:
    out = {}
    for m in members[0]:
        rows = [r[m] for r in members]
        sizes = [r["n"] for r in rows]
        value = sum(r["value"] * r["n"] for r in rows) / sum(sizes)
        stderrs = [r["stderr"] for r in rows]
        pooled = None if None in stderrs else pooled_stderr(stderrs, sizes)
        out[m] = {"value": value, "stderr": pooled, "n": sum(sizes)}
    return out


def evaluate(
    requests: Sequence[MCRequest | GenRequest], outputs: Sequence[Sequence[float] | str]
) -> dict[str, dict[str, dict]]:
    """Scores every document and aggregates per task as lm-eval reports it.

    MMLU documents are aggregated per subject (``mmlu_<subject>``), then in the groups
    ``mmlu`` and ``mmlu_<category>`` over the subjects present (size-weighted, pooled stderr).

    Returns:
      {name: {metric: {"value", "stderr" (None for N/A), "n"}}}, groups before their subjects.
    """
    if len(requests) != len(outputs):
        raise ValueError(f"{len(requests)} requests but {len(outputs)} outputs")
    per_doc: dict[str, list] = {}
    for request, output in zip(requests, outputs):
        per_doc.setdefault(request.subtask, []).append(score(request, output))
    leaves = {name: _aggregate(scores) for name, scores in per_doc.items()}
    subjects = sorted(name for name in leaves if name.startswith("mmlu_"))
    results: dict[str, dict[str, dict]] = {}
    for name in leaves:
        if name.startswith("mmlu_"):
            if "mmlu" not in results:
                results["mmlu"] = _group([leaves[s] for s in subjects])
                for category, members in formats.MMLU_CATEGORIES.items():
                    present = [f"mmlu_{s}" for s in members if f"mmlu_{s}" in leaves]
                    if present:
                        results[f"mmlu_{category}"] = _group([leaves[s] for s in present])
                results.update((s, leaves[s]) for s in subjects)
        else:
            results[name] = leaves[name]
    return results


def markdown_table(results: Mapping[str, Mapping[str, Mapping]], digits: int = 4) -> str:
    """A markdown table of :func:`evaluate`'s results: task, metric, value, stderr, n."""
    lines = ["| task | metric | value | stderr | n |", "| --- | --- | ---: | ---: | ---: |"]
    for task, metrics in results.items():
        for metric, r in metrics.items():
            se = "N/A" if r["stderr"] is None else f"{r['stderr']:.{digits}f}"
            lines.append(f"| {task} | {metric} | {r['value']:.{digits}f} | {se} | {r['n']} |")
    return "\n".join(lines) + "\n"
