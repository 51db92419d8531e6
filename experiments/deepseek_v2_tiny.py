"""deepseek_v2 at CPU size: the same architecture family and routing rules, tiny widths."""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "deepseek_v2").get_config()
    m = c.model
    m.vocab_size = 4096
    m.hidden_size = 128
    m.num_layers = 3
    m.num_heads = 4
    m.intermediate_size = 64 if m.moe_intermediate_size == m.intermediate_size else 256
    m.max_position_embeddings = 4096
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
    m.n_group = min(m.n_group, 4)
    m.topk_group = min(m.topk_group, 2)
    m.compute_dtype = "float32"
    m.remat_policy = "none"
    c.data.seq_len = 128
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    return c
