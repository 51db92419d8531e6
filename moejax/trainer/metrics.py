"""Metrics: MFU against a per-device peak table; writers (metrics.jsonl, TensorBoard, console)."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
}


def measure_cpu_peak(dtype=jnp.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """Matmul FLOP/s of this host, measured once (the CPU entry of the peak table)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def device_peak_flops(compute_dtype: str = "float32", measure: bool = True) -> tuple[float, str]:
    """Total peak FLOP/s of all devices and where the figure came from."""
    dev = jax.devices()[0]
    kind = dev.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak * jax.device_count(), f"table: {dev.device_kind}"
    if dev.platform == "cpu" and measure:
        dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
        return measure_cpu_peak(dtype), f"measured: cpu {compute_dtype} matmul"
    return float("nan"), f"unknown device {dev.device_kind}"


def to_host(metrics: dict) -> dict:
    """Device metrics -> floats (per-MoE-layer arrays keep their per-layer values)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.ravel()]
    return out


def _logged_at_or_before(line: str, step: int) -> bool:
    """A complete line logged at or before `step` (a killed run's half-written last line is not)."""
    try:
        return (
            bool(line.strip()) and line.endswith("\n") and json.loads(line).get("step", 0) <= step
        )
    except json.JSONDecodeError:
        return False


class MetricWriter:
    """One JSON object per logged step in WORKDIR/metrics.jsonl, plus TensorBoard events."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):  # drop lines a crashed run logged past the restored step
            with open(self.path) as f:
                keep = [ln for ln in f if _logged_at_or_before(ln, resume_step)]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        # Not-a-number (MFU without a known peak, the first step's time) stays in metrics.jsonl but
        # not in TensorBoard, which would warn about it once per scalar per step.
        for k, v in values.items():
            if isinstance(v, list):
                for i, x in enumerate(v):
                    if math.isfinite(x):
                        self.tb.add_scalar(f"{k}/layer_{i}", x, step)
            elif isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()
