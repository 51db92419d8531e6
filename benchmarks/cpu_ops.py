"""The small train_throughput model's CPU operations, JAX against PyTorch, side by side in one run.

  python -m benchmarks.cpu_ops [--rounds 3] [--skip attention,optimizer]

What `benchmarks.train_throughput` cannot say on its own: which operations make moejax's CPU
step slower than transformers'. Every row is timed in turns with the others (this machine's speed
drifts; each row's turn is one untimed call, then two timed ones), the best time reported,
float32 on all threads:
  dot        [4096, K] x [K, N] at the model's projection, FFN and LM head shapes: forward
             (x W), input gradient (dy W^T), weight gradient (x^T dy); XLA against torch.mm
  experts    32 experts x 512 rows, D 512, F 256, forward + backward: kernels.grouped_swiglu (the
             CPU dropless FFN, which recomputes the gate/up product in its backward pass: 11/9
             of the FLOPs counted here) against three torch._grouped_mm calls
  attention  B 8, T 512, 8 heads, q/k 96, v 64, causal, forward + backward: the blockwise kernel
             against torch's scaled_dot_product_attention
  loss       cross-entropy over [8, 512, 16384] logits, forward + backward: optax against torch
  optimizer  AdamW + clipping over the small model's parameters, state donated: the train step's
             non-finite skip as traced for an accelerator (a select) and for CPU (a
             conditional), and the update with no skip
torch rows need the `hf` extra; without it they are left out.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# (K, N): q_a, q_b, kv_a, kv_b, o_proj, the dense FFN's gate/up, the experts' and shared FFN's
# gate/up and down, and the LM head
SHAPES = [
    (512, 192),
    (192, 768),
    (512, 160),
    (128, 1024),
    (512, 512),
    (512, 1536),
    (512, 256),
    (256, 512),
    (512, 16384),
]


def _jax(fn, *args):
    """A thunk running the jitted fn on args until its result is ready."""
    f = jax.jit(fn)
    return lambda: jax.block_until_ready(f(*args))


def dot_rows(rng, torch):
    rows = {}
    M = 4096
    for K, N in SHAPES:
        x, w, dy = (rng.standard_normal(s, np.float32) for s in ((M, K), (K, N), (M, N)))
        flops = 2 * M * K * N
        jx, jw, jdy = map(jnp.asarray, (x, w, dy))
        for name, fn, args, tfn in (
            ("x W", lambda a, b: a @ b, (jx, jw), lambda a, b, c: a @ b),
            ("dy W^T", lambda a, b: a @ b.T, (jdy, jw), lambda a, b, c: c @ b.T),
            ("x^T dy", lambda a, b: a.T @ b, (jx, jdy), lambda a, b, c: a.T @ c),
        ):
            key = f"dot {M}x{K}x{N} {name}"
            rows[(key, "jax")] = (_jax(fn, *args), flops)
            if torch is not None:
                t = [torch.from_numpy(a) for a in (x, w, dy)]
                rows[(key, "torch")] = ((lambda tfn=tfn, t=t: tfn(*t)), flops)
    return rows


def expert_rows(rng, torch):
    from moejax.kernels import grouped_swiglu

    G, C, D, F = 32, 512, 512, 256
    x = rng.standard_normal((G * C, D), np.float32)
    wgu = (rng.standard_normal((G, D, 2, F), np.float32) * D**-0.5).astype(np.float32)
    wd = (rng.standard_normal((G, F, D), np.float32) * F**-0.5).astype(np.float32)
    sizes = np.full(G, C, np.int32)
    flops = 3 * 2 * G * C * D * F * 3  # three matmuls, forward + two gradients each
    args = tuple(map(jnp.asarray, (x, wgu, wd, sizes)))

    def loss(x, wgu, wd, sizes):
        return jnp.sum(grouped_swiglu(x, sizes, wgu, wd) ** 2)

    rows = {("experts fwd+bwd", "jax"): (_jax(jax.grad(loss, argnums=(0, 1, 2)), *args), flops)}
    if torch is not None and hasattr(torch, "_grouped_mm"):
        tx = torch.from_numpy(x).requires_grad_()
        tg = torch.from_numpy(np.ascontiguousarray(wgu[:, :, 0])).requires_grad_()
        tu = torch.from_numpy(np.ascontiguousarray(wgu[:, :, 1])).requires_grad_()
        td = torch.from_numpy(wd).requires_grad_()
        offs = torch.arange(1, G + 1, dtype=torch.int32) * C

        def run():
            for p in (tx, tg, tu, td):
                p.grad = None
            g = torch._grouped_mm(tx, tg, offs=offs)
            u = torch._grouped_mm(tx, tu, offs=offs)
            y = torch._grouped_mm(torch.nn.functional.silu(g) * u, td, offs=offs)
            (y**2).sum().backward()

        rows[("experts fwd+bwd", "torch")] = (run, flops)
    return rows


def attention_rows(rng, torch):
    from moejax.kernels.attention import attention

    B, T, N, H, Hv = 8, 512, 8, 96, 64
    q, k = (rng.standard_normal((B, T, N, H), np.float32) for _ in range(2))
    v, do = (rng.standard_normal((B, T, N, Hv), np.float32) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    flops = 0  # (at T = 512 both compute the whole square: one 512-row block here; torch's
    # flash kernel needs equal q/k and v head dims, so SDPA takes its masked math path)

    def fwd_bwd(q, k, v, do, seg):
        _, vjp = jax.vjp(lambda *a: attention(*a, seg, scale=H**-0.5, impl="blockwise"), q, k, v)
        return vjp(do)

    rows = {
        ("attention fwd+bwd", "jax"): (_jax(fwd_bwd, *map(jnp.asarray, (q, k, v, do, seg))), flops)
    }
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
        tdo = torch.from_numpy(do).transpose(1, 2).contiguous()
        for t in (tq, tk, tv):
            t.requires_grad_()

        def run():
            for t in (tq, tk, tv):
                t.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, is_causal=True, scale=H**-0.5
            )
            out.backward(tdo)

        rows[("attention fwd+bwd", "torch")] = (run, flops)
    return rows


def loss_rows(rng, torch):
    import optax

    B, T, V = 8, 512, 16384
    x = rng.standard_normal((B, T, V), np.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)

    def ce(x, labels):
        return optax.softmax_cross_entropy_with_integer_labels(x, labels).sum()

    rows = {("loss fwd+bwd", "jax"): (_jax(jax.value_and_grad(ce), jnp.asarray(x), labels), 0)}
    if torch is not None:
        tx = torch.from_numpy(x).requires_grad_()
        tl = torch.from_numpy(labels).long().view(-1)

        def run():
            tx.grad = None
            torch.nn.functional.cross_entropy(tx.view(-1, V), tl, reduction="sum").backward()

        rows[("loss fwd+bwd", "torch")] = (run, 0)
    return rows


def optimizer_rows(rng, torch):
    import optax

    from benchmarks.train_throughput import moejax_config
    from moejax import sharding
    from moejax.config import MeshConfig
    from moejax.kernels import target_platform
    from moejax.trainer import setup
    from moejax.trainer.optim import make_optimizer
    from moejax.trainer.step import _skip_nonfinite

    cfg = moejax_config("small")
    ts = setup.build(cfg, sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    state = ts.init_state()
    tx, _ = make_optimizer(cfg.optim, state["params"], 1000)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), state["params"])

    def update(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def skip(p, o, g):  # the train step's own skip, as traced for the given platform
        return _skip_nonfinite(jnp.isfinite(optax.tree.norm(g)), tx, g, o, p)

    rows = {}
    for name, fn, where in (
        ("select", skip, "gpu"),
        ("conditional", skip, "cpu"),
        ("no skip", update, "cpu"),
    ):
        box = [jax.tree.map(jnp.copy, (state["params"], state["opt_state"]))]
        # a new function object each time: jit's trace cache would otherwise hand the second
        # platform the first one's trace
        fresh = functools.wraps(fn)(lambda *a, fn=fn: fn(*a))
        with target_platform(where):
            f = jax.jit(fresh, donate_argnums=(0, 1)).lower(*box[0], grads).compile()
        assert ("conditional" in f.as_text()) == (name == "conditional"), name

        def run(f=f, box=box):
            box[0] = f(*box[0], grads)
            jax.block_until_ready(box[0])

        rows[(f"optimizer, skip by {name}", "jax")] = (run, 0)
    return rows


GROUPS = {
    "dot": dot_rows,
    "experts": expert_rows,
    "attention": attention_rows,
    "loss": loss_rows,
    "optimizer": optimizer_rows,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated groups: " + ",".join(GROUPS))
    a = p.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    rows = {}
    for name, build in GROUPS.items():
        if name not in a.skip.split(","):
            rows.update(build(rng, torch))
    for run, _ in rows.values():  # compile and warm up everything first
        run()
    best = {k: float("inf") for k in rows}
    for _ in range(a.rounds):
        for k, (run, _) in rows.items():
            # one untimed call first: the other framework's threads may still be spinning (torch's
            # OpenMP workers busy-wait after a parallel region) and would slow the first call
            run()
            for _ in range(2):
                t = time.perf_counter()
                run()
                best[k] = min(best[k], time.perf_counter() - t)
    print(f"{'operation':44s} {'jax ms':>9s} {'torch ms':>9s} {'jax GF/s':>9s} {'torch GF/s':>10s}")
    for op in dict.fromkeys(k[0] for k in rows):
        j, t = best.get((op, "jax")), best.get((op, "torch"))
        flops = rows[(op, "jax")][1]
        ms = [f"{s * 1e3:.1f}" if s else "-" for s in (j, t)]
        gf = [f"{flops / s / 1e9:.0f}" if flops and s else "-" for s in (j, t)]
        print(f"{op:44s} {ms[0]:>9s} {ms[1]:>9s} {gf[0]:>9s} {gf[1]:>10s}")


if __name__ == "__main__":
    main()
