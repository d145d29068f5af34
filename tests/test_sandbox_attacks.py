"""Attacks on the code sandbox, as a hostile candidate (or tests file) would try them on a machine
where studio runs as root, as CI does. Each asserts two things: the attack was contained (checked
on the host: files, sockets, processes by PID), and studio itself carried on and reported the
candidate as failed. The candidates run through select_candidate, the path `studio code --samples
K --tests FILE` takes, or run_sandboxed, the path of `studio eval code`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from studio.pipelines import sandbox
from studio.pipelines.code import select_candidate

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: `make install` (or apt-get install bubblewrap) installs it; "
           "without it studio refuses to run generated code, which test_code_sandbox.py checks")

PROJECT_FILE = Path(__file__).resolve()  # a file of the project the candidate must not see
LIMITS = sandbox.Limits(timeout_s=20, memory_mb=512)


def attack(code: str, tests: str, limits: sandbox.Limits = LIMITS) -> dict:
    """Run one candidate the way `studio code --tests` does; studio must come back with it failed."""
    selection = select_candidate([code], tests, limits)
    row = selection.outcomes[0]
    assert not selection.passed and row["status"] != "passed", row
    assert selection.isolation["isolated"] is True
    return row


class Watcher:
    """Host PIDs of processes named `comm` (prctl PR_SET_NAME), seen while the attack runs."""

    def __init__(self, comm: str):
        self.comm, self.pids, self._stop = comm, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pids |= set(alive_named(self.comm))
            time.sleep(0.01)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def alive_named(comm: str, pids=None) -> list[int]:
    found = []
    for entry in (pids if pids is not None else [p for p in os.listdir("/proc") if p.isdigit()]):
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() == comm and Path(f"/proc/{entry}/stat").read_text().split(") ")[1][0] != "Z":
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def name_self(comm: str) -> str:
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n"


# ----------------------------------------------------------------------------- files
def test_reading_etc_shadow_the_project_or_host_tmp_fails(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    code = ("def steal():\n    out = []\n"
            f"    for path in ('/etc/shadow', {str(PROJECT_FILE)!r}, {str(secret)!r}, '/root/.bash_history', '/proc/1/root/etc/shadow'):\n"
            "        try:\n            out.append(open(path).read())\n        except OSError:\n            pass\n"
            "    return out\n")
    row = attack(code, "def test_steal():\n    stolen = steal()\n    print(stolen)\n    assert stolen\n")
    assert "AssertionError" in row["error"]


def test_writing_outside_the_work_dir_fails(tmp_path):
    targets = [tmp_path / "pwned", PROJECT_FILE.parent / f"pwned-{uuid.uuid4().hex[:6]}", Path("/pwned-by-candidate")]
    code = ("def vandalise():\n    done = []\n"
            f"    for path in {[str(t) for t in targets]!r}:\n"
            "        try:\n            open(path, 'w').write('x')\n            done.append(path)\n        except OSError:\n            pass\n"
            "    return done\n")
    row = attack(code, "def test_vandalise():\n    assert vandalise()\n")
    assert row["status"] == "failed"
    assert not any(t.exists() for t in targets)


def test_filling_the_disk_stops_at_the_total_limit_not_per_file():
    # the old sandbox capped each file: ten files of 15 MB got 150 MB onto the disk
    code = ("def fill():\n    chunk = b'x' * (15 << 20)\n    written = 0\n"
            "    try:\n        for i in range(10):\n            with open(f'f{i}', 'wb') as f:\n"
            "                f.write(chunk)\n            written += len(chunk)\n"
            "    finally:\n        print('WROTE', written)\n")
    limits = sandbox.Limits(timeout_s=20, disk_mb=32)
    row = attack(code, "def test_fill():\n    fill()\n", limits)
    assert "No space left on device" in row["error"] or "File too large" in row["error"], row
    outcome = sandbox.run_tests(code, "fill()\n", limits)
    written = int(outcome.stdout.split("WROTE")[-1].split()[0])
    assert written <= 32 << 20


def test_studios_environment_is_out_of_reach(monkeypatch):
    monkeypatch.setenv("STUDIO_TEST_SECRET", "hunter2-env")
    code = ("import os\ndef leak():\n    found = [repr(dict(os.environ))]\n"
            f"    pids = [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid()), '{os.getpid()}']\n"
            "    for pid in pids:\n        try:\n            found.append(open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1'))\n"
            "        except OSError:\n            pass\n    return ' '.join(found)\n")
    row = attack(code, "def test_leak():\n    text = leak()\n    print(text)\n    assert 'hunter2-env' in text\n")
    assert row["status"] == "failed" and "hunter2" not in str(row)


def test_killing_its_parent_leaves_studio_running():
    code = ("import os, time\ndef kill_parent():\n    parent = os.getppid()\n"
            "    try:\n        os.kill(parent, 9)\n    except OSError:\n        pass\n    time.sleep(0.2)\n"
            "    try:\n        os.kill(parent, 0)\n    except ProcessLookupError:\n        return True\n"
            "    except PermissionError:\n        pass\n    return False\n")
    row = attack(code, "def test_kill():\n    assert kill_parent()\n")
    assert row["status"] == "failed" and row["total"] == 1  # the harness lived to report it


# ----------------------------------------------------------------------------- processes
def test_a_double_forked_daemon_dies_with_the_run():
    comm = f"dmn{uuid.uuid4().hex[:8]}"
    code = ("import ctypes, os, time\ndef spawn():\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
            f"            ctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n"
            "            time.sleep(60)\n        os._exit(0)\n    time.sleep(1.0)\n")
    tests = "def test_daemon():\n    spawn()\n    assert False, 'the daemon is only harmful if it outlives the run'\n"
    with Watcher(comm) as seen:
        attack(code, tests, sandbox.Limits(timeout_s=20, processes=4))
    assert seen.pids, "the daemon never started: the attack was not tried"
    assert not alive_named(comm, seen.pids), f"daemon {seen.pids} outlived the run"


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_stopping_studio_mid_test_leaves_no_process(how, tmp_path):
    """Ctrl-C, SIGTERM or a hard kill of studio while `studio eval code` runs two sandboxes at
    once (workers in threads), each with a daemon: nothing may stay behind."""
    comm = f"ctl{uuid.uuid4().hex[:8]}"
    code = ("import os, time\n" + name_self(comm)
            + "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\nwhile True:\n    time.sleep(0.1)\n")
    script = tmp_path / "studio_like.py"
    script.write_text(
        "import sys\nfrom studio.pipelines import code_eval, sandbox\n"
        f"jobs = [({code!r}, '')] * 2\n"
        "code_eval.run_sandboxed(jobs, sandbox.Limits(timeout_s=60, processes=4), workers=2)\n")
    # a background job (`make test &`, nohup) starts with SIGINT ignored and its children inherit that;
    # Ctrl-C at a terminal is not ignored
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with Watcher(comm) as seen:
        deadline = time.time() + 30
        while len(alive_named(comm)) < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # two candidates and their two daemons
        assert len(seen.pids | set(alive_named(comm))) >= 4, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "not started"
        started = time.time()
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=20)
    assert time.time() - started < 10  # not at the 60 s timeout
    time.sleep(0.2)  # the kernel tears the namespaces down as their init goes
    assert not alive_named(comm, seen.pids), f"{how}: {alive_named(comm, seen.pids)} outlived studio"


def test_a_fork_bomb_is_bounded():
    code = ("import os, time\ndef bomb():\n    children = 0\n    try:\n        for _ in range(200):\n"
            "            if os.fork() == 0:\n                time.sleep(30)\n                os._exit(0)\n            children += 1\n"
            "    finally:\n        print('FORKED', children)\n")
    limits = sandbox.Limits(timeout_s=20, processes=8)
    row = attack(code, "def test_bomb():\n    bomb()\n", limits)
    assert "BlockingIOError" in row["error"] or "Resource temporarily unavailable" in row["error"], row
    outcome = sandbox.run_tests(code, "bomb()\n", limits)
    assert int(outcome.stdout.split("FORKED")[-1].split()[0]) < 8  # the candidate is one of the 8


def test_memory_is_limited_for_all_processes_together():
    # four children of 300 MB each: every one is under the 512 MB limit, together they are not
    code = ("import os, time\ndef hoard():\n    r, w = os.pipe()\n    for _ in range(4):\n        if os.fork() == 0:\n"
            "            block = bytearray(300 << 20)\n            os.write(w, b'1')\n            time.sleep(30)\n            os._exit(0)\n"
            "    held = 0\n    while held < 4:\n        held += len(os.read(r, 4))\n    print('ALL FOUR HOLD 1200 MB')\n")
    row = attack(code, "def test_hoard():\n    hoard()\n", sandbox.Limits(timeout_s=20, memory_mb=512, processes=8))
    assert row["status"] == "memory" and "512 MiB" in row["error"], row
    assert row["seconds"] < 10


# ----------------------------------------------------------------------------- network
def test_no_unix_socket_of_the_host_is_reachable(tmp_path):
    path = tmp_path / "studio-test.sock"
    servers = []
    for address in (str(path), f"\0studio-test-{uuid.uuid4().hex}"):  # a file socket and an abstract one
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen(1)
        server.settimeout(0.3)
        servers.append((server, address))
    code = ("import socket\ndef phone_home():\n    reached = []\n"
            f"    for address in {[a for _, a in servers]!r}:\n"
            "        s = socket.socket(socket.AF_UNIX)\n        try:\n            s.connect(address)\n            s.sendall(b'stolen')\n"
            "            reached.append(address)\n        except OSError:\n            pass\n    return reached\n")
    row = attack(code, "def test_unix():\n    assert phone_home()\n")
    assert row["status"] == "failed"
    for server, _ in servers:
        with pytest.raises(socket.timeout):  # a connection that got through would wait in the backlog
            server.accept()
        server.close()


def test_no_tcp_port_of_the_host_is_reachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = ("import socket\ndef phone_home():\n"
            f"    with socket.create_connection(('127.0.0.1', {port}), timeout=2) as s:\n        s.sendall(b'stolen')\n")
    row = attack(code, "def test_tcp():\n    phone_home()\n")
    assert row["error"].startswith("test_tcp: ConnectionRefusedError") or "unreachable" in row["error"], row
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


# ----------------------------------------------------------------------------- output and time
def test_200_mb_of_stdout_is_cut_off_and_studio_reads_at_most_the_limit():
    code = "import sys\ndef flood():\n    chunk = 'x' * (1 << 20)\n    for _ in range(200):\n        sys.stdout.write(chunk)\n"
    row = attack(code, "def test_flood():\n    flood()\n", sandbox.Limits(timeout_s=20, output_mb=4))
    assert row["status"] == "output" and row["seconds"] < 10, row
    outcome = sandbox.run_tests(code, "flood()\n", sandbox.Limits(timeout_s=20, output_mb=4))
    assert len(outcome.stdout) <= 4000  # the kept tail, not the flood


def test_an_infinite_loop_is_killed_at_the_wall_timeout():
    row = attack("def spin():\n    while True:\n        pass\n", "def test_spin():\n    spin()\n",
                 sandbox.Limits(timeout_s=1.5))
    assert row["status"] == "timeout" and row["seconds"] < 1.5 + 2.0, row
