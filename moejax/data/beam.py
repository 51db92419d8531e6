"""The data preparation pipeline on Apache Beam: the same config, stage code and output as
`moejax.data.prepare`, on any Beam runner (the local DirectRunner, Dataflow, Flink, Spark).

    python -m moejax.data.prepare --config experiments/data/example.py --out DIR --runner beam \\
        -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp ...

Nothing here reimplements a stage: the Beam transforms call the functions the single-machine path
calls (`steps._clean_chunk`, `steps.count_early`, `steps.finish_document`,
`stages.NearDedup.similar`, `packing.Packer`, ...). What changes is who holds the state:

1. clean: the input files are listed by the launcher (so every document has a key, (source, file,
   position), that orders it as the single-machine run reads it), then read, normalized, filtered,
   hashed and scrubbed in parallel. Exact duplicates are grouped on their content hash and the
   earliest of each group is kept. For near duplicates, documents are grouped on each of their LSH
   band keys; in every bucket the earliest document is the centre, and each other member paired
   with it is checked on the full MinHash signatures, which gives the verified edges.
2. components: the connected components of those edges, by alternating large-star and small-star
   rounds (Kiveris et al., "Connected Components in MapReduce and Beyond", 2014), computed in the
   pipeline. Each round's large-star step counts the nodes that are neither a star's centre nor its
   leaf; when none are left every component is a star around its earliest document. Beam has no
   loops, so a pipeline runs `CC_ROUNDS` rounds and the launcher starts another one on its output
   until that count is zero (usually the first one suffices).
3. finish: documents that are a leaf of a star are near duplicates; the rest go through the stages
   after deduplication, get their split, and a sample of the training text is gathered by the
   pipeline onto one worker, which trains the sentencepiece tokenizer.
4. tokenize and pack: documents are tokenized in parallel, grouped into shards (about
   `SHARD_BYTES` of text each), and each shard is packed in document order into one ArrayRecord
   file.
Then the launcher writes report.md and the manifest (last). A local output is built in
`.<name>.beam-building` and renamed; a remote one (gs://...) is complete when its manifest exists.

Counts (per stage, skipped inputs with their earliest examples) are `steps.Counters` and
`sources.SkipLog` objects filled per bundle and merged by a CombineFn, so the report reads the same
as the single-machine one. The kept documents, the counts and the examples are the same as
`prepare.prepare` gives for the same config and the same input paths (tests/test_prepare_beam.py);
the rows differ, because documents are spread over shards by a hash of their key.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import typing
import uuid

import numpy as np

from moejax.data import layout, sources, stages, steps
from moejax.data import tokenizer as tokenizers
from moejax.data.packing import Packer, write_rows

CC_ROUNDS = 6  # large-star + small-star rounds per components pipeline
SHARD_BYTES = 256 << 20  # text per output shard
TMP = "tmp"  # in the build directory: what the pipelines hand each other
# Runners whose workers share the launcher's filesystem (local paths are fine)
LOCAL_RUNNERS = ("Direct", "Prism", "FnApi", "Interactive")


def _beam():
    try:
        import apache_beam
    except ImportError:
        raise ValueError(
            "--runner beam needs Apache Beam: pip install 'moejax[beam]' (the single-machine "
            "path, --runner local, does not)"
        ) from None
    return apache_beam


class Doc(typing.NamedTuple):
    """A document between the stages."""

    key: tuple  # (source, file, position): the single-machine reading order
    text: str
    where: str
    lang: str
    source: int
    nbytes: int = 0  # cleaned bytes
    npii: int = 0  # PII replacements made
    sig: np.ndarray | None = None  # MinHash signature
    bands: tuple = ()  # LSH band keys


# ----------------------------------------------------------------------------------- file access


class BeamFiles:
    """`sources.LocalFiles` over Beam's FileSystems (local paths, gs://, s3://, hdfs://...).

    Files are opened uncompressed and decompressed by `sources.decompressed`, the reader the
    single-machine path uses: Beam's own decompressing reader returns what it can of a truncated
    gzip stream, where ours reports it (and skips the file), and its text sources split files into
    lines where a document is a whole file."""

    @staticmethod
    def _meta(path):
        from apache_beam.io.filesystems import FileSystems

        try:
            found = FileSystems.match([path])[0].metadata_list
        except Exception:
            return None
        return next((m for m in found if m.path == path), None)

    @classmethod
    def isfile(cls, path: str) -> bool:
        if "://" not in path:
            return os.path.isfile(path)
        return cls._meta(path) is not None

    @classmethod
    def size(cls, path: str) -> int:
        if "://" not in path:
            return os.path.getsize(path)
        return cls._meta(path).size_in_bytes

    @staticmethod
    def open(path: str):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        return sources.decompressed(
            path, FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        )


def _list_files(src: dict, skips: sources.SkipLog) -> list[str]:
    """A source's files, as `sources.files` lists local ones; remote paths (scheme://) through
    Beam's FileSystems.match (a directory means everything under it)."""
    if "://" not in src["path"]:
        return sources.files(src, skips)
    from apache_beam.io.filesystems import FileSystems

    unknown = set(src) - set(sources.SOURCE_KEYS)
    if unknown:
        raise ValueError(
            f"sources[{src.get('name', '?')}].{sorted(unknown)[0]}: unknown key; "
            f"known: {', '.join(sources.SOURCE_KEYS)}"
        )
    pattern = src["path"]

    def match(pat):
        try:
            return sorted(m.path for m in FileSystems.match([pat])[0].metadata_list)
        except Exception:  # BeamIOError: nothing matched, or the bucket cannot be listed
            return []

    found = match(pattern)
    if not found and not any(c in pattern for c in "*?["):  # a directory: everything under it,
        root = pattern.rstrip("/") + "/"  # in the order os.walk gives a local one (a folder's
        found = sorted(  # files, then its subfolders')
            match(root + "**"),
            key=lambda f: (
                [(1, d) for d in f[len(root) :].split("/")[:-1]] + [(0, f.rsplit("/", 1)[-1])]
            ),
        )
    if not found:
        skips.add("missing path", src["path"])
    exclude = list(src.get("exclude", ()))
    found = [p for p in found if not (exclude and sources._excluded(p, exclude))]
    return found[: src["max_files"]] if src.get("max_files") else found


