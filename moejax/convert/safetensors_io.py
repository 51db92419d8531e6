"""Safetensors files read by region and written tensor by tensor, never a whole file in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
[start, end) byte offsets into the data that follows) and the raw row-major tensor bytes. Reading a
region memory-maps one tensor, copies the region and unmaps it again, so the pages touched stop
counting as resident memory; only the copy stays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

FP8_BLOCK = 128  # DeepSeek-V3 FP8 weights carry one scale per 128 x 128 block
SCALE_SUFFIX = "_scale_inv"  # 'x.weight' (float8) is dequantized by 'x.weight_scale_inv'

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8_DTYPES = (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"])


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte offset, dtype and shape (from the
    header)."""

    name: str
    file: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return [os.path.join(path, x) for x in found]


def read_header(file: str) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class Checkpoint:
    """Every tensor of a checkpoint's files, indexed from their headers alone (nothing is read)."""

    def __init__(self, files: list[str]):
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            header, data = read_header(file)
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                if h["dtype"] not in DTYPES:
                    raise ValueError(f"{name}: safetensors dtype {h['dtype']} is not supported")
                self.infos[name] = TensorInfo(
                    name, file, data + h["data_offsets"][0], DTYPES[h["dtype"]], tuple(h["shape"])
                )

    def names(self) -> set[str]:
        return set(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def is_fp8(self, name: str) -> bool:
        return self.infos[name].dtype in FP8_DTYPES

    def read(self, name: str, region: tuple[slice, ...]) -> np.ndarray:
        """The region (one [start, stop) slice per dimension) of tensor `name`, as a new array in
        its file dtype; float8 weights come back dequantized to float32 with their block scales."""
        info = self.infos[name]
        if info.dtype not in FP8_DTYPES:
            return read_region(info, region)
        scale = self.infos.get(name + SCALE_SUFFIX)
        if scale is None:
            raise ValueError(f"{name}: float8 tensor without {name + SCALE_SUFFIX}")
        return dequantize_region(read_region(info, region), scale, region)


def read_region(info: TensorInfo, region: tuple[slice, ...]) -> np.ndarray:
    """Copies region (slices with step 1) of one tensor out of a memory map of its file."""
    if math.prod(info.shape) == 0:
        return np.zeros(tuple(s.stop - s.start for s in region), info.dtype)
    mm = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
    try:
        return np.array(mm[region])
    finally:
        del mm  # unmaps: the file pages touched are no longer resident in this process


def dequantize_region(
    w: np.ndarray, scale: TensorInfo, region: tuple[slice, slice], block: int = FP8_BLOCK
) -> np.ndarray:
    """w = rows [r0, r1) x cols [c0, c1) of a float8 weight [out, in] -> float32 w * scale_inv.

    scale_inv [ceil(out/block), ceil(in/block)] holds one factor per block x block tile; the tiles
    rows r0 .. r1-1 touch are r0 // block .. (r1-1) // block (likewise columns), so a region that
    cuts through tiles reads just those scale rows and columns and crops the expanded grid.
    """
    if w.ndim != 2:
        raise ValueError(f"float8 block scales need a 2-D weight, got shape {w.shape}")
    (r0, r1), (c0, c1) = [(s.start, s.stop) for s in region]
    br0, br1, bc0, bc1 = r0 // block, -(-r1 // block), c0 // block, -(-c1 // block)
    s = read_region(scale, (slice(br0, br1), slice(bc0, bc1))).astype(
        np.float32
    )  # [tiles_r, tiles_c]
    s = np.repeat(np.repeat(s, block, axis=0), block, axis=1)  # [tiles_r*block, tiles_c*block]
    s = s[
        r0 - br0 * block : r1 - br0 * block, c0 - bc0 * block : c1 - bc0 * block
    ]  # [r1-r0, c1-c0]
    return w.astype(np.float32) * s


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """DeepSeek-V3 FP8 weights, whole tensor: w [out, in] * scale_inv broadcast over block x block
    tiles."""
    out, inn = w.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:out, :inn]
    return w.astype(np.float32) * s


def write_safetensors(
    file: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file one tensor at a time.

    specs: (name, shape, dtype) in file order; the header is written first from them, then
    produce(name) is called once per tensor, in order, and its bytes appended (host memory: one
    tensor).
    """
    specs = list(specs)
    header: dict = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, dtype in specs:
            t = produce(name)
            if t.shape != tuple(shape) or t.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{name}: produced {t.dtype}{list(t.shape)}, header says "
                    f"{np.dtype(dtype)}{list(shape)}"
                )
            np.ascontiguousarray(t).tofile(f)  # no bytes copy
