"""DeepSeekMoE 16B (16.4B total, 2.8B activated): the published architecture (config.json of
deepseek-ai/deepseek-moe-16b-base, model_type 'deepseek'). Multi-head attention with Llama's
half-split rope, one dense layer, then 27 MoE layers of 64 fine-grained routed experts (top-6,
softmax, no renormalisation) plus 2 shared experts. `python -m moejax.convert` reads and writes its
checkpoints.
"""

from moejax.experiment import base_config


def model_overrides(m):
    m.vocab_size = 102400
    m.hidden_size = 2048  # D
    m.num_layers = 28  # L: 1 dense + 27 MoE
    m.num_heads = 16  # N
    m.intermediate_size = 10944  # F of the dense layer
    m.max_position_embeddings = 4096  # the 4K pretraining context
    m.rms_norm_eps = 1e-6
    m.tie_word_embeddings = False  # separate lm_head
    m.initializer_range = 0.02  # config.json's value
    m.attention_type = "gqa"  # q/k/v/o projections, no latent compression
    m.num_kv_heads = 16  # = num_heads: plain multi-head attention
    m.head_dim = 128  # H = hidden_size / num_heads
    m.qk_norm = False
    m.rope_theta = 10000.0
    m.rope_interleave = False  # half-split rope, as Llama
    m.rope_type = "default"  # no rope scaling
    m.n_routed_experts = 64  # E
    m.num_experts_per_tok = 6  # K
    m.n_shared_experts = 2  # one fused shared MLP of width 2 x 1408
    m.moe_intermediate_size = 1408  # F of each routed (and each shared) expert
    m.first_k_dense_replace = (
        1  # layer 0 keeps a dense FFN (moe_layer_freq 1: every later layer is MoE)
    )
    m.router.score_func = "softmax"
    m.router.n_group = 1  # plain top-k, no group-limited routing
    m.router.topk_group = 1
    m.router.norm_topk_prob = False  # gate weights are the raw softmax probabilities
    m.router.routed_scaling_factor = 1.0
    m.router.use_score_correction_bias = False  # balanced by the auxiliary loss instead
    m.router.aux_loss_coef = 0.0
    m.router.seq_aux_loss_coef = (
        0.001  # aux_loss_alpha with seq_aux: the expert-level balance factor of the paper
    )
    m.router.z_loss_coef = 0.0
    m.mtp_depth = 0  # no multi-token prediction
    m.compute_dtype = "bfloat16"


def get_config():
    c = base_config()
    model_overrides(c.model)
    c.execution.remat_policy = "full"  # one layer's activations rebuilt at a time
    c.data.seq_len = 4096
    c.optim.lr = 4.2e-4  # peak learning rate of the paper
    c.optim.warmup_steps = 2000  # linear warmup
    # The paper multiplies the rate by 0.316 at 80% and again at 90% of the steps (to ~0.1x); a
    # linear warmup-stable-decay over the last 20% down to 0.1x is the closest schedule moejax has.
    c.optim.schedule = "wsd"
    c.optim.decay_fraction = 0.2
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    return c
