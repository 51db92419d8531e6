"""Context parallelism: causal attention over a sequence split across devices.

Layout. With C devices on the sequence's mesh axes (the rule for the logical 'sequence' axis,
'context' by default), the sequence is cut into 2C chunks of t = T / 2C tokens and device c holds
chunks c and 2C-1-c, the *balanced order* (Megatron-LM's and MaxText's causal load balancing).
Under a causal mask chunk j costs j + 1 chunk pairs, so every device does (c + 1) + (2C - c) =
2C + 1 of them, where contiguous chunks would leave the last device 2C - 1 times the first one's
work. The model puts its token-level inputs into this order once (`to_balanced`) and its final
hidden states back (`from_balanced`), two ppermutes each way; every layer in between is per token
except attention, which sees positions, segment ids and keys in this order.

Attention. Each device all-gathers the keys, values and segment ids over the sequence axes (the
all-gather form of context parallelism Llama 3 trained with; its backward pass is the
reduce-scatter autodiff derives), puts them in natural order, and runs the blockwise online
softmax for its two query chunks over exactly the key blocks at or before them. The (query block,
key block) pair lists differ per device, are built here on the host and picked with axis_index;
all devices' lists have one length (2C + 1 chunk pairs' worth), which is what makes them a
balanced static scan. Gathered keys and values are O(T) per device and layer (heads split over
'tensor' divide them); a ring exchange would bound them to O(T / C) at the price of C dependent
steps.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.kernels.attention import blockwise
from moejax.kernels.attention.reference import attend


def _axes(layout):
    """(sequence mesh axes, ways) of a layout outside any shard_map region; ((), 1) without."""
    if layout is None:
        return (), 1
    from moejax import sharding  # moejax.config imports this package; sharding imports config

    mesh, nested = layout.region()
    axes = sharding.sequence_axes(
        layout.mesh, layout.rule_table, exclude=mesh.manual_axes if nested else ()
    )
    return axes, math.prod(layout.mesh.shape[a] for a in axes)


def ways(layout, seq_len: int) -> int:
    """How many devices split a sequence of seq_len tokens: the context ways when 2 x them divide
    it, else 1 (a length they do not divide, e.g. a prompt, runs whole on each device)."""
    axes, n = _axes(layout)
    if n > 1 and layout.region()[1]:
        raise ValueError(
            "context parallelism: the sequence axes are split inside a shard_map region (a "
            "pipeline stage); use mesh.stage=1 with mesh.context > 1"
        )
    return n if n > 1 and seq_len % (2 * n) == 0 else 1


def balanced_order(T: int, C: int) -> np.ndarray:
    """int [T]: the natural position of each row in the balanced order (device c: chunks c and
    2C-1-c)."""
    t = T // (2 * C)
    chunks = [j for c in range(C) for j in (c, 2 * C - 1 - c)]
    return np.concatenate([np.arange(j * t, (j + 1) * t) for j in chunks])


def _home(j: int, C: int) -> tuple[int, int]:
    """(device, slot) of natural chunk j in the balanced order."""
    return (j, 0) if j < C else (2 * C - 1 - j, 1)


def _reorder(x, layout, axis: int, inverse: bool):
    axes, C = _axes(layout)
    name = axes[0] if len(axes) == 1 else axes
    spec = [None] * x.ndim
    spec[axis] = name

    def body(xl):
        a, b = jnp.split(xl, 2, axis=axis)  # this device's two chunks
        even = jax.lax.axis_index(name) % 2 == 0
        if not inverse:
            # natural: device c holds chunks 2c, 2c+1; each goes to its home, and a device receives
            # one even and one odd chunk: chunk e (slot 0) is the even one on an even device
            ra = jax.lax.ppermute(a, name, [(c, _home(2 * c, C)[0]) for c in range(C)])
            rb = jax.lax.ppermute(b, name, [(c, _home(2 * c + 1, C)[0]) for c in range(C)])
            first, second = jnp.where(even, ra, rb), jnp.where(even, rb, ra)
        else:
            # balanced: device e holds chunks e, 2C-1-e (one even, one odd); chunk j goes home to
            # device j // 2, slot j % 2: the even ones by one ppermute, the odd ones by another
            ev, od = jnp.where(even, a, b), jnp.where(even, b, a)
            even_of = [e if e % 2 == 0 else 2 * C - 1 - e for e in range(C)]
            odd_of = [2 * C - 1 - e if e % 2 == 0 else e for e in range(C)]
            first = jax.lax.ppermute(ev, name, [(e, even_of[e] // 2) for e in range(C)])
            second = jax.lax.ppermute(od, name, [(e, odd_of[e] // 2) for e in range(C)])
        return jnp.concatenate([first, second], axis=axis)

    return jax.shard_map(
        body,
        mesh=layout.mesh,
        in_specs=P(*spec),
        out_specs=P(*spec),
        axis_names=set(axes),
        check_vma=False,
    )(x)


def to_balanced(x, layout, axis: int = 1):
    """x with its sequence axis (split over the context axes) from natural into balanced order;
    x itself where the layout does not split this length."""
    if ways(layout, x.shape[axis]) == 1:
        return x
    return _reorder(x, layout, axis, inverse=False)


def from_balanced(x, layout, axis: int = 1):
    """The inverse of `to_balanced`."""
    if ways(layout, x.shape[axis]) == 1:
        return x
    return _reorder(x, layout, axis, inverse=True)


def _block(t: int, block: int) -> int:
    """The largest block of at most `block` rows that divides a chunk of t rows."""
    return next(b for b in range(min(t, block), 0, -1) if t % b == 0)


@functools.lru_cache(maxsize=64)
def pair_tables(T: int, C: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Per device, the (query block, key block, first) pairs of its two chunks (query-major and
    key-major), int32 [C, P, 3]: key block j meets query block i when j starts at or before i's
    last natural position. Every device has the same P (the balance)."""
    t = T // (2 * C)
    fwd, bwd = [], []
    for c in range(C):
        starts = [j * t + i * b for j in (c, 2 * C - 1 - c) for i in range(t // b)]
        fwd.append(blockwise.pairs_from_starts(starts, b, b, kv_major=False))
        bwd.append(blockwise.pairs_from_starts(starts, b, b, kv_major=True))
    assert len({len(p) for p in fwd}) == 1, "unbalanced pair lists"
    return np.stack(fwd), np.stack(bwd)


def context_attention(q, k, v, segment_ids, *, scale: float, layout, impl: str, block: int):
    """Causal attention within packed documents on a sequence split over the context axes, rows in
    the balanced order (`to_balanced`). Shapes as `moejax.kernels.attention.attention`'s (global
    arrays); impl 'blockwise' (online softmax, the default) or 'reference' (each device's
    [2t, T] scores and mask materialized: the test oracle's form)."""
    from moejax import sharding

    B, T, N, H = q.shape
    Nkv = k.shape[2]
    axes, C = _axes(layout)
    mesh, rules = layout.mesh, layout.rule_table
    name = axes[0] if len(axes) == 1 else axes
    qspec = sharding.spec_for(("batch", "sequence", "heads", None), rules, mesh)
    kv_axis = "heads" if Nkv == N else "kv_heads"
    kspec = sharding.spec_for(("batch", "sequence", kv_axis, None), rules, mesh)
    n_of = lambda e: math.prod(mesh.shape[a] for a in sharding.axes_of(e))
    if Nkv != N and (kspec[2] != qspec[2] or Nkv % n_of(kspec[2])):
        # KV heads the head axes cannot split like the query heads: one per query head
        k, v = jnp.repeat(k, N // Nkv, axis=2), jnp.repeat(v, N // Nkv, axis=2)
        Nkv, kspec = N, qspec
    if B % n_of(qspec[0]):  # a batch the batch axes do not divide runs whole on each device
        qspec, kspec = P(None, *qspec[1:]), P(None, *kspec[1:])
    if N % n_of(qspec[2]):
        qspec, kspec = P(*qspec[:2], None, None), P(*kspec[:2], None, None)
    sspec = P(*qspec[:2])
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    t = T // (2 * C)
    b = _block(t, block)
    fwd_table, bwd_table = pair_tables(T, C, b)
    # the natural chunk j sits at gathered chunk 2 * device + slot
    gathered_at = np.asarray([2 * d + s for d, s in (_home(j, C) for j in range(2 * C))])

    def natural(x):  # [b, T, ...] gathered in balanced order -> natural order
        x = x.reshape(x.shape[0], 2 * C, t, *x.shape[2:])
        return jnp.take(x, gathered_at, axis=1).reshape(x.shape[0], T, *x.shape[3:])

    def body(q, k, v, seg):
        c = jax.lax.axis_index(name)
        gather = functools.partial(jax.lax.all_gather, axis_name=name, axis=1, tiled=True)
        kn, vn, sk = natural(gather(k)), natural(gather(v)), natural(gather(seg.astype(jnp.int32)))
        ar = jnp.arange(t, dtype=jnp.int32)
        qpos = jnp.concatenate([c * t + ar, (2 * C - 1 - c) * t + ar])  # [2t] natural positions
        kpos = jnp.arange(T, dtype=jnp.int32)
        sq = seg.astype(jnp.int32)
        Bl, Tl, n = q.shape[:3]
        nkv = kn.shape[2]
        if impl == "reference":
            mask = (qpos[:, None] >= kpos[None, :])[None] & (sq[:, :, None] == sk[:, None, :])
            return attend(q, kn, vn, mask[:, None], scale)
        rows = blockwise.Rows(
            sq,
            sk,
            qpos,
            kpos,
            jnp.asarray(fwd_table)[c],
            jnp.asarray(bwd_table)[c],
        )
        qg = q if n == nkv else q.reshape(Bl, Tl, nkv, n // nkv, H)
        out = blockwise.flash(qg, kn, vn, rows, float(scale), b, b)
        return out.reshape(Bl, Tl, n, vn.shape[-1])

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(qspec, kspec, kspec, sspec),
        out_specs=qspec,
        axis_names=set(mesh.axis_names),
        check_vma=False,
    )(q, k, v, segment_ids)
