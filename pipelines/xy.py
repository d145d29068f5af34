"""The X/Y plot (A1111's "X/Y/Z plot" script, two axes): `--xy "steps=4,8" --xy "guidance=3,7"`
makes one image per combination, each written with its own settings (so each replays alone),
then one contact sheet with the values written along its axes.

Any request field may be an axis, by its name or its flag's ("cfg", "sampler", "clip-skip",
"lora", "model" ...), plus A1111's `prompt_sr` (Prompt S/R: the first value is searched in the
prompt and negative prompt and replaced by each value in turn). Values are comma-separated,
quoted as in CSV when a value holds a comma, and numbers take A1111's ranges: `1-5` (every
whole number), `1-9 (+2)` (a step), `0.5-1.5 [3]` (a count). Every cell's request is checked as
the flag itself would be before the first image is made.

This module never imports pipelines/image.py (the layer test forbids import loops): the image
pipeline passes in its checks and runs the cells through its own `run`.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from studio.errors import UsageError
from studio.pipeline import SYNONYMS  # the contract's spellings of shared names (num -> num_outputs, ...)

MAX_CELLS = 256  # a typo such as steps=1-1000 should not queue a thousand images

# what people type for an axis -> the request field (flag spellings and A1111's axis names)
ALIASES = {
    "cfg": "guidance", "cfg_scale": "guidance", "cfg-scale": "guidance", "scale": "guidance",
    "sampler": "scheduler", "schedulers": "scheduler", "negative": "negative_prompt", "neg": "negative_prompt",
    "lora": "adapters", "loras": "adapters", "init": "init_image", "mask": "mask_image",
    "control": "controls", "control-model": "control_models", "embedding": "embeddings",
    "denoise": "strength", "denoising": "strength", "denoising_strength": "strength",
    "checkpoint": "model", "checkpoint_name": "model", "size": "size",
    "prompt-s/r": "prompt_sr", "prompt_s/r": "prompt_sr", "prompt-sr": "prompt_sr", "s/r": "prompt_sr", "sr": "prompt_sr",
}
NOT_AXES = {"xy": "an X/Y plot cannot nest", "num_outputs": "each cell makes one image; use a seed axis for variations",
            "seeds": "use --xy seed=1,2,3"}


@dataclass(frozen=True)
class Axis:
    name: str  # the request field, or "prompt_sr" / "size"
    label: str  # what the user typed, for the sheet
    texts: tuple[str, ...]  # each value as typed (the sheet's labels)
    values: tuple[Any, ...]  # each value converted to the field's type


def _split(text: str) -> list[str]:
    # A1111 reads axis values with csv (quotes allow commas inside a value)
    rows = list(csv.reader([text], skipinitialspace=True))
    return [v.strip() for v in (rows[0] if rows else [])]


_INT_RANGE = re.compile(r"^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*(?:\(\s*([+-]?\d+)\s*\)|\[\s*(\d+)\s*\])?\s*$")
_FLOAT_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*(?:\(\s*([+-]?\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*$")


def _expand_ranges(items: list[str], kind: type) -> list[str]:
    """A1111's range syntax for number axes: 1-5, 1-9 (+2), 1-2 [5]."""
    out: list[str] = []
    pattern = _INT_RANGE if kind is int else _FLOAT_RANGE
    for item in items:
        m = pattern.match(item)
        if not m:
            out.append(item)
            continue
        start, end = kind(m.group(1)), kind(m.group(2))
        if m.group(4):  # [count]: evenly spaced, both ends included
            count = int(m.group(4))
            if count < 1:
                raise UsageError(f"range {item!r} asks for {count} values", "e.g. 1-2 [5]")
            values = [start + (end - start) * i / max(1, count - 1) for i in range(count)]
            out += [str(int(round(v))) if kind is int else f"{v:g}" for v in values]
            continue
        step = kind(m.group(3)) if m.group(3) else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise UsageError(f"range {item!r} never reaches its end", "e.g. 4-12 (+4), or 12-4 (-4)")
        count = int((end - start) / step + 1e-9) + 1
        if count > MAX_CELLS:
            raise UsageError(f"range {item!r} makes {count} values", f"at most {MAX_CELLS} cells in one plot")
        out += [str(start + i * step) if kind is int else f"{start + i * step:g}" for i in range(count)]
    return out


