"""Prepare a dataset from raw text and code: read, normalize, deduplicate, filter, scrub, tokenize,
pack.

    python -m moejax.data.prepare --config experiments/data/example.py --out DIR

The output directory has the layout training reads (`data.source=DIR`; see moejax.data.layout):
ArrayRecord shards per split, the tokenizer, manifest.json (sources, input hashes, counts, the
config) and report.md with plots.

Work runs in phases, each recorded in a build directory next to the output (`.<name>.building`):
1. clean, one source at a time: the main process reads documents and sends chunks to `workers`
   processes that normalize, filter, hash, compute MinHash signatures and scrub PII
   (`moejax.data.steps`); the main process drops exact duplicates in document order (so the result
   does not depend on the worker count), registers the survivors' signatures with the near-duplicate
   index and appends them to `cleaned/<n>.pkl`; after each source the counters and the index are
   saved;
2. decide: near-duplicate clusters (connected components, `stages.NearDedup`) need every source, so
   one pass over the survivors then keeps each cluster's earliest document, applies the stages after
   deduplication (PII counts, fill-in-the-middle) and assigns splits (`final.pkl`);
3. the tokenizer: trained with sentencepiece on a sample of the cleaned training text, or copied;
4. tokenize and pack each split over the workers into ArrayRecord shards.
A rerun with the same config and inputs resumes after the last finished source or phase; with
anything changed it starts over. The build directory is renamed to the output only when every shard
and the manifest are written, so nothing incomplete ever looks complete. `--runner beam` runs the
same stages on Apache Beam instead (`moejax.data.beam`).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import time

import numpy as np

from moejax.data import layout, sources, stages
from moejax.data import tokenizer as tokenizers
from moejax.data.packing import WRITER_OPTIONS, Packer, encode_row
from moejax.data.steps import (  # noqa: F401  (Counters, STAGE_ORDER: part of this module's API)
    CHUNK,
    STAGE_ORDER,
    Counters,
    _clean_chunk,
    _copies,
    _counts_text,
    _file_hash,
    _hash_fraction,
    _init_cleaner,
    _jsonable,
    _sample_lines,
    check_config,
    count_early,
    finish_document,
    split_of,
    summary,
    write_report,
)

PROGRESS = "progress.json"
_WORKER: dict = {}  # a worker process's tokenizer
FINAL = "final.pkl"  # in the build directory: the documents that survive every stage


# ------------------------------------------------------------------------------ per-document work


def _init_encoder(path: str, special: dict):
    _WORKER["tok"] = tokenizers.load(path, special)


def _encode_chunk(texts: list[str]):
    enc = _WORKER["tok"].encode_batch(texts)
    lengths = np.fromiter(map(len, enc), np.int64, len(enc))
    return np.fromiter(itertools.chain.from_iterable(enc), np.int32, int(lengths.sum())), lengths


class _Workers:
    """A process pool (or the calling process when workers <= 1) with a bounded, ordered map."""

    def __init__(self, workers: int, init, initargs):
        self.pool = None
        if workers > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(workers, init, initargs)
        else:
            init(*initargs)
        self.depth = 2 * max(1, workers)

    def map(self, fn, items):
        """Yields (meta, fn(payload)) for (meta, payload) items in order, at most `depth` in
        flight."""
        if self.pool is None:
            for meta, payload in items:
                yield meta, fn(payload)
            return
        pending = collections.deque()
        for meta, payload in items:
            pending.append((meta, self.pool.apply_async(fn, (payload,))))
            if len(pending) >= self.depth:
                meta, res = pending.popleft()
                yield meta, res.get()
        while pending:
            meta, res = pending.popleft()
            yield meta, res.get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _chunks(docs, size: int, counters: Counters):
    batch = []
    t = time.perf_counter()
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            counters.seconds["read"] += time.perf_counter() - t
            yield batch, [(d.text, d.lang) for d in batch]
            batch = []
            t = time.perf_counter()
    counters.seconds["read"] += time.perf_counter() - t
    if batch:
        yield batch, [(d.text, d.lang) for d in batch]


class Dedup:
    """The order-dependent state: exact hashes seen, the near-duplicate LSH index."""

    def __init__(self, st: dict, seed: int):
        self.exact: set[bytes] = set()
        self.near = (
            stages.NearDedup(st["num_perm"], st["bands"], st["threshold"], st["shingle_size"], seed)
            if st["near_dedup"]
            else None
        )


def clean(
    docs,
    st: dict,
    counters: Counters,
    seed: int,
    workers: int = 1,
    dedup: Dedup | None = None,
    pool: _Workers | None = None,
):
    """The stages in document order up to exact deduplication; registers the survivors with the
    near-duplicate index. Yields (document with its cleaned text, near-dedup id or -1, cleaned
    bytes, PII replacements) per survivor; `decide` then takes the near-duplicate decisions, which
    need every document first."""
    dedup = dedup or Dedup(st, seed)
    own = pool is None
    pool = pool or _Workers(workers, _init_cleaner, (st, seed))
    tick = time.perf_counter
    try:
        for batch, (results, sigs, secs) in pool.map(_clean_chunk, _chunks(docs, CHUNK, counters)):
            counters.seconds.update(secs)
            t = tick()
            k = 0
            for doc, res in zip(batch, results):
                if not count_early(counters, doc.path, res):
                    continue
                text, nbytes, h, npii = res[2], res[4], res[5], res[7]
                sig, keys = (sigs[0][k], sigs[1][k]) if sigs is not None else (None, None)
                k += 1
                if st["exact_dedup"]:
                    counters.seen("exact_dedup", nbytes)
                    if h in dedup.exact:
                        counters.remove("exact_dedup", "exact duplicate", doc.path, nbytes, text)
                        continue
                    dedup.exact.add(h)
                doc_id = -1
                if dedup.near is not None:
                    counters.seen("near_dedup", nbytes)
                    dedup.near.add_signature(sig, keys)
                    doc_id = len(dedup.near.signatures) - 1
                doc.text = text
                yield doc, doc_id, nbytes, npii
            counters.seconds["decisions"] += tick() - t
    finally:
        if own:
            pool.close()


def decide(records, st: dict, counters: Counters, dedup: Dedup, seed: int):
    """Near-duplicate decisions (`stages.NearDedup`: connected components, the earliest document
    of each kept) and the later stages over `clean`'s survivors in the same order; yields the kept
    (document, cleaned bytes) with their final text."""
    dup = dedup.near.duplicates() if dedup.near is not None else None
    for doc, doc_id, nbytes, npii in records:
        if dup is not None and dup[doc_id]:
            counters.remove("near_dedup", "near duplicate", doc.path, nbytes, doc.text)
            continue
        doc.text = finish_document(doc.text, doc.path, doc.lang, nbytes, npii, st, counters, seed)
        counters.kept_bytes += nbytes
        yield doc, nbytes
    if dedup.near is not None:
        counters.cluster_sizes = dedup.near.cluster_sizes()


def _input_key(cfg: dict, files: dict) -> str:
    """What a resumed build must agree on: the config (less overwrite / workers) and the input
    files' names, sizes and modification times."""
    stat = {}
    for fs in files.values():
        for f in fs:
            try:
                s = os.stat(f)
                stat[f] = (s.st_size, s.st_mtime_ns)
            except OSError:
                stat[f] = None
    c = {k: v for k, v in cfg.items() if k not in ("overwrite", "workers")}
    return hashlib.sha256(json.dumps([_jsonable(c), stat], sort_keys=True).encode()).hexdigest()[
        :16
    ]


