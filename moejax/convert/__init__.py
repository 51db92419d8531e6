"""Hugging Face checkpoints in and out: `from_hf(path)` and `to_hf(model, config, path)`.

Supported architectures: DeepseekV3 (incl. the MTP layer, e_score_correction_bias and FP8
block-quantized weights), DeepseekV2 (incl. V2-Lite), Mixtral, Qwen3-MoE. Reads both the per-expert
on-disk names and transformers' fused in-memory layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from moejax.config import ModelConfig
from moejax.convert import weights as W
from moejax.convert.hf_config import UnsupportedConfig, from_hf_config, hf_model_type, to_hf_config
from moejax.model import Transformer

__all__ = ["from_hf", "to_hf", "from_hf_config", "to_hf_config", "UnsupportedConfig", "load_hf_state"]

log = logging.getLogger(__name__)


def _buffers(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    buffers = {path: np.zeros(v.get_value().shape, np.float32) for path, v in flat.items()}
    return graphdef, state, buffers


def _experts_prefix(name: str) -> str | None:
    """'a.b.experts.3.w1.weight' -> 'a.b.experts' (None for tensors that are not per-expert)."""
    m = re.match(r"(.*\.experts)\.\d+\.", name)
    return m.group(1) if m else None


def load_hf_state(path: str, cfg: ModelConfig, model_type: str):
    """Streams a checkpoint's tensors into float32 host buffers keyed by moejax state path."""
    graphdef, state, buffers = _buffers(cfg)
    files = W.checkpoint_files(path)
    disk = W.hf_entries(cfg, model_type, fused=False)
    fused = W.hf_entries(cfg, model_type, fused=True)
    filled: set[str] = set()
    unexpected = []
    pending_fp8: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for name, arr, _ in W.iter_tensors(files):
        if name.endswith(".weight_scale_inv"):
            scales[name[: -len("_scale_inv")]] = np.array(arr)
            weight = name[: -len("_scale_inv")]
            if weight in pending_fp8:
                arr = W.dequantize_fp8(pending_fp8.pop(weight), scales.pop(weight))
                name = weight
            else:
                continue
        elif arr.dtype in W.FP8_DTYPES:
            if name in scales:
                arr = W.dequantize_fp8(arr, scales.pop(name))
            else:
                pending_fp8[name] = np.array(arr)
                continue
        slot = disk.get(name) or fused.get(name)
        if slot is None:
            if not W.ignorable(name, cfg):
                unexpected.append(name)
            continue
        W.assign(buffers, slot, arr, name)
        filled.add(name)
    if pending_fp8:
        raise ValueError(f"FP8 tensors without weight_scale_inv: {W.describe_missing(sorted(pending_fp8))}")
    if unexpected:
        log.warning("ignored %d tensors moejax has no place for: %s", len(unexpected), W.describe_missing(unexpected))
    # Each MoE layer's experts may come per expert (on disk) or fused (in memory).
    fused_done = {n.rsplit(".", 1)[0] for n in fused if n.endswith("experts.gate_up_proj") and n in filled
                  and n.replace("gate_up_proj", "down_proj") in filled}
    missing = [n for n in disk if n not in filled and _experts_prefix(n) not in fused_done]
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {W.describe_missing(missing)}")
    return graphdef, state, buffers


def from_hf(path: str, **overrides) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face checkpoint directory into a moejax Transformer.

    overrides: ModelConfig fields to change after mapping (e.g. moe_impl='dense', compute_dtype).
    Returns (model, config).
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    cfg = from_hf_config(hf)
    if cfg.mtp_depth:
        names = W.checkpoint_names(W.checkpoint_files(path))
        if not any(n.startswith(f"model.layers.{cfg.num_layers}.") for n in names):
            # transformers drops the MTP layer when it saves; MTP only matters for training.
            log.warning("config asks for %d MTP layer(s) but the checkpoint has none; loading without MTP",
                        cfg.mtp_depth)
            cfg = cfg.replace(mtp_depth=0)
    if overrides:
        cfg = cfg.replace(**overrides)
    graphdef, state, buffers = load_hf_state(path, cfg, hf["model_type"])
    for p, v in nnx.to_flat_state(state):  # one parameter at a time: never two host copies
        v.set_value(jnp.asarray(buffers.pop(p), dtype=v.get_value().dtype))
    return nnx.merge(graphdef, state), cfg


def to_hf(model: Transformer, config: ModelConfig, path: str, *, model_type: str | None = None,
          shard_bytes: int = 4 << 30, dtype: str = "float32") -> None:
    """Writes config.json and safetensors shards (per-expert names) that transformers loads.

    The directory appears only when complete: everything is written to a temporary sibling and
    renamed at the end. An existing `path` is replaced.
    """
    mt = model_type or hf_model_type(config)
    hf_cfg = to_hf_config(config, mt)
    hf_cfg["dtype"] = dtype
    state = nnx.state(model)
    arrays = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    entries = W.hf_entries(config, mt, fused=False)
    np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        host_cache: dict[tuple, np.ndarray] = {}

        def host(p):  # one parameter at a time on the host
            if p not in host_cache:
                host_cache.clear()
                host_cache[p] = np.asarray(jax.device_get(arrays[p]), np.float32)
            return host_cache[p]

        written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        shard: dict[str, np.ndarray] = {}
        size = total = 0

        def flush():
            nonlocal shard, size
            fname = os.path.join(tmp, f"part-{len(written)}.safetensors")
            save_file(shard, fname, metadata={"format": "pt"})
            written.append((fname, list(shard)))
            shard, size = {}, 0

        for name, slot in entries.items():
            t = W.export_tensor(slot, {slot.path: host(slot.path)}).astype(np_dtype)
            if size and size + t.nbytes > shard_bytes:
                flush()
            shard[name] = t
            size += t.nbytes
            total += t.nbytes
        flush()
        n = len(written)
        weight_map = {}
        for i, (fname, keys) in enumerate(written):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(fname, os.path.join(tmp, final))
            weight_map.update({k: final for k in keys})
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
