"""Generation with a KV cache: against full recomputation, absorbed vs expanded MLA, MTP
speculation, int8 caches, sampling filters, stop strings and EOS."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, ExecutionConfig, ModelConfig, RouterConfig
from moejax.experiment import load_config_file, resolve
from moejax.infer import Generator, SamplingParams, bytes_per_token, init_cache, sampling
from moejax.infer.forward import forward
from moejax.model import Transformer
from tests.helpers import ROOT, run_module

COMMON = dict(
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    intermediate_size=48,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    initializer_range=0.3,
)
MLA = ModelConfig(
    vocab_size=64,
    **COMMON,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    router=RouterConfig(n_group=2, topk_group=1),
    mtp_depth=1,
)
GQA = ModelConfig(
    vocab_size=64,
    **COMMON,
    attention_type="gqa",
    num_kv_heads=2,
    qk_norm=True,
    rope_interleave=False,
    router=RouterConfig(score_func="softmax", use_score_correction_bias=False),
    n_shared_experts=0,
)
# DeepSeek Sparse Attention (V3.2): each query reads the indexer's top 3 keys
DSA = MLA.replace(index_topk=3, index_n_heads=4, index_head_dim=12)
# a small vocabulary makes the random MTP head's drafts right often enough to exercise acceptance
SPEC = MLA.replace(vocab_size=12)
PROMPTS = [[1, 5, 7], [2, 9, 4, 4, 11, 30, 12], [3]]


@pytest.fixture(scope="module")
def models():
    return {
        name: Transformer(cfg, rngs=nnx.Rngs(0))
        for name, cfg in (("mla", MLA), ("gqa", GQA), ("spec", SPEC), ("dsa", DSA))
    }


def recompute_greedy(model, prompt, n, width=32):
    """The reference: the whole sequence through the model (no cache) for every new token, one row
    at a time (one compiled shape: the row padded to `width`, the padding after it in segment 0)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, toks, length):
        logits, _ = nnx.merge(graphdef, state)(
            toks, segment_ids=(jnp.arange(width) < length)[None].astype(jnp.int32)
        )
        return logits[0, length - 1]

    toks, logps = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(toks)] = toks
        logits = last_logits(state, row, len(toks))
        toks.append(int(jnp.argmax(logits)))
        logps.append(float(jax.nn.log_softmax(logits)[toks[-1]]))
    return toks[len(prompt) :], logps


@pytest.mark.parametrize("name", ["mla", "gqa", "dsa"])
def test_cached_greedy_equals_full_recompute(models, name):
    model = models[name]
    outs = Generator(model, eos_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=10))
    for p, o in zip(PROMPTS, outs):
        want, logps = recompute_greedy(model, p, 10)
        assert o.tokens == want, (name, p)
        np.testing.assert_allclose(o.logprobs, logps, atol=1e-4)
        assert o.finish_reason == "length"


def _prefill_then_step(model, prompt, nxt, **kw):
    """Logits of the token after `prompt + [nxt]`, through a prefill and one cached decode step."""
    cache = init_cache(model.cfg, 1, 64, **kw.pop("cache_kw", {}))
    toks = jnp.asarray([prompt])
    _, cache = forward(model, toks, cache, prefill=True)
    cache = cache._replace(lengths=jnp.asarray([len(prompt)], jnp.int32))
    h, _ = forward(model, jnp.asarray([[nxt]]), cache, **kw)
    return np.asarray(model.head(h))[0, -1]


