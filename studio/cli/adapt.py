"""`studio adapt train|merge|info|export`: thin commands over pipelines/training/adapters.py,
adapters/peft_adapters.py and adapters/lora_convert.py. Nothing heavy is imported here."""

import json
import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import OUTPUT, Globals, global_options, new_app

adapt_app = new_app("Adapters: train LoRA/LoHa/LoKr/IA3 with peft, merge them into a base, show their metadata.")

_ADP = "Adapter"
_DATA = "Data and schedule"
_IMG = "Image (DreamBooth)"


def register(root: typer.Typer) -> None:
    root.add_typer(adapt_app, name="adapt")


@adapt_app.command()
@global_options("device", "precision", *OUTPUT, "offline", "allow_pickle")
def train(
    base: Annotated[str, typer.Option("--base", "-m", help="base model: alias, hub id or folder", show_default=False)],
    data: Annotated[Path, typer.Option(help="image: folder of images (+ .txt captions); caption: folder or JSONL {image, caption}; code: source folder or JSONL {prompt, completion}; midi: MIDI folder", show_default=False)],
    task: Annotated[str, typer.Option(help="image|caption|code|midi", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="adapter folder to write (checkpoints inside)", show_default=False)],
    method: Annotated[str, typer.Option(help="lora|loha|lokr|ia3 (image: lora)", rich_help_panel=_ADP)] = "lora",
    rank: Annotated[int, typer.Option(help="adapter rank r", rich_help_panel=_ADP)] = 8,
    alpha: Annotated[Optional[float], typer.Option(help="scale numerator (alpha/r); default = rank", rich_help_panel=_ADP, show_default=False)] = None,
    targets: Annotated[Optional[List[str]], typer.Option(help="module names to adapt, comma-separated or repeated (default: UNet attention / all linear layers)", rich_help_panel=_ADP, show_default=False)] = None,
    dropout: Annotated[float, typer.Option(help="adapter dropout", rich_help_panel=_ADP)] = 0.0,
    quantize_base: Annotated[Optional[str], typer.Option(help="int8|int4: train on a quantised frozen base (QLoRA; bitsandbytes on CUDA)", rich_help_panel=_ADP, show_default=False)] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="recompute activations: less memory, slower", rich_help_panel=_ADP)] = False,
    steps: Annotated[int, typer.Option(help="optimiser steps in all", rich_help_panel=_DATA)] = 100,
    lr: Annotated[float, typer.Option(help="learning rate", rich_help_panel=_DATA)] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="samples per micro-batch", rich_help_panel=_DATA)] = 1,
    accum: Annotated[int, typer.Option(help="micro-batches per step (gradient accumulation)", rich_help_panel=_DATA)] = 1,
    max_length: Annotated[int, typer.Option(help="tokens per text/MIDI window", rich_help_panel=_DATA)] = 256,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (0: at the end)", rich_help_panel=_DATA)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in --out", rich_help_panel=_DATA)] = False,
    validation_prompt: Annotated[Optional[str], typer.Option(help="image/code: sample this prompt during training", rich_help_panel=_DATA, show_default=False)] = None,
    validation_every: Annotated[int, typer.Option(help="validation sample every N steps (0: at the end)", rich_help_panel=_DATA)] = 0,
    validation_steps: Annotated[int, typer.Option(help="image: denoising steps per validation image", rich_help_panel=_DATA)] = 25,
    instance_prompt: Annotated[Optional[str], typer.Option(help="prompt for images without a .txt sidecar, e.g. 'a photo of sks dog'", rich_help_panel=_IMG, show_default=False)] = None,
    class_prompt: Annotated[Optional[str], typer.Option(help="prior preservation with this class prompt, e.g. 'a photo of a dog'", rich_help_panel=_IMG, show_default=False)] = None,
    class_data: Annotated[Optional[Path], typer.Option(help="folder of class images (made with the base model if too few)", rich_help_panel=_IMG, show_default=False)] = None,
    num_class_images: Annotated[int, typer.Option(help="class images for prior preservation", rich_help_panel=_IMG)] = 8,
    prior_weight: Annotated[float, typer.Option(help="weight of the prior-preservation loss", rich_help_panel=_IMG)] = 1.0,
    train_text_encoder: Annotated[bool, typer.Option("--train-text-encoder", help="also a LoRA on the text encoder", rich_help_panel=_IMG)] = False,
    resolution: Annotated[Optional[int], typer.Option(help="training image size (default: the model's)", rich_help_panel=_IMG, show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="data order, noise and adapter initialisation", rich_help_panel=_DATA)] = 0,
    opts: Globals = None,
) -> None:
    """Train an adapter on a few examples; use it with --lora anywhere.

    [dim]studio adapt train --base sd15 --task image --data dog/ --instance-prompt "a photo of sks dog" -o sks-lora
    studio adapt train --base qwen2.5-coder-0.5b --task code --data myrepo/ --steps 200 -o repo-lora
    studio image "a photo of sks dog on the moon" --lora sks-lora:0.9[/dim]

    --precision is the frozen base's (adapters train in fp32).
    """
    from studio.pipelines.training.adapters import config_from, train as run_train

    config = config_from(base=base, data=str(data), task=task, out=str(out), method=method, rank=rank, alpha=alpha,
                         targets=targets, dropout=dropout, quantize_base=quantize_base,
                         gradient_checkpointing=gradient_checkpointing, steps=steps, lr=lr, batch_size=batch_size,
                         accum=accum, max_length=max_length, save_every=save_every, resume=resume,
                         validation_prompt=validation_prompt, validation_every=validation_every, validation_steps=validation_steps,
                         instance_prompt=instance_prompt, class_prompt=class_prompt,
                         class_data=str(class_data) if class_data else None, num_class_images=num_class_images,
                         prior_weight=prior_weight, train_text_encoder=train_text_encoder, resolution=resolution, seed=seed)
    config.check()  # bad flags fail before torch is imported
    progress = opts.progress()
    with progress:
        report = run_train(config, opts.device_manager(), progress, allow_pickle=opts.allow_pickle, offline=opts.offline or None)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun the first process reports for all
    summary = report.to_dict()
    if opts.json:
        typer.echo(json.dumps(summary))
    elif not opts.quiet:
        typer.echo(f"wrote {summary['out']}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
                   f"parameters, loss {summary['first_loss']:.4g} -> {summary['last_loss']:.4g}, "
                   f"{summary['samples_per_s']:.2f} samples/s", err=True)


