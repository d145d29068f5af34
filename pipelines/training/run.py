"""`TrainingRun`: what every studio trainer shares, so each trainer file is only its recipe.

A trainer (clip_train, midi_train, adapters, each stage of a starter recipe) builds its model,
optimizer and data, then hands the rest to one run object:

    run = TrainingRun(out, config, device=manager, progress=progress, resume=config.resume,
                      samples_per_step=batch, must_match=("lr", "seed"))  # folder rules, early checks
    model = ... (from run.checkpoint.path when resuming, if the trainer loads it that way)
    optimizer = ...
    run.track(optimizer=optimizer, scheduler=scheduler, save_model=write_weights, load_model=read_weights,
              state=lambda: ({"losses": losses}, {}))
    state = run.restore()  # None on a fresh start; else model, optimizer, scheduler, scaler restored
    run.fit(step_fn, total=steps, save_every=200)  # step_fn(step) -> {"loss": .., "lr": .., **extra}

What the run owns:
  * the run folder: never trains over another run (a checkpoint there needs --resume), --resume
    with nothing to resume is an error, a resumed run must agree on the config fields that change
    what it computes (`must_match`);
  * device and precision from studio.device's DeviceManager (`training_device`, `autocast()`,
    `grad_scaler()`): weights and optimizer state stay fp32, the precision is the autocast dtype;
  * checkpoints in the one layout of checkpoint.py, with every RNG, so a resumed run takes the
    very steps an uninterrupted one takes (bit for bit on one process);
  * one progress and log format: a rich bar (studio.progress) and OUT/metrics.jsonl, one row per
    logged step with step, loss, lr, samples_per_s, elapsed_s and the trainer's extra keys; rows
    past a resumed step are dropped (they are computed again).

Exactness is the trainers' half of the bargain: each draws its batch and noise from generators
seeded by (seed, step) or from the global RNGs the checkpoint restores, never from wall time.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from studio.errors import RuntimeFailure, UsageError
from studio.outputs import write_text_file
from studio.pipelines.training.checkpoint import (CHECKPOINTS, CONFIG_JSON, Checkpoint, TrainerState,
                                                  capture_rng, find_checkpoints, prune, restore_rng,
                                                  write_checkpoint)

METRICS = "metrics.jsonl"
# open_clip_train's precision words, which `studio clip train --precision` took before the
# DeviceManager owned precision: still accepted, mapped to the autocast dtype they meant
PRECISION_WORDS = {"amp": "fp16", "amp_bf16": "bf16"}


# ----------------------------------------------------------------------------- processes and device
@dataclass
class Dist:
    """This process's place in a torchrun / `accelerate launch` job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        """torchrun and `accelerate launch` both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device_type: str) -> "Dist":
        """Join the process group (NCCL on GPUs, gloo on CPUs)."""
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", rank=self.rank,
                                        world_size=self.world)
        return self

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def training_device(device: str = "auto", precision: str = "auto", *, dist: Dist | None = None,
                    progress: Any = None) -> Any:
    """The DeviceManager of a training process: its device (this rank's GPU under torchrun) and
    precision, which training uses as the autocast dtype over fp32 weights."""
    from studio.device import DeviceSettings, get_device_manager

    word = PRECISION_WORDS.get(precision, precision)
    if word != precision and progress is not None:
        progress.note(f"--precision {precision} is {word} autocast (the DeviceManager's words: fp32|bf16|fp16)")
    dist = dist or Dist()
    if dist.world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{dist.local_rank}"
    settings = DeviceSettings(device=device, precision=word)
    if word == "fp16" and get_device_manager(replace(settings, precision="fp32")).device.type == "cpu":
        raise UsageError(f"--precision {precision} (fp16 autocast) needs a GPU", "use --precision bf16 or fp32 on the CPU")
    return get_device_manager(settings)


# ----------------------------------------------------------------------------- the run
def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(asdict(value) if is_dataclass(value) else value, default=str))


class _NoBar:
    def advance(self, n: float = 1) -> None: ...
    def update(self, *args: Any, **fields: Any) -> None: ...


