"""A 16-job batch file against 16 separate invocations, on a tiny model, measured side by side.

    python benchmarks/batch.py                 # builds a tiny SD model in a temp folder
    python benchmarks/batch.py --model tiny/sd --jobs 16 --steps 2 --size 32

Prints wall-clock seconds of
  A. `studio run batch.yaml` (one process: torch imported once, the model loaded once, seed
     sweeps merged into pipeline calls),
  B. the same 16 images as 16 `studio image ...` invocations (each pays process start, imports
     and the model load),
and the ratio A / B (the goal is <= 0.2). It also runs the batch in-process with and without
merging, to show what merging alone is worth. Nothing here is a test: numbers vary with the
machine and its load, which is why A and B run in the same invocation.

    python benchmarks/batch.py --yaml          # what bounding YAML costs (no model needed)

reads a file of N jobs (default 5000) with and without the streaming bounds check of
studio/yamlfile.py, side by side, and times how fast a 370-byte alias bomb is refused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def yaml_bounds(jobs: int) -> None:
    """Reading a big legitimate batch file with and without the bounds check, and a bomb."""
    from studio import yamlfile
    from studio.errors import UsageError

    work = Path(tempfile.mkdtemp(prefix="studio-bench-yaml-"))
    big = work / "big.yaml"
    big.write_text("jobs:\n" + "".join(f'  - {{task: image, prompt: "a photo of a cat number {i:07d}", seed: {i}, '
                                        f"steps: 2, width: 256}}\n" for i in range(jobs)))
    check = yamlfile._check_bounds
    runs = {}
    for label, bounded in [("bounded", True), ("unbounded", False)] * 3:  # interleaved: load drifts
        yamlfile._check_bounds = check if bounded else (lambda *a, **k: None)
        t0 = time.perf_counter()
        yamlfile.read_yaml(big)
        runs.setdefault(label, []).append(time.perf_counter() - t0)
    yamlfile._check_bounds = check
    with_, without = min(runs["bounded"]), min(runs["unbounded"])
    print(f"{jobs} jobs, {big.stat().st_size / 1e6:.1f} MB: read_yaml {with_:.3f} s bounded, {without:.3f} s "
          f"without the check (ratio {with_ / without:.2f})")
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = work / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    try:
        yamlfile.read_yaml(bomb)
    except UsageError as exc:
        print(f"{bomb.stat().st_size}-byte alias bomb refused in {time.perf_counter() - t0:.4f} s: {exc.message}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a tiny SD folder (default: build one with studio.pipelines.tiny)")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--yaml", action="store_true", help="measure the YAML bounds instead (jobs default 5000)")
    args = ap.parse_args()
    if args.yaml:
        yaml_bounds(args.jobs if args.jobs != 16 else 5000)
        return

    work = Path(tempfile.mkdtemp(prefix="studio-bench-batch-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_HOME": str(work / "home"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "STUDIO_HOME")})
    model = Path(args.model) if args.model else None
    if model is None:
        from studio.pipelines.tiny import make_tiny

        model = make_tiny("sd", work / "tiny-sd")
    model = model.resolve()
    prompt = "a lighthouse at dusk"
    seeds = list(range(args.jobs))
    batch = work / "batch.yaml"
    batch.write_text(yaml.safe_dump({
        "defaults": {"model": str(model), "steps": args.steps, "width": args.size, "height": args.size},
        "jobs": [{"task": "image", "prompt": prompt, "seeds": seeds}]}))
    studio = [sys.executable, "-m", "studio"]

    print(f"{args.jobs} images, tiny SD ({model}), {args.steps} steps, {args.size}x{args.size}, "
          f"{os.cpu_count()} CPUs", flush=True)
    a = timed(studio + ["run", str(batch), "--out", str(work / "a"), "--quiet", "--device", "cpu"], env)
    print(f"A  studio run (1 process, {args.jobs} jobs):   {a:7.1f} s", flush=True)
    b = 0.0
    for seed in seeds:
        b += timed(studio + ["image", prompt, "--model", str(model), "--seed", str(seed), "--steps", str(args.steps),
                             "--width", str(args.size), "--height", str(args.size), "--out", str(work / "b"),
                             "--quiet", "--device", "cpu"], env)
    print(f"B  {args.jobs} x studio image (separate):      {b:7.1f} s", flush=True)
    print(f"ratio A/B = {a / b:.3f}  (goal <= 0.2)", flush=True)
    same = sorted(p.name.split("-", 2)[1] for p in (work / "a").glob("*.png"))
    assert len(same) == args.jobs and len(list((work / "b").glob("*.png"))) == args.jobs

    # in-process: what merging seed sweeps into one pipeline call adds (model already loaded)
    from studio.batch import Runner

    Runner(batch, out_dir=work / "warm", device={"device": "cpu"}).run()  # load + warm up
    t0 = time.perf_counter()
    Runner(batch, out_dir=work / "m1", device={"device": "cpu"}, merge=1).run()
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    Runner(batch, out_dir=work / "m8", device={"device": "cpu"}, merge=8).run()
    eight = time.perf_counter() - t0
    print(f"in-process, model loaded: one call per job {one:.2f} s, merged 8 per call {eight:.2f} s "
          f"(ratio {eight / one:.2f})")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
