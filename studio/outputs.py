"""The output writer: the only code that writes user files.

Every output is written atomically (a temp file in the target folder, then a no-clobber link to
its final name), never over an existing file (a counter suffix picks a free name unless
`overwrite=True`), and carries its settings: PNG text chunks (an A1111 `parameters` chunk that
sd-parsers and other tools read, plus a `studio` chunk with the full JSON), tags where the format
allows, and a JSON sidecar `NAME.json` beside it. Each output folder holds a `manifest.jsonl`,
one line per finished output (with its sha256), appended under an exclusive lock so that
concurrent processes (batch runs, accelerate workers) never interleave lines.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.errors import UsageError

MANIFEST = "manifest.jsonl"
DEFAULT_TEMPLATE = "{date}-{task}-{seed}-{slug}"


@dataclass
class Result:
    """One output of a pipeline run, before it is written.

    kind decides the writer: image (PIL.Image), audio ((samples, sample_rate), samples float32
    (T,) or (C, T)), midi (pretty_midi.PrettyMIDI), video (list of PIL images; params['fps']),
    text (str), json (dict), file (a path the pipeline produced in a temp dir).
    """

    kind: str  # image | audio | midi | video | text | json | file
    value: Any  # the payload, typed by kind (above)
    params: dict[str, Any]  # the request as resolved for this output (seed included)
    fmt: str | None = None  # file suffix without dot (png, wav, flac, mid, mp4, gif, webp, frames, txt)
    extra: dict[str, Any] = field(default_factory=dict)  # model identity, device, timings, notes
    companions: dict[str, Any] = field(default_factory=dict)  # name -> PIL image (NAME.name.png) or (samples, rate) (NAME.name.wav) written beside
    path: Path | None = None  # set by the writer once written
    metadata: dict[str, Any] = field(default_factory=dict)  # set by the writer: what the sidecar holds


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")
    return slug[:limit].rstrip("-") or "untitled"


def library_versions() -> dict[str, str]:
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str], ...]:
    # once per process: each lookup scans site-packages (~0.1 s), twice per output written
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("studio", "torch", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "miditok"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return tuple(out.items())


def a1111_parameters(params: dict[str, Any], model_name: str | None) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [str(params.get("prompt") or "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = []
    for key, label in (("steps", "Steps"), ("scheduler", "Sampler"), ("guidance", "CFG scale"), ("seed", "Seed")):
        if params.get(key) is not None:
            fields.append(f"{label}: {params[key]}")
    if params.get("width") and params.get("height"):
        fields.append(f"Size: {params['width']}x{params['height']}")
    if model_name:
        fields.append(f"Model: {model_name}")
    if params.get("strength") is not None and params.get("init_image"):
        fields.append(f"Denoising strength: {params['strength']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        with contextlib.suppress(Exception):
            return value.item()
    return str(value)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path in final's folder; on success move it to `final` without clobbering
    (unless overwrite). On any error the temp is removed and `final` is untouched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's usual mode
    try:
        yield tmp
        if is_dir:
            if final.exists() and not overwrite:
                raise FileExistsError(final)
            os.rename(tmp, final)
        elif overwrite:
            os.replace(tmp, final)
        else:
            os.link(tmp, final)  # atomic, fails if final exists: never clobbers a user's file
            os.unlink(tmp)
    except BaseException:
        if is_dir:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_text_file(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Atomically write a text file (e.g. a caption sidecar beside a user's image)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists", "pass --overwrite to replace it")
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock (safe across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(row), ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """Rows of a folder's manifest; a torn last line (a crash mid-append) is ignored."""
    path = Path(out_dir) / MANIFEST
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------- format writers
def _write_png(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params, (meta.get("model") or {}).get("name")))
    info.add_itxt("studio", json.dumps(_jsonable(meta), ensure_ascii=False))
    value.save(tmp, format="PNG", pnginfo=info)


def _write_pil(fmt: str) -> Callable:
    def write(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any]) -> None:
        image = value.convert("RGB") if fmt in ("jpeg", "jpg") else value
        kwargs = {"quality": 95} if fmt in ("jpeg", "jpg", "webp") else {}
        if fmt == "webp":
            kwargs["exif"] = _exif_comment(meta)
        image.save(tmp, format="JPEG" if fmt == "jpg" else fmt.upper(), **kwargs)
    return write


