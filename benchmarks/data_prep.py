"""Data preparation speed and quality on a generated corpus with planted problems.

    python -m benchmarks.data_prep                 # ~200 MB, 2 workers (the issue's setting), unigram
    python -m benchmarks.data_prep --model-type bpe
    python -m benchmarks.data_prep --mb 30         # quicker

Documents are pseudo-English (Zipf-distributed words from a vocabulary harvested from the Python
standard library's comments, plus stop words), written as JSONL shards (half gzip'd). Planted: exact
copies (5%), near copies with 5-10% of words replaced (5%), low-quality documents (5%: word salad of
symbols, repeated lines, digit tables, too short) and documents with PII (5%: emails, phone numbers, IP
addresses). Prints MB/s per stage and end to end (with tokenization and packing), near-duplicate
precision and recall, and quality-filter precision and recall against the plants.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sysconfig
import tempfile
import time

import numpy as np

from moejax.data import prepare, sources

STOP = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "with",
    "for",
    "it",
    "as",
    "on",
    "be",
    "by",
    "have",
]


def vocabulary(n: int = 20000) -> list[str]:
    words = collections.Counter()
    root = sysconfig.get_paths()["stdlib"]
    for d, _, files in os.walk(root):
        if "site-packages" in d:
            continue
        for f in files:
            if f.endswith(".py"):
                try:
                    with open(os.path.join(d, f), encoding="utf-8") as fh:
                        for line in fh:
                            if "#" in line:
                                words.update(
                                    w.lower()
                                    for w in re.findall(r"[A-Za-z]{3,12}", line.split("#", 1)[1])
                                )
                except (OSError, UnicodeDecodeError):
                    pass
        if len(words) > n * 2:
            break
    return [w for w, _ in words.most_common(n)]


class Generator:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.vocab = np.array(vocabulary() + STOP * 20)
        p = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.05
        self.cdf = np.cumsum(p / p.sum())

    def words(
        self, n: int
    ) -> np.ndarray:  # Zipf-distributed draws (rng.choice with p is 20x slower)
        return self.vocab[
            np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.vocab) - 1)
        ]

    def doc(self) -> str:
        paras = []
        for _ in range(self.rng.integers(2, 8)):
            sents = []
            for _ in range(self.rng.integers(3, 9)):
                words = self.words(self.rng.integers(8, 25))
                sents.append(" ".join(words).capitalize() + ".")
            paras.append(" ".join(sents))
        return "\n\n".join(paras)

    def near(self, text: str) -> str:
        words = text.split(" ")
        frac = self.rng.uniform(0.05, 0.10)
        for i in self.rng.choice(len(words), max(1, int(frac * len(words))), replace=False):
            words[i] = self.words(1)[0]
        return " ".join(words)

    def low_quality(self) -> str:
        kind = self.rng.integers(4)
        if kind == 0:
            return " ".join("#" * int(self.rng.integers(1, 4)) + "..." for _ in range(200))
        if kind == 1:
            return "\n".join(["click here to subscribe now"] * 60)
        if kind == 2:
            return "\n".join(
                " ".join(str(x) for x in self.rng.integers(0, 10**6, 8)) for _ in range(80)
            )
        return "short note"

    def pii(self) -> str:
        text = self.doc()
        return (
            text
            + f"\n\nContact: user{self.rng.integers(1e6)}@example.org, +1 212 555 {self.rng.integers(1000, 9999)}, "
            f"server 10.{self.rng.integers(256)}.{self.rng.integers(256)}.{self.rng.integers(256)}."
        )


def generate(out_dir: str, mb: float, seed: int) -> dict:
    g = Generator(seed)
    labels, docs, total = {}, [], 0
    originals = []
    while total < mb * 1e6:
        r = g.rng.random()
        if r < 0.05 and originals:
            kind, text = "exact", originals[g.rng.integers(len(originals))]
        elif r < 0.10 and originals:
            kind, text = "near", g.near(originals[g.rng.integers(len(originals))])
        elif r < 0.15:
            kind, text = "low", g.low_quality()
        elif r < 0.20:
            kind, text = "pii", g.pii()
        else:
            kind, text = "clean", g.doc()
            originals.append(text)
        doc_id = f"d{len(docs)}"
        labels[doc_id] = kind
        docs.append({"id": doc_id, "text": text})
        total += len(text.encode())
    per = max(1, len(docs) // 16)
    for i in range(0, len(docs), per):
        name = os.path.join(
            out_dir, f"part{i // per:03d}.jsonl" + (".gz" if (i // per) % 2 else "")
        )
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "wt") as f:
            for d in docs[i : i + per]:
                f.write(json.dumps(d) + "\n")
    return {"labels": labels, "docs": docs, "bytes": total}


class Recording(prepare.Counters):
    def __init__(self):
        super().__init__()
        self.removed_ids: dict[str, str] = {}

    def remove(self, stage, reason, doc, nbytes, text):
        super().remove(stage, reason, doc, nbytes, text)
        self.removed_ids[doc.path] = stage


def pr(pred: set, truth: set) -> tuple[float, float]:
    tp = len(pred & truth)
    return tp / max(1, len(pred)), tp / max(1, len(truth))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sample-mb", type=float, default=10.0, help="text the tokenizer is trained on"
    )
    ap.add_argument(
        "--model-type",
        default="unigram",
        choices=("unigram", "bpe"),
        help="sentencepiece model (unigram encodes ~4x faster than bpe on this machine)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        t = time.time()
        corpus = generate(raw, args.mb, args.seed)
        print(
            f"generated {corpus['bytes'] / 1e6:.0f} MB, {len(corpus['docs'])} documents in {time.time() - t:.0f} s"
        )
        cfg = {
            "name": "bench",
            "seed": 0,
            "seq_len": 1024,
            "val_fraction": 0.01,
            "workers": args.workers,
            "sources": [{"name": "web", "path": os.path.join(raw, "*.jsonl*"), "format": "jsonl"}],
            "stages": {"min_words": 30},
            "tokenizer": {
                "vocab_size": 8192,
                "sample_bytes": int(args.sample_mb * 1_000_000),
                "model_type": args.model_type,
            },
        }
        t = time.time()
        manifest = prepare.prepare(cfg, os.path.join(tmp, "out"), quiet=True)
        wall = time.time() - t
        secs = manifest["counts"]["seconds"]
        print(
            f"end to end (read, stages, tokenizer training, tokenization, packing): {wall:.0f} s, "
            f"{corpus['bytes'] / 1e6 / wall:.2f} MB/s"
        )
        print(
            "wall seconds per phase: "
            + ", ".join(f"{k} {v:.1f}" for k, v in manifest["counts"]["wall"].items())
        )
        print("| stage | seconds (summed over workers) | MB/s of its input per worker |")
        print("| --- | --- | --- |")
        for stage, s in secs.items():
            mb_in = (
                manifest["counts"]["stages"].get(stage, {}).get("bytes_in", corpus["bytes"]) / 1e6
            )
            print(f"| {stage} | {s:.1f} | {mb_in / s if s else float('inf'):.1f} |")
        # quality of the decisions, from the same stages run in-process with the removals recorded
        st = dict(prepare.stages.DEFAULTS, **cfg["stages"])
        rec = Recording()
        docs = (sources.Document(d["text"], "web", d["id"]) for d in corpus["docs"])
        for _ in prepare.clean(docs, st, rec, seed=0, workers=args.workers):
            pass
        labels = corpus["labels"]
        removed = rec.removed_ids
        near_p, near_r = pr(
            {i for i, s in removed.items() if s == "near_dedup"},
            {i for i, k in labels.items() if k == "near"},
        )
        dup_p, dup_r = pr(
            {i for i, s in removed.items() if s in ("near_dedup", "exact_dedup")},
            {i for i, k in labels.items() if k in ("near", "exact")},
        )
        q_p, q_r = pr(
            {i for i, s in removed.items() if s == "quality"},
            {i for i, k in labels.items() if k == "low"},
        )
        print(
            f"near duplicates: precision {near_p:.3f} recall {near_r:.3f}; all duplicates: precision {dup_p:.3f} "
            f"recall {dup_r:.3f}; quality filter: precision {q_p:.3f} recall {q_r:.3f}; "
            f"pii replacements {manifest['counts']['changes'].get('pii replacements', 0)} "
            f"(planted {3 * sum(k == 'pii' for k in labels.values())})"
        )


if __name__ == "__main__":
    main()
