"""Index math from a device shard of a moejax parameter back to regions of Hugging Face tensors.

A shard is a box of the parameter: one [start, stop) range per dimension (what
`Sharding.addressable_devices_indices_map` gives). A slot (weights.Slot) is also a box, with
integer indices for the dimensions it fixes (layer, expert, gate/up half). Filling a shard means:
for each slot that meets it, find the part of the slot's view inside the shard, map that view
region through the slot's layout rule back to a Hugging Face region, read just that, and write
it, transposed and reshaped, into the shard buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from moejax.convert import weights as W

Box = tuple[tuple[int, int], ...]  # one [start, stop) per dimension


def box_of(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """A device index (a tuple of slices, as jax gives it) -> [start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def slot_in_shard(slot_index: tuple, param_shape: tuple[int, ...], shard: Box):
    """Where a slot meets a shard, or None.

    Returns (dst, region): dst indexes the shard buffer (ints for the dims the slot fixes, slices
    for the others); region is the matching [start, stop) slice per dim of the slot's view.
    """
    dst, region = [], []
    for d, (n, (lo, hi)) in enumerate(zip(param_shape, shard)):
        s = slot_index[d] if d < len(slot_index) else slice(None)
        if isinstance(s, int):
            if not lo <= s < hi:
                return None
            dst.append(s - lo)
            continue
        a, b, step = s.indices(n)
        assert step == 1, "slot slices have step 1"
        a2, b2 = max(a, lo), min(b, hi)  # the slot's range clipped to the shard
        if a2 >= b2:
            return None
        dst.append(slice(a2 - lo, b2 - lo))
        region.append(slice(a2 - a, b2 - a))
    return tuple(dst), tuple(region)


def hf_region(rule: str, view: tuple[int, ...], region: Sequence[slice]):
    """A region of a slot view -> (the Hugging Face region to read, how to finish it).

    For each view group (the view dims one Hugging Face axis splits into, see weights.layout) with
    sizes [g0, g1, ...], flat index h = i0 * (g1*g2*...) + i1 * (g2*...) + ...; rows i0 in
    [a, b) are the contiguous range h in [a * inner, b * inner). That range is read whole, and the
    inner dims (normally full, so nothing is dropped) are sliced after the reshape.

    Returns (hf_slices, perm, split_shape, post): the view region is
    `read(hf_slices).transpose(perm).reshape(split_shape)[post]`.
    """
    perm, groups = W.layout(rule, view)
    hf = [slice(0, 0)] * len(perm)
    split, post = [], []
    k = 0
    for axis, g in zip(perm, groups):
        rs = region[k : k + len(g)]  # this group's view slices
        k += len(g)
        inner = math.prod(g[1:])
        hf[axis] = slice(rs[0].start * inner, rs[0].stop * inner)
        split += [rs[0].stop - rs[0].start, *g[1:]]
        post += [slice(None), *rs[1:]]
    return tuple(hf), perm, tuple(split), tuple(post)


def read_view_region(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    rule: str,
    view: tuple[int, ...],
    region: Sequence[slice],
) -> np.ndarray:
    """The `region` of a slot view of shape `view`, read through read(hf_slices) of its tensor."""
    hf, perm, split, post = hf_region(rule, view, region)
    x = read(hf)  # [region of the Hugging Face tensor]
    return x.transpose(perm).reshape(split)[post]  # [region of the view]


def fill_shard(buf: np.ndarray, shard: Box, param_shape: tuple[int, ...], parts, read) -> None:
    """Writes every slot that meets `shard` into buf (the shard's host buffer, shape of the box).

    parts: (name, slot, view_shape) of each Hugging Face tensor of this parameter;
    read(name, hf_slices) returns that region of the tensor (dequantized if float8).
    """
    for name, slot, view in parts:
        hit = slot_in_shard(slot.index, param_shape, shard)
        if hit is None:
            continue
        dst, region = hit
        buf[dst] = read_view_region(
            lambda hf, name=name: read(name, hf), slot.rule, view, region
        )  # casts to buf's dtype
