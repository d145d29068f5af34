"""Shapes world: a deterministic synthetic dataset, and the deterministic pixel checker that
judges generated images against it.

Every starter model is trained on this world, so every sample is a pure function of
(seed, index): sample i of seed S is the same whether you ask for 10 samples or 10 000, on any
machine (numpy's PCG64 seeded with [S, i]; PIL draws without antialiasing so the pixels are
exact). Held-out splits are other seeds (training uses seed 0, evaluation seed 1 unless told).

A sample is one or two flat-coloured shapes (circle, square, triangle) on a flat background,
with
  - a caption:      "a small red circle on the left, blue background"
                    "a red circle and a large green square, white background" (two shapes)
  - the attributes:  shape, colour, size (small/large), position, background (as a dict)
  - control maps:    a mask (white inside any shape) and Canny edges (OpenCV, the same edge
                     detector the canny ControlNets are trained with)
  - VQA pairs:       ("what colour is the circle?", "red"), ("what shape is it?", "circle"), ...

The pixel checker (`judge`) finds the shape without any learned model: background = the median
border colour, foreground = pixels far from it, the largest connected component is the shape,
its colour is the nearest palette colour of its median pixel, its shape is the template
(circle / square / upward triangle fitted to its bounding box) with the highest IoU. On real
shapes-world images it is right every time (tests/test_starter.py checks 100% on 200 samples),
so whatever it scores on a generator's output is the generator's error.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# Colours far apart in RGB so the checker's nearest-colour rule has wide margins.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    **COLOURS,
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.13, "large": 0.24}  # half-extent as a fraction of the image side
POSITIONS = {  # centre as (x, y) fractions of the image side
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
NUMBERS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class Shape:
    shape: str  # circle | square | triangle
    colour: str  # a COLOURS name
    size: str  # small | large
    position: str  # a POSITIONS name
    cx: float  # centre x, fraction of the image side (position + jitter)
    cy: float  # centre y
    r: float  # half extent, fraction of the image side


@dataclass(frozen=True)
class Sample:
    seed: int  # the split's seed
    index: int  # index inside the split
    background: str  # a BACKGROUNDS name
    shapes: tuple[Shape, ...]  # one or two
    caption: str  # the text a generator is asked for / a captioner should say
    vqa: tuple[tuple[str, str], ...] = field(default=())  # (question, answer) pairs

    def attributes(self) -> dict[str, Any]:
        return {"background": self.background, "shapes": [asdict(s) for s in self.shapes]}


def caption_for(shapes: tuple[Shape, ...], background: str) -> str:
    """One shape: 'a small red circle on the left, blue background'; two: 'a red circle and a
    green square, white background' (positions/sizes left out so captions stay learnable)."""
    if len(shapes) == 1:
        s = shapes[0]
        where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom"}.get(s.position, f"on the {s.position}")
        return f"a {s.size} {s.colour} {s.shape} {where}, {background} background"
    parts = " and ".join(f"a {s.colour} {s.shape}" for s in shapes)
    return f"{parts}, {background} background"


def vqa_for(shapes: tuple[Shape, ...], background: str) -> tuple[tuple[str, str], ...]:
    pairs = [("what colour is the background?", background), ("how many shapes are there?", NUMBERS[len(shapes)])]
    for s in shapes:
        pairs.append((f"what colour is the {s.shape}?", s.colour))
        pairs.append((f"what shape is {s.colour}?", s.shape))
    if len(shapes) == 1:
        s = shapes[0]
        pairs += [("what shape is it?", s.shape), ("what colour is the shape?", s.colour),
                  (f"is the {s.shape} small or large?", s.size), (f"where is the {s.shape}?", s.position)]
    return tuple(pairs)


