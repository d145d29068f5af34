"""`studio clip train|eval|embed|search` and `studio eval clip`: CLIP models through open_clip.

Thin commands: options become a TrainConfig or pipeline calls in pipelines/clip.py and
pipelines/training/clip_train.py (imported inside the functions, so `studio --help` stays fast).
"""

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from studio.cli.common import OUTPUT, Globals, global_options, new_app

clip_app = new_app("CLIP (open_clip): contrastive training, zero-shot/retrieval evaluation, embeddings and search.")

# the global options of a command that loads a CLIP model (train adds no --allow-pickle: open_clip
# reads its own checkpoints)
INFERENCE = ("device", "precision", *OUTPUT, "offline", "allow_pickle")
Model = Annotated[str, typer.Option("--model", "-m", help="alias, hub id, open_clip NAME@TAG, or a model/run folder")]
Pretrained = Annotated[Optional[str], typer.Option(help="pretrained tag or .safetensors file for an architecture name")]


def register(root: typer.Typer) -> None:
    root.add_typer(clip_app, name="clip")
    from studio.cli.eval import eval_app

    eval_app.command("clip", help="Zero-shot top-1/5 and image<->text recall@1/5/10 of a CLIP model (same as `studio clip eval`).")(evaluate)


def _model_name(model: str, pretrained: Optional[str]) -> str:
    """--model NAME --pretrained TAG is the one name NAME@TAG (what outputs record and replay)."""
    if not pretrained:
        return model
    if model == "auto":
        from studio.errors import UsageError

        raise UsageError("--pretrained goes with an architecture name (ViT-B-32) or a config file",
                         f"e.g. --model ViT-B-32 --pretrained {pretrained}")
    return f"{model}@{pretrained}"


def clip_embeddings(engine: Any, model: str, inputs: list[str], kind: str, batch_size: int) -> tuple[Any, Any]:
    """(N, D) float32 embeddings of image paths or texts from the clip-embed task, and its Result:
    how every command that needs CLIP embeddings gets them (through the engine, which resolves,
    loads once and applies the device flags)."""
    import numpy as np

    [result] = engine.run("clip-embed", {"inputs": tuple(inputs), "model": model, "kind": kind, "batch_size": batch_size})
    return np.asarray([item["embedding"] for item in result.value["items"]], dtype=np.float32), result


