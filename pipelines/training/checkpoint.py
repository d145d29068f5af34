"""The one checkpoint layout of studio's trainers (CLIP, MIDI, adapters, starter recipes):

    OUT/checkpoints/step-000040/
        <model files>              the trainer's own safetensors format, so every checkpoint is also a
                                   model folder studio loads: open_clip_config.json +
                                   open_clip_model.safetensors (clip), config.json + model.safetensors +
                                   tokenizer.json (midi), adapter.safetensors (adapters),
                                   model.safetensors (`save_modules`, for plain torch modules)
        train_config.json          the run's config (what a resumed run must agree with)
        trainer_state.json         format, step, elapsed_s, the last metrics row, optimizer
                                   hyper-parameters and scalars, LR scheduler, grad scaler, python and
                                   numpy RNG, the trainer's own JSON state
        trainer_state.safetensors  optimizer moments, torch CPU and CUDA RNG, the trainer's tensors

A checkpoint is written into a temp folder and renamed (studio.outputs.atomic_path), so a listed
one is complete, and nothing in it is a pickle. nanoGPT keeps all of this in one torch.save dict;
this is the same dict split into JSON and safetensors, because studio loads no pickle by default.

Checkpoints of the layouts studio wrote before this one still resume. They are read into the same
`TrainerState` and never rewritten (the next checkpoint of the run is in this layout):

    clip-v0     OUT/checkpoints/step-NNNNNNNN/ open_clip files + trainer_state.{json,safetensors}
    midi-v0     OUT/checkpoint-NNNNNN/ save_pretrained files + optimizer.safetensors + rng.safetensors
                + trainer_state.json
    adapter-v0  OUT/checkpoints/step-NNNNNN/ adapter.safetensors + optimizer.pt + state.json
    starter-v0  WORK/STAGE.pt beside the stage's run folder WORK/STAGE/: one torch.save dict of the
                modules' state_dicts, "opt", "sched" and "step" (no RNG state: that loop kept none),
                read with weights_only=True; found by `starter_v0`, which
                only the starter recipes call (a FOLDER.pt beside another trainer's --out is not theirs)
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.errors import UsageError
from studio.outputs import atomic_path

FORMAT = "studio.training/1"
CHECKPOINTS = "checkpoints"
CONFIG_JSON = "train_config.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
MODEL_FILE = "model.safetensors"
_MIDI_V0 = re.compile(r"^checkpoint-(\d{6,})$")


@dataclass
class TrainerState:
    """Everything a checkpoint holds besides the model files, whatever layout it was read from."""

    step: int  # optimizer steps done
    config: dict[str, Any] = field(default_factory=dict)  # the run's config as saved
    optimizer: dict[str, Any] | None = None  # an optimizer.state_dict()
    scheduler: dict[str, Any] | None = None  # an LR scheduler's state_dict()
    scaler: dict[str, Any] | None = None  # a GradScaler's state_dict() (fp16 runs)
    rng: dict[str, Any] = field(default_factory=dict)  # python / numpy / torch / cuda: what capture_rng gives
    extra: dict[str, Any] = field(default_factory=dict)  # the trainer's own JSON state
    tensors: dict[str, Any] = field(default_factory=dict)  # the trainer's own tensors
    last: dict[str, Any] = field(default_factory=dict)  # the metrics row of the checkpoint's step
    elapsed_s: float = 0.0  # training seconds up to this step, over all resumed segments


# ----------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """The state of every generator a training step may draw from."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {"python": [version, list(internal), gauss],
                             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to read it
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators `capture_rng` read; those a layout did not save are left alone."""
    import numpy as np
    import torch

    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])


# ----------------------------------------------------------------------------- optimizer state as JSON + tensors
def _split_optimizer(sd: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """optimizer.state_dict() -> (JSON: param groups and scalars, tensors: moments)."""
    import torch

    if sd is None:
        return None, {}
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _join_optimizer(meta: dict[str, Any] | None, tensors: dict[str, Any]) -> dict[str, Any] | None:
    if meta is None:
        return None
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- writing
def write_checkpoint(folder: Path, state: TrainerState, save_model: Callable[[Path], None] | None = None) -> Path:
    """Write one checkpoint folder atomically: model files (save_model(tmp)), then the state."""
    from safetensors.torch import save_file

    with atomic_path(Path(folder), is_dir=True) as tmp:
        if save_model is not None:
            save_model(tmp)
        opt_meta, tensors = _split_optimizer(state.optimizer)
        rng = dict(state.rng)
        if rng.get("torch") is not None:
            tensors["rng.torch"] = rng.pop("torch")
        for i, cuda_state in enumerate(rng.pop("cuda", None) or []):
            tensors[f"rng.cuda.{i}"] = cuda_state
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in state.tensors.items()})
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {"format": FORMAT, "step": state.step, "elapsed_s": state.elapsed_s, "last": state.last,
                "optimizer": opt_meta, "scheduler": state.scheduler, "scaler": state.scaler, "rng": rng,
                "extra": state.extra}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, default=str))
        (tmp / CONFIG_JSON).write_text(json.dumps(state.config, indent=2, default=str))
    return Path(folder)


def save_modules(modules: dict[str, Any]) -> Callable[[Path], None]:
    """A `save_model` for plain torch modules: one model.safetensors, keys prefixed by name.
    safetensors' save_model (not save_file) because tied weights share storage."""
    def save(folder: Path) -> None:
        import torch
        from safetensors.torch import save_model

        save_model(torch.nn.ModuleDict(modules), str(Path(folder) / MODEL_FILE))
    return save


