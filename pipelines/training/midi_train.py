"""Train or fine-tune the symbolic music model: MIDI files -> miditok REMI tokens -> a causal LM.

`studio music train --data DIR|bach` runs `train(config, device, progress)`:

1. data: the MIDI files of DIR, or the Bach chorales that ship in music21's corpus, converted
   to MIDI once with music21 and cached in $STUDIO_HOME/cache/bach-chorales/;
2. tokens: each file is tokenized with the model's REMI tokenizer and wrapped in BOS ... EOS;
   files are split into train/validation by position in the sorted list (every k-th file),
   so the split never changes between runs or on resume;
3. model: a new GPT-2 of --size over studio's default REMI tokenizer, or --model to fine-tune
   an existing MIDI model (its tokenizer comes with it);
4. loop: AdamW, linear warm-up then cosine decay, gradient clipping, random windows of
   --seq-len tokens; the batch of step s is drawn from a generator seeded by (seed, s), so
   data order needs no saved state;
5. validation loss every --val-every steps on fixed windows of the validation files;
6. checkpoints every --save-every steps (the --keep newest are kept) in the shared layout of
   pipelines/training/checkpoint.py: checkpoints/step-NNNNNN/ is a save_pretrained model folder
   (safetensors + tokenizer.json) plus AdamW moments, every RNG (dropout draws from torch's) and
   the run's config. `--resume` restores all of it, so a resumed run reaches bit-identical
   weights to an uninterrupted one (a test checks); runs with checkpoints of the older
   checkpoint-NNNNNN/ layout resume too. `final/` is a model folder `studio music midi --model
   OUT/final` loads; metrics.jsonl holds one row per step (pipelines/training/run.py).

Every file is written through studio.outputs.atomic_path: a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.errors import UsageError
from studio.outputs import atomic_path
from studio.pipelines.midi_corpus import MIDI_SUFFIXES, bach_chorales_midi, midi_files  # noqa: F401  (this module's API too)
from studio.pipelines.training.checkpoint import find_checkpoints
from studio.pipelines.training.run import METRICS, TrainingRun

# New-model sizes (GPT-2 shapes). tiny is for tests and smoke runs; small trains on a CPU in
# minutes on the chorales; base wants a GPU.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=2, n_inner=128, n_positions=512),
    "small": dict(n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=1024),
    "base": dict(n_embd=512, n_layer=8, n_head=8, n_inner=2048, n_positions=1024),
}


@dataclass(frozen=True)
class MidiTrainConfig:
    """One training run. Saved in every checkpoint's trainer_state.json."""

    data: str  # folder of MIDI files, or "bach" (music21's chorales)
    out: str  # run folder: checkpoints/step-NNNNNN/, final/, metrics.jsonl
    model: str | None = None  # a MIDI model to fine-tune (alias, hub id, folder); None: a new one
    size: str = "small"  # new model size: tiny | small | base
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 8  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 3e-4  # peak learning rate
    warmup: int | None = None  # warm-up steps (default: 5% of steps)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    val_every: int = 100  # validation every N steps (and at the end)
    save_every: int = 200  # checkpoint every N steps (and at the end)
    val_fraction: float = 0.1  # share of files held out for validation
    val_batches: int = 8  # validation batches per evaluation
    limit: int | None = None  # use only the first N files (quick runs)
    seed: int = 0  # model init and data order
    resume: bool = False  # continue from the latest checkpoint in `out`
    keep: int = 3  # checkpoints kept (older ones are removed)


# ----------------------------------------------------------------------------- data
def tokenize_files(files: list[Path], tokenizer: Any, progress: Any = None) -> list[list[int]]:
    """Each file as [BOS] + REMI ids + [EOS]; unreadable files are skipped with one notice."""
    from symusic import Score

    bos, eos = tokenizer["BOS_None"], tokenizer["EOS_None"]
    out, bad = [], []
    handle = progress.task("tokenizing", total=len(files)) if progress else None
    for path in files:
        try:
            seq = tokenizer.encode(Score.from_file(str(path)))
            ids = list((seq[0] if isinstance(seq, list) else seq).ids)
        except Exception:  # corrupt or exotic files: training goes on without them
            ids = []
            bad.append(path.name)
        if ids:
            out.append([bos] + ids + [eos])
        if handle:
            handle.advance(1)
    if bad and progress is not None:
        progress.note(f"skipped {len(bad)} unreadable MIDI file(s), e.g. {bad[0]}")
    return out