# ----------------------------------------------------------------------------- train
@clip_app.command()
@global_options("device", "precision", *OUTPUT, "offline")
def train(
    data: Annotated[str, typer.Option(help="CSV/TSV of image paths + captions, a folder of images with .txt captions, or webdataset .tar shards (brace patterns ok)")],
    model: Annotated[str, typer.Option("--model", "-m", help="open_clip architecture (ViT-B-32), CONFIG.json, open_clip folder, alias or hub id")] = "auto",
    pretrained: Pretrained = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: checkpoints/, final weights, metrics.jsonl")] = Path("runs/clip"),
    epochs: Annotated[Optional[int], typer.Option(help="passes over the data (default 1)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (overrides --epochs)")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per process per micro-batch")] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate (5e-5 fine-tuning, ~5e-4 from scratch)")] = 5e-5,
    warmup: Annotated[Optional[int], typer.Option(help="linear warmup steps before cosine decay (default 5% of steps)")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on weight matrices")] = 0.2,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="recompute activations: less memory, slower")] = False,
    accum: Annotated[int, typer.Option(help="micro-batches per step; the contrastive batch spans all of them")] = 1,
    hard_negatives: Annotated[int, typer.Option(help="up-weight each row's K hardest negatives (0: plain InfoNCE)")] = 0,
    hard_negative_weight: Annotated[float, typer.Option(help="how many times a hard negative counts in the loss")] = 2.0,
    negative_memory: Annotated[int, typer.Option(help="keep the last N embeddings as extra negatives (0: off)")] = 0,
    temperature: Annotated[str, typer.Option(help="learnable | fixed:T (e.g. fixed:0.07)")] = "learnable",
    lock_image: Annotated[bool, typer.Option("--lock-image", help="freeze the image tower (LiT)")] = False,
    val: Annotated[Optional[str], typer.Option(help="held-out data evaluated at the end (recall@k, zero-shot)")] = None,
    img_key: Annotated[str, typer.Option(help="CSV/TSV column with image paths")] = "filepath",
    caption_key: Annotated[str, typer.Option(help="CSV/TSV column with captions")] = "title",
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (always at the end); 0: end only")] = 500,
    log_every: Annotated[int, typer.Option(help="metrics.jsonl row every N steps")] = 10,
    grad_clip: Annotated[Optional[float], typer.Option(help="clip the gradient norm to this value")] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="open_clip's random-resized-crop training transform")] = True,
    workers: Annotated[Optional[int], typer.Option(help="data loader processes (default 4 on GPU, 0 on CPU)")] = None,
    seed: Annotated[int, typer.Option(help="seed for init, data order and augmentation")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in --out")] = False,
    opts: Globals = None,
) -> None:
    """Train or fine-tune a CLIP model contrastively (InfoNCE), resumable, on one or many processes.

    Several processes: `torchrun --nproc-per-node N -m studio clip train ...` (CPU or GPU), or on GPUs
    `accelerate launch --multi_gpu --num_processes N -m studio clip train ...`; --batch-size is per process.
    """
    from studio.pipelines.training.clip_train import TrainConfig
    from studio.pipelines.training.clip_train import train as run_training

    cfg = TrainConfig(data=data, out=str(out), model=model, pretrained=pretrained, val=val, img_key=img_key,
                      caption_key=caption_key, epochs=epochs, steps=steps, batch_size=batch_size, accum=accum, lr=lr,
                      weight_decay=weight_decay, warmup=warmup, precision=opts.precision or "fp32",
                      grad_checkpointing=grad_checkpointing, hard_negatives=hard_negatives,
                      hard_negative_weight=hard_negative_weight, negative_memory=negative_memory,
                      temperature=temperature, lock_image=lock_image, save_every=save_every, log_every=log_every,
                      seed=seed, device=opts.device or "auto", workers=workers, grad_clip=grad_clip, augment=augment,
                      resume=resume)
    progress = opts.progress()
    with progress:
        summary = run_training(cfg, progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if opts.json:
        typer.echo(json.dumps(summary, default=str))
    elif not opts.quiet:
        loss = f", loss {summary['loss']:.4f}" if isinstance(summary.get("loss"), float) else ""
        sys.stderr.write(f"wrote {summary['out']} (step {summary['steps']}{loss})\n")
        if summary.get("val"):
            _print_metrics(summary["val"], title="validation")


# ----------------------------------------------------------------------------- eval
@global_options(*INFERENCE)
def evaluate(
    data: Annotated[str, typer.Option(help="CSV/TSV, a folder (images + .txt captions; class subfolders for labels), or .tar shards")],
    model: Model = "auto",
    pretrained: Pretrained = None,
    labels: Annotated[Optional[Path], typer.Option(help="class names, one per line (default: the labels found in the data)")] = None,
    templates: Annotated[str, typer.Option(help="zero-shot prompts: openai (80) | simple (7) | none | FILE with {} per line")] = "openai",
    img_key: Annotated[str, typer.Option(help="CSV/TSV column with image paths")] = "filepath",
    caption_key: Annotated[str, typer.Option(help="CSV/TSV column with captions")] = "title",
    label_key: Annotated[str, typer.Option(help="CSV/TSV column with class labels")] = "label",
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="also write the metrics to this JSON file")] = None,
    opts: Globals = None,
) -> None:
    """Zero-shot top-1/5 (with prompt templates) and image<->text retrieval recall@1/5/10.

    The clip-embed task (through the engine, as every command) embeds the images, the captions and
    the class prompts; the metrics are computed from those embeddings."""
    import tempfile

    from studio.engine import Engine
    from studio.errors import UsageError
    from studio.outputs import write_text_file
    from studio.pipelines.clip import embedding_metrics, eval_plan, load_labels, load_templates, template_texts
    from studio.pipelines.training.clip_train import open_data

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1", "e.g. --batch-size 64")
    if out is not None and out.exists():  # fail before the embeddings, not after
        raise UsageError(f"{out} exists", "pick another --out")
    name = _model_name(model, pretrained)
    prompts = load_templates(templates)
    source = open_data(data, img_key=img_key, caption_key=caption_key, label_key=label_key, need_captions=False)
    progress = opts.progress()
    engine = Engine(opts.run_options("clip-embed", write=False), progress=progress)
    with progress, tempfile.TemporaryDirectory(prefix="studio-clip-eval-") as tmp:
        paths, captions, found = _eval_images(source, Path(tmp), progress)
        captioned, classnames = eval_plan(captions, found, load_labels(labels) if labels else None)
        images, result = clip_embeddings(engine, name, paths, "image", batch_size)
        texts = clip_embeddings(engine, name, captions, "text", batch_size)[0] if captioned else None
        classes = (clip_embeddings(engine, name, template_texts(classnames, prompts), "text", batch_size)[0]
                   if classnames else None)
    metrics = embedding_metrics(images, captions, found, text_emb=texts, classnames=classnames, class_text_emb=classes)
    report = {"model": result.value["model"], "data": str(data), "templates": templates, **metrics}
    if out is not None:
        write_text_file(out, json.dumps(report, indent=2), overwrite=False)
    if opts.json:
        typer.echo(json.dumps(report))
    else:
        _print_metrics(metrics, title=f"{result.value['model']['name']} on {data}")


