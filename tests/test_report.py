"""moejax.report: plots and a markdown page from metrics.jsonl: one run, a running one, several."""

from __future__ import annotations

import json
import math
import os

import matplotlib.image
import numpy as np

from moejax import report


def _write_run(path, steps=20, layers=3, partial=False, extra=None):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            rec = {
                "step": s,
                "loss": 8.0 - 0.1 * s + 0.05 * rng.random(),
                "ce_loss": 6.0 - 0.1 * s,
                "lr": min(s / 5, 1.0) * 1e-3,
                "grad_norm": 1.0 + rng.random(),
                "tokens_per_sec": float("nan") if s == 1 else 1000.0 + rng.random(),
                "mfu": float("nan"),
                "moe/max_over_mean_load": (1 + rng.random(layers)).tolist(),
                "moe/load_cv": rng.random(layers).tolist(),
                "moe/drop_fraction": [0.0] * layers,
                "moe/bias_range": (0.001 * s * np.arange(1, layers + 1)).tolist(),
                **(extra or {}),
            }
            f.write(json.dumps(rec) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "val_loss": 5.0 - 0.05 * s}) + "\n")
        if partial:
            f.write('{"step": 21, "loss": 6.')  # the trainer is mid-write


def _png(path):
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    assert img[..., :3].std() > 0.05, f"{path} is blank"
    return img


def test_series_and_layer_matrix_read_what_was_logged(tmp_path):
    _write_run(tmp_path / "a", steps=20, layers=3, partial=True)
    run = report.load(str(tmp_path / "a"))
    assert run.skipped_lines == 1 and len(run.records) == 22
    s, v = run.series("val_loss")
    assert s.tolist() == [10, 20] and np.allclose(v, [4.5, 4.0])
    steps, m = run.layer_matrix("moe/bias_range")
    assert steps.tolist() == list(range(1, 21)) and m.shape == (3, 20)
    assert np.allclose(m[:, 4], [0.005, 0.010, 0.015])
    assert run.last("mfu") is None and math.isclose(run.last("val_loss"), 4.0)


def test_cli_writes_the_plots_of_a_running_run_and_a_comparison(tmp_path):
    _write_run(tmp_path / "a" / "run", partial=True, extra={"val_reward": 0.5})
    _write_run(tmp_path / "b" / "run", steps=12, layers=3)
    out = tmp_path / "cmp"
    assert (
        report.main([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(out)])
        == 0
    )
    md = (out / "report.md").read_text()
    stems = [
        "loss",
        "lr",
        "grad_norm",
        "throughput",
        "moe_max_over_mean_load",
        "moe_load_cv",
        "moe_drop_fraction",
        "moe_bias_range",
        "other",
    ]
    for stem in stems:
        assert f"![{stem}]({stem}.png)" in md
        _png(out / f"{stem}.png")
    assert "mfu.png" not in md  # no finite MFU logged: no empty panel
    assert "run (1)" in md and "run (2)" in md  # same folder names get told apart
    assert "1 unreadable line(s) skipped" in md
    # one heatmap per run plus the comparison below them
    assert _png(out / "moe_load_cv.png").shape[0] > _png(out / "loss.png").shape[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no records yet" in capsys.readouterr().err
    _write_run(tmp_path / "a")
    assert report.main([str(tmp_path / "a"), "--names", "x,y"]) == 2


def test_the_trainer_resumes_past_a_half_written_metrics_line(tmp_path):
    """A run killed mid-write leaves half a line; resuming drops it (and every line past the
    restored step) instead of failing to parse it."""
    from moejax.trainer.metrics import MetricWriter

    _write_run(tmp_path, steps=12, partial=True)
    writer = MetricWriter(str(tmp_path), resume_step=8)
    writer.write(9, {"loss": 1.0})
    writer.close()
    run = report.load(str(tmp_path))
    assert run.skipped_lines == 0
    assert [r["step"] for r in run.records if "loss" in r] == list(range(1, 10))
