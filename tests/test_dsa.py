"""DeepSeek Sparse Attention (V3.2): the lightning indexer against a numpy reference, the top-k
selection, sparse attention with every key kept equal to dense MLA, the indexer's KL loss against
its formula, which parameters each loss reaches, and the two training stages (the dense warm-up
trains only the indexers). Logit parity with transformers' deepseek_v32 is in test_hf_parity.py."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import Config, ConfigError, ModelConfig
from moejax.model import Transformer, dsa
from moejax.model.layers import rope_cos_sin

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    intermediate_size=48,
    initializer_range=0.2,
    index_topk=5,
    index_n_heads=3,
    index_head_dim=8,
)


def _rope_half_split(x, pos, theta, P):
    """numpy half-split rotary of the first P dims of x [T, ..., Dk] at positions pos [T]."""
    inv = theta ** (-np.arange(0, P, 2) / P)
    ang = pos[:, None] * inv[None]  # [T, P/2]
    shape = (len(pos),) + (1,) * (x.ndim - 2) + (P // 2,)
    c, s = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
    x1, x2 = x[..., : P // 2], x[..., P // 2 : P]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., P:]], axis=-1)


def test_indexer_scores_match_a_numpy_reference():
    cfg = CFG
    ix = dsa.Indexer(cfg, rngs=nnx.Rngs(3))
    ix.k_norm.weight.set_value(1 + 0.3 * jax.random.normal(jax.random.key(1), (8,)))
    ix.k_norm.bias.set_value(0.3 * jax.random.normal(jax.random.key(2), (8,)))
    T = 7
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, T, cfg.hidden_size)).astype(np.float32)
    q_lat = rng.normal(size=(1, T, cfg.q_lora_rank)).astype(np.float32)
    pos = np.arange(T)
    cos, sin = rope_cos_sin(jnp.asarray(pos)[None], cfg)
    got = np.asarray(ix(jnp.asarray(x), jnp.asarray(q_lat), cos, sin))[0]

    wq, wk = np.asarray(ix.wq_b[...]), np.asarray(ix.wk[...])
    ww = np.asarray(ix.weights_proj[...])
    g, b = np.asarray(ix.k_norm.weight[...]), np.asarray(ix.k_norm.bias[...])
    q = np.einsum("tr,rhk->thk", q_lat[0], wq)
    k = x[0] @ wk
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6) * g + b
    q = _rope_half_split(q, pos, cfg.rope_theta, cfg.qk_rope_head_dim)
    k = _rope_half_split(k, pos, cfg.rope_theta, cfg.qk_rope_head_dim)
    w = x[0] @ ww / np.sqrt(cfg.index_n_heads)
    want = np.einsum("th,ths->ts", w, np.maximum(np.einsum("thk,sk->ths", q, k) / np.sqrt(8), 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_select_keeps_the_top_k_visible_keys():
    rng = np.random.default_rng(1)
    B, T, k = 2, 9, 3
    scores = rng.normal(size=(B, T, T)).astype(np.float32)
    seg = np.array([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2], np.int32)
    allowed = np.asarray(dsa.visible(jnp.asarray(seg), T))
    got = np.asarray(dsa.select(jnp.asarray(scores), jnp.asarray(allowed), k))
    for b in range(B):
        for t in range(T):
            vis = np.flatnonzero(allowed[b, t])
            assert set(vis) <= set(range(t + 1)) and all(seg[b, s] == seg[b, t] for s in vis)
            top = vis[np.argsort(-scores[b, t, vis], kind="stable")[:k]]
            assert set(np.flatnonzero(got[b, t])) == set(top), (b, t)
    assert not allowed[1, 7:].any()  # padding sees nothing


def _same_params(src, dst):
    """dst's parameters set to src's (src may have indexers dst lacks)."""
    flat = [(k, v) for k, v in nnx.to_flat_state(nnx.state(src)) if "indexer" not in k]
    nnx.update(dst, nnx.from_flat_state(flat))
    return dst


def test_keeping_every_key_is_dense_mla_and_fewer_keys_change_the_output():
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
    seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])
    full = Transformer(CFG.replace(index_topk=12), rngs=nnx.Rngs(0))
    dense = _same_params(full, Transformer(CFG.replace(index_topk=0), rngs=nnx.Rngs(9)))
    a, aux = full(ids, segment_ids=seg)
    b, _ = dense(ids, segment_ids=seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=2e-5)
    assert aux["indexer_kl"].shape == (CFG.num_layers,)
    sparse = Transformer(CFG, rngs=nnx.Rngs(9))
    nnx.update(sparse, nnx.state(full))  # the same weights, indexers included
    c, _ = sparse(ids, segment_ids=seg)
    assert np.abs(np.asarray(c) - np.asarray(a))[real].max() > 1e-3


def test_gathered_mqa_form_equals_the_reference_forward_and_gradients():
    """dsa.sparse_mla (top-k keys gathered from the latent, W_UK / W_UV absorbed, query blocks of 5
    over 13 positions) against the reference form (expanded keys, [T, S] mask): logits, the
    indexer KL and the gradients of both with respect to every parameter; packed documents and
    padding."""
    from moejax.config import ExecutionConfig

    cfg = CFG.replace(index_topk=4, num_layers=2)
    fast = Transformer(cfg, rngs=nnx.Rngs(0), execution=ExecutionConfig(attention_block=5))
    ref = Transformer(cfg, rngs=nnx.Rngs(0), execution=ExecutionConfig(attention_impl="reference"))
    assert fast.segments[0].attn._sparse_mqa() and not ref.segments[0].attn._sparse_mqa()
    ids = jax.random.randint(jax.random.key(4), (2, 13), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 8 + [2] * 5, [1] * 11 + [0] * 2])
    real = np.asarray(seg > 0)

    def run(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            logits, aux = nnx.merge(graphdef, p, rest)(ids, segment_ids=seg)
            lm = jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0)[..., 3])
            return lm + aux["indexer_kl"].sum(), (logits, aux["indexer_kl"])

        (_, (logits, kl)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return np.asarray(logits), np.asarray(kl), dict(nnx.to_flat_state(grads))

    a, kl_a, g_a = run(fast)
    b, kl_b, g_b = run(ref)
    np.testing.assert_allclose(a[real], b[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(kl_a, kl_b, rtol=2e-3, atol=1e-7)
    for path, v in g_b.items():
        np.testing.assert_allclose(
            np.asarray(g_a[path].get_value()),
            np.asarray(v.get_value()),
            atol=2e-5,
            rtol=2e-3,
            err_msg=str(path),
        )


def test_indexer_kl_matches_its_formula():
    rng = np.random.default_rng(2)
    B, T = 2, 6
    scores = rng.normal(size=(B, T, T)).astype(np.float32)
    mask = np.asarray(dsa.select(jnp.asarray(scores), dsa.visible(None, T), 3)) & (
        rng.random((B, T, T)) < 0.9
    )
    mask[:, np.arange(T), np.arange(T)] = True  # every query keeps itself
    target = rng.random((B, T, T)) * mask
    target /= target.sum(-1, keepdims=True)
    got = float(dsa.indexer_kl(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(mask)))
    want = 0.0
    for b in range(B):
        for t in range(T):
            m = mask[b, t]
            q = np.exp(scores[b, t, m] - scores[b, t, m].max())
            q /= q.sum()
            p = target[b, t, m]
            want += np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("stage", ["sparse", "warmup"])
def test_the_indexer_learns_only_from_its_loss_and_teaches_nothing_back(stage):
    """The LM loss reaches no indexer weight (top-k is not differentiable, and the indexer's inputs
    are detached); the KL loss reaches only indexer weights (its target is detached)."""
    model = Transformer(CFG.replace(dsa_stage=stage), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)

    def losses(p):
        logits, aux = nnx.merge(graphdef, p, rest)(ids)
        ce = -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])
        return ce, aux["indexer_kl"].sum()

    g_ce = jax.grad(lambda p: losses(p)[0])(params)
    g_kl = jax.grad(lambda p: losses(p)[1])(params)
    for path, leaf in nnx.to_flat_state(g_ce):
        in_ix = "indexer" in path
        ce_norm = float(jnp.abs(leaf.get_value()).max())
        kl_norm = float(jnp.abs(dict(nnx.to_flat_state(g_kl))[path].get_value()).max())
        if in_ix:
            assert ce_norm == 0, path
            assert kl_norm > 0, path
        else:
            assert kl_norm == 0, path


def _cfg(stage):
    from tests.helpers import tiny_config

    cfg = tiny_config()
    model = cfg.model.replace(index_topk=16, index_n_heads=2, index_head_dim=16, dsa_stage=stage)
    # (no warmup: the first step's learning rate is the peak)
    return dataclasses.replace(
        cfg, model=model, optim=dataclasses.replace(cfg.optim, warmup_steps=0)
    )


def _batch(cfg: Config):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    return {
        "tokens": jnp.asarray(rng.integers(4, cfg.model.vocab_size, (B, T)), jnp.int32),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    }


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_training_stages(stage):
    """The dense warm-up's optimizer updates the indexers alone (no optimizer state for the rest);
    sparse training updates everything, and the indexer KL is part of the reported loss."""
    from moejax.trainer import setup

    cfg = _cfg(stage)
    ts = setup.build(cfg)
    step, state = ts.train_step(), ts.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    biases = [np.asarray(x) for x in jax.tree.leaves(state["router"])]
    state, metrics = step(state, _batch(cfg))
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(biases, jax.tree.leaves(state["router"]))
    ]
    assert biases and (not any(moved) if stage == "warmup" else any(moved))  # the routing too
    assert np.isfinite(float(metrics["indexer_kl"])) and float(metrics["indexer_kl"]) > 0
    changed = {
        path: not np.array_equal(
            np.asarray(v.get_value()), dict(nnx.to_flat_state(before))[path].get_value()
        )
        for path, v in nnx.to_flat_state(state["params"])
    }
    ix = [p for p in changed if "indexer" in p]
    assert ix and all(changed[p] for p in ix)
    others = [changed[p] for p in changed if "indexer" not in p]
    assert not any(others) if stage == "warmup" else all(others)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="model.index_topk"):
        CFG.replace(attention_type="gqa")
    with pytest.raises(ConfigError, match="model.index_topk"):
        CFG.replace(q_lora_rank=0)
    with pytest.raises(ConfigError, match="model.index_head_dim"):
        CFG.replace(index_head_dim=2)
    with pytest.raises(ConfigError, match="model.dsa_stage"):
        CFG.replace(dsa_stage="dense")
    with pytest.raises(ConfigError, match="model.dsa_stage"):  # a warm-up needs indexers
        CFG.replace(index_topk=0, dsa_stage="warmup")


def test_indexers_join_a_dense_base_and_warm_up_alone(tmp_path):
    """DeepSeek-V3.2's recipe: a recipe asking for sparse attention on a dense MLA base gets new
    indexers (drawn into their shardings); the base's weights come through unchanged and the dense
    warm-up trains the indexers alone."""
    import shutil

    from moejax.finetune import runner
    from moejax.trainer import setup
    from tests.helpers import saved_checkpoint, tiny_config_dict

    dense = Config.from_dict(tiny_config_dict()).model
    ckpt, tok = saved_checkpoint(str(tmp_path), dense)
    shutil.copy(tok, os.path.join(ckpt, "tokenizer.model"))
    cd = tiny_config_dict(str(tmp_path / "cache"))
    cd.base, cd.sft.data = ckpt, "arithmetic"
    cd.grpo.max_value, cd.grpo.held_out = 6, 4
    cd.data.seq_len = 192  # (the small tokenizer spells the chat template out)
    cd.model.index_topk, cd.model.index_n_heads, cd.model.index_head_dim = 16, 2, 16
    cd.model.dsa_stage = "warmup"
    cd.optim.warmup_steps = 0
    cfg = runner.resolve(Config.from_dict(cd))
    assert (cfg.model.index_topk, cfg.model.dsa_stage) == (16, "warmup")
    base_cfg = runner.base_model_config(ckpt)
    keep = ("index_topk", "index_n_heads", "index_head_dim", "dsa_stage")
    assert cfg.model.replace(**{f: getattr(base_cfg, f) for f in keep}) == base_cfg
    ts = setup.build(cfg)
    state = runner.BaseStart(cfg).init(ts)
    base = dict(nnx.to_flat_state(nnx.state(runner.load_base(cfg), nnx.Param)))
    # (numpy copies: the train step donates the state)
    params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state["params"])}
    assert set(params) - set(base) == {p for p in params if "indexer" in p} != set()
    for p, v in base.items():
        np.testing.assert_array_equal(params[p], np.asarray(v.get_value()))
    assert all(np.abs(params[p]).max() > 0 for p in params if "wk" in p)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch = {
        "tokens": jnp.ones((B, T), jnp.int32) * 5,
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    }
    after, _ = ts.train_step()(state, batch)
    with pytest.raises(ConfigError, match="model.index_topk"):  # new indexers: full weights only
        cd.lora.rank, cd.model.dsa_stage = 4, "sparse"
        runner.resolve(Config.from_dict(cd))
    for p, v in nnx.to_flat_state(after["params"]):
        same = np.array_equal(np.asarray(v.get_value()), params[p])
        assert same != ("indexer" in p), p


def test_flops_count_the_keys_each_query_reads():
    """Sparse attention's FLOPs: query t reads min(index_topk, t + 1) keys (brute force), the
    indexer scores every visible key; the dense warm-up attends to all of them."""
    from moejax.model import stats

    T = 1000
    for k in (1, 64, 999, 4096):
        want = np.mean([min(k, t + 1) for t in range(T)]) if k < T else T / 2
        assert stats.keys_per_query(CFG.replace(index_topk=k), T) == pytest.approx(want)
    assert stats.keys_per_query(CFG.replace(index_topk=64, dsa_stage="warmup"), T) == T / 2
    sparse = stats.train_flops_per_token(CFG.replace(index_topk=64), T)
    dense = stats.train_flops_per_token(CFG.replace(index_topk=0), T)
    idx = stats.indexer_flops_per_token(CFG, T)
    assert idx == 2 * 3 * 9 * T / 2  # heads x (head dim + the weighted sum) x visible keys
    assert sparse < dense + CFG.num_layers * 3 * idx  # fewer attention FLOPs than dense


def test_lora_leaves_the_indexer_alone_and_falls_back_to_the_reference_form():
    """LoRA on attention adapts MLA's projections, never the indexer's (it learns from its own KL
    only); with an adapter on wkv_b, W_UK / W_UV are not plain weights: the reference form runs."""
    from moejax.config import LoRAConfig
    from moejax.finetune import lora

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply(model, LoRAConfig(rank=2, targets=("attn/",)), nnx.Rngs(1))
    names = [str(p) for p, _ in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))]
    assert names and not any("indexer" in n for n in names)
    assert not model.segments[0].attn._sparse_mqa()
    logits, aux = model(jnp.ones((1, 9), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all() and aux["indexer_kl"].shape == (CFG.num_layers,)


def test_weight_quantization_keeps_the_indexer_in_full_precision():
    """int8 weight-only quantization covers MLA and the experts, not the indexer's own small
    projections (their layouts differ from the attention weights of the same names), MTP block
    included."""
    from moejax.infer.quantize import QuantizedParam, quantize

    model = Transformer(CFG.replace(mtp_depth=1), rngs=nnx.Rngs(0))
    q = quantize(model, "int8")
    quantized = [str(p) for p, _ in nnx.to_flat_state(nnx.state(q, QuantizedParam))]
    assert quantized and not any("indexer" in p for p in quantized)
    ids = jnp.ones((1, 9), jnp.int32)
    assert np.isfinite(np.asarray(q(ids, return_mtp=True)[1]["mtp_logits"])).all()
