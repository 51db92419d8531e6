"""Generation speed: moejax's KV-cache generator against transformers' generate (with its cache),
side by side.

  python -m benchmarks.decode [--model runs/default] [--batches 1,16] [--prompt-len 64] [--new 64]

Without --model the default experiment's architecture (experiments/moe.py, MTP depth 1) is
initialized at random; with a trained workdir (the README's first run) the MTP acceptance rate means
something. The same weights are exported to Hugging Face format and run by transformers'
DeepseekV3ForCausalLM (float32, CPU, greedy, its dynamic cache). Prefill tokens/s = batch x prompt
length / prefill time; decode tokens/s = generated tokens after the first / the time after the
prefill (transformers: generate(new) - generate(1)).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx


def build_model(path: str | None):
    if path:
        from moejax.infer.load import load

        return load(path)[0]
    from moejax.experiment import load_config_file, resolve
    from moejax.model import Transformer

    cfg = resolve(
        load_config_file(os.path.join(os.path.dirname(__file__), "..", "experiments", "moe.py"))
    ).model
    return Transformer(cfg, rngs=nnx.Rngs(0))


def hf_model(model, tmp: str):
    from transformers import AutoModelForCausalLM

    from moejax.convert import to_hf

    to_hf(model, model.cfg, tmp)
    return AutoModelForCausalLM.from_pretrained(tmp, torch_dtype="float32").eval()


def time_moejax(gen, prompts, new: int, **kw):
    from moejax.infer import SamplingParams

    params = SamplingParams(max_new_tokens=new)
    gen.generate(prompts, params, **kw)  # compile
    best = None
    for _ in range(2):
        outs = gen.generate(prompts, params, **kw)
        s = gen.last_stats
        if best is None or s.decode_seconds < best[0].decode_seconds:
            best = (s, outs)
    return best


def time_hf(hf, prompts, new: int):
    import torch

    ids = torch.tensor(prompts)

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return time.perf_counter() - t, out

    run(2)  # warm up
    t1 = min(run(1)[0] for _ in range(2))
    tn, out = min((run(new) for _ in range(2)), key=lambda r: r[0])
    return t1, tn - t1, out[:, ids.shape[1] :].tolist()


def quality(path: str, model, qmodel, batches: int = 4):
    """Validation perplexity and logit change of the int8-weight model against float32, on the run's
    data."""
    import jax.numpy as jnp

    from moejax.data import dataset, mixture
    from moejax.infer.load import workdir_config

    cfg = workdir_config(path)
    data = mixture.resolve(cfg.data, cfg.model.vocab_size)
    it = dataset.Batches(data, "validation", 8, seed=0, shuffle=False)
    f = jax.jit(lambda m, b: m(b["tokens"], b["positions"], b["segment_ids"])[0])
    ce = {"float32": [0.0, 0.0], "int8": [0.0, 0.0]}
    diffs, scale = [], []
    for _ in range(batches):
        b = {k: jnp.asarray(v) for k, v in next(it).items()}
        valid = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (
            b["segment_ids"][:, 1:] > 0
        )
        logits = {}
        for name, m in (("float32", model), ("int8", qmodel)):
            logits[name] = f(m, b)
            lp = jax.nn.log_softmax(logits[name][:, :-1], axis=-1)
            nll = -jnp.take_along_axis(lp, b["tokens"][:, 1:, None], axis=-1)[..., 0]
            ce[name][0] += float(jnp.sum(nll * valid))
            ce[name][1] += float(jnp.sum(valid))
        diffs.append(float(jnp.mean(jnp.abs(logits["int8"] - logits["float32"]))))
        scale.append(float(jnp.mean(jnp.abs(logits["float32"]))))
    ppl = {k: float(np.exp(s / n)) for k, (s, n) in ce.items()}
    print(
        f"validation perplexity: float32 {ppl['float32']:.3f}, int8 weights {ppl['int8']:.3f} "
        f"({ppl['int8'] / ppl['float32'] - 1:+.2%}); mean |logit change| {np.mean(diffs):.4f} "
        f"({np.mean(diffs) / np.mean(scale):.2%} of mean |logit|), {batches * 8} rows"
    )


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument(
        "--model", default=None, help="a training workdir or checkpoint (default: random init)"
    )
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--no-hf", action="store_true")
    args = p.parse_args(argv)

    from moejax.infer import Generator

    model = build_model(args.model)
    cfg = model.cfg
    hf = None
    if not args.no_hf:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        tmp = tempfile.mkdtemp()
        hf = hf_model(model, tmp)
    print(
        f"device: {jax.devices()[0].device_kind}; model {cfg.hidden_size}d x {cfg.num_layers} "
        f"layers, {cfg.n_routed_experts} experts, vocab {cfg.vocab_size}, MTP {cfg.mtp_depth}; "
        f"prompt {args.prompt_len}, {args.new} new tokens, greedy, float32"
    )
    print(
        f"{'batch':>5s} {'engine':34s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
        f"{'vs transformers':>16s}  notes"
    )
    rng = np.random.default_rng(0)
    from moejax.infer.quantize import quantize, weight_bytes

    qmodel = quantize(model, "int8")
    plain = Generator(model, eos_ids=[])
    int8 = Generator(model, eos_ids=[], kv_int8=True)
    wq = Generator(qmodel, eos_ids=[])
    print(
        f"int8 weights: {weight_bytes(qmodel) / 2**20:.1f} MiB (float32: "
        f"{weight_bytes(model) / 2**20:.1f} MiB)"
    )
    if args.model:
        quality(args.model, model, qmodel)
    for B in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(4, cfg.vocab_size, (B, args.prompt_len)).tolist()
        rows = []
        s, outs = time_moejax(plain, prompts, args.new)
        base_tokens = [o.tokens for o in outs]
        rows.append(("moejax (absorbed MLA cache)", s, ""))
        if cfg.mtp_depth:
            ss, so = time_moejax(plain, prompts, args.new, speculative=True)
            same = [o.tokens for o in so] == base_tokens
            rows.append(
                (
                    "moejax + MTP speculative",
                    ss,
                    f"accepted {ss.acceptance_rate:.0%}, same tokens: {same}",
                )
            )
        s8, o8 = time_moejax(int8, prompts, args.new)
        agree = np.mean(
            [np.mean(np.array(a.tokens) == np.array(b)) for a, b in zip(o8, base_tokens)]
        )
        rows.append(("moejax int8 KV cache", s8, f"greedy tokens equal: {agree:.0%}"))
        sq, oq = time_moejax(wq, prompts, args.new)
        agree = np.mean(
            [np.mean(np.array(a.tokens) == np.array(b)) for a, b in zip(oq, base_tokens)]
        )
        rows.append(("moejax int8 weights", sq, f"greedy tokens equal: {agree:.0%}"))
        hf_decode = None
        if hf is not None:
            t1, td, hf_tokens = time_hf(hf, prompts, args.new)
            agree = np.mean(
                [np.mean(np.array(a) == np.array(b)) for a, b in zip(hf_tokens, base_tokens)]
            )
            hf_decode = B * (args.new - 1) / td
            print(
                f"{B:5d} {'transformers generate (cache)':34s} {B * args.prompt_len / t1:14.0f} "
                f"{hf_decode:13.0f} {1.0:15.2f}x  tokens equal to moejax: {agree:.0%}",
                flush=True,
            )
        for label, st, note in rows:
            dec = (st.generated_tokens - B) / st.decode_seconds
            ratio = f"{dec / hf_decode:15.2f}x" if hf_decode else f"{'-':>16s}"
            print(
                f"{B:5d} {label:34s} {st.prompt_tokens / st.prefill_seconds:14.0f} {dec:13.0f} "
                f"{ratio}  {note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
