"""Expert parallelism: the routed experts inside shard_map, tokens exchanged with all-to-all.

The routed experts are split over the *expert axes*: the mesh axes the rule for the logical 'expert'
axis gives (default 'expert'; 'fsdp', 'expert+fsdp', ... work too, see `sharding.expert_axes`). Each
device holds the tokens of its batch shard and E / n experts (n = product of the expert axes). Per
device:

  1. choose which (token, k) assignments are kept (all of them, or the capacity policy below);
  2. sort the kept assignments by expert (moejax.kernels.permute); the rows bound for expert shard j
     are then contiguous;
  3. send them to their shards over the expert axes (fixed-size all_to_all or ragged_all_to_all),
     with the per-expert row counts [n, E_local];
  4. order the received rows by local expert and run the two grouped matmuls (moejax.kernels.gmm,
     whichever backend the platform uses: the Mosaic TPU kernel compiles here because it sits inside
     shard_map);
  5. send the results back the same way and combine them per token with the routing weights.

Exchange modes:
  'dropless'  every assignment travels, nothing is ever dropped. Each round sends at most `rows`
              of a device's rows to each expert shard in fixed [n, rows] buffers, rows =
              ceil(dropless_buffer x A / n) (A = local assignments, A / n the even share); a pair
              of shards with more rows than that takes further rounds, as many as the fullest pair
              needs (the same count on every device of the layer, so every round is a collective
              all of them run). The rounds run under a scan whose body recomputes in the
              backward pass, so the exchange's memory is that of one round: [n, rows] instead
              of the worst case [n, A] (dropless_buffer 0, or a share above A / 4: one round of
              [n, A], the old fixed exchange)
  'capacity'  the capacity policy of `moe.experts_capacity`, exactly: each expert keeps at most
              C = ceil(capacity_factor * A_scope / E) assignments of its scope, the highest routing
              weights first (ties: the earlier assignment), padding never dispatched nor counted.
              The scope (execution.capacity_scope) is the whole batch ('global': the single-device
              answer on every layout) or one expert-parallel group ('group'). The per-expert
              thresholds come from a radix select whose histograms are summed over the scope's axes
              (8 rounds of an [E, 16] psum). Transport in fixed buffers of min(A, E_local * C) rows
              per destination, which always hold every kept row (a second, layout-dependent drop
              never happens) but, as a fixed buffer must, size for the worst case: with
              capacity_factor >= 1 that is the dropless buffer
  'ragged'    the same policy, exact-size transfers with jax.lax.ragged_all_to_all (TPU, GPU) into
              one receive buffer of E_local * C rows, the tightest bound the policy allows: with the
              'group' scope about capacity_factor x the local rows, the memory-bounded choice for a
              pod. capacity_factor >= E / K drops nothing. XLA:CPU has no ragged all-to-all, so on
              CPU an all_gather emulation with the same semantics runs instead (for tests, not
              speed).

Tensor parallelism splits each expert's hidden size over 'tensor' (partial outputs are psum'd),
FSDP's sharded embed dimension is gathered by shard_map's input resharding (and its gradient
reduce-scattered), and the router statistics stay global because routing runs outside, on the whole
batch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels, sharding
from moejax.kernels.fp8 import fp8_gmm
from moejax.model.layers import swiglu


def can_shard(mesh, rules, batch: int, num_experts: int, seq_len: int = 0) -> bool:
    """Whether this batch can run the expert-parallel path on this mesh (rows divide the batch
    axes, and positions the sequence axes)."""
    n_batch = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
    n_seq = math.prod(mesh.shape[a] for a in sharding.sequence_axes(mesh, rules))
    n_ep = math.prod(mesh.shape[a] for a in sharding.expert_axes(mesh, rules))
    return batch % n_batch == 0 and seq_len % n_seq == 0 and num_experts % n_ep == 0


def capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert may take: ceil(capacity_factor * assignments / experts)."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def experts_ep(
    x,
    expert_ids,
    weights,
    token_mask,
    w_gate_up,
    w_down,
    compute_dtype,
    *,
    mesh,
    rules,
    exchange: str,
    capacity_factor: float,
    capacity_scope: str = "global",
    gmm_impl=None,
    lora: ExpertLoRA | None = None,
    fp8: bool = False,
    limit: float = 0.0,
    dropless_buffer: float = 0.0,
):
    """Routed experts with the experts split over the expert axes (limit: swiglu's clamp).

    capacity_scope: the tokens an expert's capacity is shared by, 'global' (the whole batch) or
    'group' (the devices of one expert-parallel exchange). dropless_buffer: the dropless
    exchange's rows per shard pair and round, as a multiple of the even share (0: one round).

    Args:
      x: [B, T, D]; expert_ids, weights: [B, T, K]; token_mask: [B, T] (0 = padding);
      w_gate_up: [E, D, 2, F]; w_down: [E, F, D].
    Returns:
      y [B, T, D] float32 and the number of real assignments dropped (global, float32).
    """
    rules = dict(rules)
    manual = tuple(getattr(mesh, "manual_axes", ()))  # inside a pipeline stage: 'stage' is taken
    bspec = sharding.spec_for(("batch", "sequence", None), rules, mesh, exclude=manual)
    mspec = sharding.spec_for(("batch", "sequence"), rules, mesh, exclude=manual)
    wgu_spec = sharding.spec_for(("expert", None, None, "expert_mlp"), rules, mesh, exclude=manual)
    wd_spec = sharding.spec_for(("expert", "expert_mlp", None), rules, mesh, exclude=manual)
    ep_axes = sharding.expert_axes(mesh, rules)
    tp_axes = sharding.axes_of(wgu_spec[3])
    # the axes still automatic here that split the tokens: batch, then sequence (context)
    b_axes = sharding.axes_of(bspec[0]) + sharding.axes_of(bspec[1])
    E = w_gate_up.shape[0]
    B, T, K = expert_ids.shape
    # the scope's axes in the batch's nesting order, so that ties go to the earlier row as on one
    # device (under context parallelism the positions are in the balanced order: an exact tie of
    # weights at an expert's threshold may then keep another of the tied assignments)
    scope = b_axes if capacity_scope == "global" else tuple(a for a in b_axes if a in ep_axes)
    scope_sizes = tuple(mesh.shape[a] for a in scope)
    n_batch = math.prod(mesh.shape[a] for a in b_axes)
    C = capacity(B * T * K * math.prod(scope_sizes) // n_batch, E, capacity_factor)

    # the adapters split like their experts: A's input axis and B's output axis like the weight's
    lora_arrays, lora_specs = (), ()
    if lora is not None:
        lora_arrays = (lora.a_gu, lora.b_gu, lora.a_d, lora.b_d) + (
            () if lora.rng is None else (lora.rng,)
        )
        lora_specs = (
            sharding.spec_for(("expert", None, None), rules, mesh, exclude=manual),
            wgu_spec,
            sharding.spec_for(("expert", "expert_mlp", None), rules, mesh, exclude=manual),
            sharding.spec_for(("expert", None, None), rules, mesh, exclude=manual),
        )
        lora_specs += () if lora.rng is None else (P(),)

    def body(x, ids, w, mask, wgu, wd, *adapter):
        Bl, T, D = x.shape
        x, ids, w = x.reshape(Bl * T, D), ids.reshape(Bl * T, K), w.reshape(Bl * T, K)
        valid = jnp.repeat(mask.reshape(Bl * T) > 0, K)  # [A]
        local_lora = None
        if lora is not None:
            rng = None
            if lora.rng is not None:  # a different dropout mask on every device
                rng = adapter[4]
                for a in tuple(ep_axes) + tuple(b_axes):
                    rng = jax.random.fold_in(rng, jax.lax.axis_index(a))
            local_lora = lora._replace(
                a_gu=adapter[0], b_gu=adapter[1], a_d=adapter[2], b_d=adapter[3], rng=rng
            )
        y, dropped = _local(
            x.astype(compute_dtype),
            ids,
            w,
            valid,
            # cast once, outside the dropless rounds: their scan sums the weights' gradient over
            # the rounds in the compute dtype, as one round's gradient (of the cast weights)
            # already is; float32 weights in the loop cost DeepSeek-V3 3.9 GiB more per chip
            wgu.astype(compute_dtype),
            wd.astype(compute_dtype),
            E=E,
            C=C,
            ep_axes=ep_axes,
            tp_axes=tp_axes,
            b_axes=b_axes,
            scope=scope,
            scope_sizes=scope_sizes,
            exchange=exchange,
            gmm_impl=gmm_impl,
            lora=local_lora,
            fp8=fp8,
            limit=limit,
            dropless_buffer=dropless_buffer,
        )
        return y.reshape(Bl, T, D), dropped

    auto = {a for a in mesh.axis_names if a not in manual}
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(bspec, bspec, bspec, mspec, wgu_spec, wd_spec) + lora_specs,
        out_specs=(bspec, P()),
        axis_names=auto,
        check_vma=False,
    )(x, expert_ids, weights, token_mask, w_gate_up, w_down, *lora_arrays)


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _local(
    x,
    ids,
    w,
    valid,
    wgu,
    wd,
    *,
    E,
    C,
    ep_axes,
    tp_axes,
    b_axes,
    scope,
    scope_sizes,
    exchange,
    gmm_impl,
    lora=None,
    fp8=False,
    limit=0.0,
    dropless_buffer=0.0,
):
    """One device: x [M, D], ids / w [M, K], valid [M*K] -> (y [M, D] float32, global dropped
    count)."""
    M, K = ids.shape
    A = M * K
    El = wgu.shape[0]
    n = E // El
    if exchange == "dropless":
        keep = jnp.ones((A,), bool)
    else:
        keep = capacity_keep(ids.reshape(A), w.reshape(A), valid, E, C, scope, scope_sizes)
    ids_kept = jnp.where(
        keep.reshape(M, K), ids, E
    )  # dropped assignments sort last, outside every group
    xs, order, sizes = kernels.permute(x, ids_kept, E)  # [A, D] kept rows by expert; sizes [E]
    per_dst = sizes.reshape(n, El)  # rows I send to each expert shard, per its local expert

    def experts(rows, group_sizes, salt=None):
        lo = lora
        if salt is not None and lo is not None and lo.rng is not None:  # a new mask each round
            lo = lo._replace(rng=jax.random.fold_in(lo.rng, salt))
        return expert_ffn(
            rows,
            group_sizes,
            wgu=wgu,
            wd=wd,
            tp_axes=tp_axes,
            gmm_impl=gmm_impl,
            lora=lo,
            fp8=fp8,
            limit=limit,
            out_dtype=x.dtype,  # the results travel back in the compute dtype
        )

    round_rows = dropless_rows(A, n, dropless_buffer)
    if exchange == "ragged":
        ys = _exchange_ragged(xs, per_dst, experts, ep_axes, recv_rows=min(n * A, El * C))
    elif exchange == "dropless" and round_rows < A:
        # every device of the layer agrees on the number of rounds (all its token axes)
        ys = _exchange_rounds(xs, per_dst, experts, ep_axes, round_rows, agree=b_axes)
    else:  # one round whose buffers hold every kept row for one destination
        rows = A if exchange == "dropless" else min(A, El * C)
        ys = _exchange_fixed(xs, per_dst, experts, ep_axes, rows)
    out = kernels.unpermute(ys, order, jnp.where(keep.reshape(M, K), w, 0.0))
    dropped = _psum(jnp.sum(valid & ~keep).astype(jnp.float32), b_axes)
    return out, dropped


def _orderable_bits(w):
    """float32 -> uint32 keys with the same order (negative floats flipped whole, others by the sign
    bit)."""
    b = jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def capacity_keep(expert_ids, weights, valid, num_experts: int, cap: int, axes=(), axis_sizes=()):
    """The capacity policy over the global batch: per expert, keep the `cap` valid assignments with
    the highest weights (ties: lower global assignment index first); padding is never kept.

    Args:
      expert_ids, weights, valid: [A] this shard's assignments, in global order within the shard.
      axes: the mesh axes the batch is split over (inside shard_map; () on one device), nesting
        order; axis_sizes their sizes. Shard s holds global assignments [s * A, (s + 1) * A).
    Returns:
      keep bool [A]; identical to `moe.experts_capacity`'s choice on the gathered batch.
    """
    E = num_experts
    A = expert_ids.shape[0]
    key = _orderable_bits(weights)  # [A] uint32
    eid = jnp.where(valid, expert_ids, E)  # padding -> a spare bucket
    total = _psum(jnp.bincount(eid, length=E + 1)[:E], axes)  # [E] valid assignments per expert
    # Radix select, 4 bits a round from the top: the exact key of each expert's cap-th largest
    # weight.
    prefix = jnp.zeros((E,), jnp.uint32)
    need = jnp.full((E,), cap, jnp.int32)  # rows still to take at or below the prefix so far
    for shift in range(28, -1, -4):
        same_high = (
            True
            if shift == 28
            else (key >> (shift + 4)) == (prefix[jnp.minimum(eid, E - 1)] >> (shift + 4))
        )
        bucket = jnp.where(same_high, eid, E)
        digit = ((key >> shift) & 15).astype(jnp.int32)
        hist = jnp.zeros((E + 1, 16), jnp.int32).at[bucket, digit].add(1)[:E]  # [E, 16]
        hist = _psum(hist, axes)
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [E, 16]: candidates with digit >= d
        ok = at_least >= need[:, None]
        d = jnp.where(
            ok.any(1), 15 - jnp.argmax(ok[:, ::-1], axis=1), 0
        )  # largest digit still reaching need
        above = jnp.where(
            d < 15, jnp.take_along_axis(at_least, jnp.minimum(d + 1, 15)[:, None], 1)[:, 0], 0
        )
        need = need - above
        prefix = prefix | (d.astype(jnp.uint32) << shift)
    e = jnp.minimum(eid, E - 1)
    threshold, ties_wanted = prefix[e], need[e]  # [A]
    tie = valid & (key == threshold)
    # Rank of each tie among its expert's ties: here by local order, plus the ties of earlier
    # shards.
    tkey = jnp.where(tie, expert_ids, E)
    o = jnp.argsort(tkey, stable=True)
    per_expert = jnp.bincount(tkey, length=E + 1)  # [E + 1]
    start = jnp.cumsum(per_expert) - per_expert
    rank = jnp.zeros((A,), jnp.int32).at[o].set((jnp.arange(A) - start[tkey[o]]).astype(jnp.int32))
    if axes:
        s, n_shards = 0, math.prod(axis_sizes)
        for a, size in zip(axes, axis_sizes):
            s = s * size + jax.lax.axis_index(a)
        table = jax.lax.psum(
            jnp.zeros((n_shards, E), jnp.int32).at[s].set(per_expert[:E]), axes
        )  # [shards, E]
        earlier = jnp.where(jnp.arange(n_shards)[:, None] < s, table, 0).sum(0)  # [E]
        rank = rank + earlier[e]
    fits = total[e] <= cap
    return valid & (fits | (key > threshold) | (tie & (rank < ties_wanted)))


class ExpertLoRA(NamedTuple):
    """Per-expert low-rank adapters of the routed experts (moejax.finetune.lora), applied on the
    rows inside the grouped matmuls: h = x W_gu + scale (x A_gu) B_gu, y = h W_d + scale (h A_d)
    B_d."""

    a_gu: jax.Array  # [E, D, Z]
    b_gu: jax.Array  # [E, Z, 2, F]
    a_d: jax.Array  # [E, F, Z]
    b_d: jax.Array  # [E, Z, D]
    scale: float
    dropout: float = 0.0
    rng: jax.Array | None = None  # dropout key (training)

    def merged(self, wgu, wd):
        """The base weights with the update added: (w_gate_up, w_down) for the dense / capacity
        references."""
        return (
            wgu + self.scale * jnp.einsum("EDZ,EZXF->EDXF", self.a_gu, self.b_gu).astype(wgu.dtype),
            wd + self.scale * jnp.einsum("EFZ,EZD->EFD", self.a_d, self.b_d).astype(wd.dtype),
        )


def _dropped_out(x, rate: float, rng):
    if not rate or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def expert_ffn(
    rows,
    group_sizes,
    wgu,
    wd,
    *,
    tp_axes=(),
    gmm_impl=None,
    lora: ExpertLoRA | None = None,
    fp8: bool = False,
    limit: float = 0.0,
    out_dtype=jnp.float32,
):
    """The local experts on rows grouped by expert (rows past the groups give zeros): rows [A,
    D] -> [A, D] in out_dtype (the down projection accumulates in float32 either way; with tensor
    parallelism or adapters the result stays float32, as their sums do).

    With tensor-parallel experts (tp_axes) each device holds an F slice and the down projection's
    partial sums (and the adapter's, which is linear in the slice) are summed once at the end.
    fp8: the experts' own two matmuls in FP8 (kernels.fp8.fp8_gmm; adapters stay in the compute
    dtype)."""
    El, D, _, Fl = wgu.shape
    cd = rows.dtype
    looped = gmm_impl is None and kernels.default_impl() == "tiled"
    if looped and lora is None and not fp8 and not tp_axes:
        # the CPU default: both matmuls and the activation per chunk of rows (an explicit
        # execution.gmm_impl runs two grouped matmuls of that backend)
        return kernels.grouped_swiglu(
            rows, group_sizes, wgu.astype(cd), wd.astype(cd), limit=limit
        ).astype(out_dtype)

    def gmm(x, w, out=jnp.float32):
        return kernels.gmm(x, w.astype(cd), group_sizes, preferred_element_type=out, impl=gmm_impl)

    def base(x, w, out=jnp.float32):  # the experts' own matmuls (FP8 if asked; adapters never)
        if fp8:
            return fp8_gmm(x, w.astype(cd), group_sizes, jnp.dtype(out), gmm_impl)
        return gmm(x, w, out)

    h = base(rows, wgu.reshape(El, D, 2 * Fl))
    if lora is not None:
        r0, r1 = (None, None) if lora.rng is None else jax.random.split(lora.rng)
        z = gmm(_dropped_out(rows, lora.dropout, r0), lora.a_gu).astype(cd)  # [A, Z]
        h = h + lora.scale * gmm(z, lora.b_gu.reshape(El, -1, 2 * Fl))
    h = swiglu(h.reshape(-1, 2, Fl), limit).astype(cd)
    if lora is None and not tp_axes:
        return base(h, wd, out_dtype)
    y = base(h, wd)
    if lora is not None:
        z = gmm(_dropped_out(h, lora.dropout, r1), lora.a_d).astype(
            cd
        )  # [A, Z] (a partial sum under tp)
        y = y + lora.scale * gmm(z, lora.b_d)
    return _psum(y, tp_axes)


def _all_to_all(x, axes):
    """Row j of x goes to expert shard j; row s of the result came from shard s."""
    return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def dropless_rows(A: int, n: int, buffer: float) -> int:
    """Rows per shard pair and round of the dropless exchange: `buffer` x the even share A / n;
    A (one round of worst-case buffers) for buffer 0, and when that share exceeds A / 4: a round
    in the loop holds about twice a single round's memory per row (the rebuilt round's arrays and
    their gradients together; measured on TPU), so rounds that large would save nothing."""
    rows = math.ceil(buffer * A / n)
    return A if buffer <= 0 or 4 * rows > A else max(1, rows)


def _exchange_fixed(xs, per_dst, experts, axes, rows: int):
    """Fixed-size exchange: `rows` slots per destination shard ([n, rows, D] buffers).

    xs [A, D] holds the kept rows sorted by expert first (per_dst [n, El] of them), dropped rows
    after. Returns the expert outputs [A, D] in the compute dtype, in the same order (zeros for
    dropped rows).
    """
    return _exchange_rounds(xs, per_dst, experts, axes, rows, rounds=1)


def _exchange_rounds(
    xs, per_dst, experts, axes, rows: int, rounds: int | None = None, agree: tuple = ()
):
    """Dropless exchange in rounds of fixed [n, rows] buffers (see the module docstring); with
    rounds=1 the one-round fixed exchange (rows must then hold every destination's rows).

    Round r carries positions [r * rows, (r + 1) * rows) of each destination's contiguous block
    of xs (sorted by expert); the receiver knows from the per-expert counts which of its local
    experts each arriving row belongs to. Rounds past the fullest pair's need are skipped by a
    cond whose predicate is the same on every device. The results travel back in the compute
    dtype, as the rows went. Every row movement is a gather with a known inverse
    (kernels.gather_rows), so the backward pass has no scatters. agree: further axes (beyond the
    exchange's) over which the round count is made the same, so that every device of the layer
    takes the same branches. Returns [A, D]: in the compute dtype for one round, float32 (their
    sum) for several.
    """
    A, D = xs.shape
    n, El = per_dst.shape
    cd = xs.dtype
    dst_count = per_dst.sum(1)  # [n] rows I send to each shard
    dst_start = jnp.cumsum(dst_count) - dst_count
    recv_ends = jnp.cumsum(_all_to_all(per_dst, axes), axis=1)  # [n (source), El]
    slot = jnp.arange(rows)
    a = jnp.arange(A)
    dst = jnp.minimum(jnp.searchsorted(jnp.cumsum(dst_count), a, side="right"), n - 1)
    pos = a - dst_start[dst]  # row a's position in its destination's block
    kept = a < dst_count.sum()

    def one_round(r):
        at = r * rows + slot  # block positions this round carries
        sent = (at[None] < dst_count[:, None]).reshape(n * rows)  # [n * rows]
        src_row = (dst_start[:, None] + at[None]).reshape(n * rows)
        mine = kept & (pos >= r * rows) & (pos < (r + 1) * rows)  # my rows in this round
        my_slot = dst * rows + pos - r * rows  # where they sit in the [n, rows] buffers
        send = kernels.gather_rows(xs, src_row, sent, my_slot, mine)  # [n * rows, D]
        recv = _all_to_all(send.reshape(n, rows, D), axes)  # [n (source), rows, D]
        # arriving position `at` of source s's block belongs to local expert searchsorted(ends[s])
        expert_of = jax.vmap(lambda e: jnp.searchsorted(e, at, side="right"))(recv_ends)
        expert_of = expert_of.reshape(n * rows)  # El: past the source's block (padding)
        perm = jnp.argsort(expert_of, stable=True)
        inv = kernels.inverse(perm)
        sizes = jnp.bincount(expert_of, length=El + 1)[:El].astype(jnp.int32)
        y = experts(
            kernels.permute_rows(recv.reshape(n * rows, D), perm, inv),
            sizes,
            salt=None if rounds == 1 else r,
        )
        y = kernels.permute_rows(y.astype(cd), inv, perm)  # back to arrival order
        back = _all_to_all(y.reshape(n, rows, D), axes)  # [n (destination), rows, D]
        return kernels.gather_rows(back.reshape(n * rows, D), my_slot, mine, src_row, sent)

    if rounds == 1:
        return one_round(0)
    # the number of rounds the fullest pair needs, agreed over the exchange's and `agree`'s axes
    need = (jnp.max(dst_count) + rows - 1) // rows
    every = tuple(dict.fromkeys(tuple(agree) + tuple(axes)))
    if every:
        need = jax.lax.pmax(need, every)
    # Only the round index is a per-iteration input: the scan keeps no per-round residual but the
    # index (xs and the tables are loop-invariant), and the backward pass recomputes one round at
    # a time. The float32 sum of the rounds is linear, so it is not kept either (summing in the
    # compute dtype, exact since each row comes from one round, compiled to more memory on TPU).
    body = jax.checkpoint(
        lambda r: jax.lax.cond(
            r < need,
            lambda r: one_round(r).astype(jnp.float32),
            lambda r: jnp.zeros((A, D), jnp.float32),
            r,
        )
    )

    def step(out, r):
        return out + body(r), None

    out, _ = jax.lax.scan(step, jnp.zeros((A, D), jnp.float32), jnp.arange(-(-A // rows)))
    return out


def _exchange_ragged(xs, per_dst, experts, axis, recv_rows: int):
    """Exact-size exchange: rows bound for shard j travel as one ragged slice into a receive buffer
    of recv_rows rows; results come back the same way (in the compute dtype). Returns [A, D] like
    `_exchange_fixed`."""
    A, D = xs.shape
    n, El = per_dst.shape
    R = max(1, recv_rows)
    per_dst = per_dst.astype(jnp.int32)
    send_count = per_dst.sum(1)
    send_start = (jnp.cumsum(send_count) - send_count).astype(jnp.int32)
    a2a = functools.partial(_all_to_all, axes=axis)
    recv_per_e = a2a(per_dst)  # [n (source), El]
    recv_count = recv_per_e.sum(1)
    recv_start = jnp.cumsum(recv_count) - recv_count
    recv_keep = jnp.clip(R - recv_start, 0, recv_count).astype(
        jnp.int32
    )  # all of it, by the policy's bound
    recv_start = jnp.minimum(recv_start, R).astype(jnp.int32)
    send_keep = a2a(recv_keep)  # how many of my rows each shard accepts
    land_at = a2a(recv_start)  # where my rows land in each shard's buffer
    rows = _ragged_all_to_all(
        xs, jnp.zeros((R, D), xs.dtype), send_start, send_keep, land_at, recv_keep, axis
    )
    # order the received rows by local expert; rows past what arrived sort last (outside every
    # group)
    r = jnp.arange(R)
    src = jnp.minimum(jnp.searchsorted(jnp.cumsum(recv_keep), r, side="right"), n - 1)
    c = r - recv_start[src]
    arrived = c < recv_keep[src]
    ends = jnp.minimum(
        jnp.cumsum(recv_per_e, axis=1), recv_keep[:, None]
    )  # [n, El] clipped per source
    expert = jnp.where(
        arrived, jax.vmap(lambda e, x: jnp.searchsorted(e, x, side="right"))(ends[src], c), El
    )
    perm = jnp.argsort(expert, stable=True)
    inv = kernels.inverse(perm)
    group_sizes = jnp.bincount(expert, length=El + 1)[:El].astype(jnp.int32)
    y = experts(kernels.permute_rows(rows, perm, inv), group_sizes)  # [R, D]
    y = kernels.permute_rows(y.astype(xs.dtype), inv, perm)  # back to arrival order
    # the results return to where each row came from: sender's offset send_start, as many as were
    # kept
    back_at = a2a(send_start)
    out = _ragged_all_to_all(
        y, jnp.zeros((A, D), y.dtype), recv_start, recv_keep, back_at, send_keep, axis
    )
    return jnp.where((jnp.arange(A) < send_keep.sum())[:, None], out, 0.0)


def _ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis
):
    if not axis:  # one shard: a local copy of the slice
        n_rows = send_sizes[0]
        idx = jnp.arange(output.shape[0])
        src = jnp.clip(input_offsets[0] + idx - output_offsets[0], 0, operand.shape[0] - 1)
        keep = (idx >= output_offsets[0]) & (idx < output_offsets[0] + n_rows)
        return jnp.where(keep[:, None], jnp.take(operand, src, axis=0), output)
    if jax.default_backend() == "cpu" and not kernels.targets_accelerator():
        return _ragged_all_to_all_emulated(
            operand, output, input_offsets, send_sizes, output_offsets, axis
        )
    return jax.lax.ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis
    )


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, axis):
    """ragged_all_to_all's semantics from an all_gather (XLA:CPU lacks the op): every shard sees
    every shard's operand and slice tables and copies the slices addressed to it."""
    me = jax.lax.axis_index(axis)  # over a tuple of axes: the order all_to_all and all_gather use
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
