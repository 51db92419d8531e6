"""moejax's own parameter checkpoint: config.json + an Orbax PyTree of the model state."""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model import Transformer


def save_model(model: Transformer, cfg: ModelConfig, path: str) -> None:
    """Writes `path/config.json` and `path/state` (Orbax finalizes the state atomically)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), nnx.state(model), force=True)
        ckptr.wait_until_finished()
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))


def load_model(path: str, **overrides) -> tuple[Transformer, ModelConfig]:
    path = os.path.abspath(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    if overrides:
        cfg = cfg.replace(**overrides)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, "state"), abs_state)
    return nnx.merge(graphdef, state), cfg


def hf_to_moejax(src: str, dst: str) -> None:
    from moejax.convert import from_hf

    model, cfg = from_hf(src)
    save_model(model, cfg, dst)


def moejax_to_hf(src: str, dst: str, model_type: str | None = None, dtype: str = "float32") -> None:
    from moejax.convert import to_hf

    model, cfg = load_model(src)
    to_hf(model, cfg, dst, model_type=model_type, dtype=dtype)
