"""LoRA: low-rank adapters on attention, dense and shared MLPs, and the routed experts.

`apply(model, cfg)` freezes every base weight (`Frozen`, outside `nnx.Param`, so the optimizer never
sees it) and gives each weight whose path matches a target pattern two trainable factors
(`LoRAParam`):

    W [lead..., in..., out...]  ->  A [lead..., in..., Z] (uniform, +-1/sqrt(fan_in)),
                                    B [lead..., Z, out...] (0)

applied as W x + (alpha / Z) B (A dropout(x)) on the activations (`moejax.model.layers.project`).
`lead` is the experts axis of the routed experts: each expert has its own factors, run as grouped
matmuls on the rows the dispatch sorted by expert (`moejax.model.moe_ep.expert_ffn`: dropless and
the expert-parallel exchange alike; the dense and capacity references run the merged weights). B
starts at zero, so an adapted model computes exactly its base. The factors carry logical axes
derived from their weight's (A keeps the input axes, B the output axes), so they shard with it on
any mesh.

`merge` folds the adapters into the weights and returns a plain model (what inference, export and
`to_hf` take); `unmerge` takes them out again. `adapter_state` / `save_adapters` / `load_adapters`
keep them alone. Qwix's LoRA intercepts dot_general/einsum and would miss the grouped matmul, hence
this module.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError, LoRAConfig

# the input (contracted) axes of each adaptable weight, counted from the end of its own shape
INPUT_AXES = {
    "wq_a": (-2,),
    "wkv_a": (-2,),  # [D, R]
    "wq": (-3,),
    "wq_b": (-3,),
    "wkv_b": (-3,),
    "wk": (-3,),
    "wv": (-3,),  # [in, N, H]
    "wo": (-3, -2),  # [N, H, D]
    "w_gate_up": (-3,),  # [(E,) D, 2, F]
    "w_down": (-2,),  # [(E,) F, D]
}


class Frozen(nnx.Variable):
    """A base weight (or router bias) that fine-tuning with adapters leaves unchanged."""


class LoRAParam(nnx.Param):
    """A trainable low-rank factor."""


def _path(path, name, module=None) -> str:
    """'segments/1/attn/wq_b'; a MoE layer's routed expert weights read
    'segments/1/ffn/experts/w_down' (the shared experts are 'ffn/shared/...', a dense layer's MLP
    'ffn/w_down')."""
    from moejax.model.moe import MoE

    path = tuple(path) + (("experts",) if isinstance(module, MoE) else ())
    return "/".join(str(p) for p in path + (name,))


def _regex(pattern: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from None


def targets(model, patterns) -> list[tuple[str, object, str]]:
    """(path, module, weight name) of every adaptable weight a pattern matches (re.search on the
    path). A pattern that matches none is an error naming it."""
    from moejax.model.dsa import Indexer
    from moejax.model.v4 import V4Indexer

    found, used = [], set()
    for path, module in nnx.iter_modules(model):
        if isinstance(
            module, (Indexer, V4Indexer)
        ):  # its own small projections, trained on its KL loss only
            continue
        for name in INPUT_AXES:
            var = getattr(module, name, None)
            if not isinstance(var, (nnx.Param, Frozen)) or isinstance(var, LoRAParam):
                continue
            p = _path(path, name, module)
            hits = [pat for pat in patterns if _regex(pat).search(p)]
            if hits:
                found.append((p, module, name))
                used.update(hits)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(
            f"lora.targets: pattern {unused[0]!r} matches no adaptable weight (adaptable: "
            f"{', '.join(sorted(INPUT_AXES))} of attention, MLP, shared and routed experts; e.g. "
            "'attn/', 'ffn/experts', 'ffn/shared', 'segments/0/ffn/w_down')"
        )
    return found


def _factor_shapes(w, axes: tuple, name: str, rank: int):
    n = len(axes)
    stack, tail = w.shape[: w.ndim - n], w.shape[w.ndim - n :]
    pos = sorted(n + i for i in INPUT_AXES[name])
    c0, c1 = pos[0], pos[-1] + 1
    lead, ins, outs = tail[:c0], tail[c0:c1], tail[c1:]
    a_shape = stack + lead + ins + (rank,)
    b_shape = stack + lead + (rank,) + outs
    a_axes = axes[:c0] + axes[c0:c1] + (None,)
    b_axes = axes[:c0] + (None,) + axes[c1:]
    return a_shape, a_axes, b_shape, b_axes, math.prod(ins)


def apply(model, cfg: LoRAConfig, rngs: nnx.Rngs):
    """Freezes the model's weights and router biases and adds the adapters cfg names (in place)."""
    if not cfg.rank:
        return model
    found = targets(model, cfg.targets)
    if cfg.dropout:
        for p, module, _name in found:
            if "experts" in p and getattr(module, "dispatch", "") in ("dense", "capacity"):
                raise ConfigError(
                    f"lora.dropout: routed experts under execution.moe_impl={module.dispatch!r} "
                    "run merged weights, which cannot drop adapter inputs; use 'dropless' or "
                    "lora.dropout=0"
                )
    for _, module, name in found:
        w = getattr(module, name)
        axes = tuple(w.get_metadata().get("logical_axes", ()) or ())
        a_shape, a_axes, b_shape, b_axes, fan_in = _factor_shapes(w, axes, name, cfg.rank)
        bound = 1.0 / math.sqrt(fan_in)
        # float32 factors whatever the base's dtype (as PEFT keeps them); the matmuls run in
        # compute_dtype
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        setattr(module, name + "_lora_a", LoRAParam(a, logical_axes=a_axes))
        setattr(
            module,
            name + "_lora_b",
            LoRAParam(jnp.zeros(b_shape, jnp.float32), logical_axes=b_axes),
        )
        module.lora_scale = cfg.alpha / cfg.rank
        module.lora_dropout = cfg.dropout
    freeze(model)
    return model


