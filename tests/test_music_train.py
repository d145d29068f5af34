"""`studio music train`: Bach chorales from music21's corpus -> MIDI -> REMI tokens -> a tiny
GPT-2, with safetensors checkpoints, validation loss and a resume that is exact to the bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bach_home(tmp_path_factory):
    """A STUDIO_HOME whose chorale cache holds the first 3 chorales, converted by the same
    function `--data bach` calls (music21 corpus -> music21 MIDI translation)."""
    from studio.pipelines.training.midi_train import bach_chorales_midi

    home = tmp_path_factory.mktemp("bach-home")
    files = bach_chorales_midi(home / "cache" / "bach-chorales", limit=3)
    assert len(files) == 3 and all(f.stat().st_size > 500 for f in files)
    return home


@pytest.fixture
def bach_dir(bach_home):
    return bach_home / "cache" / "bach-chorales"


TINY = ["--size", "tiny", "--batch-size", "2", "--seq-len", "32"]


def test_chorales_convert_to_real_midi(bach_dir):
    import pretty_midi

    midi = pretty_midi.PrettyMIDI(str(sorted(bach_dir.glob("*.mid"))[0]))
    notes = [n for inst in midi.instruments for n in inst.notes]
    assert len(notes) > 100 and 30 <= min(n.pitch for n in notes) and max(n.pitch for n in notes) <= 90
    assert len({n.pitch % 12 for n in notes}) >= 7  # a chorale, not noise


def test_train_on_bach_then_generate(cli, bach_home, tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(bach_home))  # the chorales are already converted there
    run = tmp_path / "run"
    r = cli("music", "train", "--data", "bach", "--limit", "3", *TINY, "--steps", "3", "--val-every", "1",
            "--save-every", "2", "--out", run, "--json")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout)
    assert summary["files"] == 3 and summary["steps"] == 3 and summary["val_loss"] is not None
    assert summary["train_tokens"] > summary["val_tokens"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    ckpt = run / "checkpoints" / "step-000002"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.safetensors", "train_config.json",
                 "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))  # safetensors only
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all("val_loss" in row for row in rows)
    # the final folder is a MIDI model the generator loads
    out = tmp_path / "gen"
    r = cli("music", "midi", "--model", run / "final", "--bars", "1", "--seed", "1", "--out", out, "--quiet")
    assert r.exit_code == 0, r
    assert len(list(out.glob("*.mid"))) == 1


def test_resume_is_exact(bach_dir, tmp_path):
    """An interrupted run resumed from its checkpoint ends with the very weights of a run that
    was never interrupted: model, AdamW moments, dropout RNG and data order all carry over."""
    import torch
    from safetensors.torch import load_file

    from studio.pipelines.training.midi_train import MidiTrainConfig, train
    from studio.device import DeviceManager
    from studio.progress import Progress

    device = DeviceManager()

    def config(out, resume=False):
        return MidiTrainConfig(data=str(bach_dir), out=str(out), size="tiny", steps=4, batch_size=2, seq_len=32,
                               val_every=2, save_every=2, resume=resume, seed=3)

    straight = train(config(tmp_path / "a"), device, Progress(enabled=False))

    def crash(row):
        if row["step"] == 3:
            raise KeyboardInterrupt  # after step 3, before its checkpoint: step 2's is the last
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b"), device, Progress(enabled=False), on_log=crash)
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(config(tmp_path / "b", resume=True), device, Progress(enabled=False))
    assert resumed["resumed_from"] == 2
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == straight["val_loss"]
    # the checkpoint moved: the weights after step 4 differ from those after step 2
    two = load_file(str(tmp_path / "b" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert not all(torch.equal(two[k], b[k]) for k in b)


def test_run_folder_rules(cli, bach_dir, tmp_path):
    run = tmp_path / "run"
    args = ["music", "train", "--data", bach_dir, *TINY, "--val-every", "1", "--save-every", "1", "--out", run, "--quiet"]
    assert cli(*args, "--steps", "1").exit_code == 0
    again = cli(*args, "--steps", "2")
    assert again.exit_code == 2 and "--resume" in again.stderr  # never trains over a run by accident
    more = cli(*args, "--steps", "2", "--resume")
    assert more.exit_code == 0, more
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]
    done = cli(*args, "--steps", "2", "--resume")
    assert done.exit_code == 2 and "already trained" in done.stderr
    fresh = cli("music", "train", "--data", bach_dir, *TINY, "--out", tmp_path / "new", "--resume")
    assert fresh.exit_code == 2 and "nothing to resume" in fresh.stderr


def test_fine_tune_keeps_the_base_tokenizer(cli, tiny, bach_dir, tmp_path):
    base = tiny("midi-lm")
    run = tmp_path / "ft"
    r = cli("music", "train", "--data", bach_dir, "--model", base, "--steps", "1", "--batch-size", "2", "--seq-len", "32",
            "--out", run, "--quiet")
    assert r.exit_code == 0, r
    assert json.loads((run / "final" / "tokenizer.json").read_text()) == json.loads((Path(base) / "tokenizer.json").read_text())


@pytest.mark.parametrize("args, words", [
    (["--data", "nowhere"], "does not exist"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--steps", "0"], "--steps"),
    (["--size", "huge"], "--size"),
])
def test_bad_training_input_exit_2(cli, bach_dir, tmp_path, args, words):
    base = ["--data", bach_dir, *TINY] if args[0] != "--data" else [*TINY]
    r = cli("music", "train", *base, *args, "--out", tmp_path / "run")
    assert r.exit_code == 2, r
    assert words in r.stderr and "hint:" in r.stderr


def test_folder_without_midi_exit_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("music", "train", "--data", tmp_path / "empty", *TINY, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "no MIDI files" in r.stderr


def test_a_run_checkpointed_in_the_old_layout_resumes_exactly(bach_dir, tmp_path):
    """checkpoint-NNNNNN/ folders (the layout before the shared one) still resume, bit for bit,
    and are left as they were; the run's next checkpoints are in the shared layout."""
    import torch
    from safetensors.torch import load_file

    from studio.pipelines.training.midi_train import MidiTrainConfig, train
    from studio.device import DeviceManager
    from studio.progress import Progress
    from tests.legacy_checkpoints import to_midi_v0

    device, quiet = DeviceManager(), Progress(enabled=False)

    def config(out, resume=False):
        return MidiTrainConfig(data=str(bach_dir), out=str(out), size="tiny", steps=4, batch_size=2, seq_len=32,
                               val_every=2, save_every=2, resume=resume, seed=5)

    straight = train(config(tmp_path / "a"), device, quiet)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b"), device, quiet, on_log=lambda row: (_ for _ in ()).throw(KeyboardInterrupt)
              if row["step"] == 3 else None)
    old = to_midi_v0(tmp_path / "b" / "checkpoints" / "step-000002")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-000002", "metrics.jsonl"]
    resumed = train(config(tmp_path / "b", resume=True), device, quiet)
    assert resumed["resumed_from"] == 2 and resumed["val_loss"] == straight["val_loss"]
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
              for run in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert sorted(p.name for p in old.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                            "tokenizer.json", "optimizer.safetensors",
                                                            "rng.safetensors", "trainer_state.json"])
    assert (tmp_path / "b" / "checkpoints" / "step-000004" / "trainer_state.json").is_file()
