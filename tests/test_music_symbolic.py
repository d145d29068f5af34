"""`studio music midi` on a tiny random GPT-2 over the REMI tokenizer (make-tiny midi-lm): every
control is checked on the written file, read back with pretty_midi and mido."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from studio.pipelines import music_metrics as mm


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny):
    return tiny("midi-lm")


def midi_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.mid"))


def read(path: Path):
    import pretty_midi

    return pretty_midi.PrettyMIDI(str(path))


def generate(cli, lm, out, *args):
    r = cli("music", "midi", "--model", lm, "--out", out, "--quiet", *args)
    assert r.exit_code == 0, r
    files = midi_files(out)
    assert files, r
    return files


def test_request_fields_are_explicit():
    from studio.pipelines.music_symbolic import MidiRequest

    assert [f.name for f in dataclasses.fields(MidiRequest)] == [
        "model", "bars", "seconds", "tempo", "key", "time_signature", "chords", "program", "instrument", "primer",
        "temperature", "top_k", "top_p", "num_outputs", "seed", "render", "soundfont", "adapters"]


def test_tempo_time_signature_instrument_and_bars_are_written(cli, lm, tmp_path):
    import mido

    (path,) = generate(cli, lm, tmp_path / "out", "--bars", "2", "--tempo", "97", "--time-signature", "3/4",
                       "--instrument", "violin", "--seed", "5")
    midi = read(path)
    times, bpms = midi.get_tempo_changes()
    assert len(bpms) == 1 and abs(bpms[0] - 97) < 0.01  # exact BPM, not REMI's 94.19 tempo bin
    assert [(ts.numerator, ts.denominator) for ts in midi.time_signature_changes] == [(3, 4)]
    assert {inst.program for inst in midi.instruments} == {40}  # violin
    notes = mm.pitched_notes(midi)
    assert notes
    bar = 3 * 60 / 97
    assert max(n.start for n in notes) < 2 * bar  # two bars, nothing after
    # mido sees the same meta events, and the request rides along as a text event
    meta = [m for t in mido.MidiFile(str(path)).tracks for m in t if m.is_meta]
    assert any(m.type == "time_signature" and (m.numerator, m.denominator) == (3, 4) for m in meta)
    assert any(m.type == "set_tempo" and abs(mido.tempo2bpm(m.tempo) - 97) < 0.01 for m in meta)
    text = [e.text for e in midi.text_events if e.text.startswith("studio:")]
    assert json.loads(text[0][len("studio:"):])["instrument"] == "violin"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["params"]["seed"] == 5 and sidecar["music"]["bars"] == 2


def test_key_keeps_notes_in_scale(cli, lm, tmp_path):
    (keyed,) = generate(cli, lm, tmp_path / "k", "--bars", "4", "--key", "D:minor", "--program", "0", "--seed", "1")
    (free,) = generate(cli, lm, tmp_path / "f", "--bars", "4", "--program", "0", "--seed", "1")
    keyed_ratio = mm.in_key_ratio(read(keyed), "D:minor")
    assert len(mm.pitched_notes(read(keyed))) >= 8
    assert keyed_ratio >= 0.95
    # the control is what does it: the same seed without --key wanders out of the scale
    assert mm.in_key_ratio(read(free), "D:minor") < 0.95


def test_chords_dominate_each_bar(cli, lm, tmp_path):
    args = ["--bars", "4", "--program", "0", "--tempo", "120", "--time-signature", "4/4", "--seed", "2"]
    (chorded,) = generate(cli, lm, tmp_path / "c", "--chords", "C G Am F", *args)
    (free,) = generate(cli, lm, tmp_path / "f", *args)
    report = mm.chord_tone_ratio(read(chorded), "C G Am F")
    assert [row["chord"] for row in report["per_bar"]] == ["C", "G", "Am", "F"]
    assert all(row["ratio"] >= 0.6 for row in report["per_bar"]), report
    assert report["mean"] >= 0.8
    assert mm.chord_tone_ratio(read(free), "C G Am F")["mean"] < report["mean"] - 0.2
    # the eval command reads the chords back from the file's recorded request
    r = cli("eval", "music", str(chorded), "--quiet")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["summary"]["chord_tone_ratio"] == report["mean"]


def test_seconds_sets_length(cli, lm, tmp_path):
    (path,) = generate(cli, lm, tmp_path / "s", "--seconds", "3", "--program", "0", "--seed", "4")
    midi = read(path)
    assert abs(midi.get_tempo_changes()[1][0] - 120) < 0.01  # --seconds without --tempo counts at 120 BPM
    assert 0 < midi.get_end_time() <= 3.0 + 1e-6
    assert max(n.start for n in mm.pitched_notes(midi)) < 3.0


def test_primer_is_continued(cli, lm, tmp_path):
    import pretty_midi

    primer = pretty_midi.PrettyMIDI(initial_tempo=120)
    piano = pretty_midi.Instrument(program=0)
    for i, pitch in enumerate([60, 62, 64, 65, 67, 69, 71, 72]):  # one bar of eighth notes
        piano.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=i * 0.25, end=i * 0.25 + 0.25))
    primer.instruments.append(piano)
    primer.write(str(tmp_path / "primer.mid"))

    (path,) = generate(cli, lm, tmp_path / "p", "--primer", tmp_path / "primer.mid", "--bars", "2", "--tempo", "120",
                       "--program", "0", "--time-signature", "4/4", "--seed", "3")
    notes = sorted(mm.pitched_notes(read(path)), key=lambda n: (n.start, n.pitch))
    head = [(round(n.start, 3), n.pitch) for n in notes[:8]]
    assert head == [(round(i * 0.25, 3), p) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72])]
    assert any(n.start >= 2.0 for n in notes)  # new notes after the primer's bar
    assert max(n.start for n in notes) < 2.0 * 3  # primer bar + 2 bars at 120 BPM in 4/4
    assert json.loads(path.with_suffix(".json").read_text())["music"]["primer_bars"] >= 1
    # without --tempo the continuation keeps the primer's exact tempo (not REMI's 121.29 bin)
    (kept,) = generate(cli, lm, tmp_path / "k", "--primer", tmp_path / "primer.mid", "--bars", "1", "--program", "0",
                       "--seed", "3")
    assert abs(read(kept).get_tempo_changes()[1][0] - 120) < 0.01


def test_num_and_seed_reproduce(cli, lm, tmp_path):
    a, b = generate(cli, lm, tmp_path / "n", "--bars", "2", "--num", "2", "--seed", "7", "--program", "0")
    seeds = sorted(json.loads(p.with_suffix(".json").read_text())["params"]["seed"] for p in (a, b))
    assert seeds == [7, 8]
    (again,) = generate(cli, lm, tmp_path / "again", "--bars", "2", "--seed", "8", "--program", "0")
    eight = next(p for p in (a, b) if json.loads(p.with_suffix(".json").read_text())["params"]["seed"] == 8)
    notes = lambda p: [(n.start, n.end, n.pitch, n.velocity) for n in mm.pitched_notes(read(p))]  # noqa: E731
    assert notes(again) == notes(eight)


def test_top_k_one_is_greedy(cli, lm, tmp_path):
    args = ["--bars", "2", "--program", "0", "--top-k", "1", "--temperature", "0.7", "--top-p", "0.9"]
    (one,) = generate(cli, lm, tmp_path / "a", *args, "--seed", "1")
    (two,) = generate(cli, lm, tmp_path / "b", *args, "--seed", "2")
    notes = lambda p: [(n.start, n.pitch) for n in mm.pitched_notes(read(p))]  # noqa: E731
    assert notes(one) == notes(two)  # greedy: the seed no longer matters
    params = json.loads(one.with_suffix(".json").read_text())["params"]
    assert (params["top_k"], params["temperature"], params["top_p"]) == (1, 0.7, 0.9)


def test_drums_are_unpitched_and_unconstrained(cli, lm, tmp_path):
    (path,) = generate(cli, lm, tmp_path / "d", "--bars", "2", "--instrument", "drums", "--key", "C:major", "--seed", "1")
    midi = read(path)
    assert midi.instruments and all(inst.is_drum for inst in midi.instruments)


def test_render_writes_audio_beside(cli, lm, tmp_path):
    import soundfile as sf

    (path,) = generate(cli, lm, tmp_path / "r", "--bars", "1", "--program", "0", "--tempo", "120", "--seed", "1", "--render")
    wav = path.with_name(path.stem + ".render.wav")
    data, rate = sf.read(str(wav))
    assert rate == 44100 and len(data) >= 2.0 * rate * 0.9  # one bar of 4/4 at 120 BPM (plus release)
    assert abs(data).max() > 0.01
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["companions"]["render"] == wav.name
    assert meta["render"]["engine"] in ("fluidsynth", "pretty_midi.synthesize")


@pytest.mark.parametrize("args, words", [
    (["--key", "H:major"], "key"),
    (["--key", "C:bebop"], "mode"),
    (["--time-signature", "7/4"], "time signature"),
    (["--time-signature", "four"], "time signature"),
    (["--chords", "C Xq7"], "chord"),
    (["--program", "200"], "--program"),
    (["--instrument", "kazooo"], "instrument"),
    (["--bars", "2", "--seconds", "3"], "--seconds"),
    (["--temperature", "0"], "--temperature"),
    (["--soundfont", "x.sf2"], "--render"),
])
def test_bad_controls_exit_2(cli, lm, tmp_path, args, words):
    r = cli("music", "midi", "--model", lm, "--out", tmp_path / "o", *args)
    assert r.exit_code == 2, r
    assert words in r.stderr and "hint:" in r.stderr
    assert not midi_files(tmp_path / "o")


def test_corrupt_primer_exit_2(cli, lm, tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06garbage that is not a midi file")
    r = cli("music", "midi", "--model", lm, "--out", tmp_path / "o", "--primer", bad)
    assert r.exit_code == 2, r
    assert "primer" in r.stderr and "not a readable MIDI" in r.stderr
    assert not midi_files(tmp_path / "o")
    r = cli("music", "midi", "--model", lm, "--out", tmp_path / "o", "--primer", tmp_path / "missing.mid")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_unwritable_out_exit_2(cli, lm, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = cli("music", "midi", "--model", lm, "--bars", "1", "--out", blocker / "sub")
    assert r.exit_code == 2, r
    assert "output folder" in r.stderr
    r = cli("music", "midi", "--model", lm, "--bars", "1", "--out", blocker)
    assert r.exit_code == 2 and "is a file" in r.stderr


def test_model_without_tokenizer_is_a_clear_error(cli, lm, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lm, broken)
    (broken / "tokenizer.json").unlink()
    r = cli("music", "midi", "--model", broken, "--out", tmp_path / "o")
    assert r.exit_code == 2, r
    assert "tokenizer.json" in r.stderr
