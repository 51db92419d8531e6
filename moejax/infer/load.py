"""Loading a model and its tokenizer for generation, from any of the three places a model lives:

a training workdir      runs/NAME (its latest checkpoint: parameters and router biases only,
                        straight into their shardings; the optimizer state is never read), the run's
                        tokenizer
a moejax checkpoint     config.json + state/ (moejax.convert.save_model)
a Hugging Face folder   config.json + *.safetensors (streamed onto the mesh), tokenizer.json
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from moejax.config import Config, ExecutionConfig, upgrade_saved


class LoadError(ValueError):
    pass


def hf_tokenizer(path: str, name: str = "tokenizer.json"):
    from moejax.data.tokenizer import HFTokenizer

    tj = os.path.join(path, name)
    if not os.path.exists(tj):
        return None
    special = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            tc = json.load(f)
        for field in ("bos", "eos"):
            tok = tc.get(f"{field}_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if tok:
                special[field] = tok
    if "eos" not in special:
        raise LoadError(
            f"{cfg_file}: no eos_token (the tokenizer's end-of-sequence text is needed)"
        )
    return HFTokenizer(tj, **special)


def split_step(path: str) -> tuple[str, int | None]:
    """'runs/x@240' -> ('runs/x', 240): a training workdir pinned to one checkpoint step; else
    (path, None)."""
    head, sep, tail = path.rpartition("@")
    if sep and tail.isdigit() and os.path.isdir(os.path.join(head, "checkpoints")):
        return head, int(tail)
    return path, None


def _manager(path: str, step: int | None = None):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        os.path.join(path, "checkpoints"), item_names=("state", "data", "config")
    )
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise LoadError(f"{path}/checkpoints holds no complete checkpoint")
    elif step not in steps:
        manager.close()
        raise LoadError(f"{path}/checkpoints has no step {step} (it has {sorted(steps)})")
    return manager, step


def latest_step(path: str) -> int:
    manager, step = _manager(os.path.abspath(path))
    manager.close()
    return step


def workdir_config(path: str) -> Config:
    """The config a training workdir's latest checkpoint (or its pinned step, 'path@step') was saved
    with."""
    import orbax.checkpoint as ocp

    path, step = split_step(path)
    manager, step = _manager(os.path.abspath(path), step)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return Config.from_dict(upgrade_saved(saved))


def _train_workdir(path: str, mesh, rules, step: int | None = None, execution=None):
    import orbax.checkpoint as ocp

    from moejax.data import layout, mixture
    from moejax.trainer import setup as setup_lib

    cfg = workdir_config(path if step is None else f"{path}@{step}")
    if execution is not None:
        cfg = dataclasses.replace(cfg, execution=execution)
    manager, step = _manager(path, step)
    ts = setup_lib.build(cfg, mesh)
    target = {k: ts.abstract[k] for k in ("params", "router")}
    # parameters and router biases only, each device reading its shards; the optimizer state stays
    # on disk
    restore = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    manager.close()
    if (
        ts.has_frozen
    ):  # a LoRA run: its checkpoints hold the adapters; the base weights are the base's
        from moejax.finetune import lora
        from moejax.finetune.runner import load_base

        base = load_base(cfg, ts.mesh, ts.rules)
        model = lora.merge(
            nnx.merge(ts.graphdef, state["params"], state["router"], ts.frozen_of(base))
        )
    else:
        model = nnx.merge(ts.graphdef, state["params"], state["router"], ts.rest)
    if (
        cfg.align.method == "grpo"
        and cfg.base
        and not os.path.isdir(os.path.join(split_step(cfg.base)[0], "checkpoints"))
    ):
        from moejax.data import tokenizer as tokenizer_lib
        from moejax.finetune.runner import base_tokenizer

        return model, tokenizer_lib.load(
            *base_tokenizer(cfg.base)
        )  # RL on a folder: the folder's tokenizer
    tokenizer = layout.tokenizer(mixture.resolve(cfg.data, cfg.model.vocab_size))
    return model, tokenizer


def load(
    path: str,
    *,
    mesh=None,
    rules=None,
    dtype=None,
    tokenizer: str | None = None,
    execution: ExecutionConfig | None = None,
):
    """(model, tokenizer or None) from a training workdir (its latest step, or 'workdir@step'), a
    moejax checkpoint or a Hugging Face folder.

    mesh / rules place the parameters (default: one device); dtype casts a checkpoint's parameters.
    `tokenizer` (a .model or tokenizer.json file) overrides the one found with the model.
    `execution` is how the model computes (default: a workdir's own, else ExecutionConfig()).
    """
    path, step = split_step(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        if dtype is not None:
            raise LoadError(
                "--dtype applies to model checkpoints; a training workdir keeps its config's dtypes"
            )
        model, tok = _train_workdir(path, mesh, rules, step, execution)
    elif os.path.isdir(os.path.join(path, "state")) and os.path.exists(
        os.path.join(path, "config.json")
    ):
        from moejax.convert.checkpoint import load_model

        model, _ = load_model(
            path,
            mesh=mesh,
            rules=rules,
            execution=execution,
            **({"param_dtype": dtype} if dtype else {}),
        )
        tok = None
    elif os.path.exists(os.path.join(path, "config.json")):
        from moejax.convert import from_hf

        model, _ = from_hf(path, mesh=mesh, rules=rules, dtype=dtype, execution=execution)
        tok = None if tokenizer else hf_tokenizer(path)
    else:
        raise LoadError(
            f"{path}: not a training workdir (checkpoints/), a moejax checkpoint "
            "(config.json + state/) or a Hugging Face folder (config.json + *.safetensors)"
        )
    if tokenizer and tokenizer.endswith(
        ".json"
    ):  # its special tokens from the tokenizer_config.json beside it
        tok = hf_tokenizer(os.path.dirname(os.path.abspath(tokenizer)), os.path.basename(tokenizer))
    elif tokenizer:
        from moejax.data import tokenizer as tokenizer_lib

        tok = tokenizer_lib.load(tokenizer)
    jax.block_until_ready(nnx.state(model))
    return model, tok