def _field_kind(hint: Any) -> tuple[str, bool]:
    """(int | float | bool | boolstr | str | tuple, optional?) of a request field's type hint."""
    args = set(typing.get_args(hint)) or {hint}
    optional = type(None) in args
    args.discard(type(None))
    origins = {typing.get_origin(a) or a for a in args}
    if tuple in origins:
        return "tuple", optional
    if args == {bool}:
        return "bool", optional
    if args == {bool, str}:
        return "boolstr", optional
    if args == {int}:
        return "int", optional
    if args <= {int, float}:
        return "float", optional
    return "str", optional


_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


def _convert(field: str, flag: str, text: str, kind: str, optional: bool) -> Any:
    low = text.strip().lower()
    if optional and low in ("none", "default", ""):
        return None
    bad = UsageError(f"--xy {flag}: {text!r} is not a valid --{flag.replace('_', '-')} value", "")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise UsageError(bad.message, "give whole numbers, e.g. --xy steps=10,20,30 or steps=10-30 (+10)") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise UsageError(bad.message, "give numbers, e.g. --xy guidance=3,5.5,7 or guidance=3-9 [4]") from None
    if kind == "bool":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UsageError(bad.message, "on/off, true/false or yes/no")
    if kind == "boolstr":
        return True if low in _TRUE else False if low in _FALSE else text
    if kind == "tuple":
        return () if low in ("", "none") else (text,)
    return text


def parse_axes(texts: Any, request: Any) -> list[Axis]:
    """The --xy axes, each value converted to the field's type (bad values are errors now)."""
    texts = [texts] if isinstance(texts, str) else list(texts or ())
    if not texts:
        return []
    if len(texts) > 2:
        raise UsageError(f"{len(texts)} --xy axes; a plot has at most two (X and Y)",
                         "run one plot per value of the third, e.g. with --seed or a batch file")
    fields = {f.name for f in dataclasses.fields(type(request))}
    hints = typing.get_type_hints(type(request))
    axes: list[Axis] = []
    for text in texts:
        name, sep, rest = str(text).partition("=")
        label = name.strip()
        if not sep or not label or not rest.strip():
            raise UsageError(f"--xy {text!r} is not NAME=V1,V2,...", 'e.g. --xy "steps=10,20,30" --xy "guidance=3,7"')
        key = label.lower().replace("-", "_")
        key = ALIASES.get(label.lower(), ALIASES.get(key, SYNONYMS.get(key, key)))
        if key in NOT_AXES:
            raise UsageError(f"--xy {label} cannot be an axis", NOT_AXES[key])
        items = _split(rest)
        if key == "prompt_sr":
            search = items[0] if items else ""
            if not search or (search not in (request.prompt or "") and search not in (request.negative_prompt or "")):
                raise UsageError(f"--xy prompt_sr: {search!r} is not in the prompt",
                                 "the first value is the words to replace, e.g. --xy \"prompt_sr=red,blue,green\" for 'a red cat'")
            axes.append(Axis("prompt_sr", label, tuple(items), tuple(items)))
            continue
        if key == "size":
            sizes = []
            for item in items:
                m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", item)
                if not m:
                    raise UsageError(f"--xy size: {item!r} is not WIDTHxHEIGHT", "e.g. --xy size=512x512,768x512")
                sizes.append((int(m.group(1)), int(m.group(2))))
            axes.append(Axis("size", label, tuple(items), tuple(sizes)))
            continue
        if key not in fields:
            raise UsageError(f"--xy {label}: studio image has no such setting",
                             f"axes: {', '.join(sorted(f for f in fields if f not in NOT_AXES))}, prompt_sr, size")
        kind, optional = _field_kind(hints.get(key, str))
        if kind in ("int", "float"):
            items = _expand_ranges(items, int if kind == "int" else float)
        if not items:
            raise UsageError(f"--xy {label} has no values", f"e.g. --xy {label}=1,2,3")
        values = tuple(_convert(key, label, item, kind, optional) for item in items)
        axes.append(Axis(key, label, tuple(items), values))
    if len(axes) == 2 and axes[0].name == axes[1].name:
        raise UsageError(f"both --xy axes are {axes[0].name}", "give the Y axis another setting")
    cells = 1
    for axis in axes:
        cells *= len(axis.values)
    if cells > MAX_CELLS:
        raise UsageError(f"the plot has {cells} cells", f"at most {MAX_CELLS}: fewer values per axis")
    if int(getattr(request, "num_outputs", 1) or 1) > 1 or getattr(request, "seeds", None):
        raise UsageError("--xy makes one image per cell; --num/--seeds do not combine with it",
                         "make the seed an axis: --xy seed=1,2,3")
    return axes


