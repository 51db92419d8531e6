"""Pretraining entry point.

  python -m moejax.train --config experiments/moe.py [--config.train.steps=N ...] [--workdir DIR]

Re-running with the same workdir resumes from its latest complete checkpoint. SIGTERM or SIGINT
saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time

import jax
import numpy as np

from moejax import distributed, sharding
from moejax.config import Config, ConfigError
from moejax.data import dataset, layout, mixture
from moejax.model.stats import param_counts, train_flops_per_token
from moejax.trainer import metrics as metrics_lib
from moejax.trainer.checkpoint import Checkpointer, IncompatibleCheckpoint


class TrainingError(RuntimeError):
    pass


def check_workdir(workdir: str) -> None:
    """Fails before any compilation if the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # one probe per process: the processes of a multi-host job share the workdir
        probe = os.path.join(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def global_batch(local: dict, batch_sh) -> dict:
    """This process's rows -> one global array per field, laid out by the batch sharding."""
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}


class _NullWriter:
    def write(self, step, values):
        pass

    def close(self):
        pass


def evaluate(eval_step, state, data, cfg: Config, batch_sh, metrics: dict | None = None) -> float:
    """Validation loss over the first eval_batches batches (always the same ones): cross-entropy per
    token, or (DPO) the loss per pair, whose held-out preference accuracy goes to
    metrics['val_accuracy']."""
    batches = dataset.Batches(
        data,
        "validation",
        cfg.train.batch_size,
        seed=0,
        shuffle=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    sums: dict = {}
    for _ in range(max(cfg.train.eval_batches, 1)):
        batch = global_batch(next(batches), batch_sh)
        out = jax.device_get(
            eval_step(
                state["params"], state["router"], batch, state.get("frozen"), state.get("reference")
            )
        )
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    count = max(sums["count"], 1.0)
    if metrics is not None and "correct" in sums:
        metrics["val_accuracy"] = sums["correct"] / count
    return sums["loss"] / count


def validate(eval_step, state, data, cfg: Config, batch_sh, on_policy=None) -> dict:
    """The held-out metrics logged at eval_every and at the end: val_loss (+ val_accuracy for
    preference runs), or an on-policy run's own evaluation (GRPO: val_reward, val_format)."""
    if on_policy is not None:
        return on_policy.evaluate(state)
    extra: dict = {}
    val = evaluate(eval_step, state, data, cfg, batch_sh, extra)
    return {"val_loss": val, **extra}


def sample_prompts(cfg: Config, data) -> list:
    """The samples' prompts: cfg.train.sample_prompts, else openings of sample_prompt_tokens
    validation tokens (ids): document starts (from BOS) first, then the starts of rows (long
    documents span many rows), so a run on plays or another language is prompted in kind."""
    n = cfg.train.num_samples
    if cfg.train.sample_prompts:
        return list(cfg.train.sample_prompts[:n])
    k = cfg.train.sample_prompt_tokens
    bos = layout.tokenizer(data).bos_id
    batches = dataset.Batches(data, "validation", 16, seed=0, shuffle=False)
    docs, rows = [], []
    for _ in range(4):
        b = next(batches)
        for i, (toks, seg, pos) in enumerate(zip(b["tokens"], b["segment_ids"], b["positions"])):
            for s in np.flatnonzero((pos == 0) & (seg > 0)):  # a document or a row begins
                if (
                    "loss_mask" in b
                ):  # fine-tuning rows: the example's prompt, up to its first answer token
                    answer = np.flatnonzero((seg == seg[s]) & (b["loss_mask"][i] > 0))
                    if len(answer):
                        docs.append(tuple(int(t) for t in toks[s : answer[0]]))
                elif s + k <= len(toks) and (seg[s : s + k] == seg[s]).all():
                    (docs if toks[s] == bos else rows).append(
                        tuple(int(t) for t in toks[s : s + k])
                    )
    return [list(p) for p in dict.fromkeys(docs + rows)][:n]


def inference_model(cfg: Config, ts, state):
    """The model of a train state, as the generator and the evaluation read it (LoRA merged)."""
    from flax import nnx

    model = nnx.merge(ts.graphdef, state["params"], state["router"], state.get("frozen", ts.rest))
    if cfg.lora.rank:
        from moejax.finetune import lora

        model = lora.merge(model)  # the generator decodes plain weights (absorbed MLA)
    return model


class Benchmarks:
    """cfg.eval's benchmarks (moejax.eval) on the train state: documents and prompts read once at
    the start (a bad location is an error before the first step), scored at every evaluation."""

    def __init__(self, cfg: Config, tokenizer):
        from moejax.eval.run import Benchmarks as Scorer

        if cfg.align.method == "reward":
            raise TrainingError(
                "eval.tasks: a reward model scores answers, it does not generate or rank text"
            )
        if jax.process_count() > 1:
            raise TrainingError(
                "eval.tasks: benchmarks during training run in one process for now (the "
                "generator is single-process); score the checkpoints with python -m moejax.eval"
            )
        try:
            self.scorer = Scorer(cfg.eval.to_eval_config(), tokenizer)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            msg = str(e)
            fields = {f.name for f in dataclasses.fields(cfg.eval)}
            named = msg.split(":")[0].split(".")[0] in fields
            raise TrainingError(f"eval.{msg}" if named else f"eval: {msg}") from None
        self.cfg = cfg

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every or self.cfg.train.eval_every
        return bool(every) and step % every == 0

    def __call__(self, ts, state) -> dict:
        results = self.scorer(inference_model(self.cfg, ts, state))
        self.scorer.lm.release()  # no reference to this step's (or a LoRA-merged) weights stays
        return self.scorer.scalars(results)


def print_samples(cfg: Config, ts, state, data, tokenizer) -> None:
    """Continues the sample prompts with the KV-cache generator and prints them."""
    from moejax.infer import Generator, SamplingParams

    model = inference_model(cfg, ts, state)
    prompts = sample_prompts(cfg, data)
    params = [
        SamplingParams(
            temperature=cfg.train.temperature,
            top_p=0.95,
            max_new_tokens=cfg.train.sample_tokens,
            seed=cfg.train.seed + i,
        )
        for i in range(len(prompts))
    ]
    gen = Generator(model, tokenizer)
    outs = gen.generate(prompts, params)
    for p, o in zip(prompts, outs):
        shown = (
            p if isinstance(p, str) else tokenizer.decode([t for t in p if t != tokenizer.bos_id])
        )
        print(f"\n----- sample -----\n{shown}{o.text}", flush=True)
    s = gen.last_stats
    print(
        f"[train] samples: {s.generated_tokens} tokens in "
        f"{s.prefill_seconds + s.decode_seconds:.1f}s (compilation included)",
        flush=True,
    )


def run(
    cfg: Config,
    workdir: str,
    *,
    quiet: bool = False,
    max_steps_this_run: int | None = None,
    start_from=None,
) -> dict:
    """Trains cfg in workdir (resuming if it holds checkpoints). Returns the last logged metrics.

    max_steps_this_run stops (with a checkpoint) after that many steps: used by tests to
    simulate interruption. start_from (moejax.finetune) supplies the starting weights: its
    `init(ts)` gives the first state of a new run, `resume(ts, state)` completes a restored one
    (LoRA: the frozen base weights, which checkpoints do not hold).
    """
    check_workdir(workdir)
    if cfg.align.method and start_from is None:
        raise TrainingError(
            f"align.method={cfg.align.method!r} optimizes a base model against itself: run "
            "python -m moejax.finetune with --config.base="
        )
    if cfg.extend.rope_factor and start_from is None:
        raise TrainingError(
            "extend.rope_factor > 0 extends a pretrained model to a longer context: run python -m "
            "moejax.finetune with --config.base= (pretraining sets model.rope_type='yarn' itself)"
        )
    if cfg.lora.rank and start_from is None:
        raise TrainingError(
            "lora.rank > 0 trains adapters on a base model: run python -m moejax.finetune with "
            "--config.base="
        )
    t_start = time.time()
    primary = jax.process_index() == 0
    show = not quiet
    quiet = quiet or not primary  # one process reports
    # on-policy RL (GRPO): batches are generated from the state itself
    # (moejax.finetune.grpo.Rollouts)
    on_policy = getattr(start_from, "rollouts", None) if cfg.align.method == "grpo" else None
    if cfg.align.method == "grpo" and on_policy is None:
        raise TrainingError(
            "align.method='grpo' generates its batches: run python -m moejax.finetune"
        )
    if on_policy is not None:
        data, tokenizer, batches = None, on_policy.tokenizer, on_policy
    else:
        try:
            data = mixture.resolve(cfg.data, cfg.model.vocab_size)
            tokenizer = layout.tokenizer(data)
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(str(e)) from None
    # a released model's embedding may be padded past its tokenizer (DeepSeek: 102400 rows, fewer
    # tokens)
    if tokenizer.vocab_size > cfg.model.vocab_size or (
        not cfg.base and tokenizer.vocab_size != cfg.model.vocab_size
    ):
        raise TrainingError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of "
            f"{data[0][0] if data else cfg.base} has {tokenizer.vocab_size} pieces"
        )
    if on_policy is None:
        try:
            batches = dataset.Batches(
                data,
                "train",
                cfg.train.batch_size,
                cfg.train.seed + cfg.data.shuffle_seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                workers=cfg.data.workers,
            )
        except ValueError as e:
            raise TrainingError(str(e)) from None

    bench = Benchmarks(cfg, tokenizer) if cfg.eval.task_list() else None

    from moejax.trainer import setup as setup_lib

    ts = setup_lib.build(cfg)  # abstract: nothing allocated yet
    if on_policy is not None:
        on_policy.bind(ts, workdir)
    ckpt = Checkpointer(workdir, cfg)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt.check_compatible(latest)
        state, data_state = ts.restore(
            ckpt, latest
        )  # straight into the shardings; nothing initialized
        if start_from is not None:
            state = start_from.resume(ts, state)
        batches.restore(data_state)
        start = int(state["step"])
        print(f"[train] resumed from {ckpt.dir} at step {start}", flush=True)
    elif start_from is not None:
        state = start_from.init(ts)
    else:
        state = ts.init_state()  # one jitted program: each device computes its own shards
    batch_sh = ts.batch_sharding

    counts = param_counts(cfg.model)
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_src = metrics_lib.device_peak_flops(
        cfg.model.compute_dtype, measure=cfg.train.profile_peak
    )
    if not quiet:
        print(
            f"[train] {counts.total / 1e6:.2f}M parameters ({counts.activated / 1e6:.2f}M "
            f"activated, +{counts.mtp / 1e6:.2f}M MTP); {flops_per_token / 1e6:.1f} MFLOPs/token; "
            f"peak {peak / 1e9:.0f} GFLOP/s ({peak_src}); devices: {jax.device_count()} x "
            f"{jax.devices()[0].device_kind}",
            flush=True,
        )
        if cfg.execution.fp8:
            from moejax.kernels.fp8 import fallback_note

            print(f"[train] {fallback_note(jax.devices()[0], cfg.model.compute_dtype)}", flush=True)
        if ts.has_frozen:
            import math

            trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(ts.abstract["params"]))
            frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(ts.abstract["frozen"]))
            print(
                f"[train] LoRA rank {cfg.lora.rank}: {trainable / 1e6:.3f}M trainable adapter "
                f"parameters, {trainable / (trainable + frozen):.3%} of "
                f"{(trainable + frozen) / 1e6:.2f}M",
                flush=True,
            )

    train_step = ts.train_step()
    eval_step = ts.eval_step()
    writer = metrics_lib.MetricWriter(workdir, resume_step=start) if primary else _NullWriter()
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    last: dict = {}
    end = (
        cfg.train.steps
        if max_steps_this_run is None
        else min(cfg.train.steps, start + max_steps_this_run)
    )

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.train.steps, initial=start, disable=quiet, dynamic_ncols=True, desc="train"
    )
    t_last, steps_since = None, 0
    shown = {}
    if (
        on_policy is not None and start == 0 and cfg.train.eval_every
    ):  # the curve starts at the base's reward
        shown = validate(eval_step, state, data, cfg, batch_sh, on_policy)
    if bench is not None and start == 0 and start_from is not None:  # ... and the base's scores
        shown.update(bench(ts, state))
    if shown:
        writer.write(0, shown)
        bar.write("[train] step 0: " + "; ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    try:
        with Preemption() as pre:
            step = start
            while step < end:
                batch = global_batch(batches.next(state) if on_policy else next(batches), batch_sh)
                state, m = train_step(state, batch)
                step += 1
                steps_since += 1
                bar.update(1)
                if t_last is None:  # the first step compiles; time from its end
                    jax.block_until_ready(state["step"])
                    t_last, steps_since = time.perf_counter(), 0
                if step % cfg.train.log_every == 0 or step == end:
                    host = metrics_lib.to_host(m)
                    now = time.perf_counter()
                    if steps_since:
                        dt = (now - t_last) / steps_since
                        host.update(
                            step_time=dt,
                            tokens_per_sec=tokens_per_step / dt,
                            mfu=flops_per_token * tokens_per_step / dt / peak,
                        )
                    else:
                        host.update(
                            step_time=float("nan"), tokens_per_sec=float("nan"), mfu=float("nan")
                        )
                    t_last, steps_since = now, 0
                    if (
                        on_policy is not None
                    ):  # (its ce_loss is the policy objective, not a cross-entropy)
                        host.update(on_policy.metrics())
                    else:
                        host["perplexity"] = float(np.exp(min(host["ce_loss"], 50.0)))
                    writer.write(step, host)
                    last = host
                    bar.set_postfix(
                        loss=f"{host['loss']:.3f}",
                        tok_s=f"{host['tokens_per_sec']:.0f}",
                        mfu=f"{host['mfu']:.1%}",
                    )
                    nonfinite = int(jax.device_get(state["nonfinite"]))
                    if nonfinite >= cfg.train.max_nonfinite_steps:
                        raise TrainingError(
                            f"stopping: {nonfinite} consecutive steps had a non-finite loss or "
                            "gradient (updates skipped; last complete checkpoint kept). Lower "
                            "optim.lr or check the data."
                        )
                if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    ckpt.save(step, state, batches.state())
                if pre.requested:
                    ckpt.save(step, state, batches.state(), force=True)
                    ckpt.wait()
                    bar.write(f"[train] {pre.requested}: saved step {step} to {ckpt.dir}; exiting")
                    return last
                # evaluations come after the step's checkpoint: a failure in one loses no state
                shown = {}
                if (
                    cfg.train.eval_every
                    and step % cfg.train.eval_every == 0
                    and step < cfg.train.steps
                ):
                    shown = validate(eval_step, state, data, cfg, batch_sh, on_policy)
                if bench is not None and bench.due(step) and step < cfg.train.steps:
                    shown.update(bench(ts, state))
                if shown:
                    writer.write(step, shown)
                    bar.write(
                        f"[train] step {step}: "
                        + "; ".join(f"{k} {v:.4f}" for k, v in shown.items())
                    )
                    # the throughput logged next covers training steps only
                    t_last, steps_since = time.perf_counter(), 0
            if ckpt.latest_step() != step:
                ckpt.save(step, state, batches.state(), force=True)
            ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
        writer.close()

    if step >= cfg.train.steps:
        shown = validate(eval_step, state, data, cfg, batch_sh, on_policy)
        if bench is not None:
            shown.update(bench(ts, state))
        writer = metrics_lib.MetricWriter(workdir, resume_step=step) if primary else _NullWriter()
        writer.write(step, shown)
        writer.close()
        last.update(shown)
        if not quiet:
            if "val_loss" in shown:
                acc = (
                    f" (held-out preference accuracy {shown['val_accuracy']:.1%})"
                    if "val_accuracy" in shown
                    else ""
                )
                final = f"final val_loss {shown['val_loss']:.4f}{acc}"
            else:
                final = "held-out " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
            if bench is not None and "val_loss" in shown:
                final += "; " + ", ".join(
                    f"{k} {v:.4f}" for k, v in shown.items() if k.startswith("eval/")
                )
            print(
                f"[train] done: {step} steps in {time.time() - t_start:.0f}s; {final}; "
                f"outputs in {os.path.abspath(workdir)}",
                flush=True,
            )
        if (
            cfg.train.num_samples and show and jax.process_count() == 1 and data is not None
        ):  # host-local prompts
            print_samples(cfg, ts, state, data, tokenizer)
    return last


def main(argv):
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every save at INFO
    try:
        cfg = Config.from_dict(flags.FLAGS.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        distributed.initialize()
        run(cfg, flags.FLAGS.workdir)
    except (TrainingError, IncompatibleCheckpoint, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _entry():
    from moejax.experiment import config_cli

    config_cli(
        main,
        lambda flags: flags.DEFINE_string(
            "workdir", "runs/default", "where checkpoints, metrics and TensorBoard events go"
        ),
    )


if __name__ == "__main__":
    _entry()
