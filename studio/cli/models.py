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


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@models_app.command("pull")
@global_options("allow_pickle", "trust_remote_code", "device", "precision", "json")
def pull(
    name: Annotated[str, typer.Argument(help="alias or hub id[@revision]")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the files and their total size; download nothing")] = False,
    variant: Annotated[str, typer.Option(help="weights variant of a diffusers model: auto (fp16 when the device "
                                              "runs fp16/bf16 on a GPU, else none), fp16 or none")] = "auto",
    opts: Globals = None,
) -> None:
    """Download what the model's pipeline loads into the HF cache: one weight set, configs and
    tokenizers; a diffusers pipeline through diffusers' own download (its fp16 variant on GPUs)."""
    import json

    from studio.errors import ModelNotAvailable, StudioError, UsageError
    from studio.models import hub_endpoint, hub_reachable, is_offline, plan_pull, pull_variant, resolve
    from studio.models import pull as do_pull

    if variant not in ("auto", "fp16", "none"):
        raise UsageError(f"unknown --variant {variant!r}", "use auto, fp16 or none")
    spec = resolve(name, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code,
                   offline=False, check_hub=False)
    if spec.is_local:
        typer.echo(spec.source)
        return
    if is_offline():
        raise ModelNotAvailable("studio is offline (HF_HUB_OFFLINE is set)", "unset HF_HUB_OFFLINE to download")
    if not hub_reachable():
        raise ModelNotAvailable(f"the hub ({hub_endpoint()}) cannot be reached, so {spec.alias or spec.source} cannot be pulled",
                                "check the network (or HF_ENDPOINT / HTTPS_PROXY) and try again")
    if variant == "auto":
        from studio.device import DeviceSettings, get_device_manager

        chosen = pull_variant(get_device_manager(DeviceSettings.from_sources(flags=opts.device_flags())))
    else:
        chosen = None if variant == "none" else variant
    try:
        plan = plan_pull(spec, chosen)
    except StudioError:
        raise
    except Exception as exc:  # unknown repo, gated, network dropped mid-way
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotAvailable(f"could not list the files of {spec.source}: {text}",
                                "check the id (`studio models info`) and your network") from exc
    summary = {"source": spec.source, "revision": spec.revision or "main", "layout": plan.layout, "variant": plan.variant,
               "files": [{"path": p, "size": s} for p, s in plan.files], "total_bytes": plan.total,
               "left_out": {"files": len(plan.left), "bytes": sum(s or 0 for _, s in plan.left)}}
    if not dry_run:
        summary["path"] = str(do_pull(spec, plan))
    if opts.json:
        typer.echo(json.dumps(summary))
        return
    head = (f"{spec.alias or spec.source}: {len(plan.files)} files, {_size(plan.total)} ({plan.layout}"
            + (f", variant {plan.variant}" if plan.variant else "") + ")")
    left = f"not fetched: {len(plan.left)} files, {_size(summary['left_out']['bytes'])} (other variants and formats, single-file checkpoints)"
    if dry_run:
        typer.echo(head)
        width = max((len(p) for p, _ in plan.files), default=0)
        for p, s in plan.files:
            typer.echo(f"  {p:<{width}}  {_size(s):>9}")
        if plan.left:
            typer.echo(left)
        return
    typer.echo(head + (f"; {left}" if plan.left else ""), err=True)
    typer.echo(summary["path"])


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
