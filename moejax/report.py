"""Plots and a markdown page from a run's metrics.jsonl (or several runs, on the same axes).

    python -m moejax.report runs/tiny                       # -> runs/tiny/report/{report.md, *.png}
    python -m moejax.report runs/a runs/b --out runs/ab     # two runs compared on one set of plots

Panels, each drawn only when some run logged its metrics: training and validation loss; learning
rate; gradient norm; tokens/s and MFU; for MoE runs a heatmap per statistic of MoE layer x step
(max-over-mean expert load, load coefficient of variation, capacity drop fraction, the aux-loss-free
router-bias range) and its mean over layers per run; and any other scalar a run logged (SFT, DPO
and GRPO runs log their own). It reads a run that is still training: a half-written last line is
skipped. The notebooks draw with the same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

# Per-MoE-layer statistics the trainer logs as lists (moejax.model.stats), and how to title them.
LAYER_STATS = {
    "moe/max_over_mean_load": "expert load: max / mean",
    "moe/load_cv": "expert load: coefficient of variation",
    "moe/drop_fraction": "dropped token-expert assignments (capacity)",
    "moe/bias_range": "router correction bias: max - min",
}
# Scalars drawn in their own panels; everything else numeric goes to "other metrics".
PANELS = {
    "loss": ("loss", ["loss", "ce_loss", "val_loss"]),
    "lr": ("learning rate", ["lr"]),
    "grad_norm": ("gradient norm (before clipping)", ["grad_norm"]),
    "throughput": ("tokens / s", ["tokens_per_sec"]),
    "mfu": ("model FLOPs utilization", ["mfu"]),
}
_NOT_PLOTTED = {"step", "tokens", "step_time", "skipped"}


@dataclass
class Run:
    """One run's metrics: name, and the logged records in step order."""

    name: str
    records: list[dict] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar metric; records without it are left out, NaN kept."""
        pts = [
            (r["step"], float(r[key]))
            for r in self.records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, dtype=np.float64)

    def layer_matrix(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, [layers, steps] values) of a per-MoE-layer metric."""
        rows = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), list)]
        if not rows:
            return np.zeros(0), np.zeros((0, 0))
        width = max(len(v) for _, v in rows)
        # a config change mid-run: keep one shape
        rows = [(s, v) for s, v in rows if len(v) == width]
        return np.asarray([s for s, _ in rows]), np.asarray([v for _, v in rows], np.float64).T

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r}

    def last(self, key: str) -> float | None:
        _, v = self.series(key)
        v = v[np.isfinite(v)]
        return float(v[-1]) if len(v) else None


def load(workdir: str, name: str | None = None) -> Run:
    """The run in `workdir` (its metrics.jsonl). Lines that do not parse (the one a running trainer
    is writing, or a crash's remains) are counted in `skipped_lines`, not fatal."""
    path = workdir if workdir.endswith(".jsonl") else os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {workdir} a moejax workdir?)")
    run = Run(name or os.path.basename(os.path.normpath(os.path.dirname(path) or ".")))
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                run.records.append(rec)
            else:
                run.skipped_lines += 1
    run.records.sort(key=lambda r: r["step"])
    return run


def _names(runs: list[Run]) -> list[Run]:
    """Distinct labels: runs whose folders share a name are numbered, 'run (1)', 'run (2)'."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        for i, r in enumerate(runs):
            r.name = f"{r.name} ({i + 1})"
    return runs


# --------------------------------------------------------------------------------- figures


def _style(n: int, i: int) -> dict:
    return dict(color=plt.cm.tab10(i % 10), alpha=0.9 if n == 1 else 0.8)


def plot_scalars(runs: list[Run], keys: list[str], title: str, ax=None, logy: bool = False):
    """Every run's `keys` on one axes (train loss solid, validation dashed with markers)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, run in enumerate(runs):
        for j, key in enumerate(keys):
            s, v = run.series(key)
            ok = np.isfinite(v)
            if not ok.any():
                continue
            val = key.startswith(("val_", "eval/"))  # sparse points: markers
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            ax.plot(
                s[ok],
                v[ok],
                linestyle="--" if val else ("-" if j == 0 else ":"),
                marker="o" if val else None,
                markersize=3,
                label=label,
                **_style(len(runs), i),
            )
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if logy and drawn:
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def plot_layer_heatmap(run: Run, key: str, ax=None, title: str | None = None):
    """A heatmap of MoE layer x step for one per-layer statistic."""
    steps, m = run.layer_matrix(key)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 1.5 + 0.35 * max(m.shape[0], 1)))
    if m.size == 0:
        ax.set_axis_off()
        return ax
    im = ax.imshow(
        m,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, m.shape[0] - 0.5, -0.5),
    )
    ax.set_yticks(range(m.shape[0]))
    ax.set_ylabel("MoE layer")
    ax.set_xlabel("step")
    ax.set_title(title or f"{run.name}: {LAYER_STATS.get(key, key)}")
    plt.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return ax


