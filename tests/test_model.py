"""Transformer-level checks: config errors, presets, scan/remat equivalence, packing, MTP."""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import (
    Config,
    ConfigError,
    ExecutionConfig,
    ModelConfig,
    RouterConfig,
    upgrade_saved,
)
from moejax.experiment import load_config_file, resolve
from moejax.model import Transformer
from moejax.model.stats import param_counts
from tests.helpers import ROOT, TINY_MLA

TINY = TINY_MLA.replace(num_layers=3).with_router(seq_aux_loss_coef=1e-3)


@pytest.mark.parametrize(
    "section,values,field",
    [
        ("model", dict(router=dict(n_group=2, topk_group=3)), "model.router.topk_group"),
        ("model", dict(num_experts_per_tok=9), "model.num_experts_per_tok"),
        ("model", dict(router=dict(score_func="relu")), "model.router.score_func"),
        ("execution", dict(moe_impl="fast"), "execution.moe_impl"),
        ("model", dict(router=dict(n_group=3)), "model.router.n_group"),
        ("model", dict(router=dict(typo=3)), "model.router.typo: unknown key"),
        ("model", dict(attention_type="gqa", num_heads=4, num_kv_heads=3), "model.num_kv_heads"),
        # a key that left the model section says where it went
        ("model", dict(n_group=2), "model.n_group: moved to model.router.n_group"),
        ("model", dict(remat_policy="full"), "model.remat_policy: moved to execution.remat_policy"),
    ],
)
def test_config_errors_name_the_field(section, values, field):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({section: values})
    msg = str(e.value)
    assert msg.startswith(field) and "\n" not in msg


def test_a_moved_key_on_the_command_line_names_its_new_place():
    from moejax.experiment import check_override_keys

    path = os.path.join(ROOT, "experiments", "moe.py")
    got = check_override_keys(["--config", path, "--config.model.remat_policy=full"])
    assert got == "--config.model.remat_policy: moved to --config.execution.remat_policy"
    got = check_override_keys(["--config", path, "--config.model.n_group=2"])
    assert got == "--config.model.n_group: moved to --config.model.router.n_group"
    assert check_override_keys(["--config", path, "--config.model.router.n_group=2"]) is None


def test_configs_saved_before_the_router_and_execution_sections_still_load():
    """A checkpoint's config written with the flat model section reads as today's layout."""
    flat = {k: v for k, v in TINY.to_dict().items() if k != "router"}
    flat.update(n_group=2, topk_group=1, router_jitter=0.1, seq_aux_loss_coef=1e-3)
    flat.update(moe_impl="capacity", remat_policy="full")
    cfg = Config.from_dict(upgrade_saved({"model": flat}))
    assert cfg.model == TINY.with_router(jitter=0.1)
    assert (cfg.execution.moe_impl, cfg.execution.remat_policy) == ("capacity", "full")
    assert ModelConfig.from_dict(upgrade_saved(flat)) == cfg.model  # a config.json: model alone


def test_config_is_hashable_and_round_trips():
    assert hash(TINY) == hash(ModelConfig.from_dict(TINY.to_dict()))


PUBLISHED = {  # (total, activated) in billions, from the model cards / papers
    "deepseek_v3": (671, 37),
    "deepseek_v32": (671.9, 37),  # V3 + 61 lightning indexers (14M each); the card's 685B adds MTP
    "deepseek_v4_flash": (284, 13),  # (the 13B activated leaves out the embeddings)
    "deepseek_v2": (236, 21),
    "deepseek_v2_lite": (15.7, 2.4),
    "mixtral_8x7b": (46.7, 12.9),
    "qwen3_moe_30b_a3b": (30.5, 3.3),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_full_size_preset_parameter_counts(preset):
    cfg = resolve(load_config_file(os.path.join(ROOT, "experiments", preset + ".py"))).model
    c = param_counts(cfg)  # abstract: nothing allocated
    total, active = PUBLISHED[preset]
    assert c.total / 1e9 == pytest.approx(total, rel=0.01)
    # Activated figures are rounded and differ on whether the input embedding counts.
    assert active * 0.97 <= c.activated / 1e9 <= active * 1.12


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))))
def test_every_experiment_resolves(path):
    if os.path.basename(path) == "eval.py":  # the evaluation command's own config
        from moejax.eval.run import EvalConfig

        EvalConfig.from_dict(load_config_file(path))
        return
    resolve(load_config_file(path))