@adapt_app.command()
@global_options("json", "offline", "allow_pickle")
def merge(
    base: Annotated[str, typer.Option("--base", "-m", help="base model: alias, hub id or folder", show_default=False)],
    lora: Annotated[List[str], typer.Option("--lora", help="adapter PATH\\[:SCALE], repeatable", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="new folder for the merged model", show_default=False)],
    opts: Globals = None,
) -> None:
    """Merge adapters into the base and write a plain model folder (no peft needed to load it).

    [dim]studio adapt merge --base sd15 --lora sks-lora:0.8 -o sd15-sks
    studio adapt merge --base qwen2.5-coder-0.5b --lora repo-lora -o coder-repo[/dim]
    """
    from studio.adapters.peft_adapters import merge as run_merge

    report = run_merge(base, lora, out, allow_pickle=opts.allow_pickle, offline=opts.offline or None)
    summary = {"out": str(report.out), "kind": report.kind, "adapters": report.adapters}
    if opts.json:
        typer.echo(json.dumps(summary, default=str))
    else:
        typer.echo(f"wrote {report.out} ({report.kind} model, {len(report.adapters)} adapter(s) merged)", err=True)


@adapt_app.command()
@global_options("json")
def info(
    adapter: Annotated[Path, typer.Argument(help="adapter folder or LoRA .safetensors file", show_default=False)],
    opts: Globals = None,
) -> None:
    """Show an adapter's method, rank, targets, base model and training settings."""
    from studio.adapters.peft_adapters import format_info, read_metadata

    meta = read_metadata(adapter)
    typer.echo(json.dumps(meta, default=str) if opts.json else format_info(meta))


@adapt_app.command()
@global_options("json", "allow_pickle")
def export(
    lora: Annotated[Path, typer.Argument(help="LoRA .safetensors file, or the folder `studio adapt train` wrote", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", "-f", help="kohya (A1111, Forge, ComfyUI, LoRA sites) or diffusers", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="kohya: new .safetensors file; diffusers: new folder (default: NAME-FORMAT here)", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Write a LoRA in another file layout: kohya's (one .safetensors with lora_unet_/lora_te_ keys
    and alphas) or diffusers' (a folder with pytorch_lora_weights.safetensors). Same weights, same
    images; `--lora` loads both.

    [dim]studio adapt export sks-lora --format kohya -o sks.safetensors
    studio adapt export civitai-style.safetensors --format diffusers -o style-diffusers[/dim]
    """
    from studio.adapters.lora_convert import export as run_export

    report = run_export(lora, fmt, out, allow_pickle=opts.allow_pickle)
    summary = {"out": str(report.out), "format": report.format, "from": report.source_format,
               "tensors": report.tensors, "rank": report.rank, "alpha": report.alpha}
    if opts.json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"wrote {report.out} ({report.format} layout from {report.source_format}: {report.tensors} tensors, "
                   f"rank {report.rank}, alpha {report.alpha})", err=True)
