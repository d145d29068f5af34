"""studio adapt: peft adapters trained on tiny models of the real architectures, saved, loaded back
through the same --lora path a user takes, merged, and inspected."""

from __future__ import annotations

import json

import numpy as np
import pytest

CODE = '''def greet_studio(name):
    return "hello studio " + name


def greet_studio_twice(name):
    return greet_studio(name) + greet_studio(name)
'''


@pytest.fixture
def code_data(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "greet.py").write_text(CODE)
    return folder


@pytest.fixture(scope="module")
def code_adapter(tmp_path_factory, tiny):
    """One LoRA trained on the tiny code LM (shared by the tests that only read it)."""
    from typer.testing import CliRunner

    from studio.cli import app

    root = tmp_path_factory.mktemp("code-adapter")
    (root / "repo").mkdir()
    (root / "repo" / "greet.py").write_text(CODE)
    out = root / "lora"
    r = CliRunner().invoke(app, ["adapt", "train", "--base", str(tiny("code-lm")), "--task", "code", "--data",
                                 str(root / "repo"), "--out", str(out), "--steps", "40", "--lr", "2e-2", "--rank", "4",
                                 "--max-length", "64", "--save-every", "20", "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def _lm_loss(model, tokenizer, text):
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_code_lora_loss_falls_and_the_model_prefers_the_training_text(tiny, code_adapter):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.adapters.peft_adapters import adapter_records, apply_adapters

    out, report = code_adapter
    assert report["last_loss"] < report["first_loss"] * 0.9
    assert 0 < report["trainable_params"] < report["total_params"] / 5
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-000020").is_dir()

    base_dir = tiny("code-lm")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_loss = _lm_loss(model, tokenizer, CODE)
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits

    apply_adapters(model, [str(out)], base_label="tiny code")
    adapted_loss = _lm_loss(model, tokenizer, CODE)
    assert adapted_loss < base_loss - 0.3  # the trained direction: the repository's code got likelier
    assert adapter_records(model)[0]["method"] == "lora"
    half = apply_adapters(model, [f"{out}:0.5"])
    assert adapted_loss < _lm_loss(half, tokenizer, CODE) < base_loss  # the scale interpolates

    apply_adapters(model, [])  # no adapters again: the base model bit for bit
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)


def test_code_command_takes_the_lora(cli, tiny, code_adapter):
    out, _ = code_adapter
    args = ["code", "def greet", "--model", tiny("code-lm"), "--raw", "--max-tokens", "12", "-t", "0", "--no-stream", "-q"]
    base = cli(*args)
    adapted = cli(*args, "--lora", out)
    assert base.exit_code == 0 and adapted.exit_code == 0, adapted
    assert adapted.stdout != base.stdout
    assert "studio" in adapted.stdout  # the tuned model continues with the repository's words


def test_resume_continues_exactly(tiny, code_data, tmp_path):
    from safetensors.torch import load_file

    from studio.pipelines.training.adapters import TrainConfig, train
    from studio.device import DeviceManager
    from studio.progress import Progress

    common = dict(base=str(tiny("code-lm")), data=str(code_data), task="code", rank=2, lr=5e-3, max_length=32,
                  batch_size=2, dropout=0.1)
    device, quiet = DeviceManager(), Progress(enabled=False)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **common), device, quiet)
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common), device, quiet)
    (tmp_path / "b" / "studio.json").unlink()  # as if the run had stopped after its step-2 checkpoint
    resumed = train(TrainConfig(out=str(tmp_path / "b"), steps=4, resume=True, **common), device, quiet)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    a, b = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_a_run_checkpointed_in_the_old_layout_resumes_exactly(tiny, code_data, tmp_path):
    """OUT/checkpoints/step-NNNNNN/ with optimizer.pt and state.json (the layout before the
    shared one) still resumes: the same losses and adapter as a run never interrupted."""
    from safetensors.torch import load_file

    from studio.device import DeviceManager
    from studio.pipelines.training.adapters import TrainConfig, train
    from studio.progress import Progress
    from tests.legacy_checkpoints import to_adapter_v0

    common = dict(base=str(tiny("code-lm")), data=str(code_data), task="code", rank=2, lr=5e-3, max_length=32,
                  batch_size=2, dropout=0.1, seed=1)
    device, quiet = DeviceManager(), Progress(enabled=False)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **common), device, quiet)
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common), device, quiet)
    (tmp_path / "b" / "studio.json").unlink()
    old = to_adapter_v0(tmp_path / "b" / "checkpoints" / "step-000002")
    assert sorted(p.name for p in old.iterdir()) == ["adapter.safetensors", "optimizer.pt", "state.json"]
    # optimizer.pt is a pickle (read with weights_only=True); studio's pickle rule asks for --allow-pickle
    resumed = train(TrainConfig(out=str(tmp_path / "b"), steps=4, resume=True, **common), device, quiet,
                    allow_pickle=True)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    a, b = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_merge_writes_a_model_equal_to_base_plus_adapter(cli, tiny, code_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from studio.adapters.peft_adapters import apply_adapters

    out, _ = code_adapter
    r = cli("adapt", "merge", "--base", tiny("code-lm"), "--lora", f"{out}:0.7", "--out", tmp_path / "merged")
    assert r.exit_code == 0, r
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = apply_adapters(AutoModelForCausalLM.from_pretrained(tiny("code-lm")).eval(), [f"{out}:0.7"])
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    again = cli("adapt", "merge", "--base", tiny("code-lm"), "--lora", out, "--out", tmp_path / "merged")
    assert again.exit_code == 2 and "exists" in again.stderr


def test_info_prints_the_metadata(cli, tiny, code_adapter):
    out, _ = code_adapter
    r = cli("adapt", "info", out)
    assert r.exit_code == 0, r
    for text in ("lora", "rank", "4", "q_proj", str(tiny("code-lm")), "lr", "0.02", "steps"):
        assert text in r.stdout
    meta = json.loads(cli("adapt", "info", out, "--json").stdout)
    assert meta["method"] == "lora" and meta["rank"] == 4 and meta["base"]["source"] == str(tiny("code-lm"))


def test_an_adapter_that_does_not_fit_names_both(cli, tiny, code_adapter, tmp_path):
    out, _ = code_adapter
    r = cli("adapt", "merge", "--base", tiny("blip-caption"), "--lora", out, "--out", tmp_path / "m")
    assert r.exit_code == 2, r
    assert str(out) in r.stderr and "does not fit" in r.stderr and "tiny-blip-caption" in r.stderr.replace("\n", "")
    assert "trained on" in r.stderr
    assert not (tmp_path / "m").exists()  # no partial folder


def test_bad_flags_are_usage_errors(cli, tiny, code_data):
    r = cli("adapt", "train", "--base", tiny("sd"), "--task", "image", "--method", "loha", "--data", code_data, "-o", "x")
    assert r.exit_code == 2 and "lora" in r.stderr
    r = cli("adapt", "train", "--base", tiny("code-lm"), "--task", "code", "--data", code_data, "-o", "q",
            "--quantize-base", "int4", "--device", "cpu")
    assert r.exit_code == 2 and "bitsandbytes" in r.stderr and "CUDA" in r.stderr
    r = cli("adapt", "train", "--base", tiny("code-lm"), "--task", "code", "--data", code_data, "-o", "t",
            "--targets", "no_such_proj")
    assert r.exit_code == 2 and "no_such_proj" in r.stderr and "q_proj" in r.stderr
    r = cli("adapt", "train", "--base", tiny("code-lm"), "--task", "code", "--data", code_data, "-o", "t2", "--resume")
    assert r.exit_code == 2 and "checkpoint" in r.stderr


def test_image_lora_trains_saves_and_changes_studio_image(cli, tiny, tmp_path):
    from PIL import Image

    from studio.outputs import read_metadata

    data = tmp_path / "dog"
    data.mkdir()
    for i, colour in enumerate([(230, 20, 20), (200, 40, 30)]):
        Image.new("RGB", (48, 48), colour).save(data / f"{i}.png")
    sd = tiny("sd")
    out = tmp_path / "sks"
    r = cli("adapt", "train", "--base", sd, "--task", "image", "--data", data, "--instance-prompt", "a photo of sks",
            "--out", out, "--steps", "4", "--lr", "5e-2", "--rank", "4", "--train-text-encoder",
            "--validation-prompt", "a photo of sks", "--validation-every", "2", "--validation-steps", "2", "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "step-000002.png").is_file() and (out / "validation" / "step-000004.png").is_file()
    assert report["trainable_params"] > 0

    args = ["image", "a photo of sks", "--model", sd, "--steps", "2", "--seed", "1"]
    assert cli(*args, "-o", "base").exit_code == 0
    used = cli(*args, "--lora", out, "-o", "lora")
    assert used.exit_code == 0, used
    base_png, lora_png = sorted((tmp_path / "base").glob("*.png"))[0], sorted((tmp_path / "lora").glob("*.png"))[0]
    assert not np.array_equal(np.asarray(Image.open(base_png)), np.asarray(Image.open(lora_png)))
    assert read_metadata(lora_png)["adapters"][0]["source"] == str(out)

    info = cli("adapt", "info", out, "--json")
    meta = json.loads(info.stdout)
    assert meta["task"] == "image" and meta["format"] == "diffusers" and "unet" in meta["parts"] and "text_encoder" in meta["parts"]


@pytest.mark.slow
def test_image_prior_preservation_and_merge(cli, tiny, tmp_path):
    from PIL import Image

    data = tmp_path / "cube"
    data.mkdir()
    Image.new("RGB", (64, 64), (20, 200, 20)).save(data / "a.png")
    (data / "a.txt").write_text("a sks cube")
    out = tmp_path / "cube-lora"
    r = cli("adapt", "train", "--base", tiny("sd"), "--task", "image", "--data", data, "--out", out, "--steps", "2",
            "--class-prompt", "a cube", "--num-class-images", "2", "--lr", "1e-2", "-q")
    assert r.exit_code == 0, r
    assert len(list((out / "class_images").glob("*.png"))) == 2
    merged = tmp_path / "merged"
    assert cli("adapt", "merge", "--base", tiny("sd"), "--lora", out, "--out", merged).exit_code == 0
    assert (merged / "model_index.json").is_file()
    assert cli("image", "a sks cube", "--model", merged, "--steps", "2", "-o", "m").exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_other_peft_methods_train_and_load(tiny, code_data, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.adapters.peft_adapters import apply_adapters, read_metadata
    from studio.pipelines.training.adapters import TrainConfig, train
    from studio.device import DeviceManager
    from studio.progress import Progress

    out = tmp_path / method
    report = train(TrainConfig(base=str(tiny("code-lm")), data=str(code_data), task="code", out=str(out), method=method,
                               rank=4, steps=6, lr=1e-2, max_length=64), DeviceManager(), Progress(enabled=False))
    assert report.losses[-1] < report.losses[0]
    assert read_metadata(out)["method"] == method
    tokenizer = AutoTokenizer.from_pretrained(tiny("code-lm"))
    model = AutoModelForCausalLM.from_pretrained(tiny("code-lm")).eval()
    base = _lm_loss(model, tokenizer, CODE)
    assert _lm_loss(apply_adapters(model, [str(out)]), tokenizer, CODE) < base


def test_caption_and_midi_adapters_train(tiny, tmp_path):
    import pretty_midi
    from PIL import Image

    from studio.adapters.peft_adapters import apply_adapters, load_transformers
    from studio.pipelines.training.adapters import TrainConfig, train
    from studio.device import DeviceManager
    from studio.progress import Progress

    device, quiet = DeviceManager(), Progress(enabled=False)
    pics = tmp_path / "pics"
    pics.mkdir()
    for i, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (32, 32), colour).save(pics / f"{i}.png")
        (pics / f"{i}.txt").write_text(["a red square", "a blue square"][i])
    cap = train(TrainConfig(base=str(tiny("blip-caption")), data=str(pics), task="caption", out=str(tmp_path / "cap"),
                            steps=4, lr=1e-2, rank=4, batch_size=2), device, quiet)
    assert cap.losses[-1] < cap.losses[0]
    # the adapter is usable from the caption and vqa commands, and recorded there
    import json

    from typer.testing import CliRunner

    from studio.cli import app

    run = CliRunner().invoke(app, ["caption", str(pics / "0.png"), "--model", str(tiny("blip-caption")),
                                   "--lora", str(tmp_path / "cap"), "-f", "jsonl", "-q"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.splitlines()[0])["path"].endswith("0.png")
    misfit = CliRunner().invoke(app, ["caption", str(pics / "0.png"), "--model", str(tiny("blip-caption")),
                                      "--lora", str(tmp_path / "nope"), "-q"])
    assert misfit.exit_code == 2

    songs = tmp_path / "songs"
    songs.mkdir()
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(velocity=80, pitch=60 + (i % 5) * 2, start=i * 0.25, end=i * 0.25 + 0.25) for i in range(24)]
    pm.instruments.append(piano)
    pm.write(str(songs / "scale.mid"))
    midi = train(TrainConfig(base=str(tiny("midi-lm")), data=str(songs), task="midi", out=str(tmp_path / "midi"),
                             steps=4, lr=1e-2, rank=4, max_length=32), device, quiet)
    assert midi.losses[-1] < midi.losses[0]
    model, _ = load_transformers(str(tiny("midi-lm")), {})
    apply_adapters(model, [str(tmp_path / "midi")])  # GPT-2 Conv1D layers take the adapter too
    # and `studio music midi --lora` uses it: a valid MIDI file, the adapter in its sidecar
    out = tmp_path / "midi-out"
    run = CliRunner().invoke(app, ["music", "midi", "--model", str(tiny("midi-lm")), "--lora", str(tmp_path / "midi"),
                                   "--bars", "2", "--seed", "1", "--out", str(out), "-q"])
    assert run.exit_code == 0, run.output
    [written] = list(out.glob("*.mid"))
    assert pretty_midi.PrettyMIDI(str(written)).instruments