def plot_layer_mean(runs: list[Run], key: str, ax=None):
    """The mean over MoE layers of a per-layer statistic, per run (how runs compare)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for i, run in enumerate(runs):
        steps, m = run.layer_matrix(key)
        if m.size:
            ax.plot(steps, m.mean(0), label=run.name, **_style(len(runs), i))
    ax.set_title(f"{LAYER_STATS.get(key, key)} (mean over MoE layers)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return ax


def _benchmarks(runs: list[Run]) -> dict[str, list[str]]:
    """{task: its eval/<task>/<metric> keys}: the benchmarks scored during training."""
    out: dict[str, list[str]] = {}
    for k in sorted(set().union(*(r.keys() for r in runs))):
        if k.startswith("eval/") and k.count("/") >= 2 and any(len(r.series(k)[0]) for r in runs):
            out.setdefault(k.split("/")[1], []).append(k)
    return out


def _other_scalars(runs: list[Run]) -> list[str]:
    taken = {k for _, keys in PANELS.values() for k in keys} | set(LAYER_STATS) | _NOT_PLOTTED
    out = set()
    for run in runs:
        for k in run.keys() - taken:
            if k.startswith("eval/") and k.count("/") >= 2:  # the benchmarks panel
                continue
            if len(run.series(k)[0]):
                out.add(k)
    return sorted(out)


def figures(runs: list[Run]) -> dict[str, plt.Figure]:
    """{file stem: figure} for every panel some run has data for."""
    figs = {}
    keys = set().union(*(r.keys() for r in runs))
    for stem, (title, ks) in PANELS.items():
        finite = [
            k for k in ks if k in keys and any(np.isfinite(r.series(k)[1]).any() for r in runs)
        ]
        if finite:
            fig, ax = plt.subplots(figsize=(7, 4))
            plot_scalars(runs, finite, title, ax)
            figs[stem] = fig
    for key in LAYER_STATS:
        with_data = [r for r in runs if r.layer_matrix(key)[1].size]
        if not with_data:
            continue
        stem = key.split("/")[-1]
        n = len(with_data)
        fig, axes = plt.subplots(n + 1, 1, figsize=(7.5, 3.2 * (n + 1)), squeeze=False)
        for ax, run in zip(axes[:n, 0], with_data):
            plot_layer_heatmap(run, key, ax)
        plot_layer_mean(with_data, key, axes[n, 0])
        fig.tight_layout()
        figs[f"moe_{stem}"] = fig
    bench = _benchmarks(runs)
    if bench:
        cols = min(3, len(bench))
        rows = math.ceil(len(bench) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (task, keys) in zip(axes.ravel(), bench.items()):
            plot_scalars(runs, keys, task, ax)
        for ax in axes.ravel()[len(bench) :]:
            ax.set_axis_off()
        fig.tight_layout()
        figs["benchmarks"] = fig
    other = _other_scalars(runs)
    if other:
        cols = 3
        rows = math.ceil(len(other) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 3 * rows), squeeze=False)
        for ax, key in zip(axes.ravel(), other):
            plot_scalars(runs, [key], key, ax)
        for ax in axes.ravel()[len(other) :]:
            ax.set_axis_off()
        fig.tight_layout()
        figs["other"] = fig
    return figs


# --------------------------------------------------------------------------------- the page


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        tok = run.series("tokens_per_sec")[1]
        tok = tok[np.isfinite(tok)]
        rows.append(
            [
                run.name,
                str(run.records[-1]["step"] if run.records else 0),
                _fmt(run.last("loss")),
                _fmt(run.last("val_loss")),
                _fmt(float(np.median(tok)) if len(tok) else None),
                _fmt(run.last("mfu")),
            ]
        )
    return rows


def write(workdirs: list[str], out: str | None = None, names: list[str] | None = None) -> str:
    """Writes `out`/report.md and one PNG per panel; returns the markdown path. `out` defaults to
    the first workdir's `report/`."""
    runs = _names([load(w, n) for w, n in zip(workdirs, names or [None] * len(workdirs))])
    if not any(r.records for r in runs):
        raise ValueError(f"{', '.join(workdirs)}: metrics.jsonl has no records yet")
    out = out or os.path.join(workdirs[0], "report")
    os.makedirs(out, exist_ok=True)
    lines = [f"# {' vs '.join(r.name for r in runs)}", ""]
    lines += [
        "| run | last step | loss | val_loss | tokens/s (median) | MFU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(runs)]
    skipped = sum(r.skipped_lines for r in runs)
    if skipped:
        lines += ["", f"{skipped} unreadable line(s) skipped (a run still writing, or a crash)."]
    for stem, fig in figures(runs).items():
        path = os.path.join(out, f"{stem}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)  # a reader (or a browser refreshing) never sees half a PNG
        plt.close(fig)
        lines += ["", f"![{stem}]({stem}.png)"]
    md = os.path.join(out, "report.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    return md


def main(argv=None) -> int:
    # Files only: never a window, and no display needed. (Importing this module leaves the backend
    # alone, so that a notebook's inline figures keep working.)
    matplotlib.use("Agg")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    ap.add_argument("--out", default=None, help="output folder (default: WORKDIR/report)")
    ap.add_argument("--names", default=None, help="comma-separated labels, one per workdir")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.workdirs):
        print(
            f"error: --names has {len(names)} labels for {len(args.workdirs)} workdirs",
            file=sys.stderr,
        )
        return 2
    try:
        md = write(args.workdirs, args.out, names)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
