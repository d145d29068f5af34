"""`studio adapt train`: teach a base model a subject, style or codebase with a few examples,
through peft adapters (LoRA, LoHa, LoKr, IA3); no hand-written adapter layers.

    image    DreamBooth-style LoRA on a Stable Diffusion UNet (and optionally its text encoder),
             from a folder of images with .txt sidecars or one --instance-prompt, optional prior
             preservation (--class-prompt); saved with diffusers' `save_lora_weights` as
             pytorch_lora_weights.safetensors, the layout `load_lora_weights` (and so
             `studio image --lora`) reads. The recipe follows diffusers'
             examples/dreambooth/train_dreambooth_lora.py.
    caption  image + caption pairs (a folder with .txt sidecars, or JSONL {image, caption}) on a
             BLIP/GIT captioner.
    code     a folder of source files, or JSONL {prompt, completion} (loss on the completion
             only) or {text}, on a causal LM.
    midi     a folder of MIDI files, tokenised with the model's own miditok tokenizer
             (pipelines/music_symbolic.py), on the MIDI LM.

The loop is the same for every task: a seeded batch per step (data order, noise, timesteps and
dropout are functions of (seed, step, micro-batch), so `--resume` from a checkpoint continues bit
for bit), gradient accumulation, AdamW on the adapter parameters only (kept in fp32 even over a
bf16 base).

Several processes, one machine or many: launch the same command with torchrun (`torchrun
--nproc-per-node N`, or `--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT` on each node).
Each process runs --accum micro-batches of --batch-size per step, the step's micro-batches
numbered across processes, and the adapter gradients are summed over all of them before one
AdamW step: N processes with --accum A take the steps one process with --accum N*A takes. The
first process writes checkpoints, metrics and the adapter (a resume needs --out on storage every
node reads). The run itself is pipelines/training/run.py's TrainingRun: checkpoints in the shared
layout (OUT/checkpoints/step-NNNNNN/ with adapter.safetensors as its model file; older
optimizer.pt checkpoints still resume), the progress bar and OUT/metrics.jsonl. The finished
adapter folder carries studio.json (method, rank, alpha, targets, base, settings).

Training lives here, above the inference-time adapters package (studio.adapters loads, fuses
and merges adapters and imports nothing from pipelines or training).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from studio.errors import InputFileError, RuntimeFailure, UsageError
from studio.pipelines.training.checkpoint import find_checkpoints
from studio.pipelines.training.run import Dist, TrainingRun

TASKS = ("image", "caption", "code", "midi")
ADAPTER_FILE = "adapter.safetensors"  # a checkpoint's model file: the trainable adapter parameters
# what a resumed run must share with its checkpoints: --steps may grow, the adapter's shape may not
MUST_MATCH = ("method", "rank", "alpha", "targets", "task", "base", "seed", "batch_size", "accum", "lr")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
IMAGE_ONLY = {"resolution", "instance_prompt", "class_prompt", "class_data", "num_class_images", "prior_weight",
              "train_text_encoder", "validation_steps"}


@dataclass(frozen=True)
class TrainConfig:
    base: str  # base model: alias, hub id or folder
    data: str  # training data: folder, or JSONL (code, caption)
    task: str  # image | caption | code | midi
    out: str  # adapter folder to write (checkpoints go in OUT/checkpoints)
    method: str = "lora"  # lora | loha | lokr | ia3 (image: lora, the format load_lora_weights reads)
    rank: int = 8  # adapter rank r
    alpha: float | None = None  # scaling numerator (alpha / r); default = rank
    targets: tuple[str, ...] = ()  # module names to adapt; () = attention (image) / all linear layers
    dropout: float = 0.0  # adapter dropout
    steps: int = 100  # optimiser steps in all (a resumed run stops here too)
    lr: float = 1e-4  # AdamW learning rate (constant, as diffusers' DreamBooth default)
    batch_size: int = 1  # samples per micro-batch
    accum: int = 1  # micro-batches per optimiser step
    max_length: int = 256  # tokens per text/MIDI window
    resolution: int | None = None  # image side in pixels; None = the model's default
    instance_prompt: str | None = None  # image: the prompt for every image without a .txt sidecar
    class_prompt: str | None = None  # image: prior preservation on, with this class prompt
    class_data: str | None = None  # image: folder of class images (generated into OUT/class_images if too few)
    num_class_images: int = 8  # image: how many class images prior preservation uses
    prior_weight: float = 1.0  # image: weight of the prior-preservation loss
    train_text_encoder: bool = False  # image: also a LoRA on the text encoder
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    quantize_base: str | None = None  # int8 | int4: a quantised frozen base (QLoRA-style; bitsandbytes, CUDA)
    validation_prompt: str | None = None  # image/code: sample this every validation_every steps
    validation_every: int = 0  # steps between validation samples (0: only at the end)
    validation_steps: int = 25  # image: denoising steps of each validation image
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    seed: int = 0  # data order, noise and initialisation
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints

    def check(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"unknown --task {self.task!r}", f"use one of {'|'.join(TASKS)}")
        from studio.adapters.peft_adapters import METHODS

        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}", f"use one of {'|'.join(METHODS)}")
        if self.task == "image" and self.method != "lora":
            raise UsageError(f"--method {self.method} for images: diffusers' load_lora_weights reads LoRA only",
                             "use --method lora for --task image")
        for name, low in (("steps", 1), ("batch_size", 1), ("accum", 1), ("max_length", 8), ("validation_steps", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {low}", f"pass --{name.replace('_', '-')} {max(low, 1)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}", "pass --lr 1e-4")
        if self.quantize_base not in (None, "none", "int8", "int4"):
            raise UsageError(f"unknown --quantize-base {self.quantize_base!r}", "use int8 or int4")
        if self.quantize_base in ("int8", "int4") and self.task == "image":
            raise UsageError("--quantize-base applies to transformers bases (caption, code, midi)",
                             "drop --quantize-base for --task image")
        if self.class_prompt and self.task != "image":
            raise UsageError("--class-prompt (prior preservation) is for --task image", "drop --class-prompt")


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's checkpoints (OUT/checkpoints/step-NNNNNN/), oldest first."""
    return [(c.step, c.path) for c in find_checkpoints(Path(out))]


