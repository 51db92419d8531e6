"""Packing documents into fixed-length rows with segment ids and positions, stored as
ArrayRecord."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

FIELDS = ("tokens", "segment_ids", "positions")
WRITER_OPTIONS = (
    "group_size:1,snappy"  # one record per chunk (random access); snappy writes ~10x faster
)
#                                         than the default brotli


class Packer:
    """Greedy sequential packing, vectorized over many documents per call.

    Each document becomes [BOS] + tokens + [EOS]; documents are laid end to end and cut into rows
    of seq_len tokens. Within a row, segment ids count documents from 1 and positions restart at
    each document (and at each row for a document that spills over). `finish()` pads the last row
    with token 0, segment id 0, position 0.

    `add(flat, lengths)` takes the documents as one concatenated token array and their lengths, and
    returns the rows completed so far as int32 [rows, 3, seq_len] (tokens, segment_ids, positions).
    """

    def __init__(self, seq_len: int, bos_id: int, eos_id: int):
        self.L, self.bos, self.eos = seq_len, bos_id, eos_id
        self.carry = np.zeros((3, 0), np.int64)  # tokens, document number, position in document
        self.next_doc = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64)
        n = len(lengths)
        if n == 0:
            return np.zeros((0, 3, self.L), np.int32)
        sizes = lengths + 2
        ends = np.cumsum(sizes)
        starts = ends - sizes
        total = int(ends[-1])
        toks = np.empty(total, np.int64)
        body = np.ones(total, bool)
        body[starts] = body[ends - 1] = False
        toks[starts], toks[ends - 1] = self.bos, self.eos
        toks[body] = flat
        doc = np.repeat(np.arange(self.next_doc, self.next_doc + n), sizes)
        pos = np.arange(total) - np.repeat(starts, sizes)
        self.next_doc += n
        buf = np.concatenate([self.carry, np.stack([toks, doc, pos])], axis=1)
        k = buf.shape[1] // self.L
        self.carry = buf[:, k * self.L :]
        return self._rows(buf[:, : k * self.L].reshape(3, k, self.L).transpose(1, 0, 2))

    def finish(self) -> np.ndarray:
        m = self.carry.shape[1]
        if m == 0:
            return np.zeros((0, 3, self.L), np.int32)
        row = np.zeros((3, self.L), np.int64)
        row[:, :m] = self.carry
        out = self._rows(row[None])
        out[0, 1:, m:] = 0
        self.carry = np.zeros((3, 0), np.int64)
        return out

    def _rows(self, r: np.ndarray) -> np.ndarray:  # [k, 3, L] of tokens, document number, position
        out = np.empty(r.shape, np.int32)
        out[:, 0] = r[:, 0]
        out[:, 1] = r[:, 1] - r[:, 1, :1] + 1
        out[:, 2] = np.minimum(r[:, 2], np.arange(self.L))
        return out


def pack(
    docs: Iterable[list[int]], seq_len: int, bos_id: int, eos_id: int, chunk: int = 4096
) -> Iterator[np.ndarray]:
    """`Packer` over an iterable of token lists; yields int32 [3, seq_len] rows."""
    packer = Packer(seq_len, bos_id, eos_id)
    docs = iter(docs)
    while True:
        batch = list(itertools.islice(docs, chunk))
        if not batch:
            break
        lengths = np.fromiter(map(len, batch), np.int64, len(batch))
        flat = np.fromiter(itertools.chain.from_iterable(batch), np.int64, int(lengths.sum()))
        yield from packer.add(flat, lengths)
    yield from packer.finish()


def encode_row(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, np.int32).tobytes()


def decode_row(data: bytes, seq_len: int) -> dict[str, np.ndarray]:
    """A row's fields: FIELDS, and `loss_mask` in fine-tuning rows (moejax.finetune.data), which
    hold 4."""
    arr = np.frombuffer(data, np.int32).reshape(-1, seq_len)
    return {name: arr[i] for i, name in enumerate(FIELDS + ("loss_mask",)[: arr.shape[0] - 3])}


def write_rows(path: str, rows: Iterable[np.ndarray]) -> int:
    """Writes rows to one ArrayRecord file; returns the count."""
    w = ArrayRecordWriter(path, WRITER_OPTIONS)
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
