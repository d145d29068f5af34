"""The gallery: every output in the server's output folders, from their manifests and sidecars.

Each folder's `manifest.jsonl` (one row per output the writer kept: file, task, seed, params,
model, created) is the index; a folder is re-read only when its manifest's (mtime, size) has
changed, so outputs the CLI writes while the server runs show up at the next look without a
restart, and a look at an unchanged gallery reads no file. Manifests are found in each output
folder and up to two folders below it (batch files and name templates make subfolders).

Thumbnails are made on request and kept in memory: the image itself; the first frame of a
video; a waveform for audio; a piano roll for MIDI; the first lines for text.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.outputs import MANIFEST, read_manifest, within

THUMB = 256  # px, the longer side
MAX_DEPTH = 2  # subfolders below an output folder searched for manifests
KINDS = {".png": "image", ".jpg": "image", ".jpeg": "image", ".webp": "image", ".bmp": "image",
         ".mp4": "video", ".gif": "video", ".wav": "audio", ".flac": "audio", ".mp3": "audio", ".ogg": "audio",
         ".mid": "midi", ".midi": "midi", ".txt": "text", ".py": "text", ".json": "json"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".mp4": "video/mp4", ".wav": "audio/wav",
               ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".mid": "audio/midi",
               ".midi": "audio/midi", ".txt": "text/plain; charset=utf-8", ".json": "application/json",
               ".py": "text/plain; charset=utf-8"}


@dataclass
class Item:
    id: str  # stable: a hash of folder number and relative path
    folder: int  # which output folder (the server's --out, in order)
    rel: str  # path relative to that folder, as the file URL takes it
    task: str
    kind: str  # image | video | audio | midi | text | json | frames | file
    prompt: str
    negative: str
    model: str  # alias or name
    created: str  # ISO time from the manifest
    seed: Any
    params: dict[str, Any]
    order: int  # manifest order, to break ties in `created`

    def title(self) -> str:
        """The prompt, or for a task without one (MIDI) its main settings, or the file name."""
        if self.prompt:
            return self.prompt
        shown = [f"{k} {self.params[k]}" for k in ("chords", "key", "bars", "seconds", "tempo", "instrument")
                 if self.params.get(k) not in (None, "", [])]
        return ", ".join(shown) or Path(self.rel).name

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "kind": self.kind, "prompt": self.prompt, "title": self.title(),
                "model": self.model,
                "model_label": _label(self.model), "created": self.created, "seed": self.seed, "file": f"/files/{self.folder}/{self.rel}",
                "thumb": f"/api/thumbs/{self.id}.png", "name": Path(self.rel).name}


class Gallery:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self._manifests: dict[Path, tuple[tuple[int, int], list[Item]]] = {}  # manifest -> (stamp, items)
        self._thumbs: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._by_id: dict[str, Item] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ index
    def items(self) -> list[Item]:
        """Every output that still exists, newest first."""
        found: list[Item] = []
        with self.lock:
            seen = set()
            for index, root in enumerate(self.roots):
                for manifest in self._find_manifests(root):
                    seen.add(manifest)
                    found.extend(self._read(index, root, manifest))
            for gone in set(self._manifests) - seen:
                del self._manifests[gone]
        # gone files drop out; so does a row naming a link that leads outside the folder (its
        # thumbnail would show what lies there)
        found = [item for item in found if os.path.lexists(self.roots[item.folder] / item.rel)
                 and within(self.roots[item.folder] / item.rel, self.roots[item.folder])]
        found.sort(key=lambda i: (i.created, i.order), reverse=True)
        self._by_id = {item.id: item for item in found}
        return found

    def find(self, item_id: str) -> Item | None:
        """One output by id: from the last look at the folders (a page asks for 200 thumbnails
        right after listing them), else after a fresh one."""
        item = self._by_id.get(item_id)
        if item is not None and os.path.lexists(self.roots[item.folder] / item.rel):
            return item
        return next((i for i in self.items() if i.id == item_id), None)

    def search(self, q: str = "", task: str = "", model: str = "", since: str = "", until: str = "") -> list[Item]:
        q, model = q.strip().lower(), model.strip().lower()
        out = []
        for item in self.items():
            if q and q not in item.prompt.lower() and q not in item.negative.lower():
                continue
            if task and item.task != task:
                continue
            if model and model not in item.model.lower():
                continue
            day = item.created[:10]
            if since and day < since[:10]:
                continue
            if until and day > until[:10]:
                continue
            out.append(item)
        return out

    def facets(self, items: list[Item]) -> dict[str, list[str]]:
        return {"tasks": sorted({i.task for i in items}), "models": sorted({i.model for i in items if i.model})}

    def _find_manifests(self, root: Path) -> list[Path]:
        found = []

        def walk(folder: Path, depth: int) -> None:
            candidate = folder / MANIFEST
            if candidate.is_file() and not candidate.is_symlink():
                found.append(candidate)
            if depth >= MAX_DEPTH:
                return
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                walk(Path(entry.path), depth + 1)

        walk(root, 0)
        return found

    def _read(self, index: int, root: Path, manifest: Path) -> list[Item]:
        try:
            info = manifest.stat()
        except OSError:
            return []
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._manifests.get(manifest)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        items = []
        base = manifest.parent.relative_to(root)
        try:
            rows = read_manifest(manifest.parent)
        except Exception:  # a manifest studio refuses (a link, a FIFO) is left out, not fatal
            rows = []
        for order, row in enumerate(rows):
            item = _item(index, base, row, order)
            if item is not None:
                items.append(item)
        self._manifests[manifest] = (stamp, items)
        return items

    # ------------------------------------------------------------------ detail
    def detail(self, item: Item) -> dict[str, Any]:
        path = self.roots[item.folder] / item.rel
        meta: dict[str, Any] = {}
        suffix = path.suffix if path.suffix else ""
        sidecar = path.with_name(path.name.removesuffix(suffix) + (".meta.json" if suffix == ".json" else ".json"))
        if within(sidecar, self.roots[item.folder]) and sidecar.is_file():
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                meta = {}
        # companions (a MIDI's render.wav, attention maps) sit beside the output, named in its sidecar
        parent = Path(item.rel).parent
        companions = {}
        for name, file in (meta.get("companions") or {}).items():
            if isinstance(file, str) and "/" not in file and not file.startswith("."):
                rel = (parent / file).as_posix()
                if within(self.roots[item.folder] / rel, self.roots[item.folder]) and (self.roots[item.folder] / rel).is_file():
                    companions[name] = f"/files/{item.folder}/{rel}"
        return {**item.summary(), "negative": item.negative, "params": item.params, "metadata": meta,
                "companions": companions, "command": command_line(item.task, item.params, item.model),
                "replay": f"studio replay {shlex.quote(str(path))}", "folder": item.folder}

    # ------------------------------------------------------------------ thumbnails
    def thumbnail(self, item: Item) -> bytes:
        path = self.roots[item.folder] / item.rel
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = 0
        key = (item.id, stamp)
        with self.lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = render_thumbnail(path, item.kind)
        with self.lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 2000:
                self._thumbs.popitem(last=False)
        return data


def _label(model: str) -> str:
    """What a card shows for a model: the alias, or a path's last folder name ("model" folders,
    as `make-tiny` and training runs name them, by their parent's name too)."""
    if "/" not in model or not model.startswith(("/", ".", "~")):
        return model
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name in ("model", "final", "checkpoint") else path.name