@pytest.mark.parametrize("name", ["mla", "dsa"])
def test_absorbed_and_expanded_mla_decode_agree(models, name):
    model = models[name]
    prompt = [4, 8, 15, 16, 23, 42, 7, 1, 9]
    absorbed = _prefill_then_step(model, prompt, 33, absorbed=True)
    expanded = _prefill_then_step(model, prompt, 33, absorbed=False)
    full = np.asarray(model(jnp.asarray([prompt + [33]]))[0])[0, -1]
    np.testing.assert_allclose(absorbed, expanded, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(absorbed, full, atol=2e-5, rtol=1e-5)


def test_int8_cache_is_close_and_quarter_size(models):
    model = models["mla"]
    prompt = [4, 8, 15, 16, 23, 42, 7, 1, 9]
    f32 = _prefill_then_step(model, prompt, 33)
    q8 = _prefill_then_step(model, prompt, 33, cache_kw={"int8": True})
    scale = np.abs(f32).max()
    assert np.abs(q8 - f32).max() < 0.02 * scale
    cache = init_cache(MLA, 2, 64, int8=True)
    stored = sum(a.nbytes for seg in cache.segments for a in seg.values())
    plain = sum(a.nbytes for seg in init_cache(MLA, 2, 64).segments for a in seg.values())
    # int8 values + one float32 scale per token and tensor
    assert stored == plain // 4 + 2 * 4 * 2 * 64 * MLA.num_layers
    outs = Generator(model, eos_ids=[], kv_int8=True).generate(
        PROMPTS, SamplingParams(max_new_tokens=4)
    )
    assert all(len(o.tokens) == 4 for o in outs)


def test_cache_bytes_per_token_at_deepseek_v3_shape():
    v3 = resolve(load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3.py"))).model
    assert bytes_per_token(v3, "bfloat16") == 576 * 61 * 2
    assert bytes_per_token(v3, "bfloat16", int8=True) == (576 + 2 * 4) * 61
    mixtral = resolve(load_config_file(os.path.join(ROOT, "experiments", "mixtral_8x7b.py"))).model
    assert (
        bytes_per_token(mixtral, "bfloat16") == 2 * 8 * 128 * 32 * 2
    )  # K and V, 8 KV heads of 128, 32 layers


def test_speculative_greedy_equals_plain_greedy(models):
    gen = Generator(models["spec"], eos_ids=[])
    prompts = PROMPTS + [[7, 7, 2, 5]]
    plain = gen.generate(prompts, SamplingParams(max_new_tokens=24))
    spec = gen.generate(prompts, SamplingParams(max_new_tokens=24), speculative=True)
    stats = gen.last_stats
    assert [o.tokens for o in spec] == [o.tokens for o in plain]
    for a, b in zip(spec, plain):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert stats.accepted >= 1 and stats.drafted > stats.accepted  # both branches ran
    # each verify pass of a row (one per draft) yielded more than one token on average
    assert stats.drafted < stats.generated_tokens - len(prompts)
    with pytest.raises(ConfigError, match="mtp_depth"):
        Generator(models["gqa"]).generate([[1]], speculative=True)


def test_speculative_sampling_keeps_the_target_distribution():
    V, N = 6, 60_000
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(V)).astype(np.float32)
    q = rng.dirichlet(np.ones(V)).astype(np.float32)
    d = rng.choice(V, size=N, p=q / q.sum()).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 2 * N)
    accept, tok = sampling.speculative_accept(
        keys[:N],
        keys[N:],
        jnp.tile(p, (N, 1)),
        jnp.tile(q, (N, 1)),
        jnp.asarray(d),
        jnp.zeros(N, bool),
    )
    freq = np.bincount(np.asarray(tok), minlength=V) / N
    np.testing.assert_allclose(freq, p, atol=0.01)  # 4+ standard errors at N = 60k
    assert abs(float(np.mean(accept)) - np.minimum(p, q).sum()) < 0.01


def test_speculative_sampling_in_the_generator_keeps_the_distribution(models):
    """Sampled tokens 2 and 3 (drawn by verified MTP drafts or their residuals) have the plain
    sampler's distribution: 2000 seeds each, compared per token value."""
    gen = Generator(models["spec"], eos_ids=[])
    params = [SamplingParams(temperature=1.0, max_new_tokens=3, seed=s) for s in range(2000)]
    plain = np.array([o.tokens for o in gen.generate([[1, 5, 7]] * 2000, params)])
    spec = np.array([o.tokens for o in gen.generate([[1, 5, 7]] * 2000, params, speculative=True)])
    assert gen.last_stats.accepted > 0 and gen.last_stats.drafted > gen.last_stats.accepted
    V = SPEC.vocab_size
    for t in (1, 2):
        a, b = (np.bincount(x[:, t], minlength=V) / len(x) for x in (plain, spec))
        assert np.abs(a - b).max() < 0.07, (t, a.round(3), b.round(3))  # > 4 standard errors


def _rows(**kw):
    return sampling.rows([SamplingParams(**kw)])


