"""`studio data shapes`, `studio train starter NAME`, `studio eval image`: the starter models'
data, training and image evaluation (pipelines/training/shapes.py and starter.py do the work)."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from studio.cli.common import Globals, generating, global_options, new_app

data_app = new_app("Generate training data: `studio data shapes` (the synthetic shapes world).")
train_app = new_app("Train models: `studio train starter NAME` reproduces a shipped starter model.")

STARTER_NAMES = "image, control, caption, vqa, clip, midi, code"


@data_app.command("shapes")
@global_options("quiet")
def shapes(
    n: Annotated[int, typer.Option("--n", help="number of samples")] = 1000,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    seed: Annotated[int, typer.Option(help="split seed (0 = the starters' training split, 1 = their held-out split)")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset folder")] = Path("shapes"),
    two_shapes: Annotated[float, typer.Option("--two-shapes", help="share of images with two shapes")] = 0.25,
    opts: Globals = None,
) -> None:
    """Write a deterministic shapes-world dataset: images/ (with a .txt caption beside each),
    masks/, edges/, metadata.jsonl (attributes), vqa.jsonl and pairs.csv (for `studio clip train`)."""
    from studio.errors import UsageError

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", "pass --n 1000")
    if not 16 <= size <= 1024:
        raise UsageError(f"--size {size} is outside 16..1024", "pass --size 64")
    if not 0.0 <= two_shapes <= 1.0:
        raise UsageError(f"--two-shapes {two_shapes} is not a share between 0 and 1", "pass --two-shapes 0.25")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty", "pass a new --out folder")
    from studio.pipelines.training.shapes import write_dataset

    with opts.progress() as progress:
        report = write_dataset(out, n=n, size=size, seed=seed, two_shapes=two_shapes, progress=progress)
    sys.stdout.write(json.dumps(report) + "\n")


@train_app.command("starter")
@global_options("quiet")
def train_starter(
    name: Annotated[str, typer.Argument(help=f"which starter: {STARTER_NAMES}")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="model folder (default ./starter-NAME)", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="steps of the main stage (default: the recipe's)", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint in the work folder")] = False,
    work: Annotated[Optional[Path], typer.Option(help="checkpoints and log (default OUT.train)", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="data and initialisation seed")] = 0,
    smoke: Annotated[bool, typer.Option("--smoke", help="a few steps on a tiny data set (checks the recipe runs)")] = False,
    checkpoint_every: Annotated[float, typer.Option("--checkpoint-every", help="seconds between checkpoints")] = 180.0,
    init: Annotated[Optional[str], typer.Option("--init", help="start from this model's weights (alias or folder): vqa from starter-caption, control from starter-image by default", show_default=False)] = None,
    settings: Annotated[Optional[list[str]], typer.Option("--set", help="a recipe setting KEY=VALUE (a YAML value: --set n_train=12000 --set hard_families=[exists]); repeatable", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Train a starter model from its data and seed (progress, checkpoints, --resume). The
    shipped weights in presets/starter/NAME came from this command; its model card says how long it took."""
    from studio.errors import UsageError

    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}", "pass --steps 100")
    import yaml

    parsed = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not KEY=VALUE", "e.g. --set n_train=12000")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {item!r}: the value is not YAML", "quote text, write lists as [a, b]") from exc
    from studio.pipelines.training.starter import train_starter as train
    out = out or Path(f"starter-{name}")
    with opts.progress() as progress:
        report = train(name, out, steps=steps, resume=resume, smoke=smoke, work=work, seed=seed, progress=progress, init=init,
                       checkpoint_every_s=checkpoint_every, settings=parsed)
    sys.stdout.write(json.dumps(report) + "\n")


