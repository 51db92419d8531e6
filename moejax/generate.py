"""Command line generation:

  python -m moejax.generate --model runs/default --prompt "def fib(n):" [--prompt ...]
  python -m moejax.generate --model HF_DIR --prompts requests.jsonl --output out.jsonl \\
      --temperature 0.7

--model is a training workdir, a moejax checkpoint or a Hugging Face folder (moejax.infer.load). A
JSONL request is {"prompt": "..."} or {"prompt_tokens": [...]}, optionally with its own sampling
fields (temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, stop, seed); the
command-line values are the defaults. Each output line is {"prompt", "text", "tokens", "logprobs",
"finish_reason"}. Bad arguments or requests print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from moejax.config import DTYPES as _DTYPES
from moejax.config import ConfigError
from moejax.infer.quantize import FORMATS as QUANT_FORMATS
from moejax.infer.safety import ACTIONS as SAFETY_ACTIONS


def read_requests(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(req, dict) or ("prompt" in req) == ("prompt_tokens" in req):
                raise ValueError(
                    f"{path}:{n}: a request needs exactly one of 'prompt' or 'prompt_tokens'"
                )
            out.append(req)
    return out


def sampling_for(req: dict, base) -> object:
    from moejax.infer import SamplingParams

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    extra = set(req) - fields - {"prompt", "prompt_tokens"}
    if extra:
        raise ValueError(
            f"unknown request field {sorted(extra)[0]!r}; known: prompt, prompt_tokens, "
            + ", ".join(sorted(fields))
        )
    kw = {k: req[k] for k in fields if k in req}
    if "stop" in kw:
        kw["stop"] = tuple([kw["stop"]] if isinstance(kw["stop"], str) else kw["stop"])
    try:
        return dataclasses.replace(base, **kw)
    except TypeError:  # a comparison in the validation met a wrong type
        bad = next(
            k
            for k, v in kw.items()
            if not isinstance(v, type(getattr(base, k)))
            and not (isinstance(v, int) and isinstance(getattr(base, k), float))
        )
        raise ValueError(
            f"request field {bad!r}: expected {type(getattr(base, bad)).__name__}, got {kw[bad]!r}"
        ) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moejax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="training workdir, moejax checkpoint or Hugging Face folder"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="JSONL file of requests")
    p.add_argument("--output", default="-", help="JSONL output (default: stdout)")
    p.add_argument(
        "--tokenizer", default=None, help="a .model or tokenizer.json file (default: the model's)"
    )
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--min_p", type=float, default=0.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="requests generated together (a JSONL file is processed in batches of this many)",
    )
    p.add_argument(
        "--speculative", action="store_true", help="draft with the MTP head (model.mtp_depth >= 1)"
    )
    p.add_argument("--kv_int8", action="store_true", help="int8 KV cache with per-token scales")
    p.add_argument(
        "--expanded", action="store_true", help="decode MLA by rebuilding K/V (default: absorbed)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=tuple(QUANT_FORMATS),
        help="weight-only quantization with per-channel scales (experts included)",
    )
    p.add_argument(
        "--safety",
        default="off",
        choices=("off", *SAFETY_ACTIONS),
        help="content-safety filter on the outputs (moejax.infer.safety)",
    )
    p.add_argument("--safety_categories", default=None, help="JSON {category: [words or regexes]}")
    p.add_argument(
        "--dtype", default=None, choices=_DTYPES, help="parameter dtype of a loaded checkpoint"
    )
    p.add_argument("--mesh", default=None, help="device mesh degrees, e.g. 'fsdp=-1,expert=2'")
    p.add_argument("--rules", default="", help="logical-axis rule overrides")
    args = p.parse_args(argv)

    from moejax import sharding
    from moejax.convert.__main__ import parse_mesh
    from moejax.infer import Generator, SamplingParams
    from moejax.infer.load import LoadError, load

    try:
        base = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            max_new_tokens=args.max_new_tokens,
            stop=tuple(args.stop),
            seed=args.seed,
        )
        reqs = [{"prompt": t} for t in args.prompt] + (
            read_requests(args.prompts) if args.prompts else []
        )
        if not reqs:
            raise ValueError("no prompts: give --prompt TEXT or --prompts FILE.jsonl")
        params = [sampling_for(r, base) for r in reqs]
        mesh = rules = None
        if args.mesh is not None or args.rules:
            shape = parse_mesh(args.mesh or "", args.rules)
            rules = sharding.rules_for(shape)
            mesh = sharding.make_mesh(shape) if args.mesh is not None else None
        model, tok = load(
            args.model, mesh=mesh, rules=rules, dtype=args.dtype, tokenizer=args.tokenizer
        )
        if args.quantize:
            from moejax.infer.quantize import quantize

            model = quantize(model, args.quantize)
        if tok is None and any("prompt" in r for r in reqs):
            raise ValueError(
                f"{args.model} has no tokenizer: pass --tokenizer, or prompt_tokens requests"
            )
        safety = None
        if args.safety != "off":
            from moejax.infer.safety import SafetyFilter

            safety = (
                SafetyFilter.from_file(args.safety_categories, action=args.safety)
                if args.safety_categories
                else SafetyFilter(action=args.safety)
            )
        gen = Generator(model, tok, kv_int8=args.kv_int8, absorbed=not args.expanded, safety=safety)
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        prompts = [r["prompt"] if "prompt" in r else r["prompt_tokens"] for r in reqs]
        outs, generated, seconds = [], 0, 0.0
        for i in range(0, len(prompts), args.batch_size):
            outs += gen.generate(
                prompts[i : i + args.batch_size],
                params[i : i + args.batch_size],
                speculative=args.speculative,
            )
            generated += gen.last_stats.generated_tokens
            seconds += gen.last_stats.prefill_seconds + gen.last_stats.decode_seconds
    except (ValueError, ConfigError, LoadError, FileNotFoundError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        for r, o in zip(reqs, outs):
            f.write(
                json.dumps(
                    {
                        "prompt": r.get("prompt", r.get("prompt_tokens")),
                        "text": o.text,
                        "tokens": o.tokens,
                        "logprobs": [round(x, 5) for x in o.logprobs],
                        "finish_reason": o.finish_reason,
                        "safety": o.safety,
                    }
                )
                + "\n"
            )
    finally:
        if f is not sys.stdout:
            f.close()
    msg = (
        f"[generate] {len(outs)} requests, {generated} tokens in {seconds:.2f}s "
        f"(batches of {args.batch_size}; compilation included)"
    )
    if args.speculative:
        msg += f"; MTP drafts accepted {gen.last_stats.acceptance_rate:.1%} (last batch)"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
