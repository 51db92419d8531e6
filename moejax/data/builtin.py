"""The built-in default corpus: the Python standard library's own sources (code and docstrings).

Built on first use and cached under `data.cache_dir`: files are split into train and validation
by a hash of their path, a sentencepiece BPE tokenizer (byte fallback) is trained on the train
files, documents are tokenized and packed into ArrayRecord shards. The directory has the layout of
a prepared dataset (see moejax.data.dataset) and appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time

from moejax.config import DataConfig
from moejax.data import dataset
from moejax.data.packing import pack, write_rows
from moejax.data.tokenizer import train_sentencepiece

log = logging.getLogger(__name__)

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}
CORPUS_VERSION = 1


def stdlib_files(max_files: int = 0) -> list[str]:
    """Sorted .py files of the running interpreter's standard library (tests excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    out.sort()
    return out[:max_files] if max_files else out


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def is_validation(path: str, fraction: float) -> bool:
    h = int(hashlib.sha256(os.path.basename(path).encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def cache_key(cfg: DataConfig, vocab_size: int) -> str:
    key = dict(v=CORPUS_VERSION, py=sys.version_info[:2], vocab=vocab_size, seq=cfg.seq_len, max_files=cfg.max_files,
               val=cfg.val_fraction, sample=cfg.tokenizer_sample_bytes)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "moejax")


def build(cfg: DataConfig, vocab_size: int) -> str:
    """Returns the dataset directory, building it if it is not cached yet."""
    root = cfg.cache_dir or default_cache_dir()
    out = os.path.join(root, f"stdlib-{cache_key(cfg, vocab_size)}")
    if dataset.is_complete(out):
        return out
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    try:
        files = stdlib_files(cfg.max_files)
        docs = {"train": [], "validation": []}
        skipped = 0
        for p in files:
            text = read_text(p)
            if not text or not text.strip():
                skipped += 1
                continue
            docs["validation" if is_validation(p, cfg.val_fraction) else "train"].append(text)
        print(f"[data] built-in corpus: {len(docs['train'])} train / {len(docs['validation'])} validation files "
              f"from {sysconfig.get_paths()['stdlib']} ({skipped} skipped)", flush=True)

        def sample_lines():
            budget = cfg.tokenizer_sample_bytes
            for text in docs["train"]:
                for line in text.splitlines():
                    if line.strip():
                        yield line
                        budget -= len(line)
                if budget <= 0:
                    return

        tok = train_sentencepiece(sample_lines(), os.path.join(tmp, dataset.TOKENIZER), vocab_size)
        counts = {}
        for split, texts in docs.items():
            encoded = tok.encode_batch(texts)
            counts[split] = {"documents": len(texts), "tokens": sum(len(e) + 2 for e in encoded),
                             "rows": write_rows(os.path.join(tmp, dataset.shard_name(split)),
                                                pack(encoded, cfg.seq_len, tok.bos_id, tok.eos_id))}
        dataset.write_manifest(tmp, {"name": "python-stdlib", "seq_len": cfg.seq_len, "vocab_size": vocab_size,
                                     "splits": counts, "source": sysconfig.get_paths()["stdlib"],
                                     "python": sys.version.split()[0]})
        if os.path.exists(out):  # an incomplete leftover
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[data] built {out} in {time.time() - t0:.0f}s: "
          + ", ".join(f"{s} {c['tokens']:,} tokens in {c['rows']:,} rows" for s, c in counts.items()), flush=True)
    return out
