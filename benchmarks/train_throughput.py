"""Training throughput of moejax against transformers' DeepseekV3ForCausalLM, side by side.

  python -m benchmarks.train_throughput [--rounds 3] [--steps 2] [--configs tiny,small] [--no-hf]

Prints tokens/s, step time and MFU (against the CPU matmul peak measured in the same run) for the
issue's `tiny` and `small` configs, and, when torch + transformers are installed, trains the
identical architecture in transformers (its eager and grouped_mm expert paths) and prints the
ratio against the better one. Every variant is compiled and warmed up first; then they take turns,
`--steps` steps each per round, and each one's best round is reported (a slow spell of this shared
machine falls on all of them alike). Synthetic token batches; MTP off on both sides (transformers
has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import (
    Config,
    DataConfig,
    ExecutionConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from moejax.model.stats import train_flops_per_token
from moejax.trainer.metrics import measure_cpu_peak

SHAPES = {
    "tiny": dict(
        model=dict(
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            router=dict(n_group=2, topk_group=1),
            n_shared_experts=1,
            moe_intermediate_size=128,
            intermediate_size=512,
            vocab_size=4096,
        ),
        batch=8,
        seq=256,
    ),
    "small": dict(
        model=dict(
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            q_lora_rank=192,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=32,
            num_experts_per_tok=4,
            router=dict(n_group=1, topk_group=1),
            n_shared_experts=1,
            moe_intermediate_size=256,
            intermediate_size=1536,
            vocab_size=16384,
        ),
        batch=8,
        seq=512,
    ),
}


def moejax_config(name: str, **execution) -> Config:
    s = SHAPES[name]
    shape = dict(s["model"])
    router = dict(
        shape.pop("router"),
        score_func="sigmoid",
        use_score_correction_bias=True,
        norm_topk_prob=True,
    )
    model = ModelConfig.from_dict(
        dict(
            shape, router=router, first_k_dense_replace=1, mtp_depth=0, max_position_embeddings=4096
        )
    )
    return Config(
        model=model,
        execution=ExecutionConfig(**execution),
        data=DataConfig(seq_len=s["seq"]),
        optim=OptimConfig(warmup_steps=1),
        train=TrainConfig(batch_size=s["batch"], steps=1000),
    )


def batch(cfg: Config, seed: int = 0):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    ids = np.random.default_rng(seed).integers(4, cfg.model.vocab_size, (B, T)).astype(np.int32)
    return {
        "tokens": ids,
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    }


def moejax_runner(cfg: Config):
    """A function running n train steps of cfg (compiled and warmed up here) until their results
    are ready."""
    from moejax import sharding
    from moejax.config import MeshConfig
    from moejax.trainer import setup

    ts = setup.build(cfg, sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    box = [ts.init_state()]
    step = ts.train_step()
    b = jax.tree.map(jnp.asarray, batch(cfg))

    def run(n: int):
        for _ in range(n):
            box[0], m = step(box[0], b)
        jax.block_until_ready(m)

    run(1)
    return run


def hf_config(cfg: Config):
    from transformers import DeepseekV3Config

    m = cfg.model
    return DeepseekV3Config(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        moe_intermediate_size=m.moe_intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        n_shared_experts=m.n_shared_experts,
        n_routed_experts=m.n_routed_experts,
        num_experts_per_tok=m.num_experts_per_tok,
        n_group=m.router.n_group,
        topk_group=m.router.topk_group,
        kv_lora_rank=m.kv_lora_rank,
        q_lora_rank=m.q_lora_rank,
        qk_rope_head_dim=m.qk_rope_head_dim,
        qk_nope_head_dim=m.qk_nope_head_dim,
        v_head_dim=m.v_head_dim,
        first_k_dense_replace=m.first_k_dense_replace,
        routed_scaling_factor=m.router.routed_scaling_factor,
        norm_topk_prob=m.router.norm_topk_prob,
        max_position_embeddings=m.max_position_embeddings,
        num_nextn_predict_layers=0,
    )


def hf_runner(cfg: Config, impl: str):
    """As moejax_runner, for transformers' DeepseekV3ForCausalLM with AdamW and clipping."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM._from_config(hf_config(cfg), experts_implementation=impl)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(batch(cfg)["tokens"], dtype=torch.long)

    def run(n: int):
        for _ in range(n):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(1)
    return run


def interleaved(runners: dict, rounds: int, steps: int) -> dict:
    """Seconds per step of each runner: the best of `rounds` rounds of `steps` steps, the runners
    taking turns within each round (so that a slow spell of this shared machine falls on all)."""
    best = {k: float("inf") for k in runners}
    for _ in range(rounds):
        for k, run in runners.items():
            t = time.perf_counter()
            run(steps)
            best[k] = min(best[k], (time.perf_counter() - t) / steps)
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runner's best is reported")
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--no-hf", action="store_true")
    args = p.parse_args(argv)
    peak = measure_cpu_peak(jnp.float32, seconds=2.0)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; measured f32 matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s"
    )
    print(
        f"{'config':8s} {'impl':32s} {'step s':>8s} {'tokens/s':>10s} {'MFU':>7s} "
        f"{'vs moejax':>10s}"
    )
    for name in args.configs.split(","):
        cfg = moejax_config(name)
        tokens = cfg.train.batch_size * cfg.data.seq_len
        fpt = train_flops_per_token(cfg.model, cfg.data.seq_len)
        runners = {}
        for label, over in (
            ("moejax dropless", {}),
            ("moejax dropless, reference attn", dict(attention_impl="reference")),
            ("moejax dropless, unrolled layers", dict(scan_layers=False)),
            ("moejax capacity 1.25", dict(moe_impl="capacity")),
        ):
            ex = cfg.execution.replace(**over)
            runners[label] = moejax_runner(dataclasses.replace(cfg, execution=ex))
        if not args.no_hf:
            try:
                import torch

                torch.set_num_threads(len(os.sched_getaffinity(0)))
                for impl in ("eager", "grouped_mm"):
                    runners[f"transformers ({impl})"] = hf_runner(cfg, impl)
            except ImportError:
                print("(transformers/torch not installed: skipping the comparison)")
        times = interleaved(runners, args.rounds, args.steps)
        base = times["moejax dropless"]
        for label, dt in times.items():
            print(
                f"{name:8s} {label:32s} {dt:8.3f} {tokens / dt:10.0f} "
                f"{fpt * tokens / dt / peak:7.1%} {dt / base:9.2f}x",
                flush=True,
            )
        hf = [dt for label, dt in times.items() if label.startswith("transformers")]
        if hf:
            print(
                f"{name:8s} moejax dropless tokens/s vs transformers' best: {min(hf) / base:.2f}x"
            )
        del runners


if __name__ == "__main__":
    main()
