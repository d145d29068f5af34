"""Music statistics for `studio eval music`: the objective measures of Yang & Lerch, "On the
evaluation of generative models in music" (2018) and the C-RNN-GAN/MuseGAN line, computed from
MIDI with pretty_midi.

Per file:
- pitch_class_histogram: share of (pitched) notes on each of the 12 pitch classes, C first;
- kl_to_reference: KL(file || reference) of those histograms (smoothed), when a reference is given;
- scale_consistency: the largest share of notes inside one major or natural-minor scale, and that key;
- in_key_ratio: the share of notes inside the key the file asked for (its recorded --key), if any;
- note_density: notes per second and per bar;
- polyphony: mean number of notes sounding while any sounds (time-weighted), and the maximum;
- pitch_range: lowest, highest and span in semitones;
- chord_tone_ratio: per bar, the share of notes starting in the bar that belong to its chord
  (when chords were asked for: read from the file's recorded request or given with --chords).

Drum tracks are left out of every pitch measure. The reference is a folder of MIDI files or
`bach` (music21's chorales, converted once and cached).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from studio.errors import InputFileError, UsageError

PITCH_CLASSES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
SMOOTHING = 1e-6  # added to every bin before KL so empty bins do not give infinity


def pitched_notes(midi: Any) -> list[Any]:
    return [n for inst in midi.instruments if not inst.is_drum for n in inst.notes]


def pitch_class_histogram(midi: Any) -> list[float]:
    counts = [0] * 12
    for n in pitched_notes(midi):
        counts[n.pitch % 12] += 1
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * 12


def kl_divergence(p: list[float], q: list[float]) -> float:
    """KL(p || q) in nats, both smoothed and renormalised."""
    ps = [x + SMOOTHING for x in p]
    qs = [x + SMOOTHING for x in q]
    sp, sq = sum(ps), sum(qs)
    return float(sum((a / sp) * math.log((a / sp) / (b / sq)) for a, b in zip(ps, qs)))


def scale_consistency(midi: Any) -> dict[str, Any]:
    from studio.pipelines.music_symbolic import SCALES

    notes = pitched_notes(midi)
    if not notes:
        return {"ratio": None, "key": None}
    best = (-1.0, "")
    for tonic in range(12):
        for mode in ("major", "minor"):
            pcs = {(tonic + s) % 12 for s in SCALES[mode]}
            ratio = sum(1 for n in notes if n.pitch % 12 in pcs) / len(notes)
            if ratio > best[0]:
                best = (ratio, f"{PITCH_CLASSES[tonic]}:{mode}")
    return {"ratio": round(best[0], 4), "key": best[1]}


def in_key_ratio(midi: Any, key: str) -> float | None:
    from studio.pipelines.music_symbolic import parse_key

    notes = pitched_notes(midi)
    if not notes:
        return None
    scale = parse_key(key)[2]
    return sum(1 for n in notes if n.pitch % 12 in scale) / len(notes)


def bar_starts(midi: Any) -> list[float]:
    """Downbeat times from the file's tempo and time-signature map (pretty_midi)."""
    downbeats = [float(t) for t in midi.get_downbeats()]
    return downbeats or [0.0]


def note_density(midi: Any) -> dict[str, float | None]:
    notes = pitched_notes(midi) + [n for inst in midi.instruments if inst.is_drum for n in inst.notes]
    end = midi.get_end_time()
    bars = len([b for b in bar_starts(midi) if b < end]) or 1
    return {"notes": len(notes), "per_second": round(len(notes) / end, 4) if end > 0 else None,
            "per_bar": round(len(notes) / bars, 4), "bars": bars, "seconds": round(end, 4)}


def polyphony(midi: Any) -> dict[str, float | int | None]:
    """Time-weighted mean of simultaneously sounding notes over the time any note sounds."""
    events = []
    for n in pitched_notes(midi):
        if n.end > n.start:
            events += [(n.start, 1), (n.end, -1)]
    if not events:
        return {"mean": None, "max": 0}
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    active, last, weighted, sounding, peak = 0, events[0][0], 0.0, 0.0, 0
    for t, delta in events:
        if active > 0:
            weighted += active * (t - last)
            sounding += t - last
        active += delta
        peak = max(peak, active)
        last = t
    return {"mean": round(weighted / sounding, 4) if sounding > 0 else None, "max": peak}


def pitch_range(midi: Any) -> dict[str, int | None]:
    pitches = [n.pitch for n in pitched_notes(midi)]
    if not pitches:
        return {"low": None, "high": None, "span": None}
    return {"low": min(pitches), "high": max(pitches), "span": max(pitches) - min(pitches)}


def chord_tone_ratio(midi: Any, chords: str, first_bar: int = 0) -> dict[str, Any]:
    """Per bar from `first_bar`: share of notes starting in the bar whose pitch class is in the
    bar's chord (chords cycle, one per bar, as `studio music midi --chords` writes them)."""
    from studio.pipelines.music_symbolic import parse_chords

    parsed = parse_chords(chords)
    starts = bar_starts(midi)
    end = midi.get_end_time()
    bounds = starts + [max(end, starts[-1]) + 1e-9]
    notes = pitched_notes(midi)
    per_bar = []
    for b in range(first_bar, len(starts)):
        lo, hi = bounds[b], bounds[b + 1]
        in_bar = [n for n in notes if lo - 1e-6 <= n.start < hi - 1e-6]
        if not in_bar:
            continue
        symbol, pcs = parsed[(b - first_bar) % len(parsed)]
        ratio = sum(1 for n in in_bar if n.pitch % 12 in pcs) / len(in_bar)
        per_bar.append({"bar": b, "chord": symbol, "notes": len(in_bar), "ratio": round(ratio, 4)})
    ratios = [r["ratio"] for r in per_bar]
    return {"per_bar": per_bar, "mean": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "min": min(ratios) if ratios else None}


