"""The MoE layer (router + routed experts), forward + backward, against a dense SwiGLU FFN of equal
activated FLOPs, at three expert granularities.

    python -m benchmarks.moe_layer                                  # the issue's CPU setting
    python -m benchmarks.moe_layer --tokens 32768 --hidden 2048 --active-ffn 8192  # a GPU-sized one

Configs keep k x F fixed (default 1536 = 2 x 768 = 6 x 256 = 8 x 192), so every row does the same
activated FLOPs as the dense FFN of hidden size k x F. Rows: the dense FFN; `dropless` as the
platform runs it by default (CPU: the looped expert FFN, kernels.grouped_swiglu; TPU/GPU: the
Pallas gmm); on CPU also `dropless` through two 'tiled' grouped matmuls; `dropless` through
jax.lax.ragged_dot; `capacity` (factor 1.25, the GShard einsum). The time ratio is against the
dense FFN of the same run. Every row is compiled first; then the rows take turns, --iters calls each
per round, and each row's best round is reported.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name
from moejax import kernels
from moejax.config import ExecutionConfig, ModelConfig, RouterConfig
from moejax.model.layers import MLP
from moejax.model.moe import MoE

EXPERT_CONFIGS = ((8, 2), (64, 6), (128, 8))  # (E, k)


def _config(D, E, k, F, moe_impl, gmm_impl, dtype):
    return ModelConfig(
        hidden_size=D,
        num_heads=4,
        n_routed_experts=E,
        num_experts_per_tok=k,
        moe_intermediate_size=F,
        n_shared_experts=0,
        router=RouterConfig(score_func="softmax", use_score_correction_bias=False),
        compute_dtype=dtype,
        param_dtype="float32",
    ), ExecutionConfig(moe_impl=moe_impl, gmm_impl=gmm_impl, capacity_factor=1.25)


def _step(module, is_moe):
    graphdef, params = nnx.split(module)

    def loss(params, x, cot):
        m = nnx.merge(graphdef, params)
        y = m(x)[0] if is_moe else m(x)
        return jnp.sum(y.astype(jnp.float32) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda x, cot: grad(params, x, cot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--active-ffn", type=int, default=1536, help="k x F, the same in every config")
    ap.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
    ap.add_argument("--configs", default="8x2,64x6,128x8", help="ExK list")
    ap.add_argument("--iters", type=int, default=None, help="calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each row's best is reported")
    ap.add_argument("--skip", default="", help="comma list of rows to leave out (e.g. ragged_dot)")
    ap.add_argument(
        "--ragged-max-experts",
        type=int,
        default=None,
        help="ragged_dot rows only up to this E (default 8: beyond, XLA's ragged_dot takes minutes "
        "per step on CPU and materializes an [E, rows, N] buffer that runs out of memory on GPU)",
    )
    args = ap.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    iters = args.iters or (1 if on_cpu else 10)
    T, D, KF = args.tokens, args.hidden, args.active_ffn
    default = kernels.default_impl()
    print(
        f"device {device_name()}  jax {jax.__version__}  tokens {T}  D {D}  k*F {KF}  compute "
        f"{args.dtype}  default gmm: {default}"
    )
    x = jax.random.normal(jax.random.key(0), (1, T, D), jnp.float32)
    cot = jax.random.normal(jax.random.key(1), (1, T, D), jnp.float32)
    base_cfg, _ = _config(D, 8, 2, KF // 2, "dropless", "auto", args.dtype)
    ragged_max = args.ragged_max_experts or 8
    skip = set(filter(None, args.skip.split(",")))
    rows = [
        # on CPU, 'auto' runs the expert FFN as loops over row chunks (kernels.grouped_swiglu)
        (f"dropless ({'looped FFN' if default == 'tiled' else default})", "dropless", "auto"),
    ]
    if default == "tiled":  # the two grouped matmuls it replaced, side by side
        rows.append(("dropless (tiled gmms)", "dropless", "tiled"))
    rows += [
        ("dropless (ragged_dot)", "dropless", "ragged_dot"),
        ("capacity 1.25", "capacity", "auto"),
    ]
    # every function compiled and warmed up first, then timed in turns (best of --rounds), so that
    # a slow spell of this shared machine falls on all rows alike
    fns = {"dense": _step(MLP(base_cfg, KF, rngs=nnx.Rngs(0)), False)}
    for spec in args.configs.split(","):
        E, k = map(int, spec.split("x"))
        for label, moe_impl, gmm_impl in rows:
            if any(s in label for s in skip) or ("ragged_dot" in label and E > ragged_max):
                continue
            cfg, ex = _config(D, E, k, KF // k, moe_impl, gmm_impl, args.dtype)
            fns[(E, k, label)] = _step(MoE(cfg, rngs=nnx.Rngs(0), execution=ex), True)
    for fn in fns.values():
        jax.block_until_ready(fn(x, cot))
    best = {key: float("inf") for key in fns}
    for _ in range(args.rounds):
        for key, fn in fns.items():
            t = time.perf_counter()
            for _ in range(iters):
                out = fn(x, cot)
            jax.block_until_ready(out)
            best[key] = min(best[key], (time.perf_counter() - t) / iters)
    dense_t = best.pop("dense")
    fwd_bwd_flops = 3 * 2 * T * D * 3 * KF  # three matmuls of 2*T*D*kF, forward + 2x backward
    print(
        f"dense SwiGLU F={KF}: {dense_t * 1e3:.1f} ms ({fwd_bwd_flops / dense_t / 1e9:.0f} GFLOP/s)"
    )
    print("| E | k | F | impl | ms | vs dense | vs E=8 same impl |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = {}
    for (E, k, label), t in best.items():
        first.setdefault(label, t)
        print(
            f"| {E} | {k} | {KF // k} | {label} | {t * 1e3:.1f} | {t / dense_t:.2f}x | "
            f"{t / first[label]:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
