"""An output folder's manifest.jsonl as the batch runner reads and writes it: which jobs finished
(a `job-done` row listing each output and its sha256), which outputs the writer recorded for each
job, and what `--resume` may clean up after an interrupted run.

The manifest is data from disk, so nothing in it is trusted: a row's file name counts only when it
is a relative name inside the folder (no `..`, not absolute), the manifest itself is opened
without following a symlink (studio.outputs.read_manifest), and a file is removed only when it is
a regular file, reached from --out without following any symlink on the way (the folders are
opened one by one with O_NOFOLLOW and the file is removed through its folder's descriptor), whose
sha256 is the one the manifest recorded for it. Anything else stays, with a note saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

from studio.batch.model import Output
from studio.outputs import MANIFEST, OutputWriter, append_jsonl, read_manifest, read_metadata

# what the writer's temp files look like: `.NAME.` + mkstemp's 8 random characters + `.tmp[.ext]`
TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
KINDS = ("image", "text", "audio", "video", "midi", "json", "file")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def safe_name(name: Any) -> bool:
    """A recorded file name that stays inside the folder: relative, without `..`, `\\` or NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


@contextlib.contextmanager
def _folder(out_dir: Path, name: str) -> Iterator[tuple[int, str] | str]:
    """(descriptor of the folder holding `name`, the last part of `name`), reached from `out_dir`
    opening each folder with O_NOFOLLOW; or why it cannot be reached ("" when it is not there)."""
    fds: list[int] = []
    found: tuple[int, str] | str
    try:
        fds.append(os.open(out_dir, _DIR))  # --out itself may be a link: the user chose it
        for part in name.split("/")[:-1]:
            fds.append(os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fds[-1]))
        found = (fds[-1], name.rsplit("/", 1)[-1])
    except FileNotFoundError:
        found = ""
    except OSError:  # ELOOP, ENOTDIR: a link, or a file where a folder should be
        found = "a folder on its way is a symbolic link or not a folder"
    try:
        yield found
    finally:
        for fd in fds:
            os.close(fd)


def _lstat_at(dfd: int, leaf: str) -> os.stat_result | None:
    try:
        return os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_at(dfd: int, leaf: str) -> int:
    """A regular file in the folder `dfd`, opened without following a link (nor hanging on a FIFO)."""
    fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(leaf)
    return fd


