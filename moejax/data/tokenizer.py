"""One tokenizer interface shared by training, evaluation and generation.

Two backends: a sentencepiece model (what `moejax.data.prepare` trains, or one you bring) and a
Hugging Face `tokenizer.json` (the `tokenizers` library: the files that ship with Llama, Qwen,
DeepSeek, ...). `load(path, special)` opens either by file name.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

# Fixed ids of the special tokens in every sentencepiece model moejax trains.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """encode(text) and the character index where each token starts."""
        import numpy as np

        pieces = self.sp.encode(text, return_type="proto").pieces
        char_byte = np.cumsum(
            [0] + [len(c.encode("utf-8")) for c in text]
        )  # byte offset of each char start
        starts = np.searchsorted(char_byte, [p.begin for p in pieces], side="right") - 1
        return [p.id for p in pieces], [int(x) for x in starts]


class HFTokenizer:
    """A Hugging Face `tokenizer.json`. Special tokens are named by their text: `eos` is required,
    `bos` defaults to the end-of-sequence token (GPT-2 style), `pad` to id 0. Encoding adds no
    special tokens (packing adds BOS/EOS itself)."""

    def __init__(self, json_file: str, bos: str = "", eos: str = "", pad: str = ""):
        from tokenizers import Tokenizer as _Tokenizer

        self.model_file = json_file
        self.tok = _Tokenizer.from_file(json_file)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special = {"bos": bos, "eos": eos, "pad": pad}
        if not eos:
            raise ValueError(
                "tokenizer.eos: a Hugging Face tokenizer needs the text of its end-of-sequence "
                "token (e.g. '</s>' or '<|endoftext|>')"
            )
        self.eos_id = self._id("eos", eos)
        self.bos_id = self._id("bos", bos) if bos else self.eos_id
        self.pad_id = self._id("pad", pad) if pad else 0

    def _id(self, field: str, text: str) -> int:
        i = self.tok.token_to_id(text)
        if i is None:
            raise ValueError(f"tokenizer.{field}={text!r} is not a token of {self.model_file}")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """encode(text) and the character index where each token starts."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]


def load(path: str, special: dict | None = None) -> Tokenizer:
    """A `.json` file is a Hugging Face tokenizer (special tokens from `special`), anything else a
    sentencepiece model."""
    if path.endswith(".json"):
        return HFTokenizer(path, **(special or {}))
    return SentencePieceTokenizer(path)


class VocabularyTooLarge(ValueError):
    """The training text has fewer distinct pieces than the vocabulary asked for."""

    def __init__(self, asked: int, largest: int, field: str = "tokenizer.vocab_size"):
        self.asked, self.largest = asked, largest
        super().__init__(
            f"{field}={asked} is more than this corpus can give: at most {largest} (lower {field}, "
            "or give the tokenizer more text)"
        )


def train_sentencepiece(
    lines: Iterable[str],
    model_file: str,
    vocab_size: int,
    model_type: str = "bpe",
    user_symbols: Sequence[str] = (),
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback model that keeps whitespace as is (code indentation survives).

    Writes `model_file` (a .model path) and returns the loaded tokenizer.
    """
    buf = io.BytesIO()
    try:
        _train(lines, buf, vocab_size, model_type, user_symbols, num_threads)
    except RuntimeError as e:
        # sentencepiece's own words are a C++ check failure: "... Vocabulary size too high (512).
        # Please set it to a value <= 468."; the user needs the config field and the bound.
        m = re.search(
            r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e)
        )
        if m is None:
            raise
        raise VocabularyTooLarge(vocab_size, int(m.group(2))) from None
    with open(model_file, "wb") as f:
        f.write(buf.getvalue())
    return SentencePieceTokenizer(model_file)


def _train(lines, buf, vocab_size, model_type, user_symbols, num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        split_by_whitespace=True,
        max_sentence_length=8192,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(user_symbols),
        num_threads=num_threads,
        minloglevel=2,
        train_extremely_large_corpus=False,
    )
