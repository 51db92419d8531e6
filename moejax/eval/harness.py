"""moejax as an lm-evaluation-harness model: ``--model moejax``.

    python -m moejax.eval.harness --model moejax \\
        --model_args pretrained=runs/default,dtype=bfloat16 --batch_size 16 \\
        --tasks arc_easy,gsm8k --output_path runs/default/lm-eval

That command is lm-eval's own command line (every flag of ``lm_eval run``) with the ``moejax``
model registered: lm-eval 0.4.13 finds models only in its built-in table, not through package
entry points, so the registration happens by importing this module. From Python, import this
module, then ``lm_eval.simple_evaluate(model="moejax", model_args="pretrained=...")``, or pass an
instance: ``simple_evaluate(model=MoejaxLM(model=m, tokenizer=tok), tasks=[...])``.

The three request types run on moejax's own scorer and generator (``moejax.eval.lm.ModelLM``), so
``python -m moejax.eval`` and lm-eval give the same numbers for the same model:

- ``loglikelihood``: lm-eval's causal-LM rules (the context's trailing spaces move to the
  continuation, BOS for an empty context, the input's last ``max_length + 1`` tokens);
- ``loglikelihood_rolling`` (perplexity tasks): the text split into lm-eval's own disjoint rolling
  windows (``lm_eval.utils.get_rolling_token_windows``) of ``max_length`` tokens, the first
  conditioned on the prefix token, the windows' log-likelihoods summed;
- ``generate_until``: KV-cache decoding (absorbed MLA), greedy unless the task asks for sampling,
  cut at the task's stop strings and the tokenizer's end-of-text.

``model_args``: ``pretrained`` (a training workdir, ``workdir@step``, a moejax checkpoint or a
Hugging Face folder), ``tokenizer`` (a .model / tokenizer.json overriding the model's own),
``dtype`` (a checkpoint's parameter dtype), ``max_length``, ``max_gen_toks``, ``pad_to``, ``seed``,
``chat_template`` (a jinja2 file; default: the model folder's, else moejax's built-in template,
used with ``--apply_chat_template``).

``write_local_tasks`` makes lm-eval's own task definitions (their prompts, few-shot rules and
metrics) read local files in the Hugging Face layouts, for machines without the Hub.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_utils_models

from moejax.eval import formats
from moejax.eval.lm import ModelLM
from moejax.eval.run import split_files
from moejax.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16  # what batch_size='auto' means here (no search: shapes are padded anyway)


def _int(name: str, value, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args.{name}: an integer, got {value!r}") from None


class MoejaxLM(LM):
    """lm-eval's ``LM`` interface on a moejax model.

    Args:
      pretrained: where the model is (see the module docstring); or pass ``model``.
      model, tokenizer: a moejax Transformer and its tokenizer (``tokenizer`` may instead be a
        tokenizer file overriding the one found with ``pretrained``).
      batch_size: rows per forward pass / sequences per generation batch ('auto': 16).
      max_length: the longest input (default: the model's max_position_embeddings).
      max_gen_toks: the generation budget when a task gives none (lm-eval's default, 256).
      dtype: a checkpoint's parameter dtype ('bfloat16', 'float32').
      seed: the base seed of sampled generations (request i uses seed + i).
      chat_template: a jinja2 file for ``--apply_chat_template``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model=None,
        tokenizer=None,
        batch_size: int | str = DEFAULT_BATCH,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        pad_to: int | str = 64,
        dtype: str | None = None,
        seed: int | str = 0,
        chat_template: str | None = None,
        **ignored,
    ):
        super().__init__()
        ignored = {k: v for k, v in ignored.items() if v not in (None, "")}
        for key in ("device", "max_batch_size"):  # lm-eval's CLI always passes these
            ignored.pop(key, None)
        if ignored:
            raise ValueError(
                f"model_args: unknown {', '.join(sorted(ignored))}; known: pretrained, tokenizer, "
                "batch_size, max_length, max_gen_toks, pad_to, dtype, seed, chat_template"
            )
        if model is None:
            if not pretrained:
                raise ValueError(
                    "model_args.pretrained: a training workdir, moejax checkpoint or Hugging Face "
                    "folder (or pass model= and tokenizer= from Python)"
                )
            import jax.numpy as jnp

            from moejax.infer.load import load

            tok_file = tokenizer if isinstance(tokenizer, str) and tokenizer else None
            try:
                dt = jnp.dtype(dtype) if dtype else None
            except TypeError:
                raise ValueError(
                    f"model_args.dtype: got {dtype!r}, allowed: float32, bfloat16, float16"
                ) from None
            model, found = load(str(pretrained), tokenizer=tok_file, dtype=dt)
            tokenizer = found
        elif isinstance(tokenizer, str):
            from moejax.data import tokenizer as tokenizer_lib

            tokenizer = tokenizer_lib.load(tokenizer)
        if tokenizer is None:
            raise ValueError("model_args.tokenizer: the model came without one; name a file")
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = DEFAULT_BATCH
        sizes = {
            "batch_size": _int("batch_size", batch_size),
            "max_length": _int("max_length", max_length),
            "pad_to": _int("pad_to", pad_to),
            "max_gen_toks": _int("max_gen_toks", max_gen_toks),
        }
        for name, v in sizes.items():
            if v is not None and v < 1:
                raise ValueError(f"model_args.{name}: must be >= 1, got {v}")
        self.lm = ModelLM(
            model,
            tokenizer,
            batch_size=sizes["batch_size"],
            max_length=sizes["max_length"],
            pad_to=sizes["pad_to"],
        )
        self.tokenizer = tokenizer
        self.max_gen_toks = _int("max_gen_toks", max_gen_toks)
        self.seed = _int("seed", seed)
        self._name = os.path.abspath(str(pretrained)) if pretrained else "moejax-in-memory"
        from moejax.data.chat import DEFAULT_CHAT_TEMPLATE, chat_template_of

        if chat_template:
            with open(chat_template) as f:
                self._template = f.read()
        else:
            found = chat_template_of(str(pretrained)) if pretrained else None
            self._template = found or DEFAULT_CHAT_TEMPLATE

    # ------------------------------------------------------------------ lm-eval's interface

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        out = self.lm.loglikelihood(pairs)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood over lm-eval's disjoint rolling windows."""
        prefix = self.lm._prefix()
        per_request, items = [], []
        for r in requests:
            (text,) = r.args
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=list(self.tokenizer.encode(text)),
                    prefix_token=prefix,
                    max_seq_len=self.lm.max_length,
                    context_len=1,
                )
            ]
            per_request.append(len(windows))
            items += [(list(ctx) + list(cont), len(cont)) for ctx, cont in windows]
        scored = iter(self.lm.loglikelihood_tokens(items))
        out = []
        for r, n in zip(requests, per_request):
            total = sum(next(scored)[0] for _ in range(n))
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), total)
            out.append(total)
        return out

    def sampling_params(self, gen_kwargs: Mapping, index: int = 0) -> SamplingParams:
        """A task's generation_kwargs as moejax sampling settings, read by lm-eval's own
        ``normalize_gen_kwargs`` (as HFLM reads them: greedy unless do_sample, or a temperature > 0
        without do_sample=False; max_gen_toks or its aliases). Sampling applies only the filters
        the task names (top_k, top_p, min_p): no implicit defaults."""
        kw = dict(lm_utils_models.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        until = [u for u in kw.pop("until") if u]
        max_new = int(kw.pop("max_gen_toks"))
        if max_new >= self.lm.max_length:
            raise ValueError(
                f"max_gen_toks={max_new} leaves no room for the prompt within "
                f"max_length={self.lm.max_length} (model_args.max_length)"
            )
        do_sample = bool(kw.pop("do_sample"))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        top_k = int(kw.pop("top_k", 0) or 0)
        min_p = float(kw.pop("min_p", 0.0) or 0.0)
        if kw:
            log.warning("moejax: generation_kwargs %s are not used", sorted(kw))
        if not do_sample:
            temperature, top_p, top_k, min_p = 0.0, 1.0, 0, 0.0
        elif temperature == 0:
            temperature = 1.0  # transformers' default when sampling
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            max_new_tokens=max_new,
            stop=tuple(until),
            seed=(self.seed + index) % 2**32,
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from moejax.eval.tasks import truncate_at_stop

        params = [self.sampling_params(r.args[1], i) for i, r in enumerate(requests)]
        texts = self.lm.complete([r.args[0] for r in requests], params)
        out = []
        for r, p, text in zip(requests, params, texts):
            text = truncate_at_stop(text, p.stop)
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out

    # ------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        from moejax.data.chat import render_chat

        special = getattr(self.tokenizer, "special", {}) or {}
        return render_chat(
            self._template,
            list(chat_history),
            bos=special.get("bos", ""),
            eos=special.get("eos", ""),
            add_generation_prompt=add_generation_prompt,
        )


if __name__ != "__main__":  # `python -m moejax.eval.harness` registers the imported module's class
    register_model("moejax")(MoejaxLM)


# ------------------------------------------------------------------------------ local tasks

SPLIT_KEYS = {  # the YAML fields naming each split
    "test": "test_split",
    "train": "training_split",
    "validation": "validation_split",
    "dev": "fewshot_split",
}


def _yaml_lines(fields: Mapping) -> str:
    # json is a subset of YAML: every value is written as JSON, so no quoting rules to get wrong
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())


