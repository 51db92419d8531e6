"""Public causal attention op `attention`: validate shapes at trace time and pick a backend.

Backends (`impl=`):
  reference  the whole [T, T] score matrix and a materialized mask (reference.py), for tests
  blockwise  online softmax over (query block, key block) pairs in plain JAX (blockwise.py), default
             on CPU
  splash     TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), default on TPU
  pallas_gpu Triton flash attention (jax.experimental.pallas.ops.gpu.attention), default on GPU
  cudnn      cuDNN flash attention through jax.nn.dot_product_attention, GPU only, unpacked rows
             only
How each takes MLA's unequal head dims (q/k 192, v 128 at V3 shape) and GQA:
  reference, blockwise, splash: natively (splash's kernel has its own value head dim; GQA runs its
    MQA kernel once per KV head);
  pallas_gpu: the narrower of q/k and v is zero-padded and the output cut back (the kernel needs one
    head dim), KV heads repeated to the query heads;
  cudnn: v zero-padded to the query head dim; bfloat16/float16 only.
Every backend takes segment ids (tokens attend to earlier tokens of the same id) except cudnn, which
refuses them. A Pallas backend on a platform that cannot run it natively is refused unless
interpret=True (the tests run it in Pallas interpret mode); on a mesh it runs inside shard_map over
the batch and head axes (GSPMD cannot partition a Pallas call).

On a layout whose context axes split the sequence (context.py), with q, k, v and segment_ids in
that module's balanced order (balanced=True), every device runs the blockwise online softmax (impl
'auto' or 'blockwise'; 'reference' materializes each device's scores) over all-gathered keys and
values; the Pallas and cuDNN kernels are not used there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.kernels.attention import context
from moejax.kernels.attention.blockwise import blockwise_attention, pad_rows
from moejax.kernels.attention.reference import attention_reference
from moejax.kernels.gmm.ops import platform

IMPLS = ("reference", "blockwise", "splash", "pallas_gpu", "cudnn")
_GPU = ("gpu", "cuda", "rocm")
_NATIVE = {"splash": ("tpu",), "pallas_gpu": _GPU, "cudnn": _GPU}
DEFAULT_BLOCK = (
    512  # blockwise rows per block: fastest of 128-1024 at T = 512-2048 on the 2-core CPU
)
SPLASH_BLOCK = 512  # splash block_q / block_kv (MaxText's default sa_block_* is 512)
GPU_BLOCK = 64  # pallas_gpu block_q / block_k


def default_impl() -> str:
    """splash on TPU, Triton flash attention on GPU, blockwise on CPU."""
    p = platform()
    if p == "tpu":
        return "splash"
    if p in _GPU:
        return "pallas_gpu"
    return "blockwise"


def _check(q, k, v, segment_ids, impl):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention[{impl}]: q, k, v must be [B, T, heads, head_dim], got {q.shape}, "
            f"{k.shape}, {v.shape}"
        )
    B, T, N, H = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or k.shape[3] != H:
        raise ValueError(
            f"attention[{impl}]: k must be [{B}, {T}, Nkv, {H}] and v [{B}, {T}, Nkv, Hv], got "
            f"k {k.shape}, v {v.shape} (causal self-attention: keys as long as queries)"
        )
    if N % k.shape[2]:
        raise ValueError(
            f"attention[{impl}]: {N} query heads are not a multiple of {k.shape[2]} KV heads"
        )
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(
            f"attention[{impl}]: segment_ids must be [{B}, {T}], got {segment_ids.shape}"
        )


def attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    scale: float,
    impl: str | None = None,
    layout=None,
    block: int | None = None,
    interpret: bool | None = None,
    balanced: bool = False,
):
    """Causal softmax attention within packed documents.

    Args:
      q: [B, T, N, H]; k: [B, T, Nkv, H]; v: [B, T, Nkv, Hv]; N a multiple of Nkv.
      segment_ids: int [B, T] (a token attends to earlier tokens with the same id) or None (one
        document).
      scale: multiplies q.k.
      impl: one of IMPLS; None or 'auto' picks by platform (default_impl).
      layout: the model's sharding.Layout; a Pallas backend runs inside shard_map over it.
      balanced: the rows are in context.to_balanced's order for this layout (the Transformer's
        own calls, where its context axes split T): attention then runs context-parallel. Rows in
        natural order (False) are attended whole, whatever the layout.
      block: query/key block rows (blockwise, splash, pallas_gpu); None is the backend's default.
      interpret: run a Pallas backend in Pallas interpret mode (any platform; for tests).
    Returns:
      [B, T, N, Hv] in v's dtype.
    """
    auto = impl in (None, "auto")
    impl = default_impl() if auto else impl
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {('auto',) + IMPLS}, got {impl!r}")
    _check(q, k, v, segment_ids, impl)
    if balanced and context.ways(layout, q.shape[1]) > 1:
        if impl not in ("reference", "blockwise"):
            if not auto:
                raise ValueError(
                    f"attention[{impl}]: a sequence split over the context axes runs the blockwise "
                    "online softmax over gathered keys; use impl='blockwise' or 'auto' (or "
                    "mesh.context=1 for this kernel)"
                )
            impl = "blockwise"
        return context.context_attention(
            q,
            k,
            v,
            segment_ids,
            scale=scale,
            layout=layout,
            impl=impl,
            block=block or DEFAULT_BLOCK,
        )
    if impl == "reference":
        return attention_reference(q, k, v, segment_ids, scale=scale)
    if impl == "blockwise":
        b = block or DEFAULT_BLOCK
        return blockwise_attention(q, k, v, segment_ids, scale=scale, block_q=b, block_kv=b)
    native = platform() in _NATIVE[impl]
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_ids, scale, native)
    if not native and not interpret:
        alt = {"splash": "'pallas_gpu' on GPU", "pallas_gpu": "'splash' on TPU"}[impl]
        raise ValueError(
            f"attention[{impl}]: cannot run on platform {platform()!r} (q {q.shape}); use "
            f"impl='blockwise' (any platform) or {alt}, or interpret=True (tests)"
        )
    interpret = bool(interpret)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if impl == "splash":
        b = -(-(block or SPLASH_BLOCK) // 128) * 128  # Mosaic blocks are multiples of 128 rows
        fn = functools.partial(_splash, scale=scale, block=b, interpret=interpret)
    else:
        b = min(
            1 << ((block or GPU_BLOCK) - 1).bit_length(), 128
        )  # Triton blocks: a power of two, <= 128
        fn = functools.partial(_pallas_gpu, scale=scale, block=b, interpret=interpret)
    out = _sharded(fn, q, k, v, segment_ids, layout, impl, strict=not auto)
    if out is None:  # 'auto' on a mesh that does not divide these shapes (e.g. sampling 3 prompts)
        return blockwise_attention(
            q, k, v, segment_ids, scale=scale, block_q=DEFAULT_BLOCK, block_kv=DEFAULT_BLOCK
        )
    return out


def _cudnn(q, k, v, segment_ids, scale: float, native: bool):
    """cuDNN flash attention: unpacked rows, 16-bit inputs; v zero-padded to the query head dim
    (MLA)."""
    H, Hv = q.shape[-1], v.shape[-1]
    if not native:
        raise ValueError(
            f"attention[cudnn]: needs a GPU, this platform is {platform()!r} for q {q.shape}; use "
            "impl='blockwise' (any platform) or 'pallas_gpu'"
        )
    if segment_ids is not None:
        raise ValueError(
            f"attention[cudnn]: packed rows (segment_ids {segment_ids.shape}) are not supported; "
            "use impl='pallas_gpu' for packed data"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16) or H % 8 or H > 256 or Hv > H:
        raise ValueError(
            f"attention[cudnn]: takes bfloat16/float16 with head dims multiples of 8, <= 256 and "
            f"v's <= q's; got {q.dtype} q {q.shape} v {v.shape}; use impl='pallas_gpu'"
        )
    if Hv < H:
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, H - Hv)])
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
    return out[..., :Hv]


def _sharded(fn, q, k, v, segment_ids, layout, impl: str, strict: bool):
    """fn(q, k, v, segment_ids) inside shard_map over the layout's batch and head axes (the sequence
    is not split); fn alone without a layout. Where the mesh does not divide the batch or heads: an
    error when strict, else None."""
    if layout is None:
        return fn(q, k, v, segment_ids)
    # imported here: moejax.config imports IMPLS from this module, and moejax.sharding imports
    # config
    from moejax import sharding

    mesh, nested = layout.region()
    manual = mesh.manual_axes if nested else ()
    rules = layout.rule_table
    qspec = sharding.spec_for(("batch", None, "heads", None), rules, mesh, exclude=manual)
    kv_axis = "heads" if k.shape[2] == q.shape[2] else "kv_heads"
    kspec = sharding.spec_for(("batch", None, kv_axis, None), rules, mesh, exclude=manual)
    sspec = P(qspec[0], None)
    if (
        kspec[2] != qspec[2]
    ):  # KV heads split otherwise than query heads: a shard's groups would not match
        if not strict:
            return None
        raise ValueError(
            f"attention[{impl}]: query heads split by {qspec[2]} but KV heads by {kspec[2]} on "
            f"mesh {dict(mesh.shape)} (q {q.shape}, k {k.shape}); use impl='blockwise' for this "
            "layout"
        )
    ways = lambda entry: math.prod(mesh.shape[a] for a in sharding.axes_of(entry))
    if any(dim % ways(e) for x, spec in ((q, qspec), (k, kspec)) for dim, e in zip(x.shape, spec)):
        if not strict:
            return None
        raise ValueError(
            f"attention[{impl}]: the mesh {dict(mesh.shape)} does not divide q {q.shape} / k "
            f"{k.shape} by {qspec} / {kspec}; use impl='blockwise' for this shape"
        )
    auto = {a for a in mesh.axis_names if a not in manual}
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(qspec, kspec, kspec, sspec),
        out_specs=qspec,
        axis_names=auto,
        check_vma=False,
    )(q, k, v, segment_ids)


def _splash(q, k, v, segment_ids, *, scale: float, block: int, interpret: bool):
    """TPU splash attention, per batch row (vmap). Rows are padded to a block multiple with segment
    id -1."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    B, T, N, H = q.shape
    Nkv = k.shape[2]
    b = min(block, -(-T // 128) * 128)
    Tp = -(-T // b) * b
    q = pad_rows((q.astype(jnp.float32) * scale).astype(q.dtype), Tp)
    k, v = pad_rows(k, Tp), pad_rows(v, Tp)
    seg = pad_rows(segment_ids.astype(jnp.int32), Tp, value=-1)
    sizes = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    Q = N // Nkv
    if Nkv == N:
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([sm.CausalMask((Tp, Tp))] * N),
            head_shards=1,
            q_seq_shards=1,
            block_sizes=sizes,
            interpret=interpret,
        )
        run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))
        out = jax.vmap(run)(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), seg
        )
        return out.transpose(0, 2, 1, 3)[:, :T].astype(v.dtype)  # [B, T, N, Hv]
    # GQA: the MQA kernel once per KV head on its Q query heads
    kernel = sk.make_splash_mqa(
        sm.MultiHeadMask([sm.CausalMask((Tp, Tp))] * Q),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        interpret=interpret,
    )
    run = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))
    qg = q.reshape(B, Tp, Nkv, Q, H).transpose(0, 2, 3, 1, 4)  # [B, Nkv, Q, Tp, H]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Nkv, Tp, H]
    out = jax.vmap(jax.vmap(run, in_axes=(0, 0, 0, None)))(qg, kg, vg, seg)  # [B, Nkv, Q, Tp, Hv]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, -1)[:, :T].astype(v.dtype)


