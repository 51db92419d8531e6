"""The Mosaic TPU kernels, and a whole dropless MoE layer forward + backward, compile ahead of time
for real TPU topologies (v5e, v5p) from this CPU machine. Needs the `tpu` extra (libtpu); CI
installs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.config import ExecutionConfig, ModelConfig, RouterConfig
from moejax.model.moe import MoE

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")

# Each test compiles for one topology (both TPU generations are covered across the tests; a compile
# here takes 10-40 s on 2 cores, so not every test for every topology).
_MESHES = {}


def _mesh(topology: str):
    from moejax import pod

    if topology not in _MESHES:
        _, devices = pod.tpu_devices(topology)  # (also lets several processes load libtpu)
        _MESHES[topology] = jax.sharding.Mesh(np.array(devices).reshape(-1), ("data",))
    return _MESHES[topology]


def _abstract(shape, dtype, mesh, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _compile(fn, *args):
    with kernels.target_platform("tpu"):
        compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    assert mem is not None and mem.argument_size_in_bytes > 0
    return text


def test_gmm_and_tgmm_compile_for_tpu():
    mesh = _mesh("v5e:2x2")
    M, K, N, G = 512, 256, 384, 8  # per device: 512 rows, lane-aligned K and N

    def step(lhs, rhs, sizes):
        def local(lhs, rhs, sizes):
            # group_offset from the device's position: an expert-parallel shard computes its own 2
            # experts
            off = jax.lax.axis_index("data") * 2
            y = kernels.gmm(
                lhs, rhs[:2], sizes, group_offset=off, preferred_element_type=jnp.float32
            )
            dw = kernels.tgmm(lhs, y.astype(lhs.dtype), sizes, group_offset=off, num_groups=2)
            return y, dw[None]

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P(), P()),
            out_specs=(P("data"), P("data")),
            check_vma=False,
        )(lhs, rhs, sizes)

    n = mesh.devices.size
    text = _compile(
        step,
        _abstract((M * n, K), jnp.bfloat16, mesh, P("data")),
        _abstract((G, K, N), jnp.bfloat16, mesh, P()),
        _abstract((G,), jnp.int32, mesh, P()),
    )
    assert "moejax_gmm" in text and "moejax_tgmm" in text  # the Mosaic kernels, not an XLA fallback


def test_dropless_moe_layer_forward_backward_compiles_for_tpu():
    mesh = _mesh("v5p:2x2x1")
    cfg = ModelConfig(
        hidden_size=256,
        num_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        n_shared_experts=1,
        router=RouterConfig(n_group=2, topk_group=1, seq_aux_loss_coef=1e-3),
        compute_dtype="bfloat16",
    )  # (execution: the default, dropless)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux["aux_loss"]

    def step(state, x):
        grads = jax.shard_map(
            lambda s, x: jax.lax.pmean(jax.grad(loss)(s, x), "data"),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P(),
            check_vma=False,
        )(state, x)
        return grads

    state = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, mesh, P()), abstract_state)
    n = mesh.devices.size
    text = _compile(step, state, _abstract((2 * n, 128, 256), jnp.float32, mesh, P("data")))
    assert (
        text.count("moejax_gmm") >= 2 and "moejax_tgmm" in text
    )  # forward, input and weight gradients


@pytest.mark.parametrize(
    "exchange,rule", [("ragged", ""), ("ragged", "expert=expert+fsdp"), ("dropless", "")]
)
def test_expert_parallel_moe_compiles_for_tpu_with_each_exchange(exchange, rule):
    """The expert-parallel layer (moe_ep.py) as the train step uses it: experts over the 'expert'
    axis (or over expert x fsdp, a tuple of axes), jax.lax.ragged_all_to_all (not its CPU emulation)
    for the ragged exchange with the capacity policy's radix select; the dropless exchange in
    rounds (all-to-alls inside a conditional inside a loop, forward and backward)."""
    mesh = _mesh("v5p:2x2x1")
    from moejax import sharding
    from moejax.config import MeshConfig

    mesh_cfg = MeshConfig(fsdp=2, expert=2, rules=rule) if rule else MeshConfig(fsdp=1, expert=-1)
    ep_mesh = sharding.make_mesh(mesh_cfg, list(mesh.devices.flat))
    cfg = ModelConfig(
        hidden_size=256,
        num_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        n_shared_experts=0,
        compute_dtype="bfloat16",
    )
    ex = ExecutionConfig(
        moe_impl="dropless", ep_exchange=exchange, capacity_factor=2.0, dropless_buffer=1.0
    )
    layout = sharding.layout(ep_mesh, sharding.rules_for(mesh_cfg))
    graphdef, abstract_state = nnx.split(
        nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0), layout=layout, execution=ex))
    )

    def step(state, x):
        def loss(state, x):
            y, aux = nnx.merge(graphdef, state)(x)
            return jnp.mean(y.astype(jnp.float32) ** 2) + aux["drop_fraction"]

        return jax.grad(loss)(state, x)

    shardings = sharding.tree_shardings(abstract_state, ep_mesh, sharding.rules_for(mesh_cfg))
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    n = ep_mesh.devices.size
    x = jax.ShapeDtypeStruct(
        (2 * n, 128, 256),
        jnp.float32,
        sharding=sharding.batch_sharding(ep_mesh).update(
            spec=P(sharding.batch_sharding(ep_mesh).spec[0], None, None)
        ),
    )
    text = _compile(step, state, x)
    assert ("ragged-all-to-all" in text) == (exchange == "ragged")
    assert "all-to-all" in text and "moejax_gmm" in text
    if exchange == "dropless":  # 512 assignments per device, rounds of 128 per pair of 4 shards
        assert "conditional" in text and "while" in text


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,v_head_dim",
    [(4, 4, 192, 128), (8, 2, 128, 128)],
    ids=["mla-v3-dims", "gqa"],
)
def test_splash_attention_forward_backward_compiles_for_tpu(heads, kv_heads, head_dim, v_head_dim):
    """The attention op's TPU default (splash, inside shard_map over the layout's batch and head
    axes) compiles forward + backward for v5e with packed segments, MLA's 192 / 128 head dims and
    GQA."""
    from moejax import pod, sharding
    from moejax.config import MeshConfig
    from moejax.kernels.attention import attention, default_impl

    shape = MeshConfig(fsdp=2, tensor=2)
    _, devices = pod.tpu_devices("v5e:2x2")
    mesh = sharding.make_mesh(shape, devices)
    layout = sharding.layout(mesh, sharding.rules_for(shape))

    def loss(q, k, v, seg):
        out = attention(q, k, v, seg, scale=head_dim**-0.5, layout=layout)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    step = lambda q, k, v, seg: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, seg)
    B, T = 4, 1024
    with kernels.target_platform("tpu"):
        assert default_impl() == "splash"
    text = _compile(
        step,
        _abstract((B, T, heads, head_dim), jnp.bfloat16, mesh, P("fsdp", None, "tensor")),
        _abstract((B, T, kv_heads, head_dim), jnp.bfloat16, mesh, P("fsdp", None, "tensor")),
        _abstract((B, T, kv_heads, v_head_dim), jnp.bfloat16, mesh, P("fsdp", None, "tensor")),
        _abstract((B, T), jnp.int32, mesh, P("fsdp")),
    )
    assert text.count("splash") >= 2  # the Mosaic forward and backward kernels, not an XLA fallback


def test_context_parallel_train_step_compiles_for_tpu():
    """A long-sequence train step of the DeepSeek-V3-shaped tiny model with the sequence split over
    'context' (x expert) compiles for v5e: the balanced reorder (collective-permute) and the key /
    value all-gather are in the program."""
    import dataclasses
    import os

    from moejax import pod, sharding
    from moejax.config import Config, MeshConfig
    from moejax.experiment import load_config_file
    from tests.helpers import ROOT

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3_tiny.py"))
    cd.model.num_layers = 2
    cd.data.seq_len = 4096
    cd.train.batch_size = 2
    base = Config.from_dict(cd)
    _, devices = pod.tpu_devices("v5e:2x2")

    def compiled(mesh_cfg):
        cfg = dataclasses.replace(base, mesh=mesh_cfg)
        mesh = sharding.make_mesh(mesh_cfg, devices)
        step, state, batch = pod.abstract_train_step(cfg, mesh)
        with kernels.target_platform("tpu"), jax.set_mesh(mesh):
            return step.lower(state, batch).compile()

    c = compiled(MeshConfig(fsdp=1, expert=2, context=2))
    text = c.as_text()
    assert "collective-permute" in text and "all-gather" in text
    assert c.memory_analysis().temp_size_in_bytes > 0


def test_fp8_train_step_compiles_for_tpu():
    """The train step with execution.fp8 (E4M3 operands with fine-grained scales in the projections
    and the experts' grouped matmuls) compiles for v5e with expert parallelism: the E4M3 conversions
    survive into the TPU program and the experts still run the Mosaic grouped matmul."""
    import dataclasses
    import os

    from moejax import pod, sharding
    from moejax.config import Config, MeshConfig
    from moejax.experiment import load_config_file
    from tests.helpers import ROOT

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3_tiny.py"))
    cd.model.num_layers = 2
    cd.execution.fp8 = True
    mesh_cfg = MeshConfig(fsdp=-1, expert=2)
    cfg = dataclasses.replace(Config.from_dict(cd), mesh=mesh_cfg)
    _, devices = pod.tpu_devices("v5e:2x2")
    mesh = sharding.make_mesh(mesh_cfg, devices)
    step, state, batch = pod.abstract_train_step(cfg, mesh)
    with kernels.target_platform("tpu"), jax.set_mesh(mesh):
        text = step.lower(state, batch).compile().as_text()
    assert "f8e4m3fn" in text and "moejax_gmm" in text


def _temporaries_fast_and_reference(cd):
    """Per-device temporary bytes of `cd`'s train step compiled for v5e:2x2 (fsdp x expert=2) with
    the default attention and with attention_impl='reference', and one layer's dense float32
    scores [B, N, T, T] per device."""
    import dataclasses

    from moejax import pod, sharding
    from moejax.config import Config, MeshConfig

    mesh_cfg = MeshConfig(fsdp=-1, expert=2)
    _, devices = pod.tpu_devices("v5e:2x2")
    mesh = sharding.make_mesh(mesh_cfg, devices)

    def temp_bytes(impl):
        cfg = dataclasses.replace(Config.from_dict(cd), mesh=mesh_cfg)
        cfg = dataclasses.replace(cfg, execution=cfg.execution.replace(attention_impl=impl))
        step, state, batch = pod.abstract_train_step(cfg, mesh)
        with kernels.target_platform("tpu"), jax.set_mesh(mesh):
            return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    T, N = cd.data.seq_len, cd.model.num_heads
    dense_scores = cd.train.batch_size * N * T * T * 4 // len(devices)  # one layer, per device
    return temp_bytes("auto"), temp_bytes("reference"), dense_scores


def test_sparse_attention_train_step_compiles_for_tpu_without_a_dense_score_matrix():
    """DeepSeek Sparse Attention's train step (the gathered MQA form, top 128 of 2048 keys per
    query) compiles for v5e with expert parallelism, and needs less temporary memory than the
    reference form by more than one layer's dense float32 score matrix [B, N, T, T]: nothing of
    size [T, S] outlives a query block."""
    import os

    from moejax.experiment import load_config_file
    from tests.helpers import ROOT

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v32_tiny.py"))
    cd.model.num_layers = 2
    cd.model.index_topk = 128
    cd.data.seq_len = 2048
    cd.train.batch_size = 4
    fast, ref, dense_scores = _temporaries_fast_and_reference(cd)
    print(
        f"temporaries per device: {fast / 2**20:.1f} MiB gathered, {ref / 2**20:.1f} MiB reference"
    )
    assert 0 < fast < ref - dense_scores, (fast, ref, dense_scores)


@pytest.mark.slow
def test_v4_blocked_attention_compiles_for_tpu_within_less_memory():
    """DeepSeek-V4's blocked training attention (query blocks over their window rows and entries)
    compiles for v5e with expert parallelism, and needs less temporary memory than the reference
    form by more than one layer's dense float32 scores [B, N, T, T]."""
    import os

    from moejax.experiment import load_config_file
    from tests.helpers import ROOT

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v4_tiny.py"))
    cd.model.num_layers = 2  # sliding, then CSA (its indexer's scores are blocked too)
    cd.model.layer_types = cd.model.layer_types[:2]
    cd.data.seq_len = 1024
    cd.train.batch_size = 4
    fast, ref, dense_scores = _temporaries_fast_and_reference(cd)
    print(
        f"temporaries per device: {fast / 2**20:.1f} MiB blocked, {ref / 2**20:.1f} MiB reference"
    )
    assert 0 < fast < ref - dense_scores, (fast, ref, dense_scores)
