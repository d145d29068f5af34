"""`studio replay FILE`: run the request stored in an output's metadata again."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from studio.cli.common import Globals, emitter, engine_for, generating


def register(root: typer.Typer) -> None:
    root.command("replay")(replay)


@generating
def replay(
    file: Annotated[Path, typer.Argument(help="an output written by studio (PNG, WAV, MID, MP4... or its .json sidecar)")],
    opts: Globals = None,
) -> None:
    """Re-run the request stored in FILE's metadata (same model, seed and device settings)."""
    from studio.outputs import read_metadata

    meta = read_metadata(file)
    task = meta["task"]
    params: dict[str, Any] = dict(meta.get("params") or {})
    model = meta.get("model") or {}
    if model.get("alias") or model.get("source"):
        params["model"] = model.get("alias") or model.get("source")
    requested = ((meta.get("device") or {}).get("requested")) or {}
    flags = {k: v for k, v in opts.device_flags().items() if v is not None}
    # the recorded device settings, unless overridden on this command line
    device = {**requested, **flags}
    options = opts.run_options(task)
    options.device = device
    options.out_dir = opts.out or Path(file).resolve().parent
    engine_for(opts, options, emit=emitter(opts)).run(task, params)
