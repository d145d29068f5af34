"""The output writer: the only code that writes user files.

Every output is written atomically and never over an existing file or through a link: its bytes
(and its sidecar's, and any companion images') go to hidden temp files in the target folder
first; then each final name is *claimed* with a no-clobber hard link (or O_CREAT|O_EXCL where a
filesystem has no hard links), so a name another process or a dangling symlink already holds
simply moves the output on to `NAME-1`, `NAME-2`, ... (unless `overwrite=True`); then one line
goes to the folder's `manifest.jsonl` (with its sha256), appended under an exclusive lock so
concurrent processes never interleave lines. A failure at any step (a full disk, Ctrl-C) undoes
the steps before it: an output is there with its sidecar and its manifest row, or not at all.

Outputs carry their settings: PNG text chunks (an A1111 `parameters` chunk that sd-parsers and
other tools read, plus a `studio` chunk with the full JSON), tags where the format allows, and a
JSON sidecar `NAME.json` beside it. Every path is checked to lie inside the output folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.errors import RuntimeFailure, UsageError

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
    # once per process. A library the run has imported says its own __version__ (the same string
    # its metadata holds); only the others cost a metadata lookup, which scans site-packages.
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, module in (("studio", "studio"), ("torch", "torch"), ("diffusers", "diffusers"),
                         ("transformers", "transformers"), ("accelerate", "accelerate"), ("peft", "peft"),
                         ("open_clip_torch", "open_clip"), ("miditok", "miditok")):
        own = getattr(sys.modules.get(module), "__version__", None)
        if isinstance(own, str) and own:
            out[name] = str(own)
            continue
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return tuple(out.items())


def a1111_parameters(params: dict[str, Any], meta: dict[str, Any]) -> str:
    """The A1111 `parameters` text of an image output (studio/infotext.py writes it as A1111 does)."""
    from studio.infotext import a1111_infotext

    return a1111_infotext(params, meta)


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


# --------------------------------------------------------------------------- safe file operations
# errno values that mean "no room": a full disk, a quota, a file size limit (RLIMIT_FSIZE)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# errno values of os.link on filesystems without hard links (FAT, exFAT, some FUSE/SMB mounts)
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EACCES}


def _no_space(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` when it says the disk (or a quota) is full; image and audio
    libraries sometimes re-raise it under their own exception type."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def disk_full_error(exc: OSError, what: Path, done: str = "") -> RuntimeFailure:
    """The one-line error for a full disk (exit 1): what could not be written, and where."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    folder = what.parent if what.parent != Path("") else Path(".")
    return RuntimeFailure(f"could not write {what.name} in {folder}: {reason}",
                          "free some space or pass --out on another disk" + (f"; {done}" if done else ""))


