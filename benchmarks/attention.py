"""Attention backends side by side: forward + backward time and compiled temporary memory.

  python -m benchmarks.attention                       # CPU: reference vs blockwise,
                                                       # tiny/small/long shapes
  python -m benchmarks.attention --impls reference,blockwise,pallas_gpu,cudnn --dtype bfloat16 \\
      --shapes 1x4096x16x192x128,2x8192x8x128x128     # on a GPU

Shapes are BxTxNxHxHv (MLA: H = qk_nope + qk_rope, Hv = v_head_dim; one KV head per query head).
Rows are packed documents of random lengths (segment ids) except for cudnn, which takes none. Each
impl is timed in the same run, interleaved, best of --repeats; `x ref` is the reference's time over
the impl's.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from moejax.kernels.attention import attention

FAILED: list[str] = []  # impls that did not compile: the run exits 1 (gpu_check.sh counts it)
DEFAULT_SHAPES = (
    "8x256x4x48x32,8x512x8x96x64,2x2048x8x96x64"  # tiny's and small's attention, then 2K
)


def _fn(impl: str, seg, scale: float, block: int | None):
    s = None if impl == "cudnn" else seg

    def loss(q, k, v):
        return jnp.sum(
            attention(q, k, v, s, scale=scale, impl=impl, block=block).astype(jnp.float32) ** 2
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def run(shape: str, impls: list[str], dtype, repeats: int, block: int | None) -> None:
    B, T, N, H, Hv = map(int, shape.split("x"))
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, N, H), dtype)
    v = jax.random.normal(ks[2], (B, T, N, Hv), dtype)
    seg = jnp.cumsum(jax.random.bernoulli(ks[3], 4.0 / T, (B, T)), axis=1).astype(jnp.int32)
    fns, temp = {}, {}
    for impl in impls:
        f = _fn(impl, seg, H**-0.5, block)
        try:
            compiled = f.lower(q, k, v).compile()
        except Exception as e:  # noqa: BLE001 (reported per shape; the run then exits 1)
            print(f"  {impl:<11} FAILED: {str(e).splitlines()[0][:160]}")
            FAILED.append(impl)
            continue
        mem = compiled.memory_analysis()
        temp[impl] = mem.temp_size_in_bytes if mem is not None else float("nan")
        jax.block_until_ready(compiled(q, k, v))
        fns[impl] = compiled
    times = {impl: [] for impl in fns}
    for _ in range(repeats):
        for impl, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[impl].append(time.perf_counter() - t)
    # causal attention FLOPs, forward (QK^T, PV) + backward (2.5x): half the square
    flops = 3.5 * 2 * B * N * T * T * (H + Hv) / 2
    base = min(times["reference"]) if "reference" in times else None
    print(f"B={B} T={T} N={N} H={H} Hv={Hv} {jnp.dtype(dtype).name}")
    for impl, ts in times.items():
        best = min(ts)
        ratio = f"x ref {base / best:5.2f}" if base else ""
        print(
            f"  {impl:<11} fwd+bwd {best * 1e3:9.2f} ms  {flops / best / 1e9:8.1f} GFLOP/s  "
            f"temp {temp[impl] / 2**20:9.1f} MiB  {ratio}"
        )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--impls", default="reference,blockwise")
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block", type=int, default=0, help="block rows (0: each backend's default)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for shape in a.shapes.split(","):
        run(shape, a.impls.split(","), jnp.dtype(a.dtype), a.repeats, a.block or None)
    if FAILED:
        raise SystemExit(f"failed: {', '.join(FAILED)}")


if __name__ == "__main__":
    main()