def _exif_comment(meta: dict[str, Any]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x9286] = json.dumps(_jsonable(meta.get("params", {})))  # UserComment
    return exif.tobytes()


def _write_audio(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any], fmt: str = "wav") -> None:
    import numpy as np
    import soundfile as sf

    samples, rate = value
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:  # (C, T) -> (T, C) as soundfile expects
        samples = samples.T
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    # tags (WAV INFO / FLAC vorbis comments) are set before the audio: FLAC cannot be reopened r+
    with sf.SoundFile(str(tmp), "w", samplerate=int(rate), channels=channels, format=fmt.upper(),
                      subtype="PCM_16" if fmt == "wav" else None) as f:
        with contextlib.suppress(Exception):
            f.comment = json.dumps(_jsonable(params))[:2000]
            f.software = "studio"
        f.write(samples)


def _write_midi(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any]) -> None:
    import pretty_midi

    if isinstance(value, (bytes, bytearray)):
        tmp.write_bytes(value)
        return
    midi: pretty_midi.PrettyMIDI = value
    # the request as a text meta event, so the file carries its own settings
    midi.text_events = [e for e in midi.text_events if not e.text.startswith("studio:")]
    midi.text_events.append(pretty_midi.Text("studio:" + json.dumps(_jsonable(params)), 0.0))
    midi.write(str(tmp))


def _write_video(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any], fmt: str = "mp4") -> None:
    import imageio.v3 as iio
    import numpy as np

    frames = [np.asarray(f.convert("RGB")) for f in value]
    fps = float(params.get("fps") or 8)
    if fmt == "mp4":
        import imageio.v2 as iio2

        comment = json.dumps(_jsonable(params))
        writer = iio2.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                 pixelformat="yuv420p", macro_block_size=1,
                                 output_params=["-metadata", f"comment={comment}"])
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    elif fmt == "gif":
        iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    elif fmt == "webp":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                       loop=0, lossless=True, exif=_exif_comment(meta))
    else:
        raise UsageError(f"unknown video format {fmt!r}", "use mp4, gif, webp or frames")