def _eval_images(source: Any, tmp: Path, progress: Any) -> tuple[list[str], list[Any], list[Any]]:
    """Image paths, captions and labels of every sample. Images inside .tar shards have no path
    of their own: they are written (lossless PNG) into `tmp` for the clip-embed task to read."""
    rows = getattr(source, "rows", None)  # CSV/TSV and folders: (key, image path, caption, label)
    if rows is not None:
        return [str(r[1]) for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    paths, captions, labels = [], [], []
    handle = progress.task("reading shards", total=len(source))
    for i, sample in enumerate(source.iter_samples()):
        path = tmp / f"{i:08d}.png"
        sample.image().save(path)
        paths.append(str(path))
        captions.append(sample.caption)
        labels.append(sample.label)
        handle.advance(1)
    return paths, captions, labels


clip_app.command("eval")(evaluate)


def _print_metrics(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", title=title)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


# ----------------------------------------------------------------------------- embed
@clip_app.command()
@global_options(*INFERENCE)
def embed(
    inputs: Annotated[List[str], typer.Argument(help="image files, folders of images, or texts")],
    out: Annotated[Path, typer.Option("--out", "-o", help="index file: FILE.npy (float16) + FILE.jsonl (ids) + FILE.json (model)")],
    model: Model = "auto",
    pretrained: Pretrained = None,
    kind: Annotated[str, typer.Option(help="auto (existing image files/folders are images, the rest texts) | image | text")] = "auto",
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass")] = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing index")] = False,
    opts: Globals = None,
) -> None:
    """Embed images and/or texts into a searchable index (unit-length float16 vectors)."""
    import datetime as _dt

    from studio.engine import Engine
    from studio.errors import UsageError
    from studio.outputs import library_versions
    from studio.pipelines.clip import expand_inputs, index_paths, save_index

    items = expand_inputs(inputs, kind)
    if not overwrite:  # fail before loading the model, not after embedding
        for p in index_paths(out):
            if p.exists():
                raise UsageError(f"{p} exists", "pick another --out, or pass --overwrite to replace it")
    progress = opts.progress()
    with progress:
        engine = Engine(opts.run_options("clip-embed", write=False), progress=progress)
        vectors, result = clip_embeddings(engine, _model_name(model, pretrained), list(inputs), kind, batch_size)
    meta = {"model": result.value["model"], "load": result.value["load"], "normalized": True,
            "device": result.extra["device"]["resolved"],
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "versions": library_versions()}
    npy, jsonl, meta_path = save_index(out, vectors, items, meta, overwrite=overwrite)
    summary = {"vectors": str(npy), "ids": str(jsonl), "meta": str(meta_path), "count": len(items),
               "dim": int(vectors.shape[1]), "images": sum(i.kind == "image" for i in items),
               "texts": sum(i.kind == "text" for i in items)}
    if opts.json:
        typer.echo(json.dumps(summary))
    elif not opts.quiet:
        sys.stderr.write(f"wrote {npy} ({len(items)} x {vectors.shape[1]}) and {jsonl}\n")


# ----------------------------------------------------------------------------- search
@clip_app.command()
@global_options(*INFERENCE)
def search(
    query: Annotated[Optional[str], typer.Argument(help="text to search for")] = None,
    index: Annotated[Path, typer.Option("--index", help="index written by `studio clip embed` (FILE or FILE.npy)")] = Path("index.npy"),
    image: Annotated[Optional[Path], typer.Option("--image", help="search with this image instead of text")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="how many results")] = 5,
    kind: Annotated[Optional[str], typer.Option(help="only rows of this kind: image | text")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model for the query (default: the index's)")] = None,
    opts: Globals = None,
) -> None:
    """Nearest rows of an index to a text query, or to an image with --image (cosine similarity)."""
    from studio.engine import Engine
    from studio.errors import UsageError
    from studio.pipelines.clip import load_index, search_index

    if (query is None) == (image is None):
        raise UsageError("search needs exactly one query: a text, or --image FILE", 'e.g. studio clip search --index emb "a red circle"')
    if k < 1:
        raise UsageError(f"-k {k} must be at least 1", "e.g. -k 5")
    if kind not in (None, "image", "text"):
        raise UsageError(f"unknown --kind {kind!r}", "use image or text")
    idx = load_index(index)
    load = idx.meta.get("load") or {}
    name = model or load.get("model")
    if not name:
        raise UsageError(f"{index} does not say which model built it", "pass --model")
    progress = opts.progress()
    with progress:
        engine = Engine(opts.run_options("clip-embed", write=False), progress=progress)
        vectors, _ = clip_embeddings(engine, _model_name(name, None if model else load.get("pretrained")),
                            [str(image) if image is not None else query], "image" if image is not None else "text", 1)
    hits = search_index(idx, vectors[0], k=k, kind=kind)
    if opts.json:
        for hit in hits:
            typer.echo(json.dumps(hit, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("rank", "score", "kind", "id", title=f"{'image ' + str(image) if image else repr(query)} in {idx.path.name}")
    for hit in hits:
        table.add_row(str(hit["rank"]), f"{hit['score']:.4f}", hit.get("kind", ""), str(hit.get("id", "")))
    Console().print(table)
