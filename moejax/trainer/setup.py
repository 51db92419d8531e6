"""One setup path for every entry that builds a train state (train, compile, plan, finetune).

    abstract model -> abstract state -> shardings -> state created by one jitted init whose outputs
    are the shards (`out_shardings`), or restored from a checkpoint straight into those shardings.

Nothing here allocates a parameter until `init_state` or `restore`, and then each device computes
only its own shards: no device and no host ever holds more than its part of the model.
`moejax.compile` and `moejax.plan` stop at the abstract state; `moejax.train` goes on to the real
one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moejax import sharding
from moejax.config import Config
from moejax.model import Transformer
from moejax.model.transformer import stack_depths
from moejax.trainer.optim import make_optimizer
from moejax.trainer.step import make_eval_step, make_train_step, split_model

# state entries that checkpoints do not hold: they are the base's weights, read from the base again
# on resume
NOT_SAVED = ("frozen", "reference")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything a run needs to create, restore and step its state, built without allocating it."""

    cfg: Config
    mesh: Mesh
    rules: dict
    graphdef: Any  # of the Transformer (it carries mesh and rules)
    rest: Any  # model state that is neither a Param nor a RouterBias (empty today)
    tx: optax.GradientTransformation
    sched: optax.Schedule
    abstract: Any  # the train state as ShapeDtypeStructs carrying their shardings
    shardings: Any  # NamedShardings of the state (nnx Variables hold theirs)
    batch_sharding: NamedSharding

    # ------------------------------------------------------------------ the state

    @property
    def has_frozen(self) -> bool:
        """The state holds frozen base weights (LoRA: cfg.lora.rank > 0) under 'frozen'."""
        return "frozen" in self.abstract

    def init_state(self, params=None, router=None, frozen=None):
        """The train state, created by one jitted program whose outputs are the shards.

        params, router: optional weights to start from (nnx.States laid out as `shardings['params']`
        and `shardings['router']`, e.g. a Hugging Face base: `split_model(from_hf(path, mesh,
        rules)[0])` with this setup's mesh and rules). They are used as they are (donated); the
        optimizer moments and counters are created around them. Without `router`, the aux-loss-free
        biases start at zero. frozen: with LoRA, the base weights (laid out as
        `shardings['frozen']`, donated); the adapters and their optimizer state are initialized
        around them (the random base the init would draw is never computed: nothing uses it).
        """
        if params is None:
            init = jax.jit(
                functools.partial(_init, self.cfg, self.tx, self.mesh, self.rules),
                out_shardings=self.shardings,
                **(
                    {"in_shardings": (self.shardings["frozen"],), "donate_argnums": (0,)}
                    if frozen is not None
                    else {}
                ),
            )
            with jax.set_mesh(self.mesh):
                return init(frozen) if frozen is not None else init()
        if router is None:
            router = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract["router"])
        init = jax.jit(
            functools.partial(_rest_of_state, self.cfg, self.tx),
            in_shardings=(self.shardings["params"], self.shardings["router"]),
            out_shardings=self.shardings,
            donate_argnums=(0, 1),
        )
        with jax.set_mesh(self.mesh):
            return init(params, router)

    def restore(self, checkpointer, step: int):
        """(state, data iterator state) read straight into this setup's shardings (Orbax reshards a
        checkpoint saved on another mesh). Nothing is initialized first. With LoRA the checkpoint
        holds no frozen base weights (they come from the base: `frozen_of`) and neither does the
        returned state."""
        return checkpointer.restore(
            step, {k: v for k, v in self.abstract.items() if k not in NOT_SAVED}
        )

    def frozen_of(self, model):
        """A base model's weights (a plain Transformer of this config's architecture, e.g. from
        `moejax.infer.load`) as this setup's frozen state, in its shardings."""
        from moejax.finetune import lora

        lora.freeze(model)
        frozen = nnx.state(model, lora.Frozen)
        return jax.device_put(frozen, self.shardings["frozen"])

    # ------------------------------------------------------------------ the steps

    def train_step(self):
        return make_train_step(
            self.graphdef,
            self.rest,
            self.tx,
            self.sched,
            self.cfg,
            self.shardings,
            self.batch_sharding,
        )

    def eval_step(self):
        return make_eval_step(self.graphdef, self.rest, self.cfg)

    def abstract_batch(self):
        """The [B, T] int32 batch fields as sharded ShapeDtypeStructs (for ahead-of-time
        lowering)."""
        B, T = self.cfg.train.batch_size, self.cfg.data.seq_len
        return {
            k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=self.batch_sharding)
            for k in ("tokens", "positions", "segment_ids")
        }

    def state_bytes_per_device(self) -> int:
        """Bytes of the train state one device holds."""
        total = 0
        for leaf in jax.tree.leaves(self.abstract):
            total += (
                math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
            )
        return total