@nnx.jit(static_argnames=("return_mtp",))
def apply(model, ids, positions=None, segment_ids=None, return_mtp=False):
    return model(ids, positions, segment_ids, return_mtp=return_mtp)


def _logits(cfg, ids, **kw):
    return apply(Transformer(cfg, rngs=nnx.Rngs(0)), ids, **kw)


def _loss_and_grads(cfg, ids, execution=None):
    model = Transformer(
        cfg, rngs=nnx.Rngs(0), execution=execution
    )  # same seed: same parameters for every variant
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params):
        logits, aux = nnx.merge(graphdef, params, rest)(ids, return_mtp=True)
        return jnp.mean(logits**2) + jnp.mean(aux["mtp_logits"] ** 2) + aux["aux_loss"]

    return jax.value_and_grad(f)(params)


def test_scan_unrolled_and_remat_agree():
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, TINY.vocab_size)
    ref_val, ref_grad = _loss_and_grads(TINY, ids)
    for over in (dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")):
        val, grad = _loss_and_grads(TINY, ids, ExecutionConfig(**over))
        assert float(val) == pytest.approx(float(ref_val), rel=1e-6), over
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_packed_documents_do_not_attend_across(attention_type):
    cfg = TINY.replace(attention_type=attention_type, num_kv_heads=1, mtp_depth=0)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.key(1), (1, 5), 1, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(2), (1, 7), 1, cfg.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    got, _ = apply(model, packed, pos, seg)
    alone_b, _ = apply(model, b)
    alone_a, _ = apply(model, a)
    np.testing.assert_allclose(got[:, 5:], alone_b, atol=1e-5)
    np.testing.assert_allclose(got[:, :5], alone_a, atol=1e-5)


def test_mtp_outputs_and_router_bias_update():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, TINY.vocab_size)
    logits, aux = apply(model, ids, return_mtp=True)
    assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
    assert aux["mtp_logits"].shape == (1, 2, 10, TINY.vocab_size)
    n_moe = TINY.layer_kinds().count("moe")
    assert aux["expert_counts"].shape == (n_moe + 1, 4)  # + the MTP block
    np.testing.assert_allclose(aux["expert_counts"].sum(-1), 2 * 10 * 2)
    before = np.asarray(model.segments[1].ffn.router.bias[...])
    model.update_router_biases(aux["expert_counts"])
    after = np.asarray(model.segments[1].ffn.router.bias[...])
    counts = np.asarray(aux["expert_counts"][:n_moe])
    np.testing.assert_allclose(
        after - before,
        TINY.router.bias_update_rate * np.sign(counts.mean(-1, keepdims=True) - counts),
    )
    assert not np.allclose(np.asarray(model.mtp[0].block.ffn.router.bias[...]), 0)


def test_bfloat16_compute_close_to_float32():
    cfg = TINY.replace(mtp_depth=0)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    f32, _ = _logits(cfg, ids)
    bf16, _ = _logits(cfg.replace(compute_dtype="bfloat16"), ids)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05


def test_tied_embeddings_use_the_embedding_as_head():
    cfg = TINY.replace(tie_word_embeddings=True, mtp_depth=0)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    logits, aux = model(jnp.array([[1, 2, 3]]), return_hidden=True)
    np.testing.assert_allclose(logits, aux["hidden"] @ model.embed[...].T, atol=1e-5)


def test_router_jitter_only_with_an_rng():
    cfg = ModelConfig(
        hidden_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        router=RouterConfig(n_group=1, topk_group=1, jitter=0.5),
    )
    from moejax.model.moe import MoE

    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16))
    y0, a0 = layer(x)
    y1, a1 = layer(x)
    np.testing.assert_array_equal(y0, y1)  # deterministic without an rng
    y2, a2 = layer(x, rng=jax.random.key(1))
    assert not np.allclose(y0, y2)  # jitter changes routing weights/choices in training
