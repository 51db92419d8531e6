"""Default experiment: a tiny DeepSeek-V3-style MoE trained on the built-in Python corpus.

MLA attention, one dense layer then MoE layers, 8 routed + 1 shared experts, sigmoid routing with
two expert groups, the auxiliary-loss-free bias plus a small sequence-wise balance loss, and
multi-token prediction of depth 1. Trains on a 2-core CPU in under 10 minutes.

  python -m moejax.train --config experiments/moe.py --config.train.steps=100
"""

from moejax.experiment import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 4096  # sentencepiece BPE vocabulary trained on the corpus
    m.hidden_size = 256  # D
    m.num_layers = 4  # 1 dense + 3 MoE
    m.num_heads = 4
    m.intermediate_size = 512  # dense FFN width
    m.attention_type = "mla"
    m.q_lora_rank = 96
    m.kv_lora_rank = 64
    m.qk_nope_head_dim = 32
    m.qk_rope_head_dim = 16
    m.v_head_dim = 32
    m.n_routed_experts = 8
    m.num_experts_per_tok = 2
    m.n_shared_experts = 1
    m.moe_intermediate_size = 128
    m.first_k_dense_replace = 1
    m.router.score_func = "sigmoid"
    m.router.n_group = 2  # two groups of four experts, top-1 group per token
    m.router.topk_group = 1
    m.router.norm_topk_prob = True
    m.router.routed_scaling_factor = 1.0
    m.router.use_score_correction_bias = True  # aux-loss-free balancing
    m.router.bias_update_rate = 1e-3  # gamma
    m.router.seq_aux_loss_coef = 1e-4  # small sequence-wise balance loss (alpha)
    m.mtp_depth = 1
    m.mtp_loss_weight = 0.3
    c.execution.moe_impl = "dropless"  # sort by expert, grouped matmul (moejax.model.moe)
    m.max_position_embeddings = 2048

    c.data.seq_len = 256
    c.train.batch_size = 8  # rows of 256 tokens: 2048 tokens per step
    c.train.steps = 240
    c.train.log_every = 10
    c.train.eval_every = 80
    c.train.ckpt_every = 80
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 20
    c.optim.schedule = "cosine"
    return c
