"""FP8 training (moejax/kernels/fp8.py): the block layout of DeepSeek-V3's checkpoints, the matmuls'
forward and both gradients against a numpy statement of the tiling, and the tiny model's loss in
FP8 against bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax.config import ConfigError, ExecutionConfig
from moejax.kernels import fp8


def np_qdq(x, bm, bn):
    """numpy: x [M, N] through E4M3 with one scale (amax / 448) per bm x bn tile, and back."""
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    for i in range(0, x.shape[0], bm):
        for j in range(0, x.shape[1], bn):
            t = x[i : i + bm, j : j + bn]
            amax = np.abs(t).max()
            s = amax / 448.0 if amax > 0 else 1.0
            out[i : i + bm, j : j + bn] = (t / s).astype(ml_dtypes.float8_e4m3fn).astype(
                np.float32
            ) * s
    return out


def test_weight_blocks_are_the_checkpoint_layout():
    from moejax.convert.safetensors_io import dequantize_fp8

    w = np.random.default_rng(0).normal(0, 0.02, (300, 200)).astype(np.float32)
    w[5, 7] = 3.0  # an outlier costs only its own 128 x 128 block
    q, scale_inv = fp8.quantize_weight(jnp.asarray(w))
    assert q.dtype == jnp.float8_e4m3fn and scale_inv.shape == (3, 2)
    ours = np.asarray(fp8.dequantize_weight(q, scale_inv))
    np.testing.assert_array_equal(dequantize_fp8(np.asarray(q), np.asarray(scale_inv)), ours)
    np.testing.assert_allclose(ours, np_qdq(w, 128, 128), rtol=1e-6, atol=1e-9)
    # E4M3 keeps 3 mantissa bits: each value within 2^-4 of itself (plus the subnormal step)
    step = np.repeat(np.repeat(np.asarray(scale_inv), 128, 0), 128, 1)[:300, :200] * 2.0**-9
    assert np.all(np.abs(ours - w) <= np.abs(w) * 2.0**-4 + step)
    # the outlier coarsens only its own block's scale
    s = np.asarray(scale_inv)
    assert s[0, 0] > 10 * max(s[0, 1], s[1, 0], s[1, 1], s[2, 0], s[2, 1])


def test_fp8_dot_forward_and_gradients_are_the_tiled_formulas():
    rng = np.random.default_rng(1)
    M, K, N = 160, 300, 200  # partial tiles on every axis
    x = rng.normal(0, 1, (M, K)).astype(np.float32)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    dy = rng.normal(0, 1, (M, N)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_dot(x, w, jnp.float32), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    wq = np_qdq(w, 128, 128)
    np.testing.assert_allclose(y, np_qdq(x, 1, 128) @ wq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np_qdq(dy, 1, 128) @ wq.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np_qdq(x, 128, 1).T @ np_qdq(dy, 128, 1), rtol=1e-5, atol=1e-4)
    exact = x @ w
    rel = np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact)
    assert 1e-3 < rel < 0.06, rel  # quantized (not a plain matmul), yet close


def test_fp8_gmm_is_fp8_dot_per_expert():
    rng = np.random.default_rng(2)
    sizes = np.array([40, 0, 70, 26], np.int32)  # an empty expert; 8 rows past the groups
    M, K, N = 144, 200, 96
    x = rng.normal(0, 1, (M, K)).astype(np.float32)
    w = rng.normal(0, 0.05, (4, K, N)).astype(np.float32)
    dy = rng.normal(0, 1, (M, N)).astype(np.float32)
    dy[136:] = 0  # rows past the groups have no output
    f = lambda x, w: fp8.fp8_gmm(x, w, jnp.asarray(sizes), jnp.dtype(jnp.float32))
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    xq, dq_rows, dq_cols, xq_cols = (
        np_qdq(x, 1, 128),
        np_qdq(dy, 1, 128),
        np_qdq(dy, 128, 1),
        np_qdq(x, 128, 1),
    )
    for g in range(4):
        r = slice(starts[g], starts[g + 1])
        wq = np_qdq(w[g], 128, 128)
        np.testing.assert_allclose(y[r], xq[r] @ wq, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx[r], dq_rows[r] @ wq.T, rtol=1e-5, atol=1e-5)
        # wgrad's 128 x 1 tiles run over the sorted rows (a tile may straddle two experts)
        np.testing.assert_allclose(dw[g], xq_cols[r].T @ dq_cols[r], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(y)[136:], 0)


def test_fp8_einsum_flattens_the_projection_specs():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1, (2, 3, 4, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 1, (4, 16, 8)), jnp.float32)
    got = fp8.fp8_einsum("BTNH,NHD->BTD", x, w)
    want = fp8.fp8_dot(x.reshape(6, 64), w.reshape(64, 8), jnp.float32).reshape(2, 3, 8)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="contract x's trailing and w's leading"):
        fp8.fp8_einsum("BTD,ND->BTN", x[..., 0, :], w[0])


def test_fp8_switch_is_checked():
    assert ExecutionConfig(fp8=True).fp8
    with pytest.raises(ConfigError, match=r"execution.fp8: .*moe_impl='capacity'.*dropless"):
        ExecutionConfig(fp8=True, moe_impl="capacity")


@pytest.mark.slow
def test_fp8_loss_curve_tracks_bf16():
    """240 steps: the FP8 run's loss, smoothed over 20 steps, stays within 3% of the bf16 run's at
    every step while both fall from ~8.1 to ~1. Tiles of 16 (not 128) so that the tiny model's
    64-wide rows and 32-wide experts hold several tiles each, as V3's do."""
    from benchmarks.fp8_curve import curve, smoothed_gap

    (ref, _), (got, _) = curve(False, 240), curve(True, 240, block=16)
    rel = smoothed_gap(ref, got)
    assert ref[-20:].mean() < 0.25 * ref[0], ref[-20:].mean()  # it learned
    assert rel.max() < 0.03, (rel.max(), int(rel.argmax()))
    assert np.abs(got - ref).max() > 0  # FP8 did change the numbers


def test_fp8_on_a_platform_says_what_runs():
    dev = lambda **kw: type("D", (), kw)()
    assert fp8.has_fp8_units(dev(device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0"))
    assert not fp8.has_fp8_units(dev(device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0"))
    assert not fp8.has_fp8_units(dev(device_kind="TPU v5p"))
    note = fp8.fallback_note(dev(device_kind="cpu"), "bfloat16")
    assert "no FP8 matmul units" in note and "emulated" in note and "bfloat16 matmuls" in note
    h100 = fp8.fallback_note(dev(device_kind="H100", compute_capability="9.0"), "bfloat16")
    assert "does not use yet" in h100


def test_plan_names_the_fp8_fallback():
    import os

    from moejax.config import Config
    from moejax.experiment import load_config_file
    from moejax.plan import plan, report
    from tests.helpers import ROOT

    cd = load_config_file(os.path.join(ROOT, "experiments", "deepseek_v3_tiny.py"))
    cd.execution.fp8 = True
    cfg = Config.from_dict(cd)
    text = report(plan(cfg, chips=1, gen="v5p"), cfg)
    assert "execution.fp8: emulated" in text and "TPU v5p has no FP8 matmul units" in text
    h100 = report(plan(cfg, chips=1, gen="h100"), cfg)
    assert "FP8 peak (1979 TFLOP/s) needs a fused FP8 kernel" in h100
