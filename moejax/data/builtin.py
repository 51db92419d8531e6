"""The built-in default corpus: the Python standard library's own sources (code and docstrings); and
a second built-in domain, `builtin-docs`: the English prose of Python's reference documentation (the
`pydoc_data` topics that ship with the interpreter), tokenized with the default corpus's tokenizer,
so that a model pretrained on the default corpus can continue on it (continual pretraining;
`data.source= 'builtin-docs=0.9,builtin=0.1'` replays 10% of the old data).

It goes through the same pipeline as any dataset (`moejax.data.prepare`: code checks, exact and
near-duplicate removal, PII placeholders, a sentencepiece BPE tokenizer with byte fallback trained
on the training files, packing into ArrayRecord shards). It is prepared on first use and cached
under `data.cache_dir`, keyed by everything that shapes it; the directory appears only when
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from typing import TYPE_CHECKING

from moejax.data import layout, prepare
from moejax.data.tokenizer import VocabularyTooLarge

if (
    TYPE_CHECKING
):  # not at run time: Grain's worker processes import the reader, which must not import jax
    from moejax.config import DataConfig

SKIP_DIRS = (
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
)
# 3: near duplicates became connected components (stages.NearDedup): a corpus cached by an earlier
# version keeps other documents, and so trains another tokenizer than a build at a new seq_len would
CORPUS_VERSION = 3


def data_config(cfg: DataConfig, vocab_size: int) -> dict:
    """The prepare config of the built-in corpus (`python -m moejax.data.prepare` takes the
    same)."""
    return {
        "name": "python-stdlib",
        "seed": 0,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "workers": 2,
        "sources": [
            {
                "name": "stdlib",
                "path": sysconfig.get_paths()["stdlib"],
                "kind": "code",
                "exclude": list(SKIP_DIRS),
                "max_files": cfg.max_files,
            }
        ],
        "stages": {"near_dedup": True, "pii": True, "fim_rate": 0.0},
        "tokenizer": {
            "vocab_size": vocab_size,
            "model_type": "bpe",
            "sample_bytes": cfg.tokenizer_sample_bytes,
        },
    }


def cache_key(cfg: DataConfig, vocab_size: int) -> str:
    key = dict(v=CORPUS_VERSION, py=sys.version_info[:2], config=data_config(cfg, vocab_size))
    key["config"].pop("workers")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "moejax")


def build(cfg: DataConfig, vocab_size: int) -> str:
    """Returns the dataset directory, preparing it if it is not cached yet."""
    root = cfg.cache_dir or default_cache_dir()
    out = os.path.join(root, f"stdlib-{cache_key(cfg, vocab_size)}")
    if layout.is_complete(out):
        return out
    print(
        f"[data] preparing the built-in corpus from {sysconfig.get_paths()['stdlib']} into {out}",
        flush=True,
    )
    try:
        prepare.prepare(data_config(cfg, vocab_size), out, quiet=False)
    except FileExistsError:  # another process built it while this one waited for the lock
        pass
    except VocabularyTooLarge as e:  # the built-in corpus's tokenizer takes the model's vocabulary
        raise VocabularyTooLarge(e.asked, e.largest, field="model.vocab_size") from None
    return out


DOCS_VERSION = 2  # 2: as CORPUS_VERSION 3


def build_docs(cfg: DataConfig, vocab_size: int) -> str:
    """The `builtin-docs` dataset directory (prepared on first use with the built-in corpus's
    tokenizer)."""
    code = build(cfg, vocab_size)
    root = cfg.cache_dir or default_cache_dir()
    key = hashlib.sha256(
        json.dumps(
            {
                "v": DOCS_VERSION,
                "py": sys.version_info[:2],
                "code": os.path.basename(code),
                "seq_len": cfg.seq_len,
                "val": cfg.val_fraction,
            }
        ).encode()
    ).hexdigest()[:12]
    out = os.path.join(root, f"pydoc-{key}")
    if layout.is_complete(out):
        return out
    import pydoc_data.topics

    texts = os.path.join(root, f"pydoc-topics-py{sys.version_info[0]}.{sys.version_info[1]}")
    os.makedirs(texts, exist_ok=True)
    for name, text in sorted(pydoc_data.topics.topics.items()):
        with open(os.path.join(texts, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    print(
        f"[data] preparing builtin-docs (Python's reference documentation) into {out}", flush=True
    )
    conf = {
        "name": "pydoc-topics",
        "seed": 0,
        "seq_len": cfg.seq_len,
        "val_fraction": max(cfg.val_fraction, 0.1),
        "workers": 1,
        "sources": [{"name": "pydoc", "path": texts, "kind": "text"}],
        "stages": {"near_dedup": True, "pii": False, "fim_rate": 0.0},
        "tokenizer": {"model": os.path.join(code, layout.TOKENIZER)},
    }
    try:
        prepare.prepare(conf, out, quiet=True)
    except FileExistsError:
        pass
    return out
