"""Multi-process (multi-host) start-up: initialize jax.distributed when the environment says this
process is one of several, before anything else touches JAX.

Recognized environments, in order:
  explicit   MOEJAX_COORDINATOR=host:port MOEJAX_NUM_PROCESSES=N MOEJAX_PROCESS_ID=i
             (optional MOEJAX_LOCAL_DEVICE_IDS=0,1; launch/local.sh sets these)
  SLURM      SLURM_NTASKS > 1 (srun; launch/slurm.sbatch): JAX reads the SLURM variables itself
  TPU pod    TPU_WORKER_HOSTNAMES naming several hosts, or a multi-slice
             MEGASCALE_COORDINATOR_ADDRESS (gcloud ... --worker=all, GKE JobSet): JAX reads the TPU
             metadata itself
Anything else is a single process and nothing is initialized.

Failure detection: a process that stops sending heartbeats for MOEJAX_HEARTBEAT_TIMEOUT seconds
(default 100) is declared dead by the coordination service and the others exit with an error, so a
killed worker never leaves its peers hanging in a collective forever.
"""

from __future__ import annotations

import os

_initialized = False


def environment() -> dict | None:
    """jax.distributed.initialize keyword arguments for this environment, or None for one
    process."""
    env = os.environ
    timeouts = {
        "heartbeat_timeout_seconds": int(env.get("MOEJAX_HEARTBEAT_TIMEOUT", "100")),
        "initialization_timeout": int(env.get("MOEJAX_INIT_TIMEOUT", "300")),
    }
    if env.get("MOEJAX_COORDINATOR"):
        try:
            kw = dict(
                coordinator_address=env["MOEJAX_COORDINATOR"],
                num_processes=int(env["MOEJAX_NUM_PROCESSES"]),
                process_id=int(env["MOEJAX_PROCESS_ID"]),
                **timeouts,
            )
        except (KeyError, ValueError) as e:
            raise ValueError(
                "MOEJAX_COORDINATOR is set, so MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID must be "
                f"integers too ({e})"
            ) from None
        if env.get("MOEJAX_LOCAL_DEVICE_IDS"):
            kw["local_device_ids"] = [int(i) for i in env["MOEJAX_LOCAL_DEVICE_IDS"].split(",")]
        return kw
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return dict(**timeouts)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return dict(**timeouts)
    return None


def initialize() -> bool:
    """Initializes jax.distributed once if the environment names several processes; returns whether
    this is a multi-process run."""
    global _initialized
    kw = environment()
    if kw is None:
        return False
    if not _initialized:
        import jax

        jax.distributed.initialize(**kw)
        _initialized = True
    return True


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0