def _trainable(modules: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{name}": p for prefix, m in modules.items() for name, p in m.named_parameters() if p.requires_grad}


def _save_trainable(modules: dict[str, Any]) -> Callable[[Path], None]:
    """A checkpoint's model files: the adapter parameters only (the base is frozen and reloadable)."""
    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in _trainable(modules).items()},
                  str(Path(folder) / ADAPTER_FILE))
    return save


def _load_trainable(modules: dict[str, Any]) -> Callable[[Path], None]:
    def load(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / ADAPTER_FILE))
        params = _trainable(modules)
        if set(tensors) != set(params):
            raise UsageError(f"checkpoint {folder} does not match this run's adapter (method, rank or targets changed)",
                             "resume with the settings the checkpoint was trained with, or pick a new --out")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
    return load


# ----------------------------------------------------------------------------- data
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}:{i} is not valid JSON ({exc.msg})", "one JSON object per line") from exc
    if not rows:
        raise InputFileError(f"{path} holds no rows", "add lines like {\"prompt\": ..., \"completion\": ...}")
    return rows


def image_caption_pairs(data: str, default_prompt: str | None, *, need_caption: bool = True) -> list[tuple[Path, str]]:
    """(image, caption) pairs: a folder of images with NAME.txt sidecars (else default_prompt),
    or JSONL rows {image, caption|text} with image paths relative to the file."""
    path = Path(data).expanduser()
    if not path.exists():
        raise InputFileError(f"--data {data} does not exist", "pass a folder of images (with .txt captions) or a JSONL file")
    pairs: list[tuple[Path, str]] = []
    if path.is_file():
        for row in _read_jsonl(path):
            image = row.get("image") or row.get("file_name")
            caption = row.get("caption") or row.get("text") or default_prompt
            if not image or not caption:
                raise InputFileError(f"{path}: every row needs 'image' and 'caption'", 'e.g. {"image": "a.png", "caption": "a red cube"}')
            pairs.append(((path.parent / image).resolve(), str(caption)))
    else:
        for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else default_prompt
            if not caption and need_caption:
                raise UsageError(f"{image.name} has no caption ({sidecar.name} is missing)",
                                 "add a .txt sidecar per image, or pass --instance-prompt 'a photo of sks dog'")
            pairs.append((image, caption or ""))
    if not pairs:
        raise InputFileError(f"--data {data} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", "pass a folder of images")
    return pairs