def _apply(request: Any, axis: Axis, index: int, base: Any) -> Any:
    value = axis.values[index]
    if axis.name == "prompt_sr":
        search = axis.values[0]
        return dataclasses.replace(request, prompt=(base.prompt or "").replace(search, value),
                                   negative_prompt=(base.negative_prompt or "").replace(search, value))
    if axis.name == "size":
        return dataclasses.replace(request, width=value[0], height=value[1])
    return dataclasses.replace(request, **{axis.name: value})


def cells(request: Any, axes: list[Axis]) -> list[tuple[int, int, Any]]:
    """(x index, y index, request) for each cell, row by row (Y outer, X inner, as A1111 fills)."""
    xs = axes[0] if axes else None
    ys = axes[1] if len(axes) > 1 else None
    base = dataclasses.replace(request, xy=())
    out = []
    for yi in range(len(ys.values) if ys else 1):
        for xi in range(len(xs.values) if xs else 1):
            cell = base
            if xs:
                cell = _apply(cell, xs, xi, base)
            if ys:
                cell = _apply(cell, ys, yi, base)
            out.append((xi, yi, cell))
    return out


def check(request: Any, check_cell: Callable[[Any], None]) -> None:
    """Every cell's request checked as the flags themselves would be."""
    axes = parse_axes(getattr(request, "xy", ()), request)
    for xi, yi, cell in cells(request, axes):
        try:
            check_cell(cell)
        except UsageError as exc:
            where = ", ".join(f"{a.label}={a.texts[i]}" for a, i in zip(axes, (xi, yi)))
            raise type(exc)(f"--xy cell {where}: {exc.message}", exc.hint) from exc


