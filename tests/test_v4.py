"""DeepSeek-V4 (moejax.model.v4): windows aligned to documents, packed rows equal to rows alone,
the indexer trained only by its KL loss, hash and sqrt-softplus routing, config refusals, presets
and training. Logit and greedy-generation parity with transformers' deepseek_v4 is in
test_hf_parity.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, ModelConfig, RouterConfig
from moejax.convert.hf_config import UnsupportedConfig, from_hf_config, to_hf_config
from moejax.model import Transformer, v4
from moejax.model.router import HashTable

CSA, HCA, SW = (
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "sliding_attention",
)
CFG = ModelConfig(
    attention_type="v4",
    vocab_size=64,
    hidden_size=32,
    num_layers=5,
    num_heads=4,
    head_dim=16,
    qk_rope_head_dim=8,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=8,
    layer_types=(SW, CSA, HCA, CSA, HCA),  # segments: [SW], [CSA, HCA] x 2
    compress_rate_csa=2,
    compress_rate_hca=4,
    sliding_window=4,
    index_topk=2,
    index_n_heads=4,
    index_head_dim=16,
    num_hash_layers=1,
    hc_mult=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    first_k_dense_replace=0,
    swiglu_limit=10.0,
    router=RouterConfig(score_func="sqrtsoftplus", routed_scaling_factor=1.5),
)


@nnx.jit
def _apply(model, ids, positions, segment_ids):
    return model(ids, positions, segment_ids)


def test_windows_follow_documents():
    """A window starts at a multiple of m in its document's positions and holds m tokens of it; a
    window that does not fit makes no entry; CSA's previous window must be the same document's."""
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0]])
    seg = jnp.asarray([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    w = v4.windows(pos, seg, 2)
    n = int(w.ok.sum())
    assert np.asarray(w.start)[0, :n].tolist() == [0, 2, 4, 6, 8]
    assert np.asarray(w.pos)[0, :n].tolist() == [0, 2, 4, 0, 2]
    assert np.asarray(w.seg)[0, :n].tolist() == [1, 1, 1, 2, 2]
    assert np.asarray(w.prev_ok)[0, :n].tolist() == [False, True, True, False, True]
    vis = np.asarray(v4.visible(w, pos, seg, 2))[0]
    # position 3 of document 1 sees windows [0, 2) and [2, 4); document 2's position 1 sees its
    # first window only; padding sees nothing
    assert vis[3, :n].tolist() == [True, True, False, False, False]
    assert vis[7, :n].tolist() == [False, False, False, True, False]
    assert not vis[11].any()


def test_packed_documents_compute_what_they_compute_alone():
    """Two documents packed in one row (positions restarting, segment ids) give each document's
    logits alone: windows, entries, sliding window, indexer and hash routing all stay inside it."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 64, 13), rng.integers(0, 64, 9)
    ids = np.concatenate([a, b, [0, 0]])[None]
    pos = np.concatenate([np.arange(13), np.arange(9), [0, 0]])[None]
    seg = np.concatenate([np.ones(13), 2 * np.ones(9), [0, 0]]).astype(np.int32)[None]
    packed, _ = _apply(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
    for doc, lo in ((a, 0), (b, 13)):
        n = len(doc)
        alone, _ = _apply(
            model,
            jnp.asarray(doc[None]),
            jnp.arange(n)[None],
            jnp.ones((1, n), jnp.int32),
        )
        np.testing.assert_allclose(
            np.asarray(packed)[0, lo : lo + n], np.asarray(alone)[0], atol=2e-5, rtol=0
        )


def test_blocked_attention_equals_the_reference():
    """The training form (query blocks of 4 under a scan, each reading its window rows and its
    gathered top-k entries) against the reference form ([T, T + W] scores): logits, indexer KL and
    every gradient, on packed rows with padding."""
    from moejax.config import ExecutionConfig

    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, 64, (2, 24)))
    pos = jnp.asarray(
        np.stack([np.r_[np.arange(15), np.arange(9)], np.r_[np.arange(20), 0, 0, 0, 0]])
    )
    seg = jnp.asarray(
        np.stack([np.r_[np.ones(15), 2 * np.ones(9)], np.r_[np.ones(20), np.zeros(4)]]), jnp.int32
    )
    results = []
    # blocks of 5 (the last padded) and of 3 (narrower than the sliding window of 4)
    for ex in (
        ExecutionConfig(attention_impl="reference"),
        ExecutionConfig(attention_block=5),
        ExecutionConfig(attention_block=3),
    ):
        model = Transformer(CFG, rngs=nnx.Rngs(5), execution=ex)

        def loss(m):
            logits, aux = m(ids, pos, seg)
            real = (seg > 0)[..., None]
            return jnp.sum(jnp.where(real, logits, 0) ** 2) * 1e-3 + aux["indexer_kl"].sum(), (
                logits,
                aux["indexer_kl"],
            )

        (_, (logits, kl)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        results.append((logits, kl, nnx.state(grads, nnx.Param)))
    (l0, k0, g0) = results[0]
    real = np.asarray(seg > 0)
    assert float(np.asarray(k0).min()) > 0
    for l1, k1, g1 in results[1:]:
        np.testing.assert_allclose(np.asarray(l1)[real], np.asarray(l0)[real], atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(k1), np.asarray(k0), rtol=1e-4, atol=1e-6)
        for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
            np.testing.assert_allclose(
                np.asarray(b.get_value()),
                np.asarray(a.get_value()),
                atol=2e-5,
                rtol=1e-3,
                err_msg=str(path),
            )


def test_indexer_learns_only_from_its_kl():
    """The indexer gets gradient only from its KL loss (its top-k has none), and the KL reaches
    nothing else: its inputs and target are detached."""
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)))

    def ce(m):
        logits, _ = m(ids)
        return jax.nn.logsumexp(logits, -1).mean() - logits[..., 3].mean()

    def kl(m):
        return m(ids)[1]["indexer_kl"].sum()

    g_ce = nnx.state(nnx.grad(ce)(model), nnx.Param)
    g_kl = dict(nnx.to_flat_state(nnx.state(nnx.grad(kl)(model), nnx.Param)))
    seen = 0
    for path, leaf in nnx.to_flat_state(g_ce):
        ce_norm = float(jnp.abs(leaf.get_value()).max())
        kl_norm = float(jnp.abs(g_kl[path].get_value()).max())
        if "indexer" in path:
            seen += 1
            assert ce_norm == 0, path
            assert kl_norm > 0, path
        else:
            assert kl_norm == 0, path
    assert seen


