"""Run untrusted code (model-written candidates, tests files from anyone) in a bubblewrap sandbox.

Generated code never runs inside studio. Every run is a fresh Python process inside `bwrap`
(bubblewrap, what Flatpak uses), with

- its own user, PID, network, IPC, UTS, mount and cgroup namespaces. The code runs as uid 1000
  inside, a non-root user on the host too: when studio runs as root (CI, containers), the
  sandbox's user namespace maps it to `nobody`, so RLIMIT_NPROC binds and no host file owned
  by root is writable or readable beyond its "other" bits;
- a filesystem of read-only binds only: the interpreter, its standard library, the site-packages
  it imports from, the system library folder of libc and the dynamic loader; plus one private
  tmpfs of `disk_mb` (the working folder, /tmp and HOME; every file written counts against it).
  No host /proc (its own, showing only its processes), home, project, /run or /tmp, hence no
  host sockets; the empty network namespace also hides abstract Unix sockets and TCP/UDP;
- a scrubbed environment (bwrap itself gets it too, so /proc/1/environ holds no secret);
- `--die-with-parent` and `--new-session`; the whole sandbox dies when its PID-namespace init
  dies, which bwrap kills when bwrap or studio (the thread that started it) dies: at the wall
  timeout, on Ctrl-C, on SIGTERM and at exit nothing is left running, daemons included;
- limits for the sandbox as a whole: processes (RLIMIT_NPROC, counted per user namespace, so
  per sandbox), memory (RLIMIT_AS per process, and the resident memory of all its processes
  summed every 20 ms by studio, which kills the sandbox over the limit), CPU time (RLIMIT_CPU
  per process, summed likewise), disk (the tmpfs size), wall time and output (studio reads at
  most `output_mb` of stdout+stderr, then kills it). With one process allowed (the default,
  threads count), the per-process limits are the totals and nothing is sampled.

Why not a cgroup: the memory and pids controllers are rarely delegated to an unprivileged
process (not on this machine: cgroup v1 holds them), and a cgroup nobody can create is no
limit; the sampled sum is what works everywhere bwrap does. What the sandbox does not do is in
the README (no seccomp filter; kernel memory such as pipe buffers or memfds is bounded only by
the per-file and open-file limits).

Where bwrap is missing or the kernel refuses the namespaces, studio refuses to run generated code
(SandboxUnavailable, naming what is missing) unless the user passes --unsafe-exec
(`Limits.unsafe_exec`): a plain child process with rlimits, a scrubbed environment and a
temporary folder, recorded as not isolated in every outcome. Never a silent weaker fallback.

The harness runs the candidate and the tests in one interpreter, as HumanEval does: a candidate
can game its own test report, not the machine.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import UsageError

SANDBOX_UID = 1000  # the candidate's uid inside the sandbox
HOST_NOBODY = 65534  # what SANDBOX_UID is on the host when studio runs as root
WORK = "/sandbox"  # the private tmpfs inside: working folder, HOME, TMPDIR (and /tmp links to it)
HARNESS_PATH = "/.studio-harness.py"
SAMPLE_S = 0.02  # how often the summed memory and CPU of a many-process sandbox are read
SAFE_ENV_KEYS = ("PATH", "LANG", "HOME", "TMPDIR", "OMP/OPENBLAS/MKL_NUM_THREADS=1")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
                "or `make install`), or pass --unsafe-exec to run the code without isolation (recorded in the output)")
NAMESPACES_HINT = ("allow user namespaces (sysctl user.max_user_namespaces=15000, kernel.unprivileged_userns_clone=1 "
                   "where it exists; in a container, a seccomp/AppArmor profile that permits them), "
                   "or pass --unsafe-exec to run the code without isolation (recorded in the output)")


class SandboxUnavailable(UsageError):
    """Generated code cannot be isolated here and --unsafe-exec was not passed. Exits 2."""


@dataclass(frozen=True)
class Limits:
    """What a sandboxed run may use, all of its processes together."""

    timeout_s: float = 10.0  # wall clock; then every process of the sandbox is killed
    memory_mb: int = 512  # resident memory of all its processes together (and RLIMIT_AS of each)
    cpu_s: int | None = None  # CPU seconds of all its processes; None: the wall timeout rounded up, plus one
    processes: int = 1  # processes and threads it may have at once; 1 means no fork and no threads
    disk_mb: int = 64  # bytes it may write, all files together (the tmpfs size)
    output_mb: int = 16  # stdout + stderr studio reads; more kills the run (status "output")
    output_chars: int = 4000  # how much of its stdout/stderr an outcome keeps
    unsafe_exec: bool = False  # run without isolation where bwrap cannot (the user asked, --unsafe-exec)

    def cpu_seconds(self) -> int:
        return int(self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1)


@dataclass
class Outcome:
    """What happened to one sandboxed run."""

    status: str  # passed | failed | syntax | timeout | cpu | memory | output | killed | error
    passed: int = 0  # tests that passed
    total: int = 0  # tests found (test_* functions, plus 1 for top-level statements)
    tests: list[dict[str, Any]] = field(default_factory=list)  # [{name, passed, error}] per test
    error: str | None = None  # one line: the first thing that went wrong
    returncode: int | None = None  # the program's exit status (negative: killed by that signal)
    seconds: float = 0.0  # wall time of the run
    stdout: str = ""  # the tail of what it printed
    stderr: str = ""  # the tail of its stderr
    isolation: dict[str, Any] = field(default_factory=dict)  # what applied (see isolation_report)

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def summary(self) -> str:
        """One line for a report: `passed 3/3`, `timeout (killed after 2 s wall)`, ..."""
        if self.status in ("passed", "failed"):
            line = f"{self.status} {self.passed}/{self.total}"
            return line + (f": {self.error}" if self.error and self.status == "failed" else "")
        return f"{self.status}" + (f" ({self.error})" if self.error else "")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("isolation")
        return out


# ---------------------------------------------------------------------------- the child side
# The bootstrap runs first in the child (`python -I -S -c BOOTSTRAP CONFIG`), as root of the
# sandbox's user namespace when studio is root: it hands the work folder to the sandbox user,
# drops to that user (no capabilities left), sets the rlimits and only then runs the harness.
# No untrusted line runs before it finishes.
BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
sys.path.extend(cfg["site"])  # site-packages without running its .pth hooks (-S): faster start
with open(cfg["script"], encoding="utf-8") as f:  # read while still allowed to
    script = compile(f.read(), cfg["script"], "exec")
if cfg.get("drop_to") is not None:
    uid = cfg["drop_to"]
    for base, dirs, files in os.walk(cfg["work"]):
        for name in [base, *(os.path.join(base, n) for n in dirs + files)]:
            os.lchown(name, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        os._exit(96)
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
sys.argv = [cfg["script"]] + cfg["args"]
exec(script, {"__name__": "__main__", "__file__": cfg["script"], "__builtins__": __builtins__})
"""