def run(image_pipeline: Any, request: Any, progress: Any, run_cell: Callable[[Any, Any], Iterator[Any]]) -> Iterator[Any]:
    """Each cell's image (with its own settings), then the contact sheet. `run_cell(pipeline,
    cell)` runs one cell's request; a `model` axis runs on that model (loaded once, cached)."""
    from studio.outputs import Result

    axes = parse_axes(request.xy, request)
    grid: dict[tuple[int, int], Any] = {}
    files: list[dict[str, Any]] = []
    first_params: dict[str, Any] | None = None
    sampler = None
    plan = []
    for xi, yi, cell in cells(request, axes):
        pipeline = image_pipeline if cell.model == request.model else _other_model(image_pipeline, cell.model)
        where = {a.label: a.texts[i] for a, i in zip(axes, (xi, yi))}
        try:  # what needs the loaded model, for every cell before the first image is made
            pipeline.check_inputs(cell)
        except UsageError as exc:
            raise type(exc)(f"--xy cell {', '.join(f'{k}={v}' for k, v in where.items())}: {exc.message}", exc.hint) from exc
        plan.append((xi, yi, cell, pipeline, where))
    for xi, yi, cell, pipeline, where in plan:
        for result in run_cell(pipeline, cell):
            result.extra = {**result.extra, "xy_cell": where}
            if pipeline is not image_pipeline:
                result.extra["model"] = pipeline.spec.identity()
            image = result.value  # kept for the sheet; the engine lets go of result.value
            if first_params is None:
                first_params, sampler = dict(result.params), result.extra.get("sampler")
            yield result
            grid[(xi, yi)] = image
            if result.path is not None:
                files.append({**where, "file": result.path.name})
    sheet = contact_sheet(grid, axes)
    params = dict(first_params or {})
    params.update(xy=list(request.xy), seed=request.seed)
    for axis in axes:  # the sheet's request is the plot's, not its first cell's
        if axis.name in params:
            params[axis.name] = getattr(request, axis.name)
    params.update(prompt=request.prompt, negative_prompt=request.negative_prompt)
    extra = {"xy_grid": {"axes": [{"name": a.name, "label": a.label, "values": list(a.texts)} for a in axes],
                         "cells": files}}
    if sampler:
        extra["sampler"] = sampler  # A1111's labels for the sheet's infotext
    yield Result(kind="image", value=sheet, params=params, extra=extra)


def _other_model(image_pipeline: Any, model: str) -> Any:
    from studio import registry

    spec = image_pipeline.spec
    other = registry.resolve_model("image", str(model), allow_pickle=spec.allow_pickle,
                                   trust_remote_code=spec.trust_remote_code, offline=spec.offline)
    return registry.load_pipeline("image", other, image_pipeline.device, None)


def contact_sheet(grid: dict[tuple[int, int], Any], axes: list[Axis]) -> Any:
    """The images in a grid with the X values above the columns and the Y values left of the rows
    (A1111's draw_grid_annotations, drawn with Pillow's own font so no system font is needed)."""
    from PIL import Image, ImageDraw, ImageFont

    cols = max(x for x, _ in grid) + 1
    rows = max(y for _, y in grid) + 1
    cw = max(im.size[0] for im in grid.values())
    ch = max(im.size[1] for im in grid.values())
    size = max(10, min(48, min(cw, ch) // 6))
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def label(axis: Axis, i: int) -> str:
        return f"{axis.label}: {axis.texts[i]}"

    def wrap(text: str, width: int) -> list[str]:
        lines: list[str] = []
        for word in text.split(" "):
            if lines and probe.textlength(lines[-1] + " " + word, font=font) <= width:
                lines[-1] += " " + word
            else:
                lines.append(word)
        return lines or [""]

    line = size + size // 3
    xs = axes[0] if axes else None
    ys = axes[1] if len(axes) > 1 else None
    top_lines = max((len(wrap(label(xs, i), cw - 4)) for i in range(cols)), default=0) if xs else 0
    top = top_lines * line + size // 2 if xs else 0
    left = 0
    if ys:
        left = int(min(max(probe.textlength(label(ys, j), font=font) for j in range(rows)) + size, max(cw, 4 * size)))
    sheet = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    draw = ImageDraw.Draw(sheet)
    for (x, y), im in grid.items():
        sheet.paste(im.convert("RGB"), (left + x * cw, top + y * ch))
    if xs:
        for i in range(cols):
            lines = wrap(label(xs, i), cw - 4)
            y0 = (top - len(lines) * line) // 2
            for k, text in enumerate(lines):
                w = probe.textlength(text, font=font)
                draw.text((left + i * cw + (cw - w) / 2, y0 + k * line), text, fill="black", font=font)
    if ys:
        for j in range(rows):
            lines = wrap(label(ys, j), left - size // 2)
            y0 = top + j * ch + (ch - len(lines) * line) // 2
            for k, text in enumerate(lines):
                w = probe.textlength(text, font=font)
                draw.text(((left - w) / 2, y0 + k * line), text, fill="black", font=font)
    return sheet
