"""Data: tokenizer, packing, ArrayRecord shards, the built-in corpus and the Grain loader."""