def _item(index: int, base: Path, row: dict[str, Any], order: int) -> Item | None:
    rel_file = row.get("file")
    if not isinstance(rel_file, str) or not rel_file or rel_file.startswith("/") or ".." in rel_file.split("/"):
        return None
    rel = (base / rel_file).as_posix() if str(base) != "." else rel_file
    params = row.get("params") if isinstance(row.get("params"), dict) else {}
    model = row.get("model") if isinstance(row.get("model"), dict) else {}
    suffix = Path(rel).suffix.lower()
    kind = KINDS.get(suffix, "frames" if not suffix else "file")
    item_id = hashlib.sha1(f"{index}:{rel}".encode()).hexdigest()[:16]
    return Item(id=item_id, folder=index, rel=rel, task=str(row.get("task") or ""), kind=kind,
                prompt=str(params.get("prompt") or ""), negative=str(params.get("negative_prompt") or ""),
                model=str(model.get("alias") or model.get("name") or ""), created=str(row.get("created") or ""),
                seed=row.get("seed"), params=params, order=order)


# ---------------------------------------------------------------------- command lines
# task -> (subcommand words, positional field, {field: flag}); a field not named here is
# `--field-name`; a False default-true flag names its "--no-" form.
COMMANDS: dict[str, tuple[list[str], str | None, dict[str, str]]] = {
    "image": (["image"], "prompt", {"negative_prompt": "--negative", "num_outputs": "", "seeds": "", "init_image": "--init",
                                    "mask_image": "--mask", "controls": "--control", "control_models": "--control-model",
                                    "adapters": "--lora", "fuse_adapters": "--fuse-lora", "weighting": "--no-weighting",
                                    "embeddings": "--embedding"}),
    "upscale": (["upscale"], "images", {"negative_prompt": "--negative"}),
    "music-audio": (["music", "audio"], "prompt", {"num_outputs": ""}),
    "music-midi": (["music", "midi"], None, {"num_outputs": "", "adapters": "--lora", "render": "--render"}),
    "video": (["video", "generate"], "prompt", {"negative_prompt": "--negative", "num_outputs": "", "init_image": "--init",
                                                "adapters": "--lora"}),
}


