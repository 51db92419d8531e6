"""Hugging Face config.json <-> ModelConfig, for deepseek_v3, deepseek_v2, deepseek (DeepSeekMoE
v1), mixtral and qwen3_moe.

'deepseek' is deepseek-moe-16b's remote-code architecture (transformers has no class for it):
Llama-style multi-head attention with half-split rope, softmax top-k over fine-grained routed
experts plus one fused shared MLP, dense layers before first_k_dense_replace and between every
moe_layer_freq-th layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moejax.config import ModelConfig, RouterConfig

MODEL_TYPES = (
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_v2",
    "deepseek",
    "mixtral",
    "qwen3_moe",
)

# Keys that carry no architecture (or that we derive), accepted and ignored.
_IGNORED = {
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "output_router_logits",
    "pretraining_tp",
    "auto_map",
    "head_dim",
    "qk_head_dim",
    "num_key_value_heads",
    "router_aux_loss_coef",
    "ep_size",
    "moe_layer_freq",
    "aux_loss_alpha",
    "seq_aux",
    "generation_config",
    "quantization_config",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_interleave",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "router_jitter_noise",
    "num_nextn_predict_layers",
    "scoring_func",
    "topk_method",
    "n_group",
    "topk_group",
    "id2label",
    "label2id",
    "_name_or_path",
    "mlp_layer_types",  # deepseek_v32: checked against first_k_dense_replace
    "layer_types",  # deepseek_v32: checked (every layer 'indexed_attention')
}
MLA_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2")


class UnsupportedConfig(ValueError):
    pass


def _rope(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Reads rope settings from rope_parameters (transformers v5) or rope_theta + rope_scaling."""
    params = dict(d.get("rope_parameters") or {})
    if not params:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {
        "rope_theta": float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    }
    problems = []
    if rope_type == "yarn":
        out.update(
            rope_type="yarn",
            rope_factor=float(params["factor"]),
            rope_original_max_position_embeddings=int(
                params.get("original_max_position_embeddings")
                or d.get("max_position_embeddings", 4096)
            ),
            rope_beta_fast=float(params.get("beta_fast") or 32),
            rope_beta_slow=float(params.get("beta_slow") or 1),
            rope_mscale=float(params.get("mscale") or 0.0),
            rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        )
        if params.get("attention_factor") is not None:
            problems.append("rope_parameters.attention_factor")
        if params.get("truncate", True) is not True:
            problems.append("rope_parameters.truncate")
    elif rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r}")
    return out, problems


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
    """Maps a Hugging Face config.json dict to a ModelConfig.

    Raises UnsupportedConfig listing every key whose value moejax cannot honour.
    """
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise UnsupportedConfig(
            f"model_type={mt!r} is not supported; supported: {', '.join(MODEL_TYPES)}"
        )
    if mt == "deepseek_v4":
        return _deepseek_v4_config(d)
    problems: list[str] = []
    if d.get("scoring_func", "softmax") not in ("softmax", "sigmoid"):
        problems.append(f"scoring_func={d.get('scoring_func')!r} (only 'softmax' or 'sigmoid')")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d.get('hidden_act')!r} (only 'silu')")
    if d.get("attention_bias"):
        problems.append("attention_bias=true")
    if d.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if d.get("sliding_window") and d.get("use_sliding_window", mt == "mixtral"):
        problems.append(f"sliding_window={d.get('sliding_window')}")
    rope, rope_problems = _rope(d)
    problems += rope_problems
    required = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "num_experts_per_tok",
    ]
    if mt in MLA_TYPES:
        required += [
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "moe_intermediate_size",
        ]
    elif mt == "deepseek":
        required += ["n_routed_experts", "moe_intermediate_size"]
        problems += _deepseek_v1_problems(d)
    elif mt == "qwen3_moe":
        required += ["moe_intermediate_size"]
    problems += [f"{k} is missing" for k in required if d.get(k) is None]
    if mt in ("mixtral", "qwen3_moe") and d.get("num_local_experts", d.get("num_experts")) is None:
        problems.append("num_local_experts is missing")
    if problems:
        raise UnsupportedConfig(
            f"config.json ({mt}) has settings moejax cannot honour: {'; '.join(problems)}"
        )
    c: dict[str, Any] = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get(
            "max_position_embeddings", 2048 if mt == "deepseek" else 4096
        ),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=d.get("initializer_range", 0.02),
        **rope,
        aux_loss_coef=0.0,
        seq_aux_loss_coef=0.0,
        z_loss_coef=0.0,
        jitter=0.0,
    )
    if mt in MLA_TYPES:
        c.update(
            attention_type="mla",
            q_lora_rank=d.get("q_lora_rank") or 0,
            kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"],
            qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"],
            # (transformers' deepseek_v32 always rotates MLA's rope dims in interleaved pairs)
            rope_interleave=mt == "deepseek_v32" or bool(d.get("rope_interleave", True)),
            n_routed_experts=d["n_routed_experts"],
            num_experts_per_tok=d["num_experts_per_tok"],
            n_shared_experts=d.get("n_shared_experts") or 0,
            moe_intermediate_size=d["moe_intermediate_size"],
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        )
        if d.get("moe_layer_freq", 1) != 1:
            problems.append(f"moe_layer_freq={d['moe_layer_freq']}")
        if mt == "deepseek_v32":
            problems += _deepseek_v32_problems(d)
            c.update(
                index_topk=d.get("index_topk", 2048),
                index_n_heads=d.get("index_n_heads", 64),
                index_head_dim=d.get("index_head_dim", 128),
            )
        if mt in ("deepseek_v3", "deepseek_v32"):
            method = d.get("topk_method", "noaux_tc")
            if method != "noaux_tc":
                problems.append(f"topk_method={method!r} ({mt} uses 'noaux_tc')")
            c.update(
                score_func=d.get("scoring_func", "sigmoid"),
                n_group=d.get("n_group") or 1,
                topk_group=d.get("topk_group") or 1,
                norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                use_score_correction_bias=True,
                mtp_depth=d.get("num_nextn_predict_layers", 0) or 0,
            )
        else:
            method = d.get("topk_method", "greedy")
            if method not in ("greedy", "group_limited_greedy"):
                problems.append(
                    f"topk_method={method!r} (deepseek_v2: 'greedy' or 'group_limited_greedy')"
                )
            grouped = method == "group_limited_greedy"
            c.update(
                score_func=d.get("scoring_func", "softmax"),
                n_group=(d.get("n_group") or 1) if grouped else 1,
                topk_group=(d.get("topk_group") or 1) if grouped else 1,
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                use_score_correction_bias=False,
            )
            if c["norm_topk_prob"]:
                problems.append("norm_topk_prob=true (transformers' deepseek_v2 ignores it)")
    elif mt == "deepseek":
        c.update(_deepseek_v1_fields(d))
    else:
        n_experts = d.get("num_local_experts", d.get("num_experts"))
        nkv = d.get("num_key_value_heads") or d["num_attention_heads"]
        c.update(
            attention_type="gqa",
            num_kv_heads=nkv,
            head_dim=d.get("head_dim") or 0,
            rope_interleave=False,
            n_routed_experts=n_experts,
            num_experts_per_tok=d["num_experts_per_tok"],
            n_shared_experts=0,
            score_func="softmax",
            n_group=1,
            topk_group=1,
            use_score_correction_bias=False,
            routed_scaling_factor=1.0,
            first_k_dense_replace=0,
        )
        if mt == "mixtral":
            c.update(
                moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True, qk_norm=False
            )
        else:
            c.update(
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                qk_norm=True,
                decoder_sparse_step=d.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            )
    if problems:
        raise UnsupportedConfig(
            f"config.json ({mt}) has settings moejax cannot honour: {'; '.join(problems)}"
        )
    # the gating keys above are the router section's
    router = {f.name: c.pop(f.name) for f in dataclasses.fields(RouterConfig) if f.name in c}
    return ModelConfig.from_dict({**c, "router": router})


