"""What `studio image` costs over plain diffusers, measured side by side in one run.

1. Per image, in one process: studio's engine (request, cached pipeline, prompt handling,
   metadata, atomic PNG + sidecar + manifest) vs a raw diffusers loop (pipe(...) + image.save) on
   the same model, same seeds, alternating so machine noise hits both alike. Medians and their
   ratio (goal <= 1.02), plus a check that both made the same pixels.
2. A 16-prompt run in one process (the Python API: one import, one model load) vs 16 separate
   `studio image` invocations (each pays python start, imports and the load). Ratio of the wall
   times (goal <= 0.2).

    .venv/bin/python benchmarks/image_overhead.py                  # the tiny SD (built here)
    .venv/bin/python benchmarks/image_overhead.py --model sd-turbo --steps 1 --size 512

Numbers on a tiny model show the fixed per-image overhead at its most visible: a real model's
seconds per image dwarf it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_image(model: str, images: int, steps: int, size: int, guidance: float, tmp: Path) -> None:
    import numpy as np
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    from studio.engine import Engine, RunOptions
    from studio.models import resolve

    spec = resolve(model, task="image")
    raw = AutoPipelineForText2Image.from_pretrained(spec.location(), use_safetensors=True)
    raw.set_progress_bar_config(disable=True)
    engine = Engine(RunOptions(out_dir=tmp / "studio", quiet=True, device={"device": "cpu"}))
    prompt = "a lighthouse at dusk, oil painting"
    params = {"prompt": prompt, "model": model, "steps": steps, "guidance": guidance, "width": size, "height": size}
    engine.run("image", {**params, "seed": 999})  # load + warm up both
    raw(prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
        generator=torch.Generator("cpu").manual_seed(999))

    raw_times, studio_times, same = [], [], True
    (tmp / "raw").mkdir()
    for i in range(images):
        t0 = time.perf_counter()
        image = raw(prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
                    generator=torch.Generator("cpu").manual_seed(i)).images[0]
        image.save(tmp / "raw" / f"{i}.png")
        raw_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = engine.run("image", {**params, "seed": i})[0]
        studio_times.append(time.perf_counter() - t0)
        same &= bool(np.array_equal(np.asarray(Image.open(result.path).convert("RGB")),
                                    np.asarray(Image.open(tmp / "raw" / f"{i}.png").convert("RGB"))))
    r, s = statistics.median(raw_times), statistics.median(studio_times)
    print(f"per image ({images} images, {steps} steps, {size}x{size}, model {model}, torch threads {torch.get_num_threads()})")
    print(f"  raw diffusers loop : median {r * 1000:8.1f} ms")
    print(f"  studio engine      : median {s * 1000:8.1f} ms")
    print(f"  ratio studio/raw   : {s / r:.3f}   (goal <= 1.02)   same pixels: {same}")


def one_process_vs_cli(model: str, runs: int, steps: int, size: int, guidance: float, tmp: Path) -> None:
    studio = [sys.executable, "-m", "studio"]
    prompts = [f"a lighthouse at dusk, study {i}" for i in range(runs)]
    common = {"model": model, "steps": steps, "guidance": guidance, "width": size, "height": size}
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from studio import Studio\n"
        "st = Studio(device='cpu', out_dir=%r)\n"
        "for i, p in enumerate(%r):\n"
        "    st.image(prompt=p, seed=i, **%r)\n" % (str(ROOT), str(tmp / "one"), prompts, common)
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    one = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        subprocess.run([*studio, "image", p, "--model", model, "--steps", str(steps), "--guidance", str(guidance),
                        "--width", str(size), "--height", str(size), "--seed", str(i), "--device", "cpu",
                        "-o", str(tmp / "many"), "-q"], check=True, cwd=ROOT)
    many = time.perf_counter() - t0
    print(f"{runs} prompts")
    print(f"  one process (Python API)     : {one:8.1f} s")
    print(f"  {runs} `studio image` processes : {many:8.1f} s")
    print(f"  ratio one/many               : {one / many:.3f}   (goal <= 0.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model (default: a tiny SD built in a temp folder)")
    ap.add_argument("--images", type=int, default=12, help="images per side for the per-image medians")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--runs", type=int, default=16, help="prompts for the one-process vs CLI comparison")
    ap.add_argument("--skip-cli", action="store_true", help="only the per-image comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ.setdefault("STUDIO_HOME", str(tmp / "home"))
        model = args.model
        if model is None:
            from studio.pipelines.tiny import make_tiny

            model = str(make_tiny("sd", tmp / "tiny-sd"))
        per_image(model, args.images, args.steps, args.size, args.guidance, tmp)
        if not args.skip_cli:
            one_process_vs_cli(model, args.runs, args.steps, args.size, args.guidance, tmp)


if __name__ == "__main__":
    main()