def test_sampling_filters():
    logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0, -1.0]])
    keep = lambda **kw: np.isfinite(
        np.asarray(sampling.filtered(logits, _rows(temperature=1.0, **kw)))
    )[0]
    assert keep(top_k=2).tolist() == [True, True, False, False, False]
    p = (
        np.exp([3.0, 2.0, 1.0, 0.0, -1.0]) / np.exp([3.0, 2.0, 1.0, 0.0, -1.0]).sum()
    )  # .636 .234 .086 ...
    assert keep(top_p=0.7).tolist() == [True, True, False, False, False]
    assert keep(top_p=0.5).tolist() == [True, False, False, False, False]
    assert keep(top_p=0.95).tolist() == [True, True, True, False, False]
    assert p[:3].sum() > 0.95 > p[:2].sum()
    assert keep(min_p=0.3).tolist() == [True, True, False, False, False]  # e^-1 = .37 >= .3 > e^-2
    assert keep(top_k=4, min_p=0.1).tolist() == [True, True, True, False, False]
    pen = sampling.penalize(
        jnp.asarray([[2.0, -2.0, 2.0]]), jnp.asarray([[True, True, False]]), jnp.asarray([2.0])
    )
    assert np.asarray(pen).tolist() == [[1.0, -4.0, 2.0]]
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingParams(top_p=0.0)


def test_per_request_seeds_do_not_depend_on_the_batch(models):
    gen = Generator(models["mla"], eos_ids=[])
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=8)
    alone = gen.generate([[2, 9, 4]], mine)[0]
    crowd = gen.generate(
        [[1, 1], [2, 9, 4], [5]],
        [
            SamplingParams(temperature=0.7, seed=1, max_new_tokens=12),
            mine,
            SamplingParams(max_new_tokens=3),
        ],
    )
    assert crowd[1].tokens == alone.tokens
    assert [len(c.tokens) for c in crowd] == [12, 8, 3]
    other = gen.generate(
        [[2, 9, 4]], SamplingParams(temperature=1.0, top_p=0.9, seed=6, max_new_tokens=8)
    )[0]
    assert other.tokens != alone.tokens


class CharTokenizer:
    """id i <-> chr(48 + i); BOS 0, EOS from the test."""

    bos_id = 0

    def __init__(self, eos_id=-1):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) - 48 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)


def test_stop_strings_and_eos(models):
    model = models["mla"]
    free = Generator(model, CharTokenizer()).generate(["abc"], SamplingParams(max_new_tokens=20))[0]
    stop = free.text[7:9]
    first = free.text.find(stop)
    got = Generator(model, CharTokenizer(), chunk=4).generate(
        ["abc"], SamplingParams(max_new_tokens=20, stop=(stop, "never"))
    )[0]
    assert got.finish_reason == "stop" and got.text == free.text[:first]
    assert got.tokens == free.tokens[:first] and len(got.logprobs) == first
    eos = free.tokens[5]
    got = Generator(model, CharTokenizer(eos_id=eos)).generate(
        ["abc"], SamplingParams(max_new_tokens=20)
    )[0]
    k = free.tokens.index(eos)
    assert got.finish_reason == "eos" and got.tokens == free.tokens[:k]
    assert got.text == free.text[:k]


