"""One-accelerator training throughput of a ~1B-parameter MoE (DeepSeek-V2-Lite's shapes, fewer
layers).

  python -m benchmarks.gpu_train                          # on a GPU: V2-Lite shape, 2 layers,
                                                          # bf16, 8 x 4096
  python -m benchmarks.gpu_train --layers 3 --batch 4 --attention pallas_gpu,reference
  python -m benchmarks.gpu_train --tiny                   # the same code path on a CPU, in seconds
  python -m benchmarks.gpu_train --precision bf16,fp8     # FP8 matmuls (execution.fp8) vs bf16

Builds the real train step (`moejax.trainer.setup`, AdamW, clipping, aux-loss-free bias update) on
one device, times --steps steps per attention backend in the same run, and prints tokens/s and MFU
against the bf16 matmul peak measured in the same run (benchmarks.common.matmul_peak) and against
the card's datasheet peak when it is known. Synthetic tokens, packed into 4 documents per row.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, matmul_peak
from moejax.config import Config
from moejax.experiment import load_config_file
from moejax.model.stats import train_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASHEET_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
}  # dense bf16 FLOP/s


def config(
    layers: int, batch: int, seq: int, attention: str, tiny: bool, fp8: bool = False
) -> Config:
    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v2_lite.py"))
    cd.execution.fp8 = fp8
    m = cd.model
    m.num_layers, m.compute_dtype, m.mtp_depth = layers, "bfloat16", 0
    cd.execution.attention_impl, cd.execution.remat_policy = attention, "full"
    if tiny:
        m.hidden_size, m.num_heads, m.intermediate_size, m.n_routed_experts = 128, 2, 256, 8
        m.moe_intermediate_size, m.kv_lora_rank, m.vocab_size = 64, 32, 1024
        m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 16, 8, 16
    cd.data.seq_len, cd.train.batch_size, cd.optim.warmup_steps = seq, batch, 1
    return Config.from_dict(cd)


def batch(cfg: Config):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    seg = np.repeat(np.arange(1, 5, dtype=np.int32), -(-T // 4))[:T]  # 4 documents per row
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in np.bincount(seg)[1:]])
    return {
        "tokens": jnp.asarray(rng.integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32)),
        "segment_ids": jnp.asarray(np.broadcast_to(seg, (B, T)).copy()),
        "positions": jnp.asarray(np.broadcast_to(pos, (B, T)).copy()),
    }


def time_steps(cfg: Config, steps: int) -> tuple[float, int]:
    from moejax import sharding
    from moejax.config import MeshConfig
    from moejax.trainer import setup

    ts = setup.build(cfg, sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    state = ts.init_state()
    params = state["params"] if isinstance(state, dict) else state.params
    n_params = sum(x.size for x in jax.tree.leaves(params))
    step = ts.train_step()
    b = batch(cfg)
    state, m = step(state, b)  # compile + first step
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps, n_params


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--layers", type=int, default=2, help="1 dense + (layers - 1) MoE layers (V2-Lite: 27)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--attention", default="auto", help="comma-separated attention backends, timed in turn"
    )
    p.add_argument(
        "--tiny", action="store_true", help="small widths (a CPU smoke run of the same code)"
    )
    p.add_argument(
        "--precision",
        default="bf16",
        help="comma-separated: bf16 and/or fp8 (execution.fp8: E4M3 operands with fine-grained "
        "scales, emulated by quantize/dequantize; MFU counts the same model FLOPs)",
    )
    a = p.parse_args(argv)
    if a.tiny:
        a.seq, a.batch = min(a.seq, 256), min(a.batch, 2)
    peak = matmul_peak(jnp.bfloat16)
    kind = jax.devices()[0].device_kind
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in kind), None)
    print(
        f"device {device_name()} ({jax.__version__}); measured bf16 matmul peak "
        f"{peak / 1e12:.1f} TFLOP/s" + (f", datasheet {sheet / 1e12:.0f}" if sheet else "")
    )
    print(
        f"{'attention':12s} {'precision':9s} {'params':>8s} {'step s':>8s} {'tokens/s':>10s} "
        f"{'MFU (measured)':>15s} {'MFU (datasheet)':>16s}"
    )
    runs = [(attn, prec) for attn in a.attention.split(",") for prec in a.precision.split(",")]
    for attn, prec in runs:
        if prec not in ("bf16", "fp8"):
            p.error(f"--precision: {prec!r} is not bf16 or fp8")
        cfg = config(a.layers, a.batch, a.seq, attn, a.tiny, fp8=prec == "fp8")
        dt, n = time_steps(cfg, a.steps)
        tokens = a.batch * a.seq
        flops = train_flops_per_token(cfg.model, a.seq) * tokens / dt
        mfu_sheet = f"{100 * flops / sheet:15.1f}%" if sheet else f"{'-':>16s}"
        print(
            f"{attn:12s} {prec:9s} {n / 1e9:7.2f}B {dt:8.3f} {tokens / dt:10.0f} "
            f"{100 * flops / peak:14.1f}% {mfu_sheet}"
        )


if __name__ == "__main__":
    main()
