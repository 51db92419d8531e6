"""FP8 training numerics: the loss curve of the tests' tiny DeepSeek-V3-shaped model (MLA, routed
and shared experts, a dense layer, MTP) with execution.fp8 beside the same run in bf16, and the
step time of each (on CPU the FP8 emulation's cost; on a GPU see benchmarks/gpu_train.py
--precision).

  python -m benchmarks.fp8_curve                  # 300 steps, both runs, a table every 30 steps
  python -m benchmarks.fp8_curve --steps 100 --dtype float32

The data is a learnable synthetic language (each row an arithmetic progression modulo the
vocabulary, a random start and step per row), so the loss falls from ~8 to ~1 in a few hundred
steps and differences between the runs show as a gap between the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from moejax.kernels import fp8 as fp8_lib


def curve(fp8: bool, steps: int, dtype: str = "bfloat16", seed: int = 0, block: int = 128):
    """(losses [steps], seconds per step after the first) of one run; block: the FP8 tile size
    (kernels.fp8.block_size)."""
    from moejax import sharding
    from moejax.config import MeshConfig
    from moejax.trainer import setup
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg,
        model=cfg.model.replace(compute_dtype=dtype),
        mesh=MeshConfig(fsdp=1),
        execution=cfg.execution.replace(fp8=fp8),
        train=dataclasses.replace(cfg.train, batch_size=8, steps=steps),
        optim=dataclasses.replace(cfg.optim, warmup_steps=10),
    )
    ts = setup.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state, step = ts.init_state(), ts.train_step()
    with fp8_lib.block_size(block):  # (the step is traced at its first call)
        return _run(cfg, state, step, steps, seed)


def _run(cfg, state, step, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    B, T, V = 8, cfg.data.seq_len, cfg.model.vocab_size
    losses, t0 = [], None
    for i in range(steps):
        a, s = rng.integers(1, 7, (B, 1)), rng.integers(4, V, (B, 1))
        batch = {
            "tokens": ((s + a * np.arange(T)) % (V - 4) + 4).astype(np.int32),
            "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        }
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        if i == 0:
            t0 = time.perf_counter()
    return np.asarray(losses), (time.perf_counter() - t0) / max(1, steps - 1)


def smoothed_gap(ref, got, window: int = 20) -> np.ndarray:
    """|got - ref| / ref of the two curves' moving averages."""
    smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")
    return np.abs(smooth(got) - smooth(ref)) / smooth(ref)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of both runs")
    p.add_argument(
        "--block",
        type=int,
        default=128,
        help="FP8 tile size (DeepSeek: 128; the tiny model's rows are 64 wide, so 128 gives one "
        "tile per row: 16 exercises several)",
    )
    a = p.parse_args(argv)
    ref, t_ref = curve(False, a.steps, a.dtype)
    got, t_fp8 = curve(True, a.steps, a.dtype, block=a.block)
    print(
        f"device {jax.devices()[0].device_kind}; compute {a.dtype}; {a.steps} steps; FP8 tiles "
        f"of {a.block}"
    )
    print(f"{'step':>5s} {a.dtype:>9s} {'fp8':>9s} {'gap':>7s}")
    for i in list(range(0, a.steps, max(1, a.steps // 10))) + [a.steps - 1]:
        print(f"{i:5d} {ref[i]:9.4f} {got[i]:9.4f} {abs(got[i] - ref[i]) / ref[i]:7.2%}")
    gap = smoothed_gap(ref, got)
    print(f"largest gap of the 20-step moving averages: {gap.max():.2%} (at step {gap.argmax()})")
    print(
        f"seconds per step: {a.dtype} {t_ref:.4f}, fp8 {t_fp8:.4f} (fp8 / {a.dtype} = "
        f"{t_fp8 / t_ref:.2f}x)"
    )


if __name__ == "__main__":
    main()
