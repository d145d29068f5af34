"""Contrastive (CLIP) training on open_clip models: data in, safetensors checkpoints out, resumable.

The model, its transforms, the tokenizer and the distributed contrastive loss are open_clip's own
(`create_model_and_transforms`, `get_tokenizer`, `ClipLoss` with `local_loss` / `gather_with_grad`).
What is written here is what open_clip (the library) leaves to its separate training scripts:

* data: image-caption pairs from a CSV/TSV (`--img-key`, `--caption-key`, paths relative to the
  file), a folder of images with `.txt` sidecars, or webdataset shards (`.tar`, brace patterns);
* an exactly resumable loop: the data order and every augmentation are pure functions of
  (seed, epoch, sample index), so a run interrupted and resumed from a checkpoint, or run on any
  number of processes with the same global batch, sees the same batches and ends with the same
  weights (bit for bit on one process; within float tolerance across process counts);
* hard negatives (`ContrastiveLoss`): the K most similar non-matching captions/images of each
  row, mined in the batch (all processes' features) and optionally in a memory of recent
  embeddings, are up-weighted in the InfoNCE denominator;
* gradient accumulation that keeps the contrastive batch whole (open_clip_train's feature cache:
  K sub-batches are one batch of negatives, not K small ones);
* the run (pipelines/training/run.py's TrainingRun, shared with the MIDI and adapter trainers):
  device and precision from the DeviceManager (--precision is the autocast dtype: fp32, bf16,
  fp16; open_clip_train's amp_bf16 and amp still mean bf16 and fp16), metrics.jsonl and the bar,
  and checkpoints in the shared layout (pipelines/training/checkpoint.py): checkpoints/step-N/
  holds open_clip_config.json + open_clip_model.safetensors (loadable with
  `open_clip.create_model_and_transforms("local-dir:DIR")`, or with the architecture name and
  `pretrained=DIR/open_clip_model.safetensors`) beside the trainer state (optimizer, scheduler,
  scaler, every RNG, step, data position, negative memory) and the config: no pickle anywhere.
  Runs checkpointed by older studio versions (step-NNNNNNNN/) resume too.

Distributed: launch the same command with `torchrun --nproc-per-node N -m studio clip train ...`
(CPU with gloo, or GPUs with NCCL), or on GPUs `accelerate launch --multi_gpu --num_processes N
-m studio clip train ...`, which runs torch's launcher; each process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment these launchers set. Several nodes: the same torchrun line on
each, `--nnodes M --rdzv-backend c10d --rdzv-endpoint NODE1:PORT --rdzv-id RUN` (tests/test_multinode.py
runs two nodes on 127.0.0.1). (`accelerate launch --cpu` starts a single
process unless accelerate is configured for multi-CPU/MPI: use torchrun on CPUs.) `--batch-size` is per process (open_clip's
convention), so the global batch is batch_size x processes x accum.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from studio.errors import InputFileError, UsageError
from studio.outputs import atomic_path, write_text_file
from studio.pipeline import IMAGE_SUFFIXES
from studio.pipelines.training.checkpoint import CONFIG_JSON
from studio.pipelines.training.run import PRECISION_WORDS, Dist, TrainingRun, training_device

# the DeviceManager's words (the autocast dtype over fp32 weights), and open_clip_train's, mapped to them
PRECISIONS = ("fp32", "bf16", "fp16", "auto", *PRECISION_WORDS)
# config fields that change what a run computes: a resumed run must agree on all of them
RESULT_FIELDS = ("data", "model", "pretrained", "img_key", "caption_key", "epochs", "steps", "lr", "weight_decay",
                 "warmup", "precision", "accum", "hard_negatives", "hard_negative_weight", "negative_memory",
                 "temperature", "lock_image", "seed", "grad_clip", "augment", "local_loss", "gather_with_grad")


@dataclass(frozen=True)
class TrainConfig:
    data: str  # CSV/TSV file, folder of images with .txt captions, or webdataset shards
    out: str = "runs/clip"  # run folder: checkpoints/, final weights, metrics.jsonl
    model: str = "auto"  # architecture name, CONFIG.json, open_clip folder, alias or hub id
    pretrained: str | None = None  # tag or .safetensors file for an architecture name / config
    val: str | None = None  # held-out data evaluated (retrieval, zero-shot) at the end
    img_key: str = "filepath"  # CSV/TSV column with image paths (open_clip_train's default)
    caption_key: str = "title"  # CSV/TSV column with captions
    epochs: int | None = None  # passes over the data (default 1 when --steps is not given)
    steps: int | None = None  # optimizer steps (overrides epochs)
    batch_size: int = 32  # samples per process per micro-batch
    accum: int = 1  # micro-batches per step; the contrastive batch spans all of them
    lr: float = 5e-5  # peak learning rate (fine-tuning; ~5e-4 from scratch)
    weight_decay: float = 0.2  # AdamW decay on weight matrices (not gains, biases, temperature)
    warmup: int | None = None  # linear warmup steps before the cosine decay (default 5% of steps)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast dtype; fp16 adds a grad scaler, GPU) | amp_bf16 | amp
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    hard_negatives: int = 0  # K hardest negatives per row up-weighted in the loss (0: plain InfoNCE)
    hard_negative_weight: float = 2.0  # how many times a hard negative counts in the denominator
    negative_memory: int = 0  # recent embeddings kept as extra negatives (a MoCo-style queue)
    temperature: str = "learnable"  # learnable | fixed:T (e.g. fixed:0.07)
    lock_image: bool = False  # freeze the image tower (LiT: train the text tower to match it)
    save_every: int = 500  # checkpoint every N steps (and always at the end); 0: only at the end
    log_every: int = 10  # metrics.jsonl row every N steps
    seed: int = 0  # model init, data order and augmentation
    device: str = "auto"  # auto | cpu | cuda (with several processes: cuda:LOCAL_RANK)
    workers: int | None = None  # data loader processes (default: 4 on GPU, 0 on CPU)
    grad_clip: float | None = None  # clip the gradient norm to this value
    augment: bool = True  # open_clip's training transform (random resized crop) vs the eval one
    local_loss: bool = True  # each process computes its rows' loss against all features
    gather_with_grad: bool = True  # gradients flow through the feature all-gather (exact full-batch grads)
    resume: bool = False  # continue from the latest checkpoint in `out`


# ============================================================================ data
@dataclass
class Sample:
    """One image-caption pair. `image()` decodes on demand (paths, or bytes from a shard)."""

    key: str
    caption: str | None
    label: str | None
    loader: Callable[[], Any]

    def image(self) -> Any:
        return self.loader()


# Training images are cropped and resized to the model's input (224-448 px) after opening; one
# far larger than that is shrunk while it is opened, as far as it still covers this box, so a
# folder of 12000 px photos never decodes whole into a batch (the crop's aspect is kept by cover).
OPEN_BOX = (1024, 1024)


def _open_path(path: Path) -> Callable[[], Any]:
    def load() -> Any:
        from studio.pipeline import load_image

        return load_image(path, max_size=OPEN_BOX, cover=True)
    return load


def _open_bytes(data: bytes, key: str) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except Exception as exc:
            raise InputFileError(f"shard sample {key} holds an unreadable image ({type(exc).__name__})",
                                 "repack the shard") from exc
    return load


class PairSource:
    """Map-style pairs (CSV/TSV rows or image files with sidecars): random access by index."""

    def __init__(self, rows: list[tuple[str, Path, str | None, str | None]], origin: str):
        self.rows = rows  # (key, image path, caption, label)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> Sample:
        key, path, caption, label = self.rows[i]
        return Sample(key, caption, label, _open_path(path))

    def iter_samples(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)

    def fingerprint(self) -> dict[str, Any]:
        return {"count": len(self), "first": self.rows[0][0] if self.rows else None,
                "last": self.rows[-1][0] if self.rows else None}


class ShardSource:
    """Webdataset shards read with the webdataset library. Samples are grouped by key
    (key.jpg + key.txt [+ key.cls]); the count comes from the tar headers (no decoding)."""

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, urls: list[str], origin: str):
        import tarfile

        from webdataset.tariterators import base_plus_ext

        self.urls = urls
        self.origin = origin
        keys = 0
        for url in urls:
            try:
                with tarfile.open(url) as tar:
                    seen = set()
                    for member in tar:
                        base, ext = base_plus_ext(member.name)
                        if base and ext and ext.lower() in self.IMAGE_EXTS:
                            seen.add(base)
                    keys += len(seen)
            except (OSError, tarfile.TarError) as exc:
                raise InputFileError(f"shard {url} is not a readable tar file ({exc})", "check the shard paths") from exc
        self.count = keys

    def __len__(self) -> int:
        return self.count

    def raw(self, order: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes per extension) in shard order, nothing decoded."""
        from webdataset.tariterators import tarfile_samples

        for sample in tarfile_samples([{"url": u} for u in (order or self.urls)]):
            if any(e in sample for e in self.IMAGE_EXTS):
                yield sample

    def decode(self, raw: dict[str, Any]) -> Sample:
        key = raw.get("__key__", "?")
        data = next(raw[e] for e in self.IMAGE_EXTS if e in raw)
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else None
        label = raw["cls"].decode("utf-8").strip() if "cls" in raw else None
        return Sample(key, caption, label, _open_bytes(data, key))

    def iter_samples(self) -> Iterator[Sample]:
        for raw in self.raw():
            yield self.decode(raw)

    def fingerprint(self) -> dict[str, Any]:
        return {"count": self.count, "shards": [Path(u).name for u in self.urls]}