def test_capacity_models_decode_dropless(models):
    """A model trained with capacity dispatch generates without drops (as DeepSeek serves)."""
    dropless = models["mla"]
    capacity = Transformer(
        MLA, rngs=nnx.Rngs(0), execution=ExecutionConfig(moe_impl="capacity", capacity_factor=0.25)
    )
    want = Generator(dropless, eos_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    got = Generator(capacity, eos_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert capacity.segments[1].ffn.dispatch == "capacity"  # the caller's model is unchanged


@pytest.mark.parametrize("fmt,tol", [("int8", 0.05), ("fp8", 0.3)])
def test_weight_only_quantization_covers_experts_and_stays_close(models, fmt, tol):
    from moejax.infer.quantize import QuantizedParam, quantize, weight_bytes
    from moejax.model.moe import MoE

    model = models["mla"]
    q = quantize(model, fmt)
    moes = [m for _, m in nnx.iter_modules(q) if isinstance(m, MoE)]
    assert moes and all(
        isinstance(m.w_gate_up, QuantizedParam) and isinstance(m.w_down, QuantizedParam)
        for m in moes
    )
    assert all(
        isinstance(m.router.w, nnx.Param) and not isinstance(m.router.w, QuantizedParam)
        for m in moes
    )
    assert isinstance(q.lm_head, QuantizedParam) and isinstance(q.mtp[0].eh_proj, QuantizedParam)
    assert not isinstance(model.lm_head, QuantizedParam)  # the caller's model is unchanged
    assert weight_bytes(q) < 0.35 * weight_bytes(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, MLA.vocab_size, (2, 12)))
    want, got = np.asarray(model(ids)[0]), np.asarray(q(ids)[0])
    # mean error (a router choice can flip at a rare position, so not the max). This random model
    # (init 0.3) amplifies weight error ~8x by its output: int8 (~0.4% per weight) lands near 3%,
    # fp8 e4m3 near 15%; a scale over the wrong axes gives errors of order 100%.
    assert np.abs(got - want).mean() < tol * np.abs(want).mean()
    outs = Generator(q, eos_ids=[]).generate(
        PROMPTS, SamplingParams(max_new_tokens=4), speculative=True
    )
    assert all(len(o.tokens) == 4 for o in outs)
    with pytest.raises(ConfigError, match="quantize: format"):
        quantize(model, "int4")


def test_safety_filter_actions_on_planted_text():
    from moejax.infer.safety import SafetyFilter

    text = "Sure. First, BUILD A BOMB from parts; then build a pipe bomb. Also kill yourself."
    block = SafetyFilter(action="block")
    out, counts, filtered = block.apply(text)
    assert out == "Sure. First, " and filtered and counts == {"weapons": 2, "self_harm": 1}
    out, _, filtered = SafetyFilter(action="redact").apply(text)
    assert (
        out == "Sure. First, [redacted] from parts; then [redacted]. Also [redacted]."
        and not filtered
    )
    out, _, filtered = SafetyFilter(action="refuse", refusal="No.").apply(text)
    assert (out, filtered) == ("No.", True)
    # whole words and phrases, never inside a longer word
    assert SafetyFilter().apply("Upskill yourself; rebuild a bombastic robot")[1] == {}
    flag = SafetyFilter({}, classifier=lambda t: "toxic" if "idiot" in t else None, action="redact")
    text = "you are an idiot"
    assert flag.apply(text, [flag.classify(text, since=8)]) == (
        "you are [redacted]",
        {"toxic": 1},
        False,
    )
    with pytest.raises(ConfigError, match="safety.action"):
        SafetyFilter(action="warn")


def test_safety_filter_while_generating(models):
    """A planted 'harmful' word (a substring the model is known to produce) is acted on
    mid-generation."""
    import re

    from moejax.infer.safety import SafetyFilter

    model = models["mla"]
    params = SamplingParams(max_new_tokens=24)
    free = Generator(model, CharTokenizer()).generate(["abc"], params)[0]
    word = free.text[6:9]
    cats = {
        "planted": [f"(?:{re.escape(word)})"]
    }  # a regex (not a bare word: no word boundaries needed)
    first = free.text.find(word)
    got = Generator(
        model, CharTokenizer(), chunk=4, safety=SafetyFilter(cats, action="block")
    ).generate(["abc"], params)[0]
    assert (
        got.finish_reason == "content_filter"
        and got.text == free.text[:first]
        and got.safety["planted"] >= 1
    )
    assert (
        got.tokens == free.tokens[:first] and len(got.tokens) < 24
    )  # stopped early, not at max_new_tokens
    got = Generator(model, CharTokenizer(), safety=SafetyFilter(cats, action="redact")).generate(
        ["abc"], params
    )[0]
    assert got.text == free.text.replace(word, "[redacted]") and got.finish_reason == "length"
    got = Generator(
        model, CharTokenizer(), safety=SafetyFilter(cats, action="refuse", refusal="No.")
    ).generate(["abc"], params)[0]
    assert (got.text, got.tokens, got.finish_reason) == ("No.", [], "content_filter")


def test_generation_on_a_mesh_matches_one_device():
    """tests/generate_mesh_check.py on 8 CPU devices (fsdp=2 x expert=4, experts
    expert-parallel; fsdp=2 x expert=2 x context=2)."""
    import json

    r = run_module("tests.generate_mesh_check", devices=8, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"8", "3", "context 8"}
    for B, res in out.items():
        assert res["equal"] and res["speculative_equal"], (B, res)
        assert (
            res["expert_shard_rows"] * res["expert_ways"] == res["experts"]
        )  # the experts stayed split over 'expert'


def test_set_params_reuses_the_compiled_programs(models):
    """RL updates the policy every step: the Generator takes new parameters without recompiling, and
    batches of 3 and 4 rows share one program (rows are padded to a power of two)."""
    gen = Generator(models["mla"], eos_ids=[])
    params = SamplingParams(max_new_tokens=5)
    gen.generate(PROMPTS + [[4, 4]], params)
    compiled = (gen._prefill._cache_size(), gen._decode._cache_size())
    other = Transformer(MLA, rngs=nnx.Rngs(1))
    gen.set_params(other)
    got = gen.generate(PROMPTS, params)
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == compiled
    assert [o.tokens for o in got] == [
        o.tokens for o in Generator(other, eos_ids=[]).generate(PROMPTS, params)
    ]
    with pytest.raises(ValueError, match="structure"):
        gen.set_params(models["gqa"])


def test_decode_updates_the_cache_in_place_without_a_whole_copy(models):
    """Memory, not only results: at 8192 positions the cache dominates; the compiled decode loop
    aliases it (donated, written in place) and its temporaries stay under half of it (one layer's
    slice at a time)."""
    from moejax.infer import sampling as smp

    model = Transformer(MLA.replace(max_position_embeddings=8192), rngs=nnx.Rngs(0))
    gen = Generator(model, eos_ids=[])
    B, S = 4, 8192
    rows = smp.rows([SamplingParams(max_new_tokens=8)] * B)
    carry = jax.eval_shape(
        lambda st: gen._prefill_fn(
            st,
            jnp.zeros((B, 16), jnp.int32),
            jnp.full((B,), 8, jnp.int32),
            rows,
            jnp.asarray(gen.eos_ids),
            max_len=S,
            max_new=16,
            spec=False,
            penalty=False,
            mode="greedy",
        ),
        gen.state,
    )
    compiled = gen._decode.lower(
        gen.state,
        carry,
        rows,
        jnp.asarray(gen.eos_ids),
        jnp.int32(8),
        spec=False,
        penalty=False,
        mode="greedy",
    ).compile()
    mem = compiled.memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry["cache"]))
    assert cache_bytes > 8e6
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < 0.5 * cache_bytes