# config.json keys of deepseek_v4 that carry no architecture moejax builds, accepted and ignored
_V4_IGNORED = _IGNORED | {
    "num_nextn_predict_layers",  # V4's MTP module: transformers does not build it, nor does moejax
    "router_aux_loss_coef",
    "partial_rotary_factor",
    "expert_dtype",
    "compress_ratios",
    "compress_rate_csa",
    "compress_rate_hca",
    "num_hash_layers",
}
# what transformers' deepseek_v4 routers can compute (its activation table has no softmax)
V4_SCORE_FUNCS = ("sqrtsoftplus", "sigmoid")
V4_RATIO_TYPES = {  # legacy compress_ratios, as transformers maps them
    0: "sliding_attention",
    4: "compressed_sparse_attention",
    128: "heavily_compressed_attention",
}


def _deepseek_v4_config(d: dict[str, Any]) -> ModelConfig:
    """A deepseek_v4 config.json -> ModelConfig (model.attention_type='v4'), legacy keys
    (compress_ratios, compress_rate_csa / _hca, num_hash_layers, qk_rope_head_dim) read as
    transformers reads them. Raises UnsupportedConfig listing every value moejax cannot honour,
    before any weight is read."""
    from moejax.config import V4_LAYER_TYPES

    problems: list[str] = []
    n = d.get("num_hidden_layers")
    required = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "q_lora_rank",
        "moe_intermediate_size",
        "n_routed_experts",
        "num_experts_per_tok",
    ]
    problems += [f"{k} is missing" for k in required if d.get(k) is None]
    if problems:
        raise UnsupportedConfig(
            f"config.json (deepseek_v4) has settings moejax cannot honour: {'; '.join(problems)}"
        )
    for key, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("num_key_value_heads", 1),
        ("n_shared_experts", 1),
        ("tie_word_embeddings", False),
    ):
        if d.get(key, want) != want:
            problems.append(f"{key}={d.get(key)!r} (deepseek_v4: {want!r})")
    if not (d.get("swiglu_limit", 10.0) or 0) > 0:
        problems.append(
            f"swiglu_limit={d.get('swiglu_limit')!r} (transformers clamps at it: must be > 0)"
        )
    if d.get("norm_topk_prob", True) is not True:
        problems.append("norm_topk_prob=false (transformers' deepseek_v4 always normalizes)")
    if d.get("scoring_func", "sqrtsoftplus") not in V4_SCORE_FUNCS:
        problems.append(
            f"scoring_func={d.get('scoring_func')!r} (moejax: {', '.join(V4_SCORE_FUNCS)})"
        )
    rates = dict(d.get("compress_rates") or {})
    for key, t in (
        ("compress_rate_csa", "compressed_sparse_attention"),
        ("compress_rate_hca", "heavily_compressed_attention"),
    ):
        if d.get(key) is not None:
            rates[t] = d[key]
    rates.setdefault("compressed_sparse_attention", 4)
    rates.setdefault("heavily_compressed_attention", 128)
    for t, r in rates.items():
        if t not in V4_LAYER_TYPES[1:]:
            problems.append(f"compress_rates has {t!r} (moejax: {', '.join(V4_LAYER_TYPES[1:])})")
        elif not isinstance(r, int) or r < 1:
            problems.append(f"compress_rates[{t!r}]={r!r} (a rate is an integer >= 1)")
    types = d.get("layer_types")
    if types is None and d.get("compress_ratios") is not None:
        bad = sorted({r for r in d["compress_ratios"] if r not in V4_RATIO_TYPES})
        if bad:
            problems.append(f"compress_ratios with {bad} (allowed: {sorted(V4_RATIO_TYPES)})")
        types = [V4_RATIO_TYPES.get(r, "?") for r in d["compress_ratios"]]
    if types is None:  # transformers' default: 2 HCA, then CSA / HCA alternating
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
            for i in range(max(n - 2, 0))
        ]
    types = list(types)[:n]
    bad = sorted({t for t in types if t not in V4_LAYER_TYPES})
    if bad:
        problems.append(f"layer_types with {bad} (moejax: {', '.join(V4_LAYER_TYPES)})")
    mlp = d.get("mlp_layer_types")
    if mlp is None:
        n_hash = d.get("num_hash_layers")
        n_hash = 3 if n_hash is None else n_hash
        mlp = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    mlp = list(mlp)[:n]
    n_hash = next((i for i, t in enumerate(mlp) if t != "hash_moe"), len(mlp))
    if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
        problems.append(f"mlp_layer_types={mlp} (moejax: hash_moe layers first, then moe)")
    head_dim = d["head_dim"]
    prf = d.get("partial_rotary_factor")  # (transformers: it wins over qk_rope_head_dim)
    if prf is None:
        prf = d["qk_rope_head_dim"] / head_dim if d.get("qk_rope_head_dim") else 64 / 512
    rope_dim = int(head_dim * prf)
    # rope: 'main' (sliding layers) must be the plain rope; 'compress' may be YaRN without its
    # attention factor (transformers sets it to 1 for the flat form; moejax applies none)
    rp = dict(d.get("rope_parameters") or {})
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = dict(rp["main"]), dict(rp["compress"])
        for name, sub in (("main", main), ("compress", comp)):
            width = int(head_dim * sub.get("partial_rotary_factor", 1.0))
            if width != rope_dim:
                problems.append(
                    f"rope_parameters.{name}.partial_rotary_factor gives {width} rotary dims, "
                    f"not the model's {rope_dim}"
                )
        nested = True
    else:
        flat = {k: v for k, v in (rp or dict(d.get("rope_scaling") or {})).items()}
        main = {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        comp = {**flat, "rope_theta": d.get("compress_rope_theta", 160000.0)}
        nested = False
    if main.get("rope_type", main.get("type", "default")) != "default":
        problems.append(
            f"rope_parameters.main.rope_type={main.get('rope_type')!r} (only 'default')"
        )
    yarn = comp.get("rope_type", comp.get("type")) == "yarn"
    factor = comp.pop("attention_factor", None if nested else 1.0)
    if yarn and factor != 1.0:
        problems.append(
            f"rope_parameters.compress.attention_factor={factor} (moejax applies none: 1.0)"
        )
    comp.pop("partial_rotary_factor", None)
    main_theta = float(main.get("rope_theta", d.get("rope_theta", 10000.0)))
    comp_rope, comp_problems = _rope(
        {"rope_parameters": comp, "max_position_embeddings": d.get("max_position_embeddings", 4096)}
    )
    problems += [p.replace("rope_parameters", "rope_parameters.compress") for p in comp_problems]
    if problems:
        raise UnsupportedConfig(
            f"config.json (deepseek_v4) has settings moejax cannot honour: {'; '.join(problems)}"
        )
    comp_theta = comp_rope.pop("rope_theta")
    c: dict[str, Any] = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=n,
        num_heads=d["num_attention_heads"],
        intermediate_size=d["moe_intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        initializer_range=d.get("initializer_range", 0.02),
        attention_type="v4",
        head_dim=head_dim,
        q_lora_rank=d["q_lora_rank"],
        qk_rope_head_dim=rope_dim,
        rope_theta=main_theta,
        compress_rope_theta=float(comp_theta),
        **comp_rope,
        layer_types=tuple(types),
        compress_rate_csa=rates["compressed_sparse_attention"],
        compress_rate_hca=rates["heavily_compressed_attention"],
        sliding_window=d.get("sliding_window", 128),
        o_groups=d.get("o_groups", 8),
        o_lora_rank=d.get("o_lora_rank", 1024),
        index_topk=d.get("index_topk", 512),
        index_n_heads=d.get("index_n_heads", 64),
        index_head_dim=d.get("index_head_dim", 128),
        num_hash_layers=n_hash,
        hc_mult=d.get("hc_mult", 4),
        hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20),
        hc_eps=float(d.get("hc_eps", 1e-6)),
        swiglu_limit=float(d.get("swiglu_limit", 10.0)),
        n_routed_experts=d["n_routed_experts"],
        num_experts_per_tok=d["num_experts_per_tok"],
        n_shared_experts=1,
        moe_intermediate_size=d["moe_intermediate_size"],
        first_k_dense_replace=0,
    )
    router = RouterConfig(
        score_func=d.get("scoring_func", "sqrtsoftplus"),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.5)),
        use_score_correction_bias=True,
    )
    unknown = sorted(k for k in d if k not in _V4_IGNORED and k not in _V4_KEYS)
    if unknown:
        raise UnsupportedConfig(
            f"config.json (deepseek_v4) has keys moejax does not know: {', '.join(unknown)}"
        )
    try:
        return ModelConfig.from_dict({**c, "router": router})
    except ValueError as e:
        raise UnsupportedConfig(f"config.json (deepseek_v4): {e}") from e


