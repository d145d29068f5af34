"""`make demo`: studio end to end, offline, on the starter models that ship with it.

Each step is a plain `studio ...` command (printed before it runs), so every line here can be
copied into a shell. The starters are small models studio trained itself on its synthetic
shapes world (`studio data shapes`) and on data that ships in installed packages; their model
cards (`studio models info starter-image`) say how, and how well they do.

    HF_HUB_OFFLINE=1 python examples/demo.py [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def studio(*args: str) -> str:
    """Run one studio command the way a user would; stop the demo if it fails."""
    cmd = [sys.executable, "-m", "studio", *args]
    print("$ studio " + " ".join(shlex.quote(a) for a in args), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed (exit {done.returncode}): studio {' '.join(args)}")
    return done.stdout


def shipped(name: str) -> bool:
    return (ROOT / "presets" / "starter" / name).is_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="where the outputs go")
    out = Path(parser.parse_args().out)
    if not out.is_absolute():
        out = ROOT / out
    written: list[str] = []

    # 1. text to image: `auto` picks sd-turbo when its weights are cached, else starter-image (with a notice)
    prompts = ["a large red circle in the center, blue background",
               "a small yellow triangle on the left, purple background",
               "a large green square at the top, white background"]
    images = []
    for i, prompt in enumerate(prompts):
        line = studio("image", prompt, "--offline", "--seed", str(i), "--out", str(out / "images"), "--json", "--quiet")
        path = json.loads(line.splitlines()[0])["path"]
        images.append(path)
        written.append(path)

    # 2. a few held-out shapes-world images (seed 1), captioned and questioned by the starters
    shapes = out / "shapes"
    if not shapes.exists():
        studio("data", "shapes", "--n", "4", "--seed", "1", "--out", str(shapes), "--quiet")
    first = str(shapes / "images" / "000000.png")
    written.append(first)
    print("reference caption: " + (shapes / "images" / "000000.txt").read_text().strip())
    if shipped("caption"):
        print(studio("caption", first, "--model", "starter-caption", "--quiet").strip())
    if shipped("vqa"):
        print(studio("vqa", first, "what shape is it?", "what colour is the background?",
                     "--model", "starter-vqa", "--quiet").strip())

    # 2b. the mask ControlNet: the same prompt drawn inside a held-out mask (shape and place from the mask)
    if shipped("control"):
        mask = shapes / "masks" / "000000.png"
        target = (shapes / "images" / "000000.txt").read_text().strip()
        line = studio("image", target, "--model", "starter-image", "--control", f"raw:{mask}",
                      "--control-model", "starter-control", "--seed", "0", "--out", str(out / "control"),
                      "--json", "--quiet")
        written.append(json.loads(line.splitlines()[0])["path"])

    # 3. a short Bach-like chorale in C major from the symbolic music starter
    if shipped("midi"):
        line = studio("music", "midi", "--model", "starter-midi", "--bars", "4", "--key", "C:major", "--seed", "1",
                      "--out", str(out / "music"), "--json", "--quiet")
        written += [json.loads(x)["path"] for x in line.splitlines() if x.startswith("{")]

    # 4. how well the image starter follows prompts (pixel checker on held-out prompts)
    report = json.loads(studio("eval", "image", "--model", "starter-image", "--n", "12", "--quiet"))
    print(f"starter-image prompt-following on 12 held-out prompts: {report['prompt_following']:.0%} "
          f"(colour {report['colour_accuracy']:.0%}, shape {report['shape_accuracy']:.0%})")

    print("\noutputs:")
    for path in written:
        print("  " + str(path))


if __name__ == "__main__":
    main()