# The harness runs the candidate and the tests in one namespace (as HumanEval's check program
# does: the tests see the candidate's names), each `test_*` function counted on its own, and
# writes one JSON line per event to the report pipe, so a timeout still leaves partial counts.
HARNESS = r"""
import ast, gc, json, os, sys, traceback
report = int(sys.argv[1])
def emit(**row):
    os.write(report, (json.dumps(row) + "\n").encode())
def describe(exc):
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in ("solution.py", "tests.py")]
    at = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}{at}"
sys.path.insert(0, os.getcwd())  # tests may also `from solution import f`
solution = open("solution.py", encoding="utf-8").read()
tests = open("tests.py", encoding="utf-8").read() if os.path.exists("tests.py") else ""
tree = ast.parse(tests, "tests.py")
test_names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")]
has_top = any(not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom))
              and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in tree.body)
load_counts = has_top or not test_names  # the load step is a test only when it holds one
names = ([("<tests.py>" if tests else "<solution.py>")] if load_counts else []) + test_names
emit(event="start", tests=names)
try:
    code = compile(solution, "solution.py", "exec")
except (SyntaxError, ValueError) as exc:
    emit(event="syntax", error=f"{type(exc).__name__}: {getattr(exc, 'msg', exc)} (solution.py:{getattr(exc, 'lineno', '?')})")
    os._exit(0)
ns = {"__name__": "solution", "__builtins__": __builtins__}
def run(fn):
    try:
        fn()
        return None
    except MemoryError:
        ns.clear(); gc.collect()
        emit(event="memory")
        os._exit(3)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: the candidate failed this test
        return describe(exc)
def load():
    exec(code, ns)
    if tests:
        exec(compile(tests, "tests.py", "exec"), ns)
error = run(load)
if load_counts:
    emit(event="test", name=names[0], passed=error is None, error=error)
for name in test_names:
    if error is not None:
        emit(event="test", name=name, passed=False, error=f"not run: the module failed to load: {error}")
    else:
        failure = run(ns[name]) if callable(ns.get(name)) else f"{name} was removed by the candidate"
        emit(event="test", name=name, passed=failure is None, error=failure)
emit(event="done")
"""