def within(path: str | Path, root: str | Path) -> bool:
    """True when `path` resolves (symlinks followed) to `root` or somewhere below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _stage(folder: Path, name: str, suffix: str = "", *, is_dir: bool = False) -> Path:
    """A hidden temp file (or folder) `.NAME.XXXX.tmp.SUFFIX` in `folder`, created with
    O_EXCL|O_NOFOLLOW (mkstemp) so nothing already there is followed or reused; the name matches
    the pattern `studio run --resume` sweeps up after a killed run."""
    prefix = f".{name[:100]}."  # a long template must not make the temp name overflow NAME_MAX
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's usual mode
    return Path(tmp_name)


def _discard(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _Claim:
    """One temp file published under its final name without clobbering and without following
    a link at that name. `undo()` takes the final name back (the temp is left to be discarded)."""

    def __init__(self, tmp: Path, final: Path):
        self.tmp, self.final = tmp, final
        self.linked = False  # final is a second hard link to tmp (tmp still exists)
        self.moved = False  # tmp was renamed to final

    def take(self, *, overwrite: bool = False, is_dir: bool = False) -> bool:
        """Publish; False when the name is taken (a file, a folder, any symlink, dangling or not)."""
        tmp, final = self.tmp, self.final
        if overwrite:
            if is_dir and final.is_dir() and not final.is_symlink():
                old = _stage(final.parent, final.name, is_dir=True)
                os.rename(final, old / "old")  # aside first: rename cannot replace a full folder
                os.rename(tmp, final)
                _discard(old)
            else:
                os.replace(tmp, final)  # replaces a link at final itself, never its target
            self.moved = True
            return True
        if is_dir:
            # rename() would silently replace an empty folder at final; a folder of frames is
            # never empty, so a concurrent writer's claim fails with ENOTEMPTY below
            if os.path.lexists(final):
                return False
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    return False
                raise
            self.moved = True
            return True
        try:
            # link() is atomic and fails on any existing entry, dangling symlinks included:
            # the no-clobber rename that os.rename lacks
            os.link(tmp, final, follow_symlinks=False)
            self.linked = True
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARDLINKS:
                raise
        # no hard links on this filesystem: claim the name with O_EXCL (which never follows a
        # link either), then rename the temp over our own empty placeholder
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
        self.moved = True
        return True

    def undo(self) -> None:
        if self.linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.final)
        elif self.moved:
            with contextlib.suppress(OSError):
                os.rename(self.final, self.tmp)  # back to its temp name, discarded with the temps
        self.linked = self.moved = False

    def commit(self) -> None:
        if self.linked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def _taken_error(final: Path) -> UsageError:
    kind = "a symbolic link" if final.is_symlink() else "a folder" if final.is_dir() else "a file"
    return UsageError(f"{final} exists ({kind})",
                      "pass --overwrite to replace it (a link is replaced, never written through), or choose another name")


@contextlib.contextmanager
def atomic_path(final: Path, *, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path in final's folder; on success move it to `final` without clobbering
    (unless overwrite) and without following a symlink at `final`. On any error the temp is
    removed and `final` is untouched; a full disk is a RuntimeFailure naming the file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _stage(final.parent, final.stem if not is_dir else final.name, "" if is_dir else final.suffix,
                     is_dir=is_dir)
        yield tmp
        claim = _Claim(tmp, final)
        if not claim.take(overwrite=overwrite, is_dir=is_dir):
            raise _taken_error(final)
        claim.commit()
        tmp = None
    except Exception as exc:
        full = _no_space(exc)
        if full is not None:
            raise disk_full_error(full, final) from exc
        raise
    finally:
        _discard(tmp)


def write_text_file(path: Path, text: str, *, overwrite: bool = False) -> Path:
    """Atomically write a text file the user named (e.g. a caption beside their image). A file,
    folder or symlink (even dangling) at that name is an error unless `overwrite`, which replaces
    the entry itself: a link is never written through."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise _taken_error(path)
    if overwrite and path.is_dir() and not path.is_symlink():
        raise UsageError(f"{path} is a folder", "pass a file name")
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _open_log(path: Path, flags: int) -> int:
    """Open an append-only log (the manifest) without following a symlink and only if it is a
    regular file: a link planted at OUT/manifest.jsonl must not make studio append to (or read
    back) another file, and a FIFO there must not block the run."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENXIO and path.is_symlink()):
            raise UsageError(f"{path} is a symbolic link; studio never writes or reads its manifest through a link",
                             "remove the link (or pass another --out)") from exc
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UsageError(f"{path} is not a regular file", "remove it (or pass another --out)") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UsageError(f"cannot open {path}: {exc.strerror}", "check its permissions (or pass another --out)") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file", "remove it (or pass another --out)")
    os.set_blocking(fd, True)
    return fd


def check_log_path(path: Path) -> None:
    """Refuse early (before minutes of work) a log path that is a symlink or not a regular file."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise UsageError(f"{path} is a symbolic link; studio never writes or reads its manifest through a link",
                             "remove the link (or pass another --out)")
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{path} is not a regular file", "remove it (or pass another --out)")


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock (safe across processes), never through a
    symlink. A line torn by an earlier crash is ended first, so this row starts clean; if this
    write fails (a full disk) the file is cut back to where it was: no torn line is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_jsonable(row), ensure_ascii=False) + "\n").encode("utf-8")
    fd = _open_log(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            full = _no_space(exc) if isinstance(exc, Exception) else None
            if full is not None:
                raise disk_full_error(full, path) from exc
            raise
    finally:
        os.close(fd)  # closing releases the lock


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """Rows of a folder's manifest; a torn line (a crash mid-append) is ignored. A manifest that
    is a symlink is refused rather than trusted."""
    path = Path(out_dir) / MANIFEST
    try:
        fd = _open_log(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        rows = []
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


# --------------------------------------------------------------------------- format writers
def _write_png(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = a1111_parameters(params, meta)
    if text:  # a generated image; a control map or other derived image has no recipe to write
        info.add_text("parameters", text)
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


# --------------------------------------------------------------------------- the request in a file's own tags
# A file's tag (MP4 comment, WAV ID3/INFO comment, FLAC comment, MIDI text event, GIF comment,
# WebP EXIF UserComment) holds the request as JSON, as other tools read it, and under this key
# what `studio replay` needs besides: the task, the model's identity and the device settings.
# So a file replays from its own bytes when its sidecar is gone.
TAG_KEY = "studio"
WAV_INFO_LIMIT = 2000  # libsndfile drops a WAV INFO string past ~2045 bytes; the ID3 chunk has no limit


def request_tag(meta: dict[str, Any], params: dict[str, Any]) -> str:
    """The JSON a file's own tags carry (ASCII: MIDI text events are latin-1)."""
    context: dict[str, Any] = {"task": meta.get("task"), "version": meta.get("studio_version")}
    if meta.get("model"):
        context["model"] = meta["model"]
    requested = (meta.get("device") or {}).get("requested") if isinstance(meta.get("device"), dict) else None
    if requested:
        context["device"] = {"requested": requested}
    return json.dumps(_jsonable({**params, TAG_KEY: context}))


def _from_tag(text: str | bytes | None, default_task: str | None = None) -> dict[str, Any] | None:
    """The metadata (task, params, model, device) a request tag holds; None when it is not one.
    Files from before the tag held its context: default_task where the format says it (MIDI)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    context = data.pop(TAG_KEY, None)
    if isinstance(context, dict) and context.get("task"):
        meta: dict[str, Any] = {"task": context["task"], "params": data, "from": "tags"}
        for key in ("model", "device"):
            if isinstance(context.get(key), dict):
                meta[key] = context[key]
        return meta
    return {"task": default_task, "params": data, "from": "tags"} if default_task else None


def _exif_comment(meta: dict[str, Any]) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x9286] = request_tag(meta, meta.get("params", {}))  # UserComment
    return exif.tobytes()


def _write_audio(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any], fmt: str = "wav") -> None:
    import numpy as np
    import soundfile as sf

    samples, rate = value
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:  # (C, T) -> (T, C) as soundfile expects
        samples = samples.T
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    tag = request_tag(meta, params)
    # tags (WAV INFO / FLAC vorbis comments) are set before the audio: FLAC cannot be reopened r+
    with sf.SoundFile(str(tmp), "w", samplerate=int(rate), channels=channels, format=fmt.upper(),
                      subtype="PCM_16" if fmt == "wav" else None) as f:
        if fmt != "wav" or len(tag) <= WAV_INFO_LIMIT:  # a cut JSON is worse than none: ID3 holds it whole
            f.comment = tag
        f.software = "studio"
        f.write(samples)
    if fmt == "wav":
        # an ID3 chunk (as ffmpeg, mutagen and most players read in WAV) holds the tag at any length
        from mutagen.id3 import TIT2, TSSE, TXXX
        from mutagen.wave import WAVE

        wave = WAVE(str(tmp))
        wave.add_tags()
        wave.tags.add(TXXX(encoding=3, desc=TAG_KEY, text=[tag]))
        wave.tags.add(TSSE(encoding=3, text=["studio"]))
        if params.get("prompt"):
            wave.tags.add(TIT2(encoding=3, text=[str(params["prompt"])]))
        wave.save()


def _write_midi(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any]) -> None:
    import pretty_midi

    if isinstance(value, (bytes, bytearray)):
        tmp.write_bytes(value)
        return
    midi: pretty_midi.PrettyMIDI = value
    # the request as a text meta event, so the file carries its own settings
    midi.text_events = [e for e in midi.text_events if not e.text.startswith("studio:")]
    midi.text_events.append(pretty_midi.Text("studio:" + request_tag(meta, params), 0.0))
    midi.write(str(tmp))


def frame_delays(n: int, fps: float, tick_ms: int) -> list[int]:
    """Per-frame delays in ms, whole multiples of `tick_ms`, whose running sum stays within one
    tick of the true time: GIF delays are centiseconds (tick 10), so 8 fps is 12.5 cs a frame
    and a fixed 12 would play 4% fast. As ffmpeg's GIF muxer does, frame i ends at
    floor((i+1) / fps) ticks, so 8 fps becomes 120, 130, 120, 130 ms and the clip keeps its rate."""
    from fractions import Fraction

    per_frame = Fraction(1000, tick_ms) / Fraction(fps).limit_denominator(100000)  # ticks per frame
    ends = [int((i + 1) * per_frame) for i in range(n)]  # floor: ticks are never negative
    return [(end - start) * tick_ms for start, end in zip([0] + ends[:-1], ends)]


def _write_video(tmp: Path, value: Any, meta: dict[str, Any], params: dict[str, Any], fmt: str = "mp4") -> None:
    import numpy as np

    frames = [np.asarray(f.convert("RGB")) for f in value]
    fps = float(params.get("fps") or 8)
    if fmt == "mp4":
        import imageio.v2 as iio2

        comment = request_tag(meta, params)
        # +faststart: ffmpeg moves the index (moov) before the data (mdat) once the frames are
        # written, so a browser or player can start before the whole file has arrived
        writer = iio2.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                 pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
                                 output_params=["-metadata", f"comment={comment}", "-movflags", "+faststart"])
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    elif fmt in ("gif", "webp"):
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        # GIF counts in centiseconds, WebP in milliseconds: either way the rounding is carried
        # from frame to frame so the clip lasts len/fps seconds
        durations = frame_delays(len(images), fps, 10 if fmt == "gif" else 1)
        if fmt == "gif":
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                           comment=request_tag(meta, params))
        else:
            images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=durations,
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
        # --out itself may be a link the user made; what studio writes must stay inside where it points
        self.root = Path(os.path.realpath(self.out_dir))
        if self.manifest:
            check_log_path(self.out_dir / MANIFEST)  # a planted link fails now, not after the run

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
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise UsageError(f"bad name template {self.template!r}: {exc}",
                             "fields: {date} {time} {task} {seed} {slug} {index} {model}") from exc

    def _folder_for(self, name: str) -> tuple[Path, str]:
        """(folder, file stem) for a rendered name, folders created one by one, each checked to
        resolve inside --out before anything is created below it: a template (or a field in it)
        with `..` or a leading `/`, or a symlinked subfolder, never writes elsewhere."""
        outside = UsageError(f"output name {name!r} (template {self.template!r}) would write outside --out {self.out_dir}",
                             "use a template without '..' or a leading '/', e.g. {date}-{task}-{seed}-{slug}")
        parts = name.replace("\\", "/").split("/")
        if "\x00" in name or os.path.isabs(name) or name.startswith("/") or any(p == ".." for p in parts):
            raise outside
        parts = [p for p in parts if p not in ("", ".")]
        if not parts:
            raise UsageError(f"bad name template {self.template!r}: it names no file", "e.g. {date}-{task}-{seed}-{slug}")
        folder = self.out_dir
        for part in parts[:-1]:
            folder = folder / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
            if not within(folder, self.root):
                raise UsageError(f"{folder} is a link to {os.path.realpath(folder)}, outside --out {self.out_dir}",
                                 "studio writes only inside --out: remove the link or change the name template")
            if not folder.is_dir():
                raise UsageError(f"{folder} is a file, not a folder", f"change the name template {self.template!r}")
        if not within(folder, self.root):  # --out swapped for a link since the writer was made
            raise outside
        return folder, parts[-1]

    @staticmethod
    def sidecar_for(final: Path, suffix: str) -> Path:
        """NAME.json beside NAME.png; a JSON output's own sidecar is NAME.meta.json."""
        stem = final.name.removesuffix(suffix) if suffix else final.name
        return final.with_name(stem + (".meta.json" if suffix == ".json" else ".json"))

    def metadata(self, result: Result) -> dict[str, Any]:
        return {
            "studio_version": library_versions().get("studio"),
            "task": self.task,
            "params": result.params,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            **result.extra,
            "versions": library_versions(),
        }

    @staticmethod
    def _encode(result: Result, fmt: str, tmp: Path, meta: dict[str, Any]) -> None:
        params = result.params
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

    def write(self, result: Result, index: int = 0) -> Path:
        """Write one output, its companions and its sidecar, then its manifest row; all or nothing.

        1. encode everything into hidden temp files (a full disk fails here, nothing published)
        2. claim the final names (output, companions, sidecar) with no-clobber links; a name any
           entry holds (another process's output, a dangling symlink) moves all of them on to
           the next free `-N`
        3. append the manifest row; if that fails, the claimed names are taken back
        """
        fmt = (result.fmt or {"image": "png", "audio": "wav", "midi": "mid", "video": "mp4", "text": "txt",
                              "json": "json"}.get(result.kind, "bin")).lower()
        suffix = "" if fmt == "frames" else f".{fmt}"
        is_dir = fmt == "frames"
        folder, stem = self._folder_for(self._name(result, index))
        meta = self.metadata(result)
        params = result.params
        started = time.perf_counter()
        temps: list[Path] = []
        claims: list[_Claim] = []
        final = folder / f"{stem}{suffix}"
        current = final  # what was being written when something failed: the error names it
        try:
            # 1. encode
            main = _stage(folder, stem, suffix, is_dir=is_dir)
            temps.append(main)
            self._encode(result, fmt, main, meta)
            digest = sha256_file(main) if not is_dir else None
            staged_companions = []
            for name, value in result.companions.items():
                is_audio = isinstance(value, tuple)  # (samples, rate): e.g. a MIDI's rendering, NAME.render.wav
                ext = ".wav" if is_audio else ".png"
                tmp = _stage(folder, f"{stem}.{name}", ext)
                temps.append(tmp)
                if is_audio:
                    _write_audio(tmp, value, meta, params, "wav")
                else:
                    value.save(tmp, format="PNG")
                staged_companions.append((name, ext, tmp))
            side_tmp = _stage(folder, stem, ".json") if self.sidecar else None
            if side_tmp is not None:
                temps.append(side_tmp)

            # 2. claim names
            n = 0
            while True:
                base = stem if n == 0 else f"{stem}-{n}"
                n += 1
                final = folder / f"{base}{suffix}"
                wanted = [(main, final)] + [(tmp, folder / f"{base}.{name}{ext}") for name, ext, tmp in staged_companions]
                sidecar = self.sidecar_for(final, suffix)
                if side_tmp is not None:
                    wanted.append((side_tmp, sidecar))
                if not self.overwrite and any(os.path.lexists(p) for _, p in wanted):
                    continue  # a cheap pre-check; the claims below are what decide
                meta["file"] = final.name
                if staged_companions:
                    meta["companions"] = {name: f"{base}.{name}{ext}" for name, ext, _ in staged_companions}
                meta["write_seconds"] = round(time.perf_counter() - started, 4)
                if side_tmp is not None:
                    current = sidecar
                    side_tmp.write_text(json.dumps(_jsonable(meta), indent=2, ensure_ascii=False), encoding="utf-8")
                current = final
                claims = []
                for tmp, target in wanted:
                    claim = _Claim(tmp, target)
                    if not claim.take(overwrite=self.overwrite, is_dir=is_dir and tmp is main):
                        break
                    claims.append(claim)
                else:
                    break
                for claim in reversed(claims):  # lost a race for one name: give back the rest
                    claim.undo()
                claims = []

            # 3. the manifest row
            if self.manifest:
                current = self.out_dir / MANIFEST
                row = {"file": final.relative_to(self.out_dir).as_posix(), "task": self.task,
                       "seed": params.get("seed"), "params": params, "model": result.extra.get("model"),
                       "created": meta["created"]}
                if digest is not None:
                    row["sha256"] = digest
                if result.extra.get("job"):
                    row["job"] = result.extra["job"]
                append_jsonl(self.out_dir / MANIFEST, row)
        except BaseException as exc:
            for claim in reversed(claims):
                claim.undo()
            for tmp in temps:
                _discard(tmp)
            full = _no_space(exc) if isinstance(exc, Exception) else None
            if full is not None:
                raise disk_full_error(full, current, f"{final.name} was not kept; outputs written before it are complete") from exc
            if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
                raise UsageError(f"output name {final.name!r} is too long for the filesystem",
                                 f"use a shorter name template than {self.template!r}") from exc
            raise
        for claim in claims:
            claim.commit()
        for tmp in temps:
            _discard(tmp)
        result.path = final
        result.metadata = meta
        return final


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The studio metadata of an output: its sidecar, else the PNG `studio` chunk, else the request
    tag in the file itself (MP4/GIF/WebP/WAV/FLAC/MIDI), which holds task, params, model and device."""
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
    found = _read_tag(path)
    if found is not None:
        return found
    raise UsageError(f"{path.name} carries no studio metadata (no sidecar, no request in its tags)",
                     "replay works on files studio wrote: PNG, MP4, GIF, WebP, WAV, FLAC and MIDI carry the request")


def _read_tag(path: Path) -> dict[str, Any] | None:
    """The request tag of a MIDI, MP4, WAV/FLAC, GIF or WebP file (see request_tag), or None."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".mid", ".midi"):
            import pretty_midi

            for event in pretty_midi.PrettyMIDI(str(path)).text_events:
                if event.text.startswith("studio:"):
                    return _from_tag(event.text[len("studio:"):], default_task="music-midi")
        elif suffix in (".mp4", ".m4v", ".mov"):
            return _from_tag(_mp4_comment(path))
        elif suffix in (".wav", ".flac", ".ogg"):
            if suffix == ".wav":
                from mutagen.wave import WAVE

                tags = WAVE(str(path)).tags
                frames = tags.getall(f"TXXX:{TAG_KEY}") if tags is not None else []
                if frames:
                    return _from_tag(frames[0].text[0])
            import soundfile as sf

            with sf.SoundFile(str(path)) as f:
                return _from_tag(f.comment)
        elif suffix in (".gif", ".webp"):
            from PIL import Image

            with Image.open(path) as im:
                text = im.info.get("comment") if suffix == ".gif" else im.getexif().get(0x9286)
            return _from_tag(text)
    except Exception:  # an unreadable or foreign file: no tag, the caller says so in one line
        return None
    return None


def _mp4_comment(path: Path) -> str | None:
    """An MP4's `comment` tag, read with the ffmpeg imageio-ffmpeg ships (no system ffmpeg)."""
    import subprocess

    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        if line.startswith("comment="):
            # ffmetadata escapes '=', ';', '#', '\\' and newlines with a backslash
            return re.sub(r"\\(.)", r"\1", line[len("comment="):], flags=re.S)
    return None