def _pallas_gpu(q, k, v, segment_ids, *, scale: float, block: int, interpret: bool):
    """Triton flash attention. The kernel needs one head dim for q, k and v and as many KV heads as
    query heads: the narrower of q/k and v is zero-padded (the output's padded columns are cut off),
    KV heads repeated. Backward blocks are half the forward's (at most 32, as upstream's defaults)
    for MLA's dims."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    T, N, H = q.shape[1:]
    Nkv, Hv = k.shape[2], v.shape[-1]
    if Nkv != N:
        k, v = jnp.repeat(k, N // Nkv, axis=2), jnp.repeat(v, N // Nkv, axis=2)  # [B, T, N, .]
    Hp = max(
        H, Hv
    )  # one head dim for all three: zero columns change neither q.k nor the output's first Hv
    q, k, v = (jnp.pad(a, [(0, 0)] * 3 + [(0, Hp - a.shape[-1])]) for a in (q, k, v))
    b = min(block, max(16, 1 << (T - 1).bit_length()))
    Tp = -(-T // b) * b
    q, k, v = pad_rows(q, Tp), pad_rows(k, Tp), pad_rows(v, Tp)
    seg = pad_rows(segment_ids.astype(jnp.int32), Tp, value=-1)
    bb = min(b, 32)
    sizes = triton_attention.BlockSizes(
        block_q=b, block_k=b, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb
    )
    out = triton_attention.mha(
        q, k, v, seg, sm_scale=float(scale), causal=True, block_sizes=sizes, interpret=interpret
    )
    return out[:, :T, :, :Hv].astype(v.dtype)
