"""Accelerator facts and abstract (device-free) construction of the train step, shared by
`python -m moejax.compile` (ahead-of-time compile for a TPU topology) and `python -m moejax.plan`.

Chip figures are public datasheet numbers; prices are on-demand list prices per chip-hour at the
time of writing, an assumption the user should override (--price) with their own.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from moejax.config import Config


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    bf16_flops: float  # dense peak, per chip
    price_per_hour: float  # USD per chip-hour, list price assumption
    cores_per_chip_in_name: (
        int  # v4-N / v5p-N count TensorCores (2 per chip); v5e-N / v6e-N count chips
    )
    dims: int  # torus dimensions of the topology string
    fp8_flops: float = 0.0  # dense FP8 peak per chip; 0: no FP8 matmul units


GiB = 1024**3
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 3.22, 2, 3),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 1.20, 1, 2),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 4.20, 2, 3),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 2.70, 1, 2),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 3.00, 1, 0, fp8_flops=1979e12),
    "h200": Chip("NVIDIA H200 SXM", 141 * 10**9, 989e12, 3.80, 1, 0, fp8_flops=1979e12),
}


class TopologyError(ValueError):
    pass


def parse_topology(name: str) -> tuple[str, int, str]:
    """'v5p-512' (Cloud naming: v4/v5p count TensorCores, v5e/v6e chips) or 'v5p:8x8x4' (chips per
    torus dimension) -> (generation, number of chips, 'AxBxC' shape for get_topology_desc)."""
    if ":" in name:
        gen, shape = name.split(":", 1)
        try:
            chips = math.prod(int(d) for d in shape.split("x"))
        except ValueError:
            raise TopologyError(f"topology {name!r}: the shape must look like 4x4x4") from None
    elif "-" in name:
        gen, count = name.split("-", 1)
        if gen not in CHIPS or not count.isdigit():
            raise TopologyError(
                f"topology {name!r}: expected GEN-N with GEN in {sorted(CHIPS)}, e.g. v5p-512"
            )
        chips = int(count) // CHIPS[gen].cores_per_chip_in_name
        shape = torus_shape(chips, CHIPS[gen].dims)
    else:
        raise TopologyError(f"topology {name!r}: expected e.g. v5p-512 or v5p:8x8x4")
    if gen not in CHIPS:
        raise TopologyError(
            f"topology {name!r}: unknown generation {gen!r}; known: {', '.join(sorted(CHIPS))}"
        )
    return gen, chips, shape


def torus_shape(chips: int, dims: int) -> str:
    """The most cubic power-of-two shape with `dims` dimensions, smallest first but with unit
    dimensions last, as Cloud TPU names slices (256 -> 4x8x8, 4 -> 2x2x1: libtpu's 2x2x1 host bounds
    must divide it)."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips: slice sizes are powers of two")
    if dims == 0:
        return str(chips)
    e = int(math.log2(chips))
    parts = [e // dims + (1 if i < e % dims else 0) for i in range(dims)]
    return "x".join(str(2**p) for p in sorted(parts, key=lambda p: (p == 0, p)))


def tpu_devices(topology: str):
    """TPU device descriptions for a topology, from libtpu, on any host (the `tpu` extra)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'"
        ) from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock on load unless told that several processes may load it; here
    # nothing runs on a TPU, so compiling from two processes (or a test and a CLI) is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    gen, chips, shape = parse_topology(topology)
    desc = topologies.get_topology_desc(topology_name=f"{gen}:{shape}", platform="tpu")
    return gen, desc.devices


def abstract_train_step(cfg: Config, mesh):
    """(jitted train step, abstract state, abstract batch) with the shardings the real run uses,
    built without allocating a parameter: the same setup path as `moejax.train`
    (moejax.trainer.setup)."""
    from moejax.trainer import setup

    ts = setup.build(cfg, mesh)
    return ts.train_step(), ts.abstract, ts.abstract_batch()


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = (
            leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        )
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total