def split_streams(sequences: list[list[int]], val_fraction: float) -> tuple[list[int], list[int]]:
    """Train/val token streams: every k-th file goes to validation (one file: its last 10%)."""
    if not sequences:
        raise UsageError("no notes found in the training files", "pass MIDI files that contain notes")
    if len(sequences) == 1 or val_fraction <= 0:
        stream = sequences[0] if len(sequences) == 1 else [t for s in sequences for t in s]
        cut = int(len(stream) * (1 - max(val_fraction, 0.1)))
        return stream[:cut], stream[cut:]
    k = max(2, round(1 / val_fraction))
    val = [s for i, s in enumerate(sequences) if i % k == k - 1] or sequences[-1:]
    train = [s for i, s in enumerate(sequences) if i % k != k - 1] if len(val) < len(sequences) else sequences[:-1]
    return [t for s in train for t in s], [t for s in val for t in s]


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints, oldest first, in the shared layout and the old
    checkpoint-NNNNNN/ one (both resume)."""
    return [(c.step, c.path) for c in find_checkpoints(Path(out))]


def _save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    from studio.progress import quiet_transformers

    with quiet_transformers():  # no per-shard bar under the training bar
        model.save_pretrained(folder)
    tokenizer.save(Path(folder) / "tokenizer.json")


# ----------------------------------------------------------------------------- training
def lr_at(step: int, config: MidiTrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to 10% of it: a pure function of the step, so
    resuming needs no scheduler state."""
    warmup = config.warmup if config.warmup is not None else max(1, config.steps // 20)
    if step <= warmup:
        return config.lr * step / max(1, warmup)
    t = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_config(c: MidiTrainConfig) -> None:
    if c.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {c.steps}", "e.g. --steps 1000")
    if c.batch_size < 1 or c.seq_len < 8:
        raise UsageError("--batch-size must be >= 1 and --seq-len >= 8", "e.g. --batch-size 8 --seq-len 256")
    if c.lr <= 0:
        raise UsageError(f"--lr must be positive, got {c.lr}", "e.g. --lr 3e-4")
    if c.val_every < 1 or c.save_every < 1:
        raise UsageError("--val-every and --save-every must be at least 1", "e.g. --val-every 100 --save-every 200")
    if not 0 <= c.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {c.val_fraction}", "e.g. --val-fraction 0.1")
    if c.model is None and c.size not in SIZES:
        raise UsageError(f"unknown --size {c.size!r}", f"sizes: {', '.join(SIZES)}")
    if c.keep < 1:
        raise UsageError("--keep must be at least 1", "e.g. --keep 3")


def _new_model(config: MidiTrainConfig) -> tuple[Any, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from studio.pipelines.music_symbolic import default_tokenizer

    tokenizer = default_tokenizer()
    torch.manual_seed(config.seed)
    gpt = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer["BOS_None"], eos_token_id=tokenizer["EOS_None"],
                     pad_token_id=tokenizer.pad_token_id, **SIZES[config.size])
    return GPT2LMHeadModel(gpt), tokenizer


def _load_model(location: str, load_kwargs: dict[str, Any], spec: Any = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from studio.pipelines.music_symbolic import load_midi_tokenizer, quiet_transformers
    from studio.models import loading

    with loading(spec, "MIDI model") if spec is not None else contextlib.nullcontext(), quiet_transformers():
        tokenizer = load_midi_tokenizer(location)
        model = AutoModelForCausalLM.from_pretrained(location, **load_kwargs)
    return model, tokenizer


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def train(config: MidiTrainConfig, device: Any, progress: Any, *, spec: Any = None,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary (final folder, steps, losses).
    `on_log(row)` gets each step's metrics row (after that step's checkpoint)."""
    import torch

    # 1. check the config and the run folder (device and precision: the DeviceManager's)
    check_config(config)
    run = TrainingRun(config.out, config, device=device, progress=progress, resume=config.resume,
                      samples_per_step=config.batch_size, keep=config.keep)
    if run.checkpoint is not None and run.checkpoint.step >= config.steps:
        raise UsageError(f"{run.out} is already trained to step {run.checkpoint.step}",
                         f"pass --steps above {run.checkpoint.step} to train further")

    # 2. model and tokenizer (a checkpoint, a base model, or a new one), then the data
    model, tokenizer = _model_for(config, run, spec)
    data = _Data.load(config, tokenizer, progress)

    # 3. optimizer, checkpointed state, resume
    model.to(device.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    history: dict[str, Any] = {"train_loss": None, "val_loss": None, "best_val_loss": None}
    scaler = run.grad_scaler()  # on for fp16 autocast only
    run.track(optimizer=optimizer, save_model=lambda folder: _save_model(model, tokenizer, folder),
              state=lambda: ({"history": history, "data_fingerprint": data.fingerprint, "files": len(data.files)}, {}))
    state = run.restore()
    if state is None:
        torch.manual_seed(config.seed)  # dropout draws from here
    else:
        history.update(state.extra.get("history") or {})
        if state.extra.get("data_fingerprint") not in (None, data.fingerprint):
            progress.note("the training files changed since the checkpoint; resuming on the new files")

    # 4. the loop, then the final model folder
    step_fn = _stepper(model, optimizer, scaler, run, data, config, history)
    run.fit(step_fn, total=config.steps, save_every=config.save_every, show={"val_loss": "val"},
            on_step=(lambda step, row: on_log(row)) if on_log else None,
            nan_hint="lower --lr, or resume from the last checkpoint")
    final = _write_final(run.out, model, tokenizer)
    return {"final": str(final), "steps": config.steps, "resumed_from": run.start or None,
            "last_checkpoint": run.step, "train_loss": history["train_loss"], "val_loss": history["val_loss"],
            "best_val_loss": history["best_val_loss"], "files": len(data.files), "train_tokens": len(data.train),
            "val_tokens": len(data.val), "seconds": round(run.elapsed(), 2), "log": str(run.out / METRICS)}


def _model_for(config: MidiTrainConfig, run: TrainingRun, spec: Any) -> tuple[Any, Any]:
    if run.checkpoint is not None:  # every checkpoint is a save_pretrained folder (old layout too)
        model, tokenizer = _load_model(str(run.checkpoint.path), {"use_safetensors": True, "trust_remote_code": False})
    elif config.model:
        model, tokenizer = _load_model(spec.location() if spec else config.model,
                                       spec.load_kwargs() if spec else {"use_safetensors": True, "trust_remote_code": False}, spec)
    else:
        model, tokenizer = _new_model(config)
    model.loss_type = "ForCausalLM"  # say it: transformers warns at the first step when it is left unset
    context = int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024))
    if config.seq_len > context:
        raise UsageError(f"--seq-len {config.seq_len} is longer than the model's context ({context})",
                         f"use --seq-len {context} or less")
    return model, tokenizer


@dataclass
class _Data:
    files: list[Path]
    train: Any  # (N,) token ids
    val: Any  # (M,) token ids
    fingerprint: str

    @classmethod
    def load(cls, config: MidiTrainConfig, tokenizer: Any, progress: Any) -> "_Data":
        import torch

        files = midi_files(config.data, limit=config.limit, progress=progress)
        train_stream, val_stream = split_streams(tokenize_files(files, tokenizer, progress), config.val_fraction)
        if len(train_stream) <= config.seq_len + 1:
            raise UsageError(f"only {len(train_stream)} training tokens, fewer than one window of --seq-len {config.seq_len}",
                             "add MIDI files or lower --seq-len")
        return cls(files, torch.tensor(train_stream, dtype=torch.long), torch.tensor(val_stream, dtype=torch.long),
                   _fingerprint(files))


def _stepper(model: Any, optimizer: Any, scaler: Any, run: TrainingRun, data: _Data, config: MidiTrainConfig,
             history: dict[str, Any]) -> Callable[[int], dict[str, Any]]:
    """One optimizer step: the batch of step s is drawn from a generator seeded by (seed, s)."""
    import torch

    dev = run.device.device

    def validate() -> float | None:
        n = (len(data.val) - 1) // config.seq_len
        if n < 1:
            return None
        windows = data.val[: n * config.seq_len].view(n, config.seq_len)[: config.val_batches * config.batch_size]
        model.eval()
        with torch.no_grad(), run.autocast():
            losses = [float(model(input_ids=c.to(dev), labels=c.to(dev)).loss) for c in windows.split(config.batch_size)]
        model.train()
        return sum(losses) / len(losses)

    def step(done: int) -> dict[str, Any]:
        n = done + 1
        lr = lr_at(n, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + n)
        starts = torch.randint(0, len(data.train) - config.seq_len, (config.batch_size,), generator=g)
        x = torch.stack([data.train[s: s + config.seq_len] for s in starts.tolist()]).to(dev)  # (B, T)
        with run.autocast():
            loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        row: dict[str, Any] = {"loss": float(loss.detach()), "lr": lr}
        history["train_loss"] = row["loss"]
        if n % config.val_every == 0 or n == config.steps:
            val = validate()
            if val is not None:
                row["val_loss"] = history["val_loss"] = val
                if history["best_val_loss"] is None or val < history["best_val_loss"]:
                    history["best_val_loss"] = val
        return row
    return step


def _write_final(out: Path, model: Any, tokenizer: Any) -> Path:
    """OUT/final, a model folder `studio music midi --model` loads; replaced atomically when a
    resumed run finishes again."""
    final = out / "final"
    trash = None
    if final.exists():
        trash = final.with_name(f".final-old-{int(time.time())}")
        final.rename(trash)
    with atomic_path(final, is_dir=True) as tmp:
        _save_model(model, tokenizer, tmp)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final
