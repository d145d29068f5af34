"""Checkpoints in the layouts studio wrote before pipelines/training/checkpoint.py, made from a
checkpoint of today's layout: the same model, optimizer and RNG state, written as the old
writers wrote them (clip_train.save_checkpoint, midi_train.save_checkpoint and
adapters/train.save_checkpoint of commit 9044505). Only safetensors, json and torch are used
here, not studio's readers, so a test that resumes from these checks the readers against the
old format, not against themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILES = ("trainer_state.json", "trainer_state.safetensors", "train_config.json")


def _read(folder: Path) -> tuple[dict, dict, dict]:
    meta = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_file(str(folder / "trainer_state.safetensors"))
    config = json.loads((folder / "train_config.json").read_text())
    return meta, tensors, config


def _copy_model_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name not in STATE_FILES:
            shutil.copy2(path, dst / path.name)


def _moments(tensors: dict) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(pid, {})[key] = value
    return state


def to_clip_v0(folder: Path) -> Path:
    """checkpoints/step-NNNNNNNN/ (8 digits): the open_clip files and trainer_state.{json,
    safetensors}, the JSON holding position (with the last metrics), optimizer, scheduler,
    scaler, python_random and config; train_config.json at the run's root."""
    meta, tensors, config = _read(folder)
    old = folder.parent / f"step-{meta['step']:08d}"
    _copy_model_files(folder, old)
    kept = {k: v for k, v in tensors.items() if k.startswith(("optimizer.", "rng."))}
    kept.update({k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.memory.")})
    save_file(kept, str(old / "trainer_state.safetensors"))
    state = {"position": {**meta["extra"]["position"], "last": meta["last"]}, "optimizer": meta["optimizer"],
             "scheduler": meta["scheduler"], "scaler": meta["scaler"], "python_random": meta["rng"]["python"],
             "config": config}
    (old / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    (folder.parent.parent / "train_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder)
    return old


def to_midi_v0(folder: Path) -> Path:
    """OUT/checkpoint-NNNNNN/: save_pretrained files, optimizer.safetensors ('{param}.{name}'),
    rng.safetensors ('cpu') and trainer_state.json (step, config, optimizer meta, history)."""
    meta, tensors, config = _read(folder)
    run_dir = folder.parent.parent
    old = run_dir / f"checkpoint-{meta['step']:06d}"
    _copy_model_files(folder, old)
    moments = _moments(tensors)
    save_file({f"{pid}.{key}": v for pid, entry in moments.items() for key, v in entry.items()},
              str(old / "optimizer.safetensors"))
    save_file({"cpu": tensors["rng.torch"]}, str(old / "rng.safetensors"))
    extra = meta["extra"]
    state = {"step": meta["step"], "config": config,
             "optimizer": {"param_groups": meta["optimizer"]["param_groups"],
                           "state_keys": {pid: sorted(entry) for pid, entry in moments.items()}},
             **extra["history"], "data_fingerprint": extra["data_fingerprint"], "files": extra["files"]}
    (old / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder)
    if not any(folder.parent.iterdir()):
        folder.parent.rmdir()  # old MIDI runs had no checkpoints/ folder
    return old


def to_adapter_v0(folder: Path) -> Path:
    """OUT/checkpoints/step-NNNNNN/: adapter.safetensors, optimizer.pt (torch.save of the
    optimizer's state_dict) and state.json (step, config, losses)."""
    meta, tensors, config = _read(folder)
    staged = folder.with_name(folder.name + ".old")
    _copy_model_files(folder, staged)
    state = {int(pid): entry for pid, entry in _moments(tensors).items()}
    for pid, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    torch.save({"state": state, "param_groups": meta["optimizer"]["param_groups"]}, staged / "optimizer.pt")
    (staged / "state.json").write_text(json.dumps({"step": meta["step"], "config": config,
                                                   "losses": meta["extra"]["losses"]}, indent=1))
    shutil.rmtree(folder)
    staged.rename(folder)
    return folder