class OutputWriter:
    """Writes Results into one output folder with names from a template.

    Template fields: {date} {time} {task} {seed} {slug} {index} {model}. Names never collide with
    existing files: `-1`, `-2`, ... are appended.
    """

    def __init__(self, out_dir: str | Path, *, task: str, template: str = DEFAULT_TEMPLATE,
                 overwrite: bool = False, sidecar: bool = True, manifest: bool = True):
        self.out_dir = Path(out_dir).expanduser()
        self.task = task
        self.template = template
        self.overwrite = overwrite
        self.sidecar = sidecar
        self.manifest = manifest
        self._check_dir()

    def _check_dir(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"--out {self.out_dir} is a file, not a folder", "pass a folder path")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {self.out_dir}: {exc.strerror}",
                             "pass a writable folder with --out") from exc
        if not os.access(self.out_dir, os.W_OK):
            raise UsageError(f"output folder {self.out_dir} is not writable", "pass a writable folder with --out")

    def _name(self, result: Result, index: int) -> str:
        now = _dt.datetime.now()
        params = result.params
        fields = {
            "date": now.strftime("%Y%m%d"), "time": now.strftime("%H%M%S"), "task": self.task,
            "seed": params.get("seed", "x"), "index": index,
            "slug": slugify(str(params.get("prompt") or params.get("name") or params.get("input") or "")),
            "model": slugify(str((result.extra.get("model") or {}).get("alias") or (result.extra.get("model") or {}).get("name") or "")),
        }
        try:
            return self.template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"bad name template {self.template!r}: {exc}",
                             "fields: {date} {time} {task} {seed} {slug} {index} {model}") from exc

    @staticmethod
    def sidecar_for(final: Path, suffix: str) -> Path:
        """NAME.json beside NAME.png; a JSON output's own sidecar is NAME.meta.json."""
        stem = final.name.removesuffix(suffix) if suffix else final.name
        return final.with_name(stem + (".meta.json" if suffix == ".json" else ".json"))

    def _free_path(self, stem: str, suffix: str) -> Path:
        candidate = self.out_dir / f"{stem}{suffix}"
        if self.overwrite:
            return candidate
        n = 0
        while candidate.exists() or (self.sidecar and self.sidecar_for(candidate, suffix).exists()):
            n += 1
            candidate = self.out_dir / f"{stem}-{n}{suffix}"
        return candidate

    def metadata(self, result: Result) -> dict[str, Any]:
        return {
            "studio_version": library_versions().get("studio"),
            "task": self.task,
            "params": result.params,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **result.extra,
            "versions": library_versions(),
        }

    def write(self, result: Result, index: int = 0) -> Path:
        fmt = (result.fmt or {"image": "png", "audio": "wav", "midi": "mid", "video": "mp4", "text": "txt",
                              "json": "json"}.get(result.kind, "bin")).lower()
        suffix = "" if fmt == "frames" else f".{fmt}"
        final = self._free_path(self._name(result, index), suffix)
        meta = self.metadata(result)
        params = result.params
        started = time.perf_counter()
        with atomic_path(final, overwrite=self.overwrite, is_dir=(fmt == "frames")) as tmp:
            if result.kind == "image":
                (_write_png if fmt == "png" else _write_pil(fmt))(tmp, result.value, meta, params)
            elif result.kind == "audio":
                _write_audio(tmp, result.value, meta, params, fmt)
            elif result.kind == "midi":
                _write_midi(tmp, result.value, meta, params)
            elif result.kind == "video" and fmt == "frames":
                for i, frame in enumerate(result.value):
                    frame.save(tmp / f"{i:05d}.png")
            elif result.kind == "video":
                _write_video(tmp, result.value, meta, params, fmt)
            elif result.kind == "text":
                tmp.write_text(str(result.value), encoding="utf-8")
            elif result.kind == "json":
                tmp.write_text(json.dumps(_jsonable(result.value), indent=2, ensure_ascii=False), encoding="utf-8")
            elif result.kind == "file":
                import shutil

                shutil.copyfile(result.value, tmp)
            else:
                raise ValueError(f"unknown result kind {result.kind!r}")
        companions = {}
        for name, value in result.companions.items():
            is_audio = isinstance(value, tuple)  # (samples, rate): e.g. a MIDI's rendering, NAME.render.wav
            comp = self._free_path(f"{final.stem}.{name}", ".wav" if is_audio else ".png")
            with atomic_path(comp, overwrite=self.overwrite) as tmp:
                if is_audio:
                    _write_audio(tmp, value, meta, params, "wav")
                else:
                    value.save(tmp, format="PNG")
            companions[name] = comp.name
        if companions:
            meta["companions"] = companions
        meta["file"] = final.name
        meta["write_seconds"] = round(time.perf_counter() - started, 4)
        if self.sidecar:
            sidecar = self.sidecar_for(final, suffix)
            with atomic_path(sidecar, overwrite=self.overwrite) as tmp:
                tmp.write_text(json.dumps(_jsonable(meta), indent=2, ensure_ascii=False), encoding="utf-8")
        if self.manifest:
            row = {"file": final.name, "task": self.task, "seed": params.get("seed"), "params": params,
                   "model": result.extra.get("model"), "created": meta["created"]}
            if final.is_file():
                row["sha256"] = sha256_file(final)
            if result.extra.get("job"):
                row["job"] = result.extra["job"]
            append_jsonl(self.out_dir / MANIFEST, row)
        result.path = final
        result.metadata = meta
        return final


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The studio metadata of an output: its sidecar, or the PNG `studio` chunk, or a MIDI text event."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist", "pass an output file written by studio")
    candidates = [path.with_suffix(".json"), path.with_name(path.name + ".json"), path.with_suffix(".meta.json")]
    if path.suffix == ".json":
        candidates.insert(0, path)
    for sidecar in candidates:
        if sidecar.exists():
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(sidecar.read_text(encoding="utf-8"))
                if isinstance(data, dict) and "task" in data:
                    return data
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            text = im.text.get("studio") if hasattr(im, "text") else None
        if text:
            return json.loads(text)
    if path.suffix.lower() in (".mid", ".midi"):
        import pretty_midi

        for event in pretty_midi.PrettyMIDI(str(path)).text_events:
            if event.text.startswith("studio:"):
                return {"task": "music-midi", "params": json.loads(event.text[len("studio:"):])}
    raise UsageError(f"{path.name} carries no studio metadata", "replay works on files studio wrote (with their .json sidecar)")
