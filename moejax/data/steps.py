"""The per-document work and the accounting that both preparation pipelines run: the
single-machine one (`moejax.data.prepare`) and the Apache Beam one (`moejax.data.beam`).

`_clean_chunk` runs the stages up to the deduplication decisions on a chunk of documents (in a
worker process or a Beam DoFn), `count_early` / `finish_document` account for one document before
and after deduplication, `Counters` holds the counts (mergeable), and `write_report` turns them into
report.md.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time

import numpy as np

from moejax.data import sources, stages

STAGE_ORDER = ("read", "normalize", "quality", "harmful", "exact_dedup", "near_dedup", "pii", "fim")


CHUNK = 128  # documents per task sent to a worker


class Counters:
    """Per stage: documents and bytes in / removed, removal reasons with examples. Mergeable
    (`merge`): the Beam pipeline fills one per bundle and adds them up; examples are the earliest
    by `key` (document order), so any merge order keeps what a sequential run keeps."""

    def __init__(self):
        self.docs_in = collections.Counter()
        self.bytes_in = collections.Counter()
        self.removed = collections.Counter()
        self.bytes_removed = collections.Counter()
        self.reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.keyed: dict[tuple[str, str], list] = collections.defaultdict(list)  # [(key, text)]
        self.changes = collections.Counter()  # transforms: e.g. pii replacements
        self.seconds = collections.Counter()  # per stage: seconds summed over the workers
        self.wall = collections.Counter()  # per phase: wall seconds
        self.cluster_sizes: list[int] = []
        self.split_docs = collections.Counter()  # cleaned documents per split
        self.kept_bytes = 0  # cleaned bytes of the documents every stage kept
        self._seq = 0

    def seen(self, stage: str, nbytes: int):
        self.docs_in[stage] += 1
        self.bytes_in[stage] += nbytes

    def remove(self, stage: str, reason: str, where: str, nbytes: int, text: str, key=None):
        self.removed[stage] += 1
        self.bytes_removed[stage] += nbytes
        self.reasons[stage][reason] += 1
        self._seq += 1
        ex = self.keyed[(stage, reason)]
        if len(ex) < 3 or key is not None:
            sources._keep_earliest(
                ex, [(self._seq if key is None else key, f"{where}: {text[:80]!r}")], 3
            )

    @property
    def examples(self) -> dict[tuple[str, str], list[str]]:
        return collections.defaultdict(
            list, {k: [e for _, e in ex] for k, ex in self.keyed.items()}
        )

    def merge(self, other: Counters) -> Counters:
        for name in ("docs_in", "bytes_in", "removed", "bytes_removed", "changes", "seconds"):
            getattr(self, name).update(getattr(other, name))
        self.wall.update(other.wall)
        self.split_docs.update(other.split_docs)
        for stage, r in other.reasons.items():
            self.reasons[stage].update(r)
        for k, ex in other.keyed.items():
            sources._keep_earliest(self.keyed[k], ex, 3)
        self.cluster_sizes = sorted(self.cluster_sizes + other.cluster_sizes, reverse=True)
        self.kept_bytes += other.kept_bytes
        return self


_WORKER: dict = {}


def _init_cleaner(st: dict, seed: int):
    _WORKER["st"] = st
    _WORKER["harmful"] = stages.HarmfulFilter(st["harmful_categories"], st["harmful_classifier"])
    _WORKER["hasher"] = (
        stages.MinHasher(st["num_perm"], st["shingle_size"], seed) if st["near_dedup"] else None
    )
    _WORKER["lsh"] = (
        stages.NearDedup(st["num_perm"], st["bands"], st["threshold"], st["shingle_size"], seed)
        if st["near_dedup"]
        else None
    )


def _clean_chunk(chunk: list[tuple[str, str]]):
    """Everything but the deduplication decisions, for (text, lang) pairs. Per document: (stage that
    removed it or None, reason, text, raw bytes, cleaned bytes, content hash, boilerplate lines
    dropped, PII replacements); plus the MinHash signatures and band keys of the survivors, and
    seconds per stage."""
    st, harmful, hasher = _WORKER["st"], _WORKER["harmful"], _WORKER["hasher"]
    secs = collections.Counter()
    tick = time.perf_counter
    t = tick()
    out = []
    for text, lang in chunk:
        raw = len(text.encode())
        if raw > st["max_document_bytes"]:  # before any stage touches it
            out.append(
                [
                    "normalize",
                    "larger than stages.max_document_bytes",
                    text[:200],
                    raw,
                    raw,
                    b"",
                    0,
                    0,
                ]
            )
            continue
        code = bool(lang)
        text = stages.normalize(text, st["normalization"], code)
        boiler = 0
        if not code and st["boilerplate_lines"]:
            text, boiler = stages.drop_boilerplate_lines(text)
        rec = [None, "", text, raw, len(text.encode()), b"", boiler, 0]
        if not text.strip():
            rec[:2] = "normalize", "empty after cleanup"
        out.append(rec)
    t = _lap(secs, "normalize", t)
    texts = [r[2] for r in out]
    words = stages.WordHashes(texts)  # shared by the quality statistics and both deduplications
    t = _lap(secs, "word hashes", t)
    prose = [k for k, r in enumerate(out) if r[0] is None and not chunk[k][1]]
    reasons = stages.quality_reasons(texts, words, st, prose)
    for k, r in enumerate(out):
        if r[0] is None:
            reason = reasons[k] if k in reasons else stages.code_reason(r[2], chunk[k][1], st)
            if reason:
                r[:2] = "quality", reason
    t = _lap(secs, "quality", t)
    for r in out:
        if r[0] is None:
            reason = harmful.reason(r[2])
            if reason:
                r[:2] = "harmful", reason
    t = _lap(secs, "harmful", t)
    keep = [k for k, r in enumerate(out) if r[0] is None]
    if st["exact_dedup"] and keep:
        hashes = stages.exact_hashes(words)
        for k in keep:
            out[k][5] = hashes[k]
        t = _lap(secs, "exact_dedup", t)
    sigs = None
    if hasher is not None and keep:
        sig = hasher.signatures(None, words)[keep]
        sigs = (sig, _WORKER["lsh"].band_keys(sig))
        t = _lap(secs, "near_dedup", t)
    if st["pii"]:
        # ASCII digit counts let scrub_pii skip the number patterns; non-ASCII text may hold other
        # digits
        digits = np.where(
            words.per_doc(stages.NON_ASCII_OR_FS) > 0, -1, words.per_doc(stages.DIGITS)
        ).tolist()
        for k in keep:
            out[k][2], out[k][7] = stages.scrub_pii(
                out[k][2], digits[k] if digits[k] >= 0 else None, region=st["pii_region"]
            )
        _lap(secs, "pii", t)
    return out, sigs, secs


def _lap(secs, stage: str, t0: float) -> float:
    now = time.perf_counter()
    secs[stage] += now - t0
    return now


def count_early(counters: Counters, where: str, result, key=None) -> bool:
    """Counts one document's passage through normalize, quality and harmful (a `_clean_chunk`
    result); True if it survived them."""
    stage, reason, text, raw, nbytes, _, boiler, _ = result
    counters.seen("normalize", raw)
    counters.changes["boilerplate lines dropped"] += boiler
    if stage == "normalize":
        counters.remove(stage, reason, where, raw, text, key)
        return False
    for s in ("quality", "harmful"):
        counters.seen(s, nbytes)
        if stage == s:
            counters.remove(s, reason, where, nbytes, text, key)
            return False
    return stage is None


def finish_document(
    text: str, where: str, lang: str, nbytes: int, npii: int, st: dict, counters: Counters, seed
) -> str:
    """The stages after deduplication for a kept document: PII counts (the text was scrubbed in
    `_clean_chunk`) and fill-in-the-middle on code, by a coin and a generator drawn from the
    document's path (so any worker draws the same)."""
    if st["pii"]:
        counters.seen("pii", nbytes)
        counters.changes["pii replacements"] += npii
    if lang and st["fim_rate"] and _hash_fraction("fim:" + where, seed) < st["fim_rate"]:
        h = int(hashlib.sha256(f"{seed}:fim:{where}".encode()).hexdigest()[:16], 16)
        text = stages.fim(text, np.random.default_rng(h), st["fim_spm_rate"])
        counters.changes["fim documents"] += 1
    return text


