"""Logit parity with Hugging Face transformers (the optional `hf` extra) and the round trip back."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="parity tests need the `hf` extra (torch CPU + transformers)"
)
transformers = pytest.importorskip("transformers", reason="parity tests need the `hf` extra")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from moejax.config import ExecutionConfig  # noqa: E402
from moejax.convert import from_hf, from_hf_config, to_hf  # noqa: E402

TOL = 1e-4

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
)
MLA = dict(
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_shared_experts=1,
)


def _cases():
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        DeepseekV4Config,
        DeepseekV4ForCausalLM,
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    return {
        # sigmoid scores, 4 groups of 2 with 2 kept, correction bias, top-3, scaling, YaRN, MTP
        # layer
        "deepseek_v3_sigmoid_groups": (
            DeepseekV3ForCausalLM,
            DeepseekV3Config(
                **COMMON,
                **MLA,
                num_hidden_layers=3,
                num_key_value_heads=4,
                q_lora_rank=24,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                rope_parameters=yarn,
                num_nextn_predict_layers=1,
            ),
            True,
        ),
        # single group (plain top-k), no normalisation, default rope
        "deepseek_v3_plain": (
            DeepseekV3ForCausalLM,
            DeepseekV3Config(
                **COMMON,
                **MLA,
                num_hidden_layers=2,
                num_key_value_heads=4,
                q_lora_rank=24,
                n_routed_experts=6,
                num_experts_per_tok=2,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                norm_topk_prob=False,
                num_nextn_predict_layers=0,
            ),
            True,
        ),
        # V3.2: DeepSeek Sparse Attention, each query keeping the indexer's top 8 of up to 24 keys
        "deepseek_v32_sparse": (
            DeepseekV32ForCausalLM,
            DeepseekV32Config(
                **COMMON,
                **MLA,
                num_hidden_layers=3,
                num_key_value_heads=4,
                q_lora_rank=24,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                index_topk=8,
                index_n_heads=8,  # (few heads make exact-zero scores, ties at the cut, likely)
                index_head_dim=16,
            ),
            True,
        ),
        # V4: sliding, CSA (entries of 2 tokens, the indexer's top 2) and HCA (of 4) layers, a
        # hash-routed first layer, 2 hyper-connection streams, grouped output projection, YaRN on
        # the compressed rope, sinks, sqrt-softplus routing, clamped SwiGLU
        "deepseek_v4": (
            DeepseekV4ForCausalLM,
            DeepseekV4Config(
                **COMMON,
                num_hidden_layers=5,  # (moejax: [sliding], [CSA, HCA] x 2 scanned)
                head_dim=16,
                q_lora_rank=24,
                partial_rotary_factor=0.5,
                moe_intermediate_size=16,
                n_routed_experts=4,
                num_experts_per_tok=2,
                layer_types=[
                    "sliding_attention",
                    "compressed_sparse_attention",
                    "heavily_compressed_attention",
                    "compressed_sparse_attention",
                    "heavily_compressed_attention",
                ],
                mlp_layer_types=["hash_moe", "moe", "moe", "moe", "moe"],
                compress_rates={
                    "compressed_sparse_attention": 2,
                    "heavily_compressed_attention": 4,
                },
                sliding_window=4,
                o_groups=2,
                o_lora_rank=8,
                index_n_heads=8,  # (few heads make exact-zero scores, ties at the cut, likely)
                index_head_dim=16,
                index_topk=2,
                hc_mult=2,
                swiglu_limit=0.5,  # (small: the clamp really cuts at this init)
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
            ),
            True,
        ),
        # softmax routing, group-limited greedy (group score = max), V2 (complex-pair rope)
        "deepseek_v2_softmax_groups": (
            DeepseekV2ForCausalLM,
            DeepseekV2Config(
                **COMMON,
                **MLA,
                num_hidden_layers=3,
                q_lora_rank=24,
                n_routed_experts=8,
                num_experts_per_tok=2,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
                routed_scaling_factor=16.0,
            ),
            False,
        ),
        # the V2-Lite shape: q_lora_rank 0 (plain query projection), greedy softmax top-k
        "deepseek_v2_lite": (
            DeepseekV2ForCausalLM,
            DeepseekV2Config(
                **COMMON,
                **MLA,
                num_hidden_layers=2,
                q_lora_rank=None,
                n_routed_experts=8,
                num_experts_per_tok=3,
                topk_method="greedy",
                first_k_dense_replace=1,
            ),
            False,
        ),
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig(
                **COMMON,
                intermediate_size=24,
                num_hidden_layers=2,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
            ),
            False,
        ),
        "qwen3_moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                **COMMON,
                intermediate_size=48,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                num_key_value_heads=2,
                head_dim=8,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                mlp_only_layers=[1],
            ),
            False,
        ),
    }


CASES = list(_cases())


def _perturb(hf, has_bias: bool):
    """Non-zero correction biases (so selection really depends on them) and a non-trivial indexer
    key norm (DeepSeek Sparse Attention); for V4 every parameter transformers initializes to a
    constant (sinks, position biases, hyper-connection biases and scales, norms) and the hash
    table (zeros: every token on expert 0) drawn at random."""
    with torch.no_grad():
        if hf.config.model_type == "deepseek_v4":
            E, K = hf.config.n_routed_experts, hf.config.num_experts_per_tok
            for name, p in hf.named_parameters():
                if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
                    p.copy_(0.3 * torch.randn_like(p))
                elif name.endswith(("scale", "norm.weight", "layernorm.weight")):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
            for layer in hf.model.layers:
                if hasattr(layer.mlp.gate, "tid2eid"):
                    table = [torch.randperm(E)[:K] for _ in range(hf.config.vocab_size)]
                    layer.mlp.gate.tid2eid.copy_(torch.stack(table))
        for layer in hf.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if has_bias and gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(
                    0.05 * torch.randn_like(gate.e_score_correction_bias)
                )
            ix = getattr(layer.self_attn, "indexer", None)
            if ix is not None:
                ix.k_norm.weight.copy_(1 + 0.2 * torch.randn_like(ix.k_norm.weight))
                ix.k_norm.bias.copy_(0.2 * torch.randn_like(ix.k_norm.bias))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("name", CASES)
def test_logit_parity_and_round_trip(name, tmp_path):
    cls, cfg, has_bias = _cases()[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    _perturb(hf, has_bias)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 24))
    want = _hf_logits(hf, ids)

    for impl in ("dense", "dropless", "capacity"):
        ex = ExecutionConfig(moe_impl=impl, capacity_factor=64.0)
        model, mcfg = from_hf(str(src), execution=ex)
        got, _ = model(jnp.asarray(ids))
        err = float(np.abs(np.asarray(got) - want).max())
        assert err <= TOL, f"{name} [{impl}] max |logit diff| = {err:.2e}"

    # Export and reload with transformers: same logits.
    dst = tmp_path / "back"
    to_hf(model, mcfg, str(dst))
    again = cls.from_pretrained(dst).eval()
    err = float(np.abs(_hf_logits(again, ids) - want).max())
    assert err <= TOL, f"{name} round trip: max |logit diff| = {err:.2e}"
    if mcfg.index_topk:  # the indexer's selection decides the logits: attending to all differs
        dense, _ = from_hf(str(src), index_topk=10**6)
        assert float(np.abs(np.asarray(dense(jnp.asarray(ids))[0]) - want).max()) > 1e-2


@pytest.mark.parametrize(
    "name",
    ["deepseek_v3_sigmoid_groups", "deepseek_v32_sparse", "deepseek_v4", "mixtral", "qwen3_moe"],
)
def test_greedy_generation_matches_transformers(name, tmp_path):
    """Batched cached greedy decoding (mixed prompt lengths; one row with a repetition penalty)
    equals transformers' generate token for token; with the V3 MTP layer, speculative decoding
    too."""
    from moejax.infer import Generator, SamplingParams

    cls, cfg, _ = _cases()[name]
    torch.manual_seed(1)
    hf = cls(cfg).eval()
    if cfg.model_type == "deepseek_v4":
        _perturb(hf, False)  # a real hash table
    hf.generation_config.eos_token_id = None  # run every row to max_new_tokens
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    model, mcfg = from_hf(str(src))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (5, 11, 2)]
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=7),
    ]
    gen = Generator(model, eos_ids=[])
    outs = gen.generate(prompts, params)
    for p, o, sp in zip(prompts, outs, params):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([p]),
                max_new_tokens=sp.max_new_tokens,
                do_sample=False,
                repetition_penalty=sp.repetition_penalty,
                pad_token_id=0,
            )[0, len(p) :].tolist()
        assert o.tokens == want, (name, p, sp.repetition_penalty)
    if mcfg.mtp_depth:
        spec = gen.generate(prompts, params, speculative=True)
        assert [o.tokens for o in spec] == [o.tokens for o in outs]


# DeepSeekMoE v1 (model_type 'deepseek', deepseek-moe-16b) ships as remote code: transformers has no
# class for it. The reference is assembled from transformers' own modules, which compute what
# modeling_deepseek.py does: Llama attention, RMSNorm, half-split rope and decoder layers, with
# DeepseekV2's MoE (softmax, greedy top-k, unnormalised weights, one fused shared MLP) in the MoE
# layers. The checkpoint is written in the remote code's per-expert names, next to a config.json
# like the released one.
_V1_NOT_ARCHITECTURE = (
    "auto_map",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "attention_dropout",
    "torch_dtype",
    "transformers_version",
)
_V1 = dict(
    architectures=["DeepseekForCausalLM"],
    model_type="deepseek",
    auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=3,
    norm_topk_prob=False,
    scoring_func="softmax",
    aux_loss_alpha=0.001,
    seq_aux=True,
    hidden_act="silu",
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    use_cache=True,
    bos_token_id=0,
    eos_token_id=1,
    pretraining_tp=1,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
    attention_dropout=0.0,
    torch_dtype="bfloat16",
    transformers_version="4.36.0",
)
DEEPSEEK_V1_CASES = {
    # the deepseek-moe-16b shape: multi-head attention, first layer dense, then every layer MoE
    "deepseek_moe_16b_shape": dict(
        _V1,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        moe_layer_freq=1,
    ),
    # what else the remote code allows: grouped KV heads, MoE every 2nd layer from layer 0, another
    # rope base, the Switch-style balance loss
    "deepseek_gqa_every_2nd": dict(
        _V1,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        first_k_dense_replace=0,
        moe_layer_freq=2,
        rope_theta=50000.0,
        seq_aux=False,
    ),
}


def _deepseek_v1_reference(d):
    """A transformers-built torch model computing what modeling_deepseek.py computes for config.json
    `d`."""
    from transformers import DeepseekV2Config, LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    llama = LlamaConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        rms_norm_eps=d["rms_norm_eps"],
        max_position_embeddings=d["max_position_embeddings"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": d["rope_theta"]},
        initializer_range=d["initializer_range"],
        attn_implementation="eager",
    )
    moe = DeepseekV2Config(
        hidden_size=d["hidden_size"],
        moe_intermediate_size=d["moe_intermediate_size"],
        n_routed_experts=d["n_routed_experts"],
        num_experts_per_tok=d["num_experts_per_tok"],
        n_shared_experts=d["n_shared_experts"],
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        experts_implementation="eager",
    )
    model = LlamaForCausalLM(llama)
    for i, layer in enumerate(model.model.layers):
        if (
            i >= d["first_k_dense_replace"] and i % d["moe_layer_freq"] == 0
        ):  # modeling_deepseek.py's rule
            layer.mlp = DeepseekV2Moe(moe)
            with torch.no_grad():
                for p in layer.mlp.parameters():  # created empty (router: zeros)
                    p.normal_(0.0, d["initializer_range"])
    return model.eval()


def _to_deepseek_names(state) -> dict[str, np.ndarray]:
    """transformers' fused experts (gate_up_proj [E, 2F, D], down_proj [E, D, F]) -> per-expert
    names."""
    out = {}
    for name, t in state.items():
        t = t.detach()
        if name.endswith(".experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)  # [E, F, D] each
            for j in range(t.shape[0]):
                out[f"{pre}{j}.gate_proj.weight"], out[f"{pre}{j}.up_proj.weight"] = gate[j], up[j]
        elif name.endswith(".experts.down_proj"):
            for j in range(t.shape[0]):
                out[f"{name[: -len('down_proj')]}{j}.down_proj.weight"] = t[j]
        else:
            out[name] = t
    return {k: v.contiguous().numpy() for k, v in out.items()}


def _load_deepseek_names(model, tensors):
    """Per-expert names -> the reference's fused experts; every tensor must fit (strict)."""
    state = {}
    for name in model.state_dict():
        if name.endswith(".experts.gate_up_proj"):
            pre, e = name[: -len("gate_up_proj")], model.get_parameter(name).shape[0]
            state[name] = np.stack(
                [
                    np.concatenate(
                        [
                            tensors.pop(f"{pre}{j}.gate_proj.weight"),
                            tensors.pop(f"{pre}{j}.up_proj.weight"),
                        ]
                    )
                    for j in range(e)
                ]
            )
        elif name.endswith(".experts.down_proj"):
            pre, e = name[: -len("down_proj")], model.get_parameter(name).shape[0]
            state[name] = np.stack([tensors.pop(f"{pre}{j}.down_proj.weight") for j in range(e)])
        else:
            state[name] = tensors.pop(name)
    assert not tensors, sorted(tensors)
    model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True
    )
    return model


