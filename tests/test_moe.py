"""The three expert strategies agree; routing follows DeepSeek's rules; balance losses and bias."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ExecutionConfig, ModelConfig, RouterConfig
from moejax.model import moe as moe_lib
from moejax.model import router as router_lib

E, D, F, M, K = 6, 16, 8, 40, 2


def _weights(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (0.3 * jax.random.normal(k1, (E, D, 2, F)), 0.3 * jax.random.normal(k2, (E, F, D)))


def _routings():
    rng = np.random.default_rng(0)
    random_ids = np.stack([rng.choice(E, K, replace=False) for _ in range(M)])
    random_ids[random_ids == 4] = 5  # expert 4 gets nothing
    all_to_one = np.stack(
        [np.full(M, 2), rng.integers(3, E, M)], axis=1
    )  # every token uses expert 2
    yield "random_with_empty_expert", random_ids
    yield "all_tokens_to_one_expert", all_to_one


@pytest.mark.parametrize("name,ids", list(_routings()))
def test_strategies_agree_forward_and_grad(name, ids):
    wgu, wd = _weights()
    x = jax.random.normal(jax.random.key(1), (M, D))
    ids = jnp.asarray(ids, jnp.int32)
    w = jax.random.uniform(jax.random.key(2), (M, K), minval=0.1, maxval=1.0)
    mask = jnp.ones((M,))

    def run(impl, x, w, wgu, wd):
        if impl == "dense":
            return moe_lib.experts_dense(x, ids, w, wgu, wd, jnp.float32)
        if impl == "capacity":  # capacity for every assignment: nothing may drop
            y, drop = moe_lib.experts_capacity(x, ids, w, wgu, wd, jnp.float32, float(E), mask)
            assert float(drop) == 0.0
            return y
        if impl == "gather":
            return moe_lib.experts_gather(x, ids, w, wgu, wd, jnp.float32)
        return moe_lib.experts_dropless(x, ids, w, wgu, wd, jnp.float32)

    ref = run("dense", x, w, wgu, wd)
    ref_grads = jax.grad(lambda *a: jnp.sum(jnp.sin(run("dense", *a))), argnums=(0, 1, 2, 3))(
        x, w, wgu, wd
    )
    for impl in ("capacity", "dropless", "gather"):
        np.testing.assert_allclose(
            run(impl, x, w, wgu, wd), ref, atol=1e-5, rtol=1e-5, err_msg=impl
        )
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(run(impl, *a))), argnums=(0, 1, 2, 3))(  # noqa: B023 - called at once
            x, w, wgu, wd
        )
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_capacity_drops_lowest_weight_first():
    wgu, wd = _weights()
    x = jax.random.normal(jax.random.key(1), (M, D))
    ids = jnp.zeros((M, 1), jnp.int32)  # all rows to expert 0
    w = jnp.asarray(np.random.default_rng(3).permutation(M) + 1.0)[:, None] / M
    cf = 10 / M * E  # capacity = 10 rows for expert 0
    y, drop = moe_lib.experts_capacity(x, ids, w, wgu, wd, jnp.float32, cf, jnp.ones((M,)))
    assert moe_lib.capacity(M, E, cf) == 10
    assert float(drop) == M - 10  # a count of real assignments
    full = moe_lib.experts_dense(x, ids, w, wgu, wd, jnp.float32)
    kept = np.argsort(-np.asarray(w[:, 0]))[:10]
    dropped = np.setdiff1d(np.arange(M), kept)
    np.testing.assert_allclose(y[kept], full[kept], atol=1e-5)
    np.testing.assert_allclose(y[dropped], 0.0, atol=0)


def test_capacity_never_dispatches_padding():
    wgu, wd = _weights()
    x = jax.random.normal(jax.random.key(1), (M, D))
    ids = jnp.zeros((M, 1), jnp.int32)
    w = jnp.linspace(1.0, 0.1, M)[:, None]  # padding rows get the highest weights
    mask = jnp.ones((M,)).at[:5].set(0)
    y, drop = moe_lib.experts_capacity(x, ids, w, wgu, wd, jnp.float32, 10 / M * E, mask)
    full = moe_lib.experts_dense(x, ids, w, wgu, wd, jnp.float32)
    np.testing.assert_allclose(y[:5], 0.0, atol=0)  # padding takes no slot ...
    np.testing.assert_allclose(y[5:15], full[5:15], atol=1e-5)  # ... the next 10 real rows do
    assert float(drop) == M - 5 - 10  # and is not counted as dropped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_keep_radix_select_matches_the_sort(seed):
    """moe_ep.capacity_keep (radix select, as the expert-parallel exchanges run it) keeps exactly
    the assignments experts_capacity's sort keeps: ties by position, padding never, experts under
    capacity whole."""
    from moejax.model import moe_ep

    rng = np.random.default_rng(seed)
    A, Ex = 500, 7
    ids = rng.integers(0, Ex, A)
    ids[ids == 6] = 5  # expert 6 empty
    tied = rng.choice(np.array([0.25, 0.5, 1e-8, 3.0, 0.125], np.float32), A)  # many exact ties ...
    w = np.where(
        rng.random(A) < 0.5, tied, rng.random(A).astype(np.float32)
    )  # ... among distinct weights
    valid = rng.random(A) > 0.1
    for cap in (1, 13, 60, 400):
        keep = np.asarray(
            moe_ep.capacity_keep(
                jnp.asarray(ids, jnp.int32), jnp.asarray(w), jnp.asarray(valid), Ex, cap
            )
        )
        want = np.zeros(A, bool)
        for e in range(Ex):
            rows = [a for a in range(A) if ids[a] == e and valid[a]]
            rows.sort(key=lambda a: (-w[a], a))
            want[rows[:cap]] = True
        np.testing.assert_array_equal(keep, want, err_msg=f"cap={cap}")


def _route_reference(scores, bias, cfg):
    """Literal per-row transcription of DeepSeek's selection rule."""
    Mr, Er = scores.shape
    out_ids, out_w = [], []
    for m in range(Mr):
        choice = scores[m] + (0 if bias is None else bias)
        per = Er // cfg.router.n_group
        groups = choice.reshape(cfg.router.n_group, per)
        gscore = groups.max(1) if bias is None else np.sort(groups, axis=1)[:, -2:].sum(1)
        keep = np.argsort(-gscore, kind="stable")[: cfg.router.topk_group]
        allowed = np.full(Er, -np.inf)
        for g in keep:
            allowed[g * per : (g + 1) * per] = choice[g * per : (g + 1) * per]
        ids = np.argsort(-allowed, kind="stable")[: cfg.num_experts_per_tok]
        w = scores[m, ids]
        if cfg.router.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        out_ids.append(ids)
        out_w.append(w * cfg.router.routed_scaling_factor)
    return np.array(out_ids), np.array(out_w)


