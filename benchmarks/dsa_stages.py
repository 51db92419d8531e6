"""DeepSeek-V3.2's training recipe at CPU size, measured: a dense MLA base (deepseek_v3_tiny), new
lightning indexers warmed up alone while attention stays dense, then sparse training of everything;
and, for comparison, sparse training straight from the base without the warm-up.

  python -m benchmarks.dsa_stages [--out /tmp/dsa_stages] [--base_steps 240] [--steps 60]

Prints the validation loss (the same validation rows every time) of: the dense base; the base with
fresh indexers attending sparsely (top index_topk of 128 positions); after the warm-up (sparse);
after sparse training from the warm-up; after sparse training without it; and the control, the
dense base trained as many steps at the same learning rate. Runs go one after the other (never at
once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INDEX = {"index_topk": 32, "index_n_heads": 4, "index_head_dim": 16}


def _continual(base: str, stage: str, steps: int, lr: float, sparse: bool = True):
    from moejax.config import Config
    from moejax.experiment import load_config_file

    cd = load_config_file(os.path.join(ROOT, "experiments", "continual.py"))
    cd.base = base
    cd.data.source = "builtin"  # the base's own data: the stages change attention, not the domain
    cd.data.seq_len = 128
    cd.train.steps = steps
    cd.train.eval_every = steps
    cd.train.ckpt_every = steps
    cd.train.num_samples = 0
    cd.optim.lr = lr
    cd.model.dsa_stage = stage
    for k, v in (INDEX if sparse else {}).items():
        cd.model[k] = v
    return Config.from_dict(cd)


def _sparse_model(workdir: str, fresh_indexers: bool):
    """The model of a workdir attending sparsely (its own indexers, or fresh ones for a dense
    base)."""
    from flax import nnx

    from moejax.infer.load import load
    from moejax.model import Transformer

    model, _ = load(workdir)
    cfg = model.cfg.replace(dsa_stage="sparse", **(INDEX if fresh_indexers else {}))
    sparse = Transformer(cfg, rngs=nnx.Rngs(29))
    flat = nnx.to_flat_state(nnx.state(model))  # (a dense base has no indexers to copy)
    nnx.update(sparse, nnx.from_flat_state(list(flat)))
    return model, sparse


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/dsa_stages")
    p.add_argument("--base_steps", type=int, default=240)
    p.add_argument("--steps", type=int, default=60, help="steps of each later stage")
    p.add_argument("--batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--warmup_lr", type=float, default=1e-3, help="the indexers' (V3.2: 1e-3)")
    p.add_argument("--lr", type=float, default=1e-4, help="sparse training's and the control's")
    a = p.parse_args(argv)

    from moejax import train
    from moejax.config import Config
    from moejax.data import mixture
    from moejax.experiment import load_config_file
    from moejax.finetune import runner
    from moejax.infer.load import load

    shutil.rmtree(a.out, ignore_errors=True)
    names = ("base", "warmup", "sparse", "sparse_cold", "dense")
    dirs = {k: os.path.join(a.out, k) for k in names}
    times = {}
    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3_tiny.py"))
    cd.train.steps = a.base_steps
    cd.train.num_samples = 0
    base_cfg = Config.from_dict(cd)
    t0 = time.perf_counter()
    train.run(base_cfg, dirs["base"], quiet=True)
    times["base"] = time.perf_counter() - t0
    for name, base, stage, lr in (
        ("warmup", dirs["base"], "warmup", a.warmup_lr),
        ("sparse", dirs["warmup"], "sparse", a.lr),
        ("sparse_cold", dirs["base"], "sparse", a.lr),
        ("dense", dirs["base"], "sparse", a.lr),  # the control: the same steps, no indexers
    ):
        t0 = time.perf_counter()
        cfg = _continual(base, stage, a.steps, lr, sparse=name != "dense")
        runner.run(cfg, dirs[name], quiet=True)
        times[name] = time.perf_counter() - t0

    path = mixture.resolve(base_cfg.data, base_cfg.model.vocab_size)[0][0]

    def val(model):
        return runner.validation_loss(model, path, 128, 8, a.batches)

    dense_base, cold = _sparse_model(dirs["base"], fresh_indexers=True)
    rows = {
        "dense base (dense attention)": val(dense_base),
        "base + fresh indexers (sparse attention)": val(cold),
        "after the warm-up (sparse attention)": val(_sparse_model(dirs["warmup"], False)[1]),
        "after sparse training from the warm-up": val(_sparse_model(dirs["sparse"], False)[1]),
        "after sparse training without the warm-up": val(
            _sparse_model(dirs["sparse_cold"], False)[1]
        ),
        "control: the base trained as long, dense": val(load(dirs["dense"])[0]),
    }
    kl = {}
    for name in ("warmup", "sparse", "sparse_cold"):
        with open(os.path.join(dirs[name], "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f]
        steps = [d for d in logged if "indexer_kl" in d]
        kl[name] = (steps[0]["indexer_kl"], steps[-1]["indexer_kl"])
    print(
        f"DeepSeek Sparse Attention stages (deepseek_v3_tiny base, {a.base_steps} steps; top "
        f"{INDEX['index_topk']} of 128 positions; {a.steps} steps per later stage, lr "
        f"{a.warmup_lr:g} warm-up, {a.lr:g} after)"
    )
    print("\n| model | validation loss |\n|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} |")
    print("\n| stage | indexer KL, first step | last step | wall s |\n|---|---:|---:|---:|")
    for k, (first, last) in kl.items():
        print(f"| {k} | {first:.4f} | {last:.4f} | {times[k]:.0f} |")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"val_loss": rows, "indexer_kl": kl, "seconds": times}, f, indent=1)


if __name__ == "__main__":
    main()
