"""DeepSeek-V2 (236B total, 21B activated): softmax routing, group-limited greedy, 2 shared
experts."""

from moejax.experiment import base_config


def model_overrides(m):
    m.vocab_size = 102400
    m.hidden_size = 5120
    m.num_layers = 60
    m.num_heads = 128
    m.intermediate_size = 12288
    m.max_position_embeddings = 163840
    m.attention_type = "mla"
    m.q_lora_rank = 1536
    m.kv_lora_rank = 512
    m.qk_nope_head_dim = 128
    m.qk_rope_head_dim = 64
    m.v_head_dim = 128
    m.rope_theta = 10000.0
    m.rope_interleave = True
    m.rope_type = "yarn"
    m.rope_factor = 40.0
    m.rope_original_max_position_embeddings = 4096
    m.rope_beta_fast = 32.0
    m.rope_beta_slow = 1.0
    m.rope_mscale = 0.707
    m.rope_mscale_all_dim = 0.707
    m.n_routed_experts = 160
    m.num_experts_per_tok = 6
    m.n_shared_experts = 2
    m.moe_intermediate_size = 1536
    m.first_k_dense_replace = 1
    m.router.score_func = "softmax"
    m.router.n_group = 8
    m.router.topk_group = 3
    m.router.norm_topk_prob = False
    m.router.routed_scaling_factor = 16.0
    m.router.use_score_correction_bias = False
    m.router.seq_aux_loss_coef = 0.003  # expert-level balance factor alpha_1 of the paper
    m.mtp_depth = 0
    m.compute_dtype = "bfloat16"


def get_config():
    c = base_config()
    model_overrides(c.model)
    c.execution.remat_policy = "full"  # one layer's activations rebuilt at a time
    c.data.seq_len = 4096
    c.optim.lr = 2.4e-4
    c.optim.warmup_steps = 2000
    return c
