"""`studio run FILE` without Ray, and with `--ray` on 1 and 2 workers, on a tiny model, side by side.

    python benchmarks/ray_batch.py                     # 256 jobs of a tiny SD model built in a temp folder
    python benchmarks/ray_batch.py --jobs 64 --steps 4 --size 64 --all-threads

Starts a Ray cluster on this machine the way a user starts one on several: `ray start --head`
with one CPU (one worker slot), then a second node with `ray start --address` (two slots); both
are stopped at the end. Each run is a fresh `studio run` process, so each pays its imports, the
connection and every worker's model load; the jobs all differ in their prompt, so the run without
Ray makes one pipeline call per job as the Ray workers do (no seed sweep to merge).

Prints, per run: the wall-clock seconds, jobs/s over the whole run, and jobs/s in the steady
state: each worker's jobs after its first (imports and model load behind it) over the time it
took them, summed over the workers, from the `--json` lines as they arrive and the manifest's
record of which worker made each. `studio run` runs on one thread (OMP_NUM_THREADS=1), the
compute of one Ray worker slot; --all-threads adds a run with torch's default threads. Ray's
per-job overhead (dispatch, the Result's trip through the object store, the driver's write) is
measured on a task that does nothing else (`bench-noop`: an 8x8 image at once): the steady
per-job time of one Ray worker minus that of `studio run`, and the same difference on the tiny
model.
Nothing here is a test: numbers vary with the machine and its load, which is why all runs happen
in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
COLOURS = ["red", "blue", "green", "gold", "grey", "pink", "teal", "brown"]
ANIMALS = ["fox", "owl", "cat", "dog", "cow", "bee", "elk", "yak", "ant", "bat", "emu", "eel"]


@dataclass(frozen=True)
class NoopRequest:
    prompt: str  # recorded in the output
    seed: int | None = None  # recorded


class Noop:
    """A task that makes an 8x8 image at once: what is left of a job is the executor's own cost."""

    task = "bench-noop"
    request_type = NoopRequest
    output_kinds = ("image",)
    needs_model = False

    @classmethod
    def load(cls, spec, device):
        return cls()

    def run(self, request, progress):
        from PIL import Image

        from studio.outputs import Result

        yield Result(kind="image", value=Image.new("RGB", (8, 8), (200, 40, 40)), params=asdict(request))


class Cluster:
    """`ray start --block` nodes of one CPU each on 127.0.0.1; SIGTERM stops each node's processes."""

    def __init__(self, env: dict[str, str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
        self.env = env
        self.nodes: list[subprocess.Popen] = []

    def add(self) -> None:
        args = (["--head", f"--port={self.port}", "--include-dashboard=false", "--disable-usage-stats"]
                if not self.nodes else [f"--address={self.address}"])
        log = self.temp / f"node{len(self.nodes)}.log"
        with open(log, "wb") as f:
            node = subprocess.Popen([str(RAY), "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
                                     f"--temp-dir={self.temp}", *args], stdout=f, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.nodes.append(node)
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if node.poll() is not None:
                sys.exit(f"ray start failed:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def timed_run(batch: Path, out: Path, env: dict[str, str], *args: str) -> dict[str, float]:
    """One `studio run --json`: wall seconds and when each job's output line arrived."""
    cmd = [sys.executable, "-m", "studio", "run", str(batch), "--out", str(out), "--json", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrived: dict[str, float] = {}
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("job"):
            arrived[event["job"]] = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.wait() != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    # steady state: each worker's rate once its first output is out, summed over the workers
    workers: dict[int, list[float]] = {}
    for row in (json.loads(r) for r in (out / "manifest.jsonl").read_text().splitlines()):
        if row.get("event") == "job-done":
            workers.setdefault(row.get("process", 0), []).append(arrived[row["name"]])
    rates = [(len(t) - 1) / (max(t) - min(t)) for t in workers.values() if len(t) > 2 and max(t) > min(t)]
    return {"wall": wall, "jobs": len(arrived), "workers": len(workers),
            "steady_jobs_s": sum(rates) if rates else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a tiny SD folder (default: build one)")
    ap.add_argument("--jobs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--all-threads", action="store_true", help="also run studio run with torch's default threads")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="studio-bench-ray-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "STUDIO_HOME": str(work / "home"),
           "PYTHONPATH": str(ROOT), "STUDIO_EXTRA_TASKS": "bench-noop=benchmarks.ray_batch:Noop"}
    model = args.model
    if not model:
        from studio.pipelines.tiny import make_tiny

        model = str(make_tiny("sd", work / "tiny-sd"))
    prompts = [f"a {COLOURS[i % len(COLOURS)]} {ANIMALS[i % len(ANIMALS)]}, picture {i}" for i in range(args.jobs)]
    batch = work / "batch.yaml"
    batch.write_text(yaml.safe_dump({"defaults": {"model": model, "steps": args.steps, "width": args.size,
                                                  "height": args.size, "device": "cpu", "seed": 1},
                                     "jobs": [{"task": "image", "prompt": p} for p in prompts]}))
    noop = work / "noop.yaml"
    noop.write_text(yaml.safe_dump({"defaults": {"seed": 1}, "jobs": [{"task": "bench-noop", "prompt": p} for p in prompts]}))
    print(f"{len(prompts)} jobs, tiny SD, {args.steps} steps at {args.size}px, {os.cpu_count()} CPUs", flush=True)

    results = {}
    if args.all_threads:
        results["studio run, default threads"] = timed_run(batch, work / "local", env)
    one = {**env, "OMP_NUM_THREADS": "1"}
    results["studio run (no Ray), 1 thread"] = timed_run(batch, work / "local1", one)
    results["noop: studio run"] = timed_run(noop, work / "noop-local", one)
    cluster = Cluster(env)
    try:
        cluster.add()
        results["--ray, 1 worker"] = timed_run(batch, work / "ray1", env, "--ray", cluster.address)
        results["noop: --ray, 1 worker"] = timed_run(noop, work / "noop-ray", env, "--ray", cluster.address)
        cluster.add()
        results["--ray, 2 workers (2 nodes)"] = timed_run(batch, work / "ray2", env, "--ray", cluster.address)
    finally:
        cluster.stop()

    print(f"\n{'run':32} {'wall s':>8} {'jobs/s':>8} {'steady jobs/s':>14}")
    for label, r in results.items():
        print(f"{label:32} {r['wall']:8.1f} {r['jobs'] / r['wall']:8.2f} {r['steady_jobs_s']:14.2f}")
    def per_job(label: str) -> float:
        return 1000 / results[label]["steady_jobs_s"]

    for what, local, ray in (("noop", "noop: studio run", "noop: --ray, 1 worker"),
                             ("tiny SD", "studio run (no Ray), 1 thread", "--ray, 1 worker")):
        print(f"\nRay's per-job overhead ({what}): {per_job(ray) - per_job(local):.1f} ms "
              f"({per_job(ray):.1f} ms a job on one Ray worker, {per_job(local):.1f} ms in studio run)")
    two = results["--ray, 2 workers (2 nodes)"]["steady_jobs_s"] / results["--ray, 1 worker"]["steady_jobs_s"]
    print(f"2 workers / 1 worker, steady jobs/s: {two:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
