"""Fine-tuning: SFT data and masks through packing, LoRA (zero init, merge/unmerge, grouped-matmul
experts, only adapters train), and the entry end to end from a converted Hugging Face base to a
merged export that transformers loads."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import Config, ConfigError, ExecutionConfig, LoRAConfig, ModelConfig
from moejax.data import chat
from moejax.finetune import data as sft
from moejax.finetune import lora
from moejax.model import Transformer

from .helpers import tiny_config_dict

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% else %}{{ raise_exception('bad role') }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
WORDS = (
    "the a function returns value list of items error when file open close read write python code "
    "sum add two numbers explain what this does answer question"
).split()


def _rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, 6))
        a = " ".join(rng.choice(WORDS, int(rng.integers(2, 8))))
        if i % 3 == 2:
            out.append({"prompt": f"Q: {q}\nA:", "completion": " " + a})
        else:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 1:
                msgs = (
                    [{"role": "system", "content": "be brief"}]
                    + msgs
                    + [
                        {"role": "user", "content": "more"},
                        {"role": "assistant", "content": a + " too"},
                    ]
                )
            out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json + tokenizer_config.json (chat template) written by
    `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = str(tmp_path_factory.mktemp("tok"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [" ".join(WORDS)] * 20 + ["User: Assistant: Q: A: be brief more too\n\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}, f)
    return d


@pytest.fixture(scope="module")
def tok(hf_tokenizer_dir):
    from moejax.infer.load import hf_tokenizer

    return hf_tokenizer(hf_tokenizer_dir)


# ------------------------------------------------------------------------------------------ data


def test_chat_and_completion_examples_train_on_answers_only(tok):
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "add two numbers"},
            {"role": "assistant", "content": "sum"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "the sum too"},
        ]
    }
    pieces = sft.example_pieces(row, TEMPLATE)
    assert [t for t, trained in pieces if trained] == [" sum", " the sum too"]
    toks, mask = sft.tokenize_example(pieces, tok)
    assert toks[0] == tok.bos_id and mask[0] == 0
    answers = tok.decode(toks[mask > 0])
    assert answers == " sum</s> the sum too</s>"  # each answer ends with EOS, trained on
    assert tok.decode(toks[1:]) == chat.render_chat(
        TEMPLATE, row["messages"], add_generation_prompt=False, eos="</s>"
    )
    # prompt/completion: the completion (+ EOS) is trained on; loss_on='all' trains on everything
    toks, mask = sft.tokenize_example(
        sft.example_pieces({"prompt": "Q: add", "completion": " sum"}, TEMPLATE), tok
    )
    assert tok.decode(toks[mask > 0]) == " sum</s>"
    _, mask_all = sft.tokenize_example(
        sft.example_pieces({"prompt": "Q: add", "completion": " sum"}, TEMPLATE, "all"), tok
    )
    assert mask_all[1:].all()


def test_sentencepiece_examples_are_tokenized_as_inference_encodes_them(tmp_path):
    """Pieces are not encoded one by one: sentencepiece would give every piece a dummy-prefix
    space."""
    from moejax.data.tokenizer import train_sentencepiece

    spm = train_sentencepiece(
        [" ".join(WORDS)] * 50 + ["<|user|> <|assistant|> é ü"] * 20, str(tmp_path / "t.model"), 300
    )
    row = {
        "messages": [
            {"role": "user", "content": "add two numbers é"},
            {"role": "assistant", "content": "It sums"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ü too"},
        ]
    }
    toks, mask = sft.tokenize_example(sft.example_pieces(row, chat.DEFAULT_CHAT_TEMPLATE), spm)
    body = [t for t in toks[1:] if t != spm.eos_id]  # BOS and the inserted EOS ids aside
    full = chat.render_chat(
        chat.DEFAULT_CHAT_TEMPLATE, row["messages"], add_generation_prompt=False
    )
    assert body == spm.encode(full)  # the whole render, encoded once
    answers = [spm.decode(toks[i:j]) for i, j in _runs(mask)]
    assert answers == ["It sums\n", "ü too\n"]
    prompt = chat.render_chat(chat.DEFAULT_CHAT_TEMPLATE, row["messages"][:1])
    assert list(toks[1 : np.flatnonzero(mask)[0]]) == spm.encode(
        prompt
    )  # what the generator is given


def _runs(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_bad_examples_are_skipped_and_counted(tok, tmp_path):
    bad = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {
            "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
        },  # template raises
        {
            "messages": [
                {"role": "user", "content": "long " * 200},
                {"role": "assistant", "content": "y"},
            ]
        },
        {"text": "neither format"},
    ]
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for r in _rows(12) + bad:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    skipped = {}
    from collections import Counter

    c = Counter()
    rows, counts = sft.build_rows(sft.read_jsonl([str(path)], c), tok, TEMPLATE, 64)
    skipped = dict(counts["skipped"], **c)
    assert skipped == {
        "no assistant turn": 1,
        "unknown role": 1,
        "template failed": 1,
        "longer than seq_len=64": 1,
        "neither messages nor prompt/completion": 1,
        "not JSON": 1,
    }
    assert sum(counts["examples"].values()) == 12


def test_packing_keeps_examples_whole_with_their_masks(tok):
    examples = [sft.tokenize_example(sft.example_pieces(r, TEMPLATE), tok) for r in _rows(40)]
    packer = sft.SFTPacker(64, window=4)
    rows = np.concatenate([packer.add(t, m) for t, m in examples] + [packer.finish()])
    assert rows.shape[1:] == (4, 64)
    seen = []
    for toks, seg, pos, mask in rows:
        assert (mask[seg == 0] == 0).all() and (toks[seg == 0] == 0).all()
        for s in np.unique(seg[seg > 0]):
            at = np.flatnonzero(seg == s)
            assert (np.diff(at) == 1).all() and (
                pos[at] == np.arange(len(at))
            ).all()  # whole, positions restart
            seen.append((tuple(toks[at]), tuple(mask[at])))
    assert sorted(seen) == sorted(
        (tuple(t), tuple(m)) for t, m in examples
    )  # every example once, unchanged
    assert (rows[:, 1] > 0).mean() > 0.8  # first fit fills rows


def test_loss_counts_exactly_the_answer_tokens_of_packed_rows(tok):
    from moejax.trainer.step import normalizers, shifted_targets

    rows, _ = sft.build_rows(_rows(30), tok, TEMPLATE, 64, val_fraction=0.01)
    r = rows["train"]
    batch = {k: jnp.asarray(r[:, i]) for i, k in enumerate(sft.FIELDS)}
    labels, valid = shifted_targets(batch, 1)
    # a target counts when it is an answer token of the same example as the position predicting it
    expected = (r[:, 3, 1:] > 0) & (r[:, 1, 1:] == r[:, 1, :-1])
    assert (
        np.array_equal(np.asarray(valid[:, :-1]), expected) and not np.asarray(valid[:, -1]).any()
    )
    assert (
        float(normalizers(batch, Config.from_dict(tiny_config_dict()))["tokens"]) == expected.sum()
    )
    assert expected.sum() == (r[:, 3] > 0).sum()  # no answer token is ever the first of its example


def test_packed_examples_never_attend_to_each_other(tok):
    cfg = Config.from_dict(tiny_config_dict()).model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    examples = [sft.tokenize_example(sft.example_pieces(r, TEMPLATE), tok) for r in _rows(3)]
    packer = sft.SFTPacker(128)
    for t, m in examples:
        packer.add(t, m)
    row = packer.finish()
    assert len(row) == 1 and row[0, 1].max() == 3
    # the packed row, then each example alone in its own row (padding after it): one compiled call
    alone = np.zeros((len(examples), 3, 128), np.int32)
    for i, (t, _) in enumerate(examples):
        alone[i, 0, : len(t)], alone[i, 1, : len(t)], alone[i, 2, : len(t)] = (
            t,
            1,
            np.arange(len(t)),
        )
    rows = np.concatenate([row[:, :3], alone])
    f = jax.jit(lambda m, t, s, p: m(t, p, s)[0])
    logits = np.asarray(f(model, *(jnp.asarray(rows[:, i]) for i in range(3))))
    seg = row[0, 1]
    for i, (t, _) in enumerate(examples):
        np.testing.assert_allclose(logits[0][seg == i + 1], logits[1 + i][: len(t)], atol=2e-5)


# ------------------------------------------------------------------------------------------ LoRA

TARGETS = ("attn/", "ffn/experts/", "ffn/shared/", "segments/0/ffn/")


def _randomize_b(model, scale=0.05):
    for i, (_, module, name) in enumerate(lora._adapted(model)):
        b = getattr(module, name + "_lora_b")
        b.set_value(scale * jax.random.normal(jax.random.key(i), b.shape, b.dtype))


@pytest.mark.parametrize("moe_impl", ["dropless", "capacity"])
def test_lora_zero_init_merge_and_unmerge(moe_impl):
    cfg = Config.from_dict(tiny_config_dict()).model.replace(num_layers=3, mtp_depth=1)
    ex = ExecutionConfig(moe_impl=moe_impl, capacity_factor=4.0)
    base = Transformer(cfg, rngs=nnx.Rngs(0), execution=ex)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    fwd = jax.jit(lambda m, t: m(t, return_mtp=True))
    ref = fwd(base, tokens)
    model = lora.apply(
        nnx.merge(*nnx.split(base)), LoRAConfig(rank=4, targets=TARGETS), nnx.Rngs(5)
    )
    paths = [p for p, _, _ in lora._adapted(model)]
    assert "segments/1/ffn/experts/w_gate_up" in paths and "segments/1/ffn/shared/w_down" in paths
    assert "segments/0/ffn/w_gate_up" in paths and "mtp/0/block/attn/wkv_b" in paths
    out = fwd(model, tokens)
    assert float(jnp.abs(out[0] - ref[0]).max()) == 0.0  # B = 0: the base exactly
    assert float(jnp.abs(out[1]["mtp_logits"] - ref[1]["mtp_logits"]).max()) == 0.0
    _randomize_b(model)
    adapted = fwd(model, tokens)[
        0
    ]  # adapters on the activations (experts: inside the grouped matmul)
    merged = lora.merge(model)
    assert not lora.has_adapters(merged) and lora.has_adapters(model)
    assert isinstance(merged.segments[1].ffn.w_gate_up, nnx.Param)
    assert float(jnp.abs(adapted - ref[0]).max()) > 0.1
    np.testing.assert_allclose(np.asarray(fwd(merged, tokens)[0]), np.asarray(adapted), atol=2e-5)
    back = lora.unmerge(merged, model)
    np.testing.assert_allclose(np.asarray(fwd(back, tokens)[0]), np.asarray(adapted), atol=2e-5)
    w0 = base.segments[1].attn.wq_b[...]
    np.testing.assert_allclose(
        np.asarray(back.segments[1].attn.wq_b[...]), np.asarray(w0), atol=1e-6
    )


def test_lora_grouped_matmul_gradients_match_the_merged_reference():
    from moejax.model import moe as moe_lib
    from moejax.model.moe_ep import ExpertLoRA

    E, D, F, Z, M, K = 4, 16, 8, 3, 24, 2
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (M, D))
    wgu, wd = 0.2 * jax.random.normal(k[1], (E, D, 2, F)), 0.2 * jax.random.normal(k[2], (E, F, D))
    ids = jnp.stack([jax.random.permutation(jax.random.key(i), E)[:K] for i in range(M)])
    w = jax.nn.softmax(jax.random.normal(k[3], (M, K)))
    ad = [
        0.3 * jax.random.normal(k[4 + i], s)
        for i, s in enumerate([(E, D, Z), (E, Z, 2, F), (E, F, Z), (E, Z, D)])
    ]

    def fast(ad):
        return jnp.sum(
            jnp.sin(
                moe_lib.experts_dropless(
                    x, ids, w, wgu, wd, jnp.float32, "tiled", ExpertLoRA(*ad, scale=0.5)
                )
            )
        )

    def ref(ad):
        gu, d = ExpertLoRA(*ad, scale=0.5).merged(wgu, wd)
        return jnp.sum(jnp.sin(moe_lib.experts_dense(x, ids, w, gu, d, jnp.float32)))

    fast, ref = jax.jit(jax.value_and_grad(fast)), jax.jit(jax.value_and_grad(ref))
    (v1, g1s), (v2, g2s) = fast(ad), ref(ad)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for g1, g2 in zip(g1s, g2s):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-5)


def test_lora_bad_settings_are_clear_errors():
    from moejax.finetune.runner import resolve

    model = Transformer(ModelConfig(num_layers=2), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'attn/nope' matches no adaptable weight"):
        lora.apply(model, LoRAConfig(rank=2, targets=("attn/", "attn/nope")), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="not a regular expression"):
        lora.apply(model, LoRAConfig(rank=2, targets=("attn/[",)), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=-1)
    cd = tiny_config_dict()
    cd.lora.rank = 4
    with pytest.raises(ConfigError, match="needs|base"):
        resolve(Config.from_dict(cd))


def test_lora_training_changes_only_the_adapters(tmp_path):
    from moejax.trainer import setup as setup_lib
    from moejax.trainer.checkpoint import Checkpointer

    cd = tiny_config_dict()
    cd.lora.rank, cd.lora.targets, cd.lora.dropout = 4, TARGETS, 0.1
    cd.optim.warmup_steps = 0
    cfg = Config.from_dict(cd)
    ts = setup_lib.build(cfg)
    assert ts.has_frozen
    adapters = sum(x.size for x in jax.tree.leaves(ts.abstract["params"]))
    frozen = sum(x.size for x in jax.tree.leaves(ts.abstract["frozen"]))
    assert 0 < adapters < 0.2 * frozen and not jax.tree.leaves(ts.abstract["router"])
    moments = sum(x.size for x in jax.tree.leaves(ts.abstract["opt_state"]) if x.ndim)
    assert moments == 2 * adapters  # the optimizer holds the adapters' moments, nothing else
    state = ts.init_state()
    before = jax.device_get(state)
    rng = np.random.default_rng(0)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch = {
        "tokens": jnp.asarray(rng.integers(3, cfg.model.vocab_size, (B, T)), jnp.int32),
        "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
    }
    step = ts.train_step()
    for _ in range(2):
        state, m = step(state, batch)
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(before["frozen"]), jax.tree.leaves(after["frozen"])):
        assert np.array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]))
    ]
    assert all(changed) and np.isfinite(float(m["loss"]))
    ckpt = Checkpointer(
        str(tmp_path), cfg
    )  # checkpoints hold adapters and moments, not the frozen base
    ckpt.save(2, state, {}, force=True)
    ckpt.close()
    saved, _ = ts.restore(Checkpointer(str(tmp_path), cfg), 2)
    assert "frozen" not in saved
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(after["params"])):
        assert np.array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, hf_tokenizer_dir):
    """A tiny random DeepSeek-V3 exported with to_hf, with the tokenizer files beside it."""
    import shutil

    from moejax.convert import to_hf

    cfg = Config.from_dict(tiny_config_dict()).model
    d = str(tmp_path_factory.mktemp("hf_base"))
    to_hf(Transformer(cfg, rngs=nnx.Rngs(3)), cfg, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_tokenizer_dir, f), d)
    return d


def _sft_config(base, data, cache, **lora_kw):
    cd = tiny_config_dict(cache)
    cd.base = base
    cd.sft.data = data
    cd.train.steps, cd.train.ckpt_every, cd.train.eval_every, cd.train.num_samples = 3, 3, 0, 1
    cd.train.sample_tokens = 4
    for k, v in lora_kw.items():
        cd.lora[k] = v
    return Config.from_dict(cd)


@pytest.mark.slow
def test_lora_sft_from_a_converted_hf_base_exports_a_model_transformers_loads(
    hf_base, tmp_path, capsys
):
    import torch
    from transformers import AutoModelForCausalLM

    from moejax.eval import fixtures
    from moejax.eval.run import evaluate
    from moejax.finetune.export import export
    from moejax.finetune.runner import run
    from moejax.infer.load import load

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(60)))
    cfg = _sft_config(hf_base, str(data), str(tmp_path / "cache"), rank=4, targets=TARGETS)
    arc = fixtures.write(str(tmp_path / "bench"))["arc_easy"]  # a benchmark scored as it trains
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, tasks="arc_easy", data=f"arc_easy={arc}", limit=2)
    )
    wd = str(tmp_path / "run")
    run(
        cfg, wd, max_steps_this_run=2
    )  # interrupted: the checkpoint holds adapters and moments only
    last = run(cfg, wd)  # resumes: the frozen base is read from the base folder again
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    assert "LoRA rank 4" in out and "----- sample -----\n<s>" not in out and "User:" in out
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])
    # the run's model is the base with its adapters merged; transformers reads the merged export
    model, tok = load(wd)
    assert tok is not None and not lora.has_adapters(model)
    # the benchmark: the base's score at step 0 (before the interruption), the adapted model's at
    # the end (after the resume), equal to evaluating the merged model the run wrote
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        scored = [m for m in map(json.loads, f) if "eval/arc_easy/acc_norm" in m]
    assert [m["step"] for m in scored] == [0, 3]
    r = evaluate(cfg.eval.to_eval_config(), model, tok)["results"]["arc_easy"]
    assert scored[-1]["eval/arc_easy/acc_norm"] == pytest.approx(r["acc_norm"]["value"], abs=1e-6)
    hf_dir = export(wd, str(tmp_path / "merged"), "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 400, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    base, _ = load(hf_base)  # and the adapters did change the model
    assert float(np.abs(np.asarray(base(jnp.asarray(ids))[0]) - ours).max()) > 1e-4
    adir = export(wd, str(tmp_path / "adapters"), "adapters")
    assert os.path.exists(os.path.join(adir, "adapters.safetensors"))


@pytest.mark.slow
def test_full_sft_and_a_refused_tokenizer(hf_base, hf_tokenizer_dir, tmp_path):
    from moejax.finetune.runner import BaseError, resolve, run

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    cfg = _sft_config(hf_base, str(data), str(tmp_path / "cache"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2, num_samples=0))
    last = run(cfg, str(tmp_path / "run"))
    assert np.isfinite(last["loss"])
    # continual pretraining on data tokenized by another tokenizer is refused
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(
        ["completely different words"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]),
    )
    other.save(str(tmp_path / "other.json"))
    d = sft.prepare(
        [str(data)],
        str(tmp_path / "other.json"),
        str(tmp_path / "otherdata"),
        seq_len=64,
        special={"bos": "<s>", "eos": "</s>"},
        quiet=True,
    )
    bad = dataclasses.replace(
        cfg, sft=dataclasses.replace(cfg.sft, data=""), data=dataclasses.replace(cfg.data, source=d)
    )
    with pytest.raises(BaseError, match="different tokenizer"):
        resolve(bad)


# ------------------------------------------------------------------------------------------ DPO


def _pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(WORDS, 5))
        shuffled = words[::-1] if words[::-1] != words else words[1:] + words[:1]
        prompt = " ".join(rng.choice(WORDS, 4))
        out.append(
            {
                "prompt": prompt if i % 2 else [{"role": "user", "content": prompt}],
                "chosen": " ".join(words),
                "rejected": " ".join(shuffled),
            }
        )
    return out


def test_preference_pairs_pack_as_consecutive_segments(tok):
    bad = [
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
    ]
    rows, counts = sft.build_rows(
        _pairs(20) + bad, tok, TEMPLATE, 64, kind="preference", max_pairs=2, val_fraction=0.01
    )
    assert counts["skipped"] == {
        "missing prompt, chosen or rejected": 1,
        "chosen equals rejected": 1,
        "unknown role": 1,
    }
    r = rows["train"]
    assert r[:, 1].max() <= 4  # at most 2 pairs a row
    for toks, seg, _, mask in r:
        n = seg.max()
        assert n % 2 == 0
        for k in range(
            1, n, 2
        ):  # chosen (odd) and rejected (even): the same prompt, different answers
            c, j = toks[(seg == k)], toks[(seg == k + 1)]
            pc, pj = c[mask[seg == k] == 0], j[mask[seg == k + 1] == 0]
            assert np.array_equal(pc, pj) and not np.array_equal(c, j)


def test_dpo_and_ipo_losses_match_the_formulas_on_hand_computed_log_probs():
    from moejax.config import AlignConfig
    from moejax.finetune.objectives import dpo_share

    rng = np.random.default_rng(0)
    T, V = 12, 7
    # one row: pair 1 = segments 1 (chosen, 4 tokens) and 2 (rejected, 3), pair 2 = segments 3, 4;
    # then padding
    seg = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 0])
    mask = np.array(
        [0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0]
    )  # completions; each segment's first token is prompt
    toks = rng.integers(0, V, T)
    batch = {
        "tokens": jnp.asarray(toks[None]),
        "segment_ids": jnp.asarray(seg[None]),
        "loss_mask": jnp.asarray(mask[None]),
    }
    pol, ref = rng.normal(size=(1, T, V)), rng.normal(size=(1, T, V))

    def seq_logp(
        logits, s
    ):  # the completion tokens of segment s, each predicted from the position before
        lp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
        at = [t for t in range(1, T) if seg[t] == s and seg[t - 1] == s and mask[t]]
        return sum(lp[t - 1, toks[t]] for t in at), len(at)

    for loss_kind, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        cfg = AlignConfig(
            method="dpo", beta=0.3, dpo_loss=loss_kind, label_smoothing=eps, max_pairs_per_row=3
        )
        expected, correct = [], 0
        for c, r in ((1, 2), (3, 4)):
            (pc, nc), (pr, nr) = seq_logp(pol, c), seq_logp(pol, r)
            (rc, _), (rr, _) = seq_logp(ref, c), seq_logp(ref, r)
            if loss_kind == "ipo":
                h = (pc - rc) / nc - (pr - rr) / nr
                expected.append((h - 1 / (2 * 0.3)) ** 2)
            else:
                z = 0.3 * ((pc - rc) - (pr - rr))
                expected.append(
                    -(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z)))
                )
            correct += (pc - rc) > (pr - rr)
        loss, m = dpo_share(
            jnp.asarray(pol, jnp.float32), jnp.asarray(ref, jnp.float32), batch, jnp.float32(2), cfg
        )
        np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
        assert float(m["dpo/accuracy"]) == correct / 2


@pytest.mark.slow
def test_dpo_lora_and_full_from_a_base_keep_their_reference(hf_base, tmp_path):
    from moejax.finetune.runner import run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(80)))
    cfg = _sft_config(
        hf_base, str(data), str(tmp_path / "cache"), rank=4, targets=("attn/", "ffn/experts/")
    )
    cd = cfg.to_dict()
    cd["align"].update(method="dpo", beta=0.5, max_pairs_per_row=2)
    cd["model"]["router"]["bias_update_rate"] = 0.0  # (required: the reference's biases)
    cd["train"].update(steps=8, eval_every=0, num_samples=0, ckpt_every=8)
    cd["optim"].update(lr=5e-3, warmup_steps=0)
    last = run(Config.from_dict(cd), str(tmp_path / "lora"))
    with open(tmp_path / "lora" / "metrics.jsonl") as f:
        first = next(x for x in map(json.loads, f) if "ce_loss" in x)
    # the reference is the policy with its adapters off, which LoRA's zero B makes the policy at
    # step 1: every pair's loss is log 2
    assert first["step"] == 1 and abs(first["ce_loss"] - np.log(2)) < 1e-3, first
    # policy = reference at step 0 (LoRA's B is zero): every held-out pair's loss is log 2 and none
    # is ranked; 8 steps move the held-out pairs the chosen way (measured: 0.680, accuracy 1.0)
    assert last["val_loss"] < np.log(2) - 0.005 and last["val_accuracy"] > 0.5, last
    cd["lora"]["rank"] = 0
    cd["optim"]["lr"] = 2e-3
    from moejax.finetune.runner import BaseStart, resolve
    from moejax.trainer import setup as setup_lib

    full = resolve(Config.from_dict(cd))
    ts = setup_lib.build(full)
    state = BaseStart(full).init(ts)
    ref0 = jax.device_get(state["reference"])
    step = ts.train_step()
    from moejax.data import dataset

    batch = {
        k: jnp.asarray(v) for k, v in next(dataset.Batches(full.data.source, "train", 4, 0)).items()
    }
    losses = []
    for _ in range(
        6
    ):  # the same batch: the policy moves away from the reference, towards the chosen answers
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert abs(losses[0] - np.log(2)) < 0.02  # policy = reference: every pair's loss is log 2
    assert (
        losses[-1] < losses[0] - 0.05
        and float(m["dpo/margin"]) > 0
        and float(m["dpo/accuracy"]) > 0.5
    )
    for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(jax.device_get(state["reference"]))):
        assert np.array_equal(a, b)  # the reference never moves
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(ref0), jax.tree.leaves(jax.device_get(state["params"])))
    ]
    assert any(changed)


@pytest.mark.slow
def test_reward_model_learns_to_rank_held_out_pairs(hf_base, tmp_path):
    from moejax.finetune.reward import last_positions
    from moejax.finetune.runner import run

    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0], [1, 2, 2, 0, 0, 0, 0]])
    assert np.array_equal(np.asarray(last_positions(seg, 3)), [[1, 4, 5], [0, 2, 0]])
    data = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(1)
    good, bad = (
        WORDS[:12],
        WORDS[12:],
    )  # chosen answers use one half of the words, rejected the other
    pairs = [
        {
            "prompt": " ".join(rng.choice(WORDS, 4)),
            "chosen": " ".join(rng.choice(good, 4)),
            "rejected": " ".join(rng.choice(bad, 4)),
        }
        for _ in range(160)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cd = _sft_config(hf_base, str(data), str(tmp_path / "cache")).to_dict()
    cd["align"].update(method="reward", max_pairs_per_row=2)
    cd["data"]["val_fraction"] = 0.2
    cd["train"].update(steps=30, eval_every=0, num_samples=0, ckpt_every=30, eval_batches=4)
    cd["optim"].update(lr=3e-3, warmup_steps=0)
    last = run(Config.from_dict(cd), str(tmp_path / "rm"))
    # a ranking by vocabulary generalizes to held-out pairs within 30 steps of full fine-tuning
    assert last["val_accuracy"] > 0.8, last


def test_a_workdir_base_is_pinned_to_its_step(tmp_path):
    from moejax.infer.load import split_step

    (tmp_path / "checkpoints").mkdir()
    assert split_step(f"{tmp_path}@240") == (str(tmp_path), 240)
    assert split_step(f"{tmp_path}@x") == (f"{tmp_path}@x", None)
    assert split_step("/no/such/dir@3") == ("/no/such/dir@3", None)  # only a workdir takes a step


def test_lora_init_around_a_base_never_draws_a_second_base():
    """The init that puts adapters and moments around given frozen weights: its temporaries stay far
    below one copy of the base (the random base the model constructor would draw is dead code and
    never computed), and its outputs are the state itself (the frozen input is donated, not
    copied)."""
    import functools
    import math

    from moejax.trainer import setup as setup_lib

    cd = tiny_config_dict()
    cd.lora.rank, cd.lora.targets = 4, TARGETS
    cfg = Config.from_dict(cd)
    ts = setup_lib.build(cfg)
    init = jax.jit(
        functools.partial(setup_lib._init, cfg, ts.tx, ts.mesh, ts.rules),
        in_shardings=(ts.shardings["frozen"],),
        out_shardings=ts.shardings,
        donate_argnums=(0,),
    )
    with jax.set_mesh(ts.mesh):
        mem = init.lower(ts.abstract["frozen"]).compile().memory_analysis()
    frozen = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(ts.abstract["frozen"])
    )
    adapters = sum(
        math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(ts.abstract["params"])
    )
    assert mem.temp_size_in_bytes < 0.25 * frozen, (mem.temp_size_in_bytes, frozen)
    assert mem.output_size_in_bytes - mem.alias_size_in_bytes < frozen / 2 + 4 * adapters
