"""Prepare the Python standard library (code) as a dataset, with fill-in-the-middle on half of it.

    python -m moejax.data.prepare --config experiments/data/stdlib.py --out data/stdlib
    python -m moejax.train --config experiments/moe.py --config.data.source=data/stdlib

Each source: name, path (file, directory or glob), format ('auto' | 'text' | 'jsonl' | 'json' |
'parquet'), text_field (JSON), kind ('text' | 'code'), weight (mixture: copies per document in
train), repair_utf8, exclude (fnmatch patterns on path components), max_files (0 = all). Stage
thresholds: moejax/data/stages.py DEFAULTS. Tokenizer: train one (vocab_size, model_type
'bpe' | 'unigram', sample_bytes, user_symbols) or bring one: model (a sentencepiece .model) or hf (a
Hugging Face tokenizer.json, with eos and optionally bos / pad naming its special tokens). workers:
processes for the cleaning and the tokenization.
"""

import sysconfig


def get_config():
    return {
        "name": "python-stdlib-fim",
        "seed": 0,
        "seq_len": 256,
        "val_fraction": 0.02,
        "workers": 2,
        "sources": [
            {
                "name": "stdlib",
                "path": sysconfig.get_paths()["stdlib"] + "/**/*.py",
                "kind": "code",
                "weight": 1.0,
                "exclude": [
                    "site-packages",
                    "dist-packages",
                    "test",
                    "tests",
                    "idle_test",
                    "__pycache__",
                ],
            },
        ],
        "stages": {"fim_rate": 0.5, "near_dedup": True},
        "tokenizer": {"vocab_size": 4096, "model_type": "bpe", "sample_bytes": 5_000_000},
    }
