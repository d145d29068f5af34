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
6. checkpoints every --save-every steps: checkpoint-NNNNNN/ holds the model (safetensors,
   save_pretrained), tokenizer.json, optimizer.safetensors (AdamW moments), rng.safetensors
   (torch RNG, which dropout draws from) and trainer_state.json. `--resume` restores all of
   it, so a resumed run reaches bit-identical weights to an uninterrupted one (a test checks).
   `final/` is a model folder `studio music midi --model OUT/final` loads.

Every file is written through studio.outputs.atomic_path: a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from studio.errors import InputFileError, UsageError
from studio.outputs import append_jsonl, atomic_path

MIDI_SUFFIXES = (".mid", ".midi", ".MID", ".MIDI")
CHECKPOINT = re.compile(r"^checkpoint-(\d{6,})$")

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
    out: str  # run folder: checkpoint-NNNNNN/, final/, train_log.jsonl
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
def bach_chorales_midi(cache_dir: Path, limit: int | None = None, progress: Any = None) -> list[Path]:
    """The Bach chorales of music21's corpus as MIDI files, converted once and cached."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = cache_dir / "chorales.json"  # the corpus listing, so a warm cache never imports music21 (~3 s)
    names = json.loads(index.read_text()) if index.exists() else None
    if names is None:
        from music21 import corpus

        names = list(corpus.chorales.Iterator(returnType="filename"))  # 371 chorales, Riemenschneider order
        with atomic_path(index, overwrite=True) as tmp:
            tmp.write_text(json.dumps(names))
    if limit:
        names = names[:limit]
    paths: list[Path] = []
    todo = [(n, cache_dir / (n.replace("/", "-") + ".mid")) for n in names]
    missing = [(n, p) for n, p in todo if not p.exists()]
    handle = progress.task("converting Bach chorales to MIDI", total=len(missing)) if (progress and missing) else None
    failed = 0
    for name, path in todo:
        if not path.exists():
            from music21 import corpus
            from music21.midi import translate

            try:
                midi_bytes = translate.streamToMidiFile(corpus.parse(name)).writestr()
            except Exception:  # a chorale music21 cannot translate: skip it, count it
                failed += 1
                midi_bytes = None
            if midi_bytes:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(midi_bytes)
            if handle:
                handle.advance(1)
        if path.exists():
            paths.append(path)
    if failed and progress is not None:
        progress.note(f"{failed} chorale(s) could not be converted and were skipped")
    return paths


def midi_files(data: str, *, limit: int | None = None, progress: Any = None) -> list[Path]:
    """The training files: `bach`, or the MIDI files under a folder (recursively), sorted."""
    from studio.paths import studio_home

    if data == "bach":
        return bach_chorales_midi(studio_home() / "cache" / "bach-chorales", limit, progress)
    folder = Path(data).expanduser()
    if not folder.exists():
        raise InputFileError(f"--data {folder} does not exist", "pass a folder of .mid files, or `bach`")
    if folder.is_file():
        files = [folder] if folder.suffix in MIDI_SUFFIXES else []
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix in MIDI_SUFFIXES and p.is_file())
    if not files:
        raise InputFileError(f"--data {folder} holds no MIDI files (.mid, .midi)", "pass a folder of .mid files, or `bach`")
    return files[:limit] if limit else files


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
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW state as flat tensors (for safetensors) + the JSON-able rest."""
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state_keys": {}}
    for index, entry in state["state"].items():
        meta["state_keys"][str(index)] = sorted(entry)
        for name, value in entry.items():
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous() if hasattr(value, "detach") else value
    return tensors, meta


