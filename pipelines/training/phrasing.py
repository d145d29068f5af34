"""How people phrase questions about, and descriptions of, a shapes-world image: the question
families the VQA starter is trained and judged on, and the caption templates the CLIP starter is
trained and judged on.

Every family has TRAINING phrasings and HELD-OUT phrasings; the held-out ones are never used in
training (tests/test_starter_seeing.py checks the two sets are disjoint), so a score on them says
whether a model follows a request phrased another way, not whether it memorised a template. Both
also vary the surface the way people type: capitals, no question mark, filler words before and
after. Held-out filler words are kept out of training altogether (they reach BLIP's closed
vocabulary as [UNK], and CLIP's text tower as token embeddings it never trained).

Everything is a pure function of (seed, index), like shapes.py: the same split gives the same
questions on any machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from studio.pipelines.training import shapes as S

# ----------------------------------------------------------------------------- VQA question families
# {cw}: "colour" or "color" (both in training); {shape}/{shapes}: a shape name, singular/plural;
# {colour}: a colour name. Families and what they ask:
#   colour      the colour of the one shape               -> a colour
#   shape       the one shape's kind                      -> circle | square | triangle
#   count       how many shapes                           -> one | two
#   exists      is there a SHAPE / a COLOUR shape          -> yes | no
#   size        how big the one shape is                  -> small | large
#   position    where the one shape is                    -> left | right | top | bottom | center
#   background  the background colour                     -> a background colour
#   binding     colour of the named shape / shape of the named colour (also two-shape images)
VQA_TRAIN: dict[str, tuple[str, ...]] = {
    "colour": ("what {cw} is the shape?", "what {cw} is it?", "what is the {cw} of the shape?", "which {cw} is the shape?",
               "what {cw} is the object?", "tell me the {cw} of the shape", "the shape is what {cw}?",
               "{cw} of the shape?", "what {cw} does the shape have?", "what is its {cw}?", "what {cw} is this shape?",
               "which {cw} is it?", "what's the {cw}?", "what {cw} do you see?", "{cw}?"),
    "shape": ("what shape is it?", "what shape is this?", "which shape is it?", "what is the shape?",
              "what kind of shape is it?", "what shape do you see?", "name the shape", "what shape is in the image?",
              "which shape is this?", "what's the shape?", "what type of shape is this?", "what object is it?",
              "shape?", "which shape do you see?", "what shape is shown in the image?"),
    "count": ("how many shapes are there?", "how many shapes?", "how many objects are there?",
              "how many shapes are in the image?", "count the shapes", "how many shapes do you see?",
              "number of shapes?", "how many things are there?", "how many objects?", "how many shapes are in this image?"),
    "exists": ("is there a {shape}?", "is there a {shape} in the image?", "do you see a {shape}?",
               "does the image have a {shape}?", "are there any {shapes}?", "is a {shape} there?",
               "can you see a {shape}?", "is there a {colour} shape?", "do you see anything {colour}?",
               "is there a {colour} object in the image?", "any {shapes} in the image?", "is there a {colour} {shape}?",
               "is there one {shape}?", "do you see any {shapes}?", "is any shape {colour}?", "is something {colour}?",
               "is there a {shape} or not?", "does it have a {shape}?", "is there a {colour} thing?",
               "are any shapes {colour}?", "does the image show a {shape}?", "is one of the shapes {colour}?"),
    "size": ("is the {shape} small or large?", "is it small or large?", "is the shape big or small?",
             "how big is the {shape}?", "what size is the shape?", "what size is the {shape}?",
             "is the {shape} large or small?", "how large is the shape?", "size of the shape?", "is it big or small?",
             "how big is the shape?", "what size?", "is it a small or a large shape?", "how big?", "size?",
             "is the {shape} big or small?", "how big is this shape?", "what size is this?"),
    "position": ("where is the {shape}?", "where is it?", "where is the shape?", "which side is the {shape} on?",
                 "where is the {shape} located?", "in which part of the image is the shape?", "where is the {shape} placed?",
                 "what is the position of the shape?", "where in the image is it?", "position of the {shape}?"),
    "background": ("what {cw} is the background?", "what is the background {cw}?", "which {cw} is the background?",
                   "background {cw}?", "what is the {cw} of the background?", "what {cw} is behind the shape?",
                   "what {cw} is the background of the image?", "the background is what {cw}?"),
    "binding": ("what {cw} is the {shape}?", "what is the {cw} of the {shape}?", "which {cw} is the {shape}?",
                "the {shape} is what {cw}?", "what shape is {colour}?", "which shape is {colour}?",
                "what is the {colour} shape?", "which one is {colour}?", "what {cw} does the {shape} have?",
                "what kind of shape is {colour}?", "the {shape} has what {cw}?", "{cw} of the {shape}?",
                "which shape is the {colour} one?", "what shape is the {colour} one?", "which shape is colored {colour}?",
                "what shape is coloured {colour}?", "what shape has {colour} as its {cw}?", "the {colour} shape is what?",
                # a "colour"/"color" in the question, a shape as the answer: with only the one above, the
                # model answered every question holding the word with a colour ("which shape has the color
                # purple?" -> "purple": 3 of 35 held-out ones right)
                "what is the shape whose {cw} is {colour}?", "which shape is {colour} in {cw}?",
                "what shape is the one with the {colour} {cw}?", "which of the shapes is {colour} in {cw}?",
                "the shape with {colour} as its {cw} is what?", "what shape shows the {cw} {colour}?"),
}
VQA_HELDOUT: dict[str, tuple[str, ...]] = {
    "colour": ("what's the {cw} of the shape?", "which {cw} does it have?", "what {cw} is shown?",
               "can you tell me the {cw} of the object?", "what {cw} is the thing?", "the {cw} of the shape is?",
               "what {cw} has the shape?", "name the {cw} of the shape", "what {cw} is this?"),
    "shape": ("which shape is shown?", "what shape is in the picture?", "what sort of shape is it?", "tell me the shape",
              "what shape can you see?", "what is this shape called?", "identify the shape", "what kind of object is shown?"),
    "count": ("how many shapes can you see?", "how many objects are in the picture?", "what is the number of shapes?",
              "how many shapes are shown?", "count the objects", "how many are there?", "shapes: how many?"),
    "exists": ("is there any {shape}?", "is there a {shape} here?", "does the picture contain a {shape}?",
               "do you spot a {shape}?", "is a {shape} visible?", "any {shapes}?", "is there a {shape} anywhere?",
               "is anything {colour}?", "can you see something {colour}?"),
    "size": ("what is the size of the {shape}?", "is it large or small?", "how big is it?", "is the shape small or big?",
             "what size is it?", "small or large?", "how large is it?"),
    "position": ("where's the {shape}?", "where is the object?", "where can the {shape} be found?",
                 "where does the shape sit?", "what position is the {shape} in?", "in what part of the picture is it?",
                 "where in the image is the {shape}?"),
    "background": ("what's the background {cw}?", "tell me the background {cw}", "which {cw} is behind the shape?",
                   "what {cw} is the image background?", "what is the {cw} behind it?", "background is which {cw}?"),
    "binding": ("what's the {cw} of the {shape}?", "tell me the {cw} of the {shape}", "which {cw} has the {shape}?",
                "which shape has the {cw} {colour}?", "name the {colour} shape", "what is the shape that is {colour}?",
                "the {colour} one is which shape?"),
}
# fillers before / after a question; the held-out ones use words training never shows
VQA_PREFIX_TRAIN = ("", "", "", "", "please", "tell me,", "hey,", "in this image,", "q:", "question:", "can you tell me",
                    "so", "ok,", "look,")
VQA_SUFFIX_TRAIN = ("", "", "", "", "please", "in the image", "in this picture", "exactly", "now")
VQA_PREFIX_HELDOUT = ("", "", "quick question:", "i wonder,", "kindly", "hmm,", "excuse me,")
VQA_SUFFIX_HELDOUT = ("", "", "here", "thanks", "in the photo", "right now")
VQA_FAMILIES = tuple(VQA_TRAIN)
ANSWER_SYNONYMS = {"grey": "gray", "1": "one", "2": "two", "centre": "center", "middle": "center", "big": "large",
                   "y": "yes", "n": "no"}


def _style(text: str, rng: np.random.Generator) -> str:
    """How people type: capitals sometimes, the question mark often left out."""
    if rng.random() < 0.4:
        text = text.rstrip("?").rstrip()
    r = rng.random()
    if r < 0.2:
        text = text[:1].upper() + text[1:]
    elif r < 0.3:
        text = text.title()
    elif r < 0.35:
        text = text.upper()
    return text


def _fill(template: str, rng: np.random.Generator, **slots: str) -> str:
    cw = "colour" if rng.random() < 0.5 else "color"
    shape = slots.get("shape", "")
    return template.format(cw=cw, shape=shape, shapes=shape + "s", colour=slots.get("colour", ""))


@dataclass(frozen=True)
class Question:
    family: str  # a VQA_FAMILIES name
    question: str  # as a person might type it
    answer: str  # the one right answer (a shapes-world word)
    template: str  # the template it came from


def _questions_for(s: S.Sample, family: str, rng: np.random.Generator, heldout: bool) -> list[Question]:
    """The questions of one family that fit sample `s` (none where the family does not apply,
    e.g. `size` on a two-shape image), each with a random phrasing of the split."""
    bank = (VQA_HELDOUT if heldout else VQA_TRAIN)[family]
    prefixes = VQA_PREFIX_HELDOUT if heldout else VQA_PREFIX_TRAIN
    suffixes = VQA_SUFFIX_HELDOUT if heldout else VQA_SUFFIX_TRAIN
    one = s.shapes[0]
    single = len(s.shapes) == 1
    shown_shapes = {x.shape for x in s.shapes}
    shown_colours = {x.colour for x in s.shapes}

    def pick(filter_fn=lambda t: True) -> str:
        options = [t for t in bank if filter_fn(t)]
        return options[int(rng.integers(len(options)))]

    asks: list[tuple[str, str, dict]] = []  # (template, answer, slots)
    if family in ("colour", "shape", "size", "position") and not single:
        return []
    if family == "colour":
        asks.append((pick(), one.colour, {}))
    elif family == "shape":
        asks.append((pick(), one.shape, {}))
    elif family == "count":
        asks.append((pick(), S.NUMBERS[len(s.shapes)], {}))
    elif family == "size":
        asks.append((pick(), one.size, {"shape": one.shape}))
    elif family == "position":
        asks.append((pick(), one.position, {"shape": one.shape}))
    elif family == "background":
        asks.append((pick(), s.background, {}))
    elif family == "exists":
        # one about a shape, one about a colour; half of each asks for something not there
        shape = str(rng.choice(S.SHAPES))
        asks.append((pick(lambda t: "{shape" in t and "{colour}" not in t), "yes" if shape in shown_shapes else "no", {"shape": shape}))
        colour = str(rng.choice([c for c in S.COLOURS if c != s.background]))
        if rng.random() < 0.5:  # colours: most are absent, so ask for a present one half the time
            colour = s.shapes[int(rng.integers(len(s.shapes)))].colour
        template = pick(lambda t: "{colour}" in t)
        if "{shape}" in template:  # "is there a red circle?": both must match one shape
            shape2 = str(rng.choice(S.SHAPES))
            answer = "yes" if any(x.shape == shape2 and x.colour == colour for x in s.shapes) else "no"
            asks.append((template, answer, {"colour": colour, "shape": shape2}))
        else:
            asks.append((template, "yes" if colour in shown_colours else "no", {"colour": colour}))
    elif family == "binding":
        target = s.shapes[int(rng.integers(len(s.shapes)))]
        asks.append((pick(lambda t: "{shape}" in t), target.colour, {"shape": target.shape}))
        target = s.shapes[int(rng.integers(len(s.shapes)))]
        asks.append((pick(lambda t: "{colour}" in t), target.shape, {"colour": target.colour}))
    out = []
    for template, answer, slots in asks:
        text = _fill(template, rng, **slots)
        prefix, suffix = str(rng.choice(prefixes)), str(rng.choice(suffixes))
        if suffix:
            mark = text.endswith("?")
            text = text.rstrip("?") + " " + suffix + ("?" if mark else "")
        text = (prefix + " " + text).strip()
        out.append(Question(family, _style(text, rng), answer, template))
    return out


def vqa_questions(s: S.Sample, *, heldout: bool, families: Sequence[str] = VQA_FAMILIES, draw: int = 0) -> list[Question]:
    """Questions about sample `s` phrased the training way or the held-out way: a pure function of
    the sample's (seed, index), `heldout` and `draw` (training takes several draws per image)."""
    rng = np.random.default_rng([s.seed, s.index, 7 + int(heldout), draw])
    out: list[Question] = []
    for family in families:
        out += _questions_for(s, family, rng, heldout)
    return out


