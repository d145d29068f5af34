"""`studio music audio` on tiny random MusicGen and MusicGen-melody models (T5 + EnCodec +
decoder, 2 kHz audio at 50 frames/s, a 2.5 s window), through the same from_pretrained path a
user's facebook/musicgen-small takes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mg(tiny):
    return tiny("musicgen")


@pytest.fixture(scope="module")
def melody_model(tiny):
    return tiny("musicgen-melody")


@pytest.fixture
def melody_wav(tmp_path):
    import soundfile as sf

    rate = 4000
    t = np.arange(rate * 3) / rate
    notes = np.where(t < 1.5, 440.0, 523.25)  # A then C
    path = tmp_path / "melody.wav"
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * notes * t)).astype(np.float32), rate)
    return path


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(Path(folder).glob(f"*{suffix}"))


def pipeline(path):
    from studio.pipelines.music_audio import MusicGenerator
    from studio.device import DeviceManager
    from studio.models import resolve

    return MusicGenerator.load(resolve(str(path), task="music-audio"), DeviceManager())


def test_request_fields_are_explicit():
    from studio.pipelines.music_audio import AudioRequest

    assert [f.name for f in dataclasses.fields(AudioRequest)] == [
        "prompt", "model", "duration", "melody", "guidance", "temperature", "top_k", "top_p", "num_outputs", "seed",
        "format", "window", "extend_stride"]


def test_audio_written_as_flac_with_settings(cli, mg, tmp_path):
    import soundfile as sf

    r = cli("music", "audio", "calm piano", "--model", mg, "--duration", "1", "--seed", "3", "--format", "flac",
            "--guidance", "2", "--temperature", "0.9", "--top-k", "50", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout.splitlines()[0])
    path = Path(summary["path"])
    assert path.suffix == ".flac" and summary["seed"] == 3
    data, rate = sf.read(str(path))
    assert rate == 2000 and data.shape == (2000,)
    assert np.abs(data).max() > 0
    with sf.SoundFile(str(path)) as f:  # the request rides along as a tag
        assert json.loads(f.comment)["prompt"] == "calm piano"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["params"]["guidance"] == 2 and meta["params"]["top_k"] == 50
    assert meta["audio"]["windows"] == 1


def test_tokens_read_off_generate_decode_to_its_waveform(mg):
    """The pipeline reads tokens off a StoppingCriteria and decodes them itself; transformers'
    own generate, same seed and settings, must return the same waveform."""
    import torch
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    from studio.pipelines.music_audio import AudioRequest
    from studio.progress import Progress

    [ours] = pipeline(mg).run(AudioRequest(prompt="warm jazz", duration=1.0, seed=11), Progress(enabled=False))
    model = MusicgenForConditionalGeneration.from_pretrained(mg, use_safetensors=True).eval()
    inputs = AutoTokenizer.from_pretrained(mg)(["warm jazz"], padding=True, return_tensors="pt")
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(11)
        theirs = model.generate(**inputs, do_sample=True, guidance_scale=3.0, temperature=1.0, top_k=250, top_p=1.0,
                                max_new_tokens=50 + 3)  # 50 frames + the 3 delay steps of 4 codebooks
    theirs = theirs[0, 0].numpy()
    assert theirs.shape == ours.value[0].shape
    np.testing.assert_allclose(ours.value[0], np.clip(theirs, -1, 1), atol=1e-5)


def test_long_duration_continues_in_windows(cli, mg, tmp_path):
    import soundfile as sf

    r = cli("music", "audio", "upbeat drums", "--model", mg, "--duration", "4", "--seed", "5", "--out", tmp_path / "o",
            "--quiet")
    assert r.exit_code == 0, r
    (path,) = outputs(tmp_path / "o", ".wav")
    long, rate = sf.read(str(path))
    assert long.shape == (4 * 2000,)
    audio_meta = json.loads(path.with_suffix(".json").read_text())["audio"]
    # window 2.46 s, stride 60% of it: 2.46 s + 1.46 s + the rest
    assert audio_meta["windows"] == 3 and audio_meta["frames"] == 200
    # continuing never rewrites the beginning: the first window matches a 1 s run of the same seed
    r = cli("music", "audio", "upbeat drums", "--model", mg, "--duration", "1", "--seed", "5", "--out", tmp_path / "s",
            "--quiet")
    (short_path,) = outputs(tmp_path / "s", ".wav")
    short, _ = sf.read(str(short_path))
    np.testing.assert_allclose(long[:1600], short[:1600], atol=1e-4)
    # the windows are stitched as tokens, so the audio runs on without silence at the seams
    seam = int(2.46 * rate)
    assert np.abs(long[seam - 100: seam + 100]).max() > 0


def test_window_and_stride_flags(cli, mg, tmp_path):
    r = cli("music", "audio", "ambient", "--model", mg, "--duration", "2", "--window", "1", "--extend-stride", "0.5",
            "--num", "2", "--seed", "1", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r
    paths = outputs(tmp_path / "o", ".wav")
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in paths]
    assert sorted(m["params"]["seed"] for m in metas) == [1, 2]  # --num: one clip per seed
    assert all(m["audio"]["windows"] == 3 for m in metas)  # 1 s, then +0.5 s twice
    bad = cli("music", "audio", "ambient", "--model", mg, "--window", "1", "--extend-stride", "1", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "--extend-stride" in bad.stderr
    bad = cli("music", "audio", "ambient", "--model", mg, "--window", "60", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "--window" in bad.stderr


def test_progress_counts_seconds_of_audio(mg):
    import io

    from rich.console import Console

    from studio.pipelines.music_audio import AudioRequest
    from studio.progress import Progress

    buffer = io.StringIO()
    progress = Progress(console=Console(file=buffer, width=120, force_terminal=False))
    with progress:
        list(pipeline(mg).run(AudioRequest(prompt="lofi", duration=3.0, seed=1), progress))
    text = buffer.getvalue()
    assert "s of audio" in text and "3/3" in text


def test_melody_conditions_the_music(melody_model, melody_wav):
    from studio.pipelines.music_audio import AudioRequest
    from studio.progress import Progress

    pipe = pipeline(melody_model)
    chroma = pipe.chroma(*__import__("studio.pipelines.music_audio", fromlist=["load_audio"]).load_audio(melody_wav))
    assert chroma.shape[-1] == 12 and int(chroma[0, 0].argmax()) == 9  # A
    run = lambda **kw: next(pipe.run(AudioRequest(prompt="piano", duration=1.0, seed=4, **kw), Progress(enabled=False)))  # noqa: E731
    with_melody = run(melody=str(melody_wav))
    without = run()
    assert with_melody.extra["audio"]["melody_conditioned"] is True
    assert with_melody.value[0].shape == without.value[0].shape == (2000,)
    assert not np.allclose(with_melody.value[0], without.value[0])  # the chroma reaches the decoder


def test_melody_cli_and_long_melody(cli, melody_model, melody_wav, tmp_path):
    r = cli("music", "audio", "piano", "--model", melody_model, "--melody", melody_wav, "--duration", "3", "--seed", "2",
            "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r
    (path,) = outputs(tmp_path / "o", ".wav")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["audio"]["melody_conditioned"] and meta["audio"]["windows"] == 2
    assert meta["params"]["melody"] == str(melody_wav)


def test_melody_needs_a_melody_model(cli, mg, melody_wav, tmp_path):
    r = cli("music", "audio", "piano", "--model", mg, "--melody", melody_wav, "--out", tmp_path / "o")
    assert r.exit_code == 2, r
    assert "not a melody model" in r.stderr and "musicgen-melody" in r.stderr


def test_bad_inputs_exit_2(cli, mg, melody_model, tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    cases = [
        (["--model", melody_model, "--melody", bad], "not a readable audio file"),
        (["--model", melody_model, "--melody", tmp_path / "none.wav"], "does not exist"),
        (["--model", mg, "--format", "mp3"], "format"),
        (["--model", mg, "--duration", "0"], "--duration"),
        (["--model", mg, "--guidance", "0.5"], "--guidance"),
        (["--model", mg, "--top-p", "1.5"], "--top-p"),
    ]
    for args, words in cases:
        r = cli("music", "audio", "piano", *args, "--out", tmp_path / "o")
        assert r.exit_code == 2, (args, r)
        assert words in r.stderr and "hint:" in r.stderr
    assert not outputs(tmp_path / "o", ".wav")


def test_unwritable_out_exit_2(cli, mg, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = cli("music", "audio", "piano", "--model", mg, "--duration", "1", "--out", blocker / "sub")
    assert r.exit_code == 2, r
    assert "output folder" in r.stderr


def test_not_a_musicgen_model(cli, tiny, tmp_path):
    r = cli("music", "audio", "piano", "--model", tiny("midi-lm"), "--out", tmp_path / "o")
    assert r.exit_code == 2, r
    assert "not MusicGen" in r.stderr


def test_default_is_musicgen_small_offline(cli, tmp_path):
    r = cli("music", "audio", "piano", "--out", tmp_path / "o")
    assert r.exit_code == 2, r
    assert "musicgen-small" in r.stderr and "facebook/musicgen-small" in r.stderr
