"""Grouped matmul backends against a dense matmul of equal FLOPs, forward and forward + backward.

    python -m benchmarks.gmm_kernels                      # default impls for this platform
    python -m benchmarks.gmm_kernels --sweep              # also Pallas GPU tile / warp variants

Shapes are the two MoE matmuls' first projection of two published layouts (tokens x top-k rows):
  v2lite   64 experts, top-6, D=2048, 2F=2816, 8192 tokens  (fine-grained)
  mixtral   8 experts, top-2, D=4096, 2F=28672, 8192 tokens
  small     8 experts, top-2, D=512,  2F=2048, 4096 tokens  (CPU-sized)
Group sizes are a seeded multinomial draw (uneven, as routers give). TFLOP/s counts the useful
FLOPs (2*M*K*N forward, 3x that forward + backward); "% peak" is against a bf16 matmul measured in
the same run on the same device.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, matmul_peak, time_fn
from moejax import kernels
from moejax.kernels.gmm import pallas_gpu

SHAPES = {  # name: (tokens, top_k, experts, K, N)
    "v2lite": (8192, 6, 64, 2048, 2816),
    "mixtral": (8192, 2, 8, 4096, 28672),
    "small": (4096, 2, 8, 512, 2048),
}
GPU_DEFAULTS = dict(
    tiles=pallas_gpu.DEFAULT_TILES,
    tgmm_tiles=pallas_gpu.TGMM_TILES,
    num_warps=pallas_gpu.DEFAULT_WARPS,
    num_stages=pallas_gpu.DEFAULT_STAGES,
)
GPU_SWEEP = [  # gmm (tm, tk, tn), tgmm (tm, tk, tn), warps, stages
    ((128, 64, 128), (128, 64, 128), 4, 3),
    ((128, 64, 128), (64, 128, 128), 8, 3),
    ((128, 128, 128), (64, 64, 128), 8, 3),
    ((64, 64, 256), (64, 64, 256), 4, 3),
]


def _inputs(name, dtype):
    tokens, k, E, K, N = SHAPES[name]
    M = tokens * k
    rng = np.random.default_rng(0)
    sizes = rng.multinomial(M, rng.dirichlet(np.full(E, 4.0))).astype(np.int32)
    lhs = jax.random.normal(jax.random.key(0), (M, K), dtype)
    rhs = (jax.random.normal(jax.random.key(1), (E, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes), 2.0 * M * K * N


def _fns(impl):
    def fwd(lhs, rhs, sizes):
        return kernels.gmm(lhs, rhs, sizes, impl=impl)

    return jax.jit(fwd), jax.jit(_fwd_bwd(fwd))


def _fwd_bwd(fwd):
    """Forward, then both input gradients from a fixed cotangent (the rows themselves)."""

    def run(lhs, rhs, sizes):
        out, vjp = jax.vjp(lambda a, b: fwd(a, b, sizes), lhs, rhs)
        return vjp(out)

    return run


def _dense_fns():
    def fwd(lhs, rhs, sizes):
        return jnp.dot(lhs, rhs[0], preferred_element_type=jnp.float32).astype(lhs.dtype)

    return jax.jit(fwd), jax.jit(_fwd_bwd(fwd))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_cpu = jax.default_backend() == "cpu"
    ap.add_argument("--shapes", default="small" if on_cpu else "v2lite,mixtral")
    ap.add_argument(
        "--impls", default=None, help="comma list (default: the platform's default and ragged_dot)"
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--sweep", action="store_true", help="Pallas GPU tile/warp/stage variants (forward)"
    )
    ap.add_argument("--iters", type=int, default=3 if on_cpu else 20)
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    impls = (
        args.impls.split(",")
        if args.impls
        else list(dict.fromkeys([kernels.default_impl(), "ragged_dot"]))
    )
    peak = matmul_peak(dtype)
    print(
        f"device {device_name()}  jax {jax.__version__}  measured {args.dtype} matmul peak "
        f"{peak / 1e12:.3g} TFLOP/s"
    )
    print("| shape | impl | pass | ms | TFLOP/s | % peak | time vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.shapes.split(","):
        lhs, rhs, sizes, flops = _inputs(name, dtype)
        dense = [time_fn(f, lhs, rhs, sizes, iters=args.iters) for f in _dense_fns()]
        rows = [("dense matmul", {})] + [(impl, {}) for impl in impls]
        if args.sweep and not on_cpu:
            rows += [
                (
                    f"pallas_gpu {t} tgmm {tt} w{w} s{s}",
                    dict(tiles=t, tgmm_tiles=tt, num_warps=w, num_stages=s),
                )
                for t, tt, w, s in GPU_SWEEP
            ]
        for label, kw in rows:
            if label == "dense matmul":
                times = dense
            else:
                _set_gpu_defaults(**kw)
                try:
                    times = [
                        time_fn(f, lhs, rhs, sizes, iters=args.iters)
                        for f in _fns(label.split()[0])
                    ]
                except Exception as e:  # a variant that does not compile is reported, not fatal
                    print(
                        f"| {name} | {label} | - | failed: {type(e).__name__}: "
                        f"{str(e)[:200]} | | | |"
                    )
                    continue
                finally:
                    _set_gpu_defaults(**GPU_DEFAULTS)
            for pname, t, d, mult in zip(("fwd", "fwd+bwd"), times, dense, (1, 3)):
                tf = mult * flops / t
                print(
                    f"| {name} | {label} | {pname} | {t * 1e3:.2f} | {tf / 1e12:.3g} | "
                    f"{100 * tf / peak:.0f}% | {t / d:.2f}x |",
                    flush=True,
                )


def _set_gpu_defaults(tiles=None, tgmm_tiles=None, num_warps=None, num_stages=None):
    """Tile/warp/stage variants are set as the Pallas GPU kernels' defaults (forward and
    backward)."""
    if tiles:
        pallas_gpu.DEFAULT_TILES, pallas_gpu.TGMM_TILES = tiles, tgmm_tiles
        pallas_gpu.DEFAULT_WARPS, pallas_gpu.DEFAULT_STAGES = num_warps, num_stages


if __name__ == "__main__":
    main()
