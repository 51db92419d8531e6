"""The training entry point end to end: outputs, exact resume after SIGKILL, preemption, bad
input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest

from moejax.config import Config
from moejax.train import TrainingError, run
from moejax.trainer.checkpoint import IncompatibleCheckpoint
from tests.helpers import ROOT, override_flags, run_module, tiny_config

RESUME_STEPS = 40  # long enough that the killed run is always stopped part-way


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def _losses(workdir):
    return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


def _final_params(workdir, cfg: Config):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(cfg.train.steps), "state")
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(path)
    return tree


def _spawn(workdir, cache, *extra):
    cmd = [
        sys.executable,
        "-m",
        "moejax.train",
        "--config",
        os.path.join(ROOT, "experiments", "moe.py"),
        "--workdir",
        str(workdir),
        *override_flags(cache),
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def _wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if os.path.exists(path):
            steps = [m["step"] for m in _metrics(workdir)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def _benchmark_files(root) -> str:
    """ARC-Easy and GSM8K fixture files (the Hub layouts); eval.data for them."""
    os.makedirs(f"{root}/arc", exist_ok=True)
    os.makedirs(f"{root}/gsm8k", exist_ok=True)
    arc = [
        {"id": str(i), "question": f"What does def {i} do?", "answerKey": "A",
         "choices": {"text": ["defines a function", "imports"], "label": ["A", "B"]}}
        for i in range(3)
    ]  # fmt: skip
    gsm = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
           for i in range(3)]  # fmt: skip
    for path, rows in (("arc/test.jsonl", arc), ("arc/train.jsonl", arc),
                       ("gsm8k/test.jsonl", gsm), ("gsm8k/train.jsonl", gsm)):  # fmt: skip
        with open(f"{root}/{path}", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return f"arc_easy={root}/arc,gsm8k={root}/gsm8k"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_cache):
    """40 steps, with two benchmarks scored at steps 20 and 40 (moejax.eval during training)."""
    cfg = tiny_config(corpus_cache)
    bench = dataclasses.replace(
        cfg.eval,
        tasks="arc_easy,gsm8k",
        data=_benchmark_files(str(tmp_path_factory.mktemp("bench"))),
        every=20,
        limit=2,
        num_fewshot=1,
        max_gen_toks=8,
        batch_size=4,
    )
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=RESUME_STEPS), eval=bench
    )
    wd = str(tmp_path_factory.mktemp("uninterrupted"))
    last = run(cfg, wd, quiet=True)
    return cfg, wd, last


def test_run_writes_metrics_tensorboard_checkpoints_and_learns(uninterrupted):
    cfg, wd, last = uninterrupted
    ms = _metrics(wd)
    steps = [m["step"] for m in ms if "loss" in m]
    assert steps == list(range(1, cfg.train.steps + 1))
    for key in (
        "loss",
        "lr",
        "tokens_per_sec",
        "mfu",
        "grad_norm",
        "moe/load_cv",
        "moe/bias_range",
    ):
        assert key in ms[-2], key
    losses = [m["loss"] for m in ms if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    assert "val_loss" in ms[-1] and np.isfinite(ms[-1]["val_loss"])
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == [
        "32",
        "36",
        "40",
    ]  # keep 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(wd, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == steps
    assert "moe/load_cv/layer_0" in acc.Tags()["scalars"]
    # the benchmarks, scored from the train state at steps 20 and 40 (lm-eval's metrics)
    for key in ("eval/arc_easy/acc", "eval/arc_easy/acc_norm",
                "eval/gsm8k/exact_match/strict-match",
                "eval/gsm8k/exact_match/flexible-extract"):  # fmt: skip
        logged = [(m["step"], m[key]) for m in ms if key in m]
        assert [st for st, _ in logged] == [20, 40] and all(0 <= v <= 1 for _, v in logged), key
        assert [e.step for e in acc.Scalars(key)] == [20, 40]
    assert last["eval/arc_easy/acc_norm"] == ms[-1]["eval/arc_easy/acc_norm"]


def test_benchmarks_during_training_equal_evaluating_the_checkpoint(uninterrupted):
    """The scores logged at the last step are those of `moejax.eval` on the saved step (the
    scorer compiled at step 20 was given the step-40 parameters, with no stale cached scores)."""
    from moejax.eval.run import evaluate
    from moejax.infer.load import load

    cfg, wd, last = uninterrupted
    model, tok = load(wd)
    r = evaluate(cfg.eval.to_eval_config(), model, tok)["results"]
    for task, metric in (("arc_easy", "acc_norm"), ("gsm8k", "exact_match,flexible-extract")):
        key = f"eval/{task}/{metric.replace(',', '/')}"
        assert last[key] == pytest.approx(r[task][metric]["value"], abs=1e-6), key


def test_report_plots_the_real_run(uninterrupted, tmp_path):
    """`python -m moejax.report` on the run the trainer just wrote (synthetic runs: test_report)."""
    _, wd, _ = uninterrupted
    r = run_module("moejax.report", wd, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "report.md").read_text()
    for stem in (
        "loss",
        "lr",
        "grad_norm",
        "throughput",
        "moe_load_cv",
        "moe_bias_range",
        "benchmarks",
    ):
        assert f"({stem}.png)" in md
        img = matplotlib.image.imread(tmp_path / f"{stem}.png")
        assert img.shape[0] > 100 and img[..., :3].std() > 0.05


def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path, corpus_cache):
    cfg, wd_a, _ = uninterrupted
    wd_b = tmp_path / "killed"
    proc = _spawn(wd_b, corpus_cache, f"--config.train.steps={RESUME_STEPS}")
    _wait_for_step(
        wd_b, 10, proc
    )  # checkpoints at 4 and 8 exist; the kill lands wherever the run is
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(wd_b)) < cfg.train.steps
    # A save that never finished (as a crash mid-write leaves it) must not count as complete.
    partial = wd_b / "checkpoints" / f"{RESUME_STEPS - 1}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    run(cfg, str(wd_b), quiet=True)  # resumes from the latest complete checkpoint
    assert _losses(wd_b) == _losses(wd_a)  # every per-step loss, bit for bit
    a, b = _final_params(wd_a, cfg), _final_params(wd_b, cfg)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_sigterm_saves_and_exits_cleanly(tmp_path, corpus_cache):
    wd = tmp_path / "preempted"
    proc = _spawn(wd, corpus_cache, "--config.train.steps=200", "--config.train.ckpt_every=100")
    _wait_for_step(wd, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    saved = [int(x) for x in os.listdir(wd / "checkpoints") if x.isdigit()]
    assert saved and 2 <= max(saved) < 100


def test_incompatible_checkpoint_is_refused(uninterrupted):
    cfg, wd, _ = uninterrupted
    other = dataclasses.replace(cfg, model=cfg.model.replace(hidden_size=96))
    with pytest.raises(
        IncompatibleCheckpoint, match="model.hidden_size: checkpoint 64 vs config 96"
    ):
        run(other, wd, quiet=True)


def test_a_checkpoint_from_another_parameter_layout_is_refused_with_the_paths(uninterrupted):
    """Same config, different code (a module renamed, as the Router move did): refused with the
    paths before Orbax is asked to restore it."""
    import jax
    from flax import nnx

    from moejax.trainer import setup
    from moejax.trainer.checkpoint import Checkpointer

    cfg, wd, _ = uninterrupted
    abstract = setup.build(cfg).abstract
    ckpt = Checkpointer(wd, cfg)
    saved = {k: v for k, v in abstract.items() if k not in setup.NOT_SAVED}
    ckpt.check_layout(cfg.train.steps, saved)  # this code's own checkpoint: accepted
    pure = jax.tree.map(lambda x: x, nnx.to_pure_dict(saved["params"]))
    pure["segments"][1]["ffn"]["gate"] = pure["segments"][1]["ffn"].pop("router")
    msg = (
        r"missing \['params/segments/1/ffn/gate/w'\], unexpected \['params/segments/1/ffn/router/w'"
    )
    with pytest.raises(IncompatibleCheckpoint, match=msg):
        ckpt.check_layout(cfg.train.steps, dict(saved, params=pure))
    ckpt.close()


def test_unwritable_workdir_fails_first(tmp_path, corpus_cache):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="not writable"):
        run(tiny_config(corpus_cache), str(blocker / "run"), quiet=True)
    # a benchmark's data is checked before the first step, not at the first evaluation
    cfg = tiny_config(corpus_cache)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tasks="mmlu"))
    with pytest.raises(TrainingError, match=r"^eval.data.mmlu: where are its files"):
        run(cfg, str(tmp_path / "bench"), quiet=True)
    assert not os.path.exists(tmp_path / "bench" / "checkpoints")


def test_repeated_nonfinite_steps_stop_with_a_message(tmp_path, corpus_cache):
    cfg = tiny_config(corpus_cache)
    cfg = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, lr=1e30, clip_norm=0.0, warmup_steps=0),
        train=dataclasses.replace(cfg.train, steps=20, max_nonfinite_steps=3, ckpt_every=0),
    )
    with pytest.raises(TrainingError, match="consecutive steps had a non-finite loss"):
        run(cfg, str(tmp_path / "nan"), quiet=True)
    assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "20")


@pytest.mark.parametrize(
    "flag,msg",
    [
        ("--config.model.foo=1", "--config.model.foo: unknown key 'foo' in model"),
        (
            "--config.model.router.score_func=relu",
            "error: model.router.score_func: got 'relu', allowed: 'softmax', 'sigmoid'",
        ),
        ("--config.train.steps=abc", "--config.train.steps=abc: invalid literal for int()"),
    ],
)
def test_cli_bad_config_is_one_clear_line(flag, msg, tmp_path):
    r = run_module(
        "moejax.train",
        "--config",
        os.path.join(ROOT, "experiments", "moe.py"),
        flag,
        "--workdir",
        str(tmp_path),
        timeout=120,
    )
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_samples_and_the_generate_cli_from_a_workdir(uninterrupted, tmp_path, capsys):
    """The run's samples are prompted with validation openings; `python -m moejax.generate` loads
    the workdir's parameters (not its optimizer state) and writes JSONL; a bad request is one error
    line."""
    from moejax.data import layout, mixture
    from moejax.generate import main
    from moejax.train import sample_prompts

    cfg, wd, _ = uninterrupted
    data = mixture.resolve(cfg.data, cfg.model.vocab_size)
    tok = layout.tokenizer(data)
    prompts = sample_prompts(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_samples=3)), data
    )
    assert len(prompts) == 3 and all(len(p) == cfg.train.sample_prompt_tokens for p in prompts)
    assert (
        len({tuple(p) for p in prompts}) == 3 and prompts[0][0] == tok.bos_id
    )  # document starts first

    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text(
        json.dumps({"prompt_tokens": prompts[0], "max_new_tokens": 4})
        + "\n"
        + json.dumps({"prompt": "def main(", "temperature": 0.8, "seed": 2})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "--model",
                wd,
                "--prompts",
                str(reqs),
                "--max_new_tokens",
                "6",
                "--output",
                str(out),
                "--batch_size",
                "1",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(r["tokens"]) <= n for r, n in zip(rows, (4, 6))] == [True, True]
    assert rows[1]["text"] == tok.decode(rows[1]["tokens"]) and rows[0]["finish_reason"] in (
        "length",
        "eos",
    )
    reqs.write_text('{"prompt": "x", "temprature": 1}\n')
    assert main(["--model", wd, "--prompts", str(reqs)]) == 2
    assert "unknown request field 'temprature'" in capsys.readouterr().err