def load_modules(modules: dict[str, Any]) -> Callable[[Path], None]:
    """The `load_model` that reads what `save_modules` wrote."""
    def load(folder: Path) -> None:
        import torch
        from safetensors.torch import load_model

        load_model(torch.nn.ModuleDict(modules), str(Path(folder) / MODEL_FILE))
    return load


# ----------------------------------------------------------------------------- finding and reading
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    layout: str  # studio | clip-v0 | midi-v0 | adapter-v0 | starter-v0

    def config(self) -> dict[str, Any]:
        """The run's config as this checkpoint saved it (JSON only: cheap, for early checks)."""
        try:
            return dict(_CONFIG_READERS[self.layout](self.path))
        except (OSError, ValueError, KeyError) as exc:
            raise _unreadable(self, exc) from exc

    def read(self) -> TrainerState:
        try:
            return _READERS[self.layout](self.path)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise _unreadable(self, exc) from exc


def _unreadable(ckpt: Checkpoint, exc: Exception) -> UsageError:
    kind = "" if ckpt.layout == "studio" else f" (an older studio layout, {ckpt.layout})"
    return UsageError(f"checkpoint {ckpt.path} cannot be read{kind}: {type(exc).__name__}: {exc}",
                      "delete that folder to resume from the checkpoint before it, or start a new --out")


