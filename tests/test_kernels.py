"""Grouped matmul and permutation ops against their pure-jnp references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from moejax import kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _group_sizes(rng, M, G, kind):
    if kind == "random_with_empty":
        cuts = np.sort(rng.integers(0, M + 1, G - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [M]]))
        sizes[rng.integers(0, G)] = 0
        sizes[-1] += M - sizes.sum()
        return sizes
    if kind == "one_group_all_rows":
        sizes = np.zeros(G, int)
        sizes[G // 2] = M
        return sizes
    if kind == "short_sum":  # rows past the groups must come out as zeros
        return np.full(G, M // (2 * G))
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["random_with_empty", "one_group_all_rows", "short_sum"])
@pytest.mark.parametrize("offset,local", [(0, 5), (2, 3)])
@pytest.mark.parametrize("impl,tile", [("ragged_dot", None), ("tiled", 8), ("tiled", 128)])
def test_gmm_matches_reference_forward_and_grads(dtype, kind, offset, local, impl, tile):
    rng = np.random.default_rng(hash((kind, offset)) % 2**32)
    M, K, N, G = 37, 24, 20, 5  # M not a multiple of any tile
    sizes = jnp.asarray(_group_sizes(rng, M, G, kind), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
    rhs = jnp.asarray(rng.normal(size=(local, K, N)), dtype)

    def f(impl):
        return lambda a, b: kernels.gmm(
            a,
            b,
            sizes,
            group_offset=offset,
            preferred_element_type=jnp.float32,
            impl=impl,
            tile=tile,
        )

    ref = f("reference")(lhs, rhs)
    got = f(impl)(lhs, rhs)
    tol = TOL[dtype] * K
    np.testing.assert_allclose(got, ref, atol=tol, rtol=TOL[dtype])
    cot = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    g_ref = jax.vjp(f("reference"), lhs, rhs)[1](cot)
    g_got = jax.vjp(f(impl), lhs, rhs)[1](cot)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 4, rtol=TOL[dtype]
        )
    # the weight gradient is the transposed grouped matmul
    tg = kernels.tgmm_reference(
        lhs.astype(jnp.float32), cot, sizes, group_offset=offset, num_groups=local
    )
    np.testing.assert_allclose(np.asarray(g_got[1], np.float32), tg, atol=tol * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["random_with_empty", "one_group_all_rows", "short_sum"])
@pytest.mark.parametrize("tile,limit", [(8, 0.0), (16, 1.5), (32, 0.0), (None, 0.0)])
def test_grouped_swiglu_matches_two_reference_gmms_forward_and_grads(dtype, kind, tile, limit):
    """The CPU expert FFN (loops over row chunks, kernels.grouped_swiglu) against the reference
    grouped matmuls and activation: rows past the groups and a group past the local ones give
    zeros; chunks of 8 to 32 rows leave masked chunks, the last one clamped to the array's end;
    limit clamps as DeepSeek-V4's does."""
    from moejax.model.layers import swiglu

    rng = np.random.default_rng(
        ["random_with_empty", "one_group_all_rows", "short_sum"].index(kind)
    )
    M, D, F, G = 37, 24, 10, 5
    sizes = jnp.asarray(list(_group_sizes(rng, M, G, kind)) + [3], jnp.int32)  # + a remote group
    rows = jnp.asarray(rng.normal(size=(M, D)), dtype)
    wgu = jnp.asarray(rng.normal(size=(G, D, 2, F)) / np.sqrt(D), dtype)
    wd = jnp.asarray(rng.normal(size=(G, F, D)) / np.sqrt(F), dtype)

    def ref(x, a, b):
        h = kernels.gmm(
            x, a.reshape(G, D, 2 * F), sizes, preferred_element_type=jnp.float32, impl="reference"
        )
        act = swiglu(h.reshape(M, 2, F), limit).astype(dtype)
        return kernels.gmm(act, b, sizes, preferred_element_type=jnp.float32, impl="reference")

    def got(x, a, b):
        return kernels.grouped_swiglu(x, sizes, a, b, limit=limit, tile=tile)

    tol = TOL[dtype] * D
    out = got(rows, wgu, wd)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(rows, wgu, wd), atol=tol, rtol=TOL[dtype])
    end = int(np.minimum(np.cumsum(np.asarray(sizes)[:G]), M)[-1])
    assert (out[end:] == 0).all()
    cot = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    g_ref = jax.vjp(ref, rows, wgu, wd)[1](cot)
    g_got = jax.vjp(got, rows, wgu, wd)[1](cot)
    for a, b in zip(g_got, g_ref):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 4, rtol=TOL[dtype]
        )
    empty = kernels.grouped_swiglu(rows[:0], sizes * 0, wgu, wd)
    assert empty.shape == (0, D) and empty.dtype == jnp.float32
    with pytest.raises(ValueError, match="grouped_swiglu: group_sizes must be int"):
        kernels.grouped_swiglu(rows, sizes[:3], wgu, wd)
    with pytest.raises(ValueError, match="grouped_swiglu: rows and weights dtypes differ"):
        kernels.grouped_swiglu(rows.astype(jnp.float16), sizes, wgu, wd)
    with pytest.raises(ValueError, match=r"grouped_swiglu: rows \[M, 24\]"):
        kernels.grouped_swiglu(rows, sizes, wgu, wd[:, :, :3])


