"""A prepared dataset directory and the Grain pipeline training reads it through.

Layout:  manifest.json  tokenizer.model (or tokenizer.json)  train.arrayrecord  validation.arrayrecord
The manifest is written last; a directory without it is incomplete and never read.
"""

from __future__ import annotations

import json
import os

import numpy as np  # noqa: F401  (batches are numpy dicts)

from moejax.data.packing import decode_row
from moejax.data import tokenizer as tokenizers

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
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


def tokenizer(path) -> tokenizers.Tokenizer:
    """The dataset's tokenizer: sentencepiece, or a Hugging Face tokenizer.json with the special tokens
    the manifest names. `path` may be a mixture (its datasets share one tokenizer)."""
    if not isinstance(path, str):
        path = path[0][0]
    hf = os.path.join(path, HF_TOKENIZER)
    if os.path.exists(hf):
        return tokenizers.HFTokenizer(hf, **read_manifest(path).get("special_tokens", {}))
    return tokenizers.SentencePieceTokenizer(os.path.join(path, TOKENIZER))


def parse_sources(source: str | list) -> list[tuple[str, float]]:
    """`dir` or a mixture `dirA=0.7,dirB=0.3` (weights are relative) as [(path, weight)]."""
    if not isinstance(source, str):
        return [(p, float(w)) for p, w in source]
    out = []
    for part in source.split(","):
        path, _, w = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"data.source: mixture weight {w!r} of {path!r} is not a number") from None
        if weight <= 0:
            raise ValueError(f"data.source: mixture weight of {path!r} must be > 0, got {weight}")
        out.append((os.path.expanduser(path), weight))
    return out


class _Decode:  # picklable (grain worker processes)
    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        return decode_row(record, self.seq_len)


class _Rows:
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, batch: dict) -> dict:
        return {k: v[self.lo:self.hi] for k, v in batch.items()}


class Batches:
    """Global batches of packed rows as numpy dicts, from a Grain pipeline.

    One prepared dataset or a weighted mixture of several (`parse_sources`; they must share seq_len and
    tokenizer): each is shuffled with its own seed and repeated, and `grain.MapDataset.mix` interleaves
    them in proportion to the weights. This process takes its contiguous share of each global batch
    (rows split by jax.process_index). `workers` > 0 decodes in that many Grain worker processes.
    The position is checkpointable (`state()` / `restore(state)`).
    """

    def __init__(self, path, split: str, global_batch: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, workers: int = 0):
        import grain

        mix = parse_sources(path)
        manifests = [read_manifest(p) for p, _ in mix]
        self.seq_len = manifests[0]["seq_len"]
        for (p, _), m in zip(mix[1:], manifests[1:]):
            if m["seq_len"] != self.seq_len:
                raise ValueError(f"data.source: {p} has seq_len {m['seq_len']}, {mix[0][0]} has {self.seq_len}")
            if tokenizer_digest(p) != tokenizer_digest(mix[0][0]):
                raise ValueError(f"data.source: {p} and {mix[0][0]} were tokenized differently; a mixture needs one "
                                 "tokenizer (prepare them with tokenizer.model or tokenizer.hf set to the same file)")
        if global_batch % process_count:
            raise ValueError(f"train.batch_size={global_batch} must divide evenly over {process_count} processes")
        parts = []
        for i, (p, _) in enumerate(mix):
            source = grain.sources.ArrayRecordDataSource([os.path.join(p, shard_name(split))])
            if len(source) == 0:
                raise ValueError(f"{p}: split {split!r} has no rows")
            ds = grain.MapDataset.source(source)
            if shuffle:
                ds = ds.seed(seed + 7919 * i).shuffle()
            parts.append(ds.repeat())
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in mix])
        per_process = global_batch // process_count
        # Global batch b holds rows [b*G, (b+1)*G); this process takes its contiguous slice.
        ds = ds.map(_Decode(self.seq_len)).batch(global_batch)
        ds = ds.map(_Rows(process_index * per_process, (process_index + 1) * per_process))
        if workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app: defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
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


def tokenizer_digest(path: str) -> str:
    import hashlib

    for name in (HF_TOKENIZER, TOKENIZER):
        f = os.path.join(path, name)
        if os.path.exists(f):
            with open(f, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()
    raise FileNotFoundError(f"{path}: no {TOKENIZER} or {HF_TOKENIZER}")


def resolve(data_cfg, vocab_size: int) -> list[tuple[str, float]]:
    """The datasets a config names, as [(directory, weight)]: a prepared directory, the built-in corpus
    ('builtin') or the built-in docs domain ('builtin-docs', both prepared on first use), or a mixture of
    them `dirA=0.7,builtin=0.3`."""
    from moejax.data import builtin

    named = {"builtin": builtin.build, "builtin-docs": builtin.build_docs}
    mix = [(named[p](data_cfg, vocab_size) if p in named else p, w) for p, w in parse_sources(data_cfg.source)]
    for path, _ in mix:
        manifest = read_manifest(path)
        if manifest["seq_len"] != data_cfg.seq_len:
            raise ValueError(f"data.seq_len={data_cfg.seq_len} but {path} was packed with seq_len={manifest['seq_len']}")
    return mix