def split_of(where: str, seed: int, val_fraction: float) -> str:
    return "validation" if _hash_fraction(where, seed) < val_fraction else "train"


def check_config(cfg: dict) -> tuple[dict, dict]:
    """The stage settings (defaults filled in) and the tokenizer section of a data config; a wrong
    key or value is a ValueError naming it."""
    st = dict(stages.DEFAULTS, **cfg.get("stages", {}))
    unknown = set(cfg.get("stages", {})) - set(stages.DEFAULTS)
    if unknown:
        raise ValueError(
            f"stages.{sorted(unknown)[0]}: unknown key; known: {', '.join(sorted(stages.DEFAULTS))}"
        )
    bad = [
        r
        for r in str(st["pii_region"]).split(",")
        if r not in stages.phonenumbers.SUPPORTED_REGIONS
    ]
    if st["pii"] and bad:
        raise ValueError(
            f"stages.pii_region={st['pii_region']!r}: {bad[0]!r} is not a region phonenumbers "
            "knows; use two-letter country codes such as US or US,GB,DE"
        )
    tcfg = dict(cfg.get("tokenizer", {}))
    known_tok = {
        "vocab_size",
        "model_type",
        "sample_bytes",
        "user_symbols",
        "model",
        "hf",
        "bos",
        "eos",
        "pad",
    }
    if set(tcfg) - known_tok:
        raise ValueError(
            f"tokenizer.{sorted(set(tcfg) - known_tok)[0]}: unknown key; known: "
            f"{', '.join(sorted(known_tok))}"
        )
    if not cfg.get("sources"):
        raise ValueError("sources: the config names no sources")
    if "seq_len" not in cfg:
        raise ValueError("seq_len: the config sets no sequence length")
    return st, tcfg