@pytest.mark.parametrize("name", list(DEEPSEEK_V1_CASES))
def test_deepseek_moe_v1_logit_parity_and_round_trip(name, tmp_path):
    d = DEEPSEEK_V1_CASES[name]
    torch.manual_seed(0)
    ref = _deepseek_v1_reference(d)
    src = tmp_path / "hf"
    src.mkdir()
    save_file(
        _to_deepseek_names(ref.state_dict()),
        str(src / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (src / "config.json").write_text(json.dumps(d))
    ids = np.random.default_rng(0).integers(0, d["vocab_size"], size=(2, 24))
    want = _hf_logits(ref, ids)

    for impl in ("dense", "dropless", "capacity"):
        ex = ExecutionConfig(moe_impl=impl, capacity_factor=64.0)
        model, mcfg = from_hf(str(src), execution=ex)
        got, _ = model(jnp.asarray(ids))
        err = float(np.abs(np.asarray(got) - want).max())
        assert err <= TOL, f"{name} [{impl}] max |logit diff| = {err:.2e}"

    # Round trip: the same tensors under the same names, the same architecture keys in config.json.
    dst = tmp_path / "back"
    to_hf(model, mcfg, str(dst))
    before, after = (
        load_file(str(src / "model.safetensors")),
        load_file(str(dst / "model.safetensors")),
    )
    assert sorted(after) == sorted(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    out = json.loads((dst / "config.json").read_text())
    assert out["architectures"] == ["DeepseekForCausalLM"] and out["model_type"] == "deepseek"
    keys = sorted(set(d) - set(_V1_NOT_ARCHITECTURE))
    assert {k: out.get(k) for k in keys} == {k: d[k] for k in keys}
    assert from_hf_config(out) == from_hf_config(d)
    # and the reference, loaded from the export, gives the same logits
    again = _load_deepseek_names(_deepseek_v1_reference(out), after)
    err = float(np.abs(_hf_logits(again, ids) - want).max())
    assert err <= TOL, f"{name} round trip: max |logit diff| = {err:.2e}"
