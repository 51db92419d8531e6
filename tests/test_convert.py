"""Conversion without transformers: MTP round trip, FP8 dequantization, bad input, atomic writes,
DeepSeekMoE v1 ('deepseek') configs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from moejax.config import ModelConfig, RouterConfig
from moejax.convert import (
    UnsupportedConfig,
    from_hf,
    from_hf_config,
    hf_model_type,
    to_hf,
    to_hf_config,
)
from moejax.convert.checkpoint import load_model, save_model
from moejax.convert.safetensors_io import dequantize_fp8
from moejax.model import Transformer
from tests.helpers import ROOT, TINY_MLA

CFG = TINY_MLA


def _params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _randomize_bias(model):
    model.segments[1].ffn.router.bias[...] = jax.random.normal(
        jax.random.key(3), model.segments[1].ffn.router.bias[...].shape
    )
    model.mtp[0].block.ffn.router.bias[...] = jnp.arange(4.0)


def test_deepseek_v3_round_trip_keeps_every_tensor_including_mtp(tmp_path):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    _randomize_bias(model)
    to_hf(model, CFG, str(tmp_path / "hf"))
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert (
        "model.layers.2.eh_proj.weight" in names
        and "model.layers.2.mlp.experts.3.up_proj.weight" in names
    )
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    back, cfg = from_hf(str(tmp_path / "hf"))
    assert cfg == CFG
    a, b = _params(model), _params(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_sharded_export_and_fused_layout(tmp_path):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    to_hf(model, CFG, str(tmp_path / "hf"), shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "hf"))
    assert (
        "model.safetensors.index.json" in files
        and sum(f.endswith(".safetensors") for f in files) > 2
    )
    back, _ = from_hf(str(tmp_path / "hf"))
    # Rewrite the experts in transformers' fused in-memory layout and load that too.
    tensors = {}
    for f in files:
        if f.endswith(".safetensors"):
            tensors.update(load_file(str(tmp_path / "hf" / f)))
    pre = "model.layers.1.mlp.experts"
    gate_up = np.stack(
        [
            np.concatenate(
                [
                    tensors.pop(f"{pre}.{e}.gate_proj.weight"),
                    tensors.pop(f"{pre}.{e}.up_proj.weight"),
                ]
            )
            for e in range(4)
        ]
    )  # [E, 2F, D]
    down = np.stack([tensors.pop(f"{pre}.{e}.down_proj.weight") for e in range(4)])  # [E, D, F]
    tensors[f"{pre}.gate_up_proj"], tensors[f"{pre}.down_proj"] = gate_up, down
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(tensors, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    again, _ = from_hf(str(fused))
    for k, v in _params(back).items():
        np.testing.assert_array_equal(v, _params(again)[k])


def test_fp8_block_dequantization(tmp_path):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    to_hf(model, CFG, str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # [N*(Hn+Hv)=32, R=16]
    w = tensors[name]
    scale = np.array([[0.5]], np.float32)  # one 128x128 block covers it
    q = (w / 0.5).astype(ml_dtypes.float8_e4m3fn)
    tensors[name] = q
    tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    back, _ = from_hf(str(tmp_path / "hf"))
    got = np.asarray(back.segments[1].attn.wkv_b[0]).reshape(16, 32).T
    np.testing.assert_allclose(got, q.astype(np.float32) * 0.5)
    # block structure: scales apply per 128x128 tile, edges cropped
    big = np.ones((130, 260), np.float32)
    s = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    d = dequantize_fp8(big.astype(ml_dtypes.float8_e4m3fn), s)
    assert (
        d[0, 0] == 1 and d[0, 128] == 2 and d[0, 259] == 3 and d[129, 0] == 4 and d[129, 259] == 6
    )


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    to_hf(model, CFG, str(tmp_path / "hf"))
    path = str(tmp_path / "hf" / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        from_hf(str(tmp_path / "hf"))
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((5, 7), np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: shape \(5, 7\)"):
        from_hf(str(tmp_path / "hf"))


def test_unsupported_config_lists_every_key():
    d = {
        "model_type": "deepseek_v3",
        "hidden_act": "gelu",
        "attention_bias": True,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0},
    }
    with pytest.raises(UnsupportedConfig) as e:
        from_hf_config(d)
    msg = str(e.value)
    assert "hidden_act" in msg and "attention_bias" in msg and "dynamic" in msg
    with pytest.raises(UnsupportedConfig, match="model_type='llama'"):
        from_hf_config({"model_type": "llama"})


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import moejax.convert.export as conv

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    dst = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_safetensors", boom)
    with pytest.raises(OSError):
        to_hf(model, CFG, str(dst))
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_moejax_checkpoint_and_cli(tmp_path):
    from moejax.convert.__main__ import main

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    _randomize_bias(model)
    save_model(model, CFG, str(tmp_path / "mj"))
    main(["moejax-to-hf", "--src", str(tmp_path / "mj"), "--dst", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    main(["hf-to-moejax", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "mj2")])
    back, cfg = load_model(str(tmp_path / "mj2"))
    assert cfg == CFG
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(back)[k])


# config.json of deepseek-ai/deepseek-moe-16b-base (model_type 'deepseek', remote code: transformers
# has no class)
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"],
    "model_type": "deepseek",
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
}
_NOT_ARCHITECTURE = {
    "auto_map",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "attention_dropout",
    "torch_dtype",
    "transformers_version",
}


def test_deepseek_moe_16b_preset_is_the_published_config_with_16_4b_parameters():
    from moejax.experiment import load_config_file, resolve
    from moejax.model.stats import param_counts

    preset = resolve(
        load_config_file(os.path.join(ROOT, "experiments", "deepseek_moe_16b.py"))
    ).model
    cfg = from_hf_config(DEEPSEEK_MOE_16B)
    assert preset.replace(compute_dtype=cfg.compute_dtype) == cfg  # numerics aside
    assert hf_model_type(preset) == "deepseek"
    out = to_hf_config(preset)
    keys = sorted(set(DEEPSEEK_MOE_16B) - _NOT_ARCHITECTURE)
    assert {k: out.get(k) for k in keys} == {k: DEEPSEEK_MOE_16B[k] for k in keys}
    c = param_counts(preset)  # abstract: nothing allocated
    assert c.total / 1e9 == pytest.approx(16.4, rel=0.01)  # "16.4B total parameters"
    assert (
        2.8 * 0.97 <= c.activated / 1e9 <= 2.8 * 1.12
    )  # "about 2.8B activated" (test_model.py's band)


def test_deepseek_moe_layer_freq_round_trip(tmp_path):
    """moe_layer_freq 2 from layer 1: MoE at 2 and 4, dense 0, 1 and 3 (moejax: mlp_only_layers)."""
    d = dict(
        DEEPSEEK_MOE_16B,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_layer_freq=2,
        seq_aux=False,
        rope_theta=50000.0,
    )
    cfg = from_hf_config(d)
    assert cfg.layer_kinds() == ("dense", "dense", "moe", "dense", "moe")
    assert (cfg.router.aux_loss_coef, cfg.router.seq_aux_loss_coef, cfg.num_kv_heads) == (
        0.001,
        0.0,
        2,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    to_hf(model, cfg, str(tmp_path / "hf"))
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert {
        "model.layers.3.mlp.up_proj.weight",
        "model.layers.4.mlp.gate.weight",
        "model.layers.4.mlp.experts.3.down_proj.weight",
        "model.layers.2.mlp.shared_experts.gate_proj.weight",
        "model.layers.2.self_attn.k_proj.weight",
    } <= names
    assert not any(".e_score_correction_bias" in n or "rotary" in n for n in names)
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    keys = sorted(set(d) - _NOT_ARCHITECTURE)
    assert {k: out.get(k) for k in keys} == {k: d[k] for k in keys}
    assert out["torch_dtype"] == "float32" and "rope_parameters" not in out and "dtype" not in out
    back, cfg2 = from_hf(str(tmp_path / "hf"))
    assert cfg2 == cfg
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(back)[k], err_msg=str(k))


def test_deepseek_moe_unsupported_settings_are_named():
    bad = dict(
        DEEPSEEK_MOE_16B,
        scoring_func="sigmoid",
        hidden_act="gelu",
        attention_bias=True,
        moe_layer_freq=0,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    del bad["n_routed_experts"]
    with pytest.raises(UnsupportedConfig) as e:
        from_hf_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config.json (deepseek)")
    for part in (
        "scoring_func='sigmoid'",
        "hidden_act",
        "attention_bias",
        "'linear'",
        "moe_layer_freq=0",
        "n_routed_experts is missing",
    ):
        assert part in msg, part
    cfg = from_hf_config(DEEPSEEK_MOE_16B)
    for over, part in [
        (dict(rope_interleave=True), "half-split rope"),
        (dict(router=cfg.router.replace(score_func="sigmoid")), "softmax"),
        (dict(router=cfg.router.replace(routed_scaling_factor=2.5)), "scaling"),
        (dict(head_dim=64), "head_dim=64"),
        (dict(mlp_only_layers=(2, 5)), "moe_layer_freq"),
        (dict(qk_norm=True), "qk_norm"),
    ]:
        with pytest.raises(UnsupportedConfig, match=part):
            to_hf_config(cfg.replace(**over), "deepseek")


def test_gqa_configs_export_to_the_architecture_that_computes_them():
    mixtral = ModelConfig(
        attention_type="gqa",
        rope_interleave=False,
        router=RouterConfig(score_func="softmax", use_score_correction_bias=False),
        n_shared_experts=0,
        first_k_dense_replace=0,
        moe_intermediate_size=512,
    )
    assert hf_model_type(mixtral) == "mixtral"
    # shared experts, a dense first layer, narrower experts or unnormalised weights: only 'deepseek'
    # has them
    for over in (
        dict(n_shared_experts=1),
        dict(first_k_dense_replace=1),
        dict(moe_intermediate_size=64),
        dict(router=mixtral.router.replace(norm_topk_prob=False)),
    ):
        assert hf_model_type(mixtral.replace(**over)) == "deepseek", over
    assert hf_model_type(mixtral.replace(qk_norm=True)) == "qwen3_moe"


def test_a_parameter_without_a_hugging_face_name_is_refused_not_dropped(tmp_path):
    from moejax.config import LoRAConfig
    from moejax.finetune import lora

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply(model, LoRAConfig(rank=2, targets=("attn/",)), nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"no Hugging Face name .* would be lost: .*lora"):
        to_hf(model, CFG, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    to_hf(lora.merge(model), CFG, str(tmp_path / "hf"))  # adapters folded into the weights