def freeze(model):
    """Every nnx.Param that is not an adapter, and every router bias, becomes Frozen (in place)."""
    from moejax.model import RouterBias

    for _, module in nnx.iter_modules(model):
        for name, var in list(vars(module).items()):
            if isinstance(var, (nnx.Param, RouterBias)) and not isinstance(var, LoRAParam):
                setattr(module, name, Frozen(var.get_value(), **_meta(var)))
    return model


def _meta(var) -> dict:
    return {k: v for k, v in var.get_metadata().items() if k == "logical_axes"}


def has_adapters(model) -> bool:
    return any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(model))


def _adapted(model):
    for path, module in nnx.iter_modules(model):
        for name in INPUT_AXES:
            if getattr(module, name + "_lora_a", None) is not None:
                yield _path(path, name, module), module, name


def _delta(module, name):
    a, b = getattr(module, name + "_lora_a")[...], getattr(module, name + "_lora_b")[...]
    w = getattr(module, name)
    n = len(w.get_metadata().get("logical_axes", ()) or ())
    pos = sorted(n + i for i in INPUT_AXES[name])
    c1 = pos[-1] + 1  # A is [stack, lead, ins, Z], B [stack, lead, Z, outs]: contract Z
    lead = a.ndim - 1 - (c1 - pos[0])  # stack + lead dims, shared by A and B
    ins, outs = a.shape[lead:-1], b.shape[lead + 1 :]
    a2 = a.reshape(a.shape[:lead] + (math.prod(ins), a.shape[-1]))  # [..., I, Z]
    b2 = b.reshape(b.shape[:lead] + (b.shape[lead], math.prod(outs)))  # [..., Z, O]
    d = jnp.einsum("...IZ,...ZO->...IO", a2.astype(jnp.float32), b2.astype(jnp.float32))
    return (module.lora_scale * d).reshape(a.shape[:lead] + ins + outs)


def merge(model):
    """A plain model (nnx.Params, router biases) with W + (alpha / Z) A B in every adapted weight;
    the argument is unchanged. Inference, export and to_hf take this."""
    from moejax.model import RouterBias
    from moejax.model.router import HashTable, Router

    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)  # a copy of the structure over the same arrays
    for _, module, name in list(_adapted(out)):
        w = getattr(module, name)
        merged = (w[...].astype(jnp.float32) + _delta(module, name)).astype(w.dtype)
        setattr(module, name, Frozen(merged, **_meta(w)))
        delattr(module, name + "_lora_a")
        delattr(module, name + "_lora_b")
    for _, module in nnx.iter_modules(out):
        if hasattr(module, "lora_scale"):
            del module.lora_scale, module.lora_dropout
    for _, module in nnx.iter_modules(out):
        for name, var in list(vars(module).items()):
            if isinstance(var, Frozen):
                kind = nnx.Param
                if isinstance(module, Router) and name == "bias":
                    kind = RouterBias
                elif isinstance(module, Router) and name == "table":  # V4's hash routing
                    kind = HashTable
                setattr(module, name, kind(var.get_value(), **_meta(var)))
    return out


def unmerge(merged, adapted):
    """The inverse of `merge`: a copy of `adapted` (a model with adapters) whose frozen weights are
    `merged`'s minus those adapters."""
    graphdef, state = nnx.split(adapted)
    out = nnx.merge(graphdef, state)
    source = dict(nnx.iter_modules(merged))
    for path, module in nnx.iter_modules(out):
        for name, var in list(vars(module).items()):
            if isinstance(var, Frozen):
                value = getattr(source[path], name)[...]
                if name in INPUT_AXES and getattr(module, name + "_lora_a", None) is not None:
                    value = (value.astype(jnp.float32) - _delta(module, name)).astype(var.dtype)
                setattr(module, name, Frozen(value, **_meta(var)))
    return out


def adapter_state(model) -> nnx.State:
    return nnx.state(model, LoRAParam)


def count(model) -> tuple[int, int]:
    """(adapter parameters, all parameters including frozen)."""
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param, Frozen)))
    return lora, total


def save_adapters(model, path: str, cfg: LoRAConfig) -> None:
    """The adapters alone: adapters.safetensors (flat path names) + adapter_config.json."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    flat = {
        "/".join(map(str, k)): jax.device_get(v.get_value())
        for k, v in nnx.to_flat_state(adapter_state(model))
    }
    tmp = os.path.join(path, "adapters.safetensors.tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(path, "adapters.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(
            {
                "rank": cfg.rank,
                "alpha": cfg.alpha,
                "dropout": cfg.dropout,
                "targets": list(cfg.targets),
            },
            f,
            indent=2,
        )


def load_adapters(model, path: str) -> None:
    """Sets a model's adapters (built with the same LoRA config) from `save_adapters` output, in
    place."""
    from safetensors.numpy import load_file

    saved = load_file(os.path.join(path, "adapters.safetensors"))
    for k, v in nnx.to_flat_state(adapter_state(model)):
        name = "/".join(map(str, k))
        if name not in saved:
            raise ValueError(f"{path}: no adapter {name!r}")
        if saved[name].shape != v.get_value().shape:
            raise ValueError(
                f"{path}: adapter {name!r} has shape {saved[name].shape}, the model "
                f"{v.get_value().shape}"
            )
        v.set_value(jnp.asarray(saved[name], v.get_value().dtype))