def text_examples(data: str, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) windows for a causal LM: JSONL prompt/completion (labels -100 on the
    prompt), JSONL text, or a folder of source files cut into max_length windows."""
    from studio.pipelines.code import CONTEXT_SUFFIXES, SKIP_DIRS

    path = Path(data).expanduser()
    if not path.exists():
        raise InputFileError(f"--data {data} does not exist", "pass a folder of source files or a JSONL file")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples: list[tuple[list[int], list[int]]] = []
    if path.is_file() and path.suffix == ".jsonl":
        for row in _read_jsonl(path):
            if "completion" in row:
                prompt, completion = encode(str(row.get("prompt", ""))), encode(str(row["completion"])) + eos
                ids = (prompt + completion)[:max_length]
                labels = ([-100] * len(prompt) + completion)[:max_length]
            elif "text" in row:
                ids = (encode(str(row["text"])) + eos)[:max_length]
                labels = list(ids)
            else:
                raise InputFileError(f"{path}: rows need 'prompt'+'completion' or 'text'", '{"prompt": "def add(a, b):", "completion": " return a + b"}')
            if any(t != -100 for t in labels):
                examples.append((ids, labels))
        return examples
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CONTEXT_SUFFIXES
        and not any(part.startswith(".") or part in SKIP_DIRS for part in p.relative_to(path).parts[:-1]))
    stream: list[int] = []
    for file in files:
        try:
            stream += encode(file.read_text(encoding="utf-8")) + eos
        except UnicodeDecodeError:  # binary files with a text suffix: skip
            continue
    if not stream:
        raise InputFileError(f"--data {data} holds no source files", f"pass a folder with files ending in {', '.join(sorted(CONTEXT_SUFFIXES)[:8])}, ...")
    return _windows(stream, max_length)


def _windows(stream: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    # non-overlapping windows, the last one shorter (padded per batch)
    return [(stream[i:i + max_length], stream[i:i + max_length]) for i in range(0, len(stream), max_length)
            if len(stream[i:i + max_length]) > 1]


def midi_examples(data: str, location: str, max_length: int, progress: Any) -> list[tuple[list[int], list[int]]]:
    """MIDI files tokenised by the MIDI model's own miditok tokenizer, cut into windows."""
    from studio.pipelines.music_symbolic import load_midi_tokenizer
    from studio.pipelines.training.midi_train import midi_files, tokenize_files

    tokenizer = load_midi_tokenizer(location)
    sequences = tokenize_files(midi_files(data), tokenizer, progress)
    stream = [t for s in sequences for t in s]
    if len(stream) < 2:
        raise UsageError(f"--data {data}: no notes found in the MIDI files", "pass MIDI files that contain notes")
    return _windows(stream, max_length)