class TrainingRun:
    """One training run in one folder: checkpoints, metrics, progress, device. See the module doc."""

    def __init__(self, out: str | Path, config: Any, *, device: Any, progress: Any = None, resume: bool = False,
                 dist: Dist | None = None, samples_per_step: int = 1, keep: int | None = None,
                 must_match: Sequence[str] = (), allow_pickle: bool = False, older: Sequence[Checkpoint] = ()):
        self.out = Path(out).expanduser()
        # checkpoints of an older layout that lie outside OUT, which only their trainer knows
        # where to find (the starters' WORK/STAGE.pt: checkpoint.starter_v0)
        self.older = list(older)
        self.allow_pickle = allow_pickle  # a resumed checkpoint may hold pickles (older layouts' optimizer.pt)
        self.config = config
        self.device = device  # a studio.device.DeviceManager
        self.dist = dist or Dist()
        self.progress = progress if self.dist.main else None
        self.samples_per_step = samples_per_step
        self.keep = keep
        self.checkpoint: Checkpoint | None = self._open_folder(resume)  # the one a resume starts from
        if self.checkpoint is not None:
            self._check_config(must_match)
        self.start = self.step = self.checkpoint.step if self.checkpoint else 0
        self.last: dict[str, Any] = {}  # the newest metrics row
        self._state: TrainerState | None = None
        self._tracked: dict[str, Any] = {}
        self._rng: dict[str, Any] | None = None
        self._elapsed0, self._t0 = 0.0, time.perf_counter()
        self._metrics: Any = None  # OUT/metrics.jsonl, open for appending while the run writes rows
        if self.dist.main:
            self._trim_metrics(self.start)

    # ------------------------------------------------------------------ folder rules
    def _open_folder(self, resume: bool) -> Checkpoint | None:
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file", "pass a folder for the run")
        found = self.checkpoints()
        if found and not resume:
            raise UsageError(f"{self.out} already holds a training run (checkpoint at step {found[-1].step})",
                             "pass --resume to continue it, or a new --out folder")
        if resume and not found:
            raise UsageError(f"nothing to resume: {self.out} holds no checkpoint", "drop --resume to start a new run")
        if resume:
            from studio.safety import check_pickle

            check_pickle(found[-1].path, allow_pickle=self.allow_pickle, what="checkpoint")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create run folder {self.out}: {exc.strerror}", "pass a writable folder with --out") from exc
        return found[-1] if found else None

    def _check_config(self, fields: Sequence[str]) -> None:
        saved, now = self.checkpoint.config(), _jsonable(self.config)
        for key in fields:
            if key in saved and saved[key] != now.get(key):
                raise UsageError(f"--resume with a different {key.replace('_', '-')} ({saved[key]!r} in the run, "
                                 f"{now.get(key)!r} now)",
                                 f"use the run's settings to continue it (its checkpoints' {CONFIG_JSON}), or start a new --out")

    def checkpoints(self) -> list[Checkpoint]:
        """Oldest first; at one step, this layout's checkpoint wins over an older layout's."""
        return sorted([*find_checkpoints(self.out), *self.older], key=lambda c: (c.step, c.layout == "studio"))

    # ------------------------------------------------------------------ device
    def autocast(self) -> Any:
        """The DeviceManager's precision as autocast (fp32: no autocast)."""
        return self.device.autocast()

    def grad_scaler(self) -> Any:
        """A GradScaler, on for fp16 only (bf16 keeps fp32's range), tracked for checkpoints."""
        import torch

        scaler = torch.amp.GradScaler(self.device.device.type, enabled=self.device.resolved.precision == "fp16")
        self._tracked["scaler"] = scaler
        return scaler

    # ------------------------------------------------------------------ state
    def track(self, *, optimizer: Any = None, scheduler: Any = None, scaler: Any = None,
              save_model: Callable[[Path], None] | None = None, load_model: Callable[[Path], None] | None = None,
              state: Callable[[], tuple[dict, dict]] | None = None) -> None:
        """What a checkpoint saves and a resume restores. `save_model(folder)` writes the model
        files (safetensors); `load_model(folder)` reads them back (leave it out when the trainer
        builds its model from `run.checkpoint.path`); `state()` -> (JSON, tensors) of the
        trainer's own (losses, a negative memory, data position)."""
        given = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler, save_model=save_model,
                     load_model=load_model, state=state)
        self._tracked.update({k: v for k, v in given.items() if v is not None})

    def state(self) -> TrainerState | None:
        """The resumed checkpoint's state (read once), or None on a fresh start."""
        if self._state is None and self.checkpoint is not None:
            self._state = self.checkpoint.read()
        return self._state

    def restore(self) -> TrainerState | None:
        """Load the tracked objects from the resumed checkpoint. The RNGs are set at the start of
        `fit`, after everything that draws from them while building the model."""
        state = self.state()
        if state is None:
            return None
        t = self._tracked
        if "load_model" in t:
            t["load_model"](self.checkpoint.path)
        if "optimizer" in t and state.optimizer is not None:
            t["optimizer"].load_state_dict(state.optimizer)
        if "scheduler" in t and state.scheduler is not None:
            t["scheduler"].load_state_dict(state.scheduler)
        if "scaler" in t and t["scaler"].is_enabled() and state.scaler:
            t["scaler"].load_state_dict(state.scaler)
        self._rng = state.rng
        self.start = self.step = state.step
        self._elapsed0, self.last = state.elapsed_s, dict(state.last)
        return state

    def save(self, step: int | None = None) -> Path:
        """Checkpoint `step` (default: the current one) unless it is already there."""
        step = self.step if step is None else step
        folder = self.out / CHECKPOINTS / f"step-{step:06d}"
        if self.dist.main and not folder.exists():
            t = self._tracked
            extra, tensors = t["state"]() if "state" in t else ({}, {})
            scaler = t.get("scaler")
            state = TrainerState(
                step=step, config=_jsonable(self.config), rng=capture_rng(), extra=extra, tensors=tensors,
                optimizer=t["optimizer"].state_dict() if "optimizer" in t else None,
                scheduler=t["scheduler"].state_dict() if "scheduler" in t else None,
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                last=self.last, elapsed_s=round(self.elapsed(), 3))
            write_checkpoint(folder, state, t.get("save_model"))
            if self.keep:
                prune(self.out, self.keep)
        self.dist.barrier()
        return folder

    def elapsed(self) -> float:
        """Training seconds over all segments of the run (resumes included)."""
        return self._elapsed0 + time.perf_counter() - self._t0

    # ------------------------------------------------------------------ the loop
    def fit(self, step_fn: Callable[[int], dict[str, Any]], *, total: int, save_every: int = 0, log_every: int = 1,
            on_step: Callable[[int, dict[str, Any]], None] | None = None, description: str = "training",
            show: dict[str, str] | None = None, nan_hint: str = "lower the learning rate, or resume from the last checkpoint",
            save_every_s: float | None = None, stop_file: Path | None = None) -> dict[str, Any]:
        """Run steps start+1 .. total; returns the last metrics row. `step_fn(step)` does optimizer
        step `step + 1` and returns {"loss", "lr", **extra}. Checkpoints every `save_every` steps
        and/or `save_every_s` seconds, and at the end; `on_step(step, row)` runs after each step
        (after its checkpoint). `stop_file`: when it appears, checkpoint and stop early (it is
        removed). `show` maps extra keys to bar labels ({"temperature": "temp"})."""
        if self.dist.world > 1 and (save_every_s or stop_file):
            raise ValueError("save_every_s and stop_file would checkpoint at different steps on each process")
        handle = self.progress.task(description, total=total) if self.progress is not None else _NoBar()
        handle.advance(self.start)
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None
        self._t0 = time.perf_counter()
        t_saved, done = self._t0, 0
        try:
            while self.step < total:
                if stop_file is not None and Path(stop_file).exists():
                    Path(stop_file).unlink()
                    break
                done += 1
                row = self._row(step_fn(self.step), done, nan_hint)
                handle.advance(1)
                handle.update(loss=row["loss"], lr=row["lr"], samples_s=row["samples_per_s"],
                              **{label: row[k] for k, label in (show or {}).items() if row.get(k) is not None})
                if self.step % max(1, log_every) == 0 or self.step == total:
                    self._write_row(row)
                due = (save_every and self.step % save_every == 0) or (
                    save_every_s and time.perf_counter() - t_saved >= save_every_s)
                if due and self.step < total:
                    self.save()
                    t_saved = time.perf_counter()
                if on_step is not None:
                    on_step(self.step, row)
        except KeyboardInterrupt:
            found = self.checkpoints()
            if self.progress is not None:
                self.progress.note(f"interrupted at step {self.step}; " + (
                    f"`--resume` continues from {found[-1].path.name}" if found else "no checkpoint yet"))
            raise
        finally:
            self._close_metrics()
        self.save()
        return self.last

    def _row(self, values: dict[str, Any], done: int, nan_hint: str) -> dict[str, Any]:
        self.step += 1
        loss = float(values["loss"])
        if not math.isfinite(loss):
            raise RuntimeFailure(f"the training loss became {loss} at step {self.step}", nan_hint)
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        extra = {k: v for k, v in values.items() if k not in ("loss", "lr")}
        self.last = {"step": self.step, "loss": loss, "lr": values.get("lr"),
                     "samples_per_s": done * self.samples_per_step / seconds,
                     "elapsed_s": round(self._elapsed0 + seconds, 3), **extra}
        return self.last

    def record(self, row: dict[str, Any]) -> None:
        """A metrics row outside the loop (a final validation), stamped with step and time."""
        self._write_row({"step": self.step, **row, "elapsed_s": round(self.elapsed(), 3)})
        self._close_metrics()

    def _write_row(self, row: dict[str, Any]) -> None:
        # Flushed, not fsynced: studio.outputs.append_jsonl fsyncs every row, measured at 2.2 ms
        # a row here against ~0.02 ms this way. A crash loses at most rows after the last
        # checkpoint, which a resume drops and computes again (a torn last line with them).
        if not self.dist.main:
            return
        if self._metrics is None:
            self._metrics = open(self.out / METRICS, "a", encoding="utf-8")
        self._metrics.write(json.dumps(row, default=str) + "\n")
        self._metrics.flush()

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _trim_metrics(self, step: int) -> None:
        """Drop metric rows past `step`: a resumed run computes them again (a fresh one: all)."""
        path = self.out / METRICS
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        write_text_file(path, "".join(x + "\n" for x in keep), overwrite=True)
