"""What `studio image` costs over plain diffusers, measured side by side in one run.

1. Per image, in one process: studio's engine (request, cached pipeline, prompt handling,
   metadata, atomic PNG + sidecar + manifest) vs a raw diffusers loop (pipe(...) + image.save) on
   the same model, same seeds, alternating so machine noise hits both alike. Medians and their
   ratio (goal <= 1.02), plus a check that both made the same pixels.
2. A 16-prompt run in one process (the Python API: one import, one model load) vs 16 separate
   `studio image` invocations (each pays python start, imports and the load). Ratio of the wall
   times (goal <= 0.2).
3. `--whole`: whole processes, `studio image PROMPT --num 3` vs a plain diffusers script that loads
   the same folder and makes and saves the same 3 images (8 steps, 256 px, a ~135M-parameter
   UNet built here), alternating, N rounds. Both wall time and CPU time (user + sys of the child,
   from os.wait4) with one torch thread per side: on a shared machine the CPU time is the steadier
   measure of what studio adds (python start, CLI, card and model resolution, metadata, manifest).
   Goal <= 1.02.

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


PLAIN_SCRIPT = """
import sys, torch
from diffusers import StableDiffusionPipeline
model, out, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True)
pipe.set_progress_bar_config(disable=True)
for i in range(3):
    image = pipe("a lighthouse at dusk", num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
                 generator=torch.Generator("cpu").manual_seed(1 + i)).images[0]
    image.save(f"{out}/{i}.png")
"""


def medium_sd(folder: Path) -> Path:
    """The tiny SD with its UNet swapped for a ~135M-parameter one (SD 1.x layout at 0.4x width)."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from studio.pipelines.tiny import make_tiny

    make_tiny("sd", folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(128, 256, 512, 512), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, sample_size=32,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    for single in folder.glob("*.safetensors"):
        single.unlink()  # the tiny single-file checkpoint no longer matches
    print(f"medium model: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters")
    return folder


def whole_process(model: str, rounds: int, steps: int, size: int, tmp: Path) -> None:
    import shutil

    script = tmp / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def timed(cmd: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        err = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise SystemExit(f"{cmd[:4]} failed:\n{err.decode()[-2000:]}")
        return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0

    plain, studio = [], []
    for r in range(rounds):
        for side in ("plain", "studio"):
            shutil.rmtree(tmp / side, ignore_errors=True)
            (tmp / side).mkdir()
        plain.append(timed([sys.executable, str(script), model, str(tmp / "plain"), str(steps), str(size)]))
        studio.append(timed([sys.executable, "-m", "studio", "image", "a lighthouse at dusk", "--model", model,
                             "--steps", str(steps), "--guidance", "7", "--width", str(size), "--height", str(size),
                             "--num", "3", "--seed", "1", "-o", str(tmp / "studio"), "-q", "--device", "cpu"]))
    pc, pw = statistics.median(c for c, _ in plain), statistics.median(w for _, w in plain)
    sc, sw = statistics.median(c for c, _ in studio), statistics.median(w for _, w in studio)
    print(f"whole processes (3 images, {steps} steps, {size}x{size}, {rounds} rounds, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.1f})")
    print(f"  plain diffusers script : median CPU {pc:7.2f} s   wall {pw:7.2f} s")
    print(f"  studio image --num 3   : median CPU {sc:7.2f} s   wall {sw:7.2f} s")
    print(f"  ratio studio/plain     : CPU {sc / pc:.3f}   wall {sw / pw:.3f}   (goal <= 1.02)   studio adds {sc - pc:.2f} s CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model (default: a tiny SD built in a temp folder)")
    ap.add_argument("--images", type=int, default=12, help="images per side for the per-image medians")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--runs", type=int, default=16, help="prompts for the one-process vs CLI comparison")
    ap.add_argument("--skip-cli", action="store_true", help="only the per-image comparison")
    ap.add_argument("--whole", type=int, metavar="ROUNDS", default=0,
                    help="only the whole-process comparison on the ~135M UNet, this many rounds (e.g. 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ.setdefault("STUDIO_HOME", str(tmp / "home"))
        model = args.model
        if args.whole:
            model = model or str(medium_sd(tmp / "medium-sd"))
            whole_process(model, args.whole, 8, 256, tmp)
            return
        if model is None:
            from studio.pipelines.tiny import make_tiny

            model = str(make_tiny("sd", tmp / "tiny-sd"))
        per_image(model, args.images, args.steps, args.size, args.guidance, tmp)
        if not args.skip_cli:
            one_process_vs_cli(model, args.runs, args.steps, args.size, args.guidance, tmp)


if __name__ == "__main__":
    main()
