"""Training steps/s of `studio clip train` (pipelines/training/clip_train.train) against a plain
open_clip training loop on the same tiny model, data and batch, measured side by side in one run.

The plain loop is what the open_clip README shows: create_model_and_transforms, ClipLoss, AdamW
(torch's default implementation), a DataLoader over the same CSV with the same train transform.
Steady-state steps/s only: the first --warmup steps of every run are not timed (model creation,
first-batch allocation), nor is studio's final checkpoint. Runs alternate, median of --rounds.

    .venv/bin/python benchmarks/clip_train.py [--steps 30] [--batch-size 16] [--rounds 3] [--threads 1]

Goal: ratio (studio / plain) >= 1.0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_data(root: Path, n: int) -> Path:
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
    rows = [("filepath", "title")]
    for i in range(n):
        colour, shape = rng.choice(list(colours)), rng.choice(["circle", "square"])
        im = Image.new("RGB", (32, 32), "white")
        o = rng.randint(0, 8)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)([o, o, o + 22, o + 22],
                                                                                            fill=colours[colour])
        im.save(root / f"{i:04d}.png")
        rows.append((f"{i:04d}.png", f"a {colour} {shape}"))
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "pairs.csv"


def plain_open_clip(model_dir: Path, csv_path: Path, batch: int, steps: int, warmup: int, lr: float) -> float:
    """The README loop: steps/s after `warmup` steps."""
    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    rows = list(csv.DictReader(open(csv_path)))

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            image = Image.open(csv_path.parent / rows[i]["filepath"]).convert("RGB")
            return preprocess_train(image), tokenizer([rows[i]["title"]])[0]

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=batch, shuffle=True, drop_last=True)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    model.train()
    done, t0, c0 = 0, None, None
    while done < warmup + steps:
        for images, texts in loader:
            image_f, text_f, scale = model(images, texts)
            loss = loss_fn(image_f, text_f, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            done += 1
            if done == warmup:
                t0, c0 = time.perf_counter(), time.process_time()
            if done == warmup + steps:
                break
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def studio_train(model_dir: Path, csv_path: Path, out: Path, batch: int, steps: int, warmup: int, lr: float,
                 **extra) -> float:
    from studio.pipelines.training.clip_train import TrainConfig, train

    marks: dict[int, tuple[float, float]] = {}
    cfg = TrainConfig(data=str(csv_path), out=str(out), model=str(model_dir), steps=warmup + steps, batch_size=batch,
                      lr=lr, save_every=0, log_every=10**9, **extra)
    train(cfg, on_step=lambda step, m: marks.__setitem__(step, (time.perf_counter(), time.process_time())))
    (w0, c0), (w1, c1) = marks[warmup], marks[warmup + steps]
    return steps / (w1 - w0), steps / (c1 - c0)


def without_fused(run):
    """Ablation: studio's loop with torch's default (foreach) AdamW instead of the fused kernel."""
    import torch

    from studio.pipelines.training import clip_train

    original = clip_train.make_optimizer

    def foreach(model, cfg):
        return torch.optim.AdamW(clip_train.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    clip_train.make_optimizer = foreach
    try:
        return run()
    finally:
        clip_train.make_optimizer = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    import torch

    from studio.pipelines.tiny import make_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    model_dir = make_tiny("clip", tmp / "tiny", seed=0)
    (tmp / "data").mkdir()
    csv_path = make_data(tmp / "data", n=max(4 * args.batch_size, 64))
    variants = {
        "plain open_clip loop": lambda r: plain_open_clip(model_dir, csv_path, args.batch_size, args.steps, args.warmup, args.lr),
        "studio clip train": lambda r: studio_train(model_dir, csv_path, tmp / f"s{r}", args.batch_size, args.steps,
                                                    args.warmup, args.lr),
        "studio, torch's default AdamW": lambda r: without_fused(lambda: studio_train(
            model_dir, csv_path, tmp / f"f{r}", args.batch_size, args.steps, args.warmup, args.lr)),
        "studio, --hard-negatives 4": lambda r: studio_train(model_dir, csv_path, tmp / f"h{r}", args.batch_size,
                                                             args.steps, args.warmup, args.lr, hard_negatives=4),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            w, c = run(r)
            wall[name].append(w)
            cpu[name].append(c)
    print(f"tiny open_clip CLIP, batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.rounds} rounds (median), torch threads {torch.get_num_threads()}")
    print("  steps/s: wall clock, and per CPU-second of this process (steadier on a shared machine)")
    base_w, base_c = statistics.median(wall["plain open_clip loop"]), statistics.median(cpu["plain open_clip loop"])
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:32s} wall {w:6.2f} steps/s (x{w / base_w:.2f})   cpu {c:6.2f} steps/cpu-s (x{c / base_c:.2f})")
    ratio = statistics.median(wall["studio clip train"]) / base_w
    ratio_cpu = statistics.median(cpu["studio clip train"]) / base_c
    print(f"studio / plain = {ratio:.2f} wall, {ratio_cpu:.2f} cpu (goal >= 1.0)")


if __name__ == "__main__":
    main()
