"""MIDI data that training and evaluation share: the MIDI files of a folder, or the Bach
chorales that ship in music21's corpus (converted to MIDI once and cached). It sits at the
pipelines level, below pipelines/training/, because `studio music eval --reference bach` reads
it too and inference-level code never imports the training layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.errors import InputFileError
from studio.outputs import atomic_path

MIDI_SUFFIXES = (".mid", ".midi", ".MID", ".MIDI")


def bach_chorales_midi(cache_dir: Path, limit: int | None = None, progress: Any = None) -> list[Path]:
    """The Bach chorales of music21's corpus as MIDI files, converted once and cached."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = cache_dir / "chorales.json"  # the corpus listing, so a warm cache never imports music21 (~3 s)
    names = json.loads(index.read_text()) if index.exists() else None
    if names is None:
        from music21 import corpus

        names = list(corpus.chorales.Iterator(returnType="filename"))  # 371 chorales, Riemenschneider order
        with atomic_path(index, overwrite=True) as tmp:
            tmp.write_text(json.dumps(names))
    if limit:
        names = names[:limit]
    paths: list[Path] = []
    todo = [(n, cache_dir / (n.replace("/", "-") + ".mid")) for n in names]
    missing = [(n, p) for n, p in todo if not p.exists()]
    handle = progress.task("converting Bach chorales to MIDI", total=len(missing)) if (progress and missing) else None
    failed = 0
    for name, path in todo:
        if not path.exists():
            from music21 import corpus
            from music21.midi import translate

            try:
                midi_bytes = translate.streamToMidiFile(corpus.parse(name)).writestr()
            except Exception:  # a chorale music21 cannot translate: skip it, count it
                failed += 1
                midi_bytes = None
            if midi_bytes:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(midi_bytes)
            if handle:
                handle.advance(1)
        if path.exists():
            paths.append(path)
    if failed and progress is not None:
        progress.note(f"{failed} chorale(s) could not be converted and were skipped")
    return paths


def midi_files(data: str, *, limit: int | None = None, progress: Any = None) -> list[Path]:
    """The training files: `bach`, or the MIDI files under a folder (recursively), sorted."""
    from studio.paths import studio_home

    if data == "bach":
        return bach_chorales_midi(studio_home() / "cache" / "bach-chorales", limit, progress)
    folder = Path(data).expanduser()
    if not folder.exists():
        raise InputFileError(f"--data {folder} does not exist", "pass a folder of .mid files, or `bach`")
    if folder.is_file():
        files = [folder] if folder.suffix in MIDI_SUFFIXES else []
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix in MIDI_SUFFIXES and p.is_file())
    if not files:
        raise InputFileError(f"--data {folder} holds no MIDI files (.mid, .midi)", "pass a folder of .mid files, or `bach`")
    return files[:limit] if limit else files