def recorded_request(path: Path, midi: Any) -> dict[str, Any]:
    """The request studio recorded in the file (text event) or its sidecar, if any."""
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("params"), dict):
                return {**data["params"], "_primer_bars": (data.get("music") or {}).get("primer_bars")}
        except (json.JSONDecodeError, OSError):
            pass
    for event in midi.text_events:
        if event.text.startswith("studio:"):
            try:
                return json.loads(event.text[len("studio:"):])
            except json.JSONDecodeError:
                pass
    return {}


def analyse(path: Path, *, reference: list[float] | None = None, key: str | None = None,
            chords: str | None = None) -> dict[str, Any]:
    from studio.pipelines.music_render import load_midi

    midi = load_midi(path)
    asked = recorded_request(path, midi)
    key = key or asked.get("key")
    chords = chords or asked.get("chords")
    hist = pitch_class_histogram(midi)
    row: dict[str, Any] = {
        "file": str(path),
        "pitch_class_histogram": dict(zip(PITCH_CLASSES, [round(x, 4) for x in hist])),
        "scale_consistency": scale_consistency(midi),
        "note_density": note_density(midi),
        "polyphony": polyphony(midi),
        "pitch_range": pitch_range(midi),
    }
    if reference is not None:
        row["kl_to_reference"] = round(kl_divergence(hist, reference), 5) if any(hist) else None
    if key:
        ratio = in_key_ratio(midi, key)
        row["in_key_ratio"] = {"key": key, "ratio": round(ratio, 4) if ratio is not None else None}
    if chords:
        row["chord_tone_ratio"] = chord_tone_ratio(midi, chords, int(asked.get("_primer_bars") or 0))
    return row


def collect(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise InputFileError(f"{p} does not exist", "pass MIDI files or folders of them")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".mid", ".midi") and f.is_file())
        else:
            files.append(p)
    if not files:
        raise InputFileError("no MIDI files to evaluate", "pass .mid files or a folder holding them")
    return files


def reference_histogram(reference: str, *, limit: int | None = None, progress: Any = None) -> dict[str, Any]:
    """The pooled pitch-class histogram of a reference set (note counts summed over files)."""
    from studio.pipelines.music_render import load_midi
    from studio.pipelines.midi_corpus import midi_files

    files = midi_files(reference, limit=limit, progress=progress)
    counts = [0] * 12
    used = 0
    for f in files:
        try:
            midi = load_midi(f)
        except InputFileError:
            continue
        notes = pitched_notes(midi)
        for n in notes:
            counts[n.pitch % 12] += 1
        used += 1 if notes else 0
    total = sum(counts)
    if not total:
        raise UsageError(f"the reference {reference} holds no pitched notes", "pass a folder of MIDI files, or bach")
    return {"name": reference, "files": used, "histogram": [c / total for c in counts]}


def evaluate(paths: list[str | Path], *, reference: str | None = None, reference_limit: int | None = None,
             key: str | None = None, chords: str | None = None, progress: Any = None) -> dict[str, Any]:
    """The JSON report of `studio eval music`: one row per file and the means over files."""
    files = collect(paths)
    ref = reference_histogram(reference, limit=reference_limit, progress=progress) if reference else None
    rows = [analyse(f, reference=ref["histogram"] if ref else None, key=key, chords=chords) for f in files]

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 5) if values else None

    pooled = [0.0] * 12
    for r in rows:
        for i, pc in enumerate(PITCH_CLASSES):
            pooled[i] += r["pitch_class_histogram"][pc] / len(rows)
    summary: dict[str, Any] = {
        "files": len(rows),
        "pitch_class_histogram": dict(zip(PITCH_CLASSES, [round(x, 4) for x in pooled])),
        "scale_consistency": mean([r["scale_consistency"]["ratio"] for r in rows]),
        "notes_per_second": mean([r["note_density"]["per_second"] for r in rows]),
        "notes_per_bar": mean([r["note_density"]["per_bar"] for r in rows]),
        "polyphony": mean([r["polyphony"]["mean"] for r in rows]),
        "pitch_span": mean([r["pitch_range"]["span"] for r in rows]),
    }
    if ref:
        summary["kl_to_reference"] = mean([r.get("kl_to_reference") for r in rows])
        summary["kl_pooled_to_reference"] = round(kl_divergence(pooled, ref["histogram"]), 5) if any(pooled) else None
    if any("in_key_ratio" in r for r in rows):
        summary["in_key_ratio"] = mean([r["in_key_ratio"]["ratio"] for r in rows if "in_key_ratio" in r])
    if any("chord_tone_ratio" in r for r in rows):
        summary["chord_tone_ratio"] = mean([r["chord_tone_ratio"]["mean"] for r in rows if "chord_tone_ratio" in r])
    report: dict[str, Any] = {"summary": summary, "files": rows}
    if ref:
        report["reference"] = {"name": ref["name"], "files": ref["files"],
                               "pitch_class_histogram": dict(zip(PITCH_CLASSES, [round(x, 4) for x in ref["histogram"]]))}
    return report