def test_grouped_swiglu_chunks_cover_every_remainder():
    """Every remainder pattern of the three chunk sizes (64, 32, 16): group sizes 0..200 in one
    call, forward and the three gradients against the reference gmms."""
    from moejax.model.layers import swiglu

    rng = np.random.default_rng(7)
    n = np.concatenate([np.arange(0, 130, 3), [1, 15, 16, 17, 63, 64, 65, 200]]).astype(np.int32)
    rng.shuffle(n)
    G, D, F, M = len(n), 8, 4, int(n.sum()) + 5
    sizes = jnp.asarray(n)
    rows = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    wgu = jnp.asarray(rng.normal(size=(G, D, 2, F)) / np.sqrt(D), jnp.float32)
    wd = jnp.asarray(rng.normal(size=(G, F, D)) / np.sqrt(F), jnp.float32)

    def ref(x, a, b):
        gmm = functools.partial(kernels.gmm, preferred_element_type=jnp.float32, impl="reference")
        h = gmm(x, a.reshape(G, D, 2 * F), sizes)
        return gmm(swiglu(h.reshape(M, 2, F)), b, sizes)

    def got(x, a, b):
        return kernels.grouped_swiglu(x, sizes, a, b, tile=64)

    cot = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    (o1, v1), (o2, v2) = (jax.vjp(f, rows, wgu, wd) for f in (got, ref))
    np.testing.assert_allclose(o1, o2, atol=1e-5, rtol=1e-5)
    assert (o1[-5:] == 0).all()
    for a, b in zip(v1(cot), v2(cot)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="tile must be a power of two"):
        kernels.grouped_swiglu(rows, sizes, wgu, wd, tile=48)

    # a masked chunk clamped to the array's end over another group's rows, and padding rows of
    # any value (inf) past the groups: the same results as zero padding, all finite
    sizes = jnp.asarray([30, 3], jnp.int32)
    rows = jnp.asarray(rng.normal(size=(36, D)), jnp.float32)
    wgu, wd = wgu[:2], wd[:2]
    grads = []
    for pad in (0.0, np.inf):
        x = rows.at[33:].set(pad)
        y, vjp = jax.vjp(lambda x, a, b: kernels.grouped_swiglu(x, sizes, a, b, tile=8), x, wgu, wd)
        grads.append((y, *vjp(cot[:36])))
    for a, b in zip(*grads):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(a, b)
    G, M = 2, 33
    y_ref, vjp_ref = jax.vjp(ref, rows[:33], wgu, wd)
    np.testing.assert_allclose(grads[0][0][:33], y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][2:], vjp_ref(cot[:33])[1:]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_grouped_swiglu_keeps_no_rows_by_f_activation():
    """Memory bound: the compiled forward + backward holds less than one [rows, 2F] float32 gate/up
    activation (the loops rebuild each chunk's in the backward pass); two 'tiled' gmms keep several
    (measured: 15 MiB against 134 MiB, one activation being 32 MiB)."""
    from moejax.model.layers import swiglu

    M, D, F, G = 8192, 64, 512, 4
    sizes = jnp.full((G,), M // G, jnp.int32)
    args = (
        jax.ShapeDtypeStruct((M, D), jnp.float32),
        jax.ShapeDtypeStruct((G, D, 2, F), jnp.float32),
        jax.ShapeDtypeStruct((G, F, D), jnp.float32),
    )

    def temp(looped):
        def loss(x, a, b):
            if looped:
                return jnp.sum(kernels.grouped_swiglu(x, sizes, a, b) ** 2)
            gmm = functools.partial(kernels.gmm, preferred_element_type=jnp.float32, impl="tiled")
            h = gmm(x, a.reshape(G, D, 2 * F), sizes)
            return jnp.sum(gmm(swiglu(h.reshape(M, 2, F)), b, sizes) ** 2)

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    activation = M * 2 * F * 4
    assert temp(True) < activation < temp(False)


def test_loop_tile_sizes():
    from moejax.kernels.gmm.looped import MAX_TILE, loop_tile
    from moejax.kernels.gmm.ops import default_tile

    assert loop_tile(65536, 128) == 512  # 512 rows per group
    assert loop_tile(49152, 64) == 512 and loop_tile(16384, 8) == MAX_TILE  # 768, 2048 per group
    assert loop_tile(16, 8) == default_tile(16, 8) == 8  # decoding: small tiles


# Pallas kernels: compiled on their own platform, Pallas interpret mode elsewhere
# (pltpu.InterpretParams for the Mosaic TPU kernels, interpret=True for the Triton GPU kernels).
# Shapes give several row tiles with a partial last one, and (GPU) partial K and N tiles; (TPU)
# several K and N tiles.
PALLAS_SHAPES = {
    "pallas_tpu": ((37, 256, 256), (16, 128, 128)),
    "pallas_gpu": ((37, 40, 36), (16, 16, 16)),
}
ALIGNED_GPU_SHAPE = (
    (37, 32, 48),
    (16, 16, 16),
)  # K and N multiples of their tiles: the unmasked loads


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """References use jnp.dot, which is TF32 on GPUs by default; compare against exact float32."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["random_with_empty", "one_group_all_rows", "short_sum"])
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_gmm_matches_reference_forward_and_grads(impl, kind, dtype):
    rng = np.random.default_rng(abs(hash((impl, kind))) % 2**32)
    (M, K, N), tiles = (
        ALIGNED_GPU_SHAPE
        if (impl, kind) == ("pallas_gpu", "one_group_all_rows")
        else PALLAS_SHAPES[impl]
    )
    G, offset, local = 5, 1, 3
    sizes = jnp.asarray(_group_sizes(rng, M, G, kind), jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
    rhs = jnp.asarray(rng.normal(size=(local, K, N)) / np.sqrt(K), dtype)

    def f(impl):
        return jax.jit(
            lambda a, b: kernels.gmm(
                a,
                b,
                sizes,
                group_offset=offset,
                preferred_element_type=jnp.float32,
                impl=impl,
                tiles=tiles,
            )
        )

    tol = TOL[dtype] * 4
    np.testing.assert_allclose(
        f(impl)(lhs, rhs), f("reference")(lhs, rhs), atol=tol, rtol=TOL[dtype]
    )
    cot = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    g_ref = jax.vjp(f("reference"), lhs, rhs)[1](cot)
    g_got = jax.vjp(f(impl), lhs, rhs)[1](cot)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 4, rtol=TOL[dtype] * 2
        )


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "tiled", "ragged_dot"])
def test_tgmm_matches_reference_with_empty_and_remote_groups(impl):
    rng = np.random.default_rng(7)
    (M, K, N), tiles = PALLAS_SHAPES.get(impl, ((37, 24, 20), None))
    sizes = jnp.asarray(
        [5, 0, 19, 0, 9, 4], jnp.int32
    )  # empty groups inside the local range; 37 - 37 rows
    lhs = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    grad = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    got = kernels.tgmm(lhs, grad, sizes, group_offset=1, num_groups=4, impl=impl, tiles=tiles)
    ref = kernels.tgmm_reference(lhs, grad, sizes, group_offset=1, num_groups=4)
    assert got.shape == (4, K, N)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(got[0]), 0.0
    )  # the empty group's gradient is exactly zero


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_gmm_bad_sizes_stay_in_bounds(impl):
    """Negative sizes and sizes summing past M behave as the reference (and interpret mode raises on
    any out-of-bounds read, so none happens)."""
    (M, K, N), tiles = PALLAS_SHAPES[impl]
    lhs = jnp.ones((M, K))
    rhs = jnp.ones((2, K, N))
    sizes = jnp.array([-3, 5, 200], jnp.int32)
    got = kernels.gmm(lhs, rhs, sizes, group_offset=1, impl=impl, tiles=tiles)
    np.testing.assert_allclose(got, kernels.gmm(lhs, rhs, sizes, group_offset=1, impl="reference"))


def test_gmm_bad_sizes_never_read_out_of_bounds_and_checked_mode_raises():
    lhs = jnp.ones((8, 4))
    rhs = jnp.ones((2, 4, 3))
    sizes = jnp.array([-3, 20], jnp.int32)  # negative, and past M
    out = kernels.gmm(lhs, rhs, sizes)
    np.testing.assert_allclose(out, kernels.gmm(lhs, rhs, sizes, impl="reference"))
    np.testing.assert_allclose(out, kernels.gmm(lhs, rhs, sizes, impl="ragged_dot"))
    np.testing.assert_allclose(out, 4.0)  # negative counts as 0; group 1 clipped to the 8 rows
    checked = checkify.checkify(lambda s: kernels.gmm(lhs, rhs, s, validate=True))
    err, _ = checked(sizes)
    with pytest.raises(checkify.JaxRuntimeError, match="negative"):
        err.throw()
    err, _ = checked(jnp.array([4, 4], jnp.int32))
    err.throw()  # valid sizes pass


@pytest.mark.parametrize(
    "lhs,rhs,sizes,match",
    [
        ((8,), (2, 4, 3), (2,), "lhs must be"),
        ((8, 4), (2, 5, 3), (2,), r"rhs must be \[G, 4, N\]"),
        ((8, 4), (2, 4, 3), (1,), "group_sizes has 1 groups"),
    ],
)
def test_gmm_static_shape_errors(lhs, rhs, sizes, match):
    with pytest.raises(ValueError, match=match):
        kernels.gmm(jnp.ones(lhs), jnp.ones(rhs), jnp.ones(sizes, jnp.int32))


def test_permute_unpermute_round_trip():
    rng = np.random.default_rng(0)
    M, K, E, D = 11, 3, 5, 4
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(M)]), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(M, K)), jnp.float32)
    xs, order, sizes = kernels.permute(x, ids, E)
    assert list(np.asarray(sizes)) == list(np.bincount(np.asarray(ids).ravel(), minlength=E))
    sorted_ids = np.asarray(ids).ravel()[np.asarray(order)]
    assert np.all(np.diff(sorted_ids) >= 0)
    y = kernels.unpermute(xs, order, w)  # identity experts: y = sum_k w_k x
    np.testing.assert_allclose(y, x * w.sum(1, keepdims=True), rtol=1e-6)


def test_permutation_gradients_are_the_plain_gathers():
    """permute / unpermute / gather_rows differentiate by inverse gathers (custom_vjp): equal to
    JAX's own gradients of the plain gathers, which scatter."""
    rng = np.random.default_rng(1)
    M, K, E, D = 13, 3, 6, 5
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(M)]), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(M, K)), jnp.float32)
    scale = jnp.arange(M * K, dtype=jnp.float32)[:, None]

    def fast(x, w):
        xs, order, _ = kernels.permute(x, ids, E)
        return kernels.unpermute(jnp.sin(xs) * scale, order, w)

    def plain(x, w):
        order = jnp.argsort(ids.reshape(-1), stable=True)
        ys = jnp.sin(x[order // K]) * scale
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(M * K))
        return jnp.einsum("MKD,MK->MD", ys[inv].reshape(M, K, D), w)

    def grads(f):
        return jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1))(x, w)

    for a, b in zip(grads(fast), grads(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # a one-to-one partial map: out rows 0..3 read x rows 7, 0, 12 and nothing
    idx, ok = jnp.array([7, 0, 12, 3]), jnp.array([True, True, True, False])
    inv = jnp.zeros((M,), jnp.int32).at[jnp.array([7, 0, 12])].set(jnp.array([0, 1, 2]))
    inv_ok = jnp.zeros((M,), bool).at[jnp.array([7, 0, 12])].set(True)
    got = jax.grad(lambda x: jnp.sum(jnp.sin(kernels.gather_rows(x, idx, ok, inv, inv_ok))))(x)
    ref = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.where(ok[:, None], x[idx], 0))))(x)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
