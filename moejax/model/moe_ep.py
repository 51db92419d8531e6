"""Expert parallelism: the routed experts inside shard_map, tokens exchanged with all-to-all.

Each device holds the tokens of its batch shard and E / n_ep experts (n_ep = size of the 'expert'
mesh axis). Per device:

  1. sort its (token, k) assignments by expert (moejax.kernels.permute); the rows bound for expert
     shard j are then contiguous;
  2. copy up to C rows per destination shard into a send buffer [n_ep, C, D] and all-to-all it over
     'expert', with the per-expert row counts [n_ep, E_local];
  3. order the received rows by local expert and run the two grouped matmuls (moejax.kernels.gmm,
     whichever backend the platform uses: the Mosaic TPU kernel compiles here because it sits inside
     shard_map);
  4. send the results back with the inverse all-to-all and combine them per token with the routing
     weights.

Exchange modes:
  'capacity'  at most C = ceil(capacity_factor * rows / n_ep) rows go to each shard, in fixed [n_ep, C]
              buffers (all_to_all); the rest are dropped (latest in expert order first) and counted
  'dropless'  the same with C = every local row: nothing is ever dropped, at n_ep x buffer memory
  'ragged'    exact-size transfers with jax.lax.ragged_all_to_all (TPU, GPU): each shard receives into
              one buffer of capacity_factor x rows (set capacity_factor >= n_ep for a guarantee); rows
              that do not fit are dropped and counted. XLA:CPU has no ragged all-to-all, so on CPU an
              all_gather-based emulation with the same semantics runs instead (for tests, not speed).

Tensor parallelism splits each expert's hidden size over 'tensor' (partial outputs are psum'd), FSDP's
sharded embed dimension is gathered by shard_map's input resharding (and its gradient reduce-scattered),
and the router statistics stay global because routing runs outside, on the whole batch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels, sharding
from moejax.model.layers import swiglu


def batch_axes(mesh, rules) -> tuple[str, ...]:
    return sharding.axes_of(sharding.spec_for(("batch",), rules, mesh)[0])


def can_shard(mesh, rules, batch: int, num_experts: int) -> bool:
    """Whether this mesh and batch can run the expert-parallel path."""
    n_batch = math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
    n_ep = mesh.shape.get("expert", 1)
    return mesh.size > 1 and batch % n_batch == 0 and num_experts % n_ep == 0


def experts_ep(x, expert_ids, weights, w_gate_up, w_down, compute_dtype, *, mesh, rules, exchange: str,
               capacity_factor: float, gmm_impl=None):
    """x [B, T, D], expert_ids / weights [B, T, k], weights [E, D, 2, F] / [E, F, D] ->
    (y [B, T, D] float32, fraction of assignments dropped)."""
    bspec = sharding.spec_for(("batch", None, None), rules, mesh)
    wgu_spec = sharding.spec_for(("expert", None, None, "expert_mlp"), rules, mesh)
    wd_spec = sharding.spec_for(("expert", "expert_mlp", None), rules, mesh)
    ep_axis = "expert" if mesh.shape.get("expert", 1) > 1 else None
    tp_axis = sharding.axes_of(wgu_spec[3])
    all_axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    E = w_gate_up.shape[0]

    def body(x, ids, w, wgu, wd):
        Bl, T, D = x.shape
        k = ids.shape[-1]
        x, ids, w = x.reshape(Bl * T, D), ids.reshape(Bl * T, k), w.reshape(Bl * T, k)
        y, dropped = _local(x.astype(compute_dtype), ids, w, wgu.astype(compute_dtype), wd.astype(compute_dtype),
                            E, ep_axis, tp_axis, exchange, capacity_factor, gmm_impl)
        dropped = jax.lax.psum(dropped, all_axes) if all_axes else dropped
        return y.reshape(Bl, T, D), dropped

    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(bspec, bspec, bspec, wgu_spec, wd_spec),
                               out_specs=(bspec, P()), check_vma=False)(x, expert_ids, weights, w_gate_up, w_down)
    total = expert_ids.size
    return y, dropped / total


def _local(x, ids, w, wgu, wd, E, ep_axis, tp_axis, exchange, capacity_factor, gmm_impl):
    M, k = ids.shape
    A = M * k
    El, D = wgu.shape[:2]
    n = E // El
    xs, order, sizes = kernels.permute(x, ids, E)  # [A, D] by expert; sizes [E]
    starts = jnp.cumsum(sizes) - sizes
    if exchange == "ragged":
        return _local_ragged(xs, order, sizes, w, wgu, wd, ep_axis, tp_axis, capacity_factor, gmm_impl)
    if exchange == "capacity":
        C = max(1, min(A, math.ceil(capacity_factor * A / n)))
    else:
        C = A
    # -- send: up to C rows to each expert shard, in expert order
    per_dst = sizes.reshape(n, El)
    dst_count = per_dst.sum(1)  # [n]
    dst_start = starts.reshape(n, El)[:, 0]  # [n]
    slot = jnp.arange(C)
    src_row = jnp.clip(dst_start[:, None] + slot[None], 0, A - 1)  # [n, C]
    sent = slot[None] < jnp.minimum(dst_count, C)[:, None]  # [n, C]
    send = jnp.where(sent[..., None], jnp.take(xs, src_row, axis=0), 0)  # [n, C, D]
    cum = jnp.minimum(jnp.cumsum(per_dst, axis=1), C)
    sent_sizes = cum - jnp.concatenate([jnp.zeros((n, 1), cum.dtype), cum[:, :-1]], axis=1)  # [n, El]
    if ep_axis:
        recv = jax.lax.all_to_all(send, ep_axis, 0, 0, tiled=True)  # [n (source), C, D]
        recv_sizes = jax.lax.all_to_all(sent_sizes, ep_axis, 0, 0, tiled=True)  # [n (source), El]
    else:
        recv, recv_sizes = send, sent_sizes
    # -- compute: order received rows by local expert (padding last), two grouped matmuls
    ends = jnp.cumsum(recv_sizes, axis=1)  # [n, El]
    expert_of = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)  # [n, C]; El = padding
    perm = jnp.argsort(expert_of.reshape(n * C), stable=True)
    rows = jnp.take(recv.reshape(n * C, D), perm, axis=0)
    group_sizes = recv_sizes.sum(0).astype(jnp.int32)  # [El]
    y = _experts(rows, group_sizes, wgu, wd, tp_axis, gmm_impl)  # [n*C, D] float32
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(n * C, dtype=perm.dtype))
    back = jnp.take(y, inv, axis=0).reshape(n, C, D)
    if ep_axis:
        back = jax.lax.all_to_all(back, ep_axis, 0, 0, tiled=True)  # [n (destination), C, D]
    # -- combine: each sorted assignment reads its result, or zero if it was dropped
    a = jnp.arange(A)
    dst = jnp.searchsorted(jnp.cumsum(dst_count), a, side="right")  # [A]
    dst = jnp.minimum(dst, n - 1)
    c = a - dst_start[dst]
    kept = c < C
    ys = jnp.where(kept[:, None], back.reshape(n * C, D)[dst * C + jnp.minimum(c, C - 1)], 0.0)
    out = kernels.unpermute(ys, order, w)
    return out, jnp.sum(~kept).astype(jnp.float32)


def _experts(rows, group_sizes, wgu, wd, tp_axis, gmm_impl):
    """The local experts on rows grouped by expert (rows past the groups give zeros)."""
    El, D, _, Fl = wgu.shape
    h = kernels.gmm(rows, wgu.reshape(El, D, 2 * Fl), group_sizes, preferred_element_type=jnp.float32,
                    impl=gmm_impl)
    h = swiglu(h.reshape(-1, 2, Fl)).astype(rows.dtype)
    y = kernels.gmm(h, wd, group_sizes, preferred_element_type=jnp.float32, impl=gmm_impl)
    return jax.lax.psum(y, tp_axis) if tp_axis else y


def _local_ragged(xs, order, sizes, w, wgu, wd, ep_axis, tp_axis, capacity_factor, gmm_impl):
    """Exact-size exchange: rows bound for shard j travel as one ragged slice, results come back the same way."""
    A, D = xs.shape
    El = wgu.shape[0]
    n = sizes.shape[0] // El
    R = max(1, math.ceil(max(capacity_factor, 1.0) * A))  # receive buffer rows
    per_dst = sizes.reshape(n, El).astype(jnp.int32)  # rows I send to each shard, per its local expert
    send_count = per_dst.sum(1)
    send_start = (jnp.cumsum(send_count) - send_count).astype(jnp.int32)
    a2a = functools.partial(_all_to_all, axis=ep_axis)
    recv_per_e = a2a(per_dst)  # [n (source), El]
    recv_count = recv_per_e.sum(1)
    recv_start = jnp.cumsum(recv_count) - recv_count
    recv_keep = jnp.clip(R - recv_start, 0, recv_count).astype(jnp.int32)  # what fits in my buffer
    recv_start = jnp.minimum(recv_start, R).astype(jnp.int32)
    send_keep = a2a(recv_keep)  # how many of my rows each shard accepts
    land_at = a2a(recv_start)  # where my rows land in each shard's buffer
    rows = _ragged_all_to_all(xs, jnp.zeros((R, D), xs.dtype), send_start, send_keep, land_at, recv_keep, ep_axis)
    # order the received rows by local expert; rows past what arrived sort last (outside every group)
    r = jnp.arange(R)
    src = jnp.minimum(jnp.searchsorted(jnp.cumsum(recv_keep), r, side="right"), n - 1)
    c = r - recv_start[src]
    arrived = c < recv_keep[src]
    ends = jnp.minimum(jnp.cumsum(recv_per_e, axis=1), recv_keep[:, None])  # [n, El] clipped per source
    expert = jnp.where(arrived, jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"))(ends[src], c), El)
    perm = jnp.argsort(expert, stable=True)
    group_sizes = jnp.bincount(expert, length=El + 1)[:El].astype(jnp.int32)
    y = _experts(jnp.take(rows, perm, axis=0), group_sizes, wgu, wd, tp_axis, gmm_impl)  # [R, D] float32
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(R, dtype=perm.dtype))
    y = jnp.take(y, inv, axis=0)  # back to arrival order
    # the results return to where each row came from: sender's offset send_start, as many as were kept
    back_at = a2a(send_start)
    ys = _ragged_all_to_all(y, jnp.zeros((A, D), y.dtype), recv_start, recv_keep, back_at, send_keep, ep_axis)
    out = kernels.unpermute(ys, order, w)
    return out, (A - send_keep.sum()).astype(jnp.float32)


def _all_to_all(x, axis):
    """Row j of x goes to shard j; row s of the result came from shard s."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True) if axis else x


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis):
    if axis is None:  # one shard: a local copy of the slice
        n_rows = send_sizes[0]
        idx = jnp.arange(output.shape[0])
        src = jnp.clip(input_offsets[0] + idx - output_offsets[0], 0, operand.shape[0] - 1)
        keep = (idx >= output_offsets[0]) & (idx < output_offsets[0] + n_rows)
        return jnp.where(keep[:, None], jnp.take(operand, src, axis=0), output)
    if jax.default_backend() == "cpu" and not kernels.targets_accelerator():
        return _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, axis)
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis)


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, axis):
    """ragged_all_to_all's semantics from an all_gather (XLA:CPU lacks the op): every shard sees every
    shard's operand and slice tables and copies the slices addressed to it."""
    me = jax.lax.axis_index(axis)
    ops = jax.lax.all_gather(operand, axis)  # [n, N, D]
    ins = jax.lax.all_gather(input_offsets, axis)  # [n, n]: row s = sender s's table
    sends = jax.lax.all_gather(send_sizes, axis)
    outs = jax.lax.all_gather(output_offsets, axis)
    start, size, at = ins[:, me], sends[:, me], outs[:, me]  # [n] per sender, for me
    idx = jnp.arange(output.shape[0])
    inside = (idx[None] >= at[:, None]) & (idx[None] < (at + size)[:, None])  # [n, R]
    sender = jnp.argmax(inside, axis=0)
    got = inside.any(axis=0)
    row = jnp.clip(start[sender] + idx - at[sender], 0, operand.shape[0] - 1)
    return jnp.where(got[:, None], ops[sender, row], output)
