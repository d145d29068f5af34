"""`studio video interpolate`, `studio music render` and the `mux` step are registered tasks whose
files carry the task and request in their own tags: with the sidecar deleted, `studio replay FILE`
makes the same frames / samples / bytes again (README: "MP4, GIF and WebP replay from their own
tags when the sidecar is gone"; MIDI renders and muxed MP4s are no exception)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def moving_square(t: int, size: int = 48) -> np.ndarray:
    frame = np.full((size, size, 3), 30, dtype=np.uint8)
    frame[10:26, 4 + 3 * t: 20 + 3 * t] = (220, 60, 40)
    return frame


def written(result, suffix: str) -> Path:
    """The output a --json run reports (its last line)."""
    assert result.exit_code == 0, result
    path = Path(json.loads(result.stdout.strip().splitlines()[-1])["path"])
    assert path.suffix == suffix and path.exists(), path
    return path


def replayed(cli, path: Path, out: Path) -> Path:
    """Replay `path` from its own tags (its sidecar is removed first) into `out`; the one new file."""
    sidecar = path.with_suffix(".json")
    assert sidecar.is_file()  # written like every output ...
    sidecar.unlink()  # ... and gone: only the file's own tags are left
    r = cli("replay", path, "--out", out, "--json")
    return written(r, path.suffix)


def frames_of(path: Path) -> list[np.ndarray]:
    if path.suffix == ".mp4":
        import imageio.v2 as iio2

        reader = iio2.get_reader(str(path), format="FFMPEG")
        try:
            return [np.asarray(f) for f in reader]
        finally:
            reader.close()
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")))
        return out


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_interpolated_clip_replays_from_its_tags(cli, tmp_path, fmt):
    from studio.outputs import read_metadata

    clip = tmp_path / "in.mp4"
    import imageio.v2 as iio2

    writer = iio2.get_writer(str(clip), format="FFMPEG", fps=10, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
    for t in range(0, 8, 2):
        writer.append_data(moving_square(t))
    writer.close()
    path = written(cli("video", "interpolate", clip, "--factor", "3", "--format", fmt, "-o", tmp_path / "a", "--json"),
                   f".{fmt}")
    assert path.name.endswith(f"-video-interpolate-x-in-x3.{fmt}")
    first = frames_of(path)
    assert len(first) == (4 - 1) * 3 + 1
    meta = read_metadata(path)
    assert meta["task"] == "video-interpolate" and meta["params"]["fps"] == 30.0

    again = replayed(cli, path, tmp_path / "b")
    tags = read_metadata(again)
    assert tags["task"] == "video-interpolate" and tags["params"]["factor"] == 3
    second = frames_of(again)
    assert len(second) == len(first) and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert again.read_bytes() == path.read_bytes()


def write_song(path: Path) -> Path:
    import pretty_midi

    song = pretty_midi.PrettyMIDI(initial_tempo=120)
    piano = pretty_midi.Instrument(program=0)
    for i, pitch in enumerate((60, 64, 67, 72)):
        piano.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=0.25 * i, end=0.25 * i + 0.2))
    song.instruments.append(piano)
    song.write(str(path))
    return path


@pytest.mark.parametrize("plain, fmt", [(True, "wav"), (True, "flac"), (False, "wav")])
def test_rendered_midi_replays_from_its_tags(cli, tmp_path, plain, fmt):
    import soundfile as sf

    from studio.outputs import read_metadata
    from studio.pipelines.music_render import fluidsynth_available

    if not plain and not fluidsynth_available():
        pytest.skip("libfluidsynth3 / pyfluidsynth not installed")
    song = write_song(tmp_path / "song.mid")
    args = ["music", "render", song, "--out", tmp_path / f"song.{fmt}", "--rate", "16000", "--json"]
    path = written(cli(*args, *(["--plain"] if plain else [])), f".{fmt}")
    assert path == tmp_path / f"song.{fmt}"
    meta = read_metadata(path)
    assert meta["task"] == "music-render" and meta["render"]["engine"] == ("pretty_midi.synthesize" if plain else "fluidsynth")

    again = replayed(cli, path, tmp_path / "replayed")
    assert read_metadata(again)["task"] == "music-render"
    a, rate_a = sf.read(str(path))
    b, rate_b = sf.read(str(again))
    assert rate_a == rate_b == 16000 and np.array_equal(a, b) and np.abs(a).max() > 0.05
    assert again.read_bytes() == path.read_bytes()


def test_muxed_video_replays_from_its_tags(cli, tmp_path):
    import imageio.v2 as iio2
    import soundfile as sf
    import yaml

    from studio.outputs import read_metadata

    clip = tmp_path / "clip.mp4"
    writer = iio2.get_writer(str(clip), format="FFMPEG", fps=8, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
    for t in range(8):
        writer.append_data(moving_square(t))
    writer.close()
    tone = tmp_path / "tone.wav"
    sf.write(str(tone), (0.2 * np.sin(np.linspace(0, 440 * 2 * np.pi * 2, 16000 * 2))).astype(np.float32), 16000)
    steps = tmp_path / "final.yaml"
    steps.write_text(yaml.safe_dump({"jobs": [{"task": "mux", "name": "final", "video": str(clip), "audio": str(tone),
                                               "loop_video": True}]}))
    r = cli("run", steps, "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r
    (path,) = [p for p in (tmp_path / "a").rglob("*.mp4")]
    meta = read_metadata(path)
    assert meta["task"] == "mux"
    path.with_suffix(".json").unlink()
    tags = read_metadata(path)  # the muxed file's own comment: the request and the task, as the writer tags
    assert tags["task"] == "mux" and tags["from"] == "tags" and tags["params"]["loop_video"] is True

    r = cli("replay", path, "--out", tmp_path / "b", "--json")
    again = written(r, ".mp4")
    assert again.read_bytes() == path.read_bytes()