def test_hash_and_sqrtsoftplus_routing():
    """Hash layers take their experts from the frozen table (distinct per id), weighted by the
    normalized sqrt(softplus) scores; learned layers pick the top-k of those scores plus the
    bias, weighted by the unbiased scores."""
    from moejax.model import router as router_lib

    model = Transformer(CFG, rngs=nnx.Rngs(2))
    assert isinstance(model.segments[0].blocks[0].ffn.router, router_lib.HashRouter)  # layer 0
    assert not isinstance(model.segments[1].blocks[0].ffn.router, router_lib.HashRouter)
    sub = router_lib.HashRouter(CFG, rngs=nnx.Rngs(3))
    table = np.asarray(sub.table[...])
    assert table.shape == (64, 2) and (table[:, 0] != table[:, 1]).all()
    assert isinstance(sub.table, HashTable)
    x = jax.random.normal(jax.random.key(0), (5, 32))
    ids = jnp.asarray([3, 7, 7, 0, 63])
    got = sub(x, None, ids)
    np.testing.assert_array_equal(np.asarray(got.expert_ids), table[np.asarray(ids)])
    scores = np.sqrt(np.log1p(np.exp(np.asarray(x @ sub.w[...]))))
    w = np.take_along_axis(scores, table[np.asarray(ids)], 1)
    np.testing.assert_allclose(
        np.asarray(got.weights), 1.5 * w / w.sum(1, keepdims=True), rtol=1e-5
    )
    bias = np.asarray([0.0, 0.0, 5.0, 0.0], np.float32)  # expert 2 always picked, not weighted
    routed = router_lib.route(jnp.asarray(x @ sub.w[...]), jnp.asarray(bias), CFG)
    for row, s_row in zip(np.asarray(routed.expert_ids), scores):
        assert set(map(int, row)) == set(np.argsort(-(s_row + bias))[:2]) and 2 in row
    w = np.take_along_axis(scores, np.asarray(routed.expert_ids), 1)
    np.testing.assert_allclose(
        np.asarray(routed.weights), 1.5 * w / w.sum(1, keepdims=True), rtol=1e-5
    )


def test_swiglu_limit_clamps():
    from moejax.model.layers import swiglu

    gu = jnp.asarray([[[20.0, -3.0], [30.0, -40.0]]])  # [1, 2 (gate, up), 2]
    got = np.asarray(swiglu(gu, 10.0))
    want = np.asarray(jax.nn.silu(jnp.asarray([10.0, -3.0])) * jnp.asarray([10.0, -10.0]))
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="model.layer_types"):
        CFG.replace(layer_types=(SW, CSA, "global_attention", CSA, HCA))
    with pytest.raises(ConfigError, match="model.o_groups"):
        CFG.replace(o_groups=3)
    with pytest.raises(ConfigError, match="model.mtp_depth"):
        CFG.replace(mtp_depth=1)
    with pytest.raises(ConfigError, match="model.first_k_dense_replace"):
        CFG.replace(first_k_dense_replace=1)
    with pytest.raises(ConfigError, match="model.num_hash_layers"):
        ModelConfig(num_hash_layers=1)  # a V4 setting on an MLA model
    with pytest.raises(ConfigError, match="model.router.score_func"):
        RouterConfig(score_func="tanhsoftplus")


def _hf_dict(**changes):
    d = to_hf_config(CFG)
    d.update(changes)
    return json.loads(json.dumps(d))