def sample(seed: int, index: int, *, two_shapes: float = 0.25) -> Sample:
    """Sample `index` of split `seed` (pure function of both). `two_shapes` is the share of
    two-shape samples (0 for the image starter, whose prompts name one shape)."""
    rng = np.random.default_rng([seed, index])
    n = 2 if rng.random() < two_shapes else 1
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [c for c in COLOURS if c != background]
    picked_colours = rng.choice(colours, size=n, replace=False)
    picked_shapes = rng.choice(SHAPES, size=n, replace=False)
    # two shapes sit on opposite sides so they never overlap
    positions = [str(rng.choice(list(POSITIONS)))] if n == 1 else list(
        [("left", "right"), ("top", "bottom")][int(rng.integers(2))][:: 1 if rng.random() < 0.5 else -1])
    shapes = []
    for i in range(n):
        size = str(rng.choice(list(SIZES))) if n == 1 else "small"
        px, py = POSITIONS[positions[i]]
        jitter = 0.05 if n == 1 else 0.03
        r = SIZES[size] * float(rng.uniform(0.9, 1.1))
        cx = float(np.clip(px + rng.uniform(-jitter, jitter), r + 0.02, 1 - r - 0.02))
        cy = float(np.clip(py + rng.uniform(-jitter, jitter), r + 0.02, 1 - r - 0.02))
        shapes.append(Shape(str(picked_shapes[i]), str(picked_colours[i]), size, positions[i], cx, cy, r))
    # reading order (left before right, top before bottom) so a two-shape caption has one right answer
    shapes_t = tuple(sorted(shapes, key=lambda s: ("left", "top", "center", "right", "bottom").index(s.position)))
    return Sample(seed, index, background, shapes_t, caption_for(shapes_t, background), vqa_for(shapes_t, background))


def samples(seed: int, n: int, *, start: int = 0, two_shapes: float = 0.25) -> Iterator[Sample]:
    for i in range(start, start + n):
        yield sample(seed, i, two_shapes=two_shapes)