def find_checkpoints(out: Path) -> list[Checkpoint]:
    """The run's complete checkpoints, oldest first, in every layout studio wrote."""
    out = Path(out).expanduser()
    found = []
    folder = out / CHECKPOINTS
    for path in folder.glob("step-*") if folder.is_dir() else []:
        if not (path.is_dir() and path.name[5:].isdigit()):
            continue
        if (path / CONFIG_JSON).is_file() and (path / STATE_JSON).is_file():
            layout = "studio"
        elif (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file():
            layout = "clip-v0"
        elif (path / "state.json").is_file() and (path / "adapter.safetensors").is_file():
            layout = "adapter-v0"
        else:
            continue  # not a checkpoint studio wrote (or a foreign folder): never guessed at
        found.append(Checkpoint(path, int(path.name[5:]), layout))
    for path in out.iterdir() if out.is_dir() else []:
        m = _MIDI_V0.match(path.name)
        if m and path.is_dir() and (path / STATE_JSON).is_file():
            found.append(Checkpoint(path, int(m.group(1)), "midi-v0"))
    # at one step, this layout's checkpoint wins over an older layout's
    return sorted(found, key=lambda c: (c.step, c.layout == "studio"))


def starter_v0(out: Path) -> list[Checkpoint]:
    """The starter recipes' snapshot of stage OUT.name before this layout (WORK/STAGE.pt), if any.
    Its step is read through mmap: the pickle's skeleton, not the weights."""
    import torch

    path = Path(out).expanduser()
    path = path.with_name(path.name + ".pt")
    if not path.is_file():
        return []
    try:
        step = int(torch.load(path, weights_only=True, map_location="cpu", mmap=True)["step"])
    except Exception:  # torn or foreign: listed at step 0, so resuming says it cannot be read
        step = 0
    return [Checkpoint(path, step, "starter-v0")]


def prune(out: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints of this layout (older layouts stay as they are)."""
    mine = [c for c in find_checkpoints(out) if c.layout == "studio"]
    for ckpt in mine[: max(0, len(mine) - keep)]:
        shutil.rmtree(ckpt.path, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_studio(folder: Path) -> TrainerState:
    from safetensors.torch import load_file

    meta = _read_json(folder / STATE_JSON)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{STATE_JSON} has format {meta.get('format')!r}, this studio reads {FORMAT!r}")
    tensors = load_file(str(folder / STATE_TENSORS))
    rng = dict(meta.get("rng") or {})
    rng["torch"] = tensors.get("rng.torch")
    rng["cuda"] = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
    return TrainerState(step=int(meta["step"]), config=_read_json(folder / CONFIG_JSON),
                        optimizer=_join_optimizer(meta.get("optimizer"), tensors), scheduler=meta.get("scheduler"),
                        scaler=meta.get("scaler"), rng=rng, extra=meta.get("extra") or {},
                        tensors={k[6:]: v for k, v in tensors.items() if k.startswith("extra.")},
                        last=meta.get("last") or {}, elapsed_s=float(meta.get("elapsed_s") or 0.0))


def _read_clip_v0(folder: Path) -> TrainerState:
    """clip_train before the shared layout: the same tensors file; the JSON held the config and
    a `position` (step, data position, last metrics) instead of `extra`."""
    from safetensors.torch import load_file

    meta = _read_json(folder / STATE_JSON)
    tensors = load_file(str(folder / STATE_TENSORS))
    position = meta["position"]
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    memory = {k: tensors[k] for k in ("memory.image", "memory.text") if k in tensors}
    return TrainerState(step=int(position["step"]), config=meta.get("config") or {},
                        optimizer=_join_optimizer(meta["optimizer"], tensors), scheduler=meta.get("scheduler"),
                        scaler=meta.get("scaler"), rng={"python": meta.get("python_random"),
                                                        "torch": tensors["rng.torch"], "cuda": cuda},
                        extra={"position": position}, tensors=memory, last=dict(position.get("last") or {}))


def _read_midi_v0(folder: Path) -> TrainerState:
    """midi_train before the shared layout: AdamW moments as '{param}.{name}' tensors with their
    names in trainer_state.json, torch RNG in rng.safetensors, a pure-function LR (no scheduler)."""
    from safetensors.torch import load_file

    meta = _read_json(folder / STATE_JSON)
    moments = load_file(str(folder / "optimizer.safetensors"))
    opt = meta["optimizer"]
    state = {int(i): {name: moments[f"{i}.{name}"] for name in names} for i, names in opt["state_keys"].items()}
    rng = load_file(str(folder / "rng.safetensors"))
    history = {k: meta.get(k) for k in ("train_loss", "val_loss", "best_val_loss")}
    return TrainerState(step=int(meta["step"]), config=meta.get("config") or {},
                        optimizer={"state": state, "param_groups": opt["param_groups"]},
                        rng={"torch": rng["cpu"], "cuda": [rng[k] for k in sorted(rng) if k.startswith("cuda")]},
                        extra={"history": history, "data_fingerprint": meta.get("data_fingerprint"),
                               "files": meta.get("files")},
                        last={"loss": history["train_loss"], "val_loss": history["val_loss"]})


def _read_adapter_v0(folder: Path) -> TrainerState:
    """adapters/train.py before the shared layout: optimizer.pt (torch.save of a state_dict, read
    with weights_only=True: tensors and numbers only, no code runs), state.json with the losses;
    no RNG (each step reseeded from (seed, step))."""
    import torch

    meta = _read_json(folder / "state.json")
    losses = list(meta.get("losses") or [])
    return TrainerState(step=int(meta["step"]), config=meta.get("config") or {},
                        optimizer=torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"),
                        extra={"losses": losses}, last={"loss": losses[-1]} if losses else {})


def _read_starter_v0(path: Path) -> TrainerState:
    """starter.py's train_loop before the shared layout: torch.save({module: state_dict, ...,
    "opt": ..., "sched": ..., "step": n}) (weights_only=True: tensors and numbers only, as that
    code loaded it). The modules' weights come back as `tensors`, keyed "module.key" as a
    ModuleDict of the modules names them (what `save_modules` writes)."""
    import pickle

    import torch

    try:
        saved = dict(torch.load(path, weights_only=True, map_location="cpu"))
    except pickle.UnpicklingError as exc:
        raise ValueError(str(exc)) from exc
    step, optimizer, scheduler = int(saved.pop("step")), saved.pop("opt"), saved.pop("sched")
    tensors = {f"{name}.{key}": value for name, sd in saved.items() for key, value in sd.items()}
    return TrainerState(step=step, optimizer=optimizer, scheduler=scheduler, tensors=tensors,
                        extra={"modules": sorted(saved)})


_READERS: dict[str, Callable[[Path], TrainerState]] = {
    "studio": _read_studio, "clip-v0": _read_clip_v0, "midi-v0": _read_midi_v0, "adapter-v0": _read_adapter_v0,
    "starter-v0": _read_starter_v0}
_CONFIG_READERS: dict[str, Callable[[Path], dict]] = {
    "studio": lambda p: _read_json(p / CONFIG_JSON),
    "clip-v0": lambda p: _read_json(p / STATE_JSON).get("config") or {},
    "midi-v0": lambda p: _read_json(p / STATE_JSON).get("config") or {},
    "adapter-v0": lambda p: _read_json(p / "state.json").get("config") or {},
    "starter-v0": lambda p: {},  # the recipe was logged to WORK/log.jsonl, not saved with the snapshot
}
