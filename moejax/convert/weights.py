"""Tensor-by-tensor mapping between Hugging Face checkpoints and moejax parameters.

Every Hugging Face tensor maps to one *slot*: a moejax parameter path, an index into it (layer of
a stacked segment, expert, gate/up half) and a layout rule. The parameter indexed by the slot is
the slot's *view*. Each rule is a transpose of the Hugging Face tensor followed by a reshape that
only splits axes (`layout`), so a region of the view maps back to a region of the tensor
(moejax.convert.regions) and loading can read just the part of a tensor a device shard needs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.config import ModelConfig
from moejax.model.transformer import segments_of

_ALL = slice(None)
RULES = ("copy", "linear", "linear2", "fused_gate_up", "fused_down")


@dataclasses.dataclass(frozen=True)
class Slot:
    path: tuple  # key path into nnx.state(model)
    index: tuple  # index into the parameter array
    rule: str  # 'copy' | 'linear' | 'linear2' | 'fused_gate_up' | 'fused_down'


def layout(rule: str, view: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """How a Hugging Face tensor becomes a slot view of shape `view`: (perm, groups).

    The view is `hf.transpose(perm).reshape(sum(groups, ()))`: transposed axis i (Hugging Face axis
    perm[i]) splits into the view dims groups[i], so Hugging Face axis perm[i] has size
    prod(groups[i]).
      copy           [*S] -> [*S]
      linear         torch Linear [out, in] -> [in, *out]  (e.g. wq [D, N, H] from [N*H, D])
      linear2        [out, in] -> [*in, out]               (wo [N, H, D] from [D, N*H])
      fused_gate_up  [E, 2F, D] -> [E, D, 2, F]
      fused_down     [E, D, F] -> [E, F, D]
    """
    v = tuple(view)
    if rule == "copy":
        return tuple(range(len(v))), tuple((n,) for n in v)
    if rule == "linear":
        return (1, 0), (v[:1], v[1:])
    if rule == "linear2":
        return (1, 0), (v[:2], v[2:])
    if rule == "fused_gate_up":
        return (0, 2, 1), ((v[0],), (v[1],), v[2:])
    if rule == "fused_down":
        return (0, 2, 1), ((v[0],), (v[1],), (v[2],))
    raise ValueError(f"unknown layout rule {rule!r}; known: {', '.join(RULES)}")


def view_shape(param_shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    """Shape of param[index] for an index of ints and slices (no array needed)."""
    out = []
    for d, n in enumerate(param_shape):
        s = index[d] if d < len(index) else _ALL
        if not isinstance(s, int):
            out.append(len(range(*s.indices(n))))
    return tuple(out)


def hf_shape(slot: Slot, view: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face tensor shape whose layout change gives a view of shape `view`."""
    perm, groups = layout(slot.rule, view)
    shape = [0] * len(perm)
    for axis, g in zip(perm, groups):
        shape[axis] = math.prod(g)
    return tuple(shape)


def export_tensor(slot: Slot, view: np.ndarray) -> np.ndarray:
    """A slot view (param[slot.index]) -> its Hugging Face tensor, contiguous."""
    perm, groups = layout(slot.rule, view.shape)
    x = view.reshape([math.prod(g) for g in groups])  # [hf[perm[0]], hf[perm[1]], ...]
    return np.ascontiguousarray(x.transpose(np.argsort(perm)))


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
        if cfg.index_topk:  # DeepSeek Sparse Attention's lightning indexer (deepseek_v32)
            i, n = a + ("indexer",), f"{hf}.self_attn.indexer"
            e[f"{n}.wq_b.weight"] = Slot(i + ("wq_b",), idx, "linear")  # [Rq, Hi, Di]
            e[f"{n}.wk.weight"] = Slot(i + ("wk",), idx, "linear")  # [D, Di]
            e[f"{n}.k_norm.weight"] = Slot(i + ("k_norm", "weight"), idx, "copy")
            e[f"{n}.k_norm.bias"] = Slot(i + ("k_norm", "bias"), idx, "copy")
            e[f"{n}.weights_proj.weight"] = Slot(i + ("weights_proj",), idx, "linear")  # [D, Hi]
    else:
        for n in ("q", "k", "v"):
            e[f"{hf}.self_attn.{n}_proj.weight"] = Slot(a + (f"w{n}",), idx, "linear")
        if cfg.qk_norm:
            e[f"{hf}.self_attn.q_norm.weight"] = Slot(a + ("q_norm",), idx, "copy")
            e[f"{hf}.self_attn.k_norm.weight"] = Slot(a + ("k_norm",), idx, "copy")
    e[f"{hf}.self_attn.o_proj.weight"] = Slot(a + ("wo",), idx, "linear2")  # [N, H, D]
    return e


def _mlp_entries(
    hf_prefix: str, path: tuple, idx: tuple, names=("gate_proj", "up_proj", "down_proj")
) -> dict[str, Slot]:
    g, u, d = names
    return {
        f"{hf_prefix}.{g}.weight": Slot(path + ("w_gate_up",), idx + (_ALL, 0, _ALL), "linear"),
        f"{hf_prefix}.{u}.weight": Slot(path + ("w_gate_up",), idx + (_ALL, 1, _ALL), "linear"),
        f"{hf_prefix}.{d}.weight": Slot(path + ("w_down",), idx, "linear"),
    }


def _block_entries(
    cfg: ModelConfig, model_type: str, hf: str, base: tuple, idx: tuple, kind: str, fused: bool
) -> dict[str, Slot]:
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
    e[f"{moe}.gate.weight"] = Slot(f + ("router", "w"), idx, "linear")
    if cfg.router.use_score_correction_bias:
        e[f"{moe}.gate.e_score_correction_bias"] = Slot(f + ("router", "bias"), idx, "copy")
    if fused:
        e[f"{moe}.experts.gate_up_proj"] = Slot(f + ("w_gate_up",), idx, "fused_gate_up")
        e[f"{moe}.experts.down_proj"] = Slot(f + ("w_down",), idx, "fused_down")
    else:
        names = (
            ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        )
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
    e = {
        "model.embed_tokens.weight": Slot(("embed",), (), "copy"),
        "model.norm.weight": Slot(("norm", "weight"), (), "copy"),
    }
    if not cfg.tie_word_embeddings:
        e["lm_head.weight"] = Slot(("lm_head",), (), "linear")
    layer = 0
    for s, (kind, n) in enumerate(segments_of(cfg)):
        for j in range(n):
            e.update(
                _block_entries(
                    cfg, model_type, f"model.layers.{layer}", ("segments", s), (j,), kind, fused
                )
            )
            layer += 1
    for k in range(cfg.mtp_depth):  # DeepSeek-V3 stores MTP depth k as layer num_layers + k
        hf = f"model.layers.{cfg.num_layers + k}"
        base = ("mtp", k)
        e[f"{hf}.enorm.weight"] = Slot(base + ("enorm", "weight"), (), "copy")
        e[f"{hf}.hnorm.weight"] = Slot(base + ("hnorm", "weight"), (), "copy")
        e[f"{hf}.eh_proj.weight"] = Slot(base + ("eh_proj",), (), "linear")
        e[f"{hf}.shared_head.norm.weight"] = Slot(base + ("norm", "weight"), (), "copy")
        e.update(
            _block_entries(
                cfg,
                model_type,
                hf,
                base + ("block",),
                (),
                "moe" if cfg.n_routed_experts else "dense",
                fused,
            )
        )
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


def describe_missing(missing: list[str], limit: int = 8) -> str:
    more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
    return ", ".join(missing[:limit]) + more