def _pad(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _load_rgb(path: Path, size: int) -> Any:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1]: (3, size, size)."""
    import numpy as np
    import torch

    from studio.pipeline import load_image

    # a large photo is shrunk while it is opened, only as far as it still covers the crop below
    image = load_image(str(path), max_size=(size, size), cover=True)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)


# ----------------------------------------------------------------------------- task jobs
class _Job:
    """What differs per task: building the adapted model, batches, loss, saving, validation."""

    modules: dict[str, Any]  # name -> module holding trainable adapter parameters
    samples = 0  # training examples

    def batch(self, rng: random.Random, step_gen: Any) -> Any: ...
    def loss(self, batch: Any) -> Any: ...
    def save(self, folder: Path) -> None: ...
    def validate(self, step: int, out: Path) -> Path | None: return None


class _TransformersJob(_Job):
    def __init__(self, config: TrainConfig, spec: Any, device: Any, progress: Any):
        import torch
        from peft import get_peft_model

        from studio.adapters import peft_adapters as pa
        from studio import models

        self.config, self.spec, self.device = config, spec, device
        quant = pa.require_bitsandbytes(config.quantize_base, device.device) if config.quantize_base in ("int8", "int4") else None
        label = spec.alias or spec.name
        with models.loading(spec, "base model"):
            model, processor = pa.load_transformers(spec.location(), spec.load_kwargs(),
                                                    dtype=None if quant else device.dtype, quantization_config=quant)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        model_type = getattr(model.config, "model_type", "")
        if config.task == "caption" and model_type not in ("blip", "git"):
            raise UsageError(f"caption adapters train BLIP and GIT captioners; {label} is a {model_type} model",
                             "pass a BLIP/GIT base (blip-base, git-base) for --task caption")
        if config.task in ("code", "midi") and not hasattr(model, "generate"):
            raise UsageError(f"{label} is not a language model", "pass a causal LM base for --task code/midi")
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        elif config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads in
        targets = list(config.targets) or pa.default_targets(model)
        pa.check_targets(model, targets, label)
        torch.manual_seed(config.seed)  # the adapter's initial weights
        peft_config = pa.peft_config(config.method, rank=config.rank, alpha=config.alpha, targets=targets,
                                     dropout=config.dropout, task_type="CAUSAL_LM" if config.task in ("code", "midi") else None)
        self.model = get_peft_model(model, peft_config)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 over a bf16 / quantised base
        if quant is None:
            self.model.to(device.device)
        self.targets = targets
        self.modules = {"model": self.model}
        # data
        if config.task == "caption":
            self.pairs = image_caption_pairs(config.data, None)
            self.samples = len(self.pairs)
            self.size = _processor_size(processor)
        elif config.task == "midi":
            self.examples = midi_examples(config.data, spec.location(), config.max_length, progress)
            self.samples = len(self.examples)
        else:
            if self.tokenizer is None:
                raise UsageError(f"{label} has no tokenizer", "pass a transformers causal LM folder for --task code")
            self.examples = text_examples(config.data, self.tokenizer, config.max_length)
            self.samples = len(self.examples)
        if not self.samples:
            raise UsageError(f"--data {config.data} gave no training examples", "add data")
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(self.tokenizer, "pad_token_id", None) or 0)

    def batch(self, rng: random.Random, step_gen: Any) -> Any:
        picks = [rng.randrange(self.samples) for _ in range(self.config.batch_size)]
        if self.config.task == "caption":
            return self._caption_batch([self.pairs[i] for i in picks])
        return _pad([self.examples[i] for i in picks], self.pad_id)

    def _caption_batch(self, pairs: list[tuple[Path, str]]) -> dict[str, Any]:
        from studio.pipeline import load_image

        # the processor resizes to its own size (BLIP 384): a large photo is shrunk while it is
        # opened, only as far as it still covers that size, never decoded whole into a batch
        size = getattr(getattr(self.processor, "image_processor", None), "size", None) or {}
        box = (int(size["width"]), int(size["height"])) if "width" in size and "height" in size else 2048
        images = [load_image(str(p), max_size=box, cover=True) for p, _ in pairs]
        enc = self.processor(images=images, text=[c for _, c in pairs], padding="longest", return_tensors="pt")
        ids = enc["input_ids"]  # (B, T)
        bos = getattr(getattr(self.model.config, "text_config", None), "bos_token_id", None)
        if self.model.config.model_type == "blip" and bos is not None:
            ids[:, 0] = bos  # BLIP decodes after [DEC], as its generate() sets it
        labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
        return {"pixel_values": enc["pixel_values"], "input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}

    def loss(self, batch: dict[str, Any]) -> Any:
        moved = {k: v.to(self.device.device) for k, v in batch.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(self.device.dtype)
        with self.device.autocast():
            return self.model(**moved).loss

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)

    def validate(self, step: int, out: Path) -> Path | None:
        import torch

        if self.config.task != "code" or not self.config.validation_prompt:
            return None
        ids = self.tokenizer(self.config.validation_prompt, return_tensors="pt").to(self.device.device)
        self.model.eval()
        with torch.no_grad():
            new = self.model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=self.pad_id)
        self.model.train()
        text = self.config.validation_prompt + self.tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return _write_validation(out, step, "txt", lambda p: p.write_text(text, encoding="utf-8"))


def _processor_size(processor: Any) -> int:
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def _write_validation(out: Path, step: int, suffix: str, write: Any) -> Path:
    from studio.outputs import atomic_path

    final = out / "validation" / f"step-{step:06d}.{suffix}"
    if final.exists():  # a resumed run re-validating the same step keeps the first file
        return final
    with atomic_path(final) as tmp:
        write(tmp)
    return final


class _ImageJob(_Job):
    """DreamBooth LoRA on a Stable Diffusion UNet (diffusers' train_dreambooth_lora.py, trimmed)."""

    def __init__(self, config: TrainConfig, spec: Any, device: Any, progress: Any):
        import torch
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from peft import LoraConfig, inject_adapter_in_model

        from studio.adapters import peft_adapters as pa
        from studio import models

        self.config, self.spec, self.device = config, spec, device
        label = spec.alias or spec.name
        if not pa.is_diffusers_folder(spec.location()):
            raise UsageError(f"--task image needs a diffusers Stable Diffusion folder; {label} is not one",
                             "pass an SD 1.x/2.x model (sd15, or `studio models make-tiny sd DIR`)")
        with models.loading(spec, "base model"):
            pipe = StableDiffusionPipeline.from_pretrained(spec.location(), safety_checker=None, requires_safety_checker=False,
                                                           **spec.load_kwargs(library="diffusers"))
        self.pipe = pipe
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False)
            m.to(device.device, dtype=device.dtype)
        self.size = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
        # class images before the adapter exists: prior preservation keeps what the base makes of the class
        self.class_pairs: list[tuple[Path, str]] = []
        if config.class_prompt:
            self.class_pairs = self._class_images(progress)
        targets = list(config.targets) or ["to_q", "to_k", "to_v", "to_out.0"]
        pa.check_targets(unet, targets, f"{label}'s UNet")
        torch.manual_seed(config.seed)
        unet_config = LoraConfig(r=config.rank, lora_alpha=float(config.alpha or config.rank), lora_dropout=config.dropout,
                                 init_lora_weights="gaussian", target_modules=targets)
        unet.add_adapter(unet_config)
        self.modules = {"unet": unet}
        self.targets = targets
        if config.train_text_encoder:
            te_config = LoraConfig(r=config.rank, lora_alpha=float(config.alpha or config.rank), lora_dropout=config.dropout,
                                   init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
            # peft directly: transformers 5's add_adapter wants a newer peft than 0.21
            inject_adapter_in_model(te_config, text_encoder)
            self.te_config = te_config
            self.modules["text_encoder"] = text_encoder
        for module in self.modules.values():
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet_config = unet_config
        self.pairs = image_caption_pairs(config.data, config.instance_prompt)
        self.samples = len(self.pairs)
        self._cache: dict[Path, Any] = {}

    def _class_images(self, progress: Any) -> list[tuple[Path, str]]:
        import torch

        c = self.config
        folder = Path(c.class_data).expanduser() if c.class_data else Path(c.out) / "class_images"
        have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if len(have) < c.num_class_images:
            from studio.outputs import atomic_path

            folder.mkdir(parents=True, exist_ok=True)
            handle = progress.task("class images", total=c.num_class_images - len(have))
            for i in range(len(have), c.num_class_images):
                gen = torch.Generator("cpu").manual_seed(c.seed * 7919 + i)
                with torch.no_grad():
                    image = self.pipe(c.class_prompt, num_inference_steps=20, generator=gen,
                                      height=self.size, width=self.size).images[0]
                with atomic_path(folder / f"class-{i:04d}.png") as tmp:
                    image.save(tmp, format="PNG")
                handle.advance(1)
            have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, c.class_prompt) for p in have[: c.num_class_images]]

    def _pixels(self, path: Path) -> Any:
        if path not in self._cache:
            self._cache[path] = _load_rgb(path, self.size)
        return self._cache[path]

    def batch(self, rng: random.Random, step_gen: Any) -> Any:
        import torch

        picks = [self.pairs[rng.randrange(self.samples)] for _ in range(self.config.batch_size)]
        if self.class_pairs:  # instance and class examples in one batch, split again in the loss
            picks += [self.class_pairs[rng.randrange(len(self.class_pairs))] for _ in range(self.config.batch_size)]
        pixels = torch.stack([self._pixels(p) for p, _ in picks])  # (B, 3, H, W)
        tok = self.pipe.tokenizer([c for _, c in picks], padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt")
        n = len(picks)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=step_gen)
        return {"pixels": pixels, "input_ids": tok.input_ids, "timesteps": timesteps, "gen": step_gen}

    def loss(self, batch: dict[str, Any]) -> Any:
        import torch
        import torch.nn.functional as F

        d = self.device
        pipe = self.pipe
        with torch.no_grad():
            dist = pipe.vae.encode(batch["pixels"].to(d.device, d.dtype)).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=batch["gen"]).to(d.device, d.dtype)
            latents = latents * pipe.vae.config.scaling_factor  # (B, 4, h, w)
        noise = torch.randn(latents.shape, generator=batch["gen"]).to(d.device, latents.dtype)
        timesteps = batch["timesteps"].to(d.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with d.autocast():
            hidden = pipe.text_encoder(batch["input_ids"].to(d.device))[0]  # (B, 77, C)
            pred = pipe.unet(noisy, timesteps, hidden).sample
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        pred, target = pred.float(), target.float()
        if not self.class_pairs:
            return F.mse_loss(pred, target)
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        return F.mse_loss(pred, target) + self.config.prior_weight * F.mse_loss(pred_prior, target_prior)

    def save(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        te_layers = (convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.text_encoder))
                     if "text_encoder" in self.modules else None)
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers, safe_serialization=True,
            # alpha and rank travel with the weights, so load_lora_weights scales as trained
            unet_lora_adapter_metadata=self.unet_config.to_dict(),
            text_encoder_lora_adapter_metadata=self.te_config.to_dict() if te_layers else None)

    def validate(self, step: int, out: Path) -> Path | None:
        import torch

        prompt = self.config.validation_prompt
        if not prompt:
            return None
        for m in self.modules.values():
            m.eval()
        gen = torch.Generator("cpu").manual_seed(self.config.seed)
        with torch.no_grad():
            image = self.pipe(prompt, num_inference_steps=self.config.validation_steps, generator=gen,
                              height=self.size, width=self.size).images[0]
        for m in self.modules.values():
            m.train()
        return _write_validation(out, step, "png", lambda p: image.save(p, format="PNG"))


