"""Prepare a dataset from raw text and code: read, normalize, deduplicate, filter, scrub, tokenize, pack.

    python -m moejax.data.prepare --config experiments/data/example.py --out DIR

The output directory has the layout training reads (`data.source=DIR`; see moejax.data.dataset):
ArrayRecord shards per split, the tokenizer, manifest.json (sources, input hashes, counts, the config)
and report.md with plots. It is built in a temporary sibling directory and renamed into place only when
every shard and the manifest are written, so an interrupted run leaves nothing that looks complete; a
rerun starts over cleanly (and removes the leftover).
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from moejax.data import dataset, sources, stages
from moejax.data.packing import pack, write_rows
from moejax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

STAGE_ORDER = ("read", "normalize", "quality", "harmful", "exact_dedup", "near_dedup", "pii", "fim")


class Counters:
    """Per stage: documents and bytes in / removed, removal reasons with examples."""

    def __init__(self):
        self.docs_in = collections.Counter()
        self.bytes_in = collections.Counter()
        self.removed = collections.Counter()
        self.bytes_removed = collections.Counter()
        self.reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        self.changes = collections.Counter()  # transforms: e.g. pii replacements
        self.seconds = collections.Counter()  # wall time per stage

    def seen(self, stage, doc):
        self.docs_in[stage] += 1
        self.bytes_in[stage] += len(doc.text.encode())

    def remove(self, stage, reason, doc):
        self.removed[stage] += 1
        self.bytes_removed[stage] += len(doc.text.encode())
        self.reasons[stage][reason] += 1
        if len(self.examples[(stage, reason)]) < 3:
            self.examples[(stage, reason)].append(f"{doc.path}: {doc.text[:80]!r}")


def clean(docs, st: dict, counters: Counters, seed: int):
    """The stages in order; yields the documents that survive, transformed."""
    harmful = stages.HarmfulFilter(st["harmful_categories"], st["harmful_classifier"])
    exact: set[bytes] = set()
    near = stages.NearDedup(st["num_perm"], st["bands"], st["threshold"], st["shingle_size"], seed) \
        if st["near_dedup"] else None
    rng = np.random.default_rng(seed)
    tick = time.perf_counter
    docs = iter(docs)
    while True:
        t = tick()
        doc = next(docs, None)
        counters.seconds["read"] += tick() - t
        if doc is None:
            break
        code = bool(doc.lang)
        t = tick()
        counters.seen("normalize", doc)
        doc.text = stages.normalize(doc.text, st["normalization"], code)
        if not code and st["boilerplate_lines"]:
            doc.text, n = stages.drop_boilerplate_lines(doc.text)
            counters.changes["boilerplate lines dropped"] += n
        t = _lap(counters, "normalize", t)
        if not doc.text.strip():
            counters.remove("normalize", "empty after cleanup", doc)
            continue
        counters.seen("quality", doc)
        reason = stages.code_reason(doc.text, doc.lang, st) if code else stages.quality_reason(doc.text, st)
        t = _lap(counters, "quality", t)
        if reason:
            counters.remove("quality", reason, doc)
            continue
        counters.seen("harmful", doc)
        reason = harmful.reason(doc.text)
        t = _lap(counters, "harmful", t)
        if reason:
            counters.remove("harmful", reason, doc)
            continue
        if st["exact_dedup"]:
            counters.seen("exact_dedup", doc)
            h = stages.content_hash(doc.text)
            dup = h in exact
            exact.add(h)
            t = _lap(counters, "exact_dedup", t)
            if dup:
                counters.remove("exact_dedup", "exact duplicate", doc)
                continue
        if near is not None:
            counters.seen("near_dedup", doc)
            dup = near.add(doc.text) is not None
            t = _lap(counters, "near_dedup", t)
            if dup:
                counters.remove("near_dedup", "near duplicate", doc)
                continue
        if st["pii"]:
            counters.seen("pii", doc)
            doc.text, n = stages.scrub_pii(doc.text)
            counters.changes["pii replacements"] += n
            t = _lap(counters, "pii", t)
        if code and st["fim_rate"] and rng.random() < st["fim_rate"]:
            doc.text = stages.fim(doc.text, rng, st["fim_spm_rate"])
            counters.changes["fim documents"] += 1
            _lap(counters, "fim", t)
        yield doc
    if near is not None:
        counters.cluster_sizes = near.cluster_sizes()


def _lap(counters: Counters, stage: str, t0: float) -> float:
    now = time.perf_counter()
    counters.seconds[stage] += now - t0
    return now


def _tokenize(args):
    model_file, texts = args
    return SentencePieceTokenizer(model_file).encode_batch(texts)


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]


def prepare(cfg: dict, out: str, quiet: bool = False) -> dict:
    """Runs the pipeline for a data config (see experiments/data/example.py); returns the manifest."""
    from tqdm import tqdm

    st = dict(stages.DEFAULTS, **cfg.get("stages", {}))
    unknown = set(cfg.get("stages", {})) - set(stages.DEFAULTS)
    if unknown:
        raise ValueError(f"stages.{sorted(unknown)[0]}: unknown key; known: {', '.join(sorted(stages.DEFAULTS))}")
    seed, seq_len = cfg.get("seed", 0), cfg["seq_len"]
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    for leftover in os.listdir(parent):  # a previous interrupted run of this output
        if leftover.startswith(f".{os.path.basename(out)}.building-"):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
    if os.path.exists(out):
        if dataset.is_complete(out) and not cfg.get("overwrite", False):
            raise FileExistsError(f"{out} is already a complete dataset (set overwrite=True to rebuild it)")
        shutil.rmtree(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.building-", dir=parent)
    t0 = time.time()
    try:
        counters, skips = Counters(), sources.SkipLog()
        kept: dict[str, list[sources.Document]] = {"train": [], "validation": []}
        inputs = {}
        for src in cfg["sources"]:
            files = sources.expand(src["path"], sources.SkipLog())
            inputs[src["name"]] = {"path": src["path"], "files": len(files),
                                   "sha256": {os.path.relpath(f, parent): _file_hash(f) for f in files[:1000]}}
            docs = sources.documents(src, skips)
            bar = tqdm(docs, desc=f"read {src['name']}", disable=quiet, unit="doc", mininterval=2.0)
            weight = float(src.get("weight", 1.0))
            for doc in clean(bar, st, counters, seed):
                split = "validation" if _hash_fraction(doc.path, seed) < cfg.get("val_fraction", 0.01) else "train"
                for _ in range(_copies(weight, doc.path, seed) if split == "train" else 1):
                    kept[split].append(doc)
        if not kept["train"]:
            raise ValueError("no training documents survived the stages; see the counts:\n" + _counts_text(counters, skips))
        tok_file = os.path.join(tmp, dataset.TOKENIZER)
        tcfg = cfg.get("tokenizer", {})
        if tcfg.get("model"):
            shutil.copy(os.path.expanduser(tcfg["model"]), tok_file)
            tok = SentencePieceTokenizer(tok_file)
        else:
            tok = train_sentencepiece(_sample_lines(kept["train"], tcfg.get("sample_bytes", 20_000_000), seed),
                                      tok_file, tcfg.get("vocab_size", 8192), tcfg.get("model_type", "bpe"),
                                      user_symbols=tuple(tcfg.get("user_symbols", ())) + (
                                          stages.FIM_TOKENS if st["fim_rate"] else ()))
        splits = {}
        t_tok = time.perf_counter()
        workers = max(1, int(cfg.get("workers", 1)))
        for split, docs in kept.items():
            texts = [d.text for d in docs]
            chunks = [texts[i:i + 512] for i in range(0, len(texts), 512)]
            if workers > 1 and len(chunks) > 1:
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    encoded = [e for part in pool.imap(_tokenize, [(tok_file, c) for c in chunks]) for e in part]
            else:
                encoded = tok.encode_batch(texts)
            rows = write_rows(os.path.join(tmp, dataset.shard_name(split)),
                              pack(encoded, seq_len, tok.bos_id, tok.eos_id))
            splits[split] = {"documents": len(texts), "tokens": sum(len(e) + 2 for e in encoded), "rows": rows,
                             "bytes": sum(len(t.encode()) for t in texts),
                             "lengths": [len(e) for e in encoded]}
        counters.seconds["tokenize + pack"] += time.perf_counter() - t_tok
        report = write_report(tmp, counters, skips, splits, time.time() - t0)
        manifest = {"name": cfg.get("name", os.path.basename(out)), "seq_len": seq_len, "vocab_size": tok.vocab_size,
                    "splits": {s: {k: v for k, v in c.items() if k != "lengths"} for s, c in splits.items()},
                    "sources": inputs, "config": _jsonable(cfg), "stages": _jsonable(st),
                    "counts": report, "seconds": round(time.time() - t0, 1)}
        dataset.write_manifest(tmp, manifest)  # last: marks the directory complete
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"[prepare] {out}: " + ", ".join(f"{s} {c['tokens']:,} tokens in {c['rows']:,} rows"
                                               for s, c in manifest["splits"].items()) + f" ({manifest['seconds']} s)")
    return manifest


def _hash_fraction(key: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _copies(weight: float, key: str, seed: int) -> int:
    """Mixture weight as whole copies plus a deterministic coin for the fraction."""
    whole = int(weight)
    return whole + (1 if _hash_fraction("w" + key, seed) < weight - whole else 0)


def _sample_lines(docs, budget: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(docs))
    for i in order:
        for line in docs[i].text.splitlines():
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


def write_report(path: str, c: Counters, skips: sources.SkipLog, splits: dict, seconds: float) -> dict:
    """report.md with per-stage tables and plots (length histogram, duplicate clusters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summary = [], {"skipped_inputs": dict(skips.counts), "stages": {}, "changes": dict(c.changes),
                         "seconds": {k: round(v, 2) for k, v in c.seconds.items()}}
    for s in STAGE_ORDER[1:]:
        if not c.docs_in[s]:
            continue
        kept_docs = c.docs_in[s] - c.removed[s]
        kept_bytes = c.bytes_in[s] - c.bytes_removed[s]
        summary["stages"][s] = {"docs_in": c.docs_in[s], "removed": c.removed[s], "bytes_in": c.bytes_in[s],
                                "bytes_removed": c.bytes_removed[s], "reasons": dict(c.reasons[s])}
        mbs = c.bytes_in[s] / 1e6 / c.seconds[s] if c.seconds[s] else float("inf")
        rows.append(f"| {s} | {c.docs_in[s]:,} | {kept_docs:,} | {c.removed[s]:,} | {c.bytes_in[s]:,} | {kept_bytes:,} "
                    f"| {c.seconds[s]:.2f} | {mbs:.1f} |")
    md = ["# Data preparation report", "", f"Built in {seconds:.1f} s.", "",
          "## Skipped inputs", "", "| reason | count | examples |", "| --- | --- | --- |"]
    md += [f"| {r} | {n} | {'; '.join(skips.examples[r])} |" for r, n in skips.counts.most_common()] or ["| none | 0 | |"]
    md += ["", "## Stages", "", "| stage | docs in | kept | removed | bytes in | bytes kept | seconds | MB/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += rows
    md += ["", "Time outside the stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in c.seconds.items()
                                                    if k in ("read", "tokenize + pack"))]
    md += ["", "## Top removal reasons", "", "| stage | reason | count | examples |", "| --- | --- | --- | --- |"]
    for s in STAGE_ORDER[1:]:
        for r, n in c.reasons[s].most_common(10):
            ex = "; ".join(e.replace("|", "\\|") for e in c.examples[(s, r)])
            md.append(f"| {s} | {r} | {n} | {ex} |")
    md += ["", "## Transforms", ""] + [f"- {k}: {v}" for k, v in c.changes.items()]
    md += ["", "## Output", "", "| split | documents | tokens | rows |", "| --- | --- | --- | --- |"]
    md += [f"| {s} | {v['documents']:,} | {v['tokens']:,} | {v['rows']:,} |" for s, v in splits.items()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lengths = splits["train"]["lengths"]
    ax.hist(np.log10(np.maximum(lengths, 1)), bins=40)
    ax.set_xlabel("log10 tokens per document (train)")
    ax.set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "lengths.png"), dpi=100)
    plt.close(fig)
    md += ["", "![document lengths](lengths.png)"]
    clusters = getattr(c, "cluster_sizes", [])
    if clusters:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(clusters, bins=min(40, max(clusters)))
        ax.set_xlabel("near-duplicate cluster size")
        ax.set_ylabel("clusters")
        fig.tight_layout()
        fig.savefig(os.path.join(path, "duplicate_clusters.png"), dpi=100)
        plt.close(fig)
        md += ["", f"{len(clusters)} near-duplicate clusters, largest {clusters[0]} documents.", "",
               "![duplicate clusters](duplicate_clusters.png)"]
    summary["near_duplicate_clusters"] = len(clusters)
    with open(os.path.join(path, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return summary


def main(argv=None):
    import argparse

    from moejax.experiment import _load_module

    ap = argparse.ArgumentParser(description="prepare a moejax dataset from raw text and code")
    ap.add_argument("--config", required=True, help="experiments/data/<name>.py with get_config()")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a complete dataset at --out")
    args = ap.parse_args(argv)
    try:
        cfg = _load_module(args.config, "data_config").get_config()
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        cfg["overwrite"] = args.overwrite or cfg.get("overwrite", False)
        prepare(cfg, args.out)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