def _polygon(s: Shape, size: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    cx, cy, r = s.cx * size, s.cy * size, s.r * size
    if s.shape == "triangle":  # upward isosceles triangle filling its bounding box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return (cx - r, cy - r, cx + r, cy + r)


def render(s: Sample, size: int = 64) -> tuple[Any, Any]:
    """(RGB image, mask) as PIL images; no antialiasing, so pixels are exact."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[s.background])
    mask = Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for shape in s.shapes:
        geom = _polygon(shape, size)
        for d, fill in ((draw, COLOURS[shape.colour]), (mdraw, 255)):
            if shape.shape == "circle":
                d.ellipse(geom, fill=fill)
            elif shape.shape == "square":
                d.rectangle(geom, fill=fill)
            else:
                d.polygon(geom, fill=fill)
    return image, mask


def edges(image: Any) -> Any:
    """Canny edges (white on black) as a PIL 'L' image."""
    import cv2
    from PIL import Image

    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    return Image.fromarray(cv2.Canny(grey, 50, 150))


def write_dataset(out: Path, *, n: int, size: int = 64, seed: int = 0, two_shapes: float = 0.25,
                  progress: Any = None) -> dict[str, Any]:
    """Write images/ (each PNG with its caption beside it as .txt), masks/, edges/, metadata.jsonl (Hugging Face imagefolder layout: one JSON
    line per image with file_name and text), pairs.csv (filepath,caption for `studio clip
    train`) and vqa.jsonl. Every file goes through atomic_path: a stopped run leaves no half file."""
    import csv
    import io

    from studio.outputs import atomic_path

    out = Path(out)
    for sub in ("images", "masks", "edges"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta_lines, vqa_lines = [], []
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf)
    writer.writerow(["filepath", "caption"])
    handle = progress.task("shapes", total=n) if progress is not None else None
    for s in samples(seed, n, two_shapes=two_shapes):
        name = f"{s.index:06d}.png"
        image, mask = render(s, size)
        for sub, img in (("images", image), ("masks", mask), ("edges", edges(image))):
            with atomic_path(out / sub / name) as tmp:
                img.save(tmp, format="PNG")
        with atomic_path(out / "images" / f"{s.index:06d}.txt") as tmp:  # what `studio eval caption` reads
            Path(tmp).write_text(s.caption + "\n")
        meta_lines.append(json.dumps({"file_name": f"images/{name}", "text": s.caption,
                                      "mask": f"masks/{name}", "edges": f"edges/{name}",
                                      "seed": s.seed, "index": s.index, **s.attributes()}))
        for q, a in s.vqa:
            vqa_lines.append(json.dumps({"file_name": f"images/{name}", "question": q, "answer": a}))
        writer.writerow([f"images/{name}", s.caption])
        if handle is not None:
            handle.advance()
    for fname, text in (("metadata.jsonl", "\n".join(meta_lines) + "\n"),
                        ("vqa.jsonl", "\n".join(vqa_lines) + "\n"), ("pairs.csv", csv_buf.getvalue())):
        with atomic_path(out / fname) as tmp:
            Path(tmp).write_text(text)
    return {"out": str(out), "n": n, "size": size, "seed": seed, "vqa_pairs": len(vqa_lines)}


# ----------------------------------------------------------------------------- the pixel checker
def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = ((np.asarray([palette[c] for c in names], dtype=np.float32) - rgb[None]) ** 2).sum(1)
    return names[int(d.argmin())]


def _template(shape: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx + 0.5) / w, (yy + 0.5) / h  # 0..1 inside the bounding box
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((h, w), bool)
    return np.abs(u - 0.5) <= v / 2  # apex at the top centre, base along the bottom


@dataclass(frozen=True)
class Judgement:
    colour: str | None  # detected colour of the largest shape (None: no shape found)
    shape: str | None  # detected shape
    background: str  # detected background colour
    area: float  # shape area as a fraction of the image
    scores: dict[str, float]  # template IoU per shape
    position: str | None = None  # the POSITIONS name nearest the shape's bounding-box centre
    size: str | None = None  # small | large, from the bounding box's half extent (SIZES: 0.13 / 0.24)


def foreground(image: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels as float HxWx3, background RGB = the median border colour, boolean mask of the
    pixels far from it): how the checker separates a shape from its background (a generator's
    background is not perfectly flat)."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_rgb = np.median(border, axis=0)
    return arr, bg_rgb, np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > 60


def judge(image: Any) -> Judgement:
    """Detect the largest shape of an image (PIL or HxWx3 uint8) without any learned model."""
    import cv2

    arr, bg_rgb, fg_bool = foreground(image)
    h, w, _ = arr.shape
    background = _nearest(bg_rgb, BACKGROUNDS)
    fg = fg_bool.astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=4)
    if count <= 1:
        return Judgement(None, None, background, 0.0, {})
    best = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    x, y, bw, bh, area = (int(v) for v in stats[best][:5])
    if area < 0.005 * h * w:
        return Judgement(None, None, background, area / (h * w), {})
    comp = labels[y:y + bh, x:x + bw] == best
    colour = _nearest(np.median(arr[labels == best], axis=0), COLOURS)
    scores = {}
    for name in SHAPES:
        t = _template(name, bh, bw)
        scores[name] = float((t & comp).sum() / max(1, (t | comp).sum()))
    shape = max(scores, key=scores.get)
    # place and size from the shape's own pixels: the bounding-box centre's nearest named place
    # (training centres jitter by 0.05 around places 0.23 apart) and the half extent, whose two
    # classes (0.13 and 0.24 of the side, +-10%) split at their midpoint
    cx, cy = (x + bw / 2) / w, (y + bh / 2) / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    size = "large" if max(bw / w, bh / h) / 2 > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return Judgement(colour, shape, background, area / (h * w), scores, position, size)


def prompt_following(images: list[Any], targets: list[Sample]) -> dict[str, Any]:
    """Share of images whose detected colour and shape equal the prompt's (first) shape."""
    colour_ok = shape_ok = both = 0
    rows = []
    for image, s in zip(images, targets):
        j = judge(image)
        want = s.shapes[0]
        c, sh = j.colour == want.colour, j.shape == want.shape
        colour_ok += c
        shape_ok += sh
        both += c and sh
        rows.append({"prompt": s.caption, "colour": j.colour, "shape": j.shape, "ok": bool(c and sh)})
    n = max(1, len(targets))
    return {"n": len(targets), "prompt_following": both / n, "colour_accuracy": colour_ok / n,
            "shape_accuracy": shape_ok / n, "samples": rows}


# ----------------------------------------------------------------------------- prompts as people write them
# The image starter is trained on, and judged by, prompts phrased the way people type them, not
# only the canonical caption: attributes left out (the image then draws them at random, and the
# background WHITE, which is what "a red circle" means to a person), other word orders,
# "color"/"colour", capitals, filler words, no article. Families (what `studio eval image` reports):
#   template     the canonical caption                      "a small red circle on the left, blue background"
#   short        colour + shape (+ maybe a background)      "a red circle", "Draw a blue square on a white background"
#   paraphrase   colour + shape, any other attribute, any training phrasing   "A picture of a big circle in red, centered"
#   colour-only  the colour, no shape                       "something red", "a small red shape at the top"
#   shape-only   the shape, no colour                       "a triangle", "draw a big square on a black background"
#   held-out     colour + shape in frames and filler words never used in training ("could you draw ...?")
# Held-out frames and their filler words are kept out of training, and out of the image
# tokenizer's vocabulary (tests/test_starter.py checks both), so their score says whether the model
# follows a request phrased another way rather than a memorised template.
FAMILIES = ("template", "short", "paraphrase", "colour-only", "shape-only", "held-out")
TRAINING_MIX = {"template": 0.2, "short": 0.2, "paraphrase": 0.4, "colour-only": 0.1, "shape-only": 0.1}

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "center": ("in the center", "in the centre", "in the middle", "centered", "centred", "in the center of the image"),
    "left": ("on the left", "on the left side", "to the left", "at the left", "on the left of the image"),
    "right": ("on the right", "on the right side", "to the right", "at the right", "on the right of the image"),
    "top": ("at the top", "on the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom", "at the bottom of the image"),
}
BACKGROUND_FORMS = ("{bg} background", "on a {bg} background", "with a {bg} background", "on {bg}",
                    "against a {bg} background", "on a {bg} backdrop", "in front of a {bg} background", "background {bg}")