def eval_image(
    model: Annotated[str, typer.Option(help="image model: alias, folder or hub id")] = "starter-image",
    n: Annotated[int, typer.Option("--n", help="held-out prompts per phrasing family")] = 100,
    family: Annotated[Optional[list[str]], typer.Option("--family", help="only this phrasing family (repeatable): template, short, paraphrase, colour-only, shape-only, held-out", show_default=False)] = None,
    data_seed: Annotated[int, typer.Option("--data-seed", help="shapes-world split the prompts come from (1 = held out)")] = 1,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps (default: the model card's)", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="guidance scale (default: the model card's)", show_default=False)] = None,
    report_out: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this file", show_default=False)] = None,
    samples: Annotated[bool, typer.Option("--samples", help="include each prompt's verdict in the report")] = False,
    opts: Globals = None,
) -> None:
    """Prompt-following of a text-to-image model on held-out shapes-world prompts phrased as people
    type them, per phrasing family (template, short, paraphrase, colour-only, shape-only, held-out:
    frames never used in training), judged by the deterministic pixel checker: the named colour
    and shape and the background (white when the prompt names none), and separately the named
    position and size, from the shape's pixels. JSON; with --out the images are written too."""
    from studio.engine import Engine
    from studio.errors import UsageError
    from studio.pipeline import load_image

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", "pass --n 100")
    from studio.pipelines.training import shapes as S

    families = tuple(dict.fromkeys(family or S.FAMILIES))
    unknown = [f for f in families if f not in S.FAMILIES]
    if unknown:
        raise UsageError(f"unknown phrasing family {unknown[0]!r}", f"pick from: {', '.join(S.FAMILIES)}")
    prompts = S.eval_prompts(data_seed, n, families)
    engine = Engine(opts.run_options("image", write=opts.out is not None))
    images = []
    base_seed = opts.seed if opts.seed is not None else 0
    for i, p in enumerate(prompts):
        params = {"prompt": p.text, "model": model, "seed": base_seed + i, "steps": steps, "guidance": guidance}
        results = engine.run("image", {k: v for k, v in params.items() if v is not None})
        # a written Result lets its pixels go (the engine streams outputs): read them back
        images.append(results[0].value if results[0].value is not None else load_image(results[0].path))
    report = {"task": "image", "model": model, "data_seed": data_seed, "n_per_family": n,
              "checker": "shapes pixel checker", "size": list(images[0].size) if images else None,
              "bars": {"min_prompt_following": 0.9, "position_accuracy": 0.85, "size_accuracy": 0.85},
              **S.follow_report(images, prompts)}
    if not samples:
        report.pop("samples")
    text = json.dumps(report, indent=2)
    if report_out is not None:
        from studio.outputs import write_text_file

        write_text_file(report_out, text + "\n")
    sys.stdout.write(text + "\n")


@global_options("quiet")
def eval_control(
    model: Annotated[str, typer.Option(help="mask ControlNet: alias or folder")] = "starter-control",
    base: Annotated[str, typer.Option(help="text-to-image model it steers")] = "starter-image",
    n: Annotated[int, typer.Option("--n", help="held-out masks to generate from")] = 50,
    data_seed: Annotated[int, typer.Option("--data-seed", help="shapes-world split the masks come from (1 = held out)")] = 1,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 20,
    guidance: Annotated[float, typer.Option(help="guidance scale")] = 4.0,
    opts: Globals = None,
) -> None:
    """Mask-following of a mask ControlNet on held-out shapes-world masks, as JSON: mean IoU of each
    generated shape (the pixel checker's foreground) with the mask it was given, and prompt-following."""
    from studio.errors import UsageError

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", "pass --n 50")
    from studio.pipelines.control import load_controlnet
    from studio.pipelines.training.starter import _base_pipeline, control_eval
    from studio.device import DeviceManager, DeviceSettings
    import warnings

    from studio.progress import quiet_libraries

    # diffusers' own "Loading pipeline components" bars, its vae/safety-checker notices and its
    # torch_dtype FutureWarning would interleave with studio's status line (and print under
    # --quiet): the report is the output
    with opts.progress().status(f"generating {n} images"), quiet_libraries(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = _base_pipeline(base)
        controlnet, _ = load_controlnet(model, DeviceManager(DeviceSettings()))
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        report = control_eval(pipe, controlnet.float(), n=n, size=size, steps=steps, guidance=guidance, seed=data_seed)
    sys.stdout.write(json.dumps({"task": "control", "model": model, "base": base, "data_seed": data_seed,
                                 "steps": steps, "guidance": guidance, **report}, indent=2) + "\n")


def register(root) -> None:
    from studio.cli.eval import eval_app

    root.add_typer(data_app, name="data")
    root.add_typer(train_app, name="train")
    eval_app.command("image")(generating(eval_image))
    eval_app.command("control")(eval_control)
