"""Hugging Face checkpoint -> moejax Transformer, streamed straight onto a device mesh.

Nothing is read until the headers have been checked (every tensor present, every shape right)
and the mesh has been checked against the model (every sharded dimension divisible). Then, one
parameter at a time and one distinct device shard at a time, a host buffer of the shard's shape in
the target dtype is filled with just the regions of the Hugging Face tensors it holds, put on the
device(s) holding that shard, and the parameter is assembled from its shards. Host memory: one
shard buffer plus the tensor region being copied into it, never the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moejax import sharding
from moejax.config import ExecutionConfig, MeshConfig, ModelConfig
from moejax.convert import regions
from moejax.convert import weights as W
from moejax.convert.hf_config import from_hf_config
from moejax.convert.safetensors_io import FP8_BLOCK, SCALE_SUFFIX, Checkpoint, checkpoint_files
from moejax.model import Transformer

log = logging.getLogger(__name__)


def default_mesh() -> Mesh:
    """A 1-device mesh on jax.devices()[0]: mesh=None loads through the same code path."""
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


def target_shardings(state: nnx.State, mesh: Mesh | None, rules: Mapping[str, object] | None):
    """(mesh, rules, shardings) for an abstract model state; a dimension the mesh cannot split
    raises sharding.ShardingError naming it, before anything is read or placed."""
    mesh = mesh if mesh is not None else default_mesh()
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    shardings = sharding.tree_shardings(state, mesh, rules)
    sharding.check_divisible(state, shardings, mesh)
    return mesh, rules, shardings


def _experts_prefix(name: str) -> str | None:
    """'a.b.experts.3.w1.weight' -> 'a.b.experts' (None for tensors that are not per-expert)."""
    m = re.match(r"(.*\.experts)\.\d+\.", name)
    return m.group(1) if m else None


def plan(
    ckpt: Checkpoint, cfg: ModelConfig, model_type: str, shapes: Mapping[tuple, tuple], path: str
):
    """Which Hugging Face tensor fills which slot, checked against the headers only.

    shapes: moejax parameter path -> shape. Each MoE layer's experts may come per expert (on-disk
    names) or fused (transformers' in-memory experts.gate_up_proj / down_proj).
    Returns {parameter path: [(name, slot, view_shape), ...]}. Raises ValueError for a missing
    tensor, a tensor of the wrong shape (naming both shapes) or a float8 tensor without its scales.
    """
    names = ckpt.names()
    release = model_type == "deepseek_v4" and "embed.weight" in names  # DeepSeek's own naming
    disk = W.hf_entries(cfg, model_type, fused=False, release=release)
    fused = W.hf_entries(cfg, model_type, fused=True, release=release)
    fused_layers = {
        n.rsplit(".", 1)[0]
        for n in fused
        if n.endswith("experts.gate_up_proj")
        and n in names
        and n.replace("gate_up_proj", "down_proj") in names
    }
    chosen = {n: s for n, s in disk.items() if _experts_prefix(n) not in fused_layers}
    for prefix in sorted(fused_layers):
        for leaf in ("gate_up_proj", "down_proj"):
            chosen[f"{prefix}.{leaf}"] = fused[f"{prefix}.{leaf}"]

    missing = [n for n in chosen if n not in names]
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {W.describe_missing(missing)}")
    known = set(disk) | set(fused)
    unexpected = sorted(
        n
        for n in names
        if n not in known
        and not W.ignorable(n, cfg)
        and not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in known)
    )
    if unexpected:
        log.warning(
            "ignored %d tensors moejax has no place for: %s",
            len(unexpected),
            W.describe_missing(unexpected),
        )

    out: dict[tuple, list] = {p: [] for p in shapes}
    wrong = []
    for name, slot in chosen.items():
        view = W.view_shape(shapes[slot.path], slot.index)
        want, got = W.hf_shape(slot, view), ckpt.shape(name)
        if want != got:
            wrong.append(
                f"{name}: shape {got} in the checkpoint, expected {want} "
                f"(moejax {'.'.join(map(str, slot.path))}{list(slot.index) if slot.index else ''} "
                f"{view})"
            )
        out[slot.path].append((name, slot, view))
    if wrong:
        more = f" (+{len(wrong) - 1} more tensors of the wrong shape)" if len(wrong) > 1 else ""
        raise ValueError(wrong[0] + more)
    fp8 = [n for n in chosen if ckpt.is_fp8(n)]
    no_scale = [n for n in fp8 if n + SCALE_SUFFIX not in names]
    if no_scale:
        raise ValueError(f"FP8 tensors without weight_scale_inv: {W.describe_missing(no_scale)}")
    for n in fp8:
        want = tuple(-(-d // FP8_BLOCK) for d in ckpt.shape(n))  # one scale per block x block tile
        got = ckpt.shape(n + SCALE_SUFFIX)
        if len(want) != 2 or got != want:
            raise ValueError(
                f"{n + SCALE_SUFFIX}: shape {got} in the checkpoint, expected {want} "
                f"({FP8_BLOCK}x{FP8_BLOCK} blocks of the 2-D {n} {ckpt.shape(n)})"
            )
    return out


def place(
    shape: tuple[int, ...], dtype, target: NamedSharding, parts, ckpt: Checkpoint
) -> jax.Array:
    """One parameter of `shape` and `dtype`, filled from its Hugging Face tensors (`parts`, see
    plan), put on its shards: one host buffer per distinct shard index, put on every device holding
    it."""
    by_box: dict[regions.Box, list] = {}  # replicas of a shard share one buffer
    for device, index in target.addressable_devices_indices_map(shape).items():
        by_box.setdefault(regions.box_of(index, shape), []).append(device)
    arrays = []
    for box, devices in by_box.items():
        buf = np.zeros([hi - lo for lo, hi in box], dtype)  # [shard shape]
        regions.fill_shard(buf, box, shape, parts, ckpt.read)
        arrays += [jax.device_put(buf, d) for d in devices]
        del buf
    return jax.make_array_from_single_device_arrays(shape, target, arrays)


def read_config(path: str) -> tuple[dict, ModelConfig, Checkpoint]:
    """(config.json, its ModelConfig with the MTP depth the checkpoint really has, header index)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    cfg = from_hf_config(hf)
    ckpt = Checkpoint(checkpoint_files(path))
    if cfg.mtp_depth and not any(
        n.startswith(f"model.layers.{cfg.num_layers}.") for n in ckpt.names()
    ):
        # transformers drops the MTP layer when it saves; MTP only matters for training.
        log.warning(
            "config asks for %d MTP layer(s) but the checkpoint has none; loading without MTP",
            cfg.mtp_depth,
        )
        cfg = cfg.replace(mtp_depth=0)
    return hf, cfg, ckpt


def from_hf(
    path: str,
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
    dtype=None,
    execution: ExecutionConfig | None = None,
    **overrides,
) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face checkpoint directory into a moejax Transformer, sharded as it loads.

    Args:
      path: directory with config.json and safetensors file(s).
      mesh: target device mesh (moejax.sharding.make_mesh); None is a 1-device mesh on
        jax.devices()[0].
      rules: logical-axis rules (default moejax.sharding.DEFAULT_RULES).
      dtype: parameter dtype, e.g. 'bfloat16' (default: cfg.param_dtype). The float32 router stays
        float32.
      execution: how the model computes (dispatch, kernels; config.ExecutionConfig's default).
      overrides: ModelConfig fields to change after mapping (e.g. compute_dtype).
    Returns:
      (model, config); each parameter has the sharding moejax.sharding.tree_shardings gives it, and
      the model is built for `mesh` (moejax.sharding.Layout).
    """
    hf, cfg, ckpt = read_config(path)
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    if overrides:
        cfg = cfg.replace(**overrides)
    mesh = mesh if mesh is not None else default_mesh()
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    # built for its mesh: on several devices the model runs expert-parallel there
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules, execution=execution)
        )
    )
    mesh, rules, shardings = target_shardings(state, mesh, rules)
    flat = list(nnx.to_flat_state(state))
    parts = plan(ckpt, cfg, hf["model_type"], {p: v.get_value().shape for p, v in flat}, path)
    targets = dict(nnx.to_flat_state(shardings))
    for p, v in flat:  # one parameter at a time
        abstract = v.get_value()  # ShapeDtypeStruct
        v.set_value(place(abstract.shape, abstract.dtype, targets[p].get_value(), parts[p], ckpt))
    return nnx.merge(graphdef, state), cfg
