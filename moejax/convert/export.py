"""moejax Transformer -> Hugging Face checkpoint, gathered and written one tensor at a time.

Each Hugging Face tensor is one slot of a (possibly sharded, possibly multi-process) parameter. A
jitted, shard-aware dynamic slice with a replicated output gathers just that slot; its start
indices are traced arguments, so there is one compile per parameter and slot shape (all experts of
all layers share it), not per tensor. Every process takes part in the gathers; process 0 writes.
Files are planned from the shapes first, so each is written header first, then tensor by tensor.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.config import ModelConfig
from moejax.convert import safetensors_io as io
from moejax.convert import weights as W
from moejax.convert.hf_config import hf_model_type, to_hf_config

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
OUT_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": io.DTYPES["BF16"],
    "float16": np.dtype(np.float16),
}


def _starts_sizes(index: tuple, shape: tuple[int, ...]) -> tuple[list[int], tuple[int, ...]]:
    """A slot index -> dynamic_slice start indices and (static) sizes; an int takes size 1."""
    starts, sizes = [], []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        if isinstance(s, int):
            starts.append(s)
            sizes.append(1)
        else:
            a, b, _ = s.indices(n)
            if (a, b) != (0, n):
                raise ValueError(f"slot index {index}: only whole-dimension slices are gathered")
            starts.append(0)
            sizes.append(n)
    return starts, tuple(sizes)


def _local_slice(spec: tuple, sizes: tuple[int, ...]):
    """The per-device body of a sharded slot gather (inside shard_map).

    x is this device's block of the parameter. Along a dimension the slot fixes (size 1) and the
    mesh splits over `axes`, the block holds global rows [i * b, (i + 1) * b) with
    i = axis_index(axes): the device whose block holds the row contributes it, every other device
    zeros, and a psum over `axes` leaves the row everywhere. A dimension the slot takes whole is
    all-gathered over its axes. Communication is the size of the slot, never of the parameter (a
    plain jitted dynamic_slice would all-gather every expert of every layer first).
    """

    def body(x, starts):
        local, inside = [], True
        for d, (axes, size) in enumerate(zip(spec, sizes)):
            if size == 1 and axes:
                i = starts[d] - jax.lax.axis_index(axes) * x.shape[d]  # row index inside this block
                inside = inside & (i >= 0) & (i < x.shape[d])
                local.append(jnp.clip(i, 0, x.shape[d] - 1))
            else:
                local.append(starts[d])
        block = [1 if size == 1 else x.shape[d] for d, size in enumerate(sizes)]
        y = jax.lax.dynamic_slice(x, local, block)  # [sizes, sharded dims still local]
        bits = _UINT.get(y.dtype.itemsize)  # sum the bit patterns: exact, -0.0 and NaNs included
        y = y if bits is None else jax.lax.bitcast_convert_type(y, bits)
        y = jnp.where(inside, y, jnp.zeros_like(y))
        for d, (axes, size) in enumerate(zip(spec, sizes)):
            if axes and size == 1:
                y = jax.lax.psum(y, axes)  # one device holds the row, the others add zeros
            elif axes:
                y = jax.lax.all_gather(y, axes, axis=d, tiled=True)
        return y if bits is None else jax.lax.bitcast_convert_type(y, x.dtype)  # [sizes]

    return body


@functools.lru_cache(maxsize=512)
def _gather_fn(sh, sizes: tuple[int, ...]):
    """jit(slot gather) for a parameter sharding and slot shape; start indices are traced arguments,
    so every layer's and expert's slice of a parameter shares one compile (kept across to_hf
    calls)."""
    if not isinstance(sh, NamedSharding):  # one device: a plain slice
        return jax.jit(lambda a, st: jax.lax.dynamic_slice(a, list(st), sizes))
    spec = tuple(sh.spec) + (None,) * (len(sizes) - len(sh.spec))
    body = _local_slice(tuple(sharding.axes_of(a) for a in spec), sizes)
    # check_vma=False: all_gather's result is typed as varying although it is the same everywhere
    gather = jax.shard_map(
        body, mesh=sh.mesh, in_specs=(sh.spec, P()), out_specs=P(), check_vma=False
    )
    return jax.jit(gather, out_shardings=NamedSharding(sh.mesh, P()))


def gather_slot(x: jax.Array, slot: W.Slot, to_host: bool = True) -> np.ndarray | None:
    """x[slot.index] of a (sharded, possibly multi-process) parameter as a host array of the slot's
    view shape; every process must call it; to_host=False joins the gather without the copy."""
    starts, sizes = _starts_sizes(slot.index, x.shape)
    y = _gather_fn(x.sharding, sizes)(x, np.asarray(starts, np.int32))  # [sizes], on every device
    if not to_host:
        return None
    return np.asarray(y.addressable_data(0)).reshape(W.view_shape(x.shape, slot.index))


def _plan_files(specs: list[tuple[str, tuple, np.dtype]], shard_bytes: int) -> list[list]:
    """Tensors in order, cut into files of at most shard_bytes (a bigger tensor gets its own)."""
    files, cur, size = [], [], 0
    for spec in specs:
        n = math.prod(spec[1]) * spec[2].itemsize
        if cur and size + n > shard_bytes:
            files.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += n
    return files + [cur]


def _check_covered(arrays: dict, entries: dict, model_type: str) -> None:
    """Every element of every model array goes to some Hugging Face tensor: a parameter the name
    table does not know (a new module, an unmerged LoRA adapter) is refused, not silently left out
    of the export."""
    covered = {}
    for slot in entries.values():
        n = math.prod(W.view_shape(arrays[slot.path].shape, slot.index))
        covered[slot.path] = covered.get(slot.path, 0) + n
    missing = [
        "/".join(map(str, p))
        for p, a in sorted(arrays.items(), key=lambda kv: str(kv[0]))
        if covered.get(p, 0) < math.prod(a.shape)
    ]
    if missing:
        raise ValueError(
            f"to_hf: {len(missing)} model parameter(s) have no Hugging Face name for "
            f"{model_type!r} and would be lost: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} "
            "(merge LoRA adapters first: moejax.finetune.export)"
        )


def to_hf(
    model,
    config: ModelConfig,
    path: str,
    *,
    model_type: str | None = None,
    shard_bytes: int = 4 << 30,
    dtype: str = "float32",
) -> None:
    """Writes config.json and safetensors shards (per-expert names) that transformers loads.

    Host memory holds one Hugging Face tensor at a time. With a multi-process model every process
    must call this (the gathers are collective); process 0 writes. The directory appears only when
    complete: everything is written to a temporary sibling and renamed at the end; an existing
    `path` is replaced.
    """
    mt = model_type or hf_model_type(config)
    hf_cfg = to_hf_config(config, mt)
    hf_cfg["torch_dtype" if "torch_dtype" in hf_cfg else "dtype"] = (
        dtype  # remote-code configs: torch_dtype
    )
    out_dtype = OUT_DTYPES[dtype]
    arrays = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    entries = W.hf_entries(config, mt, fused=False)
    _check_covered(arrays, entries, mt)

    def dtype_of(slot):  # integer tables (V4's hash routing) stay int64, as torch keeps them
        return (
            np.dtype(np.int64)
            if jnp.issubdtype(arrays[slot.path].dtype, jnp.integer)
            else out_dtype
        )

    specs = [
        (name, W.hf_shape(s, W.view_shape(arrays[s.path].shape, s.index)), dtype_of(s))
        for name, s in entries.items()
    ]
    files = _plan_files(specs, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    writer = jax.process_index() == 0

    def produce(name):  # [HF shape] in out_dtype
        slot = entries[name]
        view = gather_slot(arrays[slot.path], slot, to_host=writer)
        return None if view is None else W.export_tensor(slot, view).astype(dtype_of(slot))

    tmp = None
    try:
        if writer:
            parent = os.path.dirname(os.path.abspath(path)) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
        for fname, file_specs in zip(names, files):
            if writer:
                write_safetensors(
                    os.path.join(tmp, fname), file_specs, produce, metadata={"format": "pt"}
                )
            else:
                for name, _, _ in file_specs:
                    produce(name)
        if writer:
            if len(files) > 1:
                total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
                weight_map = {n: fname for fname, fs in zip(names, files) for n, _, _ in fs}
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump(
                        {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2
                    )
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_cfg, f, indent=2)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"moejax.convert.to_hf {path}")


write_safetensors = io.write_safetensors  # module attribute, so a test can make writing fail