def _is_shards(path_text: str) -> list[str] | None:
    from webdataset.shardlists import expand_urls

    path = Path(path_text).expanduser()
    if "{" in path_text or "::" in path_text or path_text.endswith(".tar"):
        urls = [str(Path(u).expanduser()) for u in expand_urls(path_text)]
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise InputFileError(f"shard {missing[0]} does not exist", "check the shard pattern")
        return urls
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
        if tars and not has_images:
            return tars
    return None


def open_data(path_text: str, *, img_key: str = "filepath", caption_key: str = "title",
              label_key: str | None = "label", need_captions: bool = True) -> PairSource | ShardSource:
    """Image-caption pairs from a CSV/TSV file, a folder, or webdataset shards; clean errors."""
    import csv

    path = Path(str(path_text)).expanduser()
    urls = _is_shards(str(path_text))
    if urls:
        return ShardSource(urls, str(path_text))
    if not path.exists():
        raise InputFileError(f"data {path} does not exist",
                             "pass a CSV/TSV file, a folder of images with .txt captions, or .tar shards")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv"):
            raise InputFileError(f"data {path.name} is not a CSV/TSV file, a folder or a .tar shard",
                                 "pass a .csv/.tsv with image and caption columns, or a folder")
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            for key, flag in ((img_key, "--img-key"), (caption_key, "--caption-key")):
                if key not in columns and (key == img_key or need_captions):
                    raise UsageError(f"{path.name} has no column {key!r} (columns: {', '.join(columns) or 'none'})",
                                     f"name the column with {flag}")
            rows = []
            for n, row in enumerate(reader):
                image = Path(row[img_key]).expanduser()
                image = image if image.is_absolute() else path.parent / image
                if not image.is_file():
                    raise InputFileError(f"{path.name} row {n + 2}: image {row[img_key]} does not exist",
                                         "image paths are relative to the CSV file's folder")
                caption = (row.get(caption_key) or "").strip() or None
                if need_captions and caption is None:
                    raise UsageError(f"{path.name} row {n + 2} has an empty caption", "fill it in or drop the row")
                label = (row.get(label_key) or "").strip() or None if label_key else None
                rows.append((f"{n}:{row[img_key]}", image, caption, label))
        if not rows:
            raise UsageError(f"{path.name} has no rows", "add image-caption rows")
        return PairSource(rows, str(path))
    # a folder: images with same-stem .txt captions; images in subfolders carry the subfolder
    # name as their class label (the ImageFolder layout zero-shot evaluation reads)
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputFileError(f"folder {path} holds no images", f"image suffixes: {', '.join(IMAGE_SUFFIXES)}")
    rows = []
    uncaptioned = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.exists() else None
        if caption is None:
            uncaptioned.append(image)
        rel = image.relative_to(path)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        rows.append((str(rel), image, caption or None, label))
    if need_captions and uncaptioned:
        raise UsageError(f"{len(uncaptioned)} of {len(images)} images in {path} have no .txt caption "
                         f"(first: {uncaptioned[0].name})", "write IMAGE.txt beside each image")
    return PairSource(rows, str(path))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of process, worker and
    resume point, which is what makes runs reproducible across all three. A splitmix64 mix of
    the three numbers (numpy's SeedSequence does the same job at ~0.5 ms a call)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1  # 63 bits: what torch's manual_seed takes


def prepare_sample(sample: Sample, transform: Any, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    import torch

    # torchvision's random crop draws from torch's global CPU generator and open_clip's colour
    # jitter from python's `random`: seed both per sample, and restore them so the caller's RNG
    # is untouched. (The generator's own get/set_state: torch.random.fork_rng + manual_seed cost
    # ~0.6 ms a sample, a fifth of a tiny model's step.)
    image = sample.image()
    generator = torch.default_generator
    torch_state, py_state = generator.get_state(), random.getstate()
    try:
        generator.manual_seed(seed)
        random.seed(seed)
        pixels = transform(image)  # (3, H, W)
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)
    tokens = tokenizer([sample.caption or ""])[0]  # (context_length,)
    return pixels, tokens


def _torch_data():
    import torch.utils.data as tud

    return tud


class PairDataset(_torch_data().Dataset):
    """Map-style dataset indexed by (epoch, index) so each sample's augmentation is seeded."""

    def __init__(self, source: PairSource, transform: Any, tokenizer: Any, seed: int):
        self.source, self.transform, self.tokenizer, self.seed = source, transform, tokenizer, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, ref: tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = ref
        return prepare_sample(self.source.sample(index), self.transform, self.tokenizer,
                              sample_seed(self.seed, epoch, index))


class RankBatches(_torch_data().Sampler):
    """This process's share of each global batch of one epoch, from `start` on. The epoch's
    order is a seeded permutation of all samples; global batch b is order[b*G:(b+1)*G] and
    process r takes its r-th slice, so the global batch does not depend on the process count.
    Incomplete last batches are dropped (every process must step together)."""

    def __init__(self, n: int, local_batch: int, rank: int, world: int, seed: int, epoch: int, start: int = 0):
        self.n, self.local, self.rank, self.world = n, local_batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.n // (self.local * self.world) - self.start

    def __iter__(self):
        import numpy as np

        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        g = self.local * self.world
        for b in range(self.start, self.n // g):
            chunk = order[b * g:(b + 1) * g][self.rank * self.local:(self.rank + 1) * self.local]
            yield [(self.epoch, int(i)) for i in chunk]


class ShardBatches(_torch_data().IterableDataset):
    """Webdataset shards as ready batches for this process. Every process streams the same
    seeded shard order (cheap: raw bytes, no decoding) and decodes only its slice of each global
    batch, so batches match a single-process run and resuming is skipping samples. DataLoader
    workers take global batches round-robin, which the loader reads back in order."""

    def __init__(self, source: ShardSource, transform: Any, tokenizer: Any, seed: int, epoch: int,
                 local_batch: int, rank: int, world: int, start: int = 0):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.seed, self.epoch, self.local, self.rank, self.world, self.start = seed, epoch, local_batch, rank, world, start

    def __iter__(self):
        import numpy as np
        import torch
        from torch.utils.data import get_worker_info
        from webdataset.filters import shuffle

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = [self.source.urls[i] for i in rng.permutation(len(self.source.urls))]
        # a seeded sample-level shuffle buffer (webdataset's own) on top of the shard shuffle
        stream = shuffle(bufsize=1000, initial=100, rng=random.Random(int(rng.integers(2**31))))(self.source.raw(order))
        g = self.local * self.world
        total = len(self.source) // g
        batch: list[Any] = []
        position = 0
        for raw in stream:
            b = position // g
            if b >= total:
                break
            j = position % g
            position += 1
            if b < self.start or (b - self.start) % nw != wid or not (self.rank * self.local <= j < (self.rank + 1) * self.local):
                continue
            batch.append(prepare_sample(self.source.decode(raw), self.transform, self.tokenizer,
                                        sample_seed(self.seed, self.epoch, b * g + j)))
            if len(batch) == self.local:
                yield torch.stack([x for x, _ in batch]), torch.stack([t for _, t in batch])
                batch = []


# ============================================================================ loss
def _clip_loss_base():
    from open_clip.loss import ClipLoss

    return ClipLoss


class ContrastiveLoss(_clip_loss_base()):
    """open_clip's ClipLoss (feature gathering, local_loss labels) plus hard negatives.

    Plain InfoNCE treats every negative alike: for image i with similarities s_ij (scaled by the
    temperature), loss_i = -s_ii + log(exp(s_ii) + sum_{j!=i} exp(s_ij)). Most negatives of a
    random batch are easy and their terms are ~0, so the gradient comes from a few hard ones.
    With K > 0 the K most similar negatives of each row (captions for an image row, images for a
    caption row) count `weight` times in the denominator:

        loss_i = -s_ii + log(exp(s_ii) + weight * sum_{j in hard(i)} exp(s_ij) + sum_{other j} exp(s_ij))

    which is plain InfoNCE on logits with log(weight) added to the hard ones (the importance
    weighting of Robinson et al. 2021, "Contrastive Learning with Hard Negative Samples", with a
    top-K choice instead of a kernel). Mining uses detached similarities: which negatives are
    hard is a choice, not something to differentiate. open_clip has no hard-negative loss,
    hence this subclass.

    `memory` > 0 keeps the last M (gathered, detached) image and text embeddings as extra
    negative columns for every row (MoCo-style); hard negatives are mined over batch + memory.
    Stored embeddings come from slightly older weights, the usual trade of a memory bank.
    """

    def __init__(self, *, hard_negatives: int = 0, hard_weight: float = 2.0, memory: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        if hard_weight <= 0:
            raise UsageError(f"--hard-negative-weight {hard_weight} must be positive", "e.g. 2.0")
        self.hard_negatives = int(hard_negatives)
        self.hard_weight = float(hard_weight)
        self.memory_size = int(memory)
        self.memory_image = None  # (M, D) newest first
        self.memory_text = None

    def up_weight(self, logits: Any, labels: Any) -> Any:
        """Add log(weight) to each row's K largest non-positive logits."""
        import torch

        if not self.hard_negatives or self.hard_weight == 1.0:
            return logits
        scores = logits.detach().clone()  # (n, M)
        scores[torch.arange(scores.shape[0], device=scores.device), labels] = float("-inf")
        k = min(self.hard_negatives, scores.shape[1] - 1)
        if k <= 0:
            return logits
        hard = scores.topk(k, dim=1).indices  # (n, k)
        bonus = torch.zeros_like(scores).scatter_(1, hard, math.log(self.hard_weight))
        return logits + bonus

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        import torch
        import torch.nn.functional as F

        if not self.hard_negatives and not self.memory_size:
            return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
        logits_image, logits_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, logits_image.shape[0])
        if self.memory_size and self.memory_image is not None:
            mem_t = self.memory_text.to(text_features.dtype)
            mem_i = self.memory_image.to(image_features.dtype)
            rows_i = image_features if logits_image.shape[0] == image_features.shape[0] else None
            if rows_i is None:  # world > 1 without local_loss: the rows are all processes' features
                rows_i, rows_t = self._gathered(image_features, text_features)
            else:
                rows_t = text_features
            logits_image = torch.cat([logits_image, logit_scale * rows_i @ mem_t.T], dim=1)  # (n, N + M)
            logits_text = torch.cat([logits_text, logit_scale * rows_t @ mem_i.T], dim=1)
        logits_image = self.up_weight(logits_image, labels)
        logits_text = self.up_weight(logits_text, labels)
        loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss

    def _gathered(self, image_features, text_features):
        from open_clip.loss import gather_features

        return gather_features(image_features, text_features, local_loss=self.local_loss,
                               gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size)

    def update_memory(self, image_features, text_features) -> None:
        """Push this step's features (all processes', detached) into the memory, newest first."""
        import torch

        if not self.memory_size:
            return
        with torch.no_grad():
            img, txt = image_features.detach().float(), text_features.detach().float()
            if self.world_size > 1:
                import torch.distributed as dist

                gi = [torch.zeros_like(img) for _ in range(self.world_size)]
                gt = [torch.zeros_like(txt) for _ in range(self.world_size)]
                dist.all_gather(gi, img)
                dist.all_gather(gt, txt)
                img, txt = torch.cat(gi), torch.cat(gt)
            if self.memory_image is None:
                self.memory_image, self.memory_text = img[: self.memory_size], txt[: self.memory_size]
            else:
                self.memory_image = torch.cat([img, self.memory_image])[: self.memory_size]
                self.memory_text = torch.cat([txt, self.memory_text])[: self.memory_size]


# ============================================================================ helpers
def parse_temperature(text: str) -> float | None:
    """None for learnable, else the fixed temperature."""
    if text == "learnable":
        return None
    kind, _, value = text.partition(":")
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if kind != "fixed" or not (0 < t < 10):
        raise UsageError(f"--temperature {text!r} is not understood", "use learnable or fixed:T, e.g. fixed:0.07")
    return t


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip_train's grouping: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model: Any, cfg: TrainConfig):
    import torch

    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)  # open_clip_train's ViT settings
    try:
        # the fused kernel updates all parameters in one pass: measured ~3x faster than the
        # default foreach AdamW on this CPU for the tiny model (the 49408-row token table dominates)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total` (open_clip's cosine_lr)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ============================================================================ training
def check_config(cfg: TrainConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {cfg.precision!r}", "use fp32, bf16 or fp16 (amp_bf16 and amp still work)")
    for name in ("batch_size", "accum"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")
    for name in ("steps", "epochs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1", "pass a positive number")
    if cfg.lr <= 0:
        raise UsageError(f"--lr {cfg.lr} must be positive", "e.g. --lr 5e-5 (fine-tuning) or 5e-4 (from scratch)")
    if cfg.hard_negatives < 0 or cfg.negative_memory < 0 or cfg.save_every < 0:
        raise UsageError("--hard-negatives, --negative-memory and --save-every cannot be negative", "pass 0 to turn them off")
    parse_temperature(cfg.temperature)


@dataclass(frozen=True)
class _Plan:
    """How the data makes steps: samples per process and in all per step, steps per epoch and in all."""

    local_batch: int  # batch_size x accum
    global_batch: int  # local_batch x processes
    steps_per_epoch: int
    total: int
    warmup: int
    fingerprint: dict[str, Any]  # what identifies the data (a resume must see the same)

    @classmethod
    def of(cls, cfg: TrainConfig, data: PairSource | ShardSource, world: int) -> "_Plan":
        local = cfg.batch_size * cfg.accum
        steps_per_epoch = len(data) // (local * world)
        if steps_per_epoch == 0:
            raise UsageError(f"{len(data)} samples make no full batch of {local * world} "
                             f"(batch size {cfg.batch_size} x accum {cfg.accum} x {world} process(es))",
                             "lower --batch-size or --accum, or add data")
        total = cfg.steps or (cfg.epochs or 1) * steps_per_epoch
        return cls(local, local * world, steps_per_epoch, total,
                   cfg.warmup if cfg.warmup is not None else int(0.05 * total), data.fingerprint())

    def position(self, step: int) -> dict[str, Any]:
        """The data position saved with a checkpoint (epoch and batch follow from the step)."""
        return {"step": step, "epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch,
                "global_batch": self.global_batch, "total_steps": self.total, "data_fingerprint": self.fingerprint}

    def check_resume(self, state: Any) -> None:
        position = state.extra.get("position") or {} if state is not None else {}
        if position.get("global_batch", self.global_batch) != self.global_batch:
            raise UsageError(f"--resume with a global batch of {self.global_batch}; the run used {position['global_batch']}",
                             "keep batch size x processes x accum the same to continue exactly")
        if position.get("data_fingerprint", self.fingerprint) != self.fingerprint:
            raise UsageError("--resume: the training data changed since the checkpoint",
                             "resume on the same data, or start a new --out")


@dataclass
class _Parts:
    """What a run trains: the open_clip model and its companions, and the optimizer side."""

    model: Any
    model_cfg: dict[str, Any]
    tokenizer: Any
    source: Any
    train_tf: Any
    val_tf: Any
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    loss_fn: Any = None


def train(cfg: TrainConfig, progress: Any = None, *, on_step: Callable[[int, dict[str, Any]], None] | None = None,
          device: Any = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns a summary. `on_step(step, metrics)` is called
    after every optimizer step (and after that step's checkpoint). `device`: a DeviceManager
    (default: the one cfg.device and cfg.precision ask for)."""
    import torch

    from studio.progress import Progress

    # 1. check the config; the process group, device and run folder (every process checks before any writes)
    check_config(cfg)
    fixed_t = parse_temperature(cfg.temperature)
    dist = Dist.from_env()
    progress = progress if progress is not None and dist.main else Progress(enabled=False)
    device = device or training_device(cfg.device, cfg.precision, dist=dist, progress=progress)
    dist.start(device.device.type)
    run = TrainingRun(cfg.out, cfg, device=device, progress=progress, resume=cfg.resume, dist=dist,
                      must_match=RESULT_FIELDS)
    dist.barrier()

    # 2. the data, and how many steps it makes (a resumed run must agree)
    data = open_data(cfg.data, img_key=cfg.img_key, caption_key=cfg.caption_key)
    plan = _Plan.of(cfg, data, dist.world)
    plan.check_resume(run.state())
    run.samples_per_step = plan.global_batch

    # 3. model, optimizer, schedule, scaler, loss; what a checkpoint holds; resume
    parts = _build_model(cfg, run, fixed_t, progress)
    parts.optimizer = make_optimizer(parts.model, cfg)
    parts.scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, warmup_cosine(plan.warmup, plan.total))
    parts.scaler = run.grad_scaler()
    parts.loss_fn = ContrastiveLoss(hard_negatives=cfg.hard_negatives, hard_weight=cfg.hard_negative_weight,
                                    memory=cfg.negative_memory, local_loss=cfg.local_loss,
                                    gather_with_grad=cfg.gather_with_grad, cache_labels=True, rank=dist.rank,
                                    world_size=dist.world)
    _track(run, parts, plan)
    if run.restore() is not None:
        progress.note(f"resuming from {run.checkpoint.path.name} (step {run.start} of {plan.total})"
                      if run.start < plan.total else f"the run is already complete ({run.checkpoint.path.name})")

    # 4. the loop: one optimizer step per global batch; then the final weights and validation
    last = run.fit(_stepper(cfg, parts, data, plan, run, fixed_t), total=plan.total, save_every=cfg.save_every,
                   log_every=cfg.log_every, on_step=on_step, show={"temperature": "temp"},
                   nan_hint="lower --lr, use --precision fp32, or add --grad-clip 1.0")
    return _finish(run, cfg, plan, parts, last, progress)


def _build_model(cfg: TrainConfig, run: TrainingRun, fixed_t: float | None, progress: Any) -> _Parts:
    """open_clip's factory; temperature, frozen tower and checkpointing as configured."""
    import torch

    from studio.pipelines.clip import create, get_tokenizer, model_config, resolve_clip

    source = resolve_clip(cfg.model, pretrained=cfg.pretrained, require_weights=False)
    if source.notice:
        progress.note(source.notice)
    if not source.has_weights and run.checkpoint is None:
        progress.note(f"{source.label} has no pretrained weights: training from a random init")
    torch.manual_seed(cfg.seed)  # a random init is part of what --seed reproduces
    model, train_tf, val_tf = create(source, device=run.device.device, output_dict=True)
    if fixed_t is not None:
        model.logit_scale.data.fill_(math.log(1 / fixed_t))
        model.logit_scale.requires_grad_(False)
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    return _Parts(model, model_config(source), get_tokenizer(source), source, train_tf, val_tf)


def _track(run: TrainingRun, parts: _Parts, plan: _Plan) -> None:
    """A checkpoint: the open_clip folder (loadable with `local-dir:`), optimizer, schedule,
    scaler, RNG, the data position and the negative memory."""
    from safetensors.torch import load_file

    from studio.pipelines.clip import WEIGHTS_NAME, save_clip_folder

    loss_fn = parts.loss_fn

    def save_model(folder: Path) -> None:
        save_clip_folder(parts.model, parts.model_cfg, folder,
                         extra={"studio": {"step": run.step, "train_config": CONFIG_JSON}})

    def load_model(folder: Path) -> None:
        parts.model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=str(run.device.device)))

    def state() -> tuple[dict, dict]:
        memory = ({"memory.image": loss_fn.memory_image, "memory.text": loss_fn.memory_text}
                  if loss_fn.memory_image is not None else {})
        return {"position": plan.position(run.step)}, memory

    run.track(optimizer=parts.optimizer, scheduler=parts.scheduler, scaler=parts.scaler, save_model=save_model,
              load_model=load_model, state=state)
    resumed = run.state()
    if resumed is not None and "memory.image" in resumed.tensors:
        loss_fn.memory_image = resumed.tensors["memory.image"].to(run.device.device)
        loss_fn.memory_text = resumed.tensors["memory.text"].to(run.device.device)


def _stepper(cfg: TrainConfig, parts: _Parts, data: PairSource | ShardSource, plan: _Plan, run: TrainingRun,
             fixed_t: float | None) -> Callable[[int], dict[str, Any]]:
    """step(done) runs optimizer step done+1 on global batch `done` of the seeded data order."""
    import torch

    dev, dist, model = run.device.device, run.dist, parts.model
    net = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    workers = cfg.workers if cfg.workers is not None else (4 if dev.type == "cuda" else 0)
    transform = parts.train_tf if cfg.augment else parts.val_tf

    def loader_for(epoch: int, start: int) -> Any:
        if isinstance(data, ShardSource):
            ds = ShardBatches(data, transform, parts.tokenizer, cfg.seed, epoch, plan.local_batch, dist.rank,
                              dist.world, start)
            return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda")
        sampler = RankBatches(len(data), plan.local_batch, dist.rank, dist.world, cfg.seed, epoch, start)
        return torch.utils.data.DataLoader(PairDataset(data, transform, parts.tokenizer, cfg.seed), batch_sampler=sampler,
                                           num_workers=workers, pin_memory=dev.type == "cuda")

    batches: dict[str, Any] = {"epoch": -1, "iter": None}

    def step(done: int) -> dict[str, Any]:
        epoch, batch_in_epoch = divmod(done, plan.steps_per_epoch)
        if batches["epoch"] != epoch:
            batches["iter"], batches["epoch"] = iter(loader_for(epoch, batch_in_epoch)), epoch
        images, texts = next(batches["iter"])
        images = images.to(dev, non_blocking=True)  # (accum*B, 3, H, W)
        texts = texts.to(dev, non_blocking=True)  # (accum*B, L)
        lr = parts.scheduler.get_last_lr()[-1]
        loss = _train_step(net, model, parts.loss_fn, parts.optimizer, parts.scaler, run.autocast, images, texts, cfg, dist)
        parts.scheduler.step()
        if fixed_t is None:
            with torch.no_grad():  # open_clip_train's clamp: temperature stays >= 0.01
                model.logit_scale.clamp_(0, math.log(100))
        return {"loss": loss, "lr": lr, "epoch": epoch, "temperature": float(1 / model.logit_scale.detach().exp())}
    return step


def _finish(run: TrainingRun, cfg: TrainConfig, plan: _Plan, parts: _Parts, last: dict[str, Any],
            progress: Any) -> dict[str, Any]:
    """The final checkpoint's files linked into the run folder (so it is a model), validation, summary."""
    from studio.pipelines.clip import CONFIG_NAME, WEIGHTS_NAME, ClipEmbedder, load_templates

    final_ckpt = run.save(plan.total)
    summary: dict[str, Any] = {"out": str(run.out), "steps": plan.total, "resumed_from": run.start or None,
                               "global_batch": plan.global_batch, "world_size": run.dist.world,
                               "checkpoint": str(final_ckpt), **{k: v for k, v in last.items() if k != "step"}}
    if run.dist.main:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            target = run.out / name
            if target.exists():
                target.unlink()  # a finished run's final files are re-derived from its last checkpoint
            try:
                os.link(final_ckpt / name, target)  # same bytes, no second copy on disk
            except OSError:
                import shutil

                with atomic_path(target, overwrite=True) as tmp:
                    shutil.copyfile(final_ckpt / name, tmp)
        if cfg.val:
            parts.model.eval()
            val = open_data(cfg.val, img_key=cfg.img_key, caption_key=cfg.caption_key, need_captions=False)
            embedder = ClipEmbedder(parts.model, parts.val_tf, parts.tokenizer, parts.source, run.device.device)
            summary["val"] = embedder.evaluate(val.iter_samples(), templates=load_templates("simple"), total=len(val),
                                               progress=progress)
            run.record({"val": summary["val"]})
        write_text_file(run.out / "summary.json", json.dumps(summary, indent=2, default=str), overwrite=True)
    run.dist.barrier()
    return summary


def _train_step(net, model, loss_fn, optimizer, scaler, autocast, images, texts, cfg: TrainConfig, dist: Dist) -> float:
    """One optimizer step over accum micro-batches; returns the (global-batch) loss."""
    import contextlib

    import torch

    optimizer.zero_grad(set_to_none=True)
    if cfg.accum == 1:
        with autocast():
            out = net(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        scaler.scale(loss).backward()
        feats = (out["image_features"], out["text_features"])
    else:
        # open_clip_train's accumulation: features of all micro-batches first (no grad), then
        # each micro-batch again with grad, its features spliced into the cached ones, so every
        # backward sees the whole contrastive batch and the summed gradient is exactly the
        # full-batch gradient. The temperature enters every pass' loss, so it keeps its gradient
        # in the first pass only (open_clip_train counts it accum times).
        chunks_i, chunks_t = images.chunk(cfg.accum), texts.chunk(cfg.accum)
        with torch.no_grad(), autocast():
            cached = [net(i, t) for i, t in zip(chunks_i, chunks_t)]
        cached_i = [c["image_features"] for c in cached]
        cached_t = [c["text_features"] for c in cached]
        for j in range(cfg.accum):
            sync = net.no_sync if (dist.world > 1 and j < cfg.accum - 1) else contextlib.nullcontext
            with sync():
                with autocast():
                    out = net(chunks_i[j], chunks_t[j])
                    all_i = torch.cat(cached_i[:j] + [out["image_features"]] + cached_i[j + 1:])
                    all_t = torch.cat(cached_t[:j] + [out["text_features"]] + cached_t[j + 1:])
                    scale = out["logit_scale"] if j == 0 else out["logit_scale"].detach()
                    loss = loss_fn(all_i, all_t, scale)
                scaler.scale(loss).backward()
        feats = (torch.cat(cached_i), torch.cat(cached_t))
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    loss_fn.update_memory(*feats)
    value = loss.detach()
    if dist.world > 1:
        import torch.distributed as torch_dist

        torch_dist.all_reduce(value)
        value = value / dist.world
    return float(value)