# the deepseek_v4 config.json keys _deepseek_v4_config reads
_V4_KEYS = {
    "vocab_size",
    "hidden_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "q_lora_rank",
    "qk_rope_head_dim",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
    "scoring_func",
    "norm_topk_prob",
    "routed_scaling_factor",
    "max_position_embeddings",
    "rope_theta",
    "layer_types",
    "compress_rates",
    "compress_rope_theta",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "mlp_layer_types",
    "swiglu_limit",
    "sliding_window",
    "o_groups",
    "o_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
}


def _deepseek_v4_out(cfg: ModelConfig) -> dict[str, Any]:
    """The deepseek_v4 config.json of a V4 ModelConfig (transformers' nested rope form)."""
    problems = []
    if cfg.attention_type != "v4":
        problems.append("attention_type must be 'v4'")
    if cfg.swiglu_limit <= 0:
        problems.append("swiglu_limit must be > 0 (transformers always clamps; 0 zeroes experts)")
    if not cfg.router.norm_topk_prob:
        problems.append("norm_topk_prob must be true (transformers always normalizes)")
    if cfg.router.score_func not in V4_SCORE_FUNCS:
        problems.append(f"score_func must be one of {', '.join(V4_SCORE_FUNCS)}")
    if int(cfg.head_dim * (cfg.qk_rope_head_dim / cfg.head_dim)) != cfg.qk_rope_head_dim:
        problems.append(
            f"qk_rope_head_dim={cfg.qk_rope_head_dim} is not int(head_dim x a float factor): "
            "transformers would rotate one dim fewer"
        )
    if problems:
        raise UnsupportedConfig(f"cannot export to deepseek_v4: {'; '.join(problems)}")
    comp = {k: v for k, v in _rope_out(cfg).items() if k not in ("mscale", "mscale_all_dim")}
    comp["rope_theta"] = cfg.compress_rope_theta
    prf = cfg.qk_rope_head_dim / cfg.head_dim
    comp["partial_rotary_factor"] = prf
    if cfg.rope_type == "yarn":
        comp["attention_factor"] = 1.0
    return dict(
        architectures=["DeepseekV4ForCausalLM"],
        model_type="deepseek_v4",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=1,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        partial_rotary_factor=prf,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=1,
        scoring_func=cfg.router.score_func,
        norm_topk_prob=cfg.router.norm_topk_prob,
        routed_scaling_factor=cfg.router.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_parameters={
            "main": {
                "rope_type": "default",
                "rope_theta": cfg.rope_theta,
                "partial_rotary_factor": prf,
            },
            "compress": comp,
        },
        layer_types=list(cfg.v4_layer_types),
        compress_rates={
            "compressed_sparse_attention": cfg.compress_rate_csa,
            "heavily_compressed_attention": cfg.compress_rate_hca,
        },
        compress_rope_theta=cfg.compress_rope_theta,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe"] * cfg.num_hash_layers
        + ["moe"] * (cfg.num_layers - cfg.num_hash_layers),
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        num_nextn_predict_layers=0,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=False,
        hidden_act="silu",
        dtype="float32",
    )


