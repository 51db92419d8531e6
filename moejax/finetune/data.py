"""Instruction data for fine-tuning: chat and prompt/completion JSONL -> packed rows with a loss
mask.

Two row formats, one per line (a file may mix them):

  {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}

A chat example is rendered with the chat template (the base model's `tokenizer_config.json`, or
moejax.data.chat's built-in one) turn by turn: the text each assistant turn adds to the rendering of
the conversation before it is the answer, and only answers (with an end-of-sequence token) are
trained on (`loss_on="assistant"`; `"all"` trains on every token). Special tokens are ids, never
text: the template is rendered with empty bos/eos strings, BOS is prepended as an id and EOS
appended to each answer unless the template wrote it.

Packing keeps every example whole in one row (first fit over the rows still open): segment ids
number the examples of a row from 1 and positions restart at each, so attention never crosses
examples (the model's segment mask), and `loss_mask` [T] (1 on the tokens to be predicted) travels
with the tokens. An example that cannot be used is skipped and counted by reason, never a crash.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator

import numpy as np

from moejax.data import chat, layout, packing

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "all")
FIELDS = packing.FIELDS + ("loss_mask",)
DATA_VERSION = 1


class Skip(ValueError):
    """An example that cannot be used; the message is its reason (a counter key)."""


def read_jsonl(paths: Iterable[str], skipped: collections.Counter) -> Iterator[dict]:
    """Rows of JSONL files (lines that are not JSON objects are skipped and counted)."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped["not JSON"] += 1
                    continue
                if not isinstance(row, dict):
                    skipped["not a JSON object"] += 1
                    continue
                yield row


