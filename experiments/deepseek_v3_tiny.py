"""DeepSeek-V3's architecture at CPU size: same routing (sigmoid, groups, bias, scaling), YaRN, MTP."""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "deepseek_v3").get_config()
    m = c.model
    m.vocab_size = 4096
    m.hidden_size = 128
    m.num_layers = 3
    m.num_heads = 4
    m.intermediate_size = 256
    m.max_position_embeddings = 4096
    m.q_lora_rank = 48
    m.kv_lora_rank = 32
    m.qk_nope_head_dim = 16
    m.qk_rope_head_dim = 8
    m.v_head_dim = 16
    m.rope_factor = 4.0
    m.rope_original_max_position_embeddings = 256
    m.n_routed_experts = 16
    m.num_experts_per_tok = 4
    m.moe_intermediate_size = 32
    m.first_k_dense_replace = 1
    m.n_group = 4
    m.topk_group = 2
    m.compute_dtype = "float32"
    m.remat_policy = "none"
    c.data.seq_len = 128
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    return c