def command_line(task: str, params: dict[str, Any], model: str = "") -> str:
    """The `studio ...` line that makes this one output again (its own seed, one output)."""
    words, positional, flags = COMMANDS.get(task, ([task], "prompt", {}))
    argv = ["studio", *words]
    if positional and params.get(positional):
        value = params[positional]
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    for name, value in params.items():
        if name == positional or value is None or value == () or value == [] or value == "":
            continue
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if not flag:
            continue
        if name == "model":
            value = model or value
        if name == "weighting":
            if value is False:
                argv.append("--no-weighting")
            continue
        if name == "render":
            argv.append("--render" if value else "--no-render")
            continue
        if name in ("freeu", "tile") and isinstance(value, str):  # values beyond on/off have their own flag
            argv += ["--freeu-params" if name == "freeu" else "--tile-axis", value]
            continue
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            for each in value:
                argv += [flag, str(each)]
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        argv += [flag, str(value)]
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------- thumbnails
def render_thumbnail(path: Path, kind: str) -> bytes:
    import io

    from PIL import Image

    try:
        if kind == "image":
            image = _open_image(path)
        elif kind == "video":
            image = _video_frame(path)
        elif kind == "frames":
            frames = sorted(path.glob("*.png"))
            image = _open_image(frames[0]) if frames else _tile("frames")
        elif kind == "audio":
            image = _waveform(path)
        elif kind == "midi":
            image = _piano_roll(path)
        elif kind in ("text", "json"):
            image = _text_tile(path)
        else:
            image = _tile(path.suffix or "file")
    except Exception:  # a file being written, or one we cannot read: a plain tile, not a 500
        image = _tile(kind)
    image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    if max(image.size) < THUMB // 2:  # a 32 px output: whole-pixel blocks stay sharp where the page scales it up
        factor = THUMB // 2 // max(image.size) + 1
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _open_image(path: Path) -> Any:
    from studio.pipeline import load_image

    return load_image(path, max_size=THUMB * 2)


def _video_frame(path: Path) -> Any:
    from PIL import Image

    if path.suffix.lower() in (".gif", ".webp"):
        with Image.open(path) as im:
            im.seek(0)
            return im.convert("RGB")
    import imageio.v3 as iio

    frame = next(iter(iio.imiter(path, plugin="FFMPEG")))  # the first frame only; the rest is never decoded
    return Image.fromarray(frame)


def _waveform(path: Path) -> Any:
    """Peak envelope per pixel column, drawn as bars: what audio editors show."""
    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    samples, _ = sf.read(str(path), dtype="float32", always_2d=True, frames=48000 * 600)
    mono = samples.mean(axis=1)  # (T,)
    width, height = THUMB, THUMB // 2
    image = Image.new("RGB", (width, height), (24, 26, 33))
    draw = ImageDraw.Draw(image)
    if mono.size:
        columns = np.array_split(mono, width)
        peak = max(float(np.abs(mono).max()), 1e-6)
        for x, column in enumerate(columns):
            if column.size == 0:
                continue
            top, bottom = float(column.max()) / peak, float(column.min()) / peak
            y0 = int((1 - top) * (height - 1) / 2)
            y1 = int((1 - bottom) * (height - 1) / 2)
            draw.line([(x, y0), (x, max(y0, y1))], fill=(110, 190, 255))
    draw.line([(0, height // 2), (width, height // 2)], fill=(70, 80, 96))
    return image


def _piano_roll(path: Path) -> Any:
    """Notes as bars over time (x) and pitch (y), one colour per instrument."""
    import pretty_midi
    from PIL import Image, ImageDraw

    midi = pretty_midi.PrettyMIDI(str(path))
    width, height = THUMB, THUMB // 2
    image = Image.new("RGB", (width, height), (24, 26, 33))
    draw = ImageDraw.Draw(image)
    notes = [(n, i) for i, inst in enumerate(midi.instruments) for n in inst.notes]
    if notes:
        end = max(n.end for n, _ in notes) or 1.0
        low = min(n.pitch for n, _ in notes) - 1
        high = max(n.pitch for n, _ in notes) + 1
        colours = [(255, 170, 90), (120, 200, 255), (160, 230, 140), (230, 140, 220)]
        for note, inst in notes:
            x0 = int(note.start / end * (width - 1))
            x1 = max(x0 + 1, int(note.end / end * (width - 1)))
            y = int((high - note.pitch) / (high - low) * (height - 3))
            draw.rectangle([x0, y, x1, y + 2], fill=colours[inst % len(colours)])
    return image


def _text_tile(path: Path) -> Any:
    from PIL import Image, ImageDraw

    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read(2000).splitlines()[:12]
    image = Image.new("RGB", (THUMB, THUMB), (250, 250, 247))
    draw = ImageDraw.Draw(image)
    for n, line in enumerate(lines):
        draw.text((8, 8 + n * 16), line[:40], fill=(40, 40, 40))
    return image


def _tile(label: str) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (THUMB, THUMB // 2), (60, 64, 72))
    ImageDraw.Draw(image).text((10, THUMB // 4 - 6), label[:30], fill=(230, 230, 230))
    return image