def _check_messages(messages, what: str = "messages", need_answer: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise Skip(f"{what} is not a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise Skip("a message without string content")
        if m.get("role") not in ROLES:
            raise Skip("unknown role")
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise Skip("no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def example_pieces(row: dict, template: str, loss_on: str = "assistant") -> list[tuple[str, bool]]:
    """The example as text pieces (text, trained on), in order; raises Skip."""
    if "messages" in row:
        messages = _check_messages(row["messages"])
        pieces, done = [], ""
        try:
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = chat.render_chat(template, messages[:i], add_generation_prompt=True)
                after = chat.render_chat(template, messages[: i + 1], add_generation_prompt=False)
                if not before.startswith(done) or not after.startswith(before):
                    raise Skip("template renders turns inconsistently")
                pieces += [(before[len(done) :], loss_on == "all"), (after[len(before) :], True)]
                done = after
        except chat.TemplateFailure:
            raise Skip("template failed") from None
        return [(t, trained) for t, trained in pieces if t]
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise Skip("prompt/completion missing or not strings")
        return [(prompt, loss_on == "all"), (completion, True)]
    raise Skip("neither messages nor prompt/completion")


def _completion(value) -> str:
    """A preference completion: a string, or [{"role": "assistant", "content": ...}] (TRL's
    conversational form)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    raise Skip("chosen/rejected is not a string or one assistant message")


def pair_pieces(row: dict, template: str) -> tuple[list, list]:
    """A preference row {"prompt", "chosen", "rejected"} as the pieces of its two examples (chosen,
    rejected). The prompt is a string (one user turn) or a list of messages; it is rendered with the
    chat template and only the completions are trained on. Raises Skip."""
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise Skip("missing prompt, chosen or rejected")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _check_messages(prompt, "prompt", need_answer=False)
    chosen, rejected = _completion(row["chosen"]), _completion(row["rejected"])
    if chosen == rejected:
        raise Skip("chosen equals rejected")
    out = []
    try:
        before = chat.render_chat(template, messages, add_generation_prompt=True)
        for answer in (chosen, rejected):
            after = chat.render_chat(
                template,
                messages + [{"role": "assistant", "content": answer}],
                add_generation_prompt=False,
            )
            if not after.startswith(before):
                raise Skip("template renders turns inconsistently")
            out.append([(before, False), (after[len(before) :], True)])
    except chat.TemplateFailure:
        raise Skip("template failed") from None
    return out[0], out[1]


def tokenize_example(pieces: list[tuple[str, bool]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n], loss_mask [n]): BOS, then the pieces' text tokenized as one string (as inference
    encodes a rendered conversation: no piece-boundary artifacts such as a second dummy-prefix
    space), a token trained on when it starts inside a trained piece; each trained piece (an answer)
    ends with EOS."""
    text = "".join(t for t, _ in pieces)
    spans, at = [], 0
    for t, trained in pieces:
        if trained:
            spans.append((at, at + len(t)))
        at += len(t)
    ids, starts = tokenizer.encode_offsets(text)
    ids, starts = np.asarray(ids, np.int64), np.asarray(starts, np.int64)
    trained = np.zeros(len(ids), bool)
    eos_at = []  # token positions before which an answer's EOS goes
    for a, b in spans:
        trained |= (starts >= a) & (starts < b)
        end = int(np.searchsorted(starts, b, side="left"))  # the first token starting at or after b
        if end == 0 or ids[end - 1] != tokenizer.eos_id:
            eos_at.append(end)
    toks = np.insert(ids, eos_at, tokenizer.eos_id)
    mask = np.insert(trained, eos_at, True)
    return (
        np.concatenate([[tokenizer.bos_id], toks]).astype(np.int32),
        np.concatenate([[0], mask]).astype(np.int32),
    )


class SFTPacker:
    """Whole examples into rows of seq_len (first fit over the last `window` open rows).

    `add(tokens, mask)` returns the rows it closed, int32 [k, 4, seq_len] (tokens, segment_ids,
    positions, loss_mask); `finish()` the rest. Padding: token 0, segment 0, position 0, loss 0.
    `add_group(examples)` keeps several examples together in one row, in consecutive segments (a
    preference pair: chosen, rejected).
    """

    def __init__(self, seq_len: int, window: int = 16, max_segments: int = 0):
        self.L, self.window = seq_len, window
        self.max_segments = max_segments or seq_len  # examples per row at most
        self.open: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.used: list[int] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.add_group([(tokens, mask)])

    def add_group(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        n, k = sum(len(t) for t, _ in examples), len(examples)

        def full(j):
            return self.used[j] == self.L or len(self.open[j]) == self.max_segments

        for i, used in enumerate(self.used):
            if used + n <= self.L and len(self.open[i]) + k <= self.max_segments:
                self.open[i].extend(examples)
                self.used[i] += n
                return self._close(full)
        self.open.append(list(examples))
        self.used.append(n)
        closed = self._close(full)
        if len(self.open) > self.window:  # the fullest open row goes
            full = int(np.argmax(self.used))
            closed = np.concatenate([closed, self._close(lambda j: j == full)])
        return closed

    def finish(self) -> np.ndarray:
        return self._close(lambda j: True)

    def _close(self, which) -> np.ndarray:
        keep, rows = [], []
        for j, _examples in enumerate(self.open):
            (rows if which(j) else keep).append(j)
        out = np.zeros((len(rows), 4, self.L), np.int32)
        for r, j in enumerate(rows):
            at = 0
            for s, (toks, mask) in enumerate(self.open[j], start=1):
                n = len(toks)
                out[r, 0, at : at + n], out[r, 1, at : at + n] = toks, s
                out[r, 2, at : at + n], out[r, 3, at : at + n] = np.arange(n), mask
                at += n
        self.open = [self.open[j] for j in keep]
        self.used = [self.used[j] for j in keep]
        return out


def _split_of(index: int, val_fraction: float, seed: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") / 2**64
    return "validation" if h < val_fraction else "train"


def build_rows(
    rows: Iterable[dict],
    tokenizer,
    template: str,
    seq_len: int,
    *,
    loss_on: str = "assistant",
    val_fraction: float = 0.05,
    seed: int = 0,
    kind: str = "sft",
    max_pairs: int = 8,
):
    """(rows by split {split: int32 [n, 4, seq_len]}, counts) from JSONL rows; skipped examples
    counted.

    kind 'sft': one example per row of the file; 'preference': a pair per row, packed as two
    consecutive segments (chosen first: odd segment ids), at most `max_pairs` pairs to a packed
    row."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"sft.loss_on: got {loss_on!r}, allowed: {', '.join(map(repr, LOSS_ON))}")
    try:
        chat.compiled(template)
    except chat.TemplateFailure as e:
        raise ValueError(f"sft.template: {e}") from None
    skipped: collections.Counter = collections.Counter()
    cap = 2 * max_pairs if kind == "preference" else 0
    packers = {s: SFTPacker(seq_len, max_segments=cap) for s in layout.SPLITS}
    out = {s: [] for s in layout.SPLITS}
    examples = collections.Counter()
    for i, row in enumerate(rows):
        try:
            if kind == "preference":
                group = [tokenize_example(p, tokenizer) for p in pair_pieces(row, template)]
            else:
                group = [tokenize_example(example_pieces(row, template, loss_on), tokenizer)]
            if sum(len(t) for t, _ in group) > seq_len:
                raise Skip(f"longer than seq_len={seq_len}")
            if not all(m[1:].any() for _, m in group):
                raise Skip("nothing to train on")
        except Skip as e:
            skipped[str(e)] += 1
            continue
        split = _split_of(i, val_fraction, seed)
        examples[split] += 1
        out[split].append(packers[split].add_group(group))
    for s in layout.SPLITS:
        out[s].append(packers[s].finish())
        out[s] = np.concatenate(out[s]) if out[s] else np.zeros((0, 4, seq_len), np.int32)
    return out, {"examples": dict(examples), "skipped": dict(skipped)}


def prepare(
    files: list[str],
    tokenizer_file: str,
    out: str,
    *,
    seq_len: int,
    template: str | None = None,
    loss_on: str = "assistant",
    val_fraction: float = 0.05,
    seed: int = 0,
    special: dict | None = None,
    quiet: bool = False,
    kind: str = "sft",
    max_pairs: int = 8,
) -> str:
    """Writes a packed SFT dataset directory (moejax.data.layout, rows of FIELDS) and returns it.

    The directory appears complete (manifest last) or not at all; a split left empty (a tiny file)
    gets the other split's first row, so that training and validation both run.
    """
    from moejax.data import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load(tokenizer_file, special)
    template = template or chat.DEFAULT_CHAT_TEMPLATE
    skipped_lines: collections.Counter = collections.Counter()
    rows, counts = build_rows(
        read_jsonl(files, skipped_lines),
        tok,
        template,
        seq_len,
        loss_on=loss_on,
        val_fraction=val_fraction,
        seed=seed,
        kind=kind,
        max_pairs=max_pairs,
    )
    counts["skipped"].update(skipped_lines)
    if not sum(len(r) for r in rows.values()):
        raise ValueError(f"sft data {files}: no usable example (skipped: {counts['skipped']})")
    for a, b in (("train", "validation"), ("validation", "train")):
        if not len(rows[a]):
            # a split needs a row to be read; said, since its metrics then score the other split's
            print(
                f"[sft] {files}: no {a} row (data.val_fraction={val_fraction}); one {b} row stands "
                f"in, so the {a} metrics are not of {a} data",
                flush=True,
            )
            rows[a] = rows[b][:1]
    tmp = (
        f"{out}.tmp{os.getpid()}"  # one per process: several hosts may prepare into shared storage
    )
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    name = layout.HF_TOKENIZER if tokenizer_file.endswith(".json") else layout.TOKENIZER
    shutil.copy(tokenizer_file, os.path.join(tmp, name))
    for split, r in rows.items():
        packing.write_rows(os.path.join(tmp, layout.shard_name(split)), r)
    tokens = {s: int((r[:, 1] > 0).sum()) for s, r in rows.items()}
    trained = {s: int(r[:, 3].sum()) for s, r in rows.items()}
    manifest = {
        "kind": kind,
        "max_pairs": max_pairs if kind == "preference" else None,
        "seq_len": seq_len,
        "fields": list(FIELDS),
        "sources": list(files),
        "rows": {s: len(r) for s, r in rows.items()},
        "tokens": tokens,
        "trained_tokens": trained,
        "fill": {s: tokens[s] / max(1, len(rows[s]) * seq_len) for s in rows},
        **counts,
        "special_tokens": dict(special or {}),
    }
    layout.write_manifest(tmp, manifest)
    if layout.is_complete(out):  # another process finished first: same inputs, same rows
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if not quiet:
        sk = counts["skipped"]
        print(
            f"[sft] {sum(counts['examples'].values())} examples -> {manifest['rows']} rows of "
            f"{seq_len} ({manifest['fill']['train']:.0%} filled, {trained['train']} trained "
            f"tokens); skipped {sum(sk.values())}"
            f"{': ' + ', '.join(f'{k} {v}' for k, v in sorted(sk.items())) if sk else ''}",
            flush=True,
        )
    return out


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(
    files: list[str],
    tokenizer_file: str,
    cache_dir: str,
    *,
    seq_len: int,
    template: str | None,
    loss_on: str,
    val_fraction: float,
    seed: int = 0,
    special: dict | None = None,
    kind: str = "sft",
    max_pairs: int = 8,
) -> str:
    """`prepare` into cache_dir/<kind>-<key>, keyed by everything that shapes the rows; reused when
    complete."""
    key = json.dumps(
        {
            "v": DATA_VERSION,
            "files": [file_digest(f) for f in files],
            "tok": file_digest(tokenizer_file),
            "template": template,
            "seq_len": seq_len,
            "loss_on": loss_on,
            "val": val_fraction,
            "seed": seed,
            "special": special,
            "kind": kind,
            "pairs": max_pairs,
        },
        sort_keys=True,
    )
    out = os.path.join(cache_dir, f"{kind}-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if layout.is_complete(out):
        m = layout.read_manifest(out)
        sk = m.get("skipped", {})
        print(
            f"[sft] {out}: {sum(m['examples'].values())} examples in {m['rows']} rows; skipped "
            f"{sum(sk.values())}"
            f"{': ' + ', '.join(f'{k} {v}' for k, v in sorted(sk.items())) if sk else ''}",
            flush=True,
        )
        return out
    os.makedirs(cache_dir, exist_ok=True)
    return prepare(
        files,
        tokenizer_file,
        out,
        seq_len=seq_len,
        template=template,
        loss_on=loss_on,
        val_fraction=val_fraction,
        seed=seed,
        special=special,
        kind=kind,
        max_pairs=max_pairs,
    )