COLOUR_FORMS = ("{size} {colour} {shape}", "{size} {colour} {shape}", "{size} {colour} {shape}", "{colour} {size} {shape}",
                "{size} {shape} in {colour}", "{size} {colour} {cw} {shape}", "{size} {colour}-{cw} {shape}",
                "{size} {shape} {cw} {colour}", "{size} {shape} that is {colour}", "{size} {colour} {shape} shape",
                "{size} {shape} of {colour} {cwn}")
NO_SHAPE_NOUNS = ("shape", "object", "thing", "form")
PREFIXES = ("", "", "", "", "", "a picture of ", "an image of ", "a drawing of ", "a photo of ", "please draw ",
            "draw ", "draw me ", "make ", "create ", "paint ", "show ", "show me ", "i want ", "give me ")
ARTICLES = ("a", "a", "a", "a", "one", "the", "")
# one-word fillers kept OUT of the tokenizer's vocabulary: the model learns that a word it does not
# know (split into characters by the BPE) changes nothing, which is what a held-out word is
JUNK = ("nice", "cute", "lovely", "cool", "neat", "pretty", "clean", "flat", "basic", "solid", "bright", "perfect",
        "single", "proper", "good")
HELDOUT_FRAMES = ("could you draw {np}{rest}?", "i would like {np}{rest}", "generate {np}{rest}", "render {np}{rest}",
                  "{np}{rest}, thanks", "there should be {np}{rest}", "an illustration showing {np}{rest}",
                  "sketch {np}{rest}", "my prompt: {np}{rest}", "{np}{rest} please")
_PREPOSITIONS = {"on", "at", "in", "to", "near", "with", "against", "centered", "centred"}
HELDOUT_WORDS = frozenset({"could", "you", "would", "like", "generate", "render", "thanks", "there", "should", "be",
                           "illustration", "showing", "sketch", "my", "prompt"})


@dataclass(frozen=True)
class Prompt:
    text: str  # what the user types
    family: str  # a FAMILIES name
    target: Sample  # an image that answers it: unnamed attributes at random, the background white unless named
    named: tuple[str, ...]  # what the text names, of: colour, shape, size, position, background


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


def _article(rng: np.random.Generator, following: str) -> str:
    art = _pick(rng, ARTICLES)
    if art == "a" and following[:1] in "aeiou":
        art = "an"
    return f"{art} {following}" if art else following


def _noun(rng: np.random.Generator, colour: str | None, shape: str | None, size: str | None, junk: bool) -> str:
    """The noun phrase, article included: 'a small red circle', 'big circle in red', 'something red'."""
    size_w = _pick(rng, SIZE_WORDS[size]) if size else ""
    spelled = _pick(rng, ("color", "colour"))
    if colour and not shape and not size and rng.random() < 0.25:
        return f"something {colour}"
    if colour is None:
        body = f"{size_w} {shape}"
    elif shape is None:
        body = f"{size_w} {colour} {_pick(rng, NO_SHAPE_NOUNS)}"
    else:
        form = _pick(rng, COLOUR_FORMS)
        body = form.format(size=size_w, colour=colour, shape=shape, cw=spelled + "ed", cwn=spelled)
    if junk:
        body = f"{_pick(rng, JUNK)} {body}"
    return _article(rng, " ".join(body.split()))


