"""Ahead-of-time compile of the real train step for a TPU topology, from any host (no TPU needed).

    python -m moejax.compile --config experiments/deepseek_v2_lite.py --topology v5p-64 \\
        --config.mesh.fsdp=-1 --config.mesh.expert=8 --config.train.batch_size=256

Builds the step exactly as `moejax.train` does (same shardings, optimizer, remat policy), lowers it
with abstract arguments for the topology's devices (libtpu: the `tpu` extra), compiles it, and
prints per-device memory from `compiled.memory_analysis()` against the chip's HBM, and the FLOPs
from `cost_analysis()`. Exit status 0 when it fits, 3 when it does not.
"""

from __future__ import annotations

import os
import sys
import time

GiB = 1024**3


def compile_for_topology(cfg, topology: str, *, quiet: bool = False) -> dict:
    import jax

    from moejax import kernels, pod, sharding

    gen, devices = pod.tpu_devices(topology)
    chip = pod.CHIPS[gen]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    t0 = time.time()
    step, state, batch = pod.abstract_train_step(cfg, mesh)
    with kernels.target_platform("tpu"), jax.set_mesh(mesh):
        lowered = step.lower(state, batch)
        t_lower = time.time() - t0
        compiled = lowered.compile()
    t_compile = time.time() - t0 - t_lower
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    result = {
        "topology": topology,
        "chips": len(devices),
        "chip": chip.name,
        "hbm_bytes": chip.hbm_bytes,
        "mesh": dict(mesh.shape),
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "per_device_bytes": per_device,
        "state_bytes": pod.tree_bytes_per_device(state),
        "flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "fits": per_device <= chip.hbm_bytes,
        "lower_s": t_lower,
        "compile_s": t_compile,
    }
    if not quiet:
        mesh_s = " ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "single device"
        print(
            f"[compile] {topology}: {len(devices)} x {chip.name} ({chip.hbm_bytes / GiB:.0f} GiB "
            f"HBM); mesh {mesh_s}; remat {cfg.execution.remat_policy}; batch "
            f"{cfg.train.batch_size} x {cfg.data.seq_len}"
        )
        print(f"[compile] lowered in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
        print("[compile] per-device memory (memory_analysis):")
        for k in ("argument", "output", "alias", "temp", "code"):
            print(f"  {k:<9} {result[k + '_bytes'] / GiB:9.2f} GiB")
        print(
            f"  {'total':<9} {per_device / GiB:9.2f} GiB  (arguments + outputs - aliased + "
            f"temporaries) = {100 * per_device / chip.hbm_bytes:.0f}% of HBM: "
            f"{'fits' if result['fits'] else 'DOES NOT FIT'}"
        )
        print(
            f"[compile] train state per device: {result['state_bytes'] / GiB:.2f} GiB; XLA "
            f"cost_analysis: {result['flops_per_device'] / 1e12:.1f} TFLOPs per device per step "
            "(it counts a scanned layer once and nothing inside Pallas kernels; the planner's "
            "model FLOPs are the figure for MFU)"
        )
        from moejax.plan import plan

        p = plan(cfg, topology)
        c = p["components"]
        args_est = c["params"] + c["optimizer"] + c["router"] + c.get("frozen", 0)
        # everything the step allocates beyond its arguments (the gathered weights included)
        temp_est = p["total"] - args_est
        print(
            f"[compile] planner estimate (python -m moejax.plan): state {args_est / GiB:.2f} GiB "
            f"({_pct(args_est, mem.argument_size_in_bytes)}), temporaries {temp_est / GiB:.2f} GiB "
            f"({_pct(temp_est, mem.temp_size_in_bytes)}), total {p['total'] / GiB:.2f} GiB "
            f"({_pct(p['total'], per_device)} vs the compiler)"
        )
    return result


def _pct(est: float, actual: float) -> str:
    return f"{100 * (est - actual) / actual:+.0f}%" if actual else "n/a"


def main(argv):
    from absl import flags

    from moejax import pod, sharding
    from moejax.config import Config, ConfigError

    try:
        cfg = Config.from_dict(flags.FLAGS.config)
        result = compile_for_topology(cfg, flags.FLAGS.topology)
    except (ConfigError, pod.TopologyError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if result["fits"] else 3)


def _entry():
    os.environ.setdefault(
        "JAX_PLATFORMS", "cpu"
    )  # the host plans/compiles; TPU devices come from the topology
    from moejax.experiment import config_cli

    config_cli(
        main,
        lambda flags: flags.DEFINE_string(
            "topology", "v5p-8", "TPU topology: v5p-512 (Cloud naming) or v5p:8x8x4 (chips)"
        ),
    )


if __name__ == "__main__":
    _entry()
