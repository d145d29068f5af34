"""`studio replay FILE`: run the request stored in an output's metadata again: a studio output's
sidecar or its own tags, or the recipe in an A1111/Forge/ComfyUI PNG."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from studio.cli.common import Globals, emitter, engine_for, generating


def register(root: typer.Typer) -> None:
    root.command("replay")(replay)


@generating
def replay(
    file: Annotated[Path, typer.Argument(help="an output written by studio (PNG, WAV, MID, MP4... or its .json sidecar), or an A1111/Forge/ComfyUI PNG")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="these weights instead of the recorded model (A1111/ComfyUI PNGs name theirs but do not hold them)", show_default=False)] = None,
    unsafe_exec: Annotated[bool, typer.Option("--unsafe-exec", help="run generated code without the sandbox again, as the recorded run did (never taken from the file itself)")] = False,
    opts: Globals = None,
) -> None:
    """Re-run the request stored in FILE's metadata (same model, seed and device settings). One
    output of a --num N run is made again alone, with its own seed."""
    from studio.errors import UsageError
    from studio.outputs import read_metadata

    try:
        meta = read_metadata(file)
    except UsageError:
        if Path(file).suffix.lower() != ".png":
            raise
        meta = _foreign_png(file, opts)
    task = meta["task"]
    params: dict[str, Any] = dict(meta.get("params") or {})
    # one output of a --num N run is made again alone: its own seed (recorded per output), one output
    if params.get("num_outputs"):
        params["num_outputs"] = 1
    if params.get("seeds"):
        params["seeds"] = None
    # running generated code outside the sandbox is the command line's choice, never a file's: a
    # crafted sidecar saying unsafe_exec must not turn the sandbox off (studio code's own rule)
    if "unsafe_exec" in params:
        if params["unsafe_exec"] and not unsafe_exec:
            opts.progress().note("the recorded run used --unsafe-exec; this replay runs the tests in the sandbox "
                                 "(pass --unsafe-exec to replay it unisolated)")
        params["unsafe_exec"] = unsafe_exec
    recorded = meta.get("model") or {}
    if model:
        params["model"] = model
    elif recorded.get("alias") or recorded.get("source"):
        params["model"] = recorded.get("alias") or recorded.get("source")
    requested = ((meta.get("device") or {}).get("requested")) or {}
    flags = {k: v for k, v in opts.device_flags().items() if v is not None}
    # the recorded device settings, unless overridden on this command line
    device = {**requested, **flags}
    options = opts.run_options(task)
    options.device = device
    options.out_dir = opts.out or Path(file).resolve().parent
    engine_for(opts, options, emit=emitter(opts)).run(task, params)


def _foreign_png(file: Path, opts: Globals) -> dict[str, Any]:
    """A PNG another tool made (A1111, Forge, ComfyUI): its recipe as an image request, with notes
    on what it does not carry (the model, LoRA and ControlNet files)."""
    from studio.cli.image import recipe_from_png

    params, notes = recipe_from_png(Path(file))
    from rich.markup import escape

    progress = opts.progress()
    for text in notes:  # A1111 model names carry [hash] brackets, not markup
        progress.note(escape(text.replace("pass --model", "replay --model M (or studio image --from FILE --model M)")))
    return {"task": "image", "params": {k: v for k, v in params.items() if k != "strength"} | (
        {"strength": params["strength"]} if params.get("init_image") else {})}