def write_local_tasks(data: Mapping[str, str], out_dir: str, suffix: str = "_local") -> list[str]:
    """lm-eval task definitions that read local files: for each moejax task name in `data` (a file
    or Hub-layout folder, as `python -m moejax.eval` takes), a YAML that includes lm-eval's own
    definition (prompts, few-shot sampler, metrics, filters) and points it at the files.

    MMLU's 'all' files are split by subject into one task per subject (`mmlu_<subject>_local`),
    as lm-eval defines MMLU. Returns the task names; pass `out_dir` as lm-eval's include_path.
    """
    import lm_eval.tasks

    root = os.path.dirname(lm_eval.tasks.__file__)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for task, location in data.items():
        if task not in formats.TASKS:
            known = ", ".join(formats.TASKS)
            raise ValueError(f"no local lm-eval task for {task!r}; known: {known}")
        spec = formats.TASKS[task]
        yaml_rel, splits = spec.yaml, tuple(dict.fromkeys((spec.eval_split, spec.fewshot_split)))
        files = {s: split_files(location, s) for s in splits}
        if not files[splits[0]]:  # the evaluated split; the few-shot one may be absent
            raise ValueError(f"{task}: no '{splits[0]}' split under {location}")
        files = {s: paths for s, paths in files.items() if paths}
        if task == "mmlu":
            by_subject: dict[str, dict[str, list]] = {}
            for split, paths in files.items():
                for doc in formats.load_docs("mmlu", paths).docs:
                    by_subject.setdefault(doc["subject"], {}).setdefault(split, []).append(doc)
            groups = []
            for subject, docs in sorted(by_subject.items()):
                sub_files = {}
                for split, rows in docs.items():
                    path = os.path.join(out_dir, f"mmlu_{subject}.{split}.jsonl")
                    with open(path, "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                    sub_files[split] = [path]
                groups.append((yaml_rel.format(subject=subject), f"mmlu_{subject}", sub_files))
        else:
            groups = [(yaml_rel, task, files)]
        for rel, name, split_paths in groups:
            include = os.path.join(root, rel)
            if not os.path.exists(include):
                raise ValueError(f"lm-eval has no task definition {rel} (for {name})")
            kinds = {
                "parquet" if p.endswith(".parquet") else "json"
                for ps in split_paths.values()
                for p in ps
            }
            if len(kinds) > 1:
                raise ValueError(f"{name}: parquet and JSON files mixed under {location}")
            fields = {
                "include": include,
                "task": name + suffix,
                "tag": [],
                "dataset_path": kinds.pop(),
                "dataset_name": None,
                "dataset_kwargs": {"data_files": dict(split_paths)},
            }
            for split, key in SPLIT_KEYS.items():
                if split in split_paths:
                    fields[key] = split
            for split in ("train", "validation", "test"):
                key = SPLIT_KEYS[split]
                if split not in split_paths and key not in fields:
                    fields[key] = None
            if not set(splits) <= set(split_paths):  # no few-shot source: zero-shot only
                fields["fewshot_split"] = None
            with open(os.path.join(out_dir, f"{name}{suffix}.yaml"), "w") as f:
                f.write(_yaml_lines(fields))
            names.append(name + suffix)
    return names


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the moejax model registered (``python -m
    moejax.eval.harness``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from moejax.eval.harness import main as _main  # the registered module, not this __main__ copy

    _main()