def _save_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _save_pickle(path: str, obj) -> None:
    with open(path + ".tmp", "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)


def _load_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


def _pickled(path: str):
    """The items of a stream of pickled lists (no escaping, unlike JSON)."""
    with open(path, "rb") as f:
        while True:
            try:
                chunk = pickle.load(f)
            except EOFError:
                return
            yield from chunk


def _write_pickled(f, items, chunk: int = 256) -> None:
    for batch in iter(lambda: list(itertools.islice(items, chunk)), []):
        pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)


def _cleaned_docs(build: str, split: str | None = None):
    """(text, path, split, source) of the final documents, in document order."""
    for d in _pickled(os.path.join(build, FINAL)):
        if split is None or d[2] == split:
            yield d


def _final_rows(kept, seed: int, val_fraction: float, counts: collections.Counter):
    for doc, _ in kept:
        split = split_of(doc.path, seed, val_fraction)
        counts[split] += 1
        yield doc.text, doc.path, split, int(doc.source)


def _survivors(build: str, n_sources: int):
    """`clean`'s survivors as `decide` takes them, sources in order."""
    for i in range(n_sources):
        for text, path, lang, source, doc_id, nbytes, npii in _pickled(
            os.path.join(build, "cleaned", f"{i}.pkl")
        ):
            yield sources.Document(text, str(source), path, lang), doc_id, nbytes, npii