def _style(rng: np.random.Generator, text: str) -> str:
    """Capitals and end punctuation as people type them (the CLIP tokenizer lower-cases anyway)."""
    r = rng.random()
    if r < 0.2:
        text = text[:1].upper() + text[1:]
    elif r < 0.3:
        text = text.title()
    elif r < 0.35:
        text = text.upper()
    if not text.endswith("?"):
        text += _pick(rng, ("", "", "", "", ".", "!"))
    return text


def prompt(seed: int, index: int, family: str) -> Prompt:
    """Prompt `index` of family `family` in split `seed` (a pure function of the three, like
    sample()): the attributes, which of them the text names, and the text."""
    if family not in FAMILIES:
        raise ValueError(f"unknown prompt family {family!r}")
    rng = np.random.default_rng([seed, index, FAMILIES.index(family), 19])
    shape, colour = str(_pick(rng, SHAPES)), str(_pick(rng, list(COLOURS)))
    size, position = str(_pick(rng, list(SIZES))), str(_pick(rng, list(POSITIONS)))
    background = str(_pick(rng, [b for b in BACKGROUNDS if b != colour]))
    if family == "template":
        named = {"colour", "shape", "size", "position", "background"}
    else:
        # how often each attribute is named: colour, shape, size, position, background. Places are named
        # often: where a shape goes is the hardest thing for the model to learn from words
        keep = {"short": (1, 1, 0, 0, 0.3), "paraphrase": (1, 1, 0.5, 0.7, 0.5), "colour-only": (1, 0, 0.4, 0.5, 0.3),
                "shape-only": (0, 1, 0.4, 0.5, 0.3), "held-out": (1, 1, 0.4, 0.5, 0.4)}[family]
        draws = rng.random(5)
        named = {a for a, p, d in zip(("colour", "shape", "size", "position", "background"), keep, draws) if d < p}
    if "background" not in named:
        background = "white"
    jitter = rng.uniform(-0.05, 0.05, 2)
    r = SIZES[size] * float(rng.uniform(0.9, 1.1))
    px, py = POSITIONS[position]
    cx = float(np.clip(px + jitter[0], r + 0.02, 1 - r - 0.02))
    cy = float(np.clip(py + jitter[1], r + 0.02, 1 - r - 0.02))
    target_shape = Shape(shape, colour, size, position, cx, cy, r)
    if family == "template":
        text = caption_for((target_shape,), background)
    else:
        np_ = _noun(rng, colour if "colour" in named else None, shape if "shape" in named else None,
                    size if "size" in named else None, junk=family != "held-out" and rng.random() < 0.1)
        bg_word = "grey" if background == "gray" and rng.random() < 0.5 else background
        tail = []
        if "position" in named:
            tail.append(_pick(rng, POSITION_WORDS[position]))
        if "background" in named:
            tail.append(_pick(rng, BACKGROUND_FORMS).format(bg=bg_word))
        if len(tail) == 2 and rng.random() < 0.5:
            tail.reverse()
        # a place or "on a ... background" may follow the noun directly; "blue background" after a comma
        rest = "".join((_pick(rng, (" ", ", ", ", ")) if part.split()[0] in _PREPOSITIONS else ", ") + part
                       for part in tail)
        if family == "held-out":
            text = _pick(rng, HELDOUT_FRAMES).format(np=np_, rest=rest)
        elif family == "short":
            text = _pick(rng, ("", "", "", "draw ", "please draw ", "a picture of ")) + np_ + rest
        elif tail and rng.random() < 0.15:  # the place or background first: "on the left, a red circle"
            text = rest.lstrip(", ") + ", " + _pick(rng, PREFIXES) + np_
        else:
            text = _pick(rng, PREFIXES) + np_ + rest
        text = _style(rng, re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text))  # "a orange" -> "an orange"
    target = Sample(seed, index, background, (target_shape,), text)
    order = ("colour", "shape", "size", "position", "background")
    return Prompt(text, family, target, tuple(a for a in order if a in named))


