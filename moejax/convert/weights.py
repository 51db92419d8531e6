"""Tensor-by-tensor mapping between Hugging Face checkpoints and moejax parameters.

Every Hugging Face tensor maps to one *slot*: a moejax parameter path, an index into it (layer of
a stacked segment, expert, gate/up half) and a layout rule. Loading streams tensors one at a time
into preallocated host buffers (one copy of the model); saving streams slots out shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from moejax.config import ModelConfig
from moejax.model.transformer import segments_of

FP8_BLOCK = 128
_ALL = slice(None)


@dataclasses.dataclass(frozen=True)
class Slot:
    path: tuple  # key path into nnx.state(model)
    index: tuple  # index into the parameter array
    rule: str  # 'copy' | 'linear' | 'linear2' | 'fused_gate_up' | 'fused_down'


def to_slot(x: np.ndarray, rule: str, shape: tuple) -> np.ndarray:
    """Hugging Face layout -> moejax slot of `shape`."""
    if rule == "copy":
        return x.reshape(shape)
    if rule in ("linear", "linear2"):  # torch Linear [out, in] -> [in, *out] ('linear2': [*in, out])
        return x.T.reshape(shape)
    if rule == "fused_gate_up":  # [E, 2F, D] -> [E, D, 2, F]
        return np.swapaxes(x, 1, 2).reshape(shape)
    if rule == "fused_down":  # [E, D, F] -> [E, F, D]
        return np.swapaxes(x, 1, 2)
    raise ValueError(rule)


def _attention_entries(cfg: ModelConfig, hf: str, base: tuple, idx: tuple) -> dict[str, Slot]:
    e = {}
    a = base + ("attn",)
    if cfg.attention_type == "mla":
        if cfg.q_lora_rank:
            e[f"{hf}.self_attn.q_a_proj.weight"] = Slot(a + ("wq_a",), idx, "linear")
            e[f"{hf}.self_attn.q_a_layernorm.weight"] = Slot(a + ("q_norm", "weight"), idx, "copy")
            e[f"{hf}.self_attn.q_b_proj.weight"] = Slot(a + ("wq_b",), idx, "linear")
        else:
            e[f"{hf}.self_attn.q_proj.weight"] = Slot(a + ("wq",), idx, "linear")
        e[f"{hf}.self_attn.kv_a_proj_with_mqa.weight"] = Slot(a + ("wkv_a",), idx, "linear")
        e[f"{hf}.self_attn.kv_a_layernorm.weight"] = Slot(a + ("kv_norm", "weight"), idx, "copy")
        e[f"{hf}.self_attn.kv_b_proj.weight"] = Slot(a + ("wkv_b",), idx, "linear")
    else:
        for n in ("q", "k", "v"):
            e[f"{hf}.self_attn.{n}_proj.weight"] = Slot(a + (f"w{n}",), idx, "linear")
        if cfg.qk_norm:
            e[f"{hf}.self_attn.q_norm.weight"] = Slot(a + ("q_norm",), idx, "copy")
            e[f"{hf}.self_attn.k_norm.weight"] = Slot(a + ("k_norm",), idx, "copy")
    e[f"{hf}.self_attn.o_proj.weight"] = Slot(a + ("wo",), idx, "linear2")  # [N, H, D]
    return e


def _mlp_entries(hf_prefix: str, path: tuple, idx: tuple, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, Slot]:
    g, u, d = names
    return {
        f"{hf_prefix}.{g}.weight": Slot(path + ("w_gate_up",), idx + (_ALL, 0, _ALL), "linear"),
        f"{hf_prefix}.{u}.weight": Slot(path + ("w_gate_up",), idx + (_ALL, 1, _ALL), "linear"),
        f"{hf_prefix}.{d}.weight": Slot(path + ("w_down",), idx, "linear"),
    }


def _block_entries(cfg: ModelConfig, model_type: str, hf: str, base: tuple, idx: tuple, kind: str,
                   fused: bool) -> dict[str, Slot]:
    e = {
        f"{hf}.input_layernorm.weight": Slot(base + ("attn_norm", "weight"), idx, "copy"),
        f"{hf}.post_attention_layernorm.weight": Slot(base + ("ffn_norm", "weight"), idx, "copy"),
    }
    e.update(_attention_entries(cfg, hf, base, idx))
    f = base + ("ffn",)
    if kind == "dense":
        e.update(_mlp_entries(f"{hf}.mlp", f, idx))
        return e
    moe = f"{hf}.block_sparse_moe" if (model_type == "mixtral" and not fused) else f"{hf}.mlp"
    e[f"{moe}.gate.weight"] = Slot(f + ("w_router",), idx, "linear")
    if cfg.use_score_correction_bias:
        e[f"{moe}.gate.e_score_correction_bias"] = Slot(f + ("bias",), idx, "copy")
    if fused:
        e[f"{moe}.experts.gate_up_proj"] = Slot(f + ("w_gate_up",), idx, "fused_gate_up")
        e[f"{moe}.experts.down_proj"] = Slot(f + ("w_down",), idx, "fused_down")
    else:
        names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for x in range(cfg.n_routed_experts):
            e.update(_mlp_entries(f"{moe}.experts.{x}", f, idx + (x,), names))
    if cfg.n_shared_experts:
        e.update(_mlp_entries(f"{hf}.mlp.shared_experts", f + ("shared",), idx))
    return e


def hf_entries(cfg: ModelConfig, model_type: str, fused: bool = False) -> dict[str, Slot]:
    """All Hugging Face tensor names for cfg, each with its moejax slot.

    fused=False gives the on-disk per-expert names save_pretrained writes; fused=True gives
    transformers' in-memory layout (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]).
    """
    e = {"model.embed_tokens.weight": Slot(("embed",), (), "copy"),
         "model.norm.weight": Slot(("norm", "weight"), (), "copy")}
    if not cfg.tie_word_embeddings:
        e["lm_head.weight"] = Slot(("lm_head",), (), "linear")
    layer = 0
    for s, (kind, n) in enumerate(segments_of(cfg)):
        for j in range(n):
            e.update(_block_entries(cfg, model_type, f"model.layers.{layer}", ("segments", s), (j,), kind, fused))
            layer += 1
    for k in range(cfg.mtp_depth):  # DeepSeek-V3 stores MTP depth k as layer num_layers + k
        hf = f"model.layers.{cfg.num_layers + k}"
        base = ("mtp", k)
        e[f"{hf}.enorm.weight"] = Slot(base + ("enorm", "weight"), (), "copy")
        e[f"{hf}.hnorm.weight"] = Slot(base + ("hnorm", "weight"), (), "copy")
        e[f"{hf}.eh_proj.weight"] = Slot(base + ("eh_proj",), (), "linear")
        e[f"{hf}.shared_head.norm.weight"] = Slot(base + ("norm", "weight"), (), "copy")
        e.update(_block_entries(cfg, model_type, hf, base + ("block",), (), "moe" if cfg.n_routed_experts else "dense", fused))
    return e


# Tensors a checkpoint may hold that moejax derives or shares (MTP copies of embedding and head).
def ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.num_layers + k}"
        if name in (f"{hf}.embed_tokens.weight", f"{hf}.shared_head.head.weight"):
            return True
    return False


# ----------------------------------------------------------------------------------- reading


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return [os.path.join(path, x) for x in found]


def _raw_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
FP8_DTYPES = tuple(np.dtype(t) for t in _RAW_DTYPES.values())


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields (name, array, file) one tensor at a time. float8 tensors, which safetensors' numpy
    backend cannot return, are memory-mapped from the file directly."""
    for file in files:
        header, offset = _raw_header(file)
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                info = header[name]
                if info["dtype"] in _RAW_DTYPES:
                    start, end = info["data_offsets"]
                    arr = np.memmap(file, dtype=_RAW_DTYPES[info["dtype"]], mode="r", offset=offset + start,
                                    shape=tuple(info["shape"]))
                    yield name, arr, file
                else:
                    yield name, f.get_tensor(name), file


