"""LoRA on a mesh: tests/lora_mesh_check.py on 8 CPU devices (the device count is fixed when jax
starts, hence the subprocess). Adapters on attention, MLPs, shared and routed experts;
fsdp=2 x expert=4, where the routed experts' adapters go through the expert-parallel shard_map,
matches one device over two train steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.slow
def test_lora_on_a_mesh_matches_one_device():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",  # (LLVM optimizations off, as in conftest.py)
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    )
    r = subprocess.run(
        [sys.executable, "-m", "tests.lora_mesh_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("OK"), r.stdout[-3000:]
    print(last)
