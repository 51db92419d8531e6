"""mixtral_8x7b at CPU size: the same architecture family and routing rules, tiny widths."""

from moejax.experiment import sibling


def get_config():
    c = sibling(__file__, "mixtral_8x7b").get_config()
    m = c.model
    m.vocab_size = 4096
    m.hidden_size = 128
    m.num_layers = 3
    m.num_heads = 4
    m.intermediate_size = 64 if m.moe_intermediate_size == m.intermediate_size else 256
    m.max_position_embeddings = 4096
    m.num_kv_heads = 2
    m.head_dim = 32
    m.n_routed_experts = 8 if m.n_routed_experts <= 8 else 16
    m.moe_intermediate_size = 64 if m.moe_intermediate_size == m.intermediate_size else 32
    m.num_experts_per_tok = min(m.num_experts_per_tok, 4)
    m.compute_dtype = "float32"
    m.remat_policy = "none"
    c.data.seq_len = 128
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    return c
