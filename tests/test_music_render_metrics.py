"""`studio music render` (fluidsynth and the plain fallback) and `studio eval music` on MIDI files
whose content is known, so every statistic has a value to check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from studio.pipelines import music_metrics as mm
from studio.pipelines import music_render


def write_midi(path: Path, chords: list[list[int]], *, tempo: float = 120.0, program: int = 0,
               beats_per_chord: int = 4, drums: list[int] | None = None) -> Path:
    """One chord per bar of 4/4 (whole notes), optional drum hits on each beat."""
    import pretty_midi

    midi = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    midi.time_signature_changes.append(pretty_midi.TimeSignature(4, 4, 0))
    beat = 60.0 / tempo
    inst = pretty_midi.Instrument(program=program)
    for i, chord in enumerate(chords):
        for pitch in chord:
            inst.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=i * beats_per_chord * beat,
                                               end=(i + 1) * beats_per_chord * beat))
    midi.instruments.append(inst)
    if drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True)
        for i, pitch in enumerate(drums):
            kit.notes.append(pretty_midi.Note(velocity=100, pitch=pitch, start=i * beat, end=i * beat + 0.1))
        midi.instruments.append(kit)
    midi.write(str(path))
    return path


C, G, AM, F = [60, 64, 67], [55, 59, 62], [57, 60, 64], [53, 57, 60]


# ----------------------------------------------------------------------------- render
@pytest.mark.skipif(not music_render.fluidsynth_available(), reason="libfluidsynth3 / pyfluidsynth not installed")
def test_render_with_fluidsynth(cli, tmp_path):
    import soundfile as sf

    song = write_midi(tmp_path / "song.mid", [C, G])
    r = cli("music", "render", song, "--json")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout)
    assert summary["engine"] == "fluidsynth" and summary["soundfont"] == "TimGM6mb.sf2"
    out = Path(summary["path"])
    assert out == tmp_path / "song.render.wav"
    data, rate = sf.read(str(out))
    assert rate == 44100 and len(data) >= 4.0 * rate  # two bars at 120 BPM, plus the release tail
    assert np.abs(data[: rate]).max() > 0.05
    assert json.loads(out.with_suffix(".json").read_text())["render"]["engine"] == "fluidsynth"
    # never overwrites: a second render gets a new name
    again = cli("music", "render", song, "--json")
    assert Path(json.loads(again.stdout)["path"]).name == "song.render-1.wav"
    # an explicit soundfont (here the same General MIDI font, by path) renders the same notes
    font = music_render.default_soundfont()
    named = cli("music", "render", song, "--soundfont", font, "--out", tmp_path / "sf.wav", "--json")
    assert named.exit_code == 0, named
    assert json.loads(named.stdout)["soundfont"] == font.name
    same, _ = sf.read(str(tmp_path / "sf.wav"))
    assert same.shape == data.shape and np.allclose(same, data, atol=1e-3)


def test_render_falls_back_to_plain_synthesis_with_a_notice(cli, tmp_path, monkeypatch):
    import soundfile as sf

    monkeypatch.setattr(music_render, "fluidsynth_available", lambda: False)
    song = write_midi(tmp_path / "song.mid", [C])
    r = cli("music", "render", song, "--out", tmp_path / "plain.flac", "--rate", "16000")
    assert r.exit_code == 0, r
    notice = " ".join(r.stderr.split())  # rich may wrap a long line on a narrow terminal
    assert "fluidsynth is not available: plain synthesiser" in notice
    data, rate = sf.read(str(tmp_path / "plain.flac"))
    assert rate == 16000 and 2.0 <= len(data) / rate <= 3.1  # the bar, plus the synthesiser's release second
    # the sine synthesiser puts its energy at the notes' fundamentals (C4, E4, G4)
    spectrum = np.abs(np.fft.rfft(data[: rate]))
    freqs = np.fft.rfftfreq(rate, 1 / rate)
    peak = freqs[np.argmax(spectrum)]
    assert min(abs(peak - f) for f in (261.6, 329.6, 392.0)) < 3
    assert json.loads((tmp_path / "plain.json").read_text())["render"]["engine"] == "pretty_midi.synthesize"


def test_plain_flag_and_engines_differ(cli, tmp_path):
    import soundfile as sf

    song = write_midi(tmp_path / "song.mid", [C])
    r = cli("music", "render", song, "--plain", "--out", tmp_path / "plain.wav", "--quiet")
    assert r.exit_code == 0, r
    plain, _ = sf.read(str(tmp_path / "plain.wav"))
    if music_render.fluidsynth_available():
        cli("music", "render", song, "--out", tmp_path / "fs.wav", "--quiet")
        fs, _ = sf.read(str(tmp_path / "fs.wav"))
        n = min(len(plain), len(fs))
        assert not np.allclose(plain[:n], fs[:n], atol=1e-2)  # a piano soundfont is not a sine


def test_render_errors_exit_2(cli, tmp_path, monkeypatch):
    song = write_midi(tmp_path / "song.mid", [C])
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi at all")
    assert "not a readable MIDI" in cli("music", "render", bad).stderr
    assert cli("music", "render", bad).exit_code == 2
    assert cli("music", "render", tmp_path / "none.mid").exit_code == 2
    r = cli("music", "render", song, "--soundfont", tmp_path / "none.sf2")
    assert r.exit_code == 2 and "soundfont" in r.stderr
    r = cli("music", "render", song, "--out", tmp_path / "x.mp3")
    assert r.exit_code == 2 and ".wav or .flac" in r.stderr
    monkeypatch.setattr(music_render, "fluidsynth_available", lambda: False)
    (tmp_path / "font.sf2").write_bytes(b"RIFF")
    r = cli("music", "render", song, "--soundfont", tmp_path / "font.sf2")
    assert r.exit_code == 2 and "needs fluidsynth" in r.stderr  # asked for, missing: an error, not a fallback


# ----------------------------------------------------------------------------- metrics
def test_statistics_of_a_known_file(tmp_path):
    import pretty_midi

    song = write_midi(tmp_path / "song.mid", [C, G, AM, F], drums=[36, 38, 36, 38])
    row = mm.analyse(song, chords="C G Am F")
    hist = row["pitch_class_histogram"]
    assert hist["C"] == pytest.approx(3 / 12) and hist["C#"] == 0  # drums are not pitches
    assert row["scale_consistency"] == {"ratio": 1.0, "key": "C:major"}
    assert row["polyphony"] == {"mean": 3.0, "max": 3}
    assert row["pitch_range"] == {"low": 53, "high": 67, "span": 14}
    assert row["note_density"]["notes"] == 16 and row["note_density"]["bars"] == 4
    assert row["note_density"]["per_second"] == pytest.approx(16 / 8.0)
    assert [b["ratio"] for b in row["chord_tone_ratio"]["per_bar"]] == [1.0, 1.0, 1.0, 1.0]
    wrong = mm.analyse(song, chords="F#")
    assert wrong["chord_tone_ratio"]["mean"] == 0.0
    half = mm.chord_tone_ratio(pretty_midi.PrettyMIDI(str(song)), "C Dm")  # G bar vs Dm: only D is shared
    assert half["per_bar"][1]["ratio"] == pytest.approx(1 / 3, abs=1e-3)
    assert mm.analyse(song, key="C:major")["in_key_ratio"]["ratio"] == 1.0
    assert mm.analyse(song, key="F#:major")["in_key_ratio"]["ratio"] < 0.5


def test_eval_cli_json_and_kl_to_reference(cli, tmp_path):
    gen = tmp_path / "gen"
    ref = tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    write_midi(gen / "a.mid", [C, G])
    write_midi(ref / "same.mid", [C, G])
    write_midi(ref / "other.mid", [[61, 66, 70]] * 2)  # F# major: nothing in common with C and G
    r = cli("eval", "music", gen, "--reference", gen, "--quiet")
    assert r.exit_code == 0, r
    same = json.loads(r.stdout)
    assert same["summary"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    r = cli("eval", "music", gen / "a.mid", "--reference", ref, "--out", tmp_path / "report.json", "--quiet")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["reference"]["files"] == 2
    assert report["summary"]["kl_to_reference"] > 0.3
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert set(report["files"][0]) >= {"pitch_class_histogram", "kl_to_reference", "scale_consistency", "note_density",
                                       "polyphony", "pitch_range"}


def test_eval_reference_bach(cli, tmp_path):
    write_midi(tmp_path / "a.mid", [C, G, AM, F])
    write_midi(tmp_path / "b.mid", [[61, 63, 66], [66, 70, 73]])
    r = cli("eval", "music", tmp_path / "a.mid", tmp_path / "b.mid", "--reference", "bach", "--reference-limit", "2", "--quiet")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["reference"]["name"] == "bach" and report["reference"]["files"] == 2
    kl = {Path(row["file"]).name: row["kl_to_reference"] for row in report["files"]}
    assert kl["a.mid"] < kl["b.mid"]  # diatonic C major is closer to Bach's chorales than F# major triads


def test_eval_errors_exit_2(cli, tmp_path):
    assert cli("eval", "music", tmp_path / "none.mid").exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("eval", "music", empty)
    assert r.exit_code == 2 and "no MIDI files" in r.stderr
    write_midi(tmp_path / "a.mid", [C])
    r = cli("eval", "music", tmp_path / "a.mid", "--chords", "C Qx")
    assert r.exit_code == 2 and "chord" in r.stderr
