"""Packing documents into fixed-length rows with segment ids and positions, stored as ArrayRecord."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

FIELDS = ("tokens", "segment_ids", "positions")


def pack(docs: Iterable[list[int]], seq_len: int, bos_id: int, eos_id: int) -> Iterator[np.ndarray]:
    """Greedy sequential packing.

    Each document becomes [BOS] + tokens + [EOS]; documents are laid end to end and cut into rows
    of seq_len tokens. Within a row, segment ids count documents from 1 and positions restart at
    each document (and at each row for a document that spills over). The tail is padded with
    segment id 0.

    Yields int32 [3, seq_len] rows: tokens, segment_ids, positions.
    """
    row = np.zeros((3, seq_len), np.int32)
    fill = 0
    seg = 0
    for doc in docs:
        toks = [bos_id, *doc, eos_id]
        pos = 0
        seg += 1
        while toks:
            n = min(seq_len - fill, len(toks))
            row[0, fill:fill + n] = toks[:n]
            row[1, fill:fill + n] = seg
            row[2, fill:fill + n] = np.arange(pos, pos + n)
            toks = toks[n:]
            pos += n
            fill += n
            if fill == seq_len:
                yield row
                row = np.zeros((3, seq_len), np.int32)
                fill = 0
                seg = 1 if toks else 0
                pos = 0 if toks else pos
    if fill:
        yield row


def encode_row(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, np.int32).tobytes()


def decode_row(data: bytes, seq_len: int) -> dict[str, np.ndarray]:
    arr = np.frombuffer(data, np.int32).reshape(3, seq_len)
    return {name: arr[i] for i, name in enumerate(FIELDS)}


def write_rows(path: str, rows: Iterable[np.ndarray]) -> int:
    """Writes rows to one ArrayRecord file; returns the count."""
    w = ArrayRecordWriter(path, "group_size:1")
    n = 0
    try:
        for r in rows:
            w.write(encode_row(r))
            n += 1
    finally:
        w.close()
    return n


def count_rows(path: str) -> int:
    r = ArrayRecordReader(path)
    try:
        return r.num_records()
    finally:
        r.close()