# ------------------------------------------------------------------------------- counting


class Stats:
    """What the pipelines count: stage counters, skipped inputs, split statistics."""

    def __init__(self):
        self.counters = steps.Counters()
        self.skips = sources.SkipLog()
        self.splits: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.lengths: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.shards: dict[str, list[str]] = collections.defaultdict(list)
        self.violations = 0  # components: nodes neither a star's centre nor its leaf
        self.promote: tuple | None = None  # (hash fraction, key, where) of the first train doc

    def merge(self, other: Stats) -> Stats:
        self.counters.merge(other.counters)
        self.skips.merge(other.skips)
        for s, c in other.splits.items():
            self.splits[s].update(c)
        for s, c in other.lengths.items():
            self.lengths[s].update(c)
        for s, names in other.shards.items():
            self.shards[s] = sorted(self.shards[s] + names)
        self.violations += other.violations
        if other.promote is not None and (self.promote is None or other.promote < self.promote):
            self.promote = other.promote
        return self


def _merge_stats():
    beam = _beam()

    class MergeStats(beam.CombineFn):
        def create_accumulator(self):
            return Stats()

        def add_input(self, acc, s):
            return acc.merge(s)

        def merge_accumulators(self, accs):
            accs = iter(accs)
            out = next(accs)
            for a in accs:
                out.merge(a)
            return out

        def extract_output(self, acc):
            return acc

    return MergeStats()


def _save_stats(stats, path: str):
    """A pipeline's merged counts, written where the launcher reads them."""
    beam = _beam()

    def write(s):
        _write_bytes(path, pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))

    return (
        stats
        | "merge counts" >> beam.CombineGlobally(_merge_stats())
        | "write counts" >> beam.Map(write)
    )


# ----------------------------------------------------------------------------------- helpers


