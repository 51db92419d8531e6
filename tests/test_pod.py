"""Topology parsing, the planner, and the ahead-of-time compile CLI on a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import moejax
from moejax import pod
from moejax.plan import plan, report
from tests.helpers import ROOT, run_module, tiny_config


@pytest.mark.parametrize(
    "name,want",
    [
        ("v5p-512", ("v5p", 256, "4x8x8")),  # v5p counts TensorCores: 512 cores = 256 chips
        ("v5p-8", ("v5p", 4, "2x2x1")),
        ("v5e-256", ("v5e", 256, "16x16")),
        ("v5p:8x8x16", ("v5p", 1024, "8x8x16")),
    ],
)
def test_parse_topology(name, want):
    assert pod.parse_topology(name) == want


@pytest.mark.parametrize(
    "name,match",
    [
        ("v9x-8", "expected GEN-N"),
        ("v5p:4xfour", "shape must look like"),
        ("tpu", "expected e.g."),
        ("v5e-12", "powers of two"),
    ],
)
def test_bad_topology_is_one_clear_error(name, match):
    with pytest.raises(pod.TopologyError, match=match):
        pod.parse_topology(name)


def test_plan_components_scale_with_the_mesh():
    import dataclasses

    from moejax.config import MeshConfig

    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, batch_size=8)
    )  # rows for 8 chips
    one = plan(cfg, chips=1)
    cfg8 = dataclasses.replace(cfg, mesh=MeshConfig(fsdp=-1, expert=4))
    eight = plan(cfg8, chips=8, tokens=1e9)
    assert one["components"]["params"] > 0 and one["fits"]
    # experts split 4 ways and everything else over fsdp=2: well under half the parameter bytes
    assert eight["components"]["params"] < 0.5 * one["components"]["params"]
    assert eight["components"]["optimizer"] == pytest.approx(
        2 * eight["components"]["params"], rel=0.01
    )
    assert eight["cost"] > 0 and eight["hours"] > 0
    text = report(eight, cfg8)
    assert "memory per device" in text and "chip-hours" in text


def test_compile_cli_for_a_tpu_topology():
    pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")
    r = run_module(
        "moejax.compile",
        "--config",
        "experiments/deepseek_v3_tiny.py",
        "--topology",
        "v5e:2x2",
        "--config.model.num_layers=2",
        "--config.mesh.expert=2",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "mesh fsdp=2 expert=2" in r.stdout and "fits" in r.stdout
    assert "temp" in r.stdout and "TFLOPs per device" in r.stdout


def test_compile_cli_names_a_bad_mesh():
    pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")
    r = run_module(
        "moejax.compile",
        "--config",
        "experiments/deepseek_v3_tiny.py",
        "--topology",
        "v5e:2x2",
        "--config.mesh.expert=3",
        timeout=300,
    )
    last = r.stderr.strip().splitlines()[-1]  # libtpu prints its own warnings first
    assert r.returncode == 2 and last.startswith("error: mesh") and "divisible" in last, r.stderr[
        -2000:
    ]


def test_no_libtpu_noise_on_a_machine_without_tpus():
    """With the `tpu` extra installed on a CPU-only machine, neither jax's backend probe nor
    describing a TPU topology for AOT compilation prints libtpu's metadata warnings or an InitGoogle
    trace."""
    pytest.importorskip("libtpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    if moejax.tpu_host():
        pytest.skip("a TPU machine: libtpu's start-up messages are its own business there")
    code = (
        "import moejax, jax; from moejax import pod; assert jax.devices()[0].platform != 'tpu'; "
        "print(len(pod.tpu_devices('v5p-8')[1]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "4"
    for noise in ("could not determine TPU", "InitGoogle", "Source Location Trace"):
        assert noise not in r.stderr, r.stderr[-2000:]
