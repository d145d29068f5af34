"""`studio serve` measured side by side: what warm models save, and what the API costs.

    python benchmarks/serve.py                    # both parts, models built in a temp folder
    python benchmarks/serve.py --part calls       # only part 1
    python benchmarks/serve.py --part overhead --pairs 7

1. Twelve images of the tiny SD model (2 steps, 32 px), made three ways:
   S  12 sequential `studio image ... --server URL` calls (each a process: the CLI, no torch;
      the server's worker loads the model on the first job and keeps it),
   P  12 plain `studio image ...` invocations (each imports torch and loads the model),
   B  one `studio run` of a 12-job batch file (one process, one load).
   Goal: S within 1.5x of B.

2. The API's overhead per job on a medium model (a ~140M-parameter SD-style UNet, 256 px,
   8 steps): a job through the server (POST, queue, server-sent events, PNG encoded on the server,
   fetched and written here by RemoteEngine) against `Engine.run` in this process (same request,
   model warm on both sides). The sides alternate, N pairs, and the medians are compared, with
   the load average before and after: the machine is shared. Goal: <= 5%.

Nothing here is a test: numbers vary with the machine and its load, which is why every side
runs in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


class ServerProcess:
    """`studio serve` in a subprocess, as a user starts it."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "studio", "serve", "--port", str(self.port), "--out", str(out),
                                      "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"studio serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/api/models", timeout=2).read()
                return self.url
            except OSError:
                time.sleep(0.2)
        sys.exit("studio serve did not start within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def make_medium_sd(out: Path) -> Path:
    """An SD 1.x pipeline with a ~140M-parameter UNet (SD's layout at 0.4x the width) over the tiny
    text encoder and VAE: large enough that a step costs what small real models cost."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from studio.pipelines.tiny.image import _tiny_scheduler, _tiny_vae, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(0)
    text_encoder = tiny_text_encoder()
    unet = UNet2DConditionModel(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters())
    print(f"medium model: UNet {params / 1e6:.0f}M parameters -> {out}", flush=True)
    return out


def calls(work: Path, env: dict[str, str], jobs: int) -> None:
    from studio.pipelines.tiny import make_tiny

    model = make_tiny("sd", work / "tiny-sd").resolve()
    studio = [sys.executable, "-m", "studio"]
    prompts = [f"a lighthouse at dusk, view {i}" for i in range(jobs)]
    common = ["--model", str(model), "--steps", "2", "--width", "32", "--height", "32", "--quiet", "--device", "cpu"]
    batch = work / "batch.yaml"
    batch.write_text(yaml.safe_dump({"defaults": {"model": str(model), "steps": 2, "width": 32, "height": 32},
                                     "jobs": [{"task": "image", "prompt": p, "seed": i} for i, p in enumerate(prompts)]}))
    print(f"\n1. {jobs} images, tiny SD, 2 steps, 32x32, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    with ServerProcess(work / "served", env) as url:
        s = sum(timed(studio + ["image", p, "--seed", str(i), "--server", url, "--out", str(work / "s")] + common, env)
                for i, p in enumerate(prompts))
    print(f"S  {jobs} x studio image --server:    {s:7.1f} s  ({s / jobs:.2f} s a call)", flush=True)
    p_total = sum(timed(studio + ["image", p, "--seed", str(i), "--out", str(work / "p")] + common, env)
                  for i, p in enumerate(prompts))
    print(f"P  {jobs} x studio image (plain):      {p_total:7.1f} s  ({p_total / jobs:.2f} s a call)", flush=True)
    b = timed(studio + ["run", str(batch), "--out", str(work / "b"), "--quiet", "--device", "cpu"], env)
    print(f"B  studio run ({jobs}-job batch file):   {b:7.1f} s", flush=True)
    print(f"S/B = {s / b:.2f} (goal <= 1.5)   S/P = {s / p_total:.2f}   load average now {os.getloadavg()[0]:.1f}", flush=True)
    for folder in ("s", "p", "b"):
        assert len(list((work / folder).glob("*.png"))) == jobs, folder


def overhead(work: Path, env: dict[str, str], pairs: int) -> None:
    import numpy as np
    from PIL import Image

    from studio.engine import Engine, RunOptions
    from studio.progress import Progress
    from studio.server.client import RemoteEngine

    model = make_medium_sd(work / "medium-sd")
    params = {"prompt": "a lighthouse at dusk", "model": str(model), "steps": 8, "width": 256, "height": 256, "seed": 1}
    local = Engine(RunOptions(device={"device": "cpu"}, out_dir=work / "inproc", quiet=True), progress=Progress(enabled=False))
    before = os.getloadavg()
    print(f"\n2. API overhead per job: 256 px, 8 steps, medium model, {pairs} pairs alternating; "
          f"load average {before[0]:.1f} {before[1]:.1f} {before[2]:.1f}", flush=True)
    with ServerProcess(work / "served-medium", env) as url:
        remote = RemoteEngine(url, RunOptions(device={"device": "cpu"}, out_dir=work / "api", quiet=True),
                              progress=Progress(enabled=False))
        remote.run("image", params)  # warm both sides: the load is not what is measured
        local.run("image", params)
        times: dict[str, list[float]] = {"api": [], "engine": []}
        runs: dict[str, list[float]] = {"api": [], "engine": []}
        for i in range(pairs):
            order = [("api", remote), ("engine", local)] if i % 2 == 0 else [("engine", local), ("api", remote)]
            for name, engine in order:
                t0 = time.perf_counter()
                result = engine.run("image", {**params, "seed": 100 + i})[0]
                times[name].append(time.perf_counter() - t0)
                runs[name].append(result.extra["timings"]["run_s"])
    after = os.getloadavg()
    api, eng = statistics.median(times["api"]), statistics.median(times["engine"])
    print(f"   Engine.run in process: median {eng:6.2f} s  (pipeline {statistics.median(runs['engine']):.2f} s)  "
          f"runs {' '.join(f'{t:.2f}' for t in times['engine'])}")
    print(f"   through the API:       median {api:6.2f} s  (pipeline {statistics.median(runs['api']):.2f} s)  "
          f"runs {' '.join(f'{t:.2f}' for t in times['api'])}")
    print(f"   overhead {100 * (api - eng) / eng:+.1f}% of a job (goal <= 5%); per job {api - eng:+.3f} s; "
          f"load average after {after[0]:.1f} {after[1]:.1f} {after[2]:.1f}", flush=True)
    # the time outside the pipeline on each side (whole job minus the pipeline's own run_s): the
    # API's plumbing (HTTP, queue, events, PNG fetched and written here) without the load's noise
    # on the pipeline itself, which swings by seconds on a shared machine
    outside = {k: statistics.median(t - r for t, r in zip(times[k], runs[k])) for k in times}
    print(f"   outside the pipeline: in process {outside['engine']:.3f} s, through the API {outside['api']:.3f} s; "
          f"the API adds {outside['api'] - outside['engine']:+.3f} s = {100 * (outside['api'] - outside['engine']) / eng:+.2f}% "
          f"of a job", flush=True)
    a, b = sorted((work / "api").glob("*.png"))[-1], sorted((work / "inproc").glob("*.png"))[-1]
    same = np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    print(f"   last image of each side: same pixels = {same} ({a.name})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("calls", "overhead", "both"), default="both")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on every side (1: on a shared 2-core machine, OpenMP threads spinning on "
                         "busy cores make 2-thread timings swing 5x from run to run)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="studio-bench-serve-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_HOME": str(work / "home"), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("STUDIO_SERVER", None)
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "STUDIO_HOME", "OMP_NUM_THREADS")})
    import torch

    torch.set_num_threads(args.threads)
    if args.part in ("calls", "both"):
        calls(work, env, args.jobs)
    if args.part in ("overhead", "both"):
        overhead(work, env, args.pairs)
    print(json.dumps({"work": str(work)}))


if __name__ == "__main__":
    main()