def _hash_fraction(key: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _copies(weight: float, key: str, seed: int) -> int:
    """Mixture weight as whole copies plus a deterministic coin for the fraction."""
    whole = int(weight)
    return whole + (1 if _hash_fraction("w" + key, seed) < weight - whole else 0)


def _sample_lines(docs, budget: int, total_bytes: int | None, seed: int):
    """Lines of a deterministic pseudo-random share of the documents (by a hash of their path),
    about `budget` bytes in all, streamed."""
    share = 1.0 if not total_bytes else min(1.0, 1.2 * budget / total_bytes)
    for d in docs:
        if share < 1.0 and _hash_fraction("s" + d[1], seed) >= share:
            continue
        for line in d[0].splitlines():
            if line.strip():
                yield line
                budget -= len(line)
        if budget <= 0:
            return


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _counts_text(c: Counters, skips: sources.SkipLog) -> str:
    lines = [f"skipped inputs: {dict(skips.counts)}"]
    for s in STAGE_ORDER[1:]:
        if c.docs_in[s]:
            lines.append(f"{s}: {c.docs_in[s]} in, {c.removed[s]} removed {dict(c.reasons[s])}")
    return "\n".join(lines)


def write_report(
    path: str, c: Counters, skips: sources.SkipLog, splits: dict, seconds: float
) -> dict:
    """report.md with per-stage tables and plots (length histogram, duplicate clusters)."""
    # Figures without pyplot: switching the process's backend would stop a notebook that prepares
    # the corpus in-process from showing its own plots.
    from matplotlib.figure import Figure

    rows, summary = (
        [],
        {
            "skipped_inputs": dict(skips.counts),
            "stages": {},
            "changes": dict(c.changes),
            "seconds": {k: round(v, 2) for k, v in c.seconds.items()},
            "wall": {k: round(v, 2) for k, v in c.wall.items()},
        },
    )
    for s in STAGE_ORDER[1:]:
        if not c.docs_in[s]:
            continue
        kept_docs = c.docs_in[s] - c.removed[s]
        kept_bytes = c.bytes_in[s] - c.bytes_removed[s]
        summary["stages"][s] = {
            "docs_in": c.docs_in[s],
            "removed": c.removed[s],
            "bytes_in": c.bytes_in[s],
            "bytes_removed": c.bytes_removed[s],
            "reasons": dict(c.reasons[s]),
        }
        mbs = c.bytes_in[s] / 1e6 / c.seconds[s] if c.seconds[s] else float("inf")
        rows.append(
            f"| {s} | {c.docs_in[s]:,} | {kept_docs:,} | {c.removed[s]:,} | {c.bytes_in[s]:,} | "
            f"{kept_bytes:,} | {c.seconds[s]:.2f} | {mbs:.1f} |"
        )
    md = [
        "# Data preparation report",
        "",
        f"Built in {seconds:.1f} s.",
        "",
        "## Skipped inputs",
        "",
        "| reason | count | examples |",
        "| --- | --- | --- |",
    ]
    md += [
        f"| {r} | {n} | {'; '.join(skips.examples[r])} |" for r, n in skips.counts.most_common()
    ] or ["| none | 0 | |"]
    md += [
        "",
        "## Stages",
        "",
        "| stage | docs in | kept | removed | bytes in | bytes kept | seconds | MB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    md += rows
    md += [
        "",
        "Seconds are summed over the worker processes (MB/s: one worker's rate). Main process: "
        + ", ".join(f"{k} {c.seconds[k]:.1f} s" for k in ("read", "decisions"))
        + ". Wall time per phase: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in c.wall.items())
        + ".",
    ]
    md += [
        "",
        "## Top removal reasons",
        "",
        "| stage | reason | count | examples |",
        "| --- | --- | --- | --- |",
    ]
    for s in STAGE_ORDER[1:]:
        for r, n in c.reasons[s].most_common(10):
            ex = "; ".join(e.replace("|", "\\|") for e in c.examples[(s, r)])
            md.append(f"| {s} | {r} | {n} | {ex} |")
    md += ["", "## Transforms", ""] + [f"- {k}: {v}" for k, v in c.changes.items()]
    md += [
        "",
        "## Output",
        "",
        "| split | documents | tokens | rows |",
        "| --- | --- | --- | --- |",
    ]
    md += [
        f"| {s} | {v['documents']:,} | {v['tokens']:,} | {v['rows']:,} |" for s, v in splits.items()
    ]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    lengths = splits["train"]["lengths"]  # per document, or {length: documents}
    if isinstance(lengths, dict):
        values, weights = np.array(list(lengths), np.int64), np.array(list(lengths.values()))
    else:
        values, weights = np.unique(np.asarray(lengths, np.int64), return_counts=True)
    ax.hist(np.log10(np.maximum(values, 1)), bins=40, weights=weights)
    ax.set_xlabel("log10 tokens per document (train)")
    ax.set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "lengths.png"), dpi=100)
    md += ["", "![document lengths](lengths.png)"]
    clusters = c.cluster_sizes
    if clusters:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        ax.hist(clusters, bins=min(40, max(clusters)))
        ax.set_xlabel("near-duplicate cluster size")
        ax.set_ylabel("clusters")
        fig.tight_layout()
        fig.savefig(os.path.join(path, "duplicate_clusters.png"), dpi=100)
        md += [
            "",
            f"{len(clusters)} near-duplicate clusters, largest {clusters[0]} documents.",
            "",
            "![duplicate clusters](duplicate_clusters.png)",
        ]
    summary["near_duplicate_clusters"] = len(clusters)
    with open(os.path.join(path, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return summary


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]


def summary(tag: str, out: str, manifest: dict) -> str:
    """The line a finished preparation prints."""
    splits = ", ".join(
        f"{s} {c['tokens']:,} tokens in {c['rows']:,} rows"
        + (f" in {len(c['shards'])} shards" if "shards" in c else "")
        for s, c in manifest["splits"].items()
    )
    return f"[{tag}] {out}: {splits} ({manifest['seconds']} s)"