def _deepseek_v32_problems(d: dict[str, Any]) -> list[str]:
    """deepseek_v32's per-layer lists must say what moejax builds: the first first_k_dense_replace
    layers dense, every layer DeepSeek Sparse Attention."""
    out = []
    n, k = d.get("num_hidden_layers") or 0, d.get("first_k_dense_replace", 0)  # (as read below)
    mlp = d.get("mlp_layer_types")
    if mlp is not None and list(mlp) != ["dense"] * min(k, n) + ["sparse"] * max(n - k, 0):
        out.append(f"mlp_layer_types={mlp} (moejax: first_k_dense_replace={k} dense, then MoE)")
    kinds = d.get("layer_types")
    if kinds is not None and set(kinds) - {"indexed_attention"}:
        out.append(f"layer_types with {sorted(set(kinds) - {'indexed_attention'})}")
    if not d.get("q_lora_rank"):
        out.append("q_lora_rank is missing (the indexer reads the query latent)")
    return out


def _deepseek_v1_problems(d: dict[str, Any]) -> list[str]:
    """What modeling_deepseek.py (remote code) does that moejax cannot, beyond the common checks."""
    problems = []
    if d.get("scoring_func", "softmax") != "softmax":
        problems.append(f"scoring_func={d.get('scoring_func')!r} (deepseek: only 'softmax')")
    freq = d.get("moe_layer_freq", 1)
    if not isinstance(freq, int) or freq < 1:
        problems.append(f"moe_layer_freq={freq!r} (must be an integer >= 1)")
    heads = d.get("num_attention_heads")
    if heads and d.get("hidden_size") and d["hidden_size"] % heads:
        problems.append(
            f"hidden_size={d['hidden_size']} is not a multiple of num_attention_heads={heads}"
        )
    return problems


