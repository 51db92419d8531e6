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


def _v4_block_entries(cfg: ModelConfig, hf: str, base: tuple, idx: tuple, kind) -> dict:
    """One DeepSeek-V4 layer in its checkpoint names (DeepSeek's release naming, which
    transformers' save_pretrained writes back)."""
    from moejax.model.v4 import CSA

    layer_type, hashed = kind
    a, f, at, fp = base + ("attn",), base + ("ffn",), f"{hf}.attn", f"{hf}.ffn"
    e = {
        f"{hf}.attn_norm.weight": Slot(base + ("attn_norm", "weight"), idx, "copy"),
        f"{hf}.ffn_norm.weight": Slot(base + ("ffn_norm", "weight"), idx, "copy"),
        f"{at}.wq_a.weight": Slot(a + ("wq_a",), idx, "linear"),
        f"{at}.q_norm.weight": Slot(a + ("q_norm", "weight"), idx, "copy"),
        f"{at}.wq_b.weight": Slot(a + ("wq_b",), idx, "linear"),  # [Rq, N, H]
        f"{at}.wkv.weight": Slot(a + ("wkv",), idx, "linear"),  # [D, H]
        f"{at}.norm.weight": Slot(a + ("kv_norm", "weight"), idx, "copy"),
        f"{at}.wo_a.weight": Slot(a + ("wo_a",), idx, "linear2"),  # [N/G, H, G, Ro]
        f"{at}.wo_b.weight": Slot(a + ("wo_b",), idx, "linear2"),  # [G, Ro, D]
        f"{at}.attn_sink": Slot(a + ("sinks",), idx, "copy"),
        f"{fp}.gate.weight": Slot(f + ("router", "w"), idx, "linear"),
    }
    for hc in ("attn", "ffn"):  # fn [(2 + n) n, n D] -> [n, D, (2 + n) n]
        e[f"{hf}.hc_{hc}_fn"] = Slot(base + (f"{hc}_hc", "fn"), idx, "linear2")
        e[f"{hf}.hc_{hc}_base"] = Slot(base + (f"{hc}_hc", "base"), idx, "copy")
        e[f"{hf}.hc_{hc}_scale"] = Slot(base + (f"{hc}_hc", "scale"), idx, "copy")

    def compressor(name, path):
        e[f"{name}.wkv.weight"] = Slot(path + ("wkv",), idx, "linear")  # [D, c, H]
        e[f"{name}.wgate.weight"] = Slot(path + ("wgate",), idx, "linear")
        e[f"{name}.ape"] = Slot(path + ("position_bias",), idx, "copy")  # [m, c H]
        e[f"{name}.norm.weight"] = Slot(path + ("norm", "weight"), idx, "copy")

    if cfg.compress_rate(layer_type):
        compressor(f"{at}.compressor", a + ("compressor",))
    if layer_type == CSA:
        i = a + ("indexer",)
        compressor(f"{at}.indexer.compressor", i + ("compressor",))
        e[f"{at}.indexer.wq_b.weight"] = Slot(i + ("wq_b",), idx, "linear")  # [Rq, Hi, Di]
        e[f"{at}.indexer.weights_proj.weight"] = Slot(i + ("weights_proj",), idx, "linear")
    if hashed:
        e[f"{fp}.gate.tid2eid"] = Slot(f + ("router", "table"), idx, "copy")  # int [V, K]
    elif cfg.router.use_score_correction_bias:
        e[f"{fp}.gate.bias"] = Slot(f + ("router", "bias"), idx, "copy")
    for x in range(cfg.n_routed_experts):
        e.update(_mlp_entries(f"{fp}.experts.{x}", f, idx + (x,), ("w1", "w3", "w2")))
    e.update(_mlp_entries(f"{fp}.shared_experts", f + ("shared",), idx, ("w1", "w3", "w2")))
    return e


def release_name(name: str) -> str:
    """A DeepSeek-V4 tensor name as transformers' save_pretrained writes it -> as DeepSeek's
    release checkpoints name it (no 'model.' prefix, embed / hc_head_* at the top)."""
    top = {
        "model.embed_tokens.weight": "embed.weight",
        "model.hc_head.hc_fn": "hc_head_fn",
        "model.hc_head.hc_base": "hc_head_base",
        "model.hc_head.hc_scale": "hc_head_scale",
    }
    if name in top:
        return top[name]
    return name[len("model.") :] if name.startswith("model.") else name


def _v4_entries(cfg: ModelConfig) -> dict[str, Slot]:
    from moejax.model.transformer import v4_kinds

    e = {
        "model.embed_tokens.weight": Slot(("embed",), (), "copy"),
        "model.norm.weight": Slot(("norm", "weight"), (), "copy"),
        "head.weight": Slot(("lm_head",), (), "linear"),
        "model.hc_head.hc_fn": Slot(("hc_head", "fn"), (), "linear2"),
        "model.hc_head.hc_base": Slot(("hc_head", "base"), (), "copy"),
        "model.hc_head.hc_scale": Slot(("hc_head", "scale"), (), "copy"),
    }
    layer = 0  # segment s stacks groups of len(kinds) layers: layer j of group g
    for s, ((_, n), kinds) in enumerate(zip(segments_of(cfg), v4_kinds(cfg))):
        for g in range(n // len(kinds)):
            for j, kind in enumerate(kinds):
                base = ("segments", s, "blocks", j)
                e.update(_v4_block_entries(cfg, f"model.layers.{layer}", base, (g,), kind))
                layer += 1
    return e


def hf_entries(
    cfg: ModelConfig, model_type: str, fused: bool = False, release: bool = False
) -> dict[str, Slot]:
    """All Hugging Face tensor names for cfg, each with its moejax slot.

    fused=False gives the on-disk per-expert names save_pretrained writes; fused=True gives
    transformers' in-memory layout (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]).
    DeepSeek-V4 has its on-disk names only: save_pretrained's (release=False) or those of
    DeepSeek's release checkpoints (release=True, `release_name`).
    """
    if model_type == "deepseek_v4":
        e = _v4_entries(cfg)
        return {release_name(n): s for n, s in e.items()} if release else e
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
    if cfg.attention_type == "v4" and name.startswith(("mtp.", "model.mtp.")):
        return True  # V4's MTP module is not built (ModelConfig refuses mtp_depth with V4)
    for k in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.num_layers + k}"
        if name in (f"{hf}.embed_tokens.weight", f"{hf}.shared_head.head.weight"):
            return True
    return False


def describe_missing(missing: list[str], limit: int = 8) -> str:
    more = f" (+{len(missing) - limit} more)" if len(missing) > limit else ""
    return ", ".join(missing[:limit]) + more
