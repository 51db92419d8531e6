"""DeepSeek-V2-Lite (15.7B total, 2.4B activated): MLA without a query bottleneck, 64 experts
top-6."""

from moejax.experiment import sibling


def model_overrides(m):
    sibling(__file__, "deepseek_v2").model_overrides(m)
    m.hidden_size = 2048
    m.num_layers = 27
    m.num_heads = 16
    m.intermediate_size = 10944
    m.q_lora_rank = 0  # plain query projection
    m.n_routed_experts = 64
    m.num_experts_per_tok = 6
    m.n_shared_experts = 2
    m.moe_intermediate_size = 1408
    m.router.n_group = 1  # greedy top-k
    m.router.topk_group = 1
    m.router.routed_scaling_factor = 1.0
    m.router.seq_aux_loss_coef = 0.001


def get_config():
    c = sibling(__file__, "deepseek_v2").get_config()
    model_overrides(c.model)
    c.optim.lr = 4.2e-4
    return c
