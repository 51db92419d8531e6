"""The Grain pipeline training reads prepared datasets through (their on-disk format: `layout`)."""

from __future__ import annotations

import numpy as np

from moejax.data.layout import read_manifest, shard_paths, tokenizer_digest
from moejax.data.mixture import parse_sources
from moejax.data.packing import decode_row


class _Decode:  # picklable (grain worker processes)
    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        return decode_row(record, self.seq_len)


class _Rows:
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, batch: dict) -> dict:
        return {k: v[self.lo : self.hi] for k, v in batch.items()}


class Batches:
    """Global batches of packed rows as numpy dicts, from a Grain pipeline.

    One prepared dataset or a weighted mixture of several (`parse_sources`; they must share seq_len
    and tokenizer): each is shuffled with its own seed and repeated, and `grain.MapDataset.mix`
    interleaves them in proportion to the weights. This process takes its contiguous share of each
    global batch (rows split by jax.process_index). `workers` > 0 decodes in that many Grain worker
    processes. The position is checkpointable (`state()` / `restore(state)`).
    """

    def __init__(
        self,
        path,
        split: str,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 0,
    ):
        import grain

        mix = parse_sources(path)
        manifests = [read_manifest(p) for p, _ in mix]
        self.seq_len = manifests[0]["seq_len"]
        for (p, _), m in zip(mix[1:], manifests[1:]):
            if m["seq_len"] != self.seq_len:
                raise ValueError(
                    f"data.source: {p} has seq_len {m['seq_len']}, {mix[0][0]} has {self.seq_len}"
                )
            if tokenizer_digest(p) != tokenizer_digest(mix[0][0]):
                raise ValueError(
                    f"data.source: {p} and {mix[0][0]} were tokenized differently; a mixture needs "
                    "one tokenizer (prepare them with tokenizer.model or tokenizer.hf set to the "
                    "same file)"
                )
        if global_batch % process_count:
            raise ValueError(
                f"train.batch_size={global_batch} must divide evenly over {process_count} processes"
            )
        parts = []
        for i, (p, _) in enumerate(mix):
            source = grain.sources.ArrayRecordDataSource(shard_paths(p, split))
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

            if (
                not flags.FLAGS.is_parsed()
            ):  # Grain's workers read absl flags; outside an absl app: defaults
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
