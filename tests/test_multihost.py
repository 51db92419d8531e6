"""Two local processes (127.0.0.1, CPU collectives) train as one job: a hybrid mesh (fsdp over the 2
processes as dcn, expert over each one's 2 devices as ici), data
split by process, a checkpoint written by both and restored by both; then killing one process makes
the other exit with an error within a bounded time instead of hanging in a collective."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from moejax.data import mixture
from tests.helpers import ROOT, override_flags, tiny_config

HEARTBEAT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, cache, steps):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
            MOEJAX_COORDINATOR=f"127.0.0.1:{port}",
            MOEJAX_NUM_PROCESSES="2",
            MOEJAX_PROCESS_ID=str(i),
            MOEJAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
            PYTHONUNBUFFERED="1",
            TPU_SKIP_MDS_QUERY="1",
        )  # libtpu (the `tpu` extra) must not wait on a cloud metadata server
        cmd = [
            sys.executable,
            "-m",
            "moejax.train",
            "--config",
            os.path.join(ROOT, "experiments", "moe.py"),
            *override_flags(cache),
            f"--workdir={workdir}",
            f"--config.train.steps={steps}",
            "--config.train.ckpt_every=4",
            "--config.mesh.fsdp=1",
            "--config.mesh.dcn_fsdp=2",
            "--config.mesh.expert=2",
        ]  # a hybrid mesh: fsdp across the processes, expert within each
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
        )
    return procs


class _Reader(threading.Thread):
    """Collects a process's output lines as they come."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc, self.lines = proc, []
        self.start()

    def run(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)


def test_two_processes_train_checkpoint_restore_and_fail_fast(tmp_path, corpus_cache):
    cfg = tiny_config(corpus_cache)
    mixture.resolve(
        cfg.data, cfg.model.vocab_size
    )  # build the corpus once, before two processes want it
    wd = str(tmp_path / "run")

    for attempt in range(2):
        procs = _launch(wd, corpus_cache, steps=4)
        readers = [_Reader(p) for p in procs]
        for p in procs:
            p.wait(timeout=600)
        for r in readers:
            r.join(timeout=10)
        texts = [r.text() for r in readers]
        # XLA's CPU client exchanges the processes' device topologies with a fixed 2-minute timeout;
        # on this shared 2-core machine one start-up in several CI runs missed it before either
        # process trained a step. Such a start-up (and only that) is tried once more, and says so.
        if (
            attempt == 0
            and any(p.returncode for p in procs)
            and any("local_topology" in t and "GetKeyValue() timed out" in t for t in texts)
        ):
            print("start-up topology exchange timed out; launching once more")
            continue
        break
    for i, (p, t) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, (
            f"process {i} failed:\n{t[-4000:]}\n--- the other process:\n{texts[1 - i][-3000:]}"
        )
    assert "val_loss" in readers[0].text()
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]

    for attempt in range(2):
        procs = _launch(wd, corpus_cache, steps=400)
        readers = [_Reader(p) for p in procs]
        deadline = time.time() + 600
        while "resumed from" not in readers[0].text() or "train:" not in readers[0].text()[-400:]:
            if procs[0].poll() is not None or procs[1].poll() is not None:
                break
            assert time.time() < deadline, readers[0].text()[-4000:]
            time.sleep(0.5)
        if procs[0].poll() is None:
            break
        for p in procs:
            p.wait(timeout=60)
        texts = [r.text() for r in readers]
        assert attempt == 0 and any(
            "local_topology" in t and "GetKeyValue() timed out" in t for t in texts
        ), texts[0][-4000:] + "\n--- the other process:\n" + texts[1][-3000:]
        print("start-up topology exchange timed out; launching once more")
    assert "at step 4" in readers[0].text()
    time.sleep(2)  # a few steps past the restore
    seen = len(readers[0].text())
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        procs[0].wait(timeout=HEARTBEAT_S * 6 + 60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail(
            "the surviving process hung after its peer was killed:\n" + readers[0].text()[-3000:]
        )
    waited = time.time() - t_kill
    assert procs[0].returncode != 0, readers[0].text()[-3000:]
    readers[0].join(timeout=10)
    after = readers[0].text()[seen:]
    # The coordination service says why. Its message can precede a long fatal-signal dump of every
    # thread's stack, so the whole output written after the kill is searched, not only its tail.
    assert "error" in after.lower(), after[:3000] + "\n[...]\n" + after[-3000:]
    print(f"survivor exited with {procs[0].returncode} after {waited:.0f} s")
