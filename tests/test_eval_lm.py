"""The model side of evaluation: log-likelihoods equal a direct forward pass, whatever the batch,
padding or truncation; requests run end to end through lm-eval-exact scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.eval import tasks
from moejax.eval.lm import ModelLM
from moejax.infer import Generator, SamplingParams
from moejax.model import Transformer
from tests.helpers import TINY_MLA

CFG = TINY_MLA.replace(mtp_depth=0, initializer_range=0.3, max_position_embeddings=256)


class CharTokenizer:
    """One token per character (ids 3..62), BOS 1, EOS 2: tokenization is never ambiguous."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [3 + ord(c) % 60 for c in text]

    def decode(self, ids):
        return "".join(chr(ord(" ") + (int(i) - 3) % 60) for i in ids if int(i) >= 3)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _direct(model, tokens, n_cont):
    """Sum of the last n_cont tokens' log-probabilities from one unpadded forward pass."""
    ids = jnp.asarray([tokens[:-1]], jnp.int32)
    logp = jax.nn.log_softmax(model(ids)[0][0].astype(jnp.float32), axis=-1)
    targets = np.asarray(tokens[1:])
    picked = np.asarray(logp)[np.arange(len(targets)), targets][-n_cont:]
    greedy = np.asarray(jnp.argmax(logp, -1))[-n_cont:] == targets[-n_cont:]
    return float(picked.sum()), bool(greedy.all())


def test_loglikelihoods_equal_a_direct_forward_in_any_batch(model):
    tok = CharTokenizer()
    pairs = [
        ("Question: what is 2+2?\nAnswer:", " 4"),
        ("Question: what is 2+2?\nAnswer:", " four"),
        ("short", " and a much longer continuation than the others"),
        ("The trailing space moves ", "here"),
        ("", "an empty context is conditioned on BOS"),
        ("x" * 70, " crosses a padding boundary"),
        *[("Pick one.\nAnswer:", f" {c}") for c in "ABCD"],  # equal inputs: one shared row
    ]
    lm = ModelLM(model, tok, batch_size=4, pad_to=16)
    got = lm.loglikelihood(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        if context:
            ctx, cont = tasks.encode_pair(context, continuation, tok.encode)
        else:
            ctx, cont = [tok.bos_id], tok.encode(continuation)
        want, want_greedy = _direct(model, ctx + cont, len(cont))
        assert ll == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    # the trailing space of the context is scored with the continuation (lm-eval's split)
    assert tasks.encode_pair("a ", "b", tok.encode)[1] == tok.encode(" b")
    # batched alone, one at a time: the same numbers (padding is masked), and cached
    alone = ModelLM(model, tok, batch_size=1, pad_to=128)
    for pair, (ll, _) in zip(pairs, got):
        assert alone.loglikelihood([pair])[0][0] == pytest.approx(ll, abs=1e-4)
    assert lm.loglikelihood(pairs[:2]) == got[:2]


def test_a_long_input_keeps_its_end(model):
    tok = CharTokenizer()
    context, continuation = "abcdefghij" * 8, " end"
    lm = ModelLM(model, tok, batch_size=2, max_length=32, pad_to=16)
    ((ll, _),) = lm.loglikelihood([(context, continuation)])
    ctx, cont = tasks.encode_pair(context, continuation, tok.encode)
    assert ll == pytest.approx(_direct(model, (ctx + cont)[-33:], len(cont))[0], abs=1e-4)


def test_multiple_choice_requests_score_end_to_end(model):
    tok = CharTokenizer()
    docs = [
        {
            "id": f"q{i}",
            "question": f"Which is number {i}?",
            "choices": {"text": [f"n{i}", "zero", "a long distractor"], "label": ["A", "B", "C"]},
            "answerKey": "A",
        }
        for i in range(4)
    ]
    requests = tasks.build_requests("arc_easy", docs, num_fewshot=1, fewshot_docs=docs)
    lm = ModelLM(model, tok, batch_size=8)
    outputs = lm.run(requests)
    assert [len(o) for o in outputs] == [3] * 4
    fresh = ModelLM(model, tok, batch_size=3)  # another batching, no shared cache
    for r, lls in zip(requests, outputs):
        want = [ll for ll, _ in fresh.loglikelihood([(r.context, c) for c in r.continuations])]
        np.testing.assert_allclose(lls, want, atol=1e-4)
    results = tasks.evaluate(requests, outputs)
    assert results["arc_easy"]["acc"]["n"] == 4
    accs = [int(np.argmax(o) == 0) for o in outputs]
    assert results["arc_easy"]["acc"]["value"] == pytest.approx(np.mean(accs))
    assert "arc_easy" in tasks.markdown_table(results)


def test_generation_stops_at_the_stop_strings_as_greedy_decoding(model):
    tok = CharTokenizer()
    req = tasks.GenRequest(
        task="gsm8k",
        subtask="gsm8k",
        doc_index=0,
        context="Question: 1+1?\nAnswer:",
        target="#### 2",
        until=("Q", "z"),
        max_gen_toks=24,
    )
    (text,) = ModelLM(model, tok).generate_until([req])
    free = Generator(model, tok, eos_ids=[tok.eos_id], add_bos=False).generate(
        [tok.encode(req.context)], SamplingParams(max_new_tokens=24)
    )[0]
    want = tasks.truncate_at_stop(free.text, req.until)
    assert text == want and "Q" not in text and "z" not in text


def test_set_model_scores_and_generates_with_the_new_parameters(model):
    """A scorer compiled for one model, given another of the same structure, answers as a fresh
    scorer of the other would (no stale cached scores, the generator's parameters swapped too)."""
    tok = CharTokenizer()
    other = Transformer(CFG, rngs=nnx.Rngs(7))
    pairs = [("Question: 1+1?\nAnswer:", " 2"), ("abc", "def")]
    gen = [tasks.GenRequest("gsm8k", "gsm8k", 0, "Q: 3+4?\nA:", "7", until=("\n",),
                            max_gen_toks=6)]  # fmt: skip
    lm = ModelLM(model, tok, batch_size=2, pad_to=16)
    first, first_text = lm.loglikelihood(pairs), lm.generate_until(gen)

    def held():  # the model's parameter arrays the scorer (or its generator) still references
        params = {id(x) for x in jax.tree.leaves(nnx.state(model))}
        return [x for x in jax.tree.leaves([vars(lm), vars(lm._generator)]) if id(x) in params]

    assert held()
    lm.release()  # a training run donates these buffers to its next step: nothing may keep them
    assert not held()
    lm.set_model(other)
    fresh = ModelLM(other, tok, batch_size=2, pad_to=16)
    assert lm.loglikelihood(pairs) == fresh.loglikelihood(pairs) != first
    assert lm.generate_until(gen) == fresh.generate_until(gen)
    lm.set_model(model)
    assert lm.loglikelihood(pairs) == first and lm.generate_until(gen) == first_text
