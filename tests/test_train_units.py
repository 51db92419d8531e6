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
from moejax.trainer import setup
from moejax.trainer.optim import decay_mask, schedule
from moejax.trainer.step import shifted_targets

from .helpers import tiny_config


def test_schedules():
    cos = schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
    assert (
        float(cos(0)) == 0
        and float(cos(10)) == pytest.approx(1.0)
        and float(cos(100)) == pytest.approx(0.1)
    )
    wsd = schedule(
        OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0),
        100,
    )
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
    with pytest.raises(ConfigError, match=r"^eval.tasks: unknown 'arc_esy'; known: mmlu, "):
        Config.from_dict({"eval": {"tasks": "arc_esy"}})
    with pytest.raises(ConfigError, match=r"^eval.data: expected task=location pairs, got 'x'"):
        Config.from_dict({"eval": {"tasks": "arc_easy", "data": "x"}})
    with pytest.raises(ConfigError, match=r"^eval.data.gsm8kk: not a task"):
        Config.from_dict({"eval": {"tasks": "arc_easy", "data": "gsm8kk=/a,arc_easy=/b"}})


def test_decay_mask_excludes_norms_and_embeddings():
    cfg = tiny_config().model
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    flat = {
        "/".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(decay_mask(params, OptimConfig()))
    }
    assert flat["embed"] is False and flat["lm_head"] is False
    assert flat["norm/weight"] is False and flat["segments/0/attn_norm/weight"] is False
    assert flat["segments/0/attn/wkv_b"] is True and flat["segments/1/ffn/w_gate_up"] is True
    flat2 = {
        "/".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(
            decay_mask(params, OptimConfig(decay_norms=True, decay_embeddings=True))
        )
    }
    assert flat2["embed"] is True and flat2["norm/weight"] is True


def test_pack_segments_positions_and_row_codec():
    rows = list(pack([[10, 11, 12], [20] * 9, [30]], seq_len=8, bos_id=2, eos_id=3))
    # doc1: 2 10 11 12 3 | doc2: 2 20 20, spilling over the whole next row | doc3 in a third, padded
    # row
    assert rows[0][0].tolist() == [2, 10, 11, 12, 3, 2, 20, 20]
    assert rows[0][1].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rows[0][2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1][1].tolist() == [1] * 8 and rows[1][2].tolist() == list(range(8))
    assert rows[2][0].tolist() == [2, 30, 3, 0, 0, 0, 0, 0] and rows[2][1].tolist() == [
        1,
        1,
        1,
        0,
        0,
        0,
        0,
        0,
    ]
    back = decode_row(encode_row(rows[2]), 8)
    np.testing.assert_array_equal(back["segment_ids"], rows[2][1])


def test_shifted_targets_stop_at_document_boundaries():
    batch = {
        "tokens": jnp.array([[5, 6, 7, 8, 9, 0]]),
        "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]]),
    }
    labels, valid = shifted_targets(batch, 1)
    assert labels.tolist() == [[6, 7, 8, 9, 0, 0]]
    assert valid.tolist() == [[True, True, False, True, False, False]]
    labels, valid = shifted_targets(batch, 2)  # MTP depth 1 target
    assert valid.tolist() == [[True, False, False, False, False, False]]


def _batch(cfg, seed=0):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    return {
        "tokens": jnp.asarray(rng.integers(4, cfg.model.vocab_size, (B, T)), jnp.int32),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    }


def _packed_batch(cfg, seed=0):
    """Packed rows with uneven valid-token counts: 1-4 documents of random lengths, then padding
    that fills from 0 to 90% of the row (one row is nearly all padding)."""
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        used = T - int(T * (0.9 if b == 1 else rng.uniform(0, 0.6)))
        cuts = (
            np.sort(rng.choice(np.arange(2, used), rng.integers(0, 4), replace=False))
            if used > 4
            else []
        )
        for d, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            seg[b, lo:hi], pos[b, lo:hi] = d, np.arange(hi - lo)
    tokens = np.where(seg > 0, rng.integers(4, cfg.model.vocab_size, (B, T)), 0).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
    }


def _setup(cfg):
    ts = setup.build(cfg)
    return ts.train_step(), ts.init_state()


def test_losses_do_not_depend_on_the_microbatch_split():
    """Token-weighted losses: 1 and 4 microbatches of a packed batch with uneven valid counts
    give the same loss, metrics and update (CE, MTP, the sequence-wise balance loss, both
    z-losses). (2 microbatches run the same scan as 4: left out for CI time.)"""
    base = tiny_config()
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, batch_size=8, logit_z_loss=1e-3),
        model=base.model.replace(mtp_depth=2).with_router(seq_aux_loss_coef=0.01, z_loss_coef=1e-3),
    )
    batch = _packed_batch(cfg)
    valid = np.asarray(shifted_targets(batch, 1)[1]).sum(1)
    assert valid.max() > 3 * valid.min()  # uneven on purpose
    results = {}
    for n in (1, 4):
        step, state = _setup(
            dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=n))
        )
        results[n] = step(state, batch)
    s1, m1 = results[1]
    for n in (4,):
        s, m = results[n]
        for k in ("loss", "ce_loss", "mtp_loss", "aux_loss", "logit_z_loss", "tokens", "grad_norm"):
            assert float(m[k]) == pytest.approx(float(m1[k]), rel=2e-5), (n, k)
        for a, b in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(s1["params"])):
            np.testing.assert_allclose(a, b, atol=2e-6, err_msg=f"microbatches={n}")
        for a, b in zip(jax.tree.leaves(s["router"]), jax.tree.leaves(s1["router"])):
            np.testing.assert_array_equal(a, b)  # the bias update sees the whole batch's counts
        np.testing.assert_allclose(m["moe/drop_fraction"], m1["moe/drop_fraction"])


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_nonfinite_step_is_skipped_and_counted(platform, monkeypatch):
    """On CPU a conditional skips the update; accelerators select (run here on CPU, as they would
    trace it)."""
    import moejax.trainer.step as step_module

    monkeypatch.setattr(step_module, "platform", lambda: platform)
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
    assert (
        int(m["skipped"]) == 1
        and int(after["nonfinite"]) == 1
        and int(after["step"]) == int(before["step"]) + 1
    )
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["router"]), jax.tree.leaves(before["router"])):
        np.testing.assert_array_equal(a, b)  # nor do the aux-loss-free biases move


