"""Building blocks: parameters with logical axes, RMSNorm, SwiGLU MLP, rotary embeddings (+YaRN)."""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.config import ModelConfig
from moejax.kernels.fp8 import fp8_einsum


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init: str = "normal") -> nnx.Param:
    """A parameter in cfg.param_dtype that records its logical axis names (used by sharding).

    init: 'normal' (std = cfg.initializer_range, as Hugging Face does), 'ones' or 'zeros'.
    """
    assert len(shape) == len(axes), (shape, axes)
    dtype = dtype_of(cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in float32; returns float32."""
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return weight.astype(jnp.float32) * (x * jax.lax.rsqrt(var + eps))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = cfg.rms_norm_eps
        self.weight = param(rngs, (dim,), (axis_name,), cfg, init="ones")

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def swiglu(gate_up, limit: float = 0.0):
    """silu(gate) * up in float32, for gate_up [..., 2, F] -> [..., F]. limit > 0 (DeepSeek-V4's
    swiglu_limit) first clamps gate to <= limit and up to [-limit, limit]."""
    gate_up = gate_up.astype(jnp.float32)
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    if limit:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


# ------------------------------------------------------------------------------- LoRA

LORA_RANK = "Z"  # the adapter rank's letter in the einsums below


def lora_specs(spec: str) -> tuple[str, str]:
    """The two einsums of a low-rank update of `spec` ('x,w->y'): x A [in..., Z] then B [Z, out...].

    The weight's letters that x shares are its inputs, the rest its outputs, in the weight's order:
    'BTD,DNH->BTNH' -> ('BTD,DZ->BTZ', 'BTZ,ZNH->BTNH').
    """
    lhs, out = spec.split("->")
    x, w = lhs.split(",")
    ins = "".join(c for c in w if c in x)
    outs = "".join(c for c in w if c not in x)
    mid = "".join(c for c in x if c not in ins) + LORA_RANK
    return f"{x},{ins}{LORA_RANK}->{mid}", f"{mid},{LORA_RANK}{outs}->{out}"


def lora_update(spec: str, x, a, b, scale: float, dropout: float = 0.0, rng=None):
    """scale * (dropout(x) A) B for `spec`'s weight, float32; a [in..., Z], b [Z, out...]."""
    if dropout > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    sa, sb = lora_specs(spec)
    z = jnp.einsum(sa, x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    return scale * jnp.einsum(
        sb, z.astype(x.dtype), b.astype(x.dtype), preferred_element_type=jnp.float32
    )


def adapters(module, name: str):
    """(A, B, scale, dropout) of `module.<name>`'s LoRA adapter (moejax.finetune.lora adds them), or
    None."""
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return None
    return a[...], getattr(module, name + "_lora_b")[...], module.lora_scale, module.lora_dropout


def project(module, name: str, spec: str, x, cd, rng=None):
    """einsum(spec, x, module.<name>) in compute dtype cd with float32 accumulation, plus the
    weight's LoRA update when it has one (rng: the adapter's dropout, training only)."""
    x = x.astype(cd)
    w = getattr(module, name)[...].astype(cd)
    if getattr(module, "fp8", False):  # execution.fp8: DeepSeek-V3's fine-grained FP8
        y = fp8_einsum(spec, x, w, jnp.float32)
    else:
        y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    lora = adapters(module, name)
    if lora is not None:
        a, b, scale, dropout = lora
        if rng is not None:
            rng = jax.random.fold_in(rng, zlib.crc32(name.encode()))
        y = y + lora_update(spec, x, a.astype(cd), b.astype(cd), scale, dropout, rng)
    return y


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x W_gate) * (x W_up))."""

    def __init__(
        self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs, layout=None, fp8: bool = False
    ):
        D = cfg.hidden_size
        self.fp8 = fp8  # FP8 matmuls (execution.fp8)
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.layout = layout  # sharding.Layout: activations pinned to it (None: no mesh)
        self.w_gate_up = param(rngs, (D, 2, hidden), ("embed", None, "mlp"), cfg)  # [D, 2, F]
        self.w_down = param(rngs, (hidden, D), ("mlp", "embed"), cfg)  # [F, D]
        self.limit = cfg.swiglu_limit  # DeepSeek-V4's clamp (0: none)

    def __call__(self, x, rng=None):
        """x [..., D] (rows first: [B, T, D] or [M, D]) -> [..., D] float32. rng: LoRA dropout
        (training)."""
        cd = self.compute_dtype
        # [B, T, D] or tokens [M, D] (M = B * T flattened, split like batch then sequence)
        rows = ("batch", "sequence") if x.ndim == 3 else (("batch", "sequence"),)
        h = project(self, "w_gate_up", "...D,DXF->...XF", x, cd, rng)
        h = sharding.constrain(h, self.layout, rows + (None, "mlp"))  # [..., 2, F]
        h = swiglu(h, self.limit).astype(cd)
        y = project(self, "w_down", "...F,FD->...D", h, cd, rng)
        return sharding.constrain(y, self.layout, rows + (None,))


# ------------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [P] for the rotary dims and the cos/sin scale (YaRN's attention factor).

    Follows Hugging Face's `_compute_yarn_parameters` exactly (truncate=True), so parity holds.
    """
    dim = cfg.rope_dim
    base = cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    factor = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        from moejax.config import yarn_mscale

        attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(
            factor, cfg.rope_mscale_all_dim
        )
    else:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    orig = cfg.rope_original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions, cfg: ModelConfig):
    """cos, sin [B, T, P] in float32 (already scaled by YaRN's attention factor)."""
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, P]
    return jnp.cos(freqs) * scale, jnp.sin(freqs) * scale


def apply_rope(x, cos, sin, interleave: bool):
    """Rotates x [B, T, N, 2P] by positions.

    interleave=True rotates pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints are laid out;
    False rotates (x_i, x_{i+P}) as Llama, Mixtral and Qwen do. Either way the output is returned
    in half-split order: q and k pass through the same map, so q.k is unchanged.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, T, N, P] each
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos = cos[:, :, None, :]  # [B, T, 1, P]
    sin = sin[:, :, None, :]
    x1 = x1.astype(jnp.float32)
    x2 = x2.astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
