"""`studio models list|info|pull|path|make-tiny`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from studio.cli.common import Globals, global_options, new_app

models_app = new_app("Model aliases, the local cache, and tiny test models.")


def register(root: typer.Typer) -> None:
    root.add_typer(models_app, name="models")


@models_app.command("list")
@global_options("json")
def list_models(
    task: Annotated[Optional[str], typer.Option(help="only models for this task")] = None,
    opts: Globals = None,
) -> None:
    """List model aliases (shipped cards and $STUDIO_HOME/models) and whether their weights are here."""
    import json

    from studio.models import _card_source, is_available, load_cards, resolve

    rows = []
    for name, card in sorted(load_cards().items()):
        if task and card.get("task") != task:
            continue
        kind, source = _card_source(card)
        try:
            available = is_available(resolve(name, offline=True))
        except Exception:
            available = False
        rows.append({"name": name, "task": card.get("task"), "source": source if kind == "hub" else f"(local) {source}",
                     "local": available, "description": card.get("description", "")})
    if opts.json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "task", "source", "here", "description")
    for r in rows:
        table.add_row(r["name"], r["task"] or "", r["source"], "yes" if r["local"] else "no", r["description"])
    Console().print(table)


@models_app.command("info")
@global_options("offline")
def info(name: Annotated[str, typer.Argument(help="alias, hub id or path")], opts: Globals = None) -> None:
    """Show what a model name resolves to."""
    import json

    from studio.models import is_available, resolve

    spec = resolve(name)
    out = {"name": spec.name, "kind": spec.kind, "source": spec.source, "revision": spec.revision,
           "task": spec.task, "local": is_available(spec)}
    if spec.card:
        out["card"] = {k: v for k, v in spec.card.items() if not k.startswith("_")}
    typer.echo(json.dumps(out, indent=2, default=str))


@models_app.command("path")
@global_options("offline")
def path(name: Annotated[str, typer.Argument(help="alias, hub id or path")], opts: Globals = None) -> None:
    """Print the local folder of a model (offline: its cached snapshot)."""
    from studio.models import cached_snapshot, resolve

    spec = resolve(name)
    typer.echo(spec.source if spec.is_local else str(cached_snapshot(spec)))


@models_app.command("pull")
@global_options("allow_pickle")
def pull(
    name: Annotated[str, typer.Argument(help="alias or hub id[@revision]")],
    opts: Globals = None,
) -> None:
    """Download a model's configs and safetensors weights into the HF cache."""
    from studio.models import pull as do_pull
    from studio.models import resolve

    spec = resolve(name, allow_pickle=opts.allow_pickle, offline=False)
    typer.echo(str(do_pull(spec)))


@models_app.command("make-tiny")
@global_options()
def make_tiny(
    kind: Annotated[str, typer.Argument(help="sd, sdxl, controlnet, lora, blip-caption, blip-vqa, vlm, git, clip, midi-lm, musicgen, musicgen-melody, animatediff, t2v, svd, ltx, wan, code-lm")],
    out: Annotated[Path, typer.Argument(help="new folder to write the model into")],
    seed: Annotated[int, typer.Option(help="seed for the random weights")] = 0,
    opts: Globals = None,
) -> None:
    """Build a tiny random model of a real architecture (for offline smoke tests) and save it."""
    from studio.pipelines.tiny import make_tiny as build

    typer.echo(str(build(kind, out, seed=seed)))