def test_logged_learning_rate_is_the_applied_one_after_a_skip():
    """A skipped step does not advance the optimizer's schedule; the logged lr follows the optimizer
    (here in warmup, where state['step'] and the optimizer's count give different rates)."""
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=10))
    step, state = _setup(cfg)
    ref_step, ref = _setup(cfg)
    good = _batch(cfg)
    state, m0 = step(state, good)
    ref, r0 = ref_step(ref, good)
    # a skipped step: an infinite embedding row hit by the batch, then the finite row put back
    row = np.asarray(state["params"]["embed"].get_value()[5])
    state["params"]["embed"].set_value(state["params"]["embed"].get_value().at[5].set(jnp.inf))
    bad = dict(good, tokens=good["tokens"].at[0, 0].set(5))
    state, m1 = step(state, bad)
    assert int(m1["skipped"]) == 1
    state["params"]["embed"].set_value(state["params"]["embed"].get_value().at[5].set(row))
    state, m2 = step(state, _batch(cfg, seed=1))
    ref, r1 = ref_step(ref, _batch(cfg, seed=1))
    ts = setup.build(cfg)
    assert float(m0["lr"]) == pytest.approx(float(ts.sched(0)))
    assert float(m2["lr"]) == pytest.approx(float(ts.sched(1)))  # the optimizer's second update ...
    assert float(m2["lr"]) != pytest.approx(
        float(ts.sched(int(state["step"]) - 1))
    )  # ... not step 2's rate
    assert float(m2["lr"]) == pytest.approx(float(r1["lr"]))
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)  # and it is the rate that was applied


def test_state_around_a_loaded_base_keeps_its_weights_and_router_biases(tmp_path):
    """setup.init_state(params, router) from a Hugging Face base: the weights and the aux-loss-free
    biases (DeepSeek-V3's e_score_correction_bias) are the loaded ones, the optimizer starts fresh,
    and it trains."""
    from moejax.convert import from_hf, to_hf
    from moejax.trainer.step import split_model

    base = tiny_config()
    model = Transformer(base.model, rngs=nnx.Rngs(3))
    bias = model.segments[1].ffn.router.bias
    bias[...] = jax.random.normal(jax.random.key(4), bias[...].shape)
    to_hf(model, base.model, str(tmp_path / "hf"))
    loaded, mcfg = from_hf(str(tmp_path / "hf"))
    cfg = dataclasses.replace(base, model=mcfg)
    ts = setup.build(cfg)
    _, params, router, _ = split_model(loaded)
    want_params, want_router = jax.tree.map(np.asarray, (params, router))
    state = ts.init_state(params, router)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state["router"]), jax.tree.leaves(want_router)):
        np.testing.assert_array_equal(a, b)
    assert (
        np.abs(
            np.asarray(state["router"]["segments"][1]["ffn"]["router"]["bias"].get_value())
        ).max()
        > 0.1
    )
    assert int(state["step"]) == 0 and all(
        not np.asarray(x).any() for x in jax.tree.leaves(state["opt_state"])
    )
    state, m = ts.train_step()(state, _batch(cfg))
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    """A checkpoint written with the flat model section of before the router and execution sections
    resumes; a model field it lacks (added since) compares as its default; how the model executes
    may change on resume; a real change of the model is named."""
    import orbax.checkpoint as ocp

    from moejax.trainer.checkpoint import Checkpointer, IncompatibleCheckpoint

    cfg = tiny_config()
    old = cfg.to_dict()
    renamed = {"jitter": "router_jitter", "z_loss_coef": "router_z_loss_coef"}
    old["model"].update({renamed.get(k, k): v for k, v in old["model"].pop("router").items()})
    old["model"].update(old.pop("execution"))
    del old["model"]["capacity_scope"], old["model"]["router_z_loss_coef"]  # not yet fields
    ck = Checkpointer(str(tmp_path), cfg)
    ck.manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"x": np.zeros(2)}),
            data=ocp.args.JsonSave({}),
            config=ocp.args.JsonSave(old),
        ),
    )
    ck.close()
    Checkpointer(str(tmp_path), cfg).check_compatible(1)
    ex = cfg.execution.replace(remat_policy="full", capacity_scope="group", moe_impl="capacity")
    Checkpointer(str(tmp_path), dataclasses.replace(cfg, execution=ex)).check_compatible(1)
    changed = dataclasses.replace(cfg, model=cfg.model.with_router(z_loss_coef=1e-3))
    with pytest.raises(
        IncompatibleCheckpoint, match=r"model.router.z_loss_coef: checkpoint 0.0 vs config 0.001"
    ):
        Checkpointer(str(tmp_path), changed).check_compatible(1)