def _sha256_at(dfd: int, leaf: str) -> str:
    h = hashlib.sha256()
    with os.fdopen(_open_at(dfd, leaf), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_at(dfd: int, leaf: str) -> Any:
    with contextlib.suppress(OSError, ValueError):
        with os.fdopen(_open_at(dfd, leaf), "rb") as f:
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
                if not safe_name(row["file"]):
                    self.outside += 1
                    continue
                job = row.get("job") if isinstance(row.get("job"), str) else None
                self.tracked[row["file"]] = job
                self.hashes[row["file"]] = row.get("sha256") if isinstance(row.get("sha256"), str) else None
                if job:
                    self.files.setdefault(job, []).append(row["file"])

    # ------------------------------------------------------------------ writing
    def append(self, row: dict[str, Any]) -> None:
        """Append one row (job-done, job-failed, job-blocked): the one place the runner writes it.
        append_jsonl locks, never follows a link, and ends a torn line before it writes."""
        append_jsonl(self.path, row)

    def relative(self, path: Path) -> str:
        """How a row names an output: its path below the folder."""
        try:
            return Path(path).relative_to(self.out_dir).as_posix()
        except ValueError:
            return Path(path).name

    # ------------------------------------------------------------------ reading back
    def verified(self, tag: str) -> list[Output] | None:
        """The job's outputs when its record is there and every file still matches its sha256."""
        record = self.done.get(tag)
        if record is None:
            return None
        outputs = []
        for item in record.get("outputs") or []:
            if not isinstance(item, dict) or not safe_name(item.get("file")) or item.get("kind") not in KINDS:
                return None
            sha = item.get("sha256")
            with _folder(self.out_dir, item["file"]) as found:
                if isinstance(found, str):
                    return None
                st = _lstat_at(*found)
                if st is None or stat.S_ISLNK(st.st_mode):
                    return None
                if sha is None and not stat.S_ISDIR(st.st_mode):  # only a frames folder has no hash
                    return None
                if sha is not None and (not stat.S_ISREG(st.st_mode) or _sha256_at(*found) != sha):
                    return None
            outputs.append(Output(kind=item["kind"], path=self.out_dir / item["file"], sha256=sha))
        return outputs

    # ------------------------------------------------------------------ cleaning up
    def clear_stale_temps(self) -> int:
        """Remove the writer's temp files that a killed run left (kill -9, power loss), in the
        folder and in its subfolders that hold recorded outputs."""
        removed = 0
        folders = {""} | {name.rsplit("/", 1)[0] for name in self.tracked if "/" in name}
        for folder in sorted(folders):
            with _folder(self.out_dir, f"{folder}/x" if folder else "x") as found:
                if isinstance(found, str):
                    continue
                dfd = found[0]
                for entry in os.scandir(dfd):
                    if not TEMP.match(entry.name) or entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.name, dir_fd=dfd, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=dfd)
                    removed += 1
        return removed

    def clear_leftovers(self, job_name: str, tag: str) -> tuple[int, list[str]]:
        """Outputs of an attempt at this very job (same name and key) that has no job-done record
        (killed mid-job), or whose record no longer verifies: the redo replaces them, so that each
        output exists once. Returns (how many were removed, a note for each one kept)."""
        removed, notes = 0, []
        for name in dict.fromkeys(self.files.get(tag, [])):
            gone, why = self._remove_recorded(name, tag)
            removed += gone
            if why:
                notes.append(f"keeping {self.out_dir / name}: {why}")
        # written but killed before its manifest row: the file's own metadata names this very job
        # (its name and parameter key), which no file of the user's carries
        for entry in sorted(os.scandir(self.out_dir), key=lambda e: e.name) if self.out_dir.is_dir() else []:
            if (entry.name in self.tracked or not entry.name.startswith(job_name) or entry.name.startswith(".")
                    or entry.name.endswith(".json") or not entry.is_file(follow_symlinks=False)):
                continue
            with contextlib.suppress(Exception):
                if read_metadata(entry.path).get("job") == tag:
                    with _folder(self.out_dir, entry.name) as found:
                        if not isinstance(found, str):
                            os.unlink(found[1], dir_fd=found[0])
                            self._remove_beside(*found, tag)
                            removed += 1
        return removed, notes

    def _remove_recorded(self, name: str, tag: str) -> tuple[int, str | None]:
        """Remove one recorded output of `tag` (and its sidecar and companions) when it is exactly
        what studio wrote: (1 if removed else 0, why it stays)."""
        with _folder(self.out_dir, name) as found:
            if isinstance(found, str):
                return 0, found or None
            dfd, leaf = found
            st = _lstat_at(dfd, leaf)
            if st is None:  # deleted by the user: its sidecar goes too, freeing the name
                self._remove_beside(dfd, leaf, tag)
                return 0, None
            if stat.S_ISLNK(st.st_mode):
                return 0, "it is a symbolic link, not the file studio wrote"
            if not stat.S_ISREG(st.st_mode):
                return 0, "it is not a regular file (a frames folder has no recorded sha256)"
            recorded = self.hashes.get(name)
            if recorded is None:
                return 0, "the manifest records no sha256 for it (an older studio wrote it); delete it yourself if unwanted"
            if _sha256_at(dfd, leaf) != recorded:
                return 0, "it changed since studio wrote it"
            os.unlink(leaf, dir_fd=dfd)
            self._remove_beside(dfd, leaf, tag)
            return 1, None

    def _remove_beside(self, dfd: int, leaf: str, tag: str) -> None:
        """The sidecar and companion files the writer put beside an output of this job, when the
        sidecar says it belongs to this job."""
        suffix = Path(leaf).suffix
        sidecar = OutputWriter.sidecar_for(Path(leaf), suffix).name
        meta = _json_at(dfd, sidecar)
        if not isinstance(meta, dict) or meta.get("job") != tag:
            return
        stem = leaf.removesuffix(suffix) if suffix else leaf
        for companion in (meta.get("companions") or {}).values():
            # the writer names them NAME.what.png / NAME.what.wav, beside NAME
            if isinstance(companion, str) and "/" not in companion and companion.startswith(stem + "."):
                cst = _lstat_at(dfd, companion)
                if cst is not None and stat.S_ISREG(cst.st_mode):
                    os.unlink(companion, dir_fd=dfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar, dir_fd=dfd)
