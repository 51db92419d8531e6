"""Mixtral 8x7B (46.7B total, 12.9B activated): GQA, 8 experts top-2, softmax then renormalised."""

from moejax.experiment import base_config


def model_overrides(m):
    m.vocab_size = 32000
    m.hidden_size = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.intermediate_size = 14336
    m.max_position_embeddings = 32768
    m.rms_norm_eps = 1e-5
    m.attention_type = "gqa"
    m.num_kv_heads = 8
    m.head_dim = 128
    m.qk_norm = False
    m.rope_theta = 1e6
    m.rope_interleave = False
    m.rope_type = "default"
    m.n_routed_experts = 8
    m.num_experts_per_tok = 2
    m.n_shared_experts = 0
    m.moe_intermediate_size = 14336
    m.first_k_dense_replace = 0
    m.router.score_func = "softmax"
    m.router.n_group = 1
    m.router.topk_group = 1
    m.router.norm_topk_prob = True
    m.router.routed_scaling_factor = 1.0
    m.router.use_score_correction_bias = False
    m.router.aux_loss_coef = 0.02  # router_aux_loss_coef
    m.router.seq_aux_loss_coef = 0.0
    m.mtp_depth = 0
    m.compute_dtype = "bfloat16"


def get_config():
    c = base_config()
    model_overrides(c.model)
    c.execution.remat_policy = "full"  # one layer's activations rebuilt at a time
    c.data.seq_len = 4096
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    return c
