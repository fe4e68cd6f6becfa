"""Running model-written Python against a task's tests, as a reward: 1.0 the tests pass, 0.0 they fail
(an exception, a crash, a limit hit, a timeout), None the sandbox could not start (no reward, never 0).

Each completion runs in a process of its own, started from a clean interpreter (`python -I -S`: no
site-packages, no user paths, no environment) in a scratch directory that is removed afterwards, with:
- limits (setrlimit): CPU seconds, address space, the size of any file written, open files; the number
  of processes through a cgroup of its own (pids.max) where this user may make one, for RLIMIT_NPROC
  does not hold for root; and a wall-clock timeout, after which every process in its cgroup (else its
  process group) is killed;
- Landlock (Linux ≥ 5.13, unprivileged): the filesystem is the interpreter and its standard library
  (read and execute) and the scratch directory (read and write), nothing else; no TCP connect or bind;
  and (Landlock ABI ≥ 6) no signal to a process outside the sandbox, so it cannot kill its parent;
- namespaces, where the kernel lets an unprivileged user make them: a user namespace (the code holds no
  capability on the host), a network namespace (no interface but a down loopback: no UDP either) and a
  PID namespace whose init is the test run, so every process the code forks dies with it and no host
  process can even be named.
What it does not cover: CPU time spread over forked processes (each has its own CPU limit; the wall
timeout and the process limit bound the total), side channels, kernel exploits; a machine without
Landlock falls back to the limits and namespaces alone (`isolation()` says what is in force).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import SandboxConfig

# The program run inside: the code, then the tests, in one fresh namespace; then the run's nonce on
# stdout. A pass is that nonce as the output's last line, so code that exits before the tests (os._exit(0),
# sys.exit(0)) does not pass. The harness shares the process with the code, so code written to dig the
# nonce out of the runner's memory could still forge it: that is out of this sandbox's reach.
RUNNER = """
import sys
def main():
    code, tests, nonce = sys.stdin.read().split("\\0")
    scope = {"__name__": "__main__"}
    exec(compile(code, "solution.py", "exec"), scope)
    exec(compile(tests, "tests.py", "exec"), scope)
    return nonce
nonce = main()
sys.stdout.write("\\n" + nonce + "\\n")
sys.stdout.flush()
"""
# A PID namespace's first process is its init: it forks the runner, reaps whatever the code leaves
# behind and exits with the runner's status; when it exits the kernel kills the rest of the namespace.
INIT = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", sys.argv[1]])
while True:
    try:
        done, status = os.wait()
    except ChildProcessError:
        sys.exit(1)
    if done == pid:
        sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
"""

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID
OPEN_FILES = 64  # file descriptors a process of the run may hold


# ---------------------------------------------------------------------------------------------- landlock

_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446  # x86-64 and arm64 share these numbers
_FS_EXECUTE, _FS_WRITE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_ALL_ABI1 = (1 << 13) - 1  # EXECUTE … MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_ALL = 3  # BIND_TCP | CONNECT_TCP
_SCOPE_ALL = 3  # ABSTRACT_UNIX_SOCKET | SIGNAL


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    if not sys.platform.startswith("linux"):
        return 0
    return max(0, _libc().syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _landlock(abi: int, read_only: tuple[str, ...], read_write: list[str]) -> None:
    """Restrict this process (and what it starts) to the given trees; raises OSError when it cannot."""
    libc = _libc()
    fs = _FS_ALL_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (
        _FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, _NET_ALL if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    for paths, access in ((read_only, _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR), (read_write, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            allowed = access if os.path.isdir(path) else access & (_FS_EXECUTE | _FS_READ_FILE | _FS_WRITE)
            rule = _PathBeneath(allowed, fd)
            rc = libc.syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(fd)
            if rc < 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    if libc.prctl(38, 1, 0, 0, 0) < 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "no_new_privs")
    if libc.syscall(_SYS_RESTRICT, ruleset, ctypes.c_uint32(0)) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)


@functools.cache
def _interpreter_paths() -> tuple[str, ...]:
    """What a clean `python -I -S` needs to read: its binary, its standard library, the shared libraries
    the loader maps, and /dev/null and /dev/urandom."""
    exe = os.path.realpath(sys.executable)
    paths = {exe, sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), "/dev/null", "/dev/urandom",
             "/etc/ld.so.cache", "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/proc/self"}
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.add(os.path.join(libdir, sysconfig.get_config_var("LDLIBRARY") or ""))
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))


# ---------------------------------------------------------------------------------------------- the run

