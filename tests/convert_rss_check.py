"""Sharded Hugging Face loading, run in a process with 8 CPU devices (see test_convert_sharded.py).

  python -m tests.convert_rss_check big DIR    writes a >= 1 GB DeepSeek-V3 checkpoint with numpy +
      safetensors, loads it onto an fsdp=2 x expert=4 mesh in bfloat16 while measuring the peak RSS
      increase, checks the shardings and compares logits with a one-device load.
  python -m tests.convert_rss_check small DIR  round trips, FP8 tiles cut by shards, mesh errors.

The last stdout line is a JSON dict of results.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from moejax.config import ExecutionConfig, MeshConfig, ModelConfig
from moejax.convert.hf_config import to_hf_config
from tests.helpers import TINY_MLA

BIG = ModelConfig(
    vocab_size=2048,
    hidden_size=1024,
    num_layers=4,
    num_heads=8,
    intermediate_size=2048,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=64,
    num_experts_per_tok=4,
    n_shared_experts=1,
    moe_intermediate_size=1024,
    first_k_dense_replace=1,
    compute_dtype="float32",
    param_dtype="bfloat16",
)
DENSE = ExecutionConfig(moe_impl="dense")  # the reference dispatch: the logits compared


# ------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Resets VmHWM (the peak resident set) to the current RSS; returns the RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


# ------------------------------------------------------------------------------ checkpoint


def deepseek_v3_tensors(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, kind) of a DeepSeek-V3 checkpoint as save_pretrained names it (MTP layers
    included), written out here independently of moejax's own mapping. kind: 'w', 'norm' or
    'bias'."""
    D, V, N, E, F = (
        c.hidden_size,
        c.vocab_size,
        c.num_heads,
        c.n_routed_experts,
        c.moe_intermediate_size,
    )
    Hn, Hr, Hv, Rq, R = (
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.q_lora_rank,
        c.kv_lora_rank,
    )
    t = {
        "model.embed_tokens.weight": ((V, D), "w"),
        "model.norm.weight": ((D,), "norm"),
        "lm_head.weight": ((V, D), "w"),
    }

    def layer(p: str, moe: bool):
        t.update(
            {
                f"{p}.input_layernorm.weight": ((D,), "norm"),
                f"{p}.post_attention_layernorm.weight": ((D,), "norm"),
                f"{p}.self_attn.q_a_proj.weight": ((Rq, D), "w"),
                f"{p}.self_attn.q_a_layernorm.weight": ((Rq,), "norm"),
                f"{p}.self_attn.q_b_proj.weight": ((N * (Hn + Hr), Rq), "w"),
                f"{p}.self_attn.kv_a_proj_with_mqa.weight": ((R + Hr, D), "w"),
                f"{p}.self_attn.kv_a_layernorm.weight": ((R,), "norm"),
                f"{p}.self_attn.kv_b_proj.weight": ((N * (Hn + Hv), R), "w"),
                f"{p}.self_attn.o_proj.weight": ((D, N * Hv), "w"),
            }
        )
        mlps = {f"{p}.mlp": c.intermediate_size}
        if moe:
            mlps = {
                **{f"{p}.mlp.experts.{e}": F for e in range(E)},
                f"{p}.mlp.shared_experts": F * c.n_shared_experts,
            }
            t[f"{p}.mlp.gate.weight"] = ((E, D), "w")
            t[f"{p}.mlp.gate.e_score_correction_bias"] = ((E,), "bias")
        for m, inter in mlps.items():
            t.update(
                {
                    f"{m}.gate_proj.weight": ((inter, D), "w"),
                    f"{m}.up_proj.weight": ((inter, D), "w"),
                    f"{m}.down_proj.weight": ((D, inter), "w"),
                }
            )

    for i in range(c.num_layers):
        layer(f"model.layers.{i}", i >= c.first_k_dense_replace)
    for k in range(
        c.mtp_depth
    ):  # MTP depth k is layer num_layers + k, with copies of embedding and head
        p = f"model.layers.{c.num_layers + k}"
        t.update(
            {
                f"{p}.enorm.weight": ((D,), "norm"),
                f"{p}.hnorm.weight": ((D,), "norm"),
                f"{p}.eh_proj.weight": ((D, 2 * D), "w"),
                f"{p}.shared_head.norm.weight": ((D,), "norm"),
                f"{p}.embed_tokens.weight": ((V, D), "w"),
                f"{p}.shared_head.head.weight": ((V, D), "w"),
            }
        )
        layer(p, True)
    return t


