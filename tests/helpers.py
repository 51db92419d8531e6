"""Shared tiny configurations for the tests (small enough to compile in seconds)."""

from __future__ import annotations

import os
import subprocess
import sys

from moejax.config import Config, ModelConfig, RouterConfig
from moejax.experiment import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest DeepSeek-V3-shaped model (MLA, group-limited routing, MTP): unit tests take it and
# change what they test, e.g. TINY_MLA.replace(num_layers=3).
TINY_MLA = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=48,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    router=RouterConfig(n_group=2, topk_group=1),
    mtp_depth=1,
)

TINY_OVERRIDES = {
    "model": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,  # (routing: experiments/moe.py's, two groups of two)
    ),
    "data": dict(seq_len=64, max_files=60, tokenizer_sample_bytes=2_000_000),
    "train": dict(
        batch_size=4,
        steps=8,
        log_every=1,
        eval_every=0,
        eval_batches=1,
        ckpt_every=4,
        num_samples=0,
        profile_peak=False,
    ),
    "optim": dict(warmup_steps=2),
}


def tiny_config_dict(cache_dir: str = ""):
    cd = load_config_file(os.path.join(ROOT, "experiments", "moe.py"))
    for section, values in TINY_OVERRIDES.items():
        for k, v in values.items():
            cd[section][k] = v
    if cache_dir:
        cd.data.cache_dir = cache_dir
    return cd


def tiny_config(cache_dir: str = "") -> Config:
    return Config.from_dict(tiny_config_dict(cache_dir))


def override_flags(cache_dir: str) -> list[str]:
    """The same tiny config as --config.* flags for `python -m moejax.train`."""
    out = []
    for section, values in TINY_OVERRIDES.items():
        out += [f"--config.{section}.{k}={v}" for k, v in values.items()]
    return out + [f"--config.data.cache_dir={cache_dir}"]


def run_module(
    module: str, *args: str, devices: int = 0, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m module *args` from the repository root, on CPU, output captured as text.
    devices=N simulates N CPU devices (as a mesh test needs); XLA keeps the tests' optimization
    level (conftest.py). `env` adds to this process's environment."""
    flags = "--xla_backend_optimization_level=0"
    if devices:
        flags = f"--xla_force_host_platform_device_count={devices} {flags}"
    full = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_mesh_check(module: str, devices: int = 8, timeout: float = 1500) -> dict:
    """Run a multi-device check script (`python -m module` on `devices` CPU devices): it must exit 0
    and XLA must never have replicated a tensor to change its layout ("Involuntary full
    rematerialization" on stderr). Returns the JSON of its last stdout line."""
    import json

    r = run_module(module, devices=devices, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    remat = [line for line in r.stderr.splitlines() if "Involuntary full rematerialization" in line]
    assert not remat, f"{len(remat)} involuntary reshardings, e.g. {remat[0][:600]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def saved_checkpoint(root, cfg) -> tuple[str, str]:
    """A random moejax checkpoint of `cfg` (its vocabulary set to a small sentencepiece model's)
    under root/ckpt, and that tokenizer's .model file: (checkpoint dir, tokenizer file)."""
    from flax import nnx

    from moejax.convert.checkpoint import save_model
    from moejax.data.tokenizer import train_sentencepiece
    from moejax.model import Transformer

    lines = [f"Question: what is {i} + {i}? Answer: {2 * i}. def f(x): return x" for i in range(99)]
    tok = train_sentencepiece(lines, os.path.join(root, "tok.model"), vocab_size=320)
    cfg = cfg.replace(vocab_size=tok.vocab_size)
    save_model(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, os.path.join(root, "ckpt"))
    return os.path.join(root, "ckpt"), os.path.join(root, "tok.model")
