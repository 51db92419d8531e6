"""Meshes and logical-axis sharding rules.

Every parameter records logical axis names (`nnx.Param(..., logical_axes=(...))`); stacked layers
add a leading 'layers' axis. A rule table maps each logical name to mesh axes; the mesh has the
axes data, fsdp, expert, context, tensor, stage. The same table serves every parallelism layout: a
mesh axis of size 1 simply does nothing, so presets differ only in the mesh shape (and in a few
rules).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor", "stage")

# logical name -> mesh axis (or tuple of axes), MaxText-style. Batch spreads over every data-like
# axis.
DEFAULT_RULES: dict[str, object] = {
    "batch": ("data", "fsdp", "expert"),
    "sequence": "context",  # activations' sequence axis (context parallelism)
    "layers": "stage",
    "vocab": "tensor",
    "embed": ("fsdp", "context"),  # parameters: FSDP over the context axis too (MaxText's rule)
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "q_lora": ("fsdp", "context"),  # used only where embed (the same axes) is absent: wq_b
    "kv_lora": ("fsdp", "context"),  # likewise wkv_b
    "norm": None,
    "expert": "expert",
    "expert_mlp": "tensor",
}


class ShardingError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh and rule table a model is built for. Modules keep it (a static, hashable attribute)
    to pin their activations to the layout the rules give, so that XLA never guesses one between
    ops."""

    mesh: Any  # jax.sharding.Mesh or AbstractMesh, more than one device
    rules: tuple  # freeze_rules(...)

    @property
    def rule_table(self) -> dict[str, object]:
        return dict(self.rules)

    def constrain(self, x, logical: Sequence[str | None]):
        """x laid out by its logical axis names (one per dim). Inside a shard_map region (the
        pipeline's stages) only the axes that are still automatic are named; where the mesh does not
        divide a dim (sampling 3 prompts on 8 devices) x is left to XLA."""
        mesh, nested = self.region()
        if nested and not any(n > 1 and a not in mesh.manual_axes for a, n in mesh.shape.items()):
            return x  # every axis is manual here (inside the expert-parallel shard_map)
        spec = spec_for(
            logical, self.rule_table, self.mesh, exclude=mesh.manual_axes if nested else ()
        )
        # a sequence the context axes do not split evenly (a prompt of odd length) stays whole
        spec = P(
            *(
                None
                if name == "sequence" and dim % math.prod(mesh.shape[a] for a in axes_of(e))
                else e
                for name, dim, e in zip(logical, x.shape, spec)
            )
        )
        for dim, axes in zip(x.shape, spec):
            if dim % math.prod(mesh.shape[a] for a in axes_of(axes)):
                return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def region(self):
        """(mesh to name shardings with, whether some axes are manual): the layout's own mesh, or
        inside a shard_map region the context's abstract mesh, whose manual axes must not be
        named."""
        ctx = jax.sharding.get_abstract_mesh()
        if ctx.manual_axes:
            return ctx, True
        return self.mesh, False


def layout(mesh, rules: Mapping[str, object] | None = None) -> Layout | None:
    """The Layout of a model on `mesh` (None for no mesh or one device: nothing to lay out)."""
    if mesh is None or mesh.size == 1:
        return None
    return Layout(mesh, freeze_rules(rules or DEFAULT_RULES))


def constrain(x, layout: Layout | None, logical: Sequence[str | None]):
    """`layout.constrain(x, logical)`, or x itself without a layout."""
    return x if layout is None else layout.constrain(x, logical)


def freeze_rules(rules: Mapping[str, object]) -> tuple:
    """A rule table as a hashable tuple (models keep it as a static attribute)."""
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(rules).items())
    )


def context_mesh():
    """The mesh of an enclosing `jax.set_mesh(...)` (abstract inside jit), or None."""
    try:
        mesh = jax.sharding.get_mesh()
    except ValueError:  # inside jit: only the abstract mesh is known
        mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def axes_of(spec_entry) -> tuple[str, ...]:
    return (
        ()
        if spec_entry is None
        else (spec_entry,)
        if isinstance(spec_entry, str)
        else tuple(spec_entry)
    )


# Named layouts (mesh degrees; the rule table is the same for all of them). -1 takes the rest.
PRESETS: dict[str, MeshConfig] = {
    "fsdp": MeshConfig(fsdp=-1),  # ZeRO-3: parameters, gradients and optimizer state sharded
    "fsdp_tensor": MeshConfig(fsdp=-1, tensor=2),
    "expert_fsdp": MeshConfig(fsdp=-1, expert=4),
    "expert_tensor": MeshConfig(fsdp=1, expert=-1, tensor=2),
    "pipeline": MeshConfig(fsdp=-1, expert=2, stage=2),
}


