"""DeepSeek-V4-Flash (284B total, 13B activated): the published architecture (config.json of
deepseek-ai/DeepSeek-V4-Flash-Base, as transformers' `deepseek_v4` reads it).

43 layers: 2 sliding-window only, then compressed sparse attention (CSA: entries of 4 tokens, the
indexer's top 512 per query) alternating with heavily compressed attention (HCA: entries of 128
tokens, all of them), every layer also attending over a 128-token window; one 512-dim key/value
head, 64 query heads, 4 hyper-connection streams; 256 routed experts (top 6, sqrt-softplus
scores, the first 3 layers hash-routed) plus one shared expert, SwiGLU clamped at 10. The
checkpoint's MTP module is not built (model.mtp_depth=0).
"""

from moejax.experiment import base_config

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"


def model_overrides(m):
    m.vocab_size = 129280
    m.hidden_size = 4096
    m.num_layers = 43
    m.num_heads = 64
    m.intermediate_size = 2048  # (no dense layers; the shared expert is moe_intermediate_size)
    m.max_position_embeddings = 1048576
    m.attention_type = "v4"
    m.head_dim = 512
    m.qk_rope_head_dim = 64
    m.q_lora_rank = 1024
    m.o_groups = 8
    m.o_lora_rank = 1024
    m.sliding_window = 128
    m.layer_types = ["sliding_attention"] * 2 + [CSA if i % 2 == 0 else HCA for i in range(41)]
    m.compress_rate_csa = 4
    m.compress_rate_hca = 128
    m.index_topk = 512
    m.index_n_heads = 64
    m.index_head_dim = 128
    m.rope_theta = 10000.0  # the sliding layers' rope
    m.compress_rope_theta = 160000.0  # the compressed layers' rope, with YaRN
    m.rope_type = "yarn"
    m.rope_factor = 16.0
    m.rope_original_max_position_embeddings = 65536
    m.rope_beta_fast = 32.0
    m.rope_beta_slow = 1.0
    m.rope_mscale = 0.0
    m.rope_mscale_all_dim = 0.0
    m.hc_mult = 4
    m.hc_sinkhorn_iters = 20
    m.hc_eps = 1e-6
    m.n_routed_experts = 256
    m.num_experts_per_tok = 6
    m.n_shared_experts = 1
    m.moe_intermediate_size = 2048
    m.first_k_dense_replace = 0
    m.num_hash_layers = 3
    m.swiglu_limit = 10.0
    m.router.score_func = "sqrtsoftplus"
    m.router.n_group = 1
    m.router.topk_group = 1
    m.router.norm_topk_prob = True
    m.router.routed_scaling_factor = 1.5
    m.router.use_score_correction_bias = True
    m.router.bias_update_rate = 1e-3
    m.router.seq_aux_loss_coef = 1e-4
    m.mtp_depth = 0
    m.compute_dtype = "bfloat16"


def get_config():
    c = base_config()
    model_overrides(c.model)
    c.execution.remat_policy = "full"
    c.data.seq_len = 4096
    c.optim.lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    return c
