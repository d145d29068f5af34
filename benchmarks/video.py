"""Video benchmark: frame interpolation quality and speed, and generation speed on tiny models.

    python benchmarks/video.py            # about a minute on 2 CPU cores
    python benchmarks/video.py --quick    # interpolation only (seconds)

1. Interpolation quality. Synthetic clips of textured shapes moving over a textured background
   (slow, medium and fast motion, plus a shape that also turns and grows). Every other frame is
   dropped and re-made by interpolating its neighbours; the mean absolute pixel error against
   the true dropped frame is compared, side by side, with plain frame repetition (what a clip
   shows at the same frame rate without interpolation) and with a linear cross-fade.
   Printed as ratios: repetition error / interpolation error (> 1: interpolation is better).
2. Interpolation speed: frames/s made at 256x256 and 512x512, each flow method.
3. Generation speed on the tiny models (`make-tiny animatediff` / `t2v`): frames/s of
   text-to-video, of a long clip with FreeNoise windows, and of prompt travel, measured in one
   run on warm pipelines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def scene(t: float, *, speed: float, size: tuple[int, int] = (128, 160), turn: bool = False):
    """The frame at time t: a textured disc and a square moving over a textured background."""
    import cv2
    import numpy as np

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([70 + 35 * np.sin(xx / 9) + 20 * np.cos(yy / 7), 90 + 30 * np.cos(xx / 13 + yy / 11),
                    110 + 25 * np.sin((xx + yy) / 10)], -1)
    cx, cy = 30 + speed * t, 50 + 0.4 * speed * t
    r = 16 + (0.5 * t if turn else 0)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
    tex = np.stack([200 + 40 * np.sin((xx - cx) / 3), 120 + 60 * np.cos((yy - cy) / 4), 60 + 50 * np.sin((xx - cx + yy - cy) / 5)], -1)
    img = np.where(disc[..., None], tex, img)
    # a square moving the other way (and rotating when `turn`)
    sq = np.zeros((h, w), np.uint8)
    box = cv2.boxPoints(((w - 40 - 0.7 * speed * t, h - 40), (22, 22), (6 * t if turn else 0)))
    cv2.fillPoly(sq, [box.astype(np.int32)], 1)
    img = np.where(sq[..., None] > 0, np.stack([60 + 0 * xx, 200 + 30 * np.sin(yy / 3), 220 + 0 * xx], -1), img)
    return np.clip(img, 0, 255).astype(np.uint8)


def interpolation_quality() -> None:
    import numpy as np

    from studio.pipelines.interpolate import METHODS, middle_frame

    print("1. interpolation quality: mean |error| of re-made middle frames (0-255 scale), lower is better")
    print(f"   {'clip':<22}{'repeat':>8}{'blend':>8}" + "".join(f"{m:>11}" for m in METHODS)
          + "".join(f"{'rep/' + m:>15}" for m in METHODS))
    totals = {k: 0.0 for k in ("repeat", "blend", *METHODS)}
    clips = [("slow (2 px/frame)", 2.0, False), ("medium (5 px/frame)", 5.0, False), ("fast (9 px/frame)", 9.0, False),
             ("turning+growing (5)", 5.0, True)]
    for label, speed, turn in clips:
        errors = {k: 0.0 for k in totals}
        pairs = 0
        for k in range(0, 16, 2):
            a, truth, b = (scene(k + d, speed=speed, turn=turn) for d in (0, 1, 2))
            truth = truth.astype(np.float32)
            errors["repeat"] += np.abs(a - truth).mean()
            errors["blend"] += np.abs((a.astype(np.float32) + b) / 2 - truth).mean()
            for m in METHODS:
                errors[m] += np.abs(middle_frame(a, b, 0.5, method=m) - truth).mean()
            pairs += 1
        for key in errors:
            errors[key] /= pairs
            totals[key] += errors[key] / len(clips)
        print(f"   {label:<22}{errors['repeat']:>8.2f}{errors['blend']:>8.2f}" + "".join(f"{errors[m]:>11.2f}" for m in METHODS)
              + "".join(f"{errors['repeat'] / errors[m]:>14.2f}x" for m in METHODS))
    print(f"   {'mean':<22}{totals['repeat']:>8.2f}{totals['blend']:>8.2f}" + "".join(f"{totals[m]:>11.2f}" for m in METHODS)
          + "".join(f"{totals['repeat'] / totals[m]:>14.2f}x" for m in METHODS))


def interpolation_speed() -> None:
    from PIL import Image

    from studio.pipelines.interpolate import METHODS, interpolate_frames

    print("2. interpolation speed (factor 2: one new frame per pair)")
    for size in ((256, 256), (512, 512)):
        frames = [Image.fromarray(scene(t, speed=5, size=size)) for t in range(9)]
        for m in METHODS:
            t0 = time.perf_counter()
            out = interpolate_frames(frames, 2, method=m)
            dt = time.perf_counter() - t0
            made = len(out) - len(frames)
            print(f"   {size[0]}x{size[1]} {m:<10} {made / dt:8.1f} new frames/s")


def generation_speed() -> None:
    from studio.engine import Engine, RunOptions
    from studio.pipelines.tiny import make_tiny

    print("3. generation speed on tiny models (32x32, 2 steps, guidance 1; warm pipelines)")
    tmp = Path(tempfile.mkdtemp())
    ad = make_tiny("animatediff", tmp / "ad")
    t2v = make_tiny("t2v", tmp / "t2v")
    engine = Engine(RunOptions(quiet=True, write=False))
    common = {"steps": 2, "guidance": 1.0, "seed": 0, "prompt": "a calm sea"}
    cases = [
        ("animatediff 8 frames", {"model": str(ad), "frames": 8}),
        ("animatediff 16 frames (FreeNoise 8/4)", {"model": str(ad), "frames": 16}),
        ("animatediff 8 frames prompt travel", {"model": str(ad), "frames": 8, "prompt_map": "0:a calm sea,5:a storm"}),
        ("animatediff 8 frames + interpolate 2", {"model": str(ad), "frames": 8, "interpolate": 2}),
        ("t2v (UNet3D) 8 frames", {"model": str(t2v), "frames": 8}),
    ]
    for model in (ad, t2v):  # load once, outside the timings
        engine.run("video", {**common, "model": str(model), "frames": 2, "steps": 1})
    base = None
    for label, params in cases:
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            result = engine.run("video", {**common, **params})[0]
            runs.append(time.perf_counter() - t0)
        dt = min(runs)
        fps = len(result.value) / dt
        base = base or fps
        print(f"   {label:<42}{len(result.value):>4} frames {dt:7.2f} s {fps:8.2f} frames/s ({fps / base:.2f}x the first row)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="interpolation only")
    args = parser.parse_args()
    interpolation_quality()
    interpolation_speed()
    if not args.quick:
        generation_speed()


if __name__ == "__main__":
    main()