def rules_for(shape: MeshConfig) -> dict[str, object]:
    """DEFAULT_RULES with the config's overrides ("logical=axis+axis,other=none"), validated."""
    rules = dict(DEFAULT_RULES)
    for item in filter(None, (p.strip() for p in shape.rules.split(","))):
        name, sep, target = item.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or name not in DEFAULT_RULES:
            raise ShardingError(
                f"mesh.rules: {item!r} must be logical=axes with logical one of "
                f"{', '.join(sorted(DEFAULT_RULES))}"
            )
        axes = () if target.lower() in ("none", "") else tuple(a.strip() for a in target.split("+"))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ShardingError(
                f"mesh.rules: {name}={target}: unknown mesh axis {bad[0]!r}; axes: "
                f"{', '.join(MESH_AXES)}"
            )
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def dcn_sizes(shape: MeshConfig) -> dict[str, int]:
    sizes = {a: getattr(shape, f"dcn_{a}") for a in MESH_AXES}
    bad = [a for a, n in sizes.items() if n < 1]
    if bad:
        raise ShardingError(f"mesh.dcn_{bad[0]}: must be >= 1, got {sizes[bad[0]]}")
    return sizes


def resolve_mesh(shape: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes (ici x dcn) for num_devices devices; -1 takes what the other axes leave."""
    dcn = dcn_sizes(shape)
    granules = math.prod(dcn.values())
    if num_devices % granules:
        raise ShardingError(
            f"mesh: the dcn degrees multiply to {granules}, which does not divide {num_devices} "
            "devices"
        )
    ici = _resolve_ici(shape, num_devices // granules)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _resolve_ici(shape: MeshConfig, num_devices: int) -> dict[str, int]:
    sizes = {a: getattr(shape, a) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {fill}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ShardingError(f"mesh.{bad[0]}: must be >= 1 or -1, got {sizes[bad[0]]}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes' product {fixed}"
            )
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ShardingError(f"mesh: axes multiply to {total} but there are {num_devices} devices")
    return sizes


def make_mesh(shape: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """The device mesh. With dcn degrees, a hybrid mesh: each axis's dcn part spans slices (TPU
    multi-slice) or processes (GPU nodes, local CPU processes), its ici part stays inside one."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = dcn_sizes(shape)
    sizes = resolve_mesh(shape, len(devices))
    if math.prod(dcn.values()) == 1:
        arr = np.array(devices).reshape([sizes[a] for a in MESH_AXES])
        return Mesh(arr, MESH_AXES)
    from jax.experimental import mesh_utils

    ici = [sizes[a] // dcn[a] for a in MESH_AXES]
    by_slice = (
        getattr(devices[0], "slice_index", None) is not None
        and len({d.slice_index for d in devices}) > 1
    )
    try:
        arr = mesh_utils.create_hybrid_device_mesh(
            ici, [dcn[a] for a in MESH_AXES], devices, process_is_granule=not by_slice
        )
    except (ValueError, AssertionError) as e:
        granule = "slices" if by_slice else "processes"
        raise ShardingError(
            f"mesh: dcn degrees {dcn} do not match the {granule} of these devices ({e})"
        ) from None
    return Mesh(arr, MESH_AXES)


def abstract_mesh(shape: MeshConfig, num_devices: int) -> jax.sharding.AbstractMesh:
    """The mesh's axis sizes without devices (planning a pod from a laptop)."""
    sizes = resolve_mesh(shape, num_devices)
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def spec_for(
    logical: Sequence[str | tuple | None], rules: Mapping[str, object], mesh: Mesh, exclude=()
) -> P:
    """PartitionSpec for logical axis names; a mesh axis is used at most once per array. Axes in
    `exclude` (manual axes of an enclosing shard_map) are never named. A tuple of names is one
    dimension holding them flattened, major first (tokens [B * T] as ('batch', 'sequence'))."""
    used: set[str] = set(exclude)
    out = []
    for name in logical:
        names = name if isinstance(name, tuple) else (name,)
        axes = tuple(a for n in names if n is not None for a in axes_of(rules.get(n)))
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_axes_of(variable, value) -> tuple:
    """The variable's logical names, with 'layers' prepended for each stacking axis."""
    names = tuple(variable.get_metadata().get("logical_axes", ()) or ())
    extra = value.ndim - len(names)
    return ("layers",) * extra + names if extra >= 0 else (None,) * value.ndim


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments, ...): each
    Variable is sharded by its logical axes, every other leaf is replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            if not hasattr(value, "shape"):  # no array (optax.multi_transform's MaskedNode)
                return x
            names = stage_fallback(logical_axes_of(x, value), value.shape, rules, mesh.shape)
            return x.replace(NamedSharding(mesh, spec_for(names, rules, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def stage_fallback(names: tuple, shape: tuple, rules: Mapping[str, object], mesh_shape) -> tuple:
    """A layer stack whose depth the pipeline stages do not divide (e.g. DeepSeek-V3's 3 dense
    layers on 2 stages) is replicated over them instead, and runs outside the pipeline
    (run_stack)."""
    if "layers" not in names:
        return names
    n_stage = math.prod(mesh_shape[a] for a in axes_of(rules.get("layers")))
    i = names.index("layers")
    return names if shape[i] % n_stage == 0 else names[:i] + (None,) + names[i + 1 :]


def check_divisible(tree, shardings, mesh: Mesh) -> None:
    """One-line error for a dimension its mesh axes do not divide (experts vs the expert axis,
    heads vs tensor, ...)."""
    flat_v = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, value), sharding in zip(flat_v, flat_s):
        for dim, axes in zip(np.shape(value), sharding.spec):
            if axes is None:
                continue
            n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % n:
                name = jax.tree_util.keystr(path)
                raise ShardingError(
                    f"{name}: dimension {dim} is not divisible by mesh axes {axes} (size {n})"
                )


def batch_sharding(mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES) -> NamedSharding:
    """Rows of a [B, T] batch split over the data-like axes. The positions are not split here
    even under context parallelism: each process loads whole rows, and the model splits them
    (context.to_balanced, a local slice)."""
    return NamedSharding(mesh, spec_for(("batch", None), rules, mesh))


def batch_axes(mesh: Mesh, rules: Mapping[str, object]) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch, in the order the batch sharding nests
    them."""
    return axes_of(spec_for(("batch",), rules, mesh)[0])


def sequence_axes(mesh, rules: Mapping[str, object], exclude=()) -> tuple[str, ...]:
    """The mesh axes (of size > 1, not in `exclude`) that split the sequence: context
    parallelism."""
    return axes_of(spec_for(("batch", "sequence"), rules, mesh, exclude=exclude)[1])


def check_context(mesh, rules: Mapping[str, object], seq_len: int) -> None:
    """Context parallelism needs 2 x (context ways) to divide the sequence (each device holds an
    early and a late chunk) and no pipeline."""
    axes = sequence_axes(mesh, rules)
    if not axes:
        return
    n = math.prod(mesh.shape[a] for a in axes)
    if seq_len % (2 * n):
        raise ShardingError(
            f"data.seq_len={seq_len} must be a multiple of 2 x the context ways "
            f"({'+'.join(axes)} = {n}): each device holds an early and a late chunk of "
            f"{seq_len}/{2 * n} tokens"
        )
    if mesh.shape.get("stage", 1) > 1:
        raise ShardingError(
            "mesh.context > 1 with mesh.stage > 1: context parallelism inside a pipeline is not "
            "supported; use mesh.stage=1 or mesh.context=1"
        )


def expert_axes(mesh: Mesh, rules: Mapping[str, object]) -> tuple[str, ...]:
    """The mesh axes the routed experts are split over (the rule for logical 'expert', as the expert
    weights are actually sharded). The expert-parallel exchange runs over exactly these axes, so
    they must also split the tokens (the batch or the sequence): a device exchanges its own tokens.
    Anything else is refused here."""
    axes = axes_of(spec_for(("expert", "embed", None, "expert_mlp"), rules, mesh)[0])
    stray = [a for a in axes if a not in batch_axes(mesh, rules) + sequence_axes(mesh, rules)]
    if stray:
        raise ShardingError(
            f"mesh.rules: the logical 'expert' axis maps to {'+'.join(axes)}, but {stray[0]!r} "
            f"does not split the batch (batch={'+'.join(batch_axes(mesh, rules)) or 'none'}); the "
            "expert-parallel exchange needs expert axes that are batch axes: map 'expert' onto "
            f"some of them, or add {stray[0]!r} to 'batch'"
        )
    return axes


def check_pipeline(stages: int, stacks: list[tuple[str, int]]) -> None:
    """A pipeline ('stage' > 1) must pipeline something: a stack whose depth the stages do not
    divide runs replicated on every stage (stage_fallback), so a stage count that divides none of
    them would replicate the whole model over the 'stage' axis and pipeline nothing."""
    if stages <= 1 or any(n % stages == 0 for _, n in stacks):
        return
    fits = sorted({d for _, n in stacks for d in range(2, n + 1) if n % d == 0})
    desc = ", ".join(f"{kind} {n}" for kind, n in stacks)
    raise ShardingError(
        f"mesh.stage={stages} divides none of the layer stacks ({desc}): every layer would run "
        "replicated on every stage and nothing would be pipelined; "
        + (f"stage counts that divide a stack: {fits}" if fits else "use mesh.stage=1")
    )


def check_batch(batch_size: int, sharding: NamedSharding) -> None:
    axes = sharding.spec[0]
    n = (
        1
        if axes is None
        else math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    )
    if batch_size % n:
        raise ShardingError(
            f"train.batch_size={batch_size} is not divisible by the batch axes {axes} (size {n})"
        )