def write_checkpoint(path: str, c: ModelConfig, file_bytes: int = 300 << 20, seed: int = 0) -> int:
    """A bfloat16 DeepSeek-V3 checkpoint in several files; returns its tensor bytes.

    Weights are windows at random offsets into one pool of N(0, 0.02) values, so every tensor (and
    every expert) differs while the whole checkpoint never sits in memory at once."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(1 << 24, dtype=np.float32)).astype(
        ml_dtypes.bfloat16
    )  # 32 MiB
    files, cur, size, total = [], {}, 0, 0

    def flush():
        nonlocal cur, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(cur, os.path.join(path, name), metadata={"format": "pt"})
        files.append((name, list(cur)))
        cur, size = {}, 0

    for name, (shape, kind) in deepseek_v3_tensors(c).items():
        n = math.prod(shape)
        if kind == "w":
            off = int(rng.integers(0, pool.size - n))
            x = pool[off : off + n].reshape(shape)
        elif kind == "norm":
            x = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        else:
            x = (
                (0.05 * rng.standard_normal(shape, dtype=np.float32))
                .astype(ml_dtypes.bfloat16)
                .astype(np.float32)
            )
        if size and size + x.nbytes > file_bytes:
            flush()
        cur[name] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    weight_map = {n: f for f, names in files for n in names}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(c, "deepseek_v3"), f)
    return total


# -------------------------------------------------------------------------- helpers (jax from here)


def _logits(model, ids):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, ids))


def _flat(model):
    from flax import nnx

    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def _shardings_match(model, mesh, rules=None) -> list[str]:
    """Parameters whose sharding is not the one moejax.sharding's rules give (empty when all
    match)."""
    from flax import nnx

    from moejax import sharding

    want = dict(
        nnx.to_flat_state(
            sharding.tree_shardings(nnx.state(model), mesh, rules or sharding.DEFAULT_RULES)
        )
    )
    return [
        str(p)
        for p, x in _flat(model).items()
        if not x.sharding.is_equivalent_to(want[p].get_value(), x.ndim)
    ]


# ------------------------------------------------------------------------------ big


def big(path: str) -> dict:
    import time

    t0 = time.time()
    disk = write_checkpoint(path, BIG)
    t_write = time.time() - t0
    gc.collect()

    import jax

    from moejax import sharding
    from moejax.convert import from_hf

    jax.devices()  # the baseline includes jax's runtime
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
    gc.collect()
    base = reset_peak_rss()
    t0 = time.time()
    model, cfg = from_hf(path, mesh=mesh, dtype="bfloat16", execution=DENSE)
    jax.block_until_ready(_flat(model))
    t_load = time.time() - t0
    peak = peak_rss() - base
    flat = _flat(model)
    model_bytes = sum(x.nbytes for x in flat.values())  # logical size in the target dtype
    device_bytes = sum(
        s.data.nbytes for x in flat.values() for s in x.addressable_shards
    )  # with replicas
    dtypes = sorted({str(x.dtype) for x in flat.values()})
    wrong = _shardings_match(model, mesh)
    ids = np.random.default_rng(1).integers(0, BIG.vocab_size, (2, 8)).astype(np.int32)
    t0 = time.time()
    sharded = _logits(model, ids)
    t_logits = time.time() - t0
    del model, flat
    gc.collect()
    t0 = time.time()
    single, _ = from_hf(path, dtype="bfloat16", execution=DENSE)
    t_single = time.time() - t0
    ref = _logits(single, ids)
    return {
        "disk_bytes": disk,
        "model_bytes": model_bytes,
        "device_bytes": device_bytes,
        "rss_base": base,
        "rss_peak_increase": peak,
        "ratio": peak / model_bytes,
        "dtypes": dtypes,
        "wrong_shardings": wrong,
        "max_abs_logit": float(np.abs(ref).max()),
        "max_logit_diff": float(np.abs(sharded - ref).max()),
        "seconds": {
            "write": t_write,
            "sharded_load": t_load,
            "logits": t_logits,
            "single_load": t_single,
        },
        "param_dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------------------ small

SMALL = TINY_MLA.replace(num_layers=3)
MESHES = {
    "fsdp2_expert4": (MeshConfig(fsdp=2, expert=4), ""),
    "fsdp2_tensor2_stage2_embed_rule": (MeshConfig(fsdp=2, tensor=2, stage=2), "embed=fsdp+tensor"),
}
# hidden 384 = 3 FP8 tiles of 128; fsdp=2 cuts the middle tile at 192
FP8_CFG = SMALL.replace(hidden_size=384, num_layers=2, mtp_depth=0)


def _files(path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _rewrite(path: str, change) -> None:
    """Applies change(tensors) (in place, may add and delete) to every file of a checkpoint; new
    tensors go to the first file, and the index is rewritten."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    weight_map = {}
    for i, f in enumerate(files):
        tensors = load_file(os.path.join(path, f))
        change(tensors, first=i == 0)
        save_file(tensors, os.path.join(path, f), metadata={"format": "pt"})
        weight_map.update({n: f for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def _quantize(path: str, names: list[str]) -> dict[str, np.ndarray]:
    """Rewrites the named tensors as FP8 with random 128x128 block scales; returns their
    whole-tensor dequantization."""
    from moejax.convert.safetensors_io import dequantize_fp8

    rng = np.random.default_rng(0)
    want = {}

    def change(tensors, first):
        for n in names:
            if n in tensors:
                w = tensors[n].astype(np.float32)
                scale = rng.uniform(
                    0.5, 2.0, (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
                ).astype(np.float32)
                s = np.repeat(np.repeat(scale, 128, 0), 128, 1)[
                    : w.shape[0], : w.shape[1]
                ]  # [out, in]
                tensors[n] = (w / s).astype(ml_dtypes.float8_e4m3fn)
                tensors[n + "_scale_inv"] = scale
                want[n] = dequantize_fp8(tensors[n], scale)

    _rewrite(path, change)
    return want


def _fuse_experts(path: str, prefix: str, n_experts: int) -> None:
    """One layer's per-expert tensors -> transformers' fused experts.gate_up_proj [E, 2F, D],
    down_proj [E, D, F]."""
    per = {}

    def collect(tensors, first):
        for n in [n for n in tensors if n.startswith(prefix + ".")]:
            per[n] = tensors.pop(n)

    _rewrite(path, collect)

    def add(tensors, first):
        if first:
            tensors[f"{prefix}.gate_up_proj"] = np.stack(
                [
                    np.concatenate(
                        [per[f"{prefix}.{e}.gate_proj.weight"], per[f"{prefix}.{e}.up_proj.weight"]]
                    )
                    for e in range(n_experts)
                ]
            )
            tensors[f"{prefix}.down_proj"] = np.stack(
                [per[f"{prefix}.{e}.down_proj.weight"] for e in range(n_experts)]
            )

    _rewrite(path, add)


def _host(model) -> dict:
    return {p: np.asarray(x) for p, x in _flat(model).items()}


def small(path: str) -> dict:
    import jax

    from moejax import sharding
    from moejax.convert import from_hf, load, to_hf

    res = {"devices": len(jax.devices())}
    src = os.path.join(path, "src")
    write_checkpoint(src, SMALL, file_bytes=20_000)  # several files
    original = _files(src)
    mtp_copies = {
        f"model.layers.{SMALL.num_layers}.{n}"
        for n in ("embed_tokens.weight", "shared_head.head.weight")
    }
    single = _host(from_hf(src)[0])
    for name, (mc, rules_text) in MESHES.items():
        mesh = sharding.make_mesh(mc)
        rules = sharding.rules_for(MeshConfig(rules=rules_text))
        loaded, cfg = from_hf(src, mesh=mesh, rules=rules)
        dst = os.path.join(path, name)
        to_hf(loaded, cfg, dst, shard_bytes=50_000)  # float32
        back = _files(dst)
        res[name] = {
            "wrong_shardings": _shardings_match(loaded, mesh, rules),
            "names_ok": set(back) == set(original) - mtp_copies,
            "unequal_after_round_trip": [
                n for n in back if not np.array_equal(original[n].astype(np.float32), back[n])
            ],
            "unequal_to_one_device": [
                str(p) for p, x in _host(loaded).items() if not np.array_equal(x, single[p])
            ],
            "specs": sorted({str(x.sharding.spec) for x in _flat(loaded).values()}),
        }

    # bfloat16 parameters on a mesh (the gather sums their 16-bit patterns) export exactly
    bf, cfg_bf = from_hf(
        src, mesh=sharding.make_mesh(MeshConfig(fsdp=2, expert=4)), dtype="bfloat16"
    )
    to_hf(bf, cfg_bf, os.path.join(path, "bf16"), dtype="bfloat16")
    back = _files(os.path.join(path, "bf16"))
    res["bf16_unequal"] = [
        n
        for n, x in back.items()
        if not np.array_equal(
            x.astype(np.float32), original[n].astype(ml_dtypes.bfloat16).astype(np.float32)
        )
    ]

    # moejax's own checkpoint restores straight into another mesh's shardings
    from moejax.convert.checkpoint import load_model, save_model

    save_model(loaded, cfg, os.path.join(path, "orbax"))
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
    restored, _ = load_model(os.path.join(path, "orbax"), mesh=mesh)
    res["load_model"] = {
        "wrong_shardings": _shardings_match(restored, mesh),
        "unequal_to_one_device": [
            str(p) for p, x in _host(restored).items() if not np.array_equal(x, single[p])
        ],
    }

    # transformers' fused expert layout, cut by expert and fsdp shards, gives the same parameters
    _fuse_experts(src, "model.layers.2.mlp.experts", SMALL.n_routed_experts)
    fused, _ = from_hf(src, mesh=sharding.make_mesh(MeshConfig(fsdp=2, expert=4)))
    res["fused_unequal"] = [
        str(p) for p, x in _host(fused).items() if not np.array_equal(x, single[p])
    ]

    # FP8 tiles cut by shards: the sharded load equals the whole-tensor dequantization.
    fp8 = os.path.join(path, "fp8")
    write_checkpoint(fp8, FP8_CFG)
    want = _quantize(
        fp8,
        ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight"],
    )
    m8, _ = from_hf(fp8, mesh=sharding.make_mesh(MeshConfig(fsdp=2, expert=4)))
    wq_a = m8.segments[0].attn.wq_a  # [1, D, Rq] <- q_a_proj [Rq, D]
    up = m8.segments[1].ffn.w_gate_up  # [1, E, D, 2, F] <- up_proj [F, D] of expert 2
    res["fp8"] = {
        "wq_a_spec": str(wq_a.get_value().sharding.spec),
        "wq_a_equal": bool(
            np.array_equal(
                np.asarray(wq_a[...])[0].T, want["model.layers.0.self_attn.q_a_proj.weight"]
            )
        ),
        "up_equal": bool(
            np.array_equal(
                np.asarray(up[...])[0, 2, :, 1, :].T,
                want["model.layers.1.mlp.experts.2.up_proj.weight"],
            )
        ),
    }

    # A mesh the model cannot be split onto fails, naming the dimension, before anything is placed.
    def no_place(*a, **k):
        raise AssertionError("placed a parameter before the mesh was checked")

    load.place, real_place = no_place, load.place
    try:
        from_hf(src, mesh=sharding.make_mesh(MeshConfig(fsdp=1, expert=8)))
        res["indivisible"] = "no error"
    except sharding.ShardingError as e:
        res["indivisible"] = str(e)
    finally:
        load.place = real_place
    return res


if __name__ == "__main__":
    mode, where = sys.argv[1], sys.argv[2]
    print(json.dumps({"big": big, "small": small}[mode](where)))
