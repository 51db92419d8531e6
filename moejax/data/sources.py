"""Reading raw sources into documents, where bad input is skipped and counted, never fatal.

A source is a path (file, directory walked recursively, or glob with **), a format (text, jsonl,
json, parquet; 'auto' from the extension) and a kind (text or code). Compressed files (.gz, .zst)
are read through their decompressor. Each file that cannot be used is skipped with a reason: binary
content, empty, unreadable, truncated compressed stream, invalid UTF-8 (unless repaired), malformed
JSON lines (counted per line), symlink loops.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator

CODE_EXTENSIONS = {
    ".py": "python",
    ".js": "javascript",
    ".ts": "typescript",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".sh": "shell",
    ".jl": "julia",
    ".scala": "scala",
    ".kt": "kotlin",
}
TEXT_EXTENSIONS = {".txt", ".md", ".rst", ".text", ""}


@dataclasses.dataclass
class Document:
    text: str
    source: str  # the source's name
    path: str
    lang: str = ""  # programming language for code, "" for text


class SkipLog:
    """Counts of skipped inputs per reason, with a few example paths each: the earliest ones by
    `key` (the order of the calls unless given), so that logs filled in any order and merged
    (`merge`, the Beam pipeline) keep the examples a sequential run keeps."""

    def __init__(self, examples: int = 3):
        self.counts: collections.Counter = collections.Counter()
        self.keyed: dict[str, list] = collections.defaultdict(list)  # reason -> [(key, where)]
        self.n_examples = examples
        self._seq = 0

    def add(self, reason: str, where: str, n: int = 1, key=None) -> None:
        self.counts[reason] += n
        self._seq += 1
        _keep_earliest(
            self.keyed[reason], [(self._seq if key is None else key, where)], self.n_examples
        )

    def merge(self, other: SkipLog) -> SkipLog:
        self.counts.update(other.counts)
        for reason, ex in other.keyed.items():
            _keep_earliest(self.keyed[reason], ex, self.n_examples)
        return self

    def rekey(self, prefix: tuple) -> SkipLog:
        """Orders this log's examples after `prefix` (e.g. a file's place among all files)."""
        for ex in self.keyed.values():
            ex[:] = [((*prefix, k if isinstance(k, tuple) else (k,)), w) for k, w in ex]
        return self

    @property
    def examples(self) -> dict[str, list[str]]:
        return {r: [w for _, w in ex] for r, ex in self.keyed.items()}


def _keep_earliest(into: list, new: list, n: int) -> None:
    into.extend(new)
    if len(into) > n:
        into.sort(key=lambda e: e[0])
        del into[n:]


def expand(path: str, skips: SkipLog) -> list[str]:
    """Files named by a path, directory (recursive, links not followed into loops) or glob;
    sorted."""
    path = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        out = []
        for p in glob.glob(path, recursive=True):
            out += expand(p, skips) if os.path.isdir(p) else [p]
        return sorted(set(out))
    if os.path.isdir(path):
        out, seen = [], set()
        for d, dirs, files in os.walk(path, followlinks=True):
            real = os.path.realpath(d)
            if real in seen:
                skips.add("symlink loop", d)
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            out += [os.path.join(d, f) for f in sorted(files)]
        return out
    if os.path.lexists(path):
        return [path]
    skips.add("missing path", path)
    return []


def _open_bytes(path: str) -> io.BufferedIOBase:
    return decompressed(path, open(path, "rb"))


def decompressed(path: str, raw) -> io.BufferedIOBase:
    """A reader of `raw` (a binary file object) decompressed as the name's extension says."""
    if path.endswith(".gz"):
        f = gzip.GzipFile(fileobj=raw, mode="rb")
        f.myfileobj = raw  # closed with it, as gzip.open arranges for the files it opens
        return f
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise _Skip("zstd file but the zstandard package is not installed") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


class _Skip(Exception):
    pass


def _base_ext(path: str) -> str:
    base = (
        path[:-3]
        if path.endswith(".gz")
        else path[:-4]
        if path.endswith(".zst")
        else path[:-5]
        if path.endswith(".zstd")
        else path
    )
    return os.path.splitext(base)[1].lower()