def _unshare(flags: int) -> bool:
    return sys.platform.startswith("linux") and _libc().unshare(ctypes.c_int(flags)) == 0


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the sandbox use (probed once per process)."""

    landlock: int
    namespaces: bool
    process_limit: bool

    def describe(self) -> str:
        return ", ".join([f"Landlock ABI {self.landlock}" if self.landlock else "no Landlock (filesystem not confined)",
                          "user, network and PID namespaces" if self.namespaces else "no namespaces",
                          "a pids cgroup per run" if self.process_limit else "no process limit but the wall timeout"])


_ISOLATION: Isolation | None = None


def isolation() -> Isolation:
    global _ISOLATION
    if _ISOLATION is None:
        probe = subprocess.run([sys.executable, "-c", "pass"],
                               preexec_fn=lambda: os._exit(0 if _unshare(NAMESPACES) else 3))
        group = _pids_cgroup(1)
        if group is not None:
            _remove_cgroup(group)
        _ISOLATION = Isolation(landlock_abi(), probe.returncode == 0, group is not None)
    return _ISOLATION


_PIDS_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1's pids hierarchy, or v2


def _pids_cgroup(limit: int) -> Path | None:
    """A new cgroup allowing `limit` processes, or None when this user cannot make one."""
    for root in _PIDS_ROOTS:
        v2 = root.name != "pids"
        if not (root / "cgroup.procs").exists() or (v2 and not (root / "cgroup.controllers").exists()):
            continue
        group = root / f"alignpipe-sandbox-{os.getpid()}-{time.monotonic_ns()}"
        try:
            if v2 and "pids" not in (root / "cgroup.subtree_control").read_text().split():
                (root / "cgroup.subtree_control").write_text("+pids")
            group.mkdir()
            (group / "pids.max").write_text(str(limit))
            return group
        except OSError:
            if group.exists():
                _remove_cgroup(group)
    return None


def _remove_cgroup(group: Path) -> None:
    """Kill every process left in the cgroup, then remove it."""
    for _ in range(200):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    try:
        group.rmdir()
    except OSError:
        pass


def _child_setup(scratch: str, limits: SandboxConfig, iso: Isolation, readable: tuple[str, ...],
                 group: Path | None = None):
    """Runs in the forked child before exec: its cgroup, namespaces, limits, then Landlock (each step needs
    what the next one gives up)."""
    def setup() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        if iso.namespaces and not _unshare(NAMESPACES):
            raise OSError("unshare failed")
        mb = 1 << 20
        for what, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_mb * mb),
                            (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NOFILE, OPEN_FILES),
                            (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(what, (value, value))
        os.chdir(scratch)
        if iso.landlock:
            _landlock(iso.landlock, readable, [scratch])
    return setup


def run_tests(code: str, tests: str, limits: SandboxConfig = SandboxConfig()) -> float | None:
    """1.0 if `code` then `tests` run to the end in the sandbox, 0.0 if not (an assertion, any exception,
    a crash, a limit or the wall timeout), None if the sandbox could not start."""
    iso = isolation()
    scratch = tempfile.mkdtemp(prefix="alignpipe-sandbox-")
    group = _pids_cgroup(limits.processes)
    try:
        argv = [sys.executable, "-I", "-S", "-B", "-c", INIT, RUNNER] if iso.namespaces else \
            [sys.executable, "-I", "-S", "-B", "-c", RUNNER]
        nonce = secrets.token_hex(16)
        out = Path(scratch) / ".stdout"  # a file, so the file-size limit bounds what the code prints
        try:
            with open(out, "wb") as sink:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.DEVNULL,
                                        cwd=scratch, env={}, start_new_session=True,
                                        preexec_fn=_child_setup(scratch, limits, iso, _interpreter_paths(), group))
        except (OSError, subprocess.SubprocessError):
            return None
        try:
            proc.communicate(f"{code}\0{tests}\0{nonce}".encode("utf-8", "replace"), timeout=limits.wall_seconds)
        except (subprocess.TimeoutExpired, OSError):
            return 0.0
        finally:
            _kill(proc, group)
        return 1.0 if proc.returncode == 0 and _last_line(out) == nonce else 0.0
    finally:
        if group is not None:
            _remove_cgroup(group)
        shutil.rmtree(scratch, ignore_errors=True)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 128))
            return fh.read().decode("utf-8", "replace").rstrip("\n").rsplit("\n", 1)[-1]
    except OSError:
        return ""


def _kill(proc: subprocess.Popen, group: Path | None) -> None:
    """Everything the run started: its cgroup's processes, its process group, then reap."""
    if group is not None:
        _remove_cgroup(group)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def extract_code(completion: str) -> str:
    """The program in a completion: its first fenced code block (```python … ```), else the whole text."""
    start = completion.find("```")
    if start < 0:
        return completion
    body = completion[start + 3:]
    newline = body.find("\n")
    body = body[newline + 1:] if newline >= 0 and body[:newline].strip().isidentifier() else body
    end = body.find("```")
    return body if end < 0 else body[:end]


def verified_per_second(n: int = 20, limits: SandboxConfig = SandboxConfig()) -> float:
    """Throughput of run_tests on a trivial passing program (what one sandbox costs)."""
    t0 = time.perf_counter()
    for _ in range(n):
        run_tests("def f(x):\n    return x + 1\n", "assert f(1) == 2\n", limits)
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    print(json.dumps({"isolation": isolation().describe(), "verified_per_second": round(verified_per_second(), 1)}))
