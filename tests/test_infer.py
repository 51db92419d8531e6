"""Generation with a KV cache: against full recomputation, absorbed vs expanded MLA, MTP speculation,
int8 caches, sampling filters, stop strings and EOS."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, ModelConfig
from moejax.experiment import load_config_file, resolve
from moejax.infer import Generator, SamplingParams, bytes_per_token, init_cache, sampling
from moejax.infer.forward import forward
from moejax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(__file__))
COMMON = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, n_routed_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=16, initializer_range=0.3)
MLA = ModelConfig(vocab_size=64, **COMMON, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_group=2, topk_group=1, mtp_depth=1)
GQA = ModelConfig(vocab_size=64, **COMMON, attention_type="gqa", num_kv_heads=2, qk_norm=True, rope_interleave=False,
                  score_func="softmax", use_score_correction_bias=False, n_shared_experts=0)
# a small vocabulary makes the random MTP head's drafts right often enough to exercise acceptance
SPEC = MLA.replace(vocab_size=12)
PROMPTS = [[1, 5, 7], [2, 9, 4, 4, 11, 30, 12], [3]]


@pytest.fixture(scope="module")
def models():
    return {name: Transformer(cfg, rngs=nnx.Rngs(0)) for name, cfg in (("mla", MLA), ("gqa", GQA), ("spec", SPEC))}


def recompute_greedy(model, prompt, n, width=32):
    """The reference: the whole sequence through the model (no cache) for every new token, one row at a time
    (one compiled shape: the row padded to `width`, the padding after it in segment 0)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, toks, length):
        logits, _ = nnx.merge(graphdef, state)(toks, segment_ids=(jnp.arange(width) < length)[None].astype(jnp.int32))
        return logits[0, length - 1]

    toks, logps = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, :len(toks)] = toks
        logits = last_logits(state, row, len(toks))
        toks.append(int(jnp.argmax(logits)))
        logps.append(float(jax.nn.log_softmax(logits)[toks[-1]]))
    return toks[len(prompt):], logps


@pytest.mark.parametrize("name", ["mla", "gqa"])
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


def test_absorbed_and_expanded_mla_decode_agree(models):
    model = models["mla"]
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
    outs = Generator(model, eos_ids=[], kv_int8=True).generate(PROMPTS, SamplingParams(max_new_tokens=4))
    assert all(len(o.tokens) == 4 for o in outs)


def test_cache_bytes_per_token_at_deepseek_v3_shape():
    v3 = resolve(load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3.py"))).model
    assert bytes_per_token(v3, "bfloat16") == 576 * 61 * 2
    assert bytes_per_token(v3, "bfloat16", int8=True) == (576 + 2 * 4) * 61
    mixtral = resolve(load_config_file(os.path.join(ROOT, "experiments", "mixtral_8x7b.py"))).model
    assert bytes_per_token(mixtral, "bfloat16") == 2 * 8 * 128 * 32 * 2  # K and V, 8 KV heads of 128, 32 layers


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
    accept, tok = sampling.speculative_accept(keys[:N], keys[N:], jnp.tile(p, (N, 1)), jnp.tile(q, (N, 1)),
                                              jnp.asarray(d), jnp.zeros(N, bool))
    freq = np.bincount(np.asarray(tok), minlength=V) / N
    np.testing.assert_allclose(freq, p, atol=0.01)  # 4+ standard errors at N = 60k
    assert abs(float(np.mean(accept)) - np.minimum(p, q).sum()) < 0.01


def _rows(**kw):
    return sampling.rows([SamplingParams(**kw)])


def test_sampling_filters():
    logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0, -1.0]])
    keep = lambda **kw: np.isfinite(np.asarray(sampling.filtered(logits, _rows(temperature=1.0, **kw))))[0]
    assert keep(top_k=2).tolist() == [True, True, False, False, False]
    p = np.exp([3.0, 2.0, 1.0, 0.0, -1.0]) / np.exp([3.0, 2.0, 1.0, 0.0, -1.0]).sum()  # .636 .234 .086 ...
    assert keep(top_p=0.7).tolist() == [True, True, False, False, False]
    assert keep(top_p=0.5).tolist() == [True, False, False, False, False]
    assert keep(top_p=0.95).tolist() == [True, True, True, False, False]
    assert p[:3].sum() > 0.95 > p[:2].sum()
    assert keep(min_p=0.3).tolist() == [True, True, False, False, False]  # e^-1 = .37 >= .3 > e^-2
    assert keep(top_k=4, min_p=0.1).tolist() == [True, True, True, False, False]
    pen = sampling.penalize(jnp.asarray([[2.0, -2.0, 2.0]]), jnp.asarray([[True, True, False]]), jnp.asarray([2.0]))
    assert np.asarray(pen).tolist() == [[1.0, -4.0, 2.0]]
    with pytest.raises(ConfigError, match="sampling.top_p"):
        SamplingParams(top_p=0.0)


def test_per_request_seeds_do_not_depend_on_the_batch(models):
    gen = Generator(models["mla"], eos_ids=[])
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=8)
    alone = gen.generate([[2, 9, 4]], mine)[0]
    crowd = gen.generate([[1, 1], [2, 9, 4], [5]], [SamplingParams(temperature=0.7, seed=1, max_new_tokens=12), mine,
                                                     SamplingParams(max_new_tokens=3)])
    assert crowd[1].tokens == alone.tokens
    assert [len(c.tokens) for c in crowd] == [12, 8, 3]
    other = gen.generate([[2, 9, 4]], SamplingParams(temperature=1.0, top_p=0.9, seed=6, max_new_tokens=8))[0]
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
    got = Generator(model, CharTokenizer(), chunk=4).generate(["abc"], SamplingParams(max_new_tokens=20,
                                                                                      stop=(stop, "never")))[0]
    assert got.finish_reason == "stop" and got.text == free.text[:first]
    assert got.tokens == free.tokens[:first] and len(got.logprobs) == first
    eos = free.tokens[5]
    got = Generator(model, CharTokenizer(eos_id=eos)).generate(["abc"], SamplingParams(max_new_tokens=20))[0]
    k = free.tokens.index(eos)
    assert got.finish_reason == "eos" and got.tokens == free.tokens[:k]
    assert got.text == free.text[:k]


def test_capacity_models_decode_dropless(models):
    """A model trained with capacity dispatch generates without drops (as DeepSeek serves)."""
    dropless = models["mla"]
    capacity = Transformer(MLA.replace(moe_impl="capacity", capacity_factor=0.25), rngs=nnx.Rngs(0))
    want = Generator(dropless, eos_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    got = Generator(capacity, eos_ids=[]).generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert capacity.segments[1].ffn.dispatch == "capacity"  # the caller's model is unchanged