def _decode(data: bytes, repair: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if not repair:
            raise _Skip("invalid UTF-8") from None
        return data.decode("utf-8", errors="replace")


class LocalFiles:
    """How `read_file` reaches a file: the local filesystem. `moejax.data.beam` passes one backed
    by Beam's FileSystems (gs://, s3://, hdfs://) with the same three methods."""

    @staticmethod
    def isfile(path: str) -> bool:
        return os.path.isfile(path)

    @staticmethod
    def size(path: str) -> int:
        return os.path.getsize(path)

    @staticmethod
    def open(path: str):
        """The file's bytes, decompressed by its extension."""
        return _open_bytes(path)


def read_file(
    path: str,
    fmt: str,
    text_field: str,
    repair_utf8: bool,
    skips: SkipLog,
    max_bytes: int,
    fs=LocalFiles,
) -> Iterator[tuple[str, str]]:
    """(text, where) pairs of one file; problems are recorded in skips."""
    ext = _base_ext(path)
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(ext, "text")
    try:
        if not fs.isfile(path):
            raise _Skip("not a regular file")
        if fs.size(path) == 0:
            raise _Skip("empty file")
        if fmt == "parquet":
            yield from _read_parquet(path, text_field, skips, fs)
            return
        with fs.open(path) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _Skip(f"larger than {max_bytes} bytes")
        if not data.strip():
            raise _Skip("empty file")
        if b"\x00" in data[:8192] and fmt == "text":
            raise _Skip("binary file")
        if fmt == "jsonl":
            for i, line in enumerate(data.split(b"\n")):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec[text_field]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    skips.add("malformed JSON line", f"{path}:{i + 1}")
                    continue
                yield text, f"{path}:{i + 1}"
        elif fmt == "json":
            try:
                recs = json.loads(_decode(data, repair_utf8))
            except ValueError:
                raise _Skip("malformed JSON file") from None
            for i, rec in enumerate(recs if isinstance(recs, list) else [recs]):
                text = rec.get(text_field) if isinstance(rec, dict) else None
                if isinstance(text, str):
                    yield text, f"{path}[{i}]"
                else:
                    skips.add("malformed JSON record", f"{path}[{i}]")
        else:
            yield _decode(data, repair_utf8), path
    except _Skip as e:
        skips.add(str(e), path)
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        reason = (
            "truncated or corrupt compressed file"
            if isinstance(e, (EOFError, gzip.BadGzipFile))
            or path.endswith((".gz", ".zst", ".zstd"))
            else "unreadable file"
        )
        skips.add(reason, path)
    except Exception as e:  # a decompressor's own error types (zstd): data never crashes the run
        skips.add(f"unreadable file ({type(e).__name__})", path)


def _excluded(path: str, patterns: list[str]) -> bool:
    parts = path.split(os.sep)
    return any(
        fnmatch.fnmatch(path, p) or any(fnmatch.fnmatch(part, p) for part in parts)
        for p in patterns
    )


def _read_parquet(path, text_field, skips, fs=LocalFiles):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _Skip("parquet file but pyarrow is not installed") from None
    try:
        if fs is LocalFiles:
            table = pq.read_table(path, columns=[text_field])
        else:
            with fs.open(path) as f:
                table = pq.read_table(f, columns=[text_field])
    except Exception:
        raise _Skip("unreadable parquet file") from None
    for i, text in enumerate(table.column(text_field).to_pylist()):
        if isinstance(text, str):
            yield text, f"{path}[{i}]"
        else:
            skips.add("malformed parquet row", f"{path}[{i}]")


SOURCE_KEYS = (
    "name",
    "path",
    "format",
    "text_field",
    "kind",
    "weight",
    "repair_utf8",
    "exclude",
    "max_files",
)


def files(source: dict, skips: SkipLog) -> list[str]:
    """The files of one source config, sorted: `path` expanded, `exclude` patterns dropped, the
    first `max_files` (0 = all)."""
    unknown = set(source) - set(SOURCE_KEYS)
    if unknown:
        raise ValueError(
            f"sources[{source.get('name', '?')}].{sorted(unknown)[0]}: unknown key; "
            f"known: {', '.join(SOURCE_KEYS)}"
        )
    exclude = list(source.get("exclude", ()))
    out = [p for p in expand(source["path"], skips) if not (exclude and _excluded(p, exclude))]
    return out[: source["max_files"]] if source.get("max_files") else out


def documents(source: dict, skips: SkipLog, max_bytes: int = 256 << 20) -> Iterator[Document]:
    """Documents of one source config: name, path, format ('auto'), text_field ('text'), kind
    ('text' | 'code'), repair_utf8 (False), exclude (fnmatch patterns matched against each path
    component and the whole path, e.g. ["site-packages", "test*"]), max_files (0 = all)."""
    for path in files(source, skips):
        yield from file_documents(source, path, skips, max_bytes)


def file_documents(
    source: dict, path: str, skips: SkipLog, max_bytes: int = 256 << 20, fs=LocalFiles
) -> Iterator[Document]:
    """The documents of one file of a source."""
    name = source["name"]
    kind = source.get("kind", "text")
    lang = CODE_EXTENSIONS.get(_base_ext(path), "") if kind == "code" else ""
    if kind == "code" and not lang:
        skips.add("not a known code extension", path)
        return
    for text, where in read_file(
        path,
        source.get("format", "auto"),
        source.get("text_field", "text"),
        source.get("repair_utf8", False),
        skips,
        max_bytes,
        fs,
    ):
        yield Document(text, name, where, lang)