def build_model(cfg: Config, mesh: Mesh | None, rules: dict | None, seed: int) -> Transformer:
    """The model, with frozen weights and LoRA adapters when cfg.lora.rank > 0, and a reward head
    when cfg.align.method == 'reward'."""
    model = Transformer(
        cfg.model, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules, execution=cfg.execution
    )
    if cfg.lora.rank:
        from moejax.finetune import lora

        lora.apply(model, cfg.lora, nnx.Rngs(seed + 17))
    if cfg.align.method == "reward":
        from moejax.finetune import reward

        reward.add_head(model, seed)  # after LoRA's freeze: the head trains
    return model


def _rest_of_state(cfg: Config, tx, params, router, frozen=None):
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "router": router,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
        "nonfinite": jnp.zeros((), jnp.int32),
    }
    if frozen is not None and jax.tree.leaves(frozen):
        state["frozen"] = frozen  # LoRA: the base weights, not trained
    if uses_reference(cfg) and not cfg.lora.rank:
        # DPO's (and GRPO's KL) reference model: the starting parameters, kept (with LoRA: the base
        # under zero adapters)
        state["reference"] = jax.tree.map(jnp.copy, params)
    return state


def uses_reference(cfg: Config) -> bool:
    """Whether the run's loss reads a reference model (DPO; GRPO's KL term when grpo.beta > 0)."""
    return cfg.align.method == "dpo" or (cfg.align.method == "grpo" and cfg.grpo.beta > 0)


def _init(cfg: Config, tx, mesh, rules, frozen=None):
    """The whole state from cfg.train.seed (traced under jit: each device computes its shards); with
    LoRA and `frozen`, around those base weights."""
    _, params, router, rest = split_model(build_model(cfg, mesh, rules, cfg.train.seed))
    return _rest_of_state(cfg, tx, params, router, rest if frozen is None else frozen)


def _trainable(cfg: Config):
    """DeepSeek Sparse Attention's dense warm-up trains the indexers alone (V3.2 report, 2.1)."""
    if cfg.model.index_topk and cfg.model.dsa_stage == "warmup":
        return lambda names: "indexer" in names
    return None


def build(cfg: Config, mesh: Mesh | None = None) -> TrainSetup:
    """The setup of a run on `mesh` (default: the config's mesh over all devices). Allocates
    nothing.

    Raises sharding.ShardingError for a mesh or rule the model cannot be laid out on (one line
    naming the parameter and dimension).
    """
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_for(cfg.mesh)
    sharding.check_context(mesh, rules, cfg.data.seq_len)
    sharding.check_pipeline(mesh.shape.get("stage", 1), stack_depths(cfg.model))
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, mesh, rules, cfg.train.seed))
    graphdef, params, _, rest = split_model(abstract_model)
    tx, sched = make_optimizer(cfg.optim, params, cfg.train.steps, trainable=_trainable(cfg))
    state = jax.eval_shape(functools.partial(_init, cfg, tx, mesh, rules))
    shardings = sharding.tree_shardings(state, mesh, rules)
    sharding.check_divisible(state, shardings, mesh)
    batch_sh = sharding.batch_sharding(mesh, rules)
    sharding.check_batch(cfg.train.batch_size, batch_sh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    return TrainSetup(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        graphdef=graphdef,
        rest=rest,
        tx=tx,
        sched=sched,
        abstract=abstract,
        shardings=shardings,
        batch_sharding=batch_sh,
    )
