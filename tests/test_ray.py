"""`studio run FILE --ray`: batch files and pipelines on a real Ray cluster (studio/batch/ray.py).

The cluster is what a user starts by hand: `ray start --head` and a second node joining it with
`ray start --address`, one CPU each, with token authentication, both on this machine and reached
at 127.0.0.1 (Ray's CLI records a node by the machine's own address; nothing leaves the machine). The driver is the real
`studio run` entry point in a subprocess; the jobs run the tiny Stable Diffusion model and the
toy pipelines of tests/test_batch.py. Every output is checked against the same file run without
Ray: same pixels for the same seeds, the manifest holding each job exactly once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from studio.outputs import read_manifest, sha256_file
from tests.test_batch import EXTRA_TASKS, done_records, outputs_of, toys, write  # noqa: F401 (toys: a fixture)

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"

pytestmark = pytest.mark.usefixtures("one_thread")  # the local reference runs as Ray's one-CPU workers do


# --------------------------------------------------------------------------- the cluster
class Cluster:
    """A head node and one more node, each a `ray start --block` process (ended with SIGTERM,
    which stops every Ray process it started)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        # short: Ray's socket paths below it must fit in 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        # token authentication, as Ray sets up a new cluster: the nodes are told to ask for it; the
        # driver (studio run) only has the token, and presents it as `ray start` would
        token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": token}  # PYTHONPATH: workers import tests/' toys
        self.env.pop("RAY_AUTH_MODE", None)
        self.node_env = {**self.env, "RAY_AUTH_MODE": "token"}
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, *args: str) -> Path:
        log = self.temp / f"node{len(self.nodes)}.log"
        cmd = [str(RAY), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
               f"--temp-dir={self.temp}", *args]
        with open(log, "wb") as f:
            self.nodes.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.node_env,
                                               start_new_session=True))
        return log

    def wait(self, logs: list[Path]) -> None:
        deadline = time.time() + 240
        for node, log in zip(self.nodes, logs):
            while "Ray runtime started" not in log.read_text(errors="replace"):
                if node.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed: {log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)

    def workers(self) -> list[psutil.Process]:
        """The StudioWorker actors' processes (children of this cluster's raylets)."""
        found = []
        for node in self.nodes:
            try:
                procs = psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    if " ".join(p.cmdline()).startswith("ray::StudioWorker"):
                        found.append(p)
                except psutil.Error:
                    pass
        return found

    def stop(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        # the second node starts at once and joins when the head answers (each takes ~10 s of imports)
        logs = [c.start_node("--head", f"--port={c.port}", "--include-dashboard=false", "--disable-usage-stats"),
                c.start_node(f"--address={c.address}")]
        c.wait(logs)
        yield c
    finally:
        c.stop()


def studio_run(cluster: Cluster, path: Path, out: Path, *args: str, wait: bool = True, extra_env: dict | None = None):
    """`studio run FILE --out OUT ARGS` in a subprocess: the real entry point, its own Ray driver."""
    env = {**cluster.env, "STUDIO_HOME": str(out.parent / "home"), "STUDIO_EXTRA_TASKS": EXTRA_TASKS, **(extra_env or {})}
    cmd = [sys.executable, "-m", "studio", "run", str(path), "--out", str(out), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def same_outputs(a: Path, b: Path) -> None:
    """Both folders hold the same output files, images with the same pixels, texts the same."""
    assert outputs_of(a) == outputs_of(b)
    for name in outputs_of(a):
        if name.endswith(".png"):
            assert np.array_equal(pixels(a / name), pixels(b / name)), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def exactly_once(out: Path, names: list[str]) -> list[dict]:
    """Every job has one job-done row, and every output file on disk is one of theirs, intact."""
    records = done_records(out)
    assert sorted(r["name"] for r in records) == sorted(names)
    recorded = {item["file"]: item["sha256"] for r in records for item in r["outputs"]}
    assert sorted(recorded) == outputs_of(out)  # none lost, none twice
    for file, sha in recorded.items():
        assert sha256_file(out / file) == sha
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # nothing half-written
    return records


# --------------------------------------------------------------------------- a batch, a lost worker
def kill_a_busy_worker(cluster: Cluster, driver: subprocess.Popen, out: Path, after: int) -> None:
    """SIGKILL one StudioWorker process once `after` jobs are in (both workers busy then)."""
    deadline = time.time() + 300
    while len(done_records(out) if out.exists() else []) < after:
        assert driver.poll() is None and time.time() < deadline, driver.communicate()
        time.sleep(0.05)
    busy = [p for p in cluster.workers() if "stream" in " ".join(p.cmdline())]
    (busy or cluster.workers())[0].kill()


def test_a_batch_and_a_pipeline_on_two_nodes_survive_a_killed_worker_and_match_the_run_without_ray(cluster, toys, tmp_path, cli):
    """The representative run: 12 jobs, one that fails, and a 3-step pipeline in one file, a worker
    killed mid-run."""
    from studio.batch import run_file

    data = {"defaults": {"model": str(toys), "width": 48, "height": 48, "delay": 0.4},
            "jobs": [{"task": "toy-image", "prompt": "a {red|blue} {fox|owl|cat}", "seeds": [1, 2]},
                     {"task": "toy-image", "name": "broken", "prompt": "p", "fail": True}],
            "steps": storyboard(toys, delay=0.4)["steps"]}
    f = write(tmp_path / "b.yaml", data)
    names = [f"job1.{n}" for n in range(1, 13)] + ["left", "right", "desc"]
    out = tmp_path / "ray"
    driver = studio_run(cluster, f, out, "--ray", cluster.address, "--json", wait=False)
    kill_a_busy_worker(cluster, driver, out, after=2)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 1, stderr[-3000:]  # one job failed, as it fails without Ray
    assert "error: job broken failed: RuntimeError: the painter was asked to fail" in stderr
    assert "its worker was lost" in stderr and "running it again" in stderr
    assert "(raylet)" not in stdout + stderr  # Ray's own paragraph about it stays out of the way

    # --json: one line per output, as without Ray, then the summary
    lines = [json.loads(line) for line in stdout.splitlines()]
    made = [line for line in lines[:-1] if line["status"] == "done"]
    assert sorted(line["job"] for line in made) == sorted(names + ["desc"])  # desc: one text per image
    assert all(Path(line["path"]).exists() for line in made)
    summary = lines[-1]["summary"]
    assert (summary["jobs"], summary["done"], summary["failed"], summary["processes"]) == (16, 15, 1, 2)
    assert [r["name"] for r in read_manifest(out) if r.get("event") == "job-failed"] == ["broken"]

    records = exactly_once(out, names)
    assert len({r["process"] for r in records}) >= 3  # two workers, the lost one's successor, the captioner
    assert [r["name"] for r in records].index("desc") > max([r["name"] for r in records].index(s) for s in ("left", "right"))
    assert run_file(data, out_dir=tmp_path / "local").failed == 1
    same_outputs(out, tmp_path / "local")  # desc read the images the driver shipped to its worker
    # what desc records names the driver's files (not a worker's copy): replay reads those
    assert json.loads((out / "desc.json").read_text())["params"]["images"] == [str((out / "left.png").resolve())]

    # the folder is any run's folder: `studio run --resume` without Ray trusts what the Ray run wrote
    again = cli("run", f, "--out", out, "--resume", "--json")
    assert again.exit_code == 1, again
    summary = json.loads(again.stdout.splitlines()[-1])["summary"]
    assert (summary["skipped"], summary["done"], summary["failed"]) == (15, 0, 1)  # only the broken one ran again
    exactly_once(out, names)


# --------------------------------------------------------------------------- a pipeline
def storyboard(model: Path, delay: float = 1.0) -> dict:
    """Two independent steps, then one that reads both."""
    return {"defaults": {"model": str(model)},
            "steps": {"left": {"task": "toy-image", "prompt": "a red fox", "seed": 3, "delay": delay},
                      "right": {"task": "toy-image", "prompt": "a blue owl", "seed": 4, "delay": delay},
                      "desc": {"task": "toy-caption", "images": ["${left.image}", "${right.image}"]}}}


@pytest.mark.slow  # the representative test above runs a pipeline too; this one checks the timing and replay
def test_a_pipeline_runs_independent_steps_side_by_side_and_a_step_once_its_inputs_exist(cluster, toys, tmp_path, cli):
    from studio.batch import run_file

    f = write(tmp_path / "story.yaml", storyboard(toys))
    out = tmp_path / "ray"
    env_auto = {"RAY_ADDRESS": cluster.address}  # --ray auto finds the cluster as `ray` itself does
    done = studio_run(cluster, f, out, "--ray", "auto", "--quiet", extra_env=env_auto)
    assert done.returncode == 0, done.stderr[-3000:]
    records = exactly_once(out, ["left", "right", "desc"])
    by_name = {r["name"]: r for r in records}
    assert by_name["left"]["process"] != by_name["right"]["process"]  # side by side, on two workers
    assert [r["name"] for r in records][-1] == "desc"
    run_file(storyboard(toys), out_dir=tmp_path / "local")
    same_outputs(out, tmp_path / "local")  # desc read the images the driver shipped to its worker

    # what desc records names the driver's files (not a worker's copy), so replay works from them
    meta = json.loads((out / "desc.json").read_text())
    assert meta["params"]["images"] == [str((out / "left.png").resolve())]
    replayed = cli("replay", out / "left.png", "--out", tmp_path / "replayed", "--json")
    assert replayed.exit_code == 0, replayed
    assert np.array_equal(pixels(Path(json.loads(replayed.stdout)["path"])), pixels(out / "left.png"))


@pytest.mark.slow  # --shared-out: the same pipeline, the workers writing into --out themselves
def test_shared_out_workers_write_the_same_outputs_and_the_driver_records_them(cluster, toys, tmp_path):
    from studio.batch import run_file

    f = write(tmp_path / "story.yaml", storyboard(toys, delay=0.2))
    out = tmp_path / "ray"
    done = studio_run(cluster, f, out, "--ray", cluster.address, "--shared-out", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    exactly_once(out, ["left", "right", "desc"])
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(line["job"] for line in lines[:-1]) == ["desc", "desc", "left", "right"]
    run_file(storyboard(toys, delay=0.2), out_dir=tmp_path / "local")
    same_outputs(out, tmp_path / "local")


# --------------------------------------------------------------------------- a real model, Ctrl-C
@pytest.mark.slow  # each worker imports torch and diffusers and loads the model: ~1-2 min here
def test_the_tiny_stable_diffusion_model_on_ray_makes_the_pixels_it_makes_without_ray(cluster, tiny, tmp_path):
    from studio.batch import run_file

    data = {"defaults": {"model": str(tiny("sd")), "steps": 2, "width": 32, "height": 32, "device": "cpu"},
            "jobs": [{"task": "image", "prompt": "a {red|blue} {fox|owl|cat}", "seeds": [1, 2]}]}
    f = write(tmp_path / "b.yaml", data)
    out = tmp_path / "ray"
    done = studio_run(cluster, f, out, "--ray", cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: 2 node(s), 2 CPU worker slot(s)" in done.stderr
    exactly_once(out, [f"job1.{n}" for n in range(1, 13)])
    assert run_file(data, out_dir=tmp_path / "local").failed == 0
    same_outputs(out, tmp_path / "local")


@pytest.mark.slow
def test_ctrl_c_ends_the_workers_and_leaves_no_half_written_file(cluster, toys, tmp_path):
    data = {"defaults": {"model": str(toys), "width": 48, "height": 48, "delay": 0.5},
            "jobs": [{"task": "toy-image", "prompt": "ctrl-c", "seeds": list(range(16))}]}
    f = write(tmp_path / "b.yaml", data)
    out = tmp_path / "ray"
    driver = studio_run(cluster, f, out, "--ray", cluster.address, "--quiet", wait=False)
    deadline = time.time() + 300
    while len(done_records(out) if out.exists() else []) < 3:
        assert driver.poll() is None and time.time() < deadline, driver.communicate()
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    deadline = time.time() + 60
    while cluster.workers() and time.time() < deadline:  # the actors end with the driver
        time.sleep(0.5)
    assert not cluster.workers()
    finished = {r["name"] for r in done_records(out)}
    assert 3 <= len(finished) < 16
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    rows = {r["file"] for r in read_manifest(out) if "file" in r}
    for name in outputs_of(out):  # every file there is whole and recorded
        assert name in rows and (out / name).with_suffix(".json").exists()
        Image.open(out / name).load()

    resumed = studio_run(cluster, f, out, "--ray", cluster.address, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.splitlines()[-1])["summary"]
    assert summary["skipped"] == len(finished) and summary["done"] == 16 - len(finished)
    exactly_once(out, [f"job1.{n}" for n in range(1, 17)])


# --------------------------------------------------------------------------- mistakes, before any cluster
def test_ray_flags_are_checked_before_anything_runs(toys, tmp_path, cli):
    f = write(tmp_path / "b.yaml", {"jobs": [{"task": "toy-image", "prompt": "p", "model": str(toys)}]})
    for args, words in ((["--shared-out"], "--shared-out is for --ray"),
                        (["--ray", "local", "--processes", "2"], "pick one"),
                        (["--ray", "my-laptop"], "not an address"),
                        (["--ray", f"127.0.0.1:{free_port()}"], "no Ray cluster answers")):
        result = cli("run", f, "--out", tmp_path / "out", *args)
        assert result.exit_code == 2, (args, result)
        assert words in result.stderr and "hint:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not outputs_of(tmp_path / "out")


def test_studio_help_does_not_import_ray():
    code = ("import sys; from typer.testing import CliRunner; from studio.cli import app\n"
            "assert CliRunner().invoke(app, ['run', '--help']).exit_code == 0\n"
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert found.stdout.strip() == "[]", found.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