@pytest.mark.parametrize(
    "score_func,use_bias,norm",
    itertools.product(["softmax", "sigmoid"], [False, True], [False, True]),
)
def test_group_limited_routing_matches_reference(score_func, use_bias, norm):
    cfg = ModelConfig(
        n_routed_experts=16,
        num_experts_per_tok=3,
        router=RouterConfig(
            n_group=4,
            topk_group=2,
            score_func=score_func,
            use_score_correction_bias=use_bias,
            norm_topk_prob=norm,
            routed_scaling_factor=2.5,
        ),
    )
    logits = jax.random.normal(jax.random.key(0), (64, 16))
    bias = 0.1 * jax.random.normal(jax.random.key(1), (16,)) if use_bias else None
    r = router_lib.route(logits, bias, cfg)
    ids, w = _route_reference(np.asarray(r.scores), None if bias is None else np.asarray(bias), cfg)
    np.testing.assert_array_equal(np.sort(np.asarray(r.expert_ids), 1), np.sort(ids, 1))
    np.testing.assert_allclose(np.sort(np.asarray(r.weights), 1), np.sort(w, 1), rtol=1e-6)
    # selected experts always lie in topk_group groups
    groups = np.asarray(r.expert_ids) // 4
    assert max(len(set(g)) for g in groups) <= 2


def test_bias_affects_selection_only():
    cfg = ModelConfig(
        n_routed_experts=8,
        num_experts_per_tok=2,
        router=RouterConfig(score_func="sigmoid", norm_topk_prob=False),
    )
    logits = jax.random.normal(jax.random.key(0), (32, 8))
    bias = jnp.zeros(8).at[5].set(10.0)  # expert 5 always chosen, weight stays sigmoid(logit)
    r = router_lib.route(logits, bias, cfg)
    assert np.all(np.any(np.asarray(r.expert_ids) == 5, axis=1))
    sel = np.asarray(r.expert_ids) == 5
    np.testing.assert_allclose(
        np.asarray(r.weights)[sel], np.asarray(jax.nn.sigmoid(logits[:, 5])), rtol=1e-6
    )


def test_bias_update_rule():
    counts = jnp.array([[10.0, 0.0, 5.0, 5.0]])
    new = router_lib.update_router_bias(jnp.zeros((1, 4)), counts, 0.01)
    np.testing.assert_allclose(new, [[-0.01, 0.01, 0.0, 0.0]])


def test_balance_losses_are_one_when_balanced():
    cfg = ModelConfig(
        n_routed_experts=4, num_experts_per_tok=1, router=RouterConfig(score_func="softmax")
    )
    # 8 tokens, expert i chosen by tokens 2i, 2i+1, with uniform probabilities
    logits = jnp.zeros((8, 4))
    r = router_lib.route(logits, None, cfg)._replace(
        expert_ids=jnp.repeat(jnp.arange(4), 2)[:, None]
    )
    mask = jnp.ones(8)
    assert float(router_lib.switch_loss(r, cfg, mask)) == pytest.approx(1.0)
    assert float(router_lib.sequence_balance_loss(r, cfg, mask, batch=1)) == pytest.approx(1.0)
    assert float(router_lib.router_z_loss(r, mask)) == pytest.approx(np.log(4) ** 2, rel=1e-6)


