"""The small pretrained model the generation and fine-tuning notebooks start from.

The quickstart's tiny DeepSeek-V3-style config (MLA, one dense and two MoE layers, routed + shared
experts, an MTP head of depth 1) trained for 100 steps on the built-in corpus: about a minute on
two CPU cores. The run lives in the moejax cache under a name made from its config, so the second
notebook that needs it (or a second run of one) loads it instead of training it again; delete the
folder to retrain.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from moejax.data.builtin import default_cache_dir
from moejax.experiment import load_config_file, resolve
from moejax.infer.load import LoadError, latest_step
from moejax.train import run

HERE = os.path.dirname(os.path.abspath(__file__))


def config():
    cd = load_config_file(os.path.join(HERE, "..", "experiments", "moe.py"))
    cd.model.vocab_size = 2048
    cd.model.hidden_size = 128
    cd.model.num_layers = 3  # 1 dense + 2 MoE
    cd.model.intermediate_size = 256
    cd.data.seq_len = 128
    cd.data.max_files = 300  # of the standard library's files: the corpus builds in seconds
    cd.train.batch_size = 8
    cd.train.steps = 100
    cd.train.eval_every = 0
    cd.train.ckpt_every = cd.train.steps
    cd.train.num_samples = 0
    cd.train.profile_peak = False
    return resolve(cd)


def tiny_base() -> str:
    """The workdir of the trained base (trained now if the cache does not hold it yet)."""
    cfg = config()
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    workdir = os.path.join(default_cache_dir(), f"notebook-base-{digest}")
    try:
        if latest_step(workdir) == cfg.train.steps:
            print(f"base: {workdir} (cached)")
            return workdir
    except (LoadError, FileNotFoundError):
        pass
    t = time.time()
    run(cfg, workdir, quiet=True)
    print(f"base: trained {cfg.train.steps} steps in {time.time() - t:.0f} s into {workdir}")
    return workdir
