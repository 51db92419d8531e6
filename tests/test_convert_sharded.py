"""Sharded, streaming Hugging Face I/O: the 8-device checks run in a subprocess
(tests/convert_rss_check.py, the device count is fixed when jax starts); header checks, FP8 regions
and the CLI run here."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moejax.convert import from_hf, load
from moejax.convert.__main__ import main
from moejax.convert.safetensors_io import Checkpoint, dequantize_fp8
from tests.convert_rss_check import SMALL, write_checkpoint
from tests.helpers import run_module


def _run_8_devices(mode: str, where: str, timeout: int) -> dict:
    r = run_module("tests.convert_rss_check", mode, where, devices=8, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _run_8_devices("small", str(tmp_path_factory.mktemp("sharded")), timeout=600)


def test_sharded_round_trip_is_exact_on_8_devices(small):
    assert small["devices"] == 8
    for mesh in ("fsdp2_expert4", "fsdp2_tensor2_stage2_embed_rule"):
        r = small[mesh]
        assert r["wrong_shardings"] == [], (mesh, r["wrong_shardings"])
        assert r["names_ok"] and r["unequal_after_round_trip"] == [], (mesh, r)
        assert r["unequal_to_one_device"] == [], (mesh, r)
        assert any("fsdp" in s for s in r["specs"]) and len(r["specs"]) > 3, r[
            "specs"
        ]  # really sharded
    assert (
        "P(None, 'expert', 'fsdp', None, None)" in small["fsdp2_expert4"]["specs"]
    )  # experts x embed
    assert any("('fsdp', 'tensor')" in s for s in small["fsdp2_tensor2_stage2_embed_rule"]["specs"])


def test_fused_expert_layout_and_orbax_restore_onto_a_mesh(small):
    assert small["fused_unequal"] == []
    assert small["bf16_unequal"] == []  # bfloat16 parameters on fsdp x expert export exactly
    assert small["load_model"] == {"wrong_shardings": [], "unequal_to_one_device": []}


def test_fp8_tiles_cut_by_device_shards(small):
    r = small["fp8"]
    assert (
        r["wq_a_spec"] == "P(None, 'fsdp', None)"
    )  # hidden 384 split at 192, inside the middle tile
    assert r["wq_a_equal"] and r["up_equal"], r


def test_indivisible_mesh_names_the_dimension_before_placing(small):
    assert small["indivisible"].endswith(
        "w_down'].value: dimension 4 is not divisible by mesh axes expert (size 8)"
    ), small["indivisible"]


def test_fp8_region_equals_whole_tensor_dequantization(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 260)).astype(
        ml_dtypes.float8_e4m3fn
    )  # 3 x 3 tiles, the last ones partial
    scale = rng.uniform(0.5, 2, (3, 3)).astype(np.float32)
    f = str(tmp_path / "model.safetensors")
    save_file({"w.weight": w, "w.weight_scale_inv": scale}, f)
    whole = dequantize_fp8(w, scale)
    ckpt = Checkpoint([f])
    for rows, cols in [
        ((50, 200), (100, 230)),
        ((0, 300), (0, 260)),
        ((127, 129), (255, 260)),
        ((256, 300), (0, 1)),
    ]:
        region = (slice(*rows), slice(*cols))
        np.testing.assert_array_equal(
            ckpt.read("w.weight", region), whole[region], err_msg=str(region)
        )


def _small_checkpoint(tmp_path):
    src = str(tmp_path / "hf")
    write_checkpoint(src, SMALL, file_bytes=1 << 30)
    return src


def test_shape_mismatch_names_both_shapes_before_placing(tmp_path, monkeypatch):
    src = _small_checkpoint(tmp_path)
    f = os.path.join(src, "model-00001.safetensors")
    tensors = load_file(f)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"  # [D, F] = [32, 16]
    tensors[name] = np.zeros((32, 17), np.float32)
    save_file(tensors, f)

    def no_place(*a, **k):
        raise AssertionError("placed a parameter before checking the headers")

    monkeypatch.setattr(load, "place", no_place)
    with pytest.raises(ValueError) as e:
        from_hf(src)
    msg = str(e.value)
    assert (
        msg.startswith(f"{name}: shape (32, 17) in the checkpoint, expected (32, 16)")
        and "\n" not in msg
    ), msg
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"lacks tensors: model.layers.0.mlp.up_proj.weight"):
        from_hf(src)


def test_cli_mesh_dtype_and_one_line_errors(tmp_path, capsys):
    from moejax.convert.checkpoint import load_model

    src = _small_checkpoint(tmp_path)
    assert (
        main(
            [
                "hf-to-moejax",
                "--src",
                src,
                "--dst",
                str(tmp_path / "mj"),
                "--mesh",
                "fsdp=-1",
                "--rules",
                "embed=fsdp+expert",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    model, cfg = load_model(str(tmp_path / "mj"))
    assert cfg.param_dtype == "bfloat16" and model.embed[...].dtype == np.dtype(ml_dtypes.bfloat16)
    assert (
        main(
            [
                "moejax-to-hf",
                "--src",
                str(tmp_path / "mj"),
                "--dst",
                str(tmp_path / "back"),
                "--mesh",
                "fsdp=1",
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    orig = load_file(os.path.join(src, "model-00001.safetensors"))
    np.testing.assert_array_equal(
        back["model.layers.1.mlp.experts.2.up_proj.weight"],
        orig["model.layers.1.mlp.experts.2.up_proj.weight"],
    )
    capsys.readouterr()

    def error_of(*argv):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "mesh" in error_of(
        "hf-to-moejax", "--src", src, "--dst", str(tmp_path / "x"), "--mesh", "expert=3"
    )
    assert "--mesh: 'experts=2'" in error_of(
        "hf-to-moejax", "--src", src, "--dst", str(tmp_path / "x"), "--mesh", "experts=2"
    )
    assert "mesh.rules" in error_of(
        "hf-to-moejax", "--src", src, "--dst", str(tmp_path / "x"), "--rules", "embed=gpu"
    )
    f = os.path.join(src, "model-00001.safetensors")
    tensors = load_file(f)
    tensors["model.norm.weight"] = np.ones((33,), np.float32)
    save_file(tensors, f)
    assert "model.norm.weight: shape (33,) in the checkpoint, expected (32,)" in error_of(
        "hf-to-moejax", "--src", src, "--dst", str(tmp_path / "x")
    )
    assert (
        "no such file"
        in error_of(
            "hf-to-moejax", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x")
        ).lower()
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_streaming_load_of_a_1gb_checkpoint_onto_8_devices_keeps_host_memory_bounded(tmp_path):
    """DeepSeek-V3 layout, 1.26 GB of bfloat16 in 5 files, loaded onto fsdp=2 x expert=4: the peak
    RSS increase is the sharded model itself (CPU device memory is host memory) plus about one
    shard."""
    where = str(tmp_path / "big")
    try:
        r = _run_8_devices("big", where, timeout=900)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    gib = 1 << 30
    print(
        f"\ncheckpoint {r['disk_bytes'] / gib:.2f} GiB on disk; model {r['model_bytes'] / gib:.2f} "
        f"GiB in bfloat16, {r['device_bytes'] / gib:.2f} GiB on the 8 devices (replicated "
        f"parameters counted per copy); RSS baseline {r['rss_base'] / gib:.2f} GiB, peak increase "
        f"{r['rss_peak_increase'] / gib:.2f} GiB = {r['ratio']:.2f}x the model; max |logit diff| "
        f"{r['max_logit_diff']:.2e} (max |logit| {r['max_abs_logit']:.2f}); seconds "
        f"{json.dumps({k: round(v, 1) for k, v in r['seconds'].items()})}"
    )
    assert r["disk_bytes"] >= 10**9
    assert r["param_dtype"] == "bfloat16" and r["dtypes"] == [
        "bfloat16",
        "float32",
    ]  # float32: the router
    assert r["ratio"] < 1.5, r
    assert r["wrong_shardings"] == []
    assert r["max_logit_diff"] <= 1e-4 * max(1.0, r["max_abs_logit"]), r
