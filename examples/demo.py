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
import textwrap
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


def contact_sheet(paths: list[str], labels: list[str], dest: Path, scale: int = 4) -> str:
    """The images side by side, each enlarged `scale` times without smoothing (a 64 px image is
    small on a screen), with its prompt underneath: one PNG to look at."""
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB") for p in paths]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    side, pad, caption = max(t.width for t in tiles), 8, 28
    sheet = Image.new("RGB", (len(tiles) * (side + pad) + pad, side + 2 * pad + caption), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = pad + i * (side + pad)
        sheet.paste(tile, (x, pad))
        for j, line in enumerate(textwrap.wrap(label, max(10, side // 6))[:2]):
            draw.text((x, side + pad + 4 + 11 * j), line, fill=(0, 0, 0))
    from studio.outputs import atomic_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    final, n = dest, 0
    while final.exists():  # a second demo run adds sheet-1.png instead of replacing the first
        n += 1
        final = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    with atomic_path(final) as tmp:
        sheet.save(tmp, format="PNG")
    return str(final)


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
    # prompts as a person types them: the starter draws a white background when none is named
    prompts = ["a red circle",
               "A blue square on a white background",
               "draw a small green triangle at the top",
               "a large yellow circle on the left, purple background"]
    images = []
    for i, prompt in enumerate(prompts):
        line = studio("image", prompt, "--offline", "--seed", str(i), "--out", str(out / "images"), "--json", "--quiet")
        path = json.loads(line.splitlines()[0])["path"]
        images.append(path)
        written.append(path)
    written.append(contact_sheet(images, prompts, out / "images" / "sheet.png"))

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

    # 4. how well the image starter follows prompts (pixel checker on held-out prompts, 4 per phrasing family;
    # the model card has the 100-per-family numbers)
    report = json.loads(studio("eval", "image", "--model", "starter-image", "--n", "4", "--quiet"))
    families = ", ".join(f"{name} {f['prompt_following']:.0%}" for name, f in report["families"].items())
    print(f"starter-image prompt-following on {report['n']} held-out prompts: {families}; "
          f"position {report['position_accuracy']:.0%}, size {report['size_accuracy']:.0%}")

    print("\noutputs:")
    for path in written:
        print("  " + str(path))


if __name__ == "__main__":
    main()
