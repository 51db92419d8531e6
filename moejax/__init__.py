"""moejax: DeepSeek-style Mixture-of-Experts language models in JAX.

Dimension letters used in einsum strings and parameter names across the project:

  B batch            T query length        S key length         D model (hidden)
  N heads            H head dim            F FFN hidden         E experts
  K top-k            G groups              C capacity           V vocab
  R latent rank      L layers              M rows (flattened tokens, B*T or B*T*K)
  Q query heads per key/value head (GQA)   P rotary pairs (rope dim / 2)
  Z rank of a LoRA adapter (moejax.finetune.lora)
"""

import glob
import os

__version__ = "0.1.0"


def tpu_host() -> bool:
    """This machine has TPU chips: TPU device files, or Google's PCI vendor id (as jax probes)."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def _quiet_libtpu_off_tpu() -> None:
    """On a machine without TPU chips, tell libtpu (the `tpu` extra) which host it is not on.

    Loaded without these variables, libtpu asks the Cloud metadata server, fails, and prints "could
    not determine TPU accelerator type / worker hostnames" and an InitGoogle trace to stderr, once
    when jax probes its backends and once more when `moejax.compile` loads it to describe a
    topology. Neither variable changes a topology built from an explicit name (tests/test_tpu_aot.py
    compiles with them set), and a machine with TPU chips (`tpu_host`) is left exactly as it was,
    as is any value the user set."""
    if tpu_host():
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


_quiet_libtpu_off_tpu()

__all__ = ["ModelConfig", "__version__"]


def __getattr__(name):  # lazy, so that `moejax.data` worker processes do not import jax
    if name == "ModelConfig":
        from moejax.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