def test_recorded_routes_line_up_with_the_training_forward(models):
    """The generator records every MoE layer's experts at every position; the training forward over
    prompt + completion, given them, finds the same choices (float32: no mismatch) and the same
    token log-probabilities, with or without replay; the EOS's log-probability is kept for RL."""
    model = Transformer(
        MLA.replace(n_routed_experts=8).with_router(n_group=1, topk_group=1), rngs=nnx.Rngs(0)
    )  # many routes
    gen = Generator(model, eos_ids=[5], record_routes=True)
    outs = gen.generate(
        PROMPTS, [SamplingParams(temperature=1.0, max_new_tokens=9, seed=s) for s in range(3)]
    )
    width = 32
    rows = [
        list(p) + o.tokens + ([5] if o.finish_reason == "eos" else [])
        for p, o in zip(PROMPTS, outs)
    ]
    toks = np.zeros((len(rows), width), np.int32)
    routes = np.full(
        (model.num_moe_layers(), len(rows), width, MLA.num_experts_per_tok), -1, np.int32
    )
    for i, (row, o) in enumerate(zip(rows, outs)):
        assert o.routes.shape == routes[:, 0, : len(row)].shape
        assert (
            o.routes[:, :-1] >= 0
        ).all()  # every position a forward ran on (all but maybe the last)
        toks[i, : len(row)], routes[:, i, : len(row)] = row, o.routes
    seg = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=0)
    def policy(replay, state):
        logits, aux = nnx.merge(graphdef, state)(
            jnp.asarray(toks),
            segment_ids=jnp.asarray(seg),
            routes=jnp.asarray(routes),
            replay_routes=replay,
        )
        return jax.nn.log_softmax(logits), aux["route_mismatch"].sum(), aux["route_count"].sum()

    for replay in (False, True):
        logp, mismatch, count = policy(replay, state)
        assert float(mismatch) == 0 and float(count) > 0
        for i, (p, row, o) in enumerate(zip(PROMPTS, rows, outs)):
            got = np.asarray(logp[i, np.arange(len(p) - 1, len(row) - 1), row[len(p) :]])
            want = o.logprobs + ([o.eos_logprob] if o.finish_reason == "eos" else [])
            np.testing.assert_allclose(got, want, atol=1e-4)