PROBE = "import os\nprint('probe-ok', os.getuid())\n"


# ---------------------------------------------------------------------------- what bwrap sees
def _site_paths() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(dict.fromkeys(os.path.realpath(p) for p in (paths["purelib"], paths["platlib"]) if p and os.path.isdir(p)))


@functools.lru_cache(maxsize=None)
def _binds() -> tuple[str, ...]:
    """Host paths the sandbox sees read-only, at the same place: the interpreter binary, its
    standard library and extension modules, libpython, the site-packages, and the folders of
    libc and the dynamic loader (where the system libraries that extensions link live)."""
    executable = os.path.realpath(sys.executable)
    paths = {executable, os.path.dirname(os.path.realpath(os.__file__))}  # (platstdlib is the venv's, empty)
    paths |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)
              and os.path.realpath(p).startswith(os.path.realpath(sys.base_prefix))}  # lib-dynload
    paths |= set(_site_paths())
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and library and os.path.exists(os.path.join(libdir, library)):
        paths.add(os.path.realpath(os.path.join(libdir, library)))
    with open("/proc/self/maps") as maps:  # where libc and ld.so really are (multiarch, lib64, musl)
        for line in maps:
            name = line.split(maxsplit=5)[-1].strip()
            base = os.path.basename(name)
            if name.startswith("/") and (base.startswith(("libc.so", "libc-", "ld-linux", "ld-musl", "libm.so"))):
                paths.add(os.path.dirname(os.path.realpath(name)))
    if os.path.exists("/etc/ld.so.cache"):
        paths.add("/etc/ld.so.cache")
    interpreter = _elf_interpreter(executable)
    if interpreter:
        paths.add(os.path.realpath(interpreter))
    ordered = sorted(p for p in paths if os.path.exists(p))
    # a path inside another bound path is already there
    return tuple(p for p in ordered if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ordered))


