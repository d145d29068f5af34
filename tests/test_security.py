"""Downloaded models cannot run code: no pickle without --allow-pickle, no repository code without
--trust-remote-code, for every task and every kind of file a loader may open.

Each pickle here would create a marker file if anything unpickled it (a class whose __reduce__
calls os.system); each test checks the marker is absent and that studio refused with exit 2,
naming the flag. The remote-code test feeds `y` on stdin to the real entry point, the answer
transformers' prompt would take."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from studio import safety


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    return path


def evil_torch_zip(path: Path, marker: Path) -> Path:
    """torch.save's layout (a zip with archive/data.pkl), under any name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
    return path


def decoy_safetensors(path: Path) -> None:
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"decoy": np.zeros(2, dtype=np.float32)}, str(path))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle was unpickled: its code ran"


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 50, 50)).save(path)
    return path


def mixed_folder(root: Path, marker: Path, config: dict, weights: str = "pytorch_model.bin",
                 config_name: str = "config.json") -> Path:
    """A model folder a loader would accept: its config, a decoy .safetensors, and a pickle."""
    root.mkdir(parents=True)
    (root / config_name).write_text(json.dumps(config))
    decoy_safetensors(root / "model.safetensors")
    evil_pickle(root / weights, marker)
    return root


def assert_refused(result, *names: str) -> None:
    assert result.exit_code == 2, result
    assert "--allow-pickle" in result.stderr and "pickle" in result.stderr, result
    for name in names:
        assert name in result.stderr, result
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- the gate itself
def test_the_gate_finds_pickles_by_name_and_by_content(tmp_path, marker):
    evil_pickle(tmp_path / "a" / "weights.pkl", marker)
    evil_torch_zip(tmp_path / "a" / "sub" / "model.safetensors", marker)  # torch.save under a safe name
    evil_pickle(tmp_path / "a" / "no_suffix", marker)  # a bare pickle header
    decoy_safetensors(tmp_path / "a" / "real.safetensors")
    (tmp_path / "a" / "config.json").write_text("{}")
    found = {p.relative_to(tmp_path / "a").as_posix() for p in safety.pickle_files(tmp_path / "a")}
    assert found == {"weights.pkl", "sub/model.safetensors", "no_suffix"}
    with pytest.raises(safety.PickleRefused) as refused:
        safety.check_pickle(tmp_path / "a", allow_pickle=False)
    assert refused.value.exit_code == 2 and "--allow-pickle" in refused.value.hint
    safety.check_pickle(tmp_path / "a", allow_pickle=True)  # the user's call


# ----------------------------------------------------------------------------- every task
TRANSFORMERS = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, "n_head": 2}


@pytest.mark.parametrize("task", ["image", "caption", "vqa", "code", "music-midi", "music-audio", "video", "eval-code"])
def test_every_task_refuses_a_model_folder_with_a_pickle_beside_a_decoy(task, cli, tmp_path, marker, image):
    folder = mixed_folder(tmp_path / "evil-model", marker, TRANSFORMERS)
    if task in ("image", "video"):
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    args = {
        "image": ["image", "a cat", "--model", folder],
        "caption": ["caption", image, "--model", folder],
        "vqa": ["vqa", image, "what colour is it?", "--model", folder],
        "code": ["code", "def f():", "--model", folder],
        "music-midi": ["music", "midi", "--model", folder],
        "music-audio": ["music", "audio", "a calm tune", "--model", folder],
        "video": ["video", "generate", "a boat", "--model", folder],
        "eval-code": ["eval", "code", "--model", folder, "--limit", "1"],
    }[task]
    assert_refused(cli(*args), "pytorch_model.bin")


def test_a_single_checkpoint_file_is_refused_by_name_and_by_content(cli, tmp_path, marker):
    assert_refused(cli("image", "a cat", "--model", evil_pickle(tmp_path / "model.ckpt", marker)), "model.ckpt")
    disguised = evil_torch_zip(tmp_path / "model.safetensors", marker)
    assert_refused(cli("image", "a cat", "--model", disguised), "model.safetensors")


def test_clip_refuses_a_mixed_folder_and_a_pickle_pretrained_file(cli, tmp_path, marker, image):
    folder = mixed_folder(tmp_path / "evil-clip", marker, {"model_cfg": {}}, weights="open_clip_pytorch_model.bin",
                          config_name="open_clip_config.json")
    assert_refused(cli("clip", "embed", image, "--model", folder, "-o", tmp_path / "index"), "open_clip_pytorch_model.bin")
    pretrained = evil_pickle(tmp_path / "evil.pkl", marker)
    assert_refused(cli("clip", "embed", image, "--model", "ViT-B-32", "--pretrained", pretrained, "-o", tmp_path / "i2"),
                   "evil.pkl")


def test_control_model_with_a_pickle_is_refused(cli, tmp_path, marker, image, tiny):
    folder = mixed_folder(tmp_path / "evil-controlnet", marker, {"_class_name": "ControlNetModel"},
                          weights="diffusion_pytorch_model.bin")
    r = cli("image", "a cat", "--model", tiny("sd"), "--control", f"canny:{image}", "--control-model", folder,
            "--steps", "1", "--width", "32", "--height", "32")
    assert_refused(r, "diffusion_pytorch_model.bin")


def test_adapters_with_a_pickle_are_refused(cli, tmp_path, marker, tiny):
    lora = tmp_path / "evil-lora"
    lora.mkdir()
    decoy_safetensors(lora / "lora.safetensors")
    evil_pickle(lora / "pytorch_lora_weights.bin", marker)
    r = cli("image", "a cat", "--model", tiny("sd"), "--lora", lora, "--steps", "1", "--width", "32", "--height", "32")
    assert_refused(r, "pytorch_lora_weights.bin")

    peft = tmp_path / "evil-peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]}))
    evil_pickle(peft / "adapter_model.bin", marker)
    assert_refused(cli("code", "def f():", "--model", tiny("code-lm"), "--lora", peft, "--max-tokens", "2"),
                   "adapter_model.bin")
    assert_refused(cli("adapt", "merge", "--base", mixed_folder(tmp_path / "evil-base", marker, TRANSFORMERS),
                       "--lora", peft, "--out", tmp_path / "merged"), "pytorch_model.bin")
    assert not (tmp_path / "merged").exists()


def test_a_training_resume_with_a_pickle_is_refused(cli, tmp_path, marker, tiny):
    # adapter-v0: an older studio layout whose optimizer state is a torch.save pickle
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    decoy_safetensors(step / "adapter.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 2, "config": {}, "losses": [1.0]}))
    evil_pickle(step / "optimizer.pt", marker)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def f():\n    return 1\n")
    r = cli("adapt", "train", "--base", tiny("code-lm"), "--task", "code", "--data", data, "--out", tmp_path / "run",
            "--steps", "3", "--resume")
    assert_refused(r, "optimizer.pt")


# ----------------------------------------------------------------------------- remote code
def test_yes_on_stdin_does_not_run_a_folders_own_code(tmp_path):
    marker = tmp_path / "REMOTE_CODE_RAN"
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "studio-evil-arch",
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]},
    }))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'studio-evil-arch'\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_HOME": str(tmp_path / "home")}
    studio = Path(sys.executable).parent / "studio"
    proc = subprocess.run([str(studio), "code", "x", "--model", str(folder), "--no-stream"], input="y\ny\ny\n",
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert not marker.exists(), "the folder's evil.py ran"
    assert proc.returncode == 2, proc.stderr
    assert "--trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