def _deepseek_v1_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a 'deepseek' config.json (checked by _deepseek_v1_problems).

    Layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0; the dense layers
    after first_k_dense_replace become mlp_only_layers. The gate normalises only when top-k > 1, has
    no scaling factor, and its balance loss (aux_loss_alpha) is sequence-wise when seq_aux, else
    Switch-style.
    """
    L, k, freq = (
        d["num_hidden_layers"],
        d.get("first_k_dense_replace") or 0,
        d.get("moe_layer_freq", 1),
    )
    alpha = float(d.get("aux_loss_alpha", 0.001) or 0.0)
    seq_aux = bool(d.get("seq_aux", True))
    top_k = d["num_experts_per_tok"]
    return dict(
        attention_type="gqa",
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d["hidden_size"] // d["num_attention_heads"],
        qk_norm=False,
        rope_interleave=False,
        n_routed_experts=d["n_routed_experts"],
        num_experts_per_tok=top_k,
        n_shared_experts=d.get("n_shared_experts") or 0,
        moe_intermediate_size=d["moe_intermediate_size"],
        first_k_dense_replace=k,
        mlp_only_layers=tuple(i for i in range(k, L) if i % freq),
        score_func="softmax",
        n_group=1,
        topk_group=1,
        use_score_correction_bias=False,
        routed_scaling_factor=1.0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)) and top_k > 1,
        seq_aux_loss_coef=alpha if seq_aux else 0.0,
        aux_loss_coef=0.0 if seq_aux else alpha,
    )


def _moe_layer_rule(cfg: ModelConfig) -> tuple[int, int] | None:
    """(first_k_dense_replace, moe_layer_freq) whose rule (layer i is MoE when i >= k and
    i % freq == 0) gives cfg's layer kinds, preferring cfg.first_k_dense_replace; None when no rule
    does."""
    kinds = cfg.layer_kinds()
    if "moe" not in kinds:
        return None
    for k in dict.fromkeys((cfg.first_k_dense_replace, kinds.index("moe"))):
        for freq in range(1, cfg.num_layers + 1):
            if all((kind == "moe") == (i >= k and i % freq == 0) for i, kind in enumerate(kinds)):
                return k, freq
    return None


def _mixtral_expressible(cfg: ModelConfig) -> bool:
    return (
        cfg.moe_intermediate_size == cfg.intermediate_size
        and "dense" not in cfg.layer_kinds()
        and not cfg.n_shared_experts
        and cfg.router.norm_topk_prob
    )


def hf_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a moejax config exports to."""
    if cfg.attention_type == "v4":
        return "deepseek_v4"
    if cfg.attention_type == "mla":
        if cfg.index_topk:
            return "deepseek_v32"
        return "deepseek_v3" if cfg.router.use_score_correction_bias else "deepseek_v2"
    if cfg.qk_norm:
        return "qwen3_moe"
    return "mixtral" if _mixtral_expressible(cfg) else "deepseek"


