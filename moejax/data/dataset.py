"""A prepared dataset directory and the Grain pipeline training reads it through.

Layout:  manifest.json  tokenizer.model  train.arrayrecord  validation.arrayrecord
The manifest is written last; a directory without it is incomplete and never read.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np  # noqa: F401  (batches are numpy dicts)

from moejax.data.packing import decode_row
from moejax.data.tokenizer import SentencePieceTokenizer

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "validation")


def shard_name(split: str) -> str:
    return f"{split}.arrayrecord"


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST))


def write_manifest(path: str, manifest: dict) -> None:
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete moejax dataset (no {MANIFEST})")
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def tokenizer(path: str) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(os.path.join(path, TOKENIZER))


class Batches:
    """Global batches of packed rows as numpy dicts, from a Grain MapDataset.

    Seeded shuffle, repeated epochs, this process's share of each global batch (rows are split by
    jax.process_index), and a checkpointable position (`state()` / `restore(state)`).
    """

    def __init__(self, path: str, split: str, global_batch: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        manifest = read_manifest(path)
        self.seq_len = manifest["seq_len"]
        if global_batch % process_count:
            raise ValueError(f"train.batch_size={global_batch} must divide evenly over {process_count} processes")
        source = grain.sources.ArrayRecordDataSource([os.path.join(path, shard_name(split))])
        if len(source) == 0:
            raise ValueError(f"{path}: split {split!r} has no rows")
        seq_len = self.seq_len
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.seed(seed).shuffle()
        ds = ds.repeat()
        per_process = global_batch // process_count
        # Global batch b holds rows [b*G, (b+1)*G); this process takes its contiguous slice.
        lo, hi = process_index * per_process, (process_index + 1) * per_process
        ds = ds.map(lambda r: decode_row(r, seq_len)).batch(global_batch)
        ds = ds.map(lambda b: {k: v[lo:hi] for k, v in b.items()})
        self._ds = ds
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def state(self) -> dict:
        return self._it.get_state()

    def restore(self, state: dict) -> None:
        self._it = iter(self._ds)
        self._it.set_state(state)


def resolve(data_cfg, vocab_size: int) -> str:
    """The dataset directory a config names: the built-in corpus (built on first use) or a path."""
    if data_cfg.source == "builtin":
        from moejax.data import builtin

        return builtin.build(data_cfg, vocab_size)
    path = os.path.expanduser(data_cfg.source)
    manifest = read_manifest(path)
    if manifest["seq_len"] != data_cfg.seq_len:
        raise ValueError(f"data.seq_len={data_cfg.seq_len} but {path} was packed with seq_len={manifest['seq_len']}")
    return path
