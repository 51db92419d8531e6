"""Train-step time of the tiny config on 8 CPU devices (expert-parallel layouts) against 1 device.

    python -m benchmarks.ep_step            # sets --xla_force_host_platform_device_count=8 itself

The 8 devices share this machine's cores, so this measures the overhead of the sharded program
(all-to-alls, shard_map bookkeeping, collectives), not a speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import dataclasses  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import time_fn  # noqa: E402
from moejax import sharding  # noqa: E402
from moejax.config import MeshConfig  # noqa: E402
from moejax.trainer import setup  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

LAYOUTS = {
    "1 device": (MeshConfig(fsdp=1), 1),
    "expert=4 data=2": (MeshConfig(data=2, fsdp=1, expert=4), 8),
    "expert=4 fsdp=2": (MeshConfig(fsdp=2, expert=4), 8),
    "expert=4 tensor=2": (MeshConfig(fsdp=1, expert=4, tensor=2), 8),
    "fsdp=8": (MeshConfig(fsdp=8), 8),
}


def step_time(cfg, mesh_cfg, n):
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    ts = setup.build(cfg, sharding.make_mesh(mesh_cfg, jax.devices()[:n]))
    state = ts.init_state()
    B, T = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "tokens": rng.integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32),
            "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        },
        ts.batch_sharding,
    )
    step = ts.train_step()
    holder = {"state": state}

    def run(batch):
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    return time_fn(run, batch, iters=5, repeats=3, warmup=2)


def main():
    base = tiny_config()
    cfg = dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, batch_size=16),
        data=dataclasses.replace(base.data, seq_len=128),
        model=base.model.replace(num_heads=4, mtp_depth=0),
    )
    print(
        f"tiny config: {cfg.model.n_routed_experts} experts top-{cfg.model.num_experts_per_tok}, "
        f"hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, batch "
        f"{cfg.train.batch_size} x {cfg.data.seq_len}"
    )
    print("| layout | step ms | vs 1 device |")
    print("| --- | --- | --- |")
    base_t = None
    for name, (mc, n) in LAYOUTS.items():
        t = step_time(cfg, mc, n)
        base_t = base_t or t
        print(f"| {name} | {t * 1e3:.1f} | {t / base_t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
