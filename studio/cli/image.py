"""`studio image PROMPT ...` (text-to-image, img2img, inpaint, outpaint, ControlNet, LoRA, prompt
weighting, attention maps) and `studio control preprocess TYPE IMAGE`.

Thin: options become an ImageRequest's fields and the engine does the rest. Nothing heavy is
imported here (studio.pipelines.image and studio.pipelines.control import torch/diffusers only inside functions).
"""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import OUTPUT, Globals, generating, global_options, new_app, run_command
from studio.errors import UsageError

control_app = new_app("ControlNet helpers: make control maps from images.")

_GEN = "Generation"
_IMG = "Init image, inpaint and outpaint"
_CTL = "ControlNet"
_ADP = "Adapters and prompt"
_HIRES = "Hires fix"
_LOOK = "FreeU and tiling"
_XY = "X/Y plot"
_IPA = "IP-Adapter and T2I-Adapter"
_REF = "SDXL refiner"
_REG = "Regional prompts"


def register(root: typer.Typer) -> None:
    root.command("image", no_args_is_help=True)(image)
    root.add_typer(control_app, name="control")


def _seeds(text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        seeds = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma-separated list of whole numbers", "e.g. --seeds 1,2,3")
    if not seeds:
        raise UsageError("--seeds is empty", "e.g. --seeds 1,2,3")
    return seeds


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value.expanduser().resolve()) if value is not None else None


def _control_text(text: str) -> str:
    """Make the IMAGE part of TYPE:IMAGE[:...] absolute, so the recorded request replays anywhere."""
    kind, sep, rest = text.partition(":")
    if not sep:
        return text
    parts = rest.split(":")
    n = 3 if len(parts) >= 4 and all(_num(p) for p in parts[-3:]) else 1 if len(parts) >= 2 and _num(parts[-1]) else 0
    image = ":".join(parts[: len(parts) - n])
    if image and Path(image).expanduser().exists():
        image = str(Path(image).expanduser().resolve())
    return ":".join([kind, image, *parts[len(parts) - n:]])


def _num(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def list_schedulers() -> None:
    """Plain columns (not a rich table): pipe-friendly and never truncated. Either the studio name
    or the A1111 label works with --scheduler ("DPM++ 2M Karras"; "DPM++ 2M" alone is Karras, as
    in A1111)."""
    from studio.pipelines.image import SCHEDULERS, scheduler_family, scheduler_labels

    rows = [("name", "A1111 sampler", "schedule type", "diffusers class", "settings", "fits")]
    for name, (cls, overrides, _) in SCHEDULERS.items():
        label, schedule = scheduler_labels(name)
        settings = ",".join(f"{k}={v}" for k, v in overrides.items() if v is not False) or "-"
        fits = "SD3/Flux (flow matching)" if scheduler_family(cls) == "flow" else "SD 1.x/2.x, SDXL"
        rows.append((name, label, schedule, cls, settings, fits))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5])


def recipe_from_png(path: Path) -> tuple[dict, list[str]]:
    """Image request fields from any PNG's own chunks (studio, A1111/Forge, ComfyUI) and notes on
    what did not carry over. A studio PNG gives its whole request, model included."""
    from studio.infotext import png_recipe
    from studio.pipelines.image import params_from_infotext

    if not path.is_file():
        raise UsageError(f"--from {path} does not exist" if not path.exists() else f"--from {path} is not a file",
                         "pass a PNG written by studio, A1111, Forge or ComfyUI")
    recipe = png_recipe(path)
    if recipe["source"] == "studio":
        meta = recipe["meta"]
        if meta.get("task") != "image":
            raise UsageError(f"{path.name} is a studio {meta.get('task')} output, not an image",
                             f"`studio replay {path.name}` runs it again")
        params = dict(meta.get("params") or {})
        params.update(seeds=None, num_outputs=None)  # this image's own seed, one image
        model = meta.get("model") or {}
        params["model"] = model.get("alias") or model.get("source") or params.get("model")
        return params, []
    params, notes = params_from_infotext(recipe)
    model = recipe["fields"].get("Model")
    if model:
        made_with = f"{model} (hash {recipe['fields']['Model hash']})" if recipe["fields"].get("Model hash") else model
        notes.insert(0, f"{path.name} was made with {made_with}, which the PNG does not hold: pass --model to use the same weights")
    return params, notes