def test_moe_layer_aux_and_padding():
    cfg = ModelConfig(
        hidden_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        router=RouterConfig(aux_loss_coef=0.01, seq_aux_loss_coef=0.001, z_loss_coef=1e-3),
    )
    ex = ExecutionConfig(moe_impl="capacity", capacity_factor=0.5)
    layer = moe_lib.MoE(cfg, rngs=nnx.Rngs(0), execution=ex)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16))
    token_mask = jnp.ones((2, 8)).at[1, 4:].set(0)
    y, aux = layer(x, token_mask)
    assert y.shape == x.shape
    assert float(aux["expert_counts"].sum()) == 12 * 2  # padding does not count
    assert 0 < float(aux["drop_fraction"]) < 1
    expected = 0.01 * aux["switch_loss"] + 0.001 * aux["seq_aux_loss"] + 1e-3 * aux["z_loss"]
    assert float(aux["aux_loss"]) == pytest.approx(float(expected))


def test_an_undeclared_moe_statistic_stops_the_trace():
    """A new auxiliary statistic must be declared in moe.STATS (sum or mean over microbatches), or
    the pipeline's microbatch combination and the metrics would drop it without a word."""
    cfg = ModelConfig(
        hidden_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
    )

    class WithANewLoss(moe_lib.MoE):
        def stats(self, r, mask, batch):
            out = super().stats(r, mask, batch)
            out["entropy_sum"] = jnp.zeros(())
            del out["z_sum"]
            return out

    x = jnp.ones((1, 4, 16))
    assert set(moe_lib.MoE(cfg, rngs=nnx.Rngs(0))(x)[1]) >= set(moe_lib.STATS)
    with pytest.raises(
        ValueError, match="not declared: entropy_sum; declared but not returned: z_sum"
    ):
        WithANewLoss(cfg, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("impl", ["dense", "dropless"])
def test_routing_replay_uses_the_recorded_experts_with_this_routers_gates(impl):
    """Replay (RL): the recorded experts run, gate weights come from this router's scores (so the
    router still gets a gradient), rows marked -1 keep the router's own choice; the mismatch counts
    the recorded assignments the router would not make. Checked against the dense reference, forward
    and gradients."""
    cfg = ModelConfig(
        hidden_size=16,
        n_routed_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        router=RouterConfig(n_group=2, topk_group=1),
        n_shared_experts=0,
        initializer_range=0.3,
    )
    layer = moe_lib.MoE(cfg, rngs=nnx.Rngs(0), execution=ExecutionConfig(moe_impl=impl))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    rng = np.random.default_rng(1)
    recorded = (
        np.stack([rng.choice(6, 2, replace=False) for _ in range(10)])
        .reshape(2, 5, 2)
        .astype(np.int32)
    )
    recorded[1, 4] = -1  # not recorded: the router's own choice
    mask = jnp.ones((2, 5))
    graphdef, state = nnx.split(layer)

    def run(state, x, replay):
        return nnx.merge(graphdef, state)(x, mask, route=jnp.asarray(recorded), replay=replay)

    def reference(state, x):
        m = nnx.merge(graphdef, state)
        xf = x.reshape(10, 16)
        r = router_lib.route(xf @ m.router.w[...], m.router.bias[...], cfg)
        ids = jnp.where(
            jnp.asarray(recorded.reshape(10, 2)) >= 0,
            jnp.asarray(recorded.reshape(10, 2)),
            r.expert_ids,
        )
        w = router_lib.gate_weights(r.scores, ids, cfg)
        return moe_lib.experts_dense(
            xf, ids, w, m.w_gate_up[...], m.w_down[...], jnp.float32
        ).reshape(x.shape)

    y, aux = run(state, x, True)
    np.testing.assert_allclose(y, reference(state, x), atol=1e-5)
    g = jax.grad(lambda s: jnp.sum(jnp.sin(run(s, x, True)[0])))(state)
    g_ref = jax.grad(lambda s: jnp.sum(jnp.sin(reference(s, x))))(state)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert (
        float(jnp.abs(g["router"]["w"][...]).sum()) > 0
    )  # the router learns through the replayed gates
    own = np.asarray(
        router_lib.route(
            x.reshape(10, 16) @ layer.router.w[...], layer.router.bias[...], cfg
        ).expert_ids
    )
    rec = recorded.reshape(10, 2)
    want = sum(int(e not in own[i]) for i in range(9) for e in rec[i])
    assert float(aux["route_mismatch"]) == want and float(aux["route_count"]) == 18
    y_own, aux_own = run(
        state, x, False
    )  # without replay: the router's choice runs, the mismatch is the same
    np.testing.assert_allclose(y_own, nnx.merge(graphdef, state)(x, mask)[0], atol=1e-6)
    assert float(aux_own["route_mismatch"]) == want
    assert (
        want > 0
    )  # random recorded choices disagree somewhere (the test would not see replay otherwise)
