"""moejax's own parameter checkpoint: config.json + an Orbax PyTree of the model state."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from moejax.config import ExecutionConfig, ModelConfig, upgrade_saved
from moejax.convert.load import default_mesh, target_shardings
from moejax.model import Transformer


def save_model(model: Transformer, cfg: ModelConfig, path: str) -> None:
    """Writes `path/config.json` and `path/state` (Orbax finalizes the state atomically). A sharded
    model is written shard by shard, by every process."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), nnx.state(model), force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        tmp = os.path.join(path, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        os.replace(tmp, os.path.join(path, "config.json"))


def load_model(
    path: str,
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
    execution: ExecutionConfig | None = None,
    **overrides,
) -> tuple[Transformer, ModelConfig]:
    """Restores a save_model checkpoint straight into its target shardings on `mesh` (None: one
    device), each device reading only its shards; overrides change ModelConfig fields (a changed
    param_dtype casts while restoring); execution is how the model computes."""
    path = os.path.abspath(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = ModelConfig.from_dict(upgrade_saved(json.load(f)))
    if overrides:
        cfg = cfg.replace(**overrides)
    mesh = mesh if mesh is not None else default_mesh()
    graphdef, abstract = nnx.split(
        nnx.eval_shape(
            lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules, execution=execution)
        )
    )
    _, _, shardings = target_shardings(abstract, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, "state"), target)
    return nnx.merge(graphdef, state), cfg


def hf_to_moejax(
    src: str,
    dst: str,
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
    dtype: str | None = None,
) -> None:
    """Hugging Face directory -> moejax checkpoint, streamed onto `mesh` (params in `dtype`)."""
    from moejax.convert import from_hf

    model, cfg = from_hf(src, mesh=mesh, rules=rules, dtype=dtype)
    save_model(model, cfg, dst)


def moejax_to_hf(
    src: str,
    dst: str,
    model_type: str | None = None,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
) -> None:
    """moejax checkpoint -> Hugging Face directory: restored sharded onto `mesh`, written tensor by
    tensor in `dtype`."""
    from moejax.convert import to_hf

    model, cfg = load_model(src, mesh=mesh, rules=rules)
    to_hf(model, cfg, dst, model_type=model_type, dtype=dtype)
