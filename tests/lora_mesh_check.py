"""Run in a process with 8 CPU devices (test_lora_mesh.py): LoRA fine-tuning on fsdp=2 x expert=4
matches one device. The tiny default model (MLA, a dense layer, a MoE layer, MTP) with adapters on
attention, the dense MLP, the shared and the routed experts; on the mesh the routed experts run
expert-parallel (moe_ep.experts_ep, a shard_map over the expert axes) with the per-expert adapters
passed through it.

  1. the same initial state on both layouts, every LoRA B factor set to the same nonzero values;
  2. two train steps: the same losses, gradient norms, adapters and router biases on both layouts,
     and the frozen base weights bit-identical before and after the steps on the mesh;
  3. the adapters took effect on the mesh: the loss differs from the B = 0 loss, also with only the
     routed experts' B factors nonzero (the expert-parallel path applied them), and that
     experts-only loss equals one device's;
  4. a GRPO step (routing replay of recorded experts through the exchange, KL to the zero-adapter
     reference) gives one device's loss, router disagreement and adapters.

Prints one line "OK ..." with the largest differences.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib

import jax
import numpy as np

from moejax import sharding
from moejax.config import LoRAConfig, MeshConfig
from moejax.model import moe_ep
from moejax.trainer import setup
from tests.helpers import tiny_config

TARGETS = ("attn/", "ffn/experts/", "ffn/shared/", "segments/0/ffn/")
MESH = MeshConfig(fsdp=2, expert=4)
ONE = MeshConfig(fsdp=1)
RTOL = 1e-5
ADAPTER_TOL = (
    5e-5  # adapters after two steps: |mesh - one device| <= this x the factor's largest value
)
EPS = 1e-3


def config(mesh_cfg):
    """The tiny config at 8 rows (fsdp x expert split them), adapters, no warmup (both steps move
    the adapters). Adam's eps is large: the update m / (sqrt(v) + eps) of a nearly zero gradient
    component is then about lr * g / eps, not lr * sign(g), which would turn float32 rounding in g
    into differences of order lr."""
    base = tiny_config()
    return dataclasses.replace(
        base,
        mesh=mesh_cfg,
        lora=LoRAConfig(rank=4, targets=TARGETS, dropout=0.0),
        train=dataclasses.replace(base.train, batch_size=8),
        optim=dataclasses.replace(base.optim, warmup_steps=0, eps=EPS),
    )


def batch_of(cfg):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    half = T // 2
    seg = np.repeat(np.array([[1] * half + [2] * (half - 3) + [0] * 3], np.int32), B, 0)
    seg[1, T // 4 :] = 0  # uneven valid counts, padding
    pos = np.tile(np.concatenate([np.arange(half), np.arange(T - half)]).astype(np.int32), (B, 1))
    return {
        "tokens": rng.integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
    }


def _name(path) -> str:
    return jax.tree_util.keystr(path)


def routed(name: str) -> bool:
    """Whether a state path is a routed experts' factor: a MoE layer's own (the MTP block's too),
    not its shared experts' nor the dense layer's MLP."""
    return "['ffn']['w_" in name and not name.startswith("['segments'][0]")


def set_b(params, which=lambda name: True):
    """Every `*_lora_b` factor `which` accepts set to fixed random values (from its path, the same
    on every layout), in its own sharding; the others as they are."""

    def f(path, x):
        name = _name(path)
        if "_lora_b" not in name or not which(name):
            return x
        v = 0.2 * np.random.default_rng(zlib.crc32(name.encode())).standard_normal(x.shape)
        return jax.device_put(v.astype(x.dtype), x.sharding)

    return jax.tree_util.tree_map_with_path(f, params)


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def flat(tree) -> dict:
    return {_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Layout:
    """A setup, its compiled step and batch."""

    def __init__(self, mesh_cfg, devices):
        self.cfg = config(mesh_cfg)
        self.ts = setup.build(self.cfg, sharding.make_mesh(mesh_cfg, devices))
        assert self.ts.has_frozen
        self.step = self.ts.train_step()
        self.batch = jax.device_put(batch_of(self.cfg), self.ts.batch_sharding)

    def state(self, *which):
        state = self.ts.init_state()
        if which:
            state["params"] = set_b(state["params"], *which)
        return state

    def run(self, state, n):
        losses, norms = [], []
        for _ in range(n):
            state, m = self.step(state, self.batch)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        return state, losses, norms


def grpo_leg() -> str:
    """GRPO with LoRA and routing replay (the recorded experts through the expert-parallel exchange)
    and a KL reference: one step's loss, router disagreement and adapters on the mesh equal one
    device's."""
    from moejax.config import AlignConfig, GRPOConfig
    from moejax.finetune.grpo import _moe_layers

    def cfg_of(mesh_cfg):
        return dataclasses.replace(
            config(mesh_cfg),
            align=AlignConfig(method="grpo"),
            grpo=GRPOConfig(routing_replay=True, beta=0.1, group_size=4, max_new_tokens=8),
        )

    c = cfg_of(ONE)
    B, T, K = c.train.batch_size, c.data.seq_len, c.model.num_experts_per_tok
    L = _moe_layers(c)
    rng = np.random.default_rng(1)
    batch = batch_of(c)
    batch["loss_mask"] = (batch["positions"] >= 8).astype(np.int32)
    batch["advantages"] = np.repeat(rng.normal(size=(B, 1)), T, 1).astype(np.float32)
    batch["old_logps"] = (-rng.uniform(4, 8, (B, T))).astype(np.float32)
    routes = np.stack(
        [rng.choice(c.model.n_routed_experts, K, replace=False) for _ in range(B * T * L)]
    )
    routes = routes.reshape(B, T, L * K).astype(np.int32)
    routes[:, -3:] = -1  # not recorded: the router's own choice
    batch["routes"] = routes
    out = {}
    for name, mesh_cfg, devices in (("one", ONE, jax.devices()[:1]), ("mesh", MESH, None)):
        ts = setup.build(cfg_of(mesh_cfg), sharding.make_mesh(mesh_cfg, devices))
        state = ts.init_state()
        state["params"] = set_b(state["params"])
        state, m = ts.train_step()(state, jax.device_put(batch, ts.batch_sharding))
        out[name] = (float(m["loss"]), float(m["grpo/router_disagreement"]), flat(state["params"]))
    (l1, d1, p1), (l8, d8, p8) = out["one"], out["mesh"]
    np.testing.assert_allclose(l8, l1, rtol=RTOL, err_msg="grpo loss")
    np.testing.assert_allclose(d8, d1, rtol=RTOL, err_msg="router disagreement")
    assert (
        0.3 < d1 < 1
    )  # random recorded experts: most disagree with the router (replay has work to do)
    for n in p1:
        np.testing.assert_allclose(
            p8[n], p1[n], atol=ADAPTER_TOL * max(np.abs(p1[n]).max(), 1e-30), rtol=0, err_msg=n
        )
    return f"grpo_loss_rel={abs(l8 - l1) / abs(l1):.2e} grpo_disagreement={d1:.3f}"


def main():
    assert jax.device_count() == 8, jax.devices()
    t0 = time.perf_counter()
    calls = []  # (adapters given?, mesh shape) of each expert-parallel call traced
    real_ep = moe_ep.experts_ep

    def spy(*a, **k):
        calls.append((k.get("lora") is not None, dict(k["mesh"].shape)))
        return real_ep(*a, **k)

    moe_ep.experts_ep = spy
    one = Layout(ONE, jax.devices()[:1])
    mesh = Layout(MESH, None)

    # the same initial state on both layouts
    s1, s8 = one.state(lambda n: True), mesh.state(lambda n: True)
    for k in ("frozen", "params", "router"):
        for a, b in zip(host(s1[k]), host(s8[k])):
            np.testing.assert_array_equal(a, b, err_msg=f"initial {k}")
    p8 = flat(s8["params"])
    b_names = [n for n in p8 if "_lora_b" in n]
    assert b_names and all(np.abs(p8[n]).max() > 0 for n in b_names), b_names
    assert sum(routed(n) for n in b_names) == 4, (
        b_names
    )  # w_gate_up, w_down of the MoE layer and the MTP block
    frozen_before = host(s8["frozen"])

    # two steps on each layout
    s1, loss1, norm1 = one.run(s1, 2)
    s8, loss8, norm8 = mesh.run(s8, 2)
    # traced once per MoE layer (the scanned MoE segment and the MTP block), each time with the
    # adapters
    assert len(calls) == 2 and all(lora and shape["expert"] == 4 for lora, shape in calls), calls
    np.testing.assert_allclose(loss8, loss1, rtol=RTOL, err_msg="loss")
    np.testing.assert_allclose(norm8, norm1, rtol=2e-4, err_msg="grad_norm")  # as sharded_check
    d_loss = max(abs(a - b) / abs(b) for a, b in zip(loss8, loss1))
    d_norm = [abs(a - b) / abs(b) for a, b in zip(norm8, norm1)]
    f1, f8 = flat(s1["params"]), flat(s8["params"])
    assert f1.keys() == f8.keys()
    d_abs = d_rel = 0.0
    for n in f1:
        scale = max(np.abs(f1[n]).max(), 1e-30)
        diff = np.abs(f8[n] - f1[n]).max()
        d_abs, d_rel = max(d_abs, diff), max(d_rel, diff / scale)
        np.testing.assert_allclose(f8[n], f1[n], atol=ADAPTER_TOL * scale, rtol=0, err_msg=n)
        assert "_lora_" in n, n  # only the adapters are trainable
    moved = [n for n in f1 if np.abs(f8[n] - p8[n]).max() > 0]
    expert_moved = [n for n in moved if routed(n)]
    assert len(moved) == len(f1), sorted(set(f1) - set(moved))  # every adapter was updated
    assert expert_moved, moved
    for a, b in zip(host(s1["router"]), host(s8["router"])):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-7, err_msg="router")
    frozen_after = host(s8["frozen"])
    assert len(frozen_after) == len(frozen_before) > 0
    for a, b in zip(frozen_before, frozen_after):
        np.testing.assert_array_equal(a, b, err_msg="frozen weights changed")
    for a, b in zip(host(s1["frozen"]), frozen_after):
        np.testing.assert_array_equal(a, b, err_msg="frozen weights differ between the layouts")

    # the adapters take effect on the mesh, the routed experts' through the expert-parallel exchange
    _, (loss_zero,), _ = mesh.run(mesh.state(), 1)
    _, (loss_exp8,), _ = mesh.run(mesh.state(routed), 1)
    _, (loss_exp1,), _ = one.run(one.state(routed), 1)
    np.testing.assert_allclose(loss_exp8, loss_exp1, rtol=RTOL, err_msg="experts-only loss")
    effect_all = abs(loss8[0] - loss_zero) / abs(loss_zero)
    effect_experts = abs(loss_exp8 - loss_zero) / abs(loss_zero)
    d_exp = abs(loss_exp8 - loss_exp1) / abs(loss_exp1)
    # far above the tolerance and what the layouts differ by (the routed experts act only through
    # the routing weights on a model at initialization: a small but certain effect)
    assert effect_all > 10 * RTOL and effect_all > 100 * max(d_loss, d_exp), (loss8[0], loss_zero)
    assert effect_experts > 10 * RTOL and effect_experts > 100 * max(d_loss, d_exp), (
        loss_exp8,
        loss_zero,
    )
    moe_ep.experts_ep = real_ep
    grpo = grpo_leg()
    norms = "/".join(f"{d:.1e}" for d in d_norm)
    print(
        f"OK loss_rel={max(d_loss, d_exp):.2e} grad_norm_rel_per_step={norms} "
        f"adapter_abs={d_abs:.2e} adapter_rel={d_rel:.2e} frozen_bit_identical=1 "
        f"adapted_vs_zero_B={effect_all:.2e} experts_only_vs_zero_B={effect_experts:.2e} "
        f"losses={loss8} adapters={len(f1)} ep_traces_with_lora={len(calls)} {grpo} "
        f"seconds={time.perf_counter() - t0:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
