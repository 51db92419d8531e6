"""Helpers for experiments/*.py: the base ConfigDict every experiment starts from.

Every field is documented where its dataclass is declared (moejax/config.py); the ConfigDict
holds all of them so that any `--config.section.field=value` override works.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from moejax.config import (
    MOVED,
    AlignConfig,
    BenchmarkConfig,
    Config,
    DataConfig,
    ExecutionConfig,
    ExtendConfig,
    GRPOConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SFTConfig,
    TrainConfig,
)


def base_config() -> ml_collections.ConfigDict:
    sections = {
        "model": ModelConfig(),
        "data": DataConfig(),
        "optim": OptimConfig(),
        "train": TrainConfig(),
        "mesh": MeshConfig(),
        "execution": ExecutionConfig(),
        "sft": SFTConfig(),
        "lora": LoRAConfig(),
        "align": AlignConfig(),
        "grpo": GRPOConfig(),
        "eval": BenchmarkConfig(),
        "extend": ExtendConfig(),
    }
    cd = ml_collections.ConfigDict()
    for name, dc in sections.items():
        values = dataclasses.asdict(dc)
        if name == "model":
            values["mlp_only_layers"] = tuple(values["mlp_only_layers"])
        if name == "train":
            values["sample_prompts"] = tuple(values["sample_prompts"])
        if name == "lora":
            values["targets"] = tuple(values["targets"])
        if name == "grpo":
            values["rewards"], values["reward_weights"] = (
                tuple(values["rewards"]),
                tuple(values["reward_weights"]),
            )
        cd[name] = ml_collections.ConfigDict(values)
    cd.base = ""  # fine-tuning's starting weights (moejax.finetune)
    return cd


def _load_module(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs an experiments/*.py file's get_config() (for tests and tools without absl flags)."""
    return _load_module(path, os.path.splitext(os.path.basename(path))[0]).get_config()


def resolve(cd: ml_collections.ConfigDict) -> Config:
    return Config.from_dict(cd)


def sibling(file: str, name: str):
    """Imports experiments/<name>.py next to `file` (presets build on each other this way)."""
    return _load_module(
        os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"),
        f"moejax_experiment_{name}",
    )


def shrink_to_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A preset's architecture family and routing rules at CPU size (the *_tiny.py experiments):
    same attention type, scoring, groups, bias, scaling, YaRN and MTP, tiny widths."""
    m = c.model
    moe_equals_dense = m.moe_intermediate_size == m.intermediate_size  # Mixtral: one FFN width
    m.vocab_size = 4096
    m.hidden_size = 128
    m.num_layers = 3
    m.num_heads = 4
    m.intermediate_size = 64 if moe_equals_dense else 256
    m.max_position_embeddings = 4096
    if m.attention_type == "mla":
        m.q_lora_rank = 48 if m.q_lora_rank else 0
        m.kv_lora_rank = 32
        m.qk_nope_head_dim = 16
        m.qk_rope_head_dim = 8
        m.v_head_dim = 16
        m.rope_factor = 4.0
        m.rope_original_max_position_embeddings = 256
        m.n_routed_experts = 16
        m.num_experts_per_tok = 4
        m.moe_intermediate_size = 32
        m.first_k_dense_replace = min(m.first_k_dense_replace, 1)
        m.router.n_group = min(m.router.n_group, 4)
        m.router.topk_group = min(m.router.topk_group, 2)
        if m.get("index_topk"):  # DeepSeek Sparse Attention: a quarter of the 128 positions
            m.index_topk = 32
            m.index_n_heads = 4
            m.index_head_dim = 16
    elif m.attention_type == "v4":  # V4-Flash's pattern, windows that fit 128 positions
        m.num_layers = 5
        m.layer_types = [  # segments: [sliding], [CSA, HCA] x 2
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ]
        m.num_hash_layers = 1
        m.head_dim = 32
        m.qk_rope_head_dim = 8
        m.q_lora_rank = 48
        m.o_groups = 2
        m.o_lora_rank = 32
        m.sliding_window = 16
        m.compress_rate_csa = 4
        m.compress_rate_hca = 16
        m.index_topk = 8  # of up to 32 CSA entries
        m.index_n_heads = 4
        m.index_head_dim = 16
        m.rope_factor = 4.0
        m.rope_original_max_position_embeddings = 256
        m.hc_mult = 2
        m.n_routed_experts = 16
        m.num_experts_per_tok = 4
        m.moe_intermediate_size = 32
    else:
        m.num_kv_heads = 2
        m.head_dim = 32
        m.n_routed_experts = 8 if m.n_routed_experts <= 8 else 16
        m.moe_intermediate_size = 64 if moe_equals_dense else 32
        m.num_experts_per_tok = min(m.num_experts_per_tok, 4)
    m.compute_dtype = "float32"
    c.execution.remat_policy = "none"
    c.data.seq_len = 128
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    return c


def check_override_keys(argv: list[str], default: str = "experiments/moe.py") -> str | None:
    """One-line error for a --config.a.b=v override naming a key the config file lacks (absl would
    otherwise print a traceback)."""
    path = default
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    try:
        cd = load_config_file(path)
    except (OSError, SyntaxError) as e:
        return f"--config {path}: cannot load ({e})"
    for a in argv:
        if not a.startswith("--config.") or a.startswith("--config="):
            continue
        keys = a[len("--config.") :].split("=", 1)[0].split(".")
        node = cd
        for depth, k in enumerate(keys):
            if keys[:depth] == ["model"] and k in MOVED and k not in node.keys():
                return f"--config.{'.'.join(keys)}: moved to --config.{MOVED[k]}"
            if not hasattr(node, "keys") or k not in node.keys():
                where = ".".join(keys[:depth]) or "config"
                known = (
                    ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
                )
                return f"--config.{'.'.join(keys)}: unknown key {k!r} in {where}; known: {known}"
            node = node[k]
    return None


def config_cli(main, define_flags=None, default: str = "experiments/moe.py") -> None:
    """The shared entry of the config-driven commands (train, plan, compile): a one-line error for
    an unknown --config.* key, the --config file flag, the command's own flags, then absl's
    app.run."""
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    problem = check_override_keys(sys.argv[1:], default)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    config_flags.DEFINE_config_file("config", default, "experiment config file", lock_config=True)
    if define_flags:
        define_flags(flags)
    app.run(main)