def _write_bytes(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # two attempts at one bundle may run at once
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def _delete_tree(path: str) -> None:
    """Removes a directory and everything under it (on object stores: every object under the
    prefix, which FileSystems.delete does only for a path ending in /)."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    prefix = path.rstrip("/") + "/"
    if FileSystems.match([prefix + "**"])[0].metadata_list:
        FileSystems.delete([prefix])


def _read_bytes(path: str) -> bytes:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _join(*parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(*parts)


def _coder():
    beam = _beam()

    class PickleLines(beam.coders.Coder):
        """Any picklable value as one base64 line of a text file: how the pipelines hand
        documents and edges to each other through Beam's own sharded, retry-safe text IO."""

        def encode(self, value):
            return base64.b64encode(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

        def decode(self, encoded):
            return pickle.loads(base64.b64decode(encoded))

        def is_deterministic(self):
            return False

    return PickleLines()


def _write(pcoll, prefix: str, label: str):
    beam = _beam()
    return pcoll | label >> beam.io.WriteToText(prefix, file_name_suffix=".b64", coder=_coder())


def _read(p, prefix: str, label: str):
    """What `_write` wrote (nothing if it wrote no file)."""
    beam = _beam()
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.match([prefix + "*.b64"])[0].metadata_list:
        return p | label >> beam.Create([])
    return p | label >> beam.io.ReadFromText(prefix + "*.b64", coder=_coder())


def _fraction(key, seed: int, salt: str) -> float:
    return steps._hash_fraction(f"{salt}:{key}", seed)


# ------------------------------------------------------------------------------- pipelines


def _counting():
    """A DoFn base that gathers one `Stats` per bundle (`self.stats`) and emits it, tagged
    "stats", when the bundle ends."""
    beam = _beam()
    from apache_beam.transforms.window import GlobalWindows

    class Counting(beam.DoFn):
        def start_bundle(self):
            self.stats = Stats()

        def finish_bundle(self):
            yield beam.pvalue.TaggedOutput("stats", GlobalWindows.windowed_value(self.stats))

    return Counting


def _clean_pipeline(p, cfg: dict, st: dict, files: list, tmp: str, seed: int) -> None:
    beam = _beam()
    Counting = _counting()
    sources_cfg = cfg["sources"]

    class ReadFile(Counting):
        def process(self, item):
            si, fi, path = item
            skips = sources.SkipLog()
            docs = sources.file_documents(sources_cfg[si], path, skips, fs=BeamFiles)
            for j, d in enumerate(docs):
                yield Doc((si, fi, j), d.text, d.path, d.lang, si)
            self.stats.skips.merge(skips.rekey((si, fi)))

    class Clean(Counting):
        def setup(self):
            steps._init_cleaner(st, seed)

        def process(self, batch):
            results, sigs, secs = steps._clean_chunk([(d.text, d.lang) for d in batch])
            c = self.stats.counters
            c.seconds.update(secs)
            k = 0
            for d, res in zip(batch, results):
                if not steps.count_early(c, d.where, res, d.key):
                    continue
                sig, bands = (sigs[0][k], tuple(sigs[1][k])) if sigs is not None else (None, ())
                k += 1
                doc = d._replace(text=res[2], nbytes=res[4], npii=res[7], sig=sig, bands=bands)
                yield res[5], doc

    class KeepEarliest(Counting):
        """Exact deduplication: of the documents with one content hash, the earliest."""

        def process(self, item):
            docs = sorted(item[1], key=lambda d: d.key)
            c = self.stats.counters
            for d in docs:
                c.seen("exact_dedup", d.nbytes)
            for d in docs[1:]:
                c.remove("exact_dedup", "exact duplicate", d.where, d.nbytes, d.text, d.key)
            yield docs[0]

    read = (
        p
        | "files" >> beam.Create(files)
        | "spread files" >> beam.Reshuffle()
        | "read" >> beam.ParDo(ReadFile()).with_outputs("stats", main="docs")
    )
    cleaned = (
        read.docs
        | "spread documents" >> beam.Reshuffle()  # a few large files: still every worker cleans
        | "batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=steps.CHUNK)
        | "clean" >> beam.ParDo(Clean()).with_outputs("stats", main="docs")
    )
    stats = [read.stats, cleaned.stats]
    kept = cleaned.docs | "drop hashes" >> beam.Map(lambda kv: kv[1])
    if st["exact_dedup"]:
        exact = (
            cleaned.docs
            | "group on content hash" >> beam.GroupByKey()
            | "keep earliest" >> beam.ParDo(KeepEarliest()).with_outputs("stats", main="docs")
        )
        kept, stats = exact.docs, stats + [exact.stats]
    if st["near_dedup"]:
        near = stages.NearDedup(st["num_perm"], st["bands"], st["threshold"], st["shingle_size"])

        class Seen(Counting):
            def process(self, d):
                self.stats.counters.seen("near_dedup", d.nbytes)
                return ()

        def centre_pairs(item):
            keys = set(item[1])
            c = min(keys)
            return [(c, k) for k in keys if k != c]

        def to_candidates(item):
            centre, g = item
            for sig in g["sig"]:
                for other in g["pair"]:
                    yield other, (centre, sig)

        def verify(item):
            key, g = item
            for sig in g["sig"]:
                for centre, centre_sig in g["cand"]:
                    if near.similar(centre_sig, sig):
                        yield centre, key

        sigs = kept | "signatures" >> beam.Map(lambda d: (d.key, d.sig))
        pairs = (
            kept
            | "band keys" >> beam.FlatMap(lambda d: [(b, d.key) for b in d.bands])
            | "group on band key" >> beam.GroupByKey()
            | "centre pairs" >> beam.FlatMap(centre_pairs)
            | "distinct pairs" >> beam.Distinct()
        )
        cand = (
            {"sig": sigs, "pair": pairs}
            | "join centre signature" >> beam.CoGroupByKey()
            | "candidates" >> beam.FlatMap(to_candidates)
        )
        edges = (
            {"sig": sigs, "cand": cand}
            | "join member signature" >> beam.CoGroupByKey()
            | "verify" >> beam.FlatMap(verify)
        )
        _write(edges, _join(tmp, "edges-0", "part"), "write edges")
        stats.append(
            (kept | "count near_dedup" >> beam.ParDo(Seen()).with_outputs("stats", main="_")).stats
        )
    _write(
        kept | "drop signatures" >> beam.Map(lambda d: d._replace(sig=None, bands=())),
        _join(tmp, "docs", "part"),
        "write documents",
    )
    _save_stats(stats | "all counts" >> beam.Flatten(), _join(tmp, "stats-clean.pkl"))


def _components_pipeline(p, src: str, dst: str, stats_path: str, rounds: int) -> None:
    """`rounds` of large-star then small-star over the edges at `src` (pairs (a, b), a < b),
    then a large-star that counts the nodes that are neither a centre nor a leaf of a star."""
    beam = _beam()

    def large_star(item):
        u, nbrs = item
        n = set(nbrs)
        n.discard(u)
        m = min(n | {u})
        centre = all(v > u for v in n)
        leaf = len(n) == 1 and m < u
        if not (centre or leaf):
            yield beam.pvalue.TaggedOutput("violations", 1)
        for v in n:
            if v > u:
                yield m, v

    def small_star(item):
        u, smaller = item
        n = set(smaller) | {u}
        m = min(n)
        return [(m, v) for v in n if v != m]

    def both_ways(e):
        return [e, (e[1], e[0])]

    edges = _read(p, src, "read edges")
    for r in range(rounds + 1):
        ls = (
            edges
            | f"large-star {r}: both ways" >> beam.FlatMap(both_ways)
            | f"large-star {r}: group" >> beam.GroupByKey()
            | f"large-star {r}" >> beam.FlatMap(large_star).with_outputs("violations", main="e")
        )
        edges = ls.e
        if r == rounds:
            break
        edges = (
            edges
            | f"small-star {r}: by larger end" >> beam.Map(lambda e: (e[1], e[0]))
            | f"small-star {r}: group" >> beam.GroupByKey()
            | f"small-star {r}" >> beam.FlatMap(small_star)
        )

    def as_stats(n):
        s = Stats()
        s.violations = n
        return s

    _write(edges, dst, "write edges")
    _save_stats(
        ls.violations
        | "count violations" >> beam.CombineGlobally(sum)
        | "as stats" >> beam.Map(as_stats),
        stats_path,
    )


class Final(typing.NamedTuple):
    key: tuple
    text: str
    where: str
    split: str
    source: int
    nbytes: int


def _finish_pipeline(
    p,
    cfg: dict,
    st: dict,
    tcfg: dict,
    tmp: str,
    edges: str | None,
    tok_path: str | None,
    seed: int,
) -> None:
    """Near-duplicate decisions, the later stages, splits; trains the tokenizer into `tok_path`
    (None: the config names one)."""
    beam = _beam()
    Counting = _counting()
    val_fraction = cfg.get("val_fraction", 0.01)
    weights = [float(x.get("weight", 1.0)) for x in cfg["sources"]]

    class Decide(Counting):
        def process(self, item):
            key, g = item
            dup = bool(list(g["dup"]))
            c = self.stats.counters
            for d in g["doc"]:
                if dup:
                    c.remove("near_dedup", "near duplicate", d.where, d.nbytes, d.text, d.key)
                    continue
                text = steps.finish_document(d.text, d.where, d.lang, d.nbytes, d.npii, st, c, seed)
                c.kept_bytes += d.nbytes
                split = steps.split_of(d.where, seed, val_fraction)
                c.split_docs[split] += 1
                copies = weights[d.source] if split == "train" else 1  # shards: bytes to pack
                self.stats.splits[split]["bytes"] += int(len(text.encode()) * copies)
                yield Final(d.key, text, d.where, split, d.source, d.nbytes)

    docs = _read(p, _join(tmp, "docs", "part"), "read documents") | "key documents" >> beam.Map(
        lambda d: (d.key, d)
    )
    stats = []
    if edges is not None:
        star = _read(p, edges, "read stars")
        leaves = star | "leaves" >> beam.Map(lambda e: (e[1], None))

        def cluster_stats(sizes):
            s = Stats()
            s.counters.cluster_sizes = sorted(sizes, reverse=True)
            return s

        stats.append(
            star
            | "centres" >> beam.Map(lambda e: (e[0], 1))
            | "cluster sizes" >> beam.CombinePerKey(sum)
            | "sizes" >> beam.Map(lambda kv: kv[1] + 1)
            | "all sizes" >> beam.combiners.ToList()
            | "size stats" >> beam.Map(cluster_stats)
        )
    else:
        leaves = p | "no stars" >> beam.Create([])
    decided = (
        {"doc": docs, "dup": leaves}
        | "join duplicates" >> beam.CoGroupByKey()
        | "decide" >> beam.ParDo(Decide()).with_outputs("stats", main="docs")
    )
    final = decided.docs
    stats.append(decided.stats)
    _write(final, _join(tmp, "final", "part"), "write final documents")

    def first_validation(f):  # the train document promoted when the fraction draws none
        s = Stats()
        s.promote = (steps._hash_fraction(f.where, seed), f.key, f.where)
        return s

    train = final | "train documents" >> beam.Filter(lambda f: f.split == "train")
    stats.append(
        train
        | "promotion keys" >> beam.Map(lambda f: (steps._hash_fraction(f.where, seed), f))
        | "smallest" >> beam.combiners.Top.Smallest(1, key=lambda kv: (kv[0], kv[1].key))
        | "promotion" >> beam.FlatMap(lambda top: [first_validation(kv[1]) for kv in top])
    )
    if tok_path is not None:
        budget = tcfg.get("sample_bytes", 20_000_000)
        total = final | "kept bytes" >> beam.Map(lambda f: f.nbytes) | beam.CombineGlobally(sum)

        def in_sample(f, total):
            share = 1.0 if not total else min(1.0, 1.2 * budget / total)
            return share >= 1.0 or steps._hash_fraction("s" + f.where, seed) < share

        def train_tokenizer(item):
            docs = sorted(item[1], key=lambda d: d[2])
            with tempfile.TemporaryDirectory() as d:
                f = os.path.join(d, layout.TOKENIZER)
                tokenizers.train_sentencepiece(
                    steps._sample_lines(docs, budget, None, seed),
                    f,
                    tcfg.get("vocab_size", 8192),
                    tcfg.get("model_type", "bpe"),
                    user_symbols=tuple(tcfg.get("user_symbols", ()))
                    + (stages.FIM_TOKENS if st["fim_rate"] else ()),
                    num_threads=max(1, int(cfg.get("workers", 1))),
                )
                with open(f, "rb") as fh:
                    _write_bytes(tok_path, fh.read())

        _ = (
            train
            | "sample" >> beam.Filter(in_sample, beam.pvalue.AsSingleton(total))
            | "to one worker" >> beam.Map(lambda f: (None, (f.text, f.where, f.key)))
            | "gather sample" >> beam.GroupByKey()
            | "train tokenizer" >> beam.Map(train_tokenizer)
        )
    _save_stats(stats | "all counts" >> beam.Flatten(), _join(tmp, "stats-finish.pkl"))


def _pack_pipeline(
    p,
    cfg: dict,
    tmp: str,
    build: str,
    tok_file: str,
    special: dict,
    promoted: str,
    shards: dict[str, int],
    seed: int,
) -> None:
    """Tokenizes in parallel, groups the documents into shards, packs each shard in document
    order into one ArrayRecord file in `build`."""
    beam = _beam()
    Counting = _counting()
    weights = [float(s.get("weight", 1.0)) for s in cfg["sources"]]
    seq_len = cfg["seq_len"]
    tok = _load_tokenizer(tok_file, special)
    bos, eos = tok.bos_id, tok.eos_id
    del tok

    def copies(f):
        split = "validation" if f.where == promoted else f.split
        n = steps._copies(weights[f.source], f.where, seed) if split == "train" else 1
        return [(split, f.key, c, f.text) for c in range(n)]

    class Tokenize(beam.DoFn):
        def setup(self):
            self.tok = _load_tokenizer(tok_file, special)

        def process(self, batch):
            enc = self.tok.encode_batch([b[3] for b in batch])
            for (split, key, c, text), ids in zip(batch, enc):
                shard = int(_fraction(key, seed, "shard") * shards[split]) % shards[split]
                yield (split, shard), (key, c, np.asarray(ids, np.int32), len(text.encode()))

    class Pack(Counting):
        def process(self, item):
            (split, shard), docs = item
            docs = sorted(docs, key=lambda x: (x[0], x[1]))
            name = f"{split}-{shard:05d}-of-{shards[split]:05d}.arrayrecord"
            stats = self.stats.splits[split]
            lengths = self.stats.lengths[split]
            packer = Packer(seq_len, bos, eos)

            def rows():
                for chunk in _batched(docs, 512):
                    ids = [x[2] for x in chunk]
                    lens = np.fromiter(map(len, ids), np.int64, len(ids))
                    stats["documents"] += len(chunk)
                    stats["bytes"] += sum(x[3] for x in chunk)
                    stats["tokens"] += int(lens.sum()) + 2 * len(lens)
                    lengths.update(lens.tolist())
                    yield from packer.add(np.concatenate(ids), lens)
                yield from packer.finish()

            stats["rows"] += _write_shard(build, name, rows())
            self.stats.shards[split].append(name)

    packed = (
        _read(p, _join(tmp, "final", "part"), "read final documents")
        | "copies" >> beam.FlatMap(copies)
        | "batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=512)
        | "tokenize" >> beam.ParDo(Tokenize())
        | "group shards" >> beam.GroupByKey()
        | "pack" >> beam.ParDo(Pack()).with_outputs("stats", main="_")
    )
    _save_stats(packed.stats, _join(tmp, "stats-pack.pkl"))


def _load_tokenizer(path: str, special: dict):
    """A tokenizer file on any Beam filesystem, loaded (into memory: its local copy is removed)."""
    with tempfile.TemporaryDirectory() as d:
        local_copy = os.path.join(d, os.path.basename(path))
        with open(local_copy, "wb") as fh:
            fh.write(_read_bytes(path))
        return tokenizers.load(local_copy, special)


def _write_shard(build: str, name: str, rows) -> int:
    """Packed rows as the ArrayRecord file build/name (written locally, then copied through
    FileSystems); returns the row count."""
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, name)
        n = write_rows(f, rows)
        with open(f, "rb") as fh:
            _write_bytes(_join(build, name), fh.read())
    return n


def _batched(items, n: int):
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# ---------------------------------------------------------------------------------- launcher


def pipeline_options(beam_args: list[str], workers: int):
    """Beam's options from the arguments after `--`, checked before any work: an option no Beam
    runner knows, a runner Beam does not know, or a setting the runner requires and lacks is a
    ValueError naming it. Without --runner, the local DirectRunner with `workers` processes."""
    _beam()
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners import create_runner

    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=DirectRunner")
        if workers > 1 and not any(a.startswith("--direct_num_workers") for a in args):
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    opts = PipelineOptions(args)
    known = opts.get_all_options(retain_unknown_options=False)
    unknown = sorted(set(opts.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise ValueError(f"Beam option --{unknown[0]}: not an option of Beam or its runners")
    name = opts.view_as(StandardOptions).runner
    if name in ("DirectRunner", None):  # its worker processes log routine warnings per bundle
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.ERROR
        )
    try:
        runner = create_runner(name)
    except ValueError as e:
        raise ValueError(f"Beam option --runner={name}: {e}") from None
    errors = PipelineOptionsValidator(opts, runner).validate()
    if errors:
        raise ValueError(f"Beam options for {name}: {' '.join(errors)}")
    return opts


def _stats(path: str) -> Stats:
    return pickle.loads(_read_bytes(path))


def _run(opts, build_fn, label: str, quiet: bool) -> float:
    beam = _beam()
    t = time.time()
    p = beam.Pipeline(options=opts)
    build_fn(p)
    result = p.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise RuntimeError(f"the {label} pipeline ended {state}")
    if not quiet:
        print(f"[prepare:beam] {label}: {time.time() - t:.1f} s")
    return time.time() - t


def run(cfg: dict, out: str, beam_args: list[str] = (), quiet: bool = False) -> dict:
    """Runs the pipeline for a data config on Beam; returns the manifest (as `prepare.prepare`)."""
    _beam()
    from apache_beam.io.filesystems import FileSystems

    st, tcfg = steps.check_config(cfg)
    seed, seq_len = cfg.get("seed", 0), cfg["seq_len"]
    workers = max(1, int(cfg.get("workers", 1)))
    opts = pipeline_options(list(beam_args), workers)
    remote = "://" in out
    runner = opts.get_all_options()["runner"] or "DirectRunner"
    if not any(k in runner for k in LOCAL_RUNNERS):  # workers on other machines
        local_paths = [("--out", out)] + [
            (f"sources[{x['name']}].path", x["path"]) for x in cfg["sources"]
        ]
        for what, path in local_paths:
            if "://" not in path:
                raise ValueError(
                    f"{what}={path}: a local path, but {runner} runs on other machines; use a path "
                    "they can reach (gs://, s3://, hdfs://)"
                )
    if not remote:
        out = os.path.abspath(out)
    if FileSystems.exists(_join(out, layout.MANIFEST)) and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"{out} is already a complete dataset (set overwrite=True to rebuild it)"
        )
    if remote:  # no directory rename on object stores: the manifest, written last, marks it
        build = out.rstrip("/")
    else:
        parent = os.path.dirname(out)
        build = os.path.join(parent, f".{os.path.basename(out)}.beam-building")
    probe = _join(build, "probe")
    try:
        if not remote:
            os.makedirs(parent, exist_ok=True)
        if remote and FileSystems.exists(_join(build, layout.MANIFEST)):  # overwrite: first of all,
            FileSystems.delete([_join(build, layout.MANIFEST)])  # it no longer looks complete
        _delete_tree(build)
        _write_bytes(probe, b"")
        FileSystems.delete([probe])
    except Exception as e:
        raise ValueError(f"--out {out}: cannot write there ({type(e).__name__}: {e})") from None
    tmp = _join(build, TMP, uuid.uuid4().hex)  # this run's own: nothing stale is read back
    t0 = time.time()

    skips = sources.SkipLog()
    files, inputs = [], {}
    for si, src in enumerate(cfg["sources"]):
        s = sources.SkipLog()
        fs = _list_files(src, s)
        skips.merge(s.rekey((si, -1)))
        files += [(si, fi, f) for fi, f in enumerate(fs)]
        inputs[src["name"]] = {
            "path": src["path"],
            "files": len(fs),
            "weight": float(src.get("weight", 1.0)),
            "sha256": {  # remote inputs: named in full, not hashed (the launcher would read them)
                (f if remote or "://" in f else os.path.relpath(f, os.path.dirname(out))): (
                    steps._file_hash(f) if "://" not in f else ""
                )
                for f in fs[:1000]
            },
        }
    wall = {}
    wall["clean"] = _run(
        opts, lambda p: _clean_pipeline(p, cfg, st, files, tmp, seed), "clean", quiet
    )
    total = _stats(_join(tmp, "stats-clean.pkl"))
    total.skips = skips.merge(total.skips)

    edges = None
    if st["near_dedup"]:
        t = time.time()
        for r in itertools.count():
            src, dst = _join(tmp, f"edges-{r}", "part"), _join(tmp, f"edges-{r + 1}", "part")
            stats_path = _join(tmp, f"stats-cc-{r}.pkl")
            _run(
                opts,
                lambda p, a=src, b=dst, c=stats_path: _components_pipeline(p, a, b, c, CC_ROUNDS),
                f"components {r}",
                quiet,
            )
            if _stats(stats_path).violations == 0:
                edges = dst
                break
        wall["components"] = time.time() - t

    tok_file = _join(build, layout.HF_TOKENIZER if tcfg.get("hf") else layout.TOKENIZER)
    train_tok = not (tcfg.get("hf") or tcfg.get("model"))
    if not train_tok:
        with open(os.path.expanduser(tcfg.get("hf") or tcfg.get("model")), "rb") as f:
            _write_bytes(tok_file, f.read())
    wall["finish"] = _run(
        opts,
        lambda p: _finish_pipeline(
            p, cfg, st, tcfg, tmp, edges, tok_file if train_tok else None, seed
        ),
        "decide, split, tokenizer",
        quiet,
    )
    fin = _stats(_join(tmp, "stats-finish.pkl"))
    total.merge(fin)
    c = total.counters
    if not c.split_docs["train"] or not FileSystems.exists(tok_file):
        raise ValueError(
            "no training documents survived the stages; see the counts:\n"
            + steps._counts_text(c, total.skips)
        )
    promoted = ""
    if cfg.get("val_fraction", 0.01) > 0 and not c.split_docs["validation"]:
        if c.split_docs["train"] > 1:
            promoted = fin.promote[2]
    bytes_of = {s: total.splits[s]["bytes"] for s in layout.SPLITS}
    shards = {s: max(1, -(-bytes_of[s] // SHARD_BYTES)) for s in layout.SPLITS}
    special = {k: tcfg[k] for k in ("bos", "eos", "pad") if tcfg.get(k)}
    wall["tokenize + pack"] = _run(
        opts,
        lambda p: _pack_pipeline(p, cfg, tmp, build, tok_file, special, promoted, shards, seed),
        "tokenize and pack",
        quiet,
    )
    packed = _stats(_join(tmp, "stats-pack.pkl"))
    splits = {}
    for s in layout.SPLITS:
        names = packed.shards.get(s, [])
        if not names:  # a split without documents: one empty shard, as the local path writes
            names = [f"{s}-00000-of-00001.arrayrecord"]
            _write_shard(build, names[0], [])
        st_s = packed.splits.get(s, collections.Counter())
        splits[s] = {
            "documents": st_s["documents"],
            "tokens": st_s["tokens"],
            "rows": st_s["rows"],
            "bytes": st_s["bytes"],
            "lengths": dict(packed.lengths.get(s, {})),
            "shards": names,
        }
    c.wall.update(wall)
    with tempfile.TemporaryDirectory() as d:
        report = steps.write_report(d, c, total.skips, splits, time.time() - t0)
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as fh:
                _write_bytes(_join(build, name), fh.read())
    vocab_size = _load_tokenizer(tok_file, special).vocab_size
    manifest = {
        "name": cfg.get("name", os.path.basename(out.rstrip("/"))),
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "splits": {s: {k: v for k, v in x.items() if k != "lengths"} for s, x in splits.items()},
        "sources": inputs,
        "config": steps._jsonable(cfg),
        "stages": steps._jsonable(st),
        "special_tokens": special,
        "counts": report,
        "seconds": round(time.time() - t0, 1),
        "runner": opts.get_all_options()["runner"] or "DirectRunner",
    }
    _delete_tree(_join(build, TMP))
    _write_bytes(
        _join(build, layout.MANIFEST), json.dumps(manifest, indent=2).encode()
    )  # last: marks the directory complete
    if not remote:
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(build, out)
    if not quiet:
        print(steps.summary("prepare:beam", out, manifest))
    return manifest