def checkpoint_names(files: list[str]) -> set[str]:
    """Every tensor name in the files, read from their headers only."""
    names: set[str] = set()
    for file in files:
        names.update(k for k in _raw_header(file)[0] if k != "__metadata__")
    return names


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """DeepSeek-V3 FP8 weights: w [out, in] * scale_inv broadcast over block x block tiles."""
    out, inn = w.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:out, :inn]
    return w.astype(np.float32) * s


def assign(buffers: dict[tuple, np.ndarray], slot: Slot, x: np.ndarray, name: str):
    target = buffers[slot.path]
    view_shape = target[slot.index].shape
    try:
        value = to_slot(np.asarray(x, dtype=np.float32), slot.rule, view_shape)
    except ValueError:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not fit moejax parameter "
                         f"{'.'.join(map(str, slot.path))}{list(slot.index) if slot.index else ''} of shape {view_shape}") from None
    if value.shape != view_shape:
        raise ValueError(f"{name}: expected shape {view_shape} after layout change, got {value.shape}")
    target[slot.index] = value.astype(target.dtype)


def hf_shape(slot: Slot, buffers: dict[tuple, np.ndarray]) -> tuple:
    view = buffers[slot.path][slot.index]
    if slot.rule in ("linear", "linear2"):
        n_in = 1 if slot.rule == "linear" else 2
        return (int(np.prod(view.shape[n_in:])), int(np.prod(view.shape[:n_in])))
    if slot.rule == "fused_gate_up":
        E, D, _, F = view.shape
        return (E, 2 * F, D)
    if slot.rule == "fused_down":
        E, F, D = view.shape
        return (E, D, F)
    return view.shape


def export_tensor(slot: Slot, buffers: dict[tuple, np.ndarray]) -> np.ndarray:
    view = buffers[slot.path][slot.index]
    shp = hf_shape(slot, buffers)
    if slot.rule in ("linear", "linear2"):
        return np.ascontiguousarray(view.reshape(shp[1], shp[0]).T)
    if slot.rule == "fused_gate_up":
        return np.ascontiguousarray(np.swapaxes(view.reshape(view.shape[0], view.shape[1], -1), 1, 2))
    if slot.rule == "fused_down":
        return np.ascontiguousarray(np.swapaxes(view, 1, 2))
    return np.ascontiguousarray(view)


def describe_missing(missing: list[str], limit: int = 8) -> str:
    more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
    return ", ".join(missing[:limit]) + more