def _rope_out(cfg: ModelConfig) -> dict[str, Any]:
    p: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    if cfg.rope_type == "yarn":
        p.update(
            factor=cfg.rope_factor,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            mscale=cfg.rope_mscale,
            mscale_all_dim=cfg.rope_mscale_all_dim,
        )
    return p


def to_hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json for cfg; raises UnsupportedConfig if the architecture cannot express it."""
    mt = model_type or hf_model_type(cfg)
    problems = []
    if mt not in MODEL_TYPES:
        raise UnsupportedConfig(
            f"model_type={mt!r} is not supported; supported: {', '.join(MODEL_TYPES)}"
        )
    if mt == "deepseek_v4" or cfg.attention_type == "v4":
        if mt != "deepseek_v4":
            raise UnsupportedConfig(f"cannot export to {mt}: a V4 model exports to deepseek_v4")
        return _deepseek_v4_out(cfg)
    arch = {
        "deepseek_v3": "DeepseekV3ForCausalLM",
        "deepseek_v32": "DeepseekV32ForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM",
        "deepseek": "DeepseekForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }[mt]
    d: dict[str, Any] = dict(
        architectures=[arch],
        model_type=mt,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        rope_parameters=_rope_out(cfg),
        num_experts_per_tok=cfg.num_experts_per_tok,
        dtype="float32",
    )
    if cfg.swiglu_limit:
        problems.append(f"swiglu_limit={cfg.swiglu_limit} (a DeepSeek-V4 setting: {mt} has none)")
    if cfg.router.score_func == "sqrtsoftplus":
        problems.append(f"score_func='sqrtsoftplus' (DeepSeek-V4's: {mt} has none)")
    if bool(cfg.index_topk) != (mt == "deepseek_v32"):
        problems.append(
            "DeepSeek Sparse Attention (model.index_topk > 0) exports to deepseek_v32 only"
        )
    if mt in MLA_TYPES:
        if cfg.attention_type != "mla":
            problems.append("attention_type must be 'mla'")
        if any(k == "dense" for k in cfg.layer_kinds()[cfg.first_k_dense_replace :]):
            problems.append("dense layers after first_k_dense_replace")
        d.update(
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            head_dim=cfg.qk_rope_head_dim,
            num_key_value_heads=cfg.num_heads,
            n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            first_k_dense_replace=cfg.first_k_dense_replace,
            routed_scaling_factor=cfg.router.routed_scaling_factor,
            n_group=cfg.router.n_group,
            topk_group=cfg.router.topk_group,
            norm_topk_prob=cfg.router.norm_topk_prob,
        )
        if mt in ("deepseek_v3", "deepseek_v32"):
            if cfg.router.score_func != "sigmoid":
                problems.append(f"score_func must be 'sigmoid' for transformers' {mt}")
            if mt == "deepseek_v32":
                if not cfg.rope_interleave or not cfg.q_lora_rank:
                    problems.append("deepseek_v32 needs rope_interleave=True and q_lora_rank > 0")
                d.update(
                    index_topk=cfg.index_topk,
                    index_n_heads=cfg.index_n_heads,
                    index_head_dim=cfg.index_head_dim,
                )
            d.update(
                rope_interleave=cfg.rope_interleave,
                num_nextn_predict_layers=cfg.mtp_depth,
                scoring_func="sigmoid",
                topk_method="noaux_tc",
            )
        else:
            if (
                cfg.router.score_func != "softmax"
                or cfg.router.norm_topk_prob
                or not cfg.rope_interleave
            ):
                problems.append(
                    "deepseek_v2 needs score_func='softmax', norm_topk_prob=False, "
                    "rope_interleave=True"
                )
            d.update(topk_method="group_limited_greedy" if cfg.router.n_group > 1 else "greedy")
    elif mt == "deepseek":
        problems += _deepseek_v1_out(cfg, d)
    else:
        if cfg.rope_interleave:
            problems.append("rope_interleave must be False")
        d.update(
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.gqa_head_dim,
            num_local_experts=cfg.n_routed_experts,
        )
        if mt == "mixtral":
            if (
                cfg.moe_intermediate_size != cfg.intermediate_size
                or "dense" in cfg.layer_kinds()
                or cfg.qk_norm
            ):
                problems.append(
                    "mixtral needs every layer MoE with moe_intermediate_size == "
                    "intermediate_size, no qk_norm"
                )
            if not cfg.router.norm_topk_prob:
                problems.append(
                    "mixtral renormalises the top-k weights (norm_topk_prob=False: export to "
                    "'deepseek')"
                )
        else:
            d.update(
                moe_intermediate_size=cfg.moe_intermediate_size,
                norm_topk_prob=cfg.router.norm_topk_prob,
                decoder_sparse_step=cfg.decoder_sparse_step,
                mlp_only_layers=list(cfg.mlp_only_layers),
            )
            if cfg.first_k_dense_replace:
                problems.append("qwen3_moe has no first_k_dense_replace (use mlp_only_layers)")
        if (
            cfg.n_shared_experts
            or cfg.router.score_func != "softmax"
            or cfg.router.n_group > 1
            or cfg.router.routed_scaling_factor != 1.0
        ):
            problems.append(
                f"{mt} routing is plain softmax top-k without shared experts, groups or scaling"
            )
    if problems:
        raise UnsupportedConfig(f"cannot export to {mt}: {'; '.join(problems)}")
    return d


def _deepseek_v1_out(cfg: ModelConfig, d: dict[str, Any]) -> list[str]:
    """Fills d with the remote-code DeepseekConfig keys of cfg (rope_theta / rope_scaling, which
    modeling_deepseek.py reads, instead of rope_parameters); returns what it cannot express."""
    problems = []
    if cfg.attention_type != "gqa" or cfg.qk_norm:
        problems.append("attention_type must be 'gqa' without qk_norm")
    if cfg.rope_interleave or cfg.rope_type != "default":
        problems.append(
            "rope must be the default half-split rope (rope_interleave=False, rope_type='default')"
        )
    if cfg.num_heads * cfg.gqa_head_dim != cfg.hidden_size:
        problems.append(f"head_dim={cfg.gqa_head_dim} must be hidden_size / num_heads")
    if (
        cfg.router.score_func != "softmax"
        or cfg.router.n_group > 1
        or cfg.router.routed_scaling_factor != 1.0
        or cfg.router.use_score_correction_bias
    ):
        problems.append(
            "routing must be plain softmax top-k (no groups, scaling or correction bias)"
        )
    if cfg.router.norm_topk_prob and cfg.num_experts_per_tok == 1:
        problems.append("norm_topk_prob with top-1 (deepseek normalises only when top-k > 1)")
    if cfg.mtp_depth:
        problems.append("mtp_depth must be 0")
    rule = _moe_layer_rule(cfg)
    if rule is None:
        problems.append(
            "the MoE layers must be every moe_layer_freq-th layer from first_k_dense_replace on "
            f"(layer kinds: {', '.join(cfg.layer_kinds())})"
        )
    seq_aux = cfg.router.seq_aux_loss_coef > 0 or cfg.router.aux_loss_coef == 0
    d.pop("rope_parameters")
    d.pop("dtype")
    d.update(
        num_key_value_heads=cfg.kv_heads,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts or None,
        moe_intermediate_size=cfg.moe_intermediate_size,
        first_k_dense_replace=rule[0] if rule else cfg.first_k_dense_replace,
        moe_layer_freq=rule[1] if rule else 1,
        norm_topk_prob=cfg.router.norm_topk_prob,
        scoring_func="softmax",
        aux_loss_alpha=cfg.router.seq_aux_loss_coef if seq_aux else cfg.router.aux_loss_coef,
        seq_aux=seq_aux,
        rope_theta=cfg.rope_theta,
        rope_scaling=None,
        attention_bias=False,
        torch_dtype="float32",
    )
    return problems
