"""The Beam pipeline (moejax.data.beam) on the local runner keeps exactly the documents the
single-machine pipeline keeps, counts the same, and writes a dataset training reads."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from moejax.data import beam, dataset, layout, prepare, stages
from moejax.data.packing import decode_row
from tests.test_prepare import _config, _doc, raw  # noqa: F401  (raw: the planted corpus fixture)


def _documents(path: str, split: str) -> collections.Counter:
    """Every document of a split as its token sequence (BOS..EOS), from the packed rows of all
    shards."""
    from array_record.python.array_record_module import ArrayRecordReader

    seq_len = layout.read_manifest(path)["seq_len"]
    docs = collections.Counter()
    tok = layout.tokenizer(path)
    for shard in layout.shard_paths(path, split):
        r = ArrayRecordReader(shard)
        rows = [decode_row(b, seq_len) for b in r.read_all()]
        r.close()
        stream = np.concatenate(
            [x["tokens"][x["segment_ids"] > 0] for x in rows] or [np.zeros(0, np.int32)]
        ).tolist()
        cur = []
        for t in stream:
            cur.append(t)
            if t == tok.eos_id:
                docs[tuple(cur)] += 1
                cur = []
        assert not cur
    return docs


def _more_formats(root) -> dict:
    """A source of Parquet and zstd files (valid, corrupt, and a row that is not text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    d = root / "more"
    d.mkdir()
    pq.write_table(pa.table({"text": [_doc(rng) for _ in range(4)] + [None]}), d / "a.parquet")
    (d / "broken.parquet").write_bytes(b"PAR1 not really")
    try:
        import zstandard

        z = zstandard.ZstdCompressor().compress(
            "\n".join(json.dumps({"text": _doc(rng)}) for _ in range(3)).encode()
        )
        (d / "b.jsonl.zst").write_bytes(z)
        (d / "cut.jsonl.zst").write_bytes(z[: len(z) // 2])
    except ImportError:  # both pipelines then skip nothing here
        pass
    return {"name": "more", "path": str(d), "kind": "text"}


@pytest.fixture(scope="module")
def both(raw, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("both")
    cfg = _config(raw, fim_rate=1.0)
    cfg["sources"].append(_more_formats(out))
    ref = prepare.prepare(cfg, str(out / "local"), quiet=True)
    old = beam.SHARD_BYTES
    beam.SHARD_BYTES = 2000  # several shards per split
    try:
        got = beam.run(cfg, str(out / "beam"), quiet=True)
    finally:
        beam.SHARD_BYTES = old
    return out, ref, got


def test_beam_keeps_the_same_documents_and_counts_as_the_local_pipeline(both):
    out, ref, got = both
    for k in ("stages", "skipped_inputs", "changes", "near_duplicate_clusters"):
        assert got["counts"][k] == ref["counts"][k], k
    assert ref["counts"]["stages"]["near_dedup"]["removed"] >= 1
    assert ref["counts"]["changes"]["fim documents"] >= 1
    assert (out / "beam" / layout.TOKENIZER).read_bytes() == (
        out / "local" / layout.TOKENIZER
    ).read_bytes()
    for split in layout.SPLITS:
        assert _documents(str(out / "beam"), split) == _documents(str(out / "local"), split)
        for k in ("documents", "tokens", "bytes"):
            assert got["splits"][split][k] == ref["splits"][split][k], (split, k)
    assert len(got["splits"]["train"]["shards"]) > 1
    local_report = (out / "local" / "report.md").read_text()
    beam_report = (out / "beam" / "report.md").read_text()
    section = lambda r: r[r.index("## Top removal reasons") : r.index("## Output")]  # noqa: E731
    assert section(beam_report) == section(local_report)  # the same examples too
    assert (out / "beam" / "lengths.png").exists()
    b = dataset.Batches(str(out / "beam"), "train", 2, seed=0)
    batch = next(b)
    assert batch["tokens"].shape == (2, 64) and batch["segment_ids"].max() >= 1


def test_near_duplicate_clusters_are_connected_components():
    """A chain: B is near A (A is the centre of their bucket), C is near B in a bucket B heads,
    C is not near A: one cluster {A, B, C} keeps A only. D joins nothing."""
    nd = stages.NearDedup(8, 2, 0.5, 3)
    a = np.arange(8, dtype=np.uint64)
    b = a.copy()
    b[:3] += 100  # 5 of 8 agree with a
    c = b.copy()
    c[4:7] += 100  # 5 of 8 agree with b, 2 with a
    d = a + 1000
    assert nd.add_signature(a, [1, 2]) is None
    assert nd.add_signature(b, [1, 3]) == 0
    assert nd.add_signature(c, [3, 4]) == 1
    assert nd.add_signature(d, [4, 5]) is None  # bucket 4's centre is c: not similar
    assert nd.duplicates().tolist() == [False, True, True, False]
    assert nd.cluster_sizes() == [3]


def test_bad_beam_options_and_outputs_fail_before_any_work(raw, tmp_path):  # noqa: F811
    cfg = _config(raw)
    with pytest.raises(ValueError, match="--no_such_option"):
        beam.run(cfg, str(tmp_path / "a"), ["--no_such_option=1"], quiet=True)
    with pytest.raises(ValueError, match="runner=NoSuchRunner"):
        beam.run(cfg, str(tmp_path / "a"), ["--runner=NoSuchRunner"], quiet=True)
    # a runner whose workers are other machines cannot use local paths (checked before any work)
    with pytest.raises(ValueError, match="--out=.*a local path, but FlinkRunner"):
        beam.run(cfg, str(tmp_path / "a"), ["--runner=FlinkRunner"], quiet=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write"):
        beam.run(cfg, str(tmp_path / "file" / "ds"), [], quiet=True)
    with pytest.raises(ValueError, match="stages.nope"):
        beam.run(_config(raw, nope=1), str(tmp_path / "a"), [], quiet=True)
    assert not (tmp_path / "a").exists()


def test_a_failed_beam_job_leaves_nothing_that_looks_complete(raw, tmp_path, monkeypatch):  # noqa: F811
    def boom(*a, **k):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(beam, "_pack_pipeline", boom)
    with pytest.raises(RuntimeError, match="worker lost"):
        beam.run(_config(raw), str(tmp_path / "ds"), quiet=True)
    assert not (tmp_path / "ds").exists()
    assert not layout.is_complete(str(tmp_path / ".ds.beam-building"))


def test_the_cli_refuses_a_bad_beam_option_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moejax.data.prepare",
            "--config",
            f"{ROOT}/experiments/data/stdlib.py",
            "--out",
            str(tmp_path / "ds"),
            "--runner",
            "beam",
            "--",
            "--no_such_option=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: Beam option --no_such_option")
    assert not (tmp_path / "ds").exists()