def canonical_questions(s: S.Sample) -> list[Question]:
    """shapes.py's own questions (the first starter-vqa's only phrasing), as the `template` family."""
    return [Question("template", q, a, q) for q, a in s.vqa]


def normalise_answer(text: str) -> str:
    """Lowercase first word without punctuation, synonyms folded ('grey' -> 'gray', '2' -> 'two')."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    word = words[0]
    return ANSWER_SYNONYMS.get(word, word)


def vqa_training_words() -> list[str]:
    """Every word a training question can hold (the VQA starter's vocabulary adds these to the
    shapes-world words), found by filling every training template and filler."""
    words: set[str] = set()
    fills = [dict(cw=cw, shape=sh, shapes=sh + "s", colour=c) for cw in ("colour", "color") for sh in S.SHAPES
             for c in S.COLOURS]
    for bank in VQA_TRAIN.values():
        for template in bank:
            for f in fills:
                words.update(_words(template.format(**f)))
    for filler in VQA_PREFIX_TRAIN + VQA_SUFFIX_TRAIN:
        words.update(_words(filler))
    words.update(["yes", "no", "one", "two"])
    return sorted(words)


def _words(text: str) -> list[str]:
    # as BERT's basic tokenizer splits: words, and each punctuation mark on its own
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


# ----------------------------------------------------------------------------- CLIP caption templates
# {c}: a colour, {s}: a shape, {z}: small/large, {w}: a position phrase, {b}: a background colour.
# Training captions leave attributes out, reorder them and add filler, as people write prompts.
CLIP_TRAIN = (
    "{c} {s}", "a {c} {s}", "the {c} {s}", "a {z} {c} {s}", "a {c} {s} {w}", "a {z} {c} {s} {w}, {b} background",
    "a {c} {s} on a {b} background", "a {c} {s}, {b} background", "a {s} that is {c}", "a {c} colored {s}",
    "a {c} coloured {s}", "a picture of a {c} {s}", "an image of a {c} {s}", "a drawing of a {c} {s}",
    "a rendering of a {c} {s}", "please draw a {c} {s}", "draw a {c} {s}", "there is a {c} {s}", "this is a {c} {s}",
    "a {z} {s}, {c}", "{c} {s} {w}", "a {c} {s} centered", "one {c} {s}", "a single {c} {s} on {b}",
    "a {c} {s} in the image", "a picture of a {z} {c} {s} {w}", "simple {c} {s} icon", "a {c} {s} shape",
)
# held out: open_clip's (the CLIP paper's) 7 "simple" ImageNet templates and a few common others,
# each filled with "{colour} {shape}"; none of their words is ever a training filler
CLIP_HELDOUT = (
    "a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a sketch of a {}.",
    "an illustration of a {}.", "a close-up photo of a {}.", "{}",
)
# filler words training captions may carry, standing for every word a user might add; words of
# the held-out templates and words that name a colour or shape are kept out
_FILLER_POOL = (
    "nice", "simple", "clean", "flat", "plain", "bold", "tiny", "neat", "cute", "cool", "minimal", "basic", "lovely",
    "graphic", "digital", "vector", "icon", "logo", "design", "style", "scene", "figure", "thing", "object", "item",
    "here", "now", "just", "very", "really", "only", "please", "exactly", "visible", "shown", "drawn", "rendered",
    "printed", "painted", "pixel", "sharp", "solid", "filled", "centered", "image", "picture", "drawing", "view",
    "quick", "pretty", "lonely", "big", "little", "huge", "smooth", "bright", "dark", "soft", "hard", "old", "new",
)
WHERE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}


def clip_heldout_words() -> set[str]:
    return {w for t in CLIP_HELDOUT for w in re.findall(r"[a-z]+", t.lower())}


def clip_filler_pool() -> tuple[str, ...]:
    banned = clip_heldout_words() | set(S.COLOURS) | set(S.BACKGROUNDS) | set(S.SHAPES) | {"grey", "round"}
    return tuple(w for w in _FILLER_POOL if w not in banned)


def clip_caption(s: S.Sample, rng: np.random.Generator, *, shape: str | None = None) -> str:
    """One training caption of sample `s`'s first shape: a random template, sometimes with filler
    words, random capitals; `shape` swaps the shape's name (a hard negative of the same words)."""
    first = s.shapes[0]
    template = CLIP_TRAIN[int(rng.integers(len(CLIP_TRAIN)))]
    text = template.format(c=first.colour, s=shape or first.shape, z=first.size, w=WHERE_PHRASES[first.position],
                           b=s.background)
    words = text.split(" ")
    pool = clip_filler_pool()
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
        words.insert(int(rng.integers(0, len(words) + 1)), pool[int(rng.integers(len(pool)))])
    text = " ".join(words) + ("." if rng.random() < 0.2 else "")
    return text.upper() if rng.random() < 0.05 else (text.capitalize() if rng.random() < 0.2 else text)