def test_hf_config_round_trip_and_refusals():
    """config.json both ways (transformers' nested rope and legacy keys), and a config.json moejax
    cannot honour refused with the list of every problem, before any weight is read."""
    assert v4.groups(CFG) == [(((SW, True),), 1), (((CSA, False), (HCA, False)), 2)]
    assert from_hf_config(_hf_dict()) == CFG.with_router(
        bias_update_rate=CFG.router.bias_update_rate
    ).replace(intermediate_size=CFG.moe_intermediate_size, max_position_embeddings=4096)
    # legacy keys: ratios 0 / 4 / 128 name the layer types, the rates come from their own keys
    legacy = _hf_dict(compress_ratios=[0, 4, 128, 4, 128, 0], num_hash_layers=1)
    for k in ("layer_types", "mlp_layer_types", "compress_rates"):
        legacy.pop(k)
    legacy.update(compress_rate_csa=2, compress_rate_hca=4)
    assert from_hf_config(legacy) == from_hf_config(_hf_dict())
    legacy["compress_ratios"] = [0, 2, 4, 2, 4]
    with pytest.raises(UnsupportedConfig, match="compress_ratios"):
        from_hf_config(legacy)
    # what transformers computes differently from moejax is refused, not silently changed
    nested = _hf_dict()
    nested["rope_parameters"]["compress"].update(rope_type="yarn", factor=4.0)
    nested["rope_parameters"]["compress"]["original_max_position_embeddings"] = 64
    with pytest.raises(UnsupportedConfig, match="attention_factor"):
        from_hf_config(nested)  # (nested YaRN without it: transformers applies 0.1 ln(4) + 1)
    nested["rope_parameters"]["compress"]["attention_factor"] = 1.0
    assert from_hf_config(nested).rope_type == "yarn"
    nested["rope_parameters"]["main"]["partial_rotary_factor"] = 1.0
    with pytest.raises(UnsupportedConfig, match="main.partial_rotary_factor"):
        from_hf_config(nested)
    for bad, match in (
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(swiglu_limit=0.0), "swiglu_limit"),
        (dict(scoring_func="softmax"), "scoring_func"),
    ):
        with pytest.raises(UnsupportedConfig, match=match):
            from_hf_config(_hf_dict(**bad))
    with pytest.raises(UnsupportedConfig, match="swiglu_limit"):
        to_hf_config(CFG.replace(swiglu_limit=0.0))  # (transformers would zero every expert)
    with pytest.raises(UnsupportedConfig, match="sqrtsoftplus"):
        from_hf_config({**to_hf_config(ModelConfig()), "scoring_func": "sqrtsoftplus"})
    with pytest.raises(UnsupportedConfig) as e:
        from_hf_config(
            _hf_dict(
                layer_types=[SW, CSA, "linear_attention", CSA, HCA],
                scoring_func="tanhsoftplus",
                compress_rates={CSA: 0, HCA: 4},
            )
        )
    for bad in ("linear_attention", "tanhsoftplus", "compress_rates"):
        assert bad in str(e.value)
    with pytest.raises(UnsupportedConfig, match="mlp_layer_types"):
        from_hf_config(_hf_dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe", "moe"]))


def test_flash_preset_shape():
    """V4-Flash's layer schedule: 2 sliding, then CSA / HCA alternating; 3 hash layers."""
    from moejax.experiment import load_config_file, resolve
    from tests.helpers import ROOT

    cfg = resolve(load_config_file(f"{ROOT}/experiments/deepseek_v4_flash.py")).model
    assert cfg.v4_layer_types[:4] == (SW, SW, CSA, HCA) and cfg.v4_layer_types[-1] == CSA
    assert v4.groups(cfg) == [
        (((SW, True),), 2),
        (((CSA, True),), 1),
        (((HCA, False), (CSA, False)), 20),
    ]


@pytest.mark.slow
def test_tiny_v4_trains():
    """experiments/deepseek_v4_tiny.py's model under the trainer's step: the loss falls on a
    learnable stream and the indexer KL is part of the metrics."""
    from moejax.experiment import load_config_file, resolve
    from moejax.trainer import setup
    from tests.helpers import ROOT

    cfg = resolve(load_config_file(f"{ROOT}/experiments/deepseek_v4_tiny.py"))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, seq_len=64),
        train=dataclasses.replace(cfg.train, batch_size=4),
        optim=dataclasses.replace(cfg.optim, warmup_steps=2, lr=3e-3),
    )
    ts = setup.build(cfg)
    step, state = ts.train_step(), ts.init_state()
    rng = np.random.default_rng(0)
    # a learnable stream: each row repeats a short random pattern
    pattern = rng.integers(4, 200, (4, 8))
    tokens = jnp.asarray(np.tile(pattern, (1, 8)), jnp.int32)
    batch = {
        "tokens": tokens,
        "segment_ids": jnp.ones((4, 64), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (4, 64)),
    }
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce_loss"]))
        assert np.isfinite(float(metrics["indexer_kl"]))
    assert losses[-1] < 0.7 * losses[0], losses
