"""One prepared script for a lent GPU: exercises the device manager's CUDA paths on tiny models
and prints a table (setting, ok/error, ms per image, max pixel difference to fp32).

    python benchmarks/gpu_check.py            # on the GPU machine; numbers go in benchmarks/RESULTS.md

Covers fp16, bf16, SDPA flash / math kernels, xformers (if installed), model and sequential CPU
offload, torchao int8 / int4 weight-only, torch.compile, and the same precisions on a
transformers causal LM. On a machine without CUDA it says so and exits 0.
"""

import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine)")
        return 0
    from studio.device import DeviceManager, DeviceSettings, module_available
    from studio.pipelines.tiny import make_tiny

    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    tmp = Path(tempfile.mkdtemp())
    sd_dir = make_tiny("sd", tmp / "sd")
    lm_dir = make_tiny("code-lm", tmp / "lm")

    from diffusers import StableDiffusionPipeline

    def images(settings: DeviceSettings, n: int = 3):
        dm = DeviceManager(settings)
        pipe = dm.prepare(StableDiffusionPipeline.from_pretrained(str(sd_dir)))
        pipe.set_progress_bar_config(disable=True)
        times, out = [], None
        for i in range(n + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with dm.inference():
                out = pipe("a red circle", num_inference_steps=4, generator=dm.generator(0), height=64, width=64,
                           output_type="np").images[0]
            torch.cuda.synchronize()
            if i:  # first call warms up kernels
                times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000, out, torch.cuda.max_memory_allocated() / 2**20

    rows = []
    reference = None
    configs = [
        ("fp32 sdpa", DeviceSettings(device="cuda", precision="fp32")),
        ("fp16 sdpa", DeviceSettings(device="cuda", precision="fp16")),
        ("bf16 sdpa", DeviceSettings(device="cuda", precision="bf16")),
        ("fp16 flash", DeviceSettings(device="cuda", precision="fp16", attention="flash")),
        ("fp16 math", DeviceSettings(device="cuda", precision="fp16", attention="math")),
        ("fp16 sliced", DeviceSettings(device="cuda", precision="fp16", attention="sliced")),
        ("fp16 xformers", DeviceSettings(device="cuda", precision="fp16", attention="xformers")),
        ("fp16 offload=model", DeviceSettings(device="cuda", precision="fp16", offload="model")),
        ("fp16 offload=sequential", DeviceSettings(device="cuda", precision="fp16", offload="sequential")),
        ("bf16 int8", DeviceSettings(device="cuda", precision="bf16", quantize="int8")),
        ("bf16 int4", DeviceSettings(device="cuda", precision="bf16", quantize="int4")),
        ("fp16 compile", DeviceSettings(device="cuda", precision="fp16", compile=True)),
    ]
    for name, settings in configs:
        torch.cuda.reset_peak_memory_stats()
        try:
            if name.endswith("xformers") and not module_available("xformers"):
                rows.append((name, "skipped", "", "", "xformers not installed"))
                continue
            ms, out, mem = images(settings)
            if reference is None:
                reference = out
            diff = float(np.abs(out.astype(np.float32) - reference.astype(np.float32)).max())
            rows.append((name, "ok", f"{ms:.1f}", f"{mem:.0f}", f"max|diff| vs fp32 {diff:.4f}"))
        except Exception as exc:  # report every path, keep going
            rows.append((name, "ERROR", "", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"))
            traceback.print_exc(limit=2)

    from transformers import AutoModelForCausalLM

    for name, settings in [("lm fp32", DeviceSettings(device="cuda", precision="fp32")),
                           ("lm bf16", DeviceSettings(device="cuda", precision="bf16")),
                           ("lm bf16 int8", DeviceSettings(device="cuda", precision="bf16", quantize="int8"))]:
        try:
            dm = DeviceManager(settings)
            model = dm.prepare(AutoModelForCausalLM.from_pretrained(str(lm_dir)))
            ids = torch.randint(0, model.config.vocab_size, (4, 32), device=dm.device)
            with dm.inference():
                model(ids)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    model(ids)
                torch.cuda.synchronize()
            rows.append((name, "ok", f"{(time.perf_counter() - t) * 100:.2f}", "", "ms per forward (4x32 tokens)"))
        except Exception as exc:
            rows.append((name, "ERROR", "", "", f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"))

    print(f"\n| setting | status | ms/image | peak MiB | note |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
