"""Train-step units: schedules, weight-decay mask, packing, loader state, microbatching, skips."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import Config, ConfigError, OptimConfig
from moejax.data.packing import decode_row, encode_row, pack
from moejax.model import Transformer
from moejax.trainer.optim import decay_mask, make_optimizer, schedule
from moejax.trainer.step import init_state, make_train_step, shifted_targets

from .helpers import tiny_config


def test_schedules():
    cos = schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0 and float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1)
    wsd = schedule(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert float(wsd(50)) == 1.0 and float(wsd(79)) == 1.0 and float(wsd(90)) == pytest.approx(0.5)
    assert float(wsd(100)) == pytest.approx(0.0)
    const = schedule(OptimConfig(lr=2.0, schedule="constant", warmup_steps=4), 100)
    assert float(const(2)) == 1.0 and float(const(60)) == 2.0


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^optim.schedule: got 'linear', allowed"):
        Config.from_dict({"optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"^train.microbatches: must divide"):
        Config.from_dict({"train": {"batch_size": 6, "microbatches": 4}})
    with pytest.raises(ConfigError, match=r"^train.steps: expected int, got str"):
        Config.from_dict({"train": {"steps": "ten"}})


def test_decay_mask_excludes_norms_and_embeddings():
    cfg = tiny_config().model
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(decay_mask(params, OptimConfig()))}
    assert flat["embed"] is False and flat["lm_head"] is False
    assert flat["norm/weight"] is False and flat["segments/0/attn_norm/weight"] is False
    assert flat["segments/0/attn/wkv_b"] is True and flat["segments/1/ffn/w_gate_up"] is True
    flat2 = {"/".join(map(str, p)): v.get_value() for p, v in
             nnx.to_flat_state(decay_mask(params, OptimConfig(decay_norms=True, decay_embeddings=True)))}
    assert flat2["embed"] is True and flat2["norm/weight"] is True


def test_pack_segments_positions_and_row_codec():
    rows = list(pack([[10, 11, 12], [20] * 9, [30]], seq_len=8, bos_id=2, eos_id=3))
    # doc1: 2 10 11 12 3 | doc2: 2 20 20, spilling over the whole next row | doc3 in a third, padded row
    assert rows[0][0].tolist() == [2, 10, 11, 12, 3, 2, 20, 20]
    assert rows[0][1].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rows[0][2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1][1].tolist() == [1] * 8 and rows[1][2].tolist() == list(range(8))
    assert rows[2][0].tolist() == [2, 30, 3, 0, 0, 0, 0, 0] and rows[2][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    back = decode_row(encode_row(rows[2]), 8)
    np.testing.assert_array_equal(back["segment_ids"], rows[2][1])


def test_shifted_targets_stop_at_document_boundaries():
    batch = {"tokens": jnp.array([[5, 6, 7, 8, 9, 0]]), "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
    labels, valid = shifted_targets(batch, 1)
    assert labels.tolist() == [[6, 7, 8, 9, 0, 0]]
    assert valid.tolist() == [[True, True, False, True, False, False]]
    labels, valid = shifted_targets(batch, 2)  # MTP depth 1 target
    assert valid.tolist() == [[True, False, False, False, False, False]]


def _batch(cfg, seed=0):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(4, cfg.model.vocab_size, (B, T)), jnp.int32),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def _setup(cfg):
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    tx, sched = make_optimizer(cfg.optim, params, cfg.train.steps)
    graphdef, rest, state = init_state(cfg, tx)
    return make_train_step(graphdef, rest, tx, sched, cfg), state


def test_microbatching_matches_full_batch():
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(mtp_depth=0, seq_aux_loss_coef=0.0))
    step1, s1 = _setup(cfg)
    step2, s2 = _setup(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=2)))
    batch = _batch(cfg)
    s1, m1 = step1(s1, batch)
    s2, m2 = step2(s2, batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(a, b, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1["router"]), jax.tree.leaves(s2["router"])):
        np.testing.assert_array_equal(a, b)  # the bias update sees the whole batch's counts


def test_nonfinite_step_is_skipped_and_counted():
    cfg = tiny_config()
    step, state = _setup(cfg)
    state, m = step(state, _batch(cfg))
    assert int(m["skipped"]) == 0 and int(state["nonfinite"]) == 0
    bad = jax.tree.map(lambda x: x, state)
    emb = bad["params"]["embed"]
    emb.set_value(emb.get_value().at[5].set(jnp.inf))  # token 5 now gives an infinite loss
    before = jax.tree.map(np.asarray, bad)
    batch = _batch(cfg)
    batch["tokens"] = batch["tokens"].at[0, 0].set(5)
    after, m = step(bad, batch)
    assert int(m["skipped"]) == 1 and int(after["nonfinite"]) == 1 and int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