@generating
def image(
    prompt: Annotated[Optional[str], typer.Argument(help="what to draw; (word:1.3) / \\[word] emphasis as in A1111", show_default=False)] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", "-n", help="negative prompt", rich_help_panel=_GEN)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="alias, hub id\\[@rev], diffusers folder or .safetensors file", rich_help_panel=_GEN)] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps", rich_help_panel=_GEN)] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "--cfg", help="guidance scale (0 for turbo models)", rich_help_panel=_GEN)] = None,
    width: Annotated[Optional[int], typer.Option(help="width in pixels (a multiple of 8; 16 for SD3/Flux)", rich_help_panel=_GEN)] = None,
    height: Annotated[Optional[int], typer.Option(help="height in pixels", rich_help_panel=_GEN)] = None,
    seeds: Annotated[Optional[str], typer.Option(help="one image per seed, e.g. 1,2,3", rich_help_panel=_GEN)] = None,
    num: Annotated[Optional[int], typer.Option("--num", help="images to make: seeds S, S+1, ... from --seed", rich_help_panel=_GEN)] = None,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", "--sampler", help="sampler: studio name or A1111 label, e.g. dpm++_2m_karras or \"DPM++ 2M Karras\" (see --list-schedulers)", rich_help_panel=_GEN)] = None,
    list_schedulers_: Annotated[bool, typer.Option("--list-schedulers", help="list the sampler names (and A1111 labels) and exit", rich_help_panel=_GEN)] = False,
    from_png: Annotated[Optional[Path], typer.Option("--from", help="take prompt and settings from a PNG (studio, A1111, Forge, ComfyUI); flags override", rich_help_panel=_GEN, show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="init image for img2img / inpaint / outpaint, or a folder of them (one output each)", rich_help_panel=_IMG)] = None,
    strength: Annotated[Optional[float], typer.Option(help="how much of --init to repaint, 0-1 (0.75; inpaint 1.0)", rich_help_panel=_IMG)] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="inpaint mask: white = repaint (a folder: one per --init image, same names)", rich_help_panel=_IMG)] = None,
    outpaint: Annotated[Optional[str], typer.Option(help="pad --init and paint the border: left:128,right:64,top:0,bottom:0 or all:64", rich_help_panel=_IMG)] = None,
    control: Annotated[Optional[List[str]], typer.Option("--control", help="TYPE:IMAGE\\[:SCALE\\[:START:END]], repeatable (canny, none, depth, pose, ...)", rich_help_panel=_CTL)] = None,
    control_model: Annotated[Optional[List[str]], typer.Option("--control-model", help="ControlNet per --control, same order (auto = the card for TYPE)", rich_help_panel=_CTL)] = None,
    lora: Annotated[Optional[List[str]], typer.Option("--lora", help="LoRA PATH_OR_ID\\[:SCALE], repeatable", rich_help_panel=_ADP)] = None,
    fuse_lora: Annotated[bool, typer.Option("--fuse-lora", help="merge the LoRAs into the weights (faster steps)", rich_help_panel=_ADP)] = False,
    no_weighting: Annotated[bool, typer.Option("--no-weighting", help="pass the prompt verbatim (no (word:1.3) parsing)", rich_help_panel=_ADP)] = False,
    attention_maps: Annotated[bool, typer.Option("--attention-maps", help="also write a heatmap per prompt word and a contact sheet", rich_help_panel=_ADP)] = False,
    embedding: Annotated[Optional[List[str]], typer.Option("--embedding", help="textual inversion FILE_OR_ID\\[:TOKEN], repeatable (A1111 .safetensors; .pt needs --allow-pickle); the token defaults to the file's name", rich_help_panel=_ADP, show_default=False)] = None,
    clip_skip: Annotated[Optional[int], typer.Option("--clip-skip", help="A1111's Clip skip: 2 = the text encoder's penultimate layer", rich_help_panel=_ADP, show_default=False)] = None,
    mask_blur: Annotated[Optional[int], typer.Option("--mask-blur", help="blur the inpaint mask by PX pixels (A1111's Mask blur, e.g. 4)", rich_help_panel=_IMG, show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="--init FOLDER: skip inputs --out's manifest already has an output for (same prompt)", rich_help_panel=_IMG)] = False,
    hires: Annotated[Optional[str], typer.Option("--hires", metavar="SCALE[:STRENGTH[:STEPS]]", help="hires fix: generate, upscale by SCALE, repaint at the new size (strength 0.7, the same steps unless given)", rich_help_panel=_HIRES, show_default=False)] = None,
    hires_upscaler: Annotated[Optional[str], typer.Option("--hires-upscaler", help="lanczos (default), bicubic, nearest, latent, latent-nearest, ..., or an upscaler model (see studio upscale)", rich_help_panel=_HIRES, show_default=False)] = None,
    freeu: Annotated[bool, typer.Option("--freeu", help="FreeU with the model family's values (SD 1.5, 2.1, XL)", rich_help_panel=_LOOK)] = False,
    freeu_params: Annotated[Optional[str], typer.Option("--freeu-params", metavar="S1,S2,B1,B2", help="FreeU with these values (implies --freeu)", rich_help_panel=_LOOK, show_default=False)] = None,
    tile: Annotated[bool, typer.Option("--tile", help="seamless: the image tiles without a seam (circular padding, A1111's Tiling)", rich_help_panel=_LOOK)] = False,
    tile_axis: Annotated[Optional[str], typer.Option("--tile-axis", metavar="x|y", help="seamless along one axis only (x: left-right wraps, e.g. a panorama)", rich_help_panel=_LOOK, show_default=False)] = None,
    ip_adapter: Annotated[Optional[str], typer.Option("--ip-adapter", metavar="IMAGE[:SCALE]", help="a reference image that steers like a prompt (IP-Adapter; scale 0-1, default 1)", rich_help_panel=_IPA, show_default=False)] = None,
    ip_adapter_model: Annotated[Optional[str], typer.Option("--ip-adapter-model", help="the IP-Adapter: a card, or a folder with ip-adapter*.safetensors and image_encoder/ (default: the card for the model's family)", rich_help_panel=_IPA, show_default=False)] = None,
    t2i_adapter: Annotated[Optional[List[str]], typer.Option("--t2i-adapter", metavar="TYPE:IMAGE[:SCALE]", help="T2I-Adapter control map, repeatable (types as --control: canny, none, depth, ...)", rich_help_panel=_IPA, show_default=False)] = None,
    t2i_adapter_model: Annotated[Optional[List[str]], typer.Option("--t2i-adapter-model", help="T2I-Adapter per --t2i-adapter, same order (auto = the card for TYPE)", rich_help_panel=_IPA, show_default=False)] = None,
    refiner: Annotated[Optional[str], typer.Option("--refiner", metavar="MODEL[:SWITCH]", help="SDXL refiner: the base stops at SWITCH (0.8) of the steps, the refiner finishes", rich_help_panel=_REF, show_default=False)] = None,
    region: Annotated[Optional[List[str]], typer.Option("--region", metavar="PROMPT@BOX_OR_MASK", help="paint a region from its own prompt, repeatable; BOX is x0,y0,x1,y1 in pixels or fractions (0,0,0.5,1 = left half), or a mask image (white = the region); the main prompt paints the rest", rich_help_panel=_REG, show_default=False)] = None,
    xy: Annotated[Optional[List[str]], typer.Option("--xy", metavar="NAME=V1,V2,...", help="X/Y plot axis, once or twice: every combination plus a labelled contact sheet; NAME is any setting (steps, cfg, sampler, seed, clip-skip, lora, prompt_sr, ...); ranges 1-5, 1-9 (+2), 0.5-1.5 \\[3]", rich_help_panel=_XY, show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Generate images from a prompt: text-to-image, img2img (--init, also a folder), inpaint
    (--mask), outpaint, ControlNet (--control), LoRA (--lora), embeddings, hires fix (--hires),
    X/Y plots (--xy), IP-Adapter, T2I-Adapter, the SDXL refiner, regional prompts (--region).
    Every image carries its settings (PNG parameters, JSON sidecar) and
    `studio replay IMAGE.png` makes it again."""
    if list_schedulers_:
        list_schedulers()
        return
    if prompt is None and from_png is None:
        raise UsageError("missing PROMPT", 'e.g. studio image "a lighthouse at dusk" (or --from IMAGE.png, --list-schedulers)')
    params = {
        "prompt": prompt, "negative_prompt": negative, "model": model, "steps": steps, "guidance": guidance,
        "width": width, "height": height, "seeds": _seeds(seeds), "num_outputs": num, "scheduler": scheduler,
        "init_image": _path(init), "strength": strength, "mask_image": _path(mask), "outpaint": outpaint,
        "controls": tuple(_control_text(c) for c in control) if control else None,
        "control_models": tuple(control_model) if control_model else None,
        "adapters": tuple(lora) if lora else None,
        "fuse_adapters": True if fuse_lora else None,
        "weighting": False if no_weighting else None,
        "attention_maps": True if attention_maps else None,
        "embeddings": tuple(_absolute_head(e) for e in embedding) if embedding else None,
        "clip_skip": clip_skip, "mask_blur": mask_blur, "hires": hires, "hires_upscaler": hires_upscaler,
        "freeu": freeu_params if freeu_params else (True if freeu else None),
        "tile": tile_axis if tile_axis else (True if tile else None),
        "xy": tuple(xy) if xy else None,
        "ip_adapter": _absolute_head(ip_adapter) if ip_adapter else None,
        "ip_adapter_model": ip_adapter_model,
        "t2i_adapters": tuple(_control_text(t) for t in t2i_adapter) if t2i_adapter else None,
        "t2i_adapter_models": tuple(t2i_adapter_model) if t2i_adapter_model else None,
        "refiner": refiner,
        "regions": tuple(_region_text(r) for r in region) if region else None,
    }
    if from_png is not None:
        recipe, notes = recipe_from_png(from_png.expanduser())
        if opts.seed is not None or params["seeds"] is not None:
            recipe.pop("seed", None)  # --seed / --seeds given: the PNG's seed gives way
        if params["init_image"] is None and recipe.get("init_image") is None and recipe.get("strength") is not None:
            notes.append(f"denoising strength {recipe.pop('strength'):g} is for img2img: pass --init IMAGE (and --strength) to use it")
        if params["mask_image"] is None and recipe.get("mask_image") is None:
            recipe.pop("mask_blur", None)  # the note from the infotext says how to use it
        if params["model"] is not None:
            notes = [n for n in notes if "pass --model" not in n]
        if params["adapters"] is not None:
            notes = [n for n in notes if "pass --lora" not in n]
        from rich.markup import escape

        progress = opts.progress()
        for text in notes:
            progress.note(escape(text))  # A1111 model names carry [hash] brackets, not markup
        params = {**recipe, **{k: v for k, v in params.items() if v is not None}}
    if params.get("init_image") and Path(params["init_image"]).is_dir():
        run_folder(params, opts, resume)
        return
    if resume:
        raise UsageError("--resume applies to --init FOLDER runs", "batch files resume with `studio run FILE --resume`")
    run_command("image", params, opts)


def _absolute_head(text: str) -> str:
    """The path part of FILE[:TOKEN] (--embedding) or IMAGE[:SCALE] (--ip-adapter) made absolute,
    so the recorded request replays from any folder."""
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser().resolve())
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).expanduser().exists():
        return f"{Path(head).expanduser().resolve()}:{tail}"
    return text


def _region_text(text: str) -> str:
    """A region's mask path made absolute (a box stays as typed)."""
    prompt, sep, where = text.rpartition("@")
    if sep and where.strip() and Path(where.strip()).expanduser().is_file():
        return f"{prompt}@{Path(where.strip()).expanduser().resolve()}"
    return text


def run_folder(params: dict, opts: Globals, resume: bool) -> None:
    """--init FOLDER (and --mask FOLDER): one run per input, in name order, on one loaded model;
    every input shares one seed (drawn once when none is given). With --resume, the seeds --out's
    manifest already holds an existing output for (same input, mask and prompt) are skipped, and
    the interrupted run's seed is reused when none is given."""
    import os
    import secrets

    from studio.cli.common import default_out_dir
    from studio.outputs import read_manifest
    from studio.pipeline import seeds_for
    from studio.pipelines.image_features import folder_inputs

    pairs = folder_inputs(params["init_image"], params.get("mask_image"))
    out = Path(opts.out or default_out_dir("image"))
    done: dict[tuple, set] = {}
    if resume and (out / "manifest.jsonl").exists():
        inputs = {(init, mask) for init, mask in pairs}
        for row in read_manifest(out):
            p = row.get("params") if isinstance(row.get("params"), dict) else {}
            key = (p.get("init_image"), p.get("mask_image"))
            if (row.get("task") == "image" and key in inputs and p.get("prompt") == params.get("prompt")
                    and isinstance(row.get("file"), str) and os.path.isfile(out / row["file"])):
                done.setdefault(key, set()).add(row.get("seed"))
    seed = params["seed"] if params.get("seed") is not None else opts.seed
    if seed is None and done:
        seed = min(min(s for s in seeds if isinstance(s, int)) for seeds in done.values())
    if seed is None:
        seed = secrets.randbelow(2**31)
    wanted = seeds_for(int(seed), int(params.get("num_outputs") or 1), params.get("seeds"))
    skipped = 0
    for init, mask in pairs:
        remaining = [s for s in wanted if s not in done.get((init, mask), set())]
        if not remaining:
            skipped += 1
            continue
        one = {**params, "init_image": init, "mask_image": mask, "seed": remaining[0], "num_outputs": None,
               "seeds": tuple(remaining) if len(remaining) > 1 else None}
        run_command("image", one, opts)
    if skipped and not (opts.quiet or opts.json):
        opts.progress().note(f"--resume: skipped {skipped} of {len(pairs)} inputs already in {out}")


@control_app.command("preprocess")
@global_options("out", *OUTPUT, "allow_pickle")
def preprocess(
    kind: Annotated[str, typer.Argument(metavar="TYPE", help="canny, none, shuffle, depth, pose, lineart, softedge, scribble, mlsd, normal")],
    image: Annotated[Path, typer.Argument(help="the input image")],
    low: Annotated[int, typer.Option(help="canny: lower threshold")] = 100,
    high: Annotated[int, typer.Option(help="canny: upper threshold")] = 200,
    width: Annotated[Optional[int], typer.Option(help="resize the map to this width")] = None,
    height: Annotated[Optional[int], typer.Option(help="resize the map to this height")] = None,
    opts: Globals = None,
) -> None:
    """Write the control map a --control TYPE:IMAGE would use (to check it, or to pass it later as none:MAP).
    Some controlnet-aux detectors ship only pickle weights: they need --allow-pickle."""
    import json
    import sys

    from studio.pipelines.control import canonical_type
    from studio.pipelines.control import preprocess as run_preprocessor
    from studio.cli.common import default_out_dir
    from studio.outputs import OutputWriter, Result
    from studio.pipeline import load_image

    kind = canonical_type(kind)
    source = load_image(image, what="image")
    if width or height:
        w, h = source.size
        size = (width or round(w * height / h), height or round(h * width / w))
        source = source.resize(size)
    cmap = run_preprocessor(kind, source, low=low, high=high, allow_pickle=opts.allow_pickle)
    params = {"type": kind, "input": str(image.expanduser().resolve()), "low": low, "high": high,
              "width": cmap.size[0], "height": cmap.size[1]}
    writer = OutputWriter(opts.out or default_out_dir("control"), task="control", template="{date}-{task}-{slug}")
    result = Result(kind="image", value=cmap, params={**params, "name": f"{kind}-{image.stem}"})
    path = writer.write(result)
    if opts.json:
        sys.stdout.write(json.dumps({"task": "control", "type": kind, "path": str(path)}) + "\n")
    elif not opts.quiet:
        sys.stderr.write(f"wrote {path}\n")
