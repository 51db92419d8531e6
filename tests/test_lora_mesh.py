"""LoRA on a mesh: tests/lora_mesh_check.py on 8 CPU devices (the device count is fixed when jax
starts, hence the subprocess). Adapters on attention, MLPs, shared and routed experts;
fsdp=2 x expert=4, where the routed experts' adapters go through the expert-parallel shard_map,
matches one device over two train steps."""

from __future__ import annotations

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_lora_on_a_mesh_matches_one_device():
    r = run_module("tests.lora_mesh_check", devices=8, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("OK"), r.stdout[-3000:]
    print(last)