def _load_optimizer(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    state = {int(i): {name: tensors[f"{i}.{name}"] for name in names} for i, names in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, *, model: Any, tokenizer: Any, optimizer: Any, step: int, config: MidiTrainConfig,
                    history: dict[str, Any]) -> Path:
    import torch
    from safetensors.torch import save_file

    from studio.pipelines.music_symbolic import quiet_transformers

    with atomic_path(path, is_dir=True) as tmp:
        with quiet_transformers():  # no per-shard bar under the training bar
            model.save_pretrained(tmp)
        tokenizer.save(tmp / "tokenizer.json")
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "config": asdict(config), "optimizer": meta, **history}, indent=2))
    return path


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
    """Run (or resume) a training run; returns a summary (final folder, steps, losses)."""
    import torch
    from safetensors.torch import load_file

    # 1. check the config and the run folder
    check_config(config)
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "pass a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run folder {out}: {exc.strerror}", "pass a writable folder with --out") from exc
    existing = checkpoints(out)
    if existing and not config.resume:
        raise UsageError(f"{out} already holds checkpoints (latest step {existing[-1][0]})",
                         "pass --resume to continue it, or a new --out")
    if config.resume and not existing:
        raise UsageError(f"nothing to resume: {out} holds no checkpoint-NNNNNN folder", "drop --resume to start a new run")

    # 2. model and tokenizer (a checkpoint, a base model, or a new one)
    start_step, history = 0, {"train_loss": None, "val_loss": None, "best_val_loss": None}
    if existing:
        start_step, ckpt = existing[-1]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if start_step >= config.steps:
            raise UsageError(f"{out} is already trained to step {start_step}", f"pass --steps above {start_step} to train further")
        model, tokenizer = _load_model(str(ckpt), {"use_safetensors": True})
        history.update({k: state.get(k) for k in history})
    elif config.model:
        model, tokenizer = _load_model(spec.location() if spec else config.model,
                                       spec.load_kwargs() if spec else {"use_safetensors": True}, spec)
    else:
        model, tokenizer = _new_model(config)
    model.loss_type = "ForCausalLM"  # say it: transformers warns at the first step when it is left unset
    context = int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024))
    if config.seq_len > context:
        raise UsageError(f"--seq-len {config.seq_len} is longer than the model's context ({context})",
                         f"use --seq-len {context} or less")

    # 3. data
    files = midi_files(config.data, limit=config.limit, progress=progress)
    train_stream, val_stream = split_streams(tokenize_files(files, tokenizer, progress), config.val_fraction)
    if len(train_stream) <= config.seq_len + 1:
        raise UsageError(f"only {len(train_stream)} training tokens, fewer than one window of --seq-len {config.seq_len}",
                         "add MIDI files or lower --seq-len")
    train_data = torch.tensor(train_stream, dtype=torch.long)
    val_data = torch.tensor(val_stream, dtype=torch.long)
    fingerprint = _fingerprint(files)
    if existing and state.get("data_fingerprint") not in (None, fingerprint):
        progress.note("the training files changed since the checkpoint; resuming on the new files")

    # 4. optimizer, device, resumed state
    model.to(device.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    if existing:
        _load_optimizer(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        rng = load_file(str(ckpt / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")] or torch.cuda.get_rng_state_all())
    else:
        torch.manual_seed(config.seed)  # dropout draws from here
    precision = device.resolved.precision
    def autocast() -> Any:  # bf16/fp16 as autocast over fp32 weights: AdamW needs fp32 master weights
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.device.type, dtype=device.dtype)

    scaler = torch.amp.GradScaler(device.device.type, enabled=(precision == "fp16"))

    def batch(step: int) -> Any:
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        starts = torch.randint(0, len(train_data) - config.seq_len, (config.batch_size,), generator=g)
        return torch.stack([train_data[s: s + config.seq_len] for s in starts.tolist()]).to(device.device)

    def validate() -> float | None:
        n = (len(val_data) - 1) // config.seq_len
        if n < 1:
            return None
        windows = val_data[: n * config.seq_len].view(n, config.seq_len)[: config.val_batches * config.batch_size]
        model.eval()
        losses = []
        with torch.no_grad(), autocast():
            for chunk in windows.split(config.batch_size):
                chunk = chunk.to(device.device)
                losses.append(float(model(input_ids=chunk, labels=chunk).loss))
        model.train()
        return sum(losses) / len(losses)

    # 5. the loop
    log_path = out / "train_log.jsonl"
    handle = progress.task("training", total=config.steps)
    handle.advance(start_step)
    saved_at, started = start_step, time.perf_counter()
    loss_value = history["train_loss"]
    for step in range(start_step + 1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        x = batch(step)  # (B, T)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            from studio.errors import RuntimeFailure

            raise RuntimeFailure(f"training loss became {loss_value} at step {step}", "lower --lr, or resume from the last checkpoint")
        row: dict[str, Any] = {"step": step, "loss": round(loss_value, 5), "lr": optimizer.param_groups[0]["lr"]}
        history["train_loss"] = loss_value
        if step % config.val_every == 0 or step == config.steps:
            val = validate()
            if val is not None:
                row["val_loss"] = round(val, 5)
                history["val_loss"] = val
                if history["best_val_loss"] is None or val < history["best_val_loss"]:
                    history["best_val_loss"] = val
        append_jsonl(log_path, row)
        if on_log:
            on_log(row)
        handle.advance(1)
        handle.update(loss=loss_value, **({"val": history["val_loss"]} if history["val_loss"] is not None else {}))
        if step % config.save_every == 0 or step == config.steps:
            save_checkpoint(out / f"checkpoint-{step:06d}", model=model, tokenizer=tokenizer, optimizer=optimizer,
                            step=step, config=config, history={**history, "data_fingerprint": fingerprint,
                                                               "files": len(files)})
            saved_at = step
            for _, old in checkpoints(out)[: -config.keep]:
                shutil.rmtree(old, ignore_errors=True)

    # 6. the final model folder (replaced atomically when a resumed run finishes again)
    final = out / "final"
    trash = None
    if final.exists():
        trash = final.with_name(f".final-old-{int(time.time())}")
        final.rename(trash)
    from studio.pipelines.music_symbolic import quiet_transformers

    with atomic_path(final, is_dir=True) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save(tmp / "tokenizer.json")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return {"final": str(final), "steps": config.steps, "resumed_from": start_step or None, "last_checkpoint": saved_at,
            "train_loss": loss_value, "val_loss": history["val_loss"], "best_val_loss": history["best_val_loss"],
            "files": len(files), "train_tokens": len(train_stream), "val_tokens": len(val_stream),
            "seconds": round(time.perf_counter() - started, 2), "log": str(log_path)}
