"""Logit parity with Hugging Face transformers (the optional `hf` extra) and the round trip back."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the `hf` extra (torch CPU + transformers)")
transformers = pytest.importorskip("transformers", reason="parity tests need the `hf` extra")

import jax.numpy as jnp  # noqa: E402

from moejax.convert import from_hf, to_hf  # noqa: E402

TOL = 1e-4

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=256,
              initializer_range=0.1)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, intermediate_size=48,
           moe_intermediate_size=16, n_shared_experts=1)


def _cases():
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    return {
        # sigmoid scores, 4 groups of 2 with 2 kept, correction bias, top-3, scaling, YaRN, MTP layer
        "deepseek_v3_sigmoid_groups": (DeepseekV3ForCausalLM, DeepseekV3Config(
            **COMMON, **MLA, num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=24, n_routed_experts=8,
            num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, rope_parameters=yarn, num_nextn_predict_layers=1), True),
        # single group (plain top-k), no normalisation, default rope
        "deepseek_v3_plain": (DeepseekV3ForCausalLM, DeepseekV3Config(
            **COMMON, **MLA, num_hidden_layers=2, num_key_value_heads=4, q_lora_rank=24, n_routed_experts=6,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
            num_nextn_predict_layers=0), True),
        # softmax routing, group-limited greedy (group score = max), V2 (complex-pair rope)
        "deepseek_v2_softmax_groups": (DeepseekV2ForCausalLM, DeepseekV2Config(
            **COMMON, **MLA, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
            topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
            routed_scaling_factor=16.0), False),
        # the V2-Lite shape: q_lora_rank 0 (plain query projection), greedy softmax top-k
        "deepseek_v2_lite": (DeepseekV2ForCausalLM, DeepseekV2Config(
            **COMMON, **MLA, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
            topk_method="greedy", first_k_dense_replace=1), False),
        "mixtral": (MixtralForCausalLM, MixtralConfig(
            **COMMON, intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2), False),
        "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=2,
            head_dim=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]), False),
    }


CASES = list(_cases())


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("name", CASES)
def test_logit_parity_and_round_trip(name, tmp_path):
    cls, cfg, has_bias = _cases()[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    if has_bias:  # non-zero correction biases so selection really depends on them
        with torch.no_grad():
            for layer in hf.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.copy_(0.05 * torch.randn_like(gate.e_score_correction_bias))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 24))
    want = _hf_logits(hf, ids)

    for impl in ("dense", "dropless", "capacity"):
        model, mcfg = from_hf(str(src), moe_impl=impl, capacity_factor=64.0)
        got, _ = model(jnp.asarray(ids))
        err = float(np.abs(np.asarray(got) - want).max())
        assert err <= TOL, f"{name} [{impl}] max |logit diff| = {err:.2e}"

    # Export and reload with transformers: same logits.
    dst = tmp_path / "back"
    to_hf(model, mcfg, str(dst))
    again = cls.from_pretrained(dst).eval()
    err = float(np.abs(_hf_logits(again, ids) - want).max())
    assert err <= TOL, f"{name} round trip: max |logit diff| = {err:.2e}"


@pytest.mark.parametrize("name", ["deepseek_v3_sigmoid_groups", "mixtral", "qwen3_moe"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    """Batched cached greedy decoding (mixed prompt lengths; one row with a repetition penalty) equals
    transformers' generate token for token; with the V3 MTP layer, speculative decoding too."""
    from moejax.infer import Generator, SamplingParams

    cls, cfg, _ = _cases()[name]
    torch.manual_seed(1)
    hf = cls(cfg).eval()
    hf.generation_config.eos_token_id = None  # run every row to max_new_tokens
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    model, mcfg = from_hf(str(src))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (5, 11, 2)]
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, repetition_penalty=1.5),
              SamplingParams(max_new_tokens=7)]
    gen = Generator(model, eos_ids=[])
    outs = gen.generate(prompts, params)
    for p, o, sp in zip(prompts, outs, params):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=sp.max_new_tokens, do_sample=False,
                               repetition_penalty=sp.repetition_penalty, pad_token_id=0)[0, len(p):].tolist()
        assert o.tokens == want, (name, p, sp.repetition_penalty)
    if mcfg.mtp_depth:
        spec = gen.generate(prompts, params, speculative=True)
        assert [o.tokens for o in spec] == [o.tokens for o in outs]