# ----------------------------------------------------------------------------- the loop
@dataclass
class TrainReport:
    out: Path
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    samples_per_s: float = 0.0
    validation: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["first_loss"] = self.losses[0] if self.losses else None
        d["last_loss"] = self.losses[-1] if self.losses else None
        d.pop("losses")
        return d


def train(config: TrainConfig, device: Any, progress: Any, *, allow_pickle: bool = False,
          offline: bool | None = None) -> TrainReport:
    """Train an adapter per `config`; returns what happened. Writes only under config.out."""
    import torch

    from studio import models
    from studio.adapters import peft_adapters as pa

    # 1. check settings, the process group (torchrun) and the output folder (a resumed run keeps
    # its adapter's shape and recipe)
    config.check()
    out = Path(config.out).expanduser()
    if (out / pa.META_FILE).exists():
        raise UsageError(f"{out} already holds a finished adapter", "pick a new --out (studio never overwrites)")
    dist = Dist.from_env()
    if dist.world > 1:
        from studio.progress import Progress

        progress = progress if dist.main else Progress(enabled=False)
        if device.device.type == "cuda":
            device = device.with_settings(device=f"cuda:{dist.local_rank}")  # one GPU per process
    dist.start(device.device.type)
    run = TrainingRun(out, config, device=device, progress=progress, resume=config.resume, dist=dist,
                      samples_per_step=config.batch_size * config.accum * dist.world, must_match=MUST_MATCH,
                      allow_pickle=allow_pickle)

    # 2. base model + adapter + data; the first process builds first, so a hub download, and the
    # class images prior preservation makes, happen once and the others find them there
    task_for_model = {"image": "image", "caption": "caption", "code": "code", "midi": "music-midi"}[config.task]
    spec = models.resolve(config.base, task=task_for_model, allow_pickle=allow_pickle, offline=offline)
    if spec.notice:
        progress.note(spec.notice)
    if not dist.main:
        dist.barrier()
    with progress.status(f"loading {spec.alias or spec.name}"):
        job: _Job = (_ImageJob if config.task == "image" else _TransformersJob)(config, spec, device, progress)
    if dist.main:
        dist.barrier()
    for m in job.modules.values():
        m.train()
    params = [p for m in job.modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    losses: list[float] = []
    run.track(optimizer=optimizer, save_model=_save_trainable(job.modules), load_model=_load_trainable(job.modules),
              state=lambda: ({"losses": losses}, {}))

    # 3. resume, then the loop: each step's batch, noise and dropout depend on (seed, step) only
    state = run.restore()
    if state is not None:
        losses.extend(state.extra.get("losses") or [])
        progress.note(f"resuming from step {run.start} ({run.checkpoint.path})")
    if dist.world > 1:  # every process starts from the first one's adapter, as DDP would
        import torch.distributed as torch_dist

        for p in params:
            torch_dist.broadcast(p.data, src=0)
    base_modules = [job.pipe.unet, job.pipe.text_encoder] if config.task == "image" else [job.model]
    report = TrainReport(out=out, steps=config.steps, resumed_from=run.start, trainable_params=sum(p.numel() for p in params),
                         total_params=sum(p.numel() for m in base_modules for p in m.parameters()))
    last = run.fit(_stepper(job, optimizer, params, config, losses, report, dist), total=config.steps,
                   save_every=config.save_every, description=f"adapt {config.task} ({config.method} r={config.rank})",
                   nan_hint="lower --lr, or use --precision fp32")
    report.samples_per_s, report.losses = float(last.get("samples_per_s") or 0.0), losses

    # 4. validation, and the adapter itself (+ studio.json, written last), by the first process
    if dist.main:
        path = job.validate(config.steps, out)
        if path:
            report.validation.append(str(path))
        for m in job.modules.values():
            m.eval()
        job.save(out)
        pa.write_metadata(out, _metadata(config, job, spec, report, device))
    dist.barrier()
    return report


def micro_seed(step_seed: int, micro: int) -> int:
    """The seed of micro-batch `micro` of a step: the step's own for the first (what a run without
    accumulation always used), one drawn from (step seed, micro) for the others, so any process
    can make any micro-batch without making the ones before it."""
    if micro == 0:
        return step_seed
    return int.from_bytes(hashlib.sha256(f"{step_seed}:{micro}".encode()).digest()[:8], "little") >> 1


def _stepper(job: "_Job", optimizer: Any, params: list, config: TrainConfig, losses: list[float],
             report: TrainReport, dist: Dist | None = None) -> Callable[[int], dict[str, Any]]:
    import torch

    dist = dist or Dist()
    micro_batches = config.accum * dist.world  # in one optimizer step, over all processes

    def step(done: int) -> dict[str, Any]:
        step_seed = config.seed * 1_000_003 + done
        total_loss = 0.0
        for j in range(config.accum):
            seed = micro_seed(step_seed, dist.rank * config.accum + j)
            rng, step_gen = random.Random(seed), torch.Generator("cpu").manual_seed(seed)
            torch.manual_seed(seed)  # dropout
            loss = job.loss(job.batch(rng, step_gen)) / micro_batches
            if not torch.isfinite(loss):  # before backward: the adapter keeps its last finite weights
                raise RuntimeFailure(f"the loss became {loss.item()} at step {done + 1}", "lower --lr, or use --precision fp32")
            loss.backward()
            total_loss += float(loss.detach())
        if dist.world > 1:
            total_loss = _sum_over_processes(params, total_loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total_loss)
        n = done + 1
        if config.validation_every and n % config.validation_every == 0 and n < config.steps and dist.main:
            path = job.validate(n, report.out)
            if path:
                report.validation.append(str(path))
        return {"loss": total_loss, "lr": config.lr}
    return step


def _sum_over_processes(params: list, loss: float) -> float:
    """Sum the adapter gradients and the loss over all processes (one all-reduce of one flat
    tensor): what DDP does, done by hand because the frozen base's forward runs inside diffusers'
    and transformers' own modules (pipe.unet, the peft model), which a DDP wrapper would have to
    replace; an adapter's gradients are a few MB, so overlapping them with backward gains nothing."""
    import torch
    import torch.distributed as torch_dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    torch_dist.all_reduce(flat)  # (n_params + 1,)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return float(flat[-1])


def _metadata(config: TrainConfig, job: "_Job", spec: Any, report: TrainReport, device: Any) -> dict[str, Any]:
    """studio.json: what `studio adapt info` shows and what --lora checks an adapter against."""
    losses = report.losses
    return {
        "task": config.task, "method": config.method, "rank": config.rank, "alpha": float(config.alpha or config.rank),
        "targets": list(job.targets), "base": spec.identity(),
        "format": "diffusers" if config.task == "image" else "peft",
        "trainable_params": report.trainable_params, "total_params": report.total_params,
        "training": {k: v for k, v in asdict(config).items() if k not in ("base", "out", "resume", "task", "method",
                                                                         "rank", "alpha", "targets") and v not in (None, (), False)
                     and (config.task == "image" or k not in IMAGE_ONLY)},
        "result": {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "samples_per_s": round(report.samples_per_s, 3)},
        "device": device.describe()["resolved"],
    }


def config_from(**kwargs: Any) -> TrainConfig:
    """A TrainConfig from CLI values (None = default)."""
    values = {k: v for k, v in kwargs.items() if v is not None}
    if "targets" in values:
        values["targets"] = tuple(t.strip() for item in values["targets"] for t in str(item).split(",") if t.strip())
    return replace(TrainConfig(base=values.pop("base"), data=values.pop("data"), task=values.pop("task"),
                               out=values.pop("out")), **values)