def training_prompt(seed: int, index: int) -> Prompt:
    """Training example `index` of split `seed`: a family drawn by TRAINING_MIX (never held-out)."""
    u = float(np.random.default_rng([seed, index, 23]).random())
    for family, share in TRAINING_MIX.items():
        if u < share:
            return prompt(seed, index, family)
        u -= share
    return prompt(seed, index, "paraphrase")


def training_prompts(seed: int, n: int, *, unplaced_keep: float = 1.0) -> list[Prompt]:
    """n training prompts of split `seed`: training_prompt(seed, i) in order, where a prompt that
    names no place is kept with probability `unplaced_keep` (a pure function of seed and i)."""
    if not 0 < unplaced_keep <= 1:
        raise ValueError(f"unplaced_keep must be in (0, 1], not {unplaced_keep}")
    out: list[Prompt] = []
    index = 0
    while len(out) < n:
        p = training_prompt(seed, index)
        if unplaced_keep == 1 or "position" in p.named or np.random.default_rng([seed, index, 29]).random() < unplaced_keep:
            out.append(p)
        index += 1
    return out


def eval_prompts(seed: int, n: int, families: tuple[str, ...] = FAMILIES) -> list[Prompt]:
    """n prompts of each family of split `seed` (1 = held out)."""
    return [prompt(seed, i, f) for f in families for i in range(n)]


def prompt_words() -> list[str]:
    """Every word the training prompts use (the image tokenizer makes each one token); JUNK and
    the held-out frames' words stay out."""
    tables = [*SIZE_WORDS.values(), *POSITION_WORDS.values(), BACKGROUND_FORMS, COLOUR_FORMS, NO_SHAPE_NOUNS,
              PREFIXES, ARTICLES, ("something an grey color colour colored coloured draw please picture background",),
              SHAPES, tuple(COLOURS), tuple(BACKGROUNDS), ("on the left at the top at the bottom in the center",)]
    words = {w for table in tables for phrase in table for w in re.findall(r"[a-z]+", phrase.lower())}
    return sorted(words - {"bg", "size", "colour", "shape", "cw", "cwn"} | {"colour", "shape"})


def follows(image: Any, p: Prompt) -> dict[str, Any]:
    """The pixel checker's verdict on one image for one prompt: each named attribute, the
    background (the named one, else white), and `ok`: colour, shape and background all right.
    Position and size are judged only where the prompt names them (None otherwise)."""
    j = judge(image)
    want = p.target.shapes[0]
    row = {"prompt": p.text, "family": p.family, "colour": j.colour, "shape": j.shape, "background": j.background,
           "position": j.position, "size": j.size}
    checks = {"colour_ok": j.colour == want.colour if "colour" in p.named else None,
              "shape_ok": j.shape == want.shape if "shape" in p.named else None,
              "background_ok": j.background == p.target.background,
              "position_ok": j.position == want.position if "position" in p.named else None,
              "size_ok": j.size == want.size if "size" in p.named else None}
    found = j.shape is not None
    ok = found and all(checks[k] is not False for k in ("colour_ok", "shape_ok", "background_ok"))
    return {**row, **checks, "ok": ok}


def follow_report(images: list[Any], prompts: list[Prompt]) -> dict[str, Any]:
    """Prompt-following per family and its minimum; colour/shape/background/position/size
    accuracy over the prompts that name each; every verdict in `samples`."""
    rows = [follows(image, p) for image, p in zip(images, prompts)]

    def share(rs: list[dict], key: str) -> float | None:
        judged = [r[key] for r in rs if r[key] is not None]
        return round(sum(judged) / len(judged), 4) if judged else None

    families = {}
    for f in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == f]
        families[f] = {"n": len(rs), "prompt_following": share(rs, "ok"),
                       **{k: share(rs, k + "_ok") for k in ("colour", "shape", "background", "position", "size")}}
    following = [v["prompt_following"] for v in families.values()]
    return {"n": len(rows), "min_prompt_following": min(following) if following else None,
            "prompt_following": share(rows, "ok"),
            "position_accuracy": share(rows, "position_ok"), "size_accuracy": share(rows, "size_ok"),
            "colour_accuracy": share(rows, "colour_ok"), "shape_accuracy": share(rows, "shape_ok"),
            "background_accuracy": share(rows, "background_ok"), "families": families, "samples": rows}
