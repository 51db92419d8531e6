"""Visit schedule shared by the Pallas gmm/tgmm kernels (TPU and GPU).

A kernel walks the rows in tiles of `tm`. A group whose rows start or end inside a tile shares that
tile with its neighbour, so the tile is *visited* once per group it holds, each visit masking the
rows of its group. With H groups over T tiles there are at most T + H - 1 visits (every group
boundary inside a tile adds one), which is the static grid size; the real count is a runtime value
and the visits past it are inactive (they repeat the last real visit's block indices so no extra DMA
happens, and the kernels skip their work).

Everything here is plain jnp on small int32 vectors, computed before the kernel launches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    group: jnp.ndarray  # int32 [V] group of each visit (index into starts/ends)
    tile: jnp.ndarray  # int32 [V] row tile of each visit
    starts: jnp.ndarray  # int32 [H] first row of each group
    ends: jnp.ndarray  # int32 [H] one past the last row of each group
    num_visits: jnp.ndarray  # int32 [1] real visits; visits >= this are inactive


def clipped_bounds(group_sizes, num_rows: int):
    """Row [start, end) of every global group, negatives as empty and clipped to num_rows. int32
    [G]."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def schedule(starts, ends, *, tm: int, num_tiles: int, visit_empty: bool) -> Schedule:
    """Visits of the groups [starts[h], ends[h]) in order, each group over the tiles it touches.

    Groups must be ordered and non-overlapping. visit_empty gives an empty group one visit (tgmm
    needs it to write that group's zero gradient); otherwise empty groups are skipped.
    """
    H = starts.shape[0]
    max_visits = num_tiles + H - 1 + (H if visit_empty else 0)
    sizes = ends - starts
    first = jnp.clip(starts // tm, 0, num_tiles - 1)
    last = (ends - 1) // tm
    count = jnp.where(sizes > 0, last - first + 1, 1 if visit_empty else 0).astype(jnp.int32)  # [H]
    cum = jnp.cumsum(count)
    num_visits = cum[-1]
    v = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
    group = jnp.minimum(jnp.searchsorted(cum, v, side="right"), H - 1).astype(jnp.int32)
    tile = jnp.clip(first[group] + v - (cum - count)[group], 0, num_tiles - 1).astype(jnp.int32)
    return Schedule(
        group,
        tile,
        starts.astype(jnp.int32),
        ends.astype(jnp.int32),
        num_visits.reshape(1).astype(jnp.int32),
    )


def gmm_schedule(group_sizes, group_offset, num_local: int, num_rows: int, tm: int) -> Schedule:
    """Schedule for gmm over groups [rows before the local groups, local groups..., rows after].

    The H = num_local + 2 groups cover all num_rows rows, so every output row is written by exactly
    one visit: local rows with their product, the others with zeros. Group h in 1..num_local uses
    weight h - 1.
    """
    loc_starts, loc_ends = local_bounds(group_sizes, group_offset, num_local, num_rows)
    all_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), loc_starts, loc_ends[-1:]])
    all_ends = jnp.concatenate([loc_starts[:1], loc_ends, jnp.full((1,), num_rows, jnp.int32)])
    num_tiles = -(-num_rows // tm)
    return schedule(all_starts, all_ends, tm=tm, num_tiles=num_tiles, visit_empty=False)


def tgmm_schedule(group_sizes, group_offset, num_local: int, num_rows: int, tm: int) -> Schedule:
    """Schedule for tgmm over the local groups only, each visited at least once."""
    loc_starts, loc_ends = local_bounds(group_sizes, group_offset, num_local, num_rows)
    return schedule(loc_starts, loc_ends, tm=tm, num_tiles=-(-num_rows // tm), visit_empty=True)


def local_bounds(group_sizes, group_offset, num_local: int, num_rows: int):
    """Row [start, end) of the local groups, int32 [num_local] each."""
    starts, ends = clipped_bounds(group_sizes, num_rows)
    return _take(starts, group_offset, num_local), _take(ends, group_offset, num_local)


def _take(x, offset, n):
    return jax.lax.dynamic_slice_in_dim(x, jnp.asarray(offset, jnp.int32), n)
