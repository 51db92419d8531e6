"""Data preparation speed and quality on a generated corpus with planted problems.

    python -m benchmarks.data_prep                 # ~200 MB, 2 workers, unigram tokenizer
    python -m benchmarks.data_prep --model-type bpe
    python -m benchmarks.data_prep --mb 30         # quicker
    python -m benchmarks.data_prep --mb 30 --runner beam   # and the Beam pipeline beside it

Documents are pseudo-English (Zipf-distributed words from a vocabulary harvested from the Python
standard library's comments, plus stop words), written as JSONL shards (half gzip'd). Planted: exact
copies (5%), near copies with 5-10% of words replaced (5%), low-quality documents (5%: word salad of
symbols, repeated lines, digit tables, too short) and documents with PII (5%: emails, phone numbers,
IP addresses). Prints MB/s per stage and end to end (with tokenization and packing), near-duplicate
precision and recall, and quality-filter precision and recall against the plants.

Then PII recall on a planted set (`--pii-only` runs just this, in a second): emails, IPv4 and IPv6
addresses, and phone numbers in national and international formats of many countries, each planted
in a sentence, plus look-alikes that must stay (versions, dates, times, slices, MAC addresses,
UUIDs, numeric lists). Recall and false positives are printed side by side for the scrubber and for
the regex-only scrubber it replaced (kept below as the baseline).
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
import phonenumbers

from moejax.data import prepare, sources, stages

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
            text + f"\n\nContact: user{self.rng.integers(1e6)}@example.org, "
            f"+1 212 555 {self.rng.integers(1000, 9999)}, "
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

    def remove(self, stage, reason, where, nbytes, text, key=None):
        super().remove(stage, reason, where, nbytes, text, key)
        self.removed_ids[where] = stage


def pr(pred: set, truth: set) -> tuple[float, float]:
    tp = len(pred & truth)
    return tp / max(1, len(pred)), tp / max(1, len(truth))


# ------------------------------------------------------------------------------- PII recall

# The regex-only scrubber moejax used before phonenumbers and IPv6 (the baseline of the recall
# table).
_OLD_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_OLD_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_OLD_PHONE = re.compile(
    r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)|\d{2,4})[\s.-]\d{3,4}[\s.-]\d{3,4}(?![\w.])"
)


def old_scrub(text: str) -> str:
    text = _OLD_EMAIL.sub("<EMAIL>", text)
    for pattern, tag in ((_OLD_IPV4, "<IP>"), (_OLD_PHONE, "<PHONE>")):
        text = pattern.sub(tag, text)
    return text


PHONE_REGIONS = (
    "US",
    "CA",
    "GB",
    "DE",
    "FR",
    "IT",
    "ES",
    "NL",
    "CH",
    "SE",
    "PL",
    "IN",
    "JP",
    "KR",
    "CN",
    "AU",
    "BR",
    "MX",
    "ZA",
    "NG",
    "EG",
    "SG",
    "AR",
    "TR",
)


def pii_plants(seed: int = 0) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """{kind: [(planted text, the tag that must replace it)]}, and look-alikes that must stay."""
    rng = np.random.default_rng(seed)
    r = lambda n: int(rng.integers(n))  # noqa: E731
    users = ("jane.doe", "j_smith+news", "o.connor", "li.wei88", "admin")
    domains = ("example.com", "mail.example.org", "uni.example.ac.uk", "example.io")
    plants = {
        "email": [(f"{users[i % 5]}{r(100)}@{domains[i % 4]}", "<EMAIL>") for i in range(40)],
        "ipv4": [(f"{1 + r(223)}.{r(256)}.{r(256)}.{1 + r(254)}", "<IP>") for _ in range(40)],
        "ipv6": [],
        "phone, US national": [],
        "phone, international with spaces": [],
        "phone, international other formats": [],
        "phone, national format of another country (not pii_region)": [],
    }
    for _ in range(10):
        g = [f"{r(65536):x}" for _ in range(8)]
        plants["ipv6"] += [
            (":".join(["2001", "db8", *g[2:]]), "<IP>"),
            (f"2001:db8::{g[0]}:{g[1]}", "<IP>"),
            (f"fe80::{g[0]}:{g[1]}:{g[2]}", "<IP>"),
            (f"::ffff:192.0.2.{r(256)}", "<IP>"),
        ]
    for area in (212, 415, 312, 617, 206, 303, 512, 404, 305, 702):
        ex, line = 200 + r(800), r(10000)
        plants["phone, US national"] += [
            (f"({area}) {ex}-{line:04d}", "<PHONE>"),
            (f"{area}-{ex}-{line:04d}", "<PHONE>"),
            (f"{area}.{ex}.{line:04d}", "<PHONE>"),
            (f"{area} {ex} {line:04d}", "<PHONE>"),
        ]
    fmt = phonenumbers.PhoneNumberFormat
    for region in PHONE_REGIONS:
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            num = phonenumbers.example_number_for_type(region, kind)
            if num is None:
                continue
            plants["phone, international with spaces"].append(
                (phonenumbers.format_number(num, fmt.INTERNATIONAL), "<PHONE>")
            )
            intl = phonenumbers.format_number(num, fmt.INTERNATIONAL)
            plants["phone, international other formats"] += [
                (phonenumbers.format_number(num, fmt.E164), "<PHONE>"),
                (intl.replace(" ", "-"), "<PHONE>"),
            ]
            if region not in ("US", "CA"):
                plants["phone, national format of another country (not pii_region)"].append(
                    (phonenumbers.format_number(num, fmt.NATIONAL), "<PHONE>")
                )
    plants["phone, international other formats"] += [
        (x, "<PHONE>")
        for x in (
            "+49 (0)30 901820",
            "+1 (415) 555-0199",
            "+33 (0)1 42 68 53 00",
            "+1-415-555-0199",
        )
    ]
    negatives = [
        "3.11.7",
        "version 1.2.3",
        "2024-01-15",
        "12:30:45",
        "9:00-17:00",
        "a[::2]",
        "x[1:2:3]",
        "std::vector<int>",
        "Foo::bar::baz",
        "1000000",
        "3.14159265358979",
        "0x7fffffff",
        "1, 2, 3, 4, 5, 6, 7, 8",
        "1 2 3 4 5 6 7 8 9 0",
        "00:1A:2B:3C:4D:5E",
        "123e4567-e89b-12d3-a456-426614174000",
        "range(1000000, 2000000)",
        "page 1234567",
        "ISBN 978-3-16-148410-0",
        "sha 9f86d081884c7d65",
        "(1, 2) (3, 4)",
        "10/12/2023",
        "1.0e-12",
        "xs[1::2]",
        "a[100::200]",
        "Face::add()",
        "INT32_MAX = 2147483647",
        "2023-01-01T12:30:45Z",
        "tuple[int, ...]",
        "12345678",
        "a::b::c",
    ]
    return plants, negatives


def pii_recall(seed: int = 0) -> None:
    plants, negatives = pii_plants(seed)
    everywhere = ",".join(PHONE_REGIONS)
    g = Generator(seed)
    ctx = lambda: " ".join(g.words(12))  # noqa: E731  (prose without digits around each plant)
    scrubbers = {
        "regex only (before)": old_scrub,
        "phonenumbers + IPv6 (now, pii_region=US)": lambda t: stages.scrub_pii(t)[0],
        "now, pii_region = all 24 countries": lambda t: stages.scrub_pii(t, region=everywhere)[0],
    }
    print("\n| planted | n | " + " | ".join(f"recall, {k}" for k in scrubbers) + " |")
    print("| --- | --- |" + " --- |" * len(scrubbers))
    total = collections.Counter()
    for kind, items in plants.items():
        hits = collections.Counter()
        for i, (item, tag) in enumerate(items):
            a, b, end = (
                ctx(),
                ctx(),
                (" ", ", ", ". ", ")\n")[i % 4],
            )  # the text after a plant varies
            for name, scrub in scrubbers.items():
                hits[name] += scrub(f"{a} {item}{end}{b}") == f"{a} {tag}{end}{b}"
        total.update(hits)
        total["n"] += len(items)
        print(
            f"| {kind} | {len(items)} | "
            + " | ".join(f"{hits[k] / len(items):.3f}" for k in scrubbers)
            + " |"
        )
    print(
        f"| **all** | {total['n']} | "
        + " | ".join(f"**{total[k] / total['n']:.3f}**" for k in scrubbers)
        + " |"
    )
    changed = {
        name: [x for x in negatives if scrub(f"see {x} here") != f"see {x} here"]
        for name, scrub in scrubbers.items()
    }
    for name, bad in changed.items():
        print(f"look-alikes changed by {name}: {len(bad)} of {len(negatives)} {bad}")


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
    ap.add_argument("--pii-only", action="store_true", help="only the PII recall table")
    ap.add_argument(
        "--runner",
        choices=("local", "beam"),
        default="local",
        help="beam: also run moejax.data.beam on Beam's local DirectRunner (same corpus, same "
        "workers) and print its MB/s beside the single-machine path's",
    )
    args = ap.parse_args(argv)
    if args.pii_only:
        pii_recall(args.seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        t = time.time()
        corpus = generate(raw, args.mb, args.seed)
        print(
            f"generated {corpus['bytes'] / 1e6:.0f} MB, {len(corpus['docs'])} documents in "
            f"{time.time() - t:.0f} s"
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
        if args.runner == "beam":
            from moejax.data import beam

            t = time.time()
            bm = beam.run(cfg, os.path.join(tmp, "beam"), quiet=False)
            bwall = time.time() - t
            same = all(
                bm["counts"][k] == manifest["counts"][k]
                for k in ("stages", "skipped_inputs", "changes", "near_duplicate_clusters")
            ) and all(
                bm["splits"][s][k] == manifest["splits"][s][k]
                for s in ("train", "validation")
                for k in ("documents", "tokens", "bytes")
            )
            print(
                f"Beam DirectRunner ({args.workers} workers): {bwall:.0f} s, "
                f"{corpus['bytes'] / 1e6 / bwall:.2f} MB/s; single-machine path {wall:.0f} s, "
                f"{corpus['bytes'] / 1e6 / wall:.2f} MB/s; Beam / local time {bwall / wall:.2f}x; "
                f"same documents, tokens and counts: {same}"
            )
            print(
                "Beam wall seconds per pipeline: "
                + ", ".join(f"{k} {v:.1f}" for k, v in bm["counts"]["wall"].items())
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
        dedup = prepare.Dedup(st, 0)
        survivors = list(prepare.clean(docs, st, rec, 0, workers=args.workers, dedup=dedup))
        for _ in prepare.decide(survivors, st, rec, dedup, 0):
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
            f"near duplicates: precision {near_p:.3f} recall {near_r:.3f}; all duplicates: "
            f"precision {dup_p:.3f} recall {dup_r:.3f}; quality filter: precision {q_p:.3f} recall "
            f"{q_r:.3f}; pii replacements "
            f"{manifest['counts']['changes'].get('pii replacements', 0)} (planted "
            f"{3 * sum(k == 'pii' for k in labels.values())})"
        )
    pii_recall(args.seed)


if __name__ == "__main__":
    main()