def prepare(cfg: dict, out: str, quiet: bool = False) -> dict:
    """Runs the pipeline for a data config (see experiments/data/*.py); returns the manifest.

    Holds an exclusive lock (`.<name>.lock` next to the output) while it runs, so that processes
    started together (several hosts on a shared disk) build once: the others then find the complete
    output."""
    import fcntl

    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(cfg, out, quiet)


def _prepare(cfg: dict, out: str, quiet: bool) -> dict:
    from tqdm import tqdm

    st, tcfg = check_config(cfg)
    seed, seq_len = cfg.get("seed", 0), cfg["seq_len"]
    workers = max(1, int(cfg.get("workers", 1)))
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out):
        if layout.is_complete(out) and not cfg.get("overwrite", False):
            raise FileExistsError(
                f"{out} is already a complete dataset (set overwrite=True to rebuild it)"
            )
    files = {src["name"]: sources.files(src, sources.SkipLog()) for src in cfg["sources"]}
    key = _input_key(cfg, files)
    build = os.path.join(parent, f".{os.path.basename(out)}.building")
    progress = {}
    if os.path.exists(os.path.join(build, PROGRESS)):
        with open(os.path.join(build, PROGRESS)) as f:
            progress = json.load(f)
    if progress.get("key") != key:  # a different config or changed inputs: start over
        shutil.rmtree(build, ignore_errors=True)
        progress = {
            "key": key,
            "sources_done": 0,
            "decided": False,
            "tokenizer": False,
            "splits": {},
        }
    elif not quiet:
        print(
            f"[prepare] resuming {build}: {progress['sources_done']} sources cleaned, "
            f"tokenizer {'done' if progress['tokenizer'] else 'not done'}, splits done "
            f"{sorted(progress['splits'])}"
        )
    os.makedirs(os.path.join(build, "cleaned"), exist_ok=True)
    save_progress = lambda: _save_json(os.path.join(build, PROGRESS), progress)  # noqa: E731
    save_progress()
    t0 = time.time()
    state_file = os.path.join(build, "state.pkl")
    if progress["sources_done"]:
        counters, skips, dedup, inputs, elapsed = _load_pickle(state_file)
        t0 -= elapsed
        # The state written after the decisions (dedup dropped) is what commits them: a run killed
        # before progress.json said so must not decide (and count) again.
        progress["decided"] = progress.get("decided") or dedup is None
    else:
        counters, skips, dedup, inputs = Counters(), sources.SkipLog(), Dedup(st, seed), {}

    # ---- phase 1: clean, one source at a time
    pool = None
    try:
        for i, src in enumerate(cfg["sources"]):
            if i < progress["sources_done"]:
                continue
            pool = pool or _Workers(workers, _init_cleaner, (st, seed))
            fs = files[src["name"]]
            inputs[src["name"]] = {
                "path": src["path"],
                "files": len(fs),
                "weight": float(src.get("weight", 1.0)),
                "sha256": {os.path.relpath(f, parent): _file_hash(f) for f in fs[:1000]},
            }
            bar = tqdm(
                sources.documents(src, skips),
                desc=f"clean {src['name']}",
                disable=quiet,
                unit="doc",
                mininterval=2.0,
            )
            t = time.time()
            with open(os.path.join(build, "cleaned", f"{i}.pkl"), "wb") as f:
                _write_pickled(
                    f,
                    (
                        (doc.text, doc.path, doc.lang, i, doc_id, nbytes, npii)
                        for doc, doc_id, nbytes, npii in clean(
                            bar, st, counters, seed, dedup=dedup, pool=pool
                        )
                    ),
                )
            counters.wall["clean"] += time.time() - t
            _save_pickle(state_file, (counters, skips, dedup, inputs, time.time() - t0))
            progress["sources_done"] = i + 1
            save_progress()
    finally:
        if pool is not None:
            pool.close()
    if not progress.get("decided"):  # near-duplicate clusters need every source's documents
        t = time.time()
        val_fraction = cfg.get("val_fraction", 0.01)
        with open(os.path.join(build, FINAL), "wb") as f:
            kept = decide(_survivors(build, len(cfg["sources"])), st, counters, dedup, seed)
            _write_pickled(f, _final_rows(kept, seed, val_fraction, counters.split_docs))
        counters.wall["clean"] += time.time() - t
        _save_pickle(state_file, (counters, skips, None, inputs, time.time() - t0))
        progress["decided"] = True
        save_progress()
    weights = [float(s.get("weight", 1.0)) for s in cfg["sources"]]
    train_bytes = counters.kept_bytes

    # ---- phase 2: the tokenizer
    special = {k: tcfg[k] for k in ("bos", "eos", "pad") if tcfg.get(k)}
    tok_file = os.path.join(build, layout.HF_TOKENIZER if tcfg.get("hf") else layout.TOKENIZER)
    if not progress["tokenizer"]:
        t = time.time()
        if tcfg.get("hf"):
            shutil.copy(os.path.expanduser(tcfg["hf"]), tok_file)
        elif tcfg.get("model"):
            shutil.copy(os.path.expanduser(tcfg["model"]), tok_file)
        else:
            if not any(True for _ in _cleaned_docs(build, "train")):
                raise ValueError(
                    "no training documents survived the stages; see the counts:\n"
                    + _counts_text(counters, skips)
                )
            sample = _sample_lines(
                _cleaned_docs(build, "train"),
                tcfg.get("sample_bytes", 20_000_000),
                train_bytes,
                seed,
            )
            tokenizers.train_sentencepiece(
                sample,
                tok_file,
                tcfg.get("vocab_size", 8192),
                tcfg.get("model_type", "bpe"),
                user_symbols=tuple(tcfg.get("user_symbols", ()))
                + (stages.FIM_TOKENS if st["fim_rate"] else ()),
                num_threads=workers,
            )
        counters.wall["tokenizer"] += time.time() - t
        progress["tokenizer"] = True
        save_progress()
    tok = tokenizers.load(tok_file, special)

    # ---- phase 3: tokenize and pack each split
    promoted = (
        ""  # with a validation fraction but no document drawn for it: the train document nearest
    )
    if (
        cfg.get("val_fraction", 0.01) > 0
        and not counters.split_docs["validation"]
        and counters.split_docs["train"] > 1
    ):
        promoted = min(
            (d[1] for d in _cleaned_docs(build, "train")),
            key=lambda p: _hash_fraction(p, seed),
        )

    def split_of(d):
        return "validation" if d[1] == promoted else d[2]

    splits = dict(progress["splits"])
    t = time.time()
    enc_pool = None
    try:
        for split in layout.SPLITS:
            if split in splits:
                continue
            enc_pool = enc_pool or _Workers(workers, _init_encoder, (tok_file, special))
            stats = {"documents": 0, "tokens": 0, "rows": 0, "bytes": 0, "lengths": []}
            packer = Packer(seq_len, tok.bos_id, tok.eos_id)
            shard = os.path.join(build, layout.shard_name(split))
            from array_record.python.array_record_module import ArrayRecordWriter

            writer = ArrayRecordWriter(shard + ".tmp", WRITER_OPTIONS)
            try:
                texts = (
                    d[0]
                    for d in _cleaned_docs(build)
                    if split_of(d) == split
                    for _ in range(_copies(weights[d[3]], d[1], seed) if split == "train" else 1)
                )
                bar = tqdm(desc=f"tokenize {split}", disable=quiet, unit="doc", mininterval=2.0)
                for texts_chunk, (flat, lengths) in enc_pool.map(
                    _encode_chunk, _text_chunks(texts, 512)
                ):
                    bar.update(len(texts_chunk))
                    stats["documents"] += len(texts_chunk)
                    stats["bytes"] += sum(len(x.encode()) for x in texts_chunk)
                    stats["tokens"] += int(lengths.sum()) + 2 * len(lengths)
                    stats["lengths"] += lengths.tolist()
                    for row in packer.add(flat, lengths):
                        writer.write(encode_row(row))
                        stats["rows"] += 1
                for row in packer.finish():
                    writer.write(encode_row(row))
                    stats["rows"] += 1
                bar.close()
            finally:
                writer.close()
            os.replace(shard + ".tmp", shard)
            splits[split] = stats
            progress["splits"][split] = stats
            save_progress()
    finally:
        if enc_pool is not None:
            enc_pool.close()
    counters.wall["tokenize + pack"] += time.time() - t
    if splits["train"]["documents"] == 0:
        raise ValueError(
            "no training documents survived the stages; see the counts:\n"
            + _counts_text(counters, skips)
        )

    report = write_report(build, counters, skips, splits, time.time() - t0)
    manifest = {
        "name": cfg.get("name", os.path.basename(out)),
        "seq_len": seq_len,
        "vocab_size": tok.vocab_size,
        "splits": {s: {k: v for k, v in c.items() if k != "lengths"} for s, c in splits.items()},
        "sources": inputs,
        "config": _jsonable(cfg),
        "stages": _jsonable(st),
        "special_tokens": special,
        "counts": report,
        "seconds": round(time.time() - t0, 1),
    }
    shutil.rmtree(os.path.join(build, "cleaned"))
    for f in (PROGRESS, "state.pkl", FINAL):
        os.remove(os.path.join(build, f))
    layout.write_manifest(build, manifest)  # last: marks the directory complete
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(build, out)
    if not quiet:
        print(summary("prepare", out, manifest))
    return manifest


def _text_chunks(texts, size: int):
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch, batch
            batch = []
    if batch:
        yield batch, batch


def main(argv=None):
    import argparse

    from moejax.experiment import _load_module

    ap = argparse.ArgumentParser(description="prepare a moejax dataset from raw text and code")
    ap.add_argument("--config", required=True, help="experiments/data/<name>.py with get_config()")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a complete dataset at --out")
    ap.add_argument(
        "--runner",
        choices=("local", "beam"),
        default="local",
        help="local: this machine's processes; beam: Apache Beam (pipeline options after --)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    beam_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = ap.parse_args(argv)
    if beam_args and args.runner != "beam":
        ap.error("Beam pipeline options after -- need --runner beam")
    try:
        cfg = _load_module(args.config, "data_config").get_config()
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        cfg["overwrite"] = args.overwrite or cfg.get("overwrite", False)
        if args.runner == "beam":
            from moejax.data import beam

            beam.run(cfg, args.out, beam_args)
        else:
            prepare(cfg, args.out)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
