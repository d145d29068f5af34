"""An output folder's manifest.jsonl as the batch runner reads and writes it: which jobs finished
(a `job-done` row listing each output and its sha256), which outputs the writer recorded for each
job, and what `--resume` may clean up after an interrupted run.

The manifest is data from disk, so nothing in it is trusted: a row's file name counts only when it
is a plain name inside the folder, the manifest itself is opened without following a symlink, and a
file is removed only when it is a regular file (not a symlink, not a folder) whose sha256 is the
one the manifest recorded for it. Anything else stays where it is, with a note saying why.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from studio.batch.model import Output
from studio.errors import UsageError
from studio.outputs import MANIFEST, OutputWriter, append_jsonl, read_manifest, read_metadata, within

# what atomic_path leaves when its process dies: `.NAME.` + mkstemp's 8 random characters + `.tmp[.ext]`
TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
KINDS = ("image", "text", "audio", "video", "midi", "json", "file")


def plain_name(name: Any) -> bool:
    """A file name that stays inside the folder it is joined to (no `..`, `/`, or absolute path)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _open(path: Path, flags: int) -> int:
    """os.open that refuses a symlink (and does not hang on a FIFO) at the final name."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symbolic link; studio does not follow links in an output folder",
                             "remove the link, or pass another --out") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file", "remove it, or pass another --out")
    return fd


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(_open(path, os.O_RDONLY), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    with contextlib.suppress(OSError, UsageError, ValueError):
        with os.fdopen(_open(path, os.O_RDONLY), "rb") as f:
            return json.loads(f.read(1 << 22).decode("utf-8"))
    return None


class Manifest:
    """What an output folder's manifest.jsonl says: outputs by job, and finished jobs."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.done: dict[str, dict[str, Any]] = {}  # job tag -> its last job-done record
        self.files: dict[str, list[str]] = {}  # job tag -> output files the writer recorded
        self.tracked: dict[str, str | None] = {}  # file -> job tag, for every recorded output
        self.hashes: dict[str, str | None] = {}  # file -> sha256 the writer recorded (None: none)
        self.outside = 0  # rows naming a file outside the folder (ignored)
        for row in read_manifest(self.out_dir):  # opened without following a link
            if row.get("event") == "job-done" and isinstance(row.get("job"), str):
                self.done[row["job"]] = row
            elif "file" in row and not row.get("event"):
                if not plain_name(row["file"]):
                    self.outside += 1
                    continue
                job = row.get("job") if isinstance(row.get("job"), str) else None
                self.tracked[row["file"]] = job
                self.hashes[row["file"]] = row.get("sha256") if isinstance(row.get("sha256"), str) else None
                if job:
                    self.files.setdefault(job, []).append(row["file"])

    # ------------------------------------------------------------------ writing
    def append(self, row: dict[str, Any]) -> None:
        """Append one row (job-done, job-failed, job-blocked): the one place the runner writes it."""
        append_jsonl(self.path, row)

    def repair(self) -> None:
        """A run killed mid-append can leave a torn last line; end it so the next row starts clean."""
        try:
            fd = _open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size == 0:
                    return
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
                    f.flush()
                    os.fsync(fd)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading back
    def verified(self, tag: str) -> list[Output] | None:
        """The job's outputs when its record is there and every file still matches its sha256."""
        record = self.done.get(tag)
        if record is None:
            return None
        outputs = []
        for item in record.get("outputs") or []:
            if not isinstance(item, dict) or not plain_name(item.get("file")) or item.get("kind") not in KINDS:
                return None
            path = self.out_dir / item["file"]
            st = _lstat(path)
            if st is None or stat.S_ISLNK(st.st_mode):
                return None
            sha = item.get("sha256")
            if sha is not None and (not stat.S_ISREG(st.st_mode) or _sha256(path) != sha):
                return None
            if sha is None and not stat.S_ISDIR(st.st_mode):
                return None
            outputs.append(Output(kind=item["kind"], path=path, sha256=sha))
        return outputs

    # ------------------------------------------------------------------ cleaning up
    def clear_stale_temps(self) -> int:
        """Remove temp files an atomic write left when its process was killed (kill -9, power loss)."""
        removed = 0
        for path in sorted(self.out_dir.iterdir()) if self.out_dir.is_dir() else []:
            st = _lstat(path) if TEMP.match(path.name) else None
            if st is None or stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks links inside, never follows them
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed

    def clear_leftovers(self, job_name: str, tag: str) -> tuple[int, list[str]]:
        """Outputs of an attempt at this very job (same name and key) that has no job-done record
        (killed mid-job), or whose record no longer verifies: the redo replaces them, so that each
        output exists once. Returns (how many were removed, a note for each one kept)."""
        removed, notes = 0, []
        for name in self.files.get(tag, []):
            path = self.out_dir / name
            st = _lstat(path)
            if st is None:  # deleted by the user: its sidecar goes too, freeing the name
                self._remove_beside(path, tag)
                continue
            why = self._keep_reason(path, st, self.hashes.get(name))
            if why:
                notes.append(f"keeping {path}: {why}")
                continue
            path.unlink(missing_ok=True)
            self._remove_beside(path, tag)
            removed += 1
        # written but killed before its manifest row: the file's own metadata names this very job
        # (name and parameter key), which no file of the user's carries
        for path in sorted(self.out_dir.iterdir()) if self.out_dir.is_dir() else []:
            if (path.name in self.tracked or not path.name.startswith(job_name) or path.name.startswith(".")
                    or path.name.endswith(".json")):
                continue
            st = _lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            with contextlib.suppress(Exception):
                if read_metadata(path).get("job") == tag:
                    path.unlink(missing_ok=True)
                    self._remove_beside(path, tag)
                    removed += 1
        return removed, notes

    def _keep_reason(self, path: Path, st: os.stat_result, recorded: str | None) -> str | None:
        """Why a recorded output must stay (None: it is exactly what studio wrote, so it may go)."""
        if stat.S_ISLNK(st.st_mode):
            return "it is a symbolic link, not the file studio wrote"
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file (a folder has no recorded sha256)"
        if not within(path, self.out_dir):
            return "it lies outside the output folder"
        if recorded is None:
            return "the manifest records no sha256 for it (written by an older studio); delete it yourself if it is not wanted"
        if _sha256(path) != recorded:
            return "it changed since studio wrote it"
        return None

    def _remove_beside(self, path: Path, tag: str) -> None:
        """The sidecar and companion files the writer put beside an output of this job."""
        sidecar = OutputWriter.sidecar_for(path, path.suffix)
        st = _lstat(sidecar)
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        meta = _read_json(sidecar)
        if not isinstance(meta, dict) or meta.get("job") != tag:
            return  # not this job's sidecar: leave it
        for name in (meta.get("companions") or {}).values():
            companion = path.parent / str(name)
            if plain_name(name) and str(name).startswith(path.stem + "."):
                cst = _lstat(companion)
                if cst is not None and stat.S_ISREG(cst.st_mode):
                    companion.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
