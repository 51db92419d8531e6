"""Weight-only quantization for inference: int8 (or fp8 e4m3) values with one float32 scale per
output channel.

Every projection is covered: attention, dense and shared MLPs, the routed experts (whose weights
feed the grouped matmul), the MTP projection, the embedding table and the LM head. Norms, the
float32 router and its correction bias stay as they are.

A quantized weight is a `QuantizedParam`: its state holds {'q': int8 [...], 'scale': float32 [...]}
and reading it (`w[...]`, what every module does) returns q * scale, so the model code is unchanged
and the dequantization happens inside the jitted step, where the weight is used. What is saved is
memory at rest (parameters 1/3.9 of float32); the matmuls still run on full-precision operands, so
a step is not faster. XLA fuses the dequantization into what reads the weight: the tiled grouped
matmul's per-tile weight gather holds the same temporaries for int8 as for float32 weights (98.01
MiB both, 64 experts of 512 x 256, measured), and running the grouped matmul on the int8 values
with the per-output-channel scales applied after it (tried, seventeenth session) changed neither
memory nor speed on CPU. A gain needs a kernel that reads int8 tiles itself (the Pallas grouped
matmuls take one dtype today).
Scales reduce over the contracted axes of each weight (named from the end, so a stacked layer axis
in front does not matter); the same grouping serves the embedding lookup (per row).

qwix quantizes dot_general / einsum calls, not jax.lax.ragged_dot or our grouped-matmul kernels, so
it would leave the experts (most of a DeepSeek model's weights) in full precision; this module
covers them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError

# contracted axes of each weight, counted from the end (the tail shape is the same stacked or not)
CONTRACTED = {
    "embed": (-1,),  # [V, D]: a row per token (lookup) and the tied head's contraction over D
    "lm_head": (-2,),  # [D, V]
    "wq_a": (-2,),
    "wkv_a": (-2,),  # [D, R]
    "wq": (-3,),
    "wq_b": (-3,),
    "wkv_b": (-3,),
    "wk": (-3,),
    "wv": (-3,),  # [in, N, H]
    "wo": (-3, -2),  # [N, H, D]
    "w_gate_up": (-3,),  # [(E,) D, 2, F]
    "w_down": (-2,),  # [(E,) F, D]
    "eh_proj": (-2,),  # [2D, D]
}
FORMATS = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


class QuantizedParam(nnx.Variable):
    """A weight stored as {'q', 'scale'}; `w[...]` gives the dequantized array in float32."""

    def get_value(self, *, index=nnx.variablelib.MISSING):
        raw = super().get_value()
        w = raw["q"].astype(jnp.float32) * raw["scale"]
        if isinstance(index, nnx.variablelib.Missing) or index is ...:
            return w
        return w[index]


def quantize_array(w, axes, fmt: str = "int8"):
    """w -> {'q', 'scale'} with one scale per slice over `axes` (absmax / the format's largest
    value)."""
    dtype, top = FORMATS[fmt]
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / top
    scale = jnp.where(scale == 0, 1.0, scale)
    q = w / scale
    q = jnp.clip(jnp.round(q), -top, top) if fmt == "int8" else jnp.clip(q, -top, top)
    return {"q": q.astype(dtype), "scale": scale}


def quantize(model, fmt: str = "int8"):
    """A copy of the model whose projection weights are QuantizedParams (the caller's model is
    unchanged).

    The quantization runs in one jitted program; on a mesh GSPMD places its outputs (q follows its
    weight's sharding elementwise; not yet tested on a mesh).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"quantize: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    targets = []
    from moejax.model.dsa import Indexer
    from moejax.model.v4 import V4Indexer

    for _path, module in nnx.iter_modules(view):
        if isinstance(
            module, (Indexer, V4Indexer)
        ):  # small, and its own layouts: kept in full precision
            continue
        for name, axes in CONTRACTED.items():
            var = getattr(module, name, None)
            if isinstance(var, nnx.Param) and not isinstance(var, QuantizedParam):
                targets.append((module, name, var, axes))

    @jax.jit
    def run(ws):
        return [quantize_array(w, axes, fmt) for w, (_, _, _, axes) in zip(ws, targets)]

    values = run([t[2][...] for t in targets])
    for (module, name, var, _), value in zip(targets, values):
        setattr(
            module,
            name,
            QuantizedParam(
                value, **{k: v for k, v in var.get_metadata().items() if k == "logical_axes"}
            ),
        )
    return view


def weight_bytes(model) -> int:
    """Bytes of the model's parameter state (quantized weights count their values and scales)."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
