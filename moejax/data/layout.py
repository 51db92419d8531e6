"""The on-disk format of a prepared dataset directory: file names, the manifest, completeness.

    manifest.json  tokenizer.model (or tokenizer.json)  train.arrayrecord  validation.arrayrecord

(or, written by the Beam pipeline, several shards per split that the manifest lists:
`splits.<split>.shards`, e.g. train-00000-of-00004.arrayrecord).

The manifest is written last (atomically); a directory without it is incomplete and never read.
Everything that writes a dataset (`moejax.data.prepare`, `moejax.finetune.data`) and everything that
reads one (`moejax.data.dataset`, the trainer, the generator) names its files through this module,
which imports nothing else of moejax.data but the tokenizer classes.
"""

from __future__ import annotations

import hashlib
import json
import os

from moejax.data import tokenizer as tokenizers

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
SPLITS = ("train", "validation")


def shard_name(split: str) -> str:
    return f"{split}.arrayrecord"


def shard_paths(path: str, split: str) -> list[str]:
    """The ArrayRecord files of a split of a complete dataset, in order."""
    entry = read_manifest(path).get("splits", {}).get(split)  # fine-tuning sets list no splits
    names = (entry.get("shards") if isinstance(entry, dict) else None) or [shard_name(split)]
    return [os.path.join(path, n) for n in names]


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST))


def write_manifest(path: str, manifest: dict) -> None:
    """Writes the manifest atomically: the step that marks `path` complete."""
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
    """The dataset's tokenizer: sentencepiece, or a Hugging Face tokenizer.json with the special
    tokens the manifest names. `path` may be a mixture [(path, weight)] (its datasets share one
    tokenizer)."""
    if not isinstance(path, str):
        path = path[0][0]
    hf = os.path.join(path, HF_TOKENIZER)
    if os.path.exists(hf):
        return tokenizers.HFTokenizer(hf, **read_manifest(path).get("special_tokens", {}))
    return tokenizers.SentencePieceTokenizer(os.path.join(path, TOKENIZER))


def tokenizer_digest(path: str) -> str:
    """sha256 of the dataset's tokenizer file: two datasets mix only if these agree."""
    for name in (HF_TOKENIZER, TOKENIZER):
        f = os.path.join(path, name)
        if os.path.exists(f):
            with open(f, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()
    raise FileNotFoundError(f"{path}: no {TOKENIZER} or {HF_TOKENIZER}")
