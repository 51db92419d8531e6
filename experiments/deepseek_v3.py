"""DeepSeek-V3 (671B total, 37B activated): the published architecture (config.json of
deepseek-ai/DeepSeek-V3)."""

from moejax.experiment import base_config


def model_overrides(m):
    m.vocab_size = 129280
    m.hidden_size = 7168
    m.num_layers = 61
    m.num_heads = 128
    m.intermediate_size = 18432  # the 3 dense layers
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
    m.rope_mscale = 1.0
    m.rope_mscale_all_dim = 1.0
    m.n_routed_experts = 256
    m.num_experts_per_tok = 8
    m.n_shared_experts = 1
    m.moe_intermediate_size = 2048
    m.first_k_dense_replace = 3
    m.router.score_func = "sigmoid"
    m.router.n_group = 8
    m.router.topk_group = 4
    m.router.norm_topk_prob = True
    m.router.routed_scaling_factor = 2.5
    m.router.use_score_correction_bias = True
    m.router.bias_update_rate = 1e-3  # gamma for the first 14.3T tokens in the paper
    m.router.seq_aux_loss_coef = 1e-4  # alpha
    m.mtp_depth = 1
    m.mtp_loss_weight = 0.3  # lambda for the first 10T tokens
    m.compute_dtype = "bfloat16"


def get_config():
    c = base_config()
    model_overrides(c.model)
    c.execution.remat_policy = "full"  # one layer's activations rebuilt at a time
    c.data.seq_len = 4096
    c.optim.lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    return c