def _elf_interpreter(path: str) -> str | None:
    """The dynamic loader an ELF executable names (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only; others run without the link
                return None
            end = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack(end + "Q", head[32:40])
            phentsize, phnum = struct.unpack(end + "HH", head[54:58])
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                kind, _, offset, _, _, size = struct.unpack(end + "IIQQQQ", f.read(40))
                if kind == 3:  # PT_INTERP
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def _loader_binds() -> list[str]:
    """Bind the loader at the path the executable names, its folders' links resolved:
    /lib64/ld-linux-x86-64.so.2 -> /usr/lib64/ld-linux-x86-64.so.2 under merged /usr (where
    that is itself a link into the multiarch folder, which the sandbox has)."""
    interpreter = _elf_interpreter(os.path.realpath(sys.executable))
    if not interpreter:
        return []
    named = os.path.join(os.path.realpath(os.path.dirname(interpreter)), os.path.basename(interpreter))
    real = os.path.realpath(interpreter)
    return ["--ro-bind", real, named] if named != real else []


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def _usr_merge_links() -> list[str]:
    """Debian/Fedora merged /usr: /lib, /lib64, /bin are links into /usr. ELF interpreters and
    RPATHs name /lib64/ld-linux..., so the same links exist inside."""
    args: list[str] = []
    for link in ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
    return args


class _UserNamespace:
    """A user namespace in which uid/gid 0 are the host's root (so bwrap, running as root, can
    still reach an interpreter under a 0700 /root) and SANDBOX_UID is the host's nobody.
    bwrap only writes one mapping itself (the caller's uid), which as root is uid 0 itself:
    RLIMIT_NPROC never binds uid 0, so the second mapping has to come from here."""

    def __init__(self) -> None:
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        self.helper = subprocess.Popen([unshare, "--user", "--", "cat"], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
        self.fd: int | None = None
        try:
            mine = os.readlink("/proc/self/ns/user")
            deadline = time.monotonic() + 5
            while True:  # unshare(1) enters the namespace, then execs cat
                if self.helper.poll() is not None:
                    err = self.helper.stderr.read().decode(errors="replace").strip().splitlines()
                    raise OSError(err[-1] if err else f"unshare --user exited with {self.helper.returncode}")
                try:
                    if os.readlink(f"/proc/{self.helper.pid}/ns/user") != mine:
                        break
                except FileNotFoundError:
                    pass
                if time.monotonic() > deadline:
                    raise OSError("unshare --user did not start")
                time.sleep(0.0005)
            for kind in ("uid", "gid"):
                with open(f"/proc/{self.helper.pid}/{kind}_map", "w") as f:
                    f.write(f"0 0 1\n{SANDBOX_UID} {HOST_NOBODY} 1\n")
            self.fd = os.open(f"/proc/{self.helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            self.helper.stdin.close()
            self.helper.wait()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _bwrap_command(bwrap: str, limits: Limits, userns_fd: int | None, info_fd: int,
                   files: dict[str, int], harness_fd: int) -> list[str]:
    cmd = [bwrap]
    if userns_fd is not None:  # root: our own user namespace; bwrap sets up as its root, the bootstrap drops
        cmd += ["--userns", str(userns_fd), "--uid", "0", "--gid", "0"]
    else:
        cmd += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd),
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", WORK]
    cmd += _usr_merge_links()
    loader = _loader_binds()
    # bwrap makes missing parents 0700 (as root of the namespace): the sandbox user could not
    # walk to its own interpreter after the drop
    parents = sorted({str(parent) for dest in [*_binds(), *loader[2::3]] for parent in Path(dest).parents} - {"/"})
    for parent in parents:
        if not os.path.islink(parent):
            cmd += ["--perms", "0755", "--dir", parent]
    for path in _binds():
        cmd += ["--ro-bind", path, path]
    cmd += loader
    if not any(p == "/tmp" or p.startswith("/tmp/") for p in _binds()):
        cmd += ["--symlink", WORK, "/tmp"]  # /tmp writes count against the same disk limit
    for name, fd in files.items():
        cmd += ["--file", str(fd), f"{WORK}/{name}"]
    cmd += ["--ro-bind-data", str(harness_fd), HARNESS_PATH,
            # the root tmpfs and /dev would otherwise be writable (uncapped) where bwrap runs unprivileged
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORK]
    return cmd


def _scrubbed_env(home: str) -> dict[str, str]:
    # one BLAS/OpenMP thread: under RLIMIT_NPROC a thread pool would fail to start (and the
    # sandbox should not fan out over the machine anyway)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _rlimits(limits: Limits, extra_tasks: int) -> dict[str, tuple[int, int]]:
    import resource

    mem = limits.memory_mb * 1024 * 1024
    cpu = limits.cpu_seconds()
    disk = limits.disk_mb * 1024 * 1024
    wanted = {
        "RLIMIT_AS": (mem, mem),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        "RLIMIT_NPROC": (limits.processes + extra_tasks,) * 2,
        "RLIMIT_FSIZE": (disk, disk),  # also bounds each memfd (not on the tmpfs)
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }
    out = {}
    for name, (soft, hard) in wanted.items():  # never ask above the current hard limit
        current = resource.getrlimit(getattr(resource, name))[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        out[name] = (soft, hard)
    return out


# ---------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _availability() -> tuple[str | None, str]:
    """(None, bwrap version) when a probe ran isolated here, else (what is missing, "")."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces (bubblewrap); this is {sys.platform}", ""
    bwrap = _bwrap()
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed", ""
    if os.geteuid() == 0 and not (shutil.which("unshare") or os.path.exists("/usr/bin/unshare")):
        return "unshare (util-linux) is not installed; studio, as root, needs it to map the sandbox user", ""
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip() or "bwrap"
    try:
        outcome = _run_isolated(bwrap, PROBE, "", Limits(timeout_s=20, processes=1), harness=False)
    except OSError as exc:
        return f"this machine refuses the sandbox's user namespace ({exc})", ""
    if outcome.returncode != 0 or "probe-ok" not in outcome.stdout:
        last = next((line for line in reversed(outcome.stderr.strip().splitlines()) if line.strip()), "no message")
        return f"bwrap cannot create the sandbox here ({last[:160]})", ""
    uid = outcome.stdout.split()[1] if len(outcome.stdout.split()) > 1 else "?"
    if uid == "0":
        return "bwrap ran the probe as root", ""
    return None, version


def require(limits: Limits | None = None) -> None:
    """Raise SandboxUnavailable (one line: what is missing, how to get it) unless generated code
    can run isolated here, or the user passed --unsafe-exec. Call before anything slow."""
    limits = limits or Limits()
    if limits.unsafe_exec:
        return
    missing, _ = _availability()
    if missing:
        hint = NAMESPACES_HINT if _bwrap() and sys.platform.startswith("linux") else INSTALL_HINT
        raise SandboxUnavailable(f"refusing to run generated code: {missing}", hint)


def isolation_report(limits: Limits | None = None) -> dict[str, Any]:
    """What a sandboxed run gets on this machine, in words (probed, not assumed)."""
    limits = limits or Limits()
    missing, version = _availability()
    common = {
        "environment": f"scrubbed: only {', '.join(SAFE_ENV_KEYS)}",
        "timeout_s": limits.timeout_s,
        "cpu": f"{limits.cpu_seconds()} s CPU for all its processes",
        "processes": f"at most {limits.processes} (RLIMIT_NPROC, threads included)",
        "output": f"studio reads at most {limits.output_mb} MiB of stdout+stderr, then kills it",
    }
    if missing is None:  # isolation is used wherever it works, --unsafe-exec or not
        root = os.geteuid() == 0
        return {
            "isolated": True,
            "tool": version,
            "user": f"uid {SANDBOX_UID} in its own user namespace" + (f" (uid {HOST_NOBODY}, nobody, on the host)" if root else ""),
            "namespaces": "user, pid, network, ipc, uts, mount, cgroup",
            "filesystem": ("read-only binds of the interpreter, its libraries and site-packages; "
                           f"a private {limits.disk_mb} MiB tmpfs at {WORK} (also /tmp); no host /proc, home, project or sockets"),
            "network": "none: empty network namespace (no TCP/UDP, no abstract Unix sockets)",
            "memory": (f"{limits.memory_mb} MiB for all its processes (RLIMIT_AS each; their resident memory summed "
                       f"every {SAMPLE_S * 1000:.0f} ms)" if limits.processes > 1 else f"{limits.memory_mb} MiB (RLIMIT_AS, one process)"),
            "disk": f"{limits.disk_mb} MiB in all (tmpfs size)",
            **common,
        }
    return {
        "isolated": False,
        "unsafe_exec": True,
        "why": missing,
        "user": "studio's own user (--unsafe-exec)",
        "filesystem": "NOT isolated: the code can read and write whatever studio's user can",
        "network": "NOT isolated (--unsafe-exec)",
        "memory": f"RLIMIT_AS {limits.memory_mb} MiB per process",
        "disk": f"RLIMIT_FSIZE {limits.disk_mb} MiB per file",
        **common,
    }


# ---------------------------------------------------------------------------- running
def parses(code: str) -> str | None:
    """None when `code` is valid Python, else one line saying where it is not."""
    try:
        ast.parse(code)
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except ValueError as exc:  # null bytes
        return f"ValueError: {exc}"
    return None


def run_tests(code: str, tests: str = "", limits: Limits | None = None) -> Outcome:
    """Run `code` then `tests` (in the code's namespace) in the sandbox; count passing tests.

    Tests are the `test_*` functions of `tests`, each counted, plus its top-level statements
    (asserts, a HumanEval `check(fn)` call) counted as one. With no tests, the one test is that
    `code` runs without an error. Raises SandboxUnavailable where the code cannot be isolated
    and `limits.unsafe_exec` is off."""
    limits = limits or Limits()
    require(limits)
    missing, _ = _availability()
    if missing is None:
        outcome = _run_isolated(_bwrap(), code, tests, limits)
    else:
        outcome = _run_unsafe(code, tests, limits)
    outcome.isolation = isolation_report(limits)
    return outcome


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def kill_all() -> None:
    """Kill every sandbox this process is running (Ctrl-C in a pool of workers)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    # bwrap leads its own process group; its PID-namespace init dies with it (--die-with-parent),
    # and the kernel kills every process left in a namespace whose init is gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_isolated(bwrap: str, code: str, tests: str, limits: Limits, harness: bool = True) -> Outcome:
    root = os.geteuid() == 0
    userns = _UserNamespace() if root else None
    fds: list[int] = []
    try:
        files = {"solution.py": _memfd("solution", code.encode())}
        if tests:
            files["tests.py"] = _memfd("tests", tests.encode())
        harness_fd = _memfd("harness", (HARNESS if harness else "import runpy; runpy.run_path('solution.py')\n").encode())
        report_r, report_w = os.pipe()
        info_r, info_w = os.pipe()
        fds += [*files.values(), harness_fd, report_r, report_w, info_r, info_w]
        # root: bwrap's init stays uid 0 of the namespace, outside RLIMIT_NPROC's count of the
        # sandbox user; unprivileged it runs as that user, one more task
        rlimits = _rlimits(limits, 0 if root else 1)
        cfg = {"site": list(_site_paths()), "drop_to": SANDBOX_UID if root else None, "work": WORK,
               "rlimits": rlimits, "script": HARNESS_PATH, "args": [str(report_w)]}
        command = _bwrap_command(bwrap, limits, userns.fd if userns else None, info_w, files, harness_fd)
        command += ["--", os.path.realpath(sys.executable), "-I", "-S", "-c", BOOTSTRAP, json.dumps(cfg)]
        pass_fds = [*files.values(), harness_fd, report_w, info_w] + ([userns.fd] if userns else [])
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=_scrubbed_env(WORK), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True)
        if userns:
            userns.close()
        for fd in (report_w, info_w, *files.values(), harness_fd):
            os.close(fd)
            fds.remove(fd)
        return _supervise(proc, limits, started, report_r, info_r)
    finally:
        if userns:
            userns.close()
        for fd in fds:
            os.close(fd)


def _run_unsafe(code: str, tests: str, limits: Limits) -> Outcome:
    """--unsafe-exec: a plain child in its own session, rlimits, scrubbed env, temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="studio-unsafe-exec-"))
    report_r, report_w = os.pipe()
    fds = [report_r, report_w]
    try:
        (tmp / "solution.py").write_text(code, encoding="utf-8")
        if tests:
            (tmp / "tests.py").write_text(tests, encoding="utf-8")
        (tmp / "harness.py").write_text(HARNESS)
        cfg = {"site": list(_site_paths()), "drop_to": None, "work": str(tmp), "rlimits": _rlimits(limits, _own_tasks()),
               "script": str(tmp / "harness.py"), "args": [str(report_w)]}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", BOOTSTRAP, json.dumps(cfg)], cwd=tmp,
                                env=_scrubbed_env(str(tmp)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=[report_w], start_new_session=True)
        os.close(report_w)
        fds.remove(report_w)
        return _supervise(proc, limits, started, report_r, None)
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _own_tasks() -> int:
    # outside a user namespace RLIMIT_NPROC counts every task of the uid, so add those
    uid = os.getuid()
    count = 0
    for status in Path("/proc").glob("[0-9]*/status") if os.path.isdir("/proc") else []:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _supervise(proc: subprocess.Popen, limits: Limits, started: float, report_r: int, info_r: int | None) -> Outcome:
    """Read its output (at most output_mb), its report and bwrap's info; watch wall time and,
    for a sandbox of several processes, their summed memory and CPU; kill it over any limit."""
    with _LIVE_LOCK:
        _LIVE.add(proc)
    sel = selectors.DefaultSelector()
    tails = {"stdout": bytearray(), "stderr": bytearray()}
    report, info = bytearray(), bytearray()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(report_r, selectors.EVENT_READ, "report")
    if info_r is not None:
        sel.register(info_r, selectors.EVENT_READ, "info")
    cap = limits.output_mb * 1024 * 1024
    keep = limits.output_chars
    read_out = 0
    reason: str | None = None  # why studio killed it
    init_pid: int | None = None if info_r is not None else proc.pid
    watch = limits.processes > 1
    next_sample = 0.0
    deadline = started + limits.timeout_s
    exited = False
    try:
        while sel.get_map():
            now = time.perf_counter()
            if not exited and proc.poll() is not None:
                # isolated, every pipe closes as the namespace goes; --unsafe-exec, a daemon may
                # hold them open: read what is left for a moment, not until the deadline
                exited = True
                deadline = min(deadline, now + 0.5)
            if now >= deadline:
                reason = None if exited else "timeout"
                break
            wait = min(deadline - now, 0.1)
            if watch and init_pid is not None:
                wait = min(wait, max(0.0, next_sample - now))
            for key, _ in sel.select(timeout=wait):
                fd = key.fd
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                if key.data in tails:
                    read_out += len(chunk)
                    tail = tails[key.data]
                    tail += chunk
                    del tail[:-keep]
                elif key.data == "report":
                    report += chunk
                    if len(report) > cap:  # a candidate flooding the report pipe
                        reason = "output"
                else:
                    info += chunk
                    if init_pid is None:
                        try:
                            init_pid = int(json.loads(info.decode())["child-pid"])
                        except (ValueError, KeyError):
                            pass
            if read_out > cap:
                reason = "output"
            if reason:
                break
            if watch and init_pid is not None and time.perf_counter() >= next_sample:
                rss, cpu = _tree_usage(init_pid)
                next_sample = time.perf_counter() + SAMPLE_S
                if rss > limits.memory_mb * 1024 * 1024:
                    reason = "memory"
                    break
                if cpu > limits.cpu_seconds():
                    reason = "cpu"
                    break
        if reason:
            _kill(proc)
        try:
            proc.wait(timeout=max(0.5, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            reason = reason or "timeout"
            _kill(proc)
            proc.wait()
    finally:
        if proc.poll() is None:  # KeyboardInterrupt, or anything else unexpected: nothing stays behind
            _kill(proc)
            proc.wait()
        if info_r is None:  # --unsafe-exec: its session may hold a daemon
            _kill(proc)
        with _LIVE_LOCK:
            _LIVE.discard(proc)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    seconds = time.perf_counter() - started
    rc = proc.returncode
    if info_r is not None and rc is not None and rc > 128:  # bwrap exits 128+N when its command died of signal N
        rc = -(rc - 128)
    events = _parse_report(bytes(report))
    stderr = tails["stderr"].decode("utf-8", "replace")
    outcome = _outcome(events, rc, reason, limits, stderr)
    outcome.seconds = round(seconds, 3)
    outcome.stdout = tails["stdout"].decode("utf-8", "replace")
    outcome.stderr = stderr
    return outcome


def _tree_usage(root: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of `root` and every descendant: every process of the
    sandbox, since its PID-namespace init adopts orphans. CPU includes reaped children."""
    page = os.sysconf("SC_PAGE_SIZE")
    tick = os.sysconf("SC_CLK_TCK")
    rss, ticks = 0, 0
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            tids = os.listdir(f"/proc/{pid}/task")
        except (OSError, IndexError):
            continue
        # after the comm: state(0) ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
        ticks += sum(int(x) for x in fields[11:15])
        rss += int(fields[21]) * page
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    stack.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return rss, ticks / tick


def _parse_report(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            events.append(row)
    return events


def _outcome(events: list[dict[str, Any]], rc: int | None, reason: str | None, limits: Limits, stderr: str) -> Outcome:
    start = next((e for e in events if e.get("event") == "start"), {})
    names = list(start.get("tests") or [])
    tests = [{"name": e.get("name"), "passed": bool(e.get("passed")), "error": e.get("error")}
             for e in events if e.get("event") == "test"]
    passed = sum(t["passed"] for t in tests)
    first_error = next((f"{t['name']}: {t['error']}" for t in tests if not t["passed"]), None)
    base = dict(passed=passed, total=len(names), tests=tests, returncode=rc)
    kinds = {e.get("event") for e in events}
    if "syntax" in kinds:
        return Outcome("syntax", error=next(e["error"] for e in events if e.get("event") == "syntax"), **base)
    if reason == "timeout":
        return Outcome("timeout", error=f"killed after {limits.timeout_s:g} s wall time", **base)
    if reason == "output":
        return Outcome("output", error=f"printed more than {limits.output_mb} MiB; killed", **base)
    if reason == "memory" or "memory" in kinds or (rc and rc > 0 and "MemoryError" in stderr):
        return Outcome("memory", error=f"hit the {limits.memory_mb} MiB memory limit", **base)
    if reason == "cpu" or rc == -signal.SIGXCPU:
        return Outcome("cpu", error=f"killed at the {limits.cpu_seconds()} s CPU limit", **base)
    if "done" in kinds and rc == 0:
        status = "passed" if names and passed == len(names) else "failed"
        return Outcome(status, error=first_error, **base)
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return Outcome("killed", error=f"killed by signal {name}", **base)
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    return Outcome("error", error=f"exited with status {rc} before the tests finished" + (f": {last[:200]}" if last else ""),
                   **base)