def clip_class_prompts(template: Any, classes: Sequence[tuple[str, str]]) -> list[str]:
    """Each class's prompt: "{}" in the template filled with "red circle"; a callable template
    (open_clip's own ImageNet templates are lambdas) is called with it."""
    if callable(template):
        return [template(f"{colour} {shape}") for colour, shape in classes]
    return [template.replace("{}", f"{colour} {shape}") for colour, shape in classes]


def template_name(template: Any) -> str:
    return template("{}") if callable(template) else template


def vqa_report(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per family of rows {family, answer, predicted, heldout}: the held-out families,
    their minimum, and the `template` family (shapes.py's own questions) beside them."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r["family"], []).append(normalise_answer(r["predicted"]) == r["answer"])
    families = {f: {"accuracy": round(sum(v) / len(v), 4), "questions": len(v)} for f, v in by.items()}
    heldout = [f for f in families if f != "template"]
    return {"families": families,
            "heldout_min": min((families[f]["accuracy"] for f in heldout), default=None),
            "heldout_min_family": min(heldout, key=lambda f: families[f]["accuracy"]) if heldout else None,
            "heldout_accuracy": round(sum(sum(by[f]) for f in heldout) / max(1, sum(len(by[f]) for f in heldout)), 4),
            "questions": len(rows)}
