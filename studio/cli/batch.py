"""`studio run FILE`, `studio validate FILE`, `studio presets list|show`.

Thin: parsing, validation and running live in studio/batch/ and studio/presets.py (also the
Python API). Nothing heavy is imported here; the runner imports torch only when a job runs.
"""

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from studio.cli.common import DEVICE, OUTPUT, TRUST, Globals, global_options, new_app

presets_app = new_app("Presets: saved defaults for one task (built-in, and yours in $STUDIO_HOME/presets).")


def register(root: typer.Typer) -> None:
    root.command("run")(run)
    root.command("validate")(validate)
    root.add_typer(presets_app, name="presets")


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")


@global_options("out", *DEVICE, *OUTPUT, "offline", *TRUST)
def run(
    file: Annotated[Path, typer.Argument(help="batch or pipeline file (YAML with jobs: and/or steps:)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the plan; run nothing")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="skip jobs whose outputs are complete; redo the rest")] = False,
    processes: Annotated[int, typer.Option("--processes", min=1, help="split jobs over N processes (accelerate launch)")] = 1,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="auto|local|ADDRESS",
        help="run the jobs on a Ray cluster: auto (the one `ray start` began here), local (a new one on "
             "this machine) or the head's address (HOST:6379, ray://HOST:10001); needs Ray: pip install 'studio\\[ray]'")] = None,
    shared_out: Annotated[bool, typer.Option(
        "--shared-out", help="with --ray: workers write into --out themselves (a folder every node mounts at the same path)")] = False,
    unsafe_exec: Annotated[bool, typer.Option(
        "--unsafe-exec", help="let the file's jobs set unsafe_exec: true (code tests run WITHOUT isolation where no sandbox can be had)")] = False,
    opts: Globals = None,
) -> None:
    """Run a batch file or a multi-step pipeline file. Exit code: how many jobs failed (0 = all done).
    With --json: one JSON object per output, then a summary."""
    from studio.batch import Runner
    from studio.batch.launch import launch
    from studio.engine import print_json
    from studio.errors import UsageError

    if shared_out and not ray:
        raise UsageError("--shared-out is for --ray runs (workers on other nodes writing into --out)",
                         "add --ray auto|local|ADDRESS, or drop --shared-out")
    if ray and processes > 1:
        raise UsageError("--ray and --processes both split the jobs", "pick one: --ray for a cluster, --processes N for this machine")

    out, quiet, json_out, debug, offline = opts.out, opts.quiet, opts.json, opts.debug, opts.offline
    allow_pickle, trust_remote_code = opts.allow_pickle, opts.trust_remote_code
    flags = opts.device_flags()
    runner = Runner(file, out_dir=out, resume=resume, device=flags, quiet=quiet, json=json_out, offline=offline,
                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, unsafe_exec=unsafe_exec,
                    emit=print_json if json_out else None)
    for warning in runner.file.warnings:
        _stderr(f"warning: {warning}")
    if dry_run:
        _print_plan(runner, processes, json_out)
        return

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and world == 1:
        argv = [f"--out={runner.out_dir}"] + (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
        argv += (["--json"] if json_out else []) + (["--debug"] if debug else []) + (["--offline"] if offline else [])
        argv += (["--allow-pickle"] if allow_pickle else []) + (["--trust-remote-code"] if trust_remote_code else [])
        argv += ["--unsafe-exec"] if unsafe_exec else []
        for key, value in flags.items():
            if value is not None:
                argv.append(f"--{key}" if value is True else f"--no-{key}" if value is False else f"--{key}={value}")
        summary = launch(file, processes, argv, cpu=_cpu_only(opts.device, processes))
        _finish(summary, quiet, json_out)
        return

    if ray:
        from studio.batch.ray import run_on_ray

        report = run_on_ray(runner, ray, shared_out=shared_out, debug=debug)
        _finish(report.summary(), quiet, json_out)
        return

    report = runner.run()
    summary = report.summary()
    if world > 1:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return  # the main process reports for everyone (it gathered every outcome)
        if os.environ.get("STUDIO_RUN_SUMMARY"):  # started by --processes: the parent reports
            Path(os.environ["STUDIO_RUN_SUMMARY"]).write_text(json.dumps(summary))
            return
    _finish(summary, quiet, json_out)


def _cpu_only(device: Optional[str], processes: int) -> bool:
    """Whether the workers run on the CPU; one GPU per worker otherwise (checked here, before
    accelerate starts N workers that would fail one by one)."""
    if device == "cpu":
        return True
    import torch

    if not torch.cuda.is_available():
        return True
    if torch.cuda.device_count() < processes:
        from studio.errors import UsageError

        raise UsageError(f"--processes {processes} puts one worker on each GPU, and this machine has "
                         f"{torch.cuda.device_count()}", f"use --processes {torch.cuda.device_count()}, or --device cpu")
    return False


def _finish(summary: dict[str, Any], quiet: bool, json_out: bool) -> None:
    from studio.engine import print_json

    failed = summary["failed"] + summary["blocked"]
    if json_out:
        print_json({"summary": summary})
    elif not quiet or failed:
        parts = [f"{summary['done']} done"]
        if summary["skipped"]:
            parts.append(f"{summary['skipped']} skipped (already done)")
        if summary["failed"]:
            parts.append(f"{summary['failed']} failed")
        if summary["blocked"]:
            parts.append(f"{summary['blocked']} blocked by a failed step")
        _stderr(f"{summary['jobs']} jobs: {', '.join(parts)} in {summary['seconds']:.1f}s -> {summary['out']}")
    if failed:
        raise typer.Exit(min(failed, 100))


def _describe(job: Any) -> str:
    params = job.params
    if params.get("prompt") is not None:
        text = str(params["prompt"])
    else:
        shown = [f"{k}={v}" for k, v in params.items() if k not in ("model", "seed") and isinstance(v, (str, int, float))]
        text = ", ".join(shown)
    return text if len(text) <= 60 else text[:57] + "..."


def _print_plan(runner: Any, processes: int, json_out: bool) -> None:
    items = runner.plan(processes=processes)
    if json_out:
        from studio.engine import print_json

        for n, item in enumerate(items, 1):
            job = item.job
            print_json({"order": n, "job": job.name, "task": job.task, "model": job.model, "preset": job.preset,
                        "seed": job.params.get("seed"), "after": job.needs, "status": item.status,
                        "process": item.process, "params": _plain(job.params), "device": _plain(job.device)})
        return
    from rich.console import Console
    from rich.table import Table

    f = runner.file
    title = f"{f.name}: {len(items)} jobs -> {runner.out_dir}" + (" (resume)" if runner.resume else "")
    table = Table(title=title, title_justify="left")
    for column in ("#", "job", "task", "model", "prompt / inputs", "seed", "after", "status") + (("process",) if processes > 1 else ()):
        table.add_column(column, overflow="fold")
    for n, item in enumerate(items, 1):
        job = item.job
        model = job.model or "-"  # a task that loads no model (mux)
        row = [str(n), job.name, job.task, model + (f" [{job.preset}]" if job.preset else ""), _describe(job),
               str(job.params.get("seed", "")), ", ".join(job.needs), item.status]
        if processes > 1:
            row.append(str(item.process))
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold cells at 80 columns
        console = Console(width=200)
    console.print(table)


def _plain(value: Any) -> Any:
    from studio.outputs import _jsonable

    return _jsonable(value)


@global_options("json")
def validate(
    file: Annotated[Path, typer.Argument(help="a batch / pipeline file, or a preset file")],
    unsafe_exec: Annotated[bool, typer.Option(
        "--unsafe-exec", help="accept jobs that set unsafe_exec: true, as `studio run --unsafe-exec` does")] = False,
    opts: Globals = None,
) -> None:
    """Check a batch, pipeline or preset file without running anything (exit 2 on the first problem)."""
    from studio import presets
    from studio.batch import BatchFile, is_batch_data, parse
    from studio.batch.parse import read

    doc = read(file)
    if is_batch_data(doc.data):
        batch = (parse(doc, unsafe_exec=unsafe_exec) if isinstance(doc.data, dict)
                 else BatchFile.from_dict(doc.data, source=str(file), unsafe_exec=unsafe_exec))
        steps = [j for j in batch.jobs if j.is_step]
        info = {"ok": True, "file": str(file), "kind": "batch", "jobs": len(batch.jobs) - len(steps), "steps": len(steps),
                "tasks": sorted({j.task for j in batch.jobs}), "warnings": batch.warnings}
        counts = [f"{n} {what}" for n, what in ((info["jobs"], "jobs"), (info["steps"], "steps")) if n]
        line = f"ok: {file}: {', '.join(counts)} ({', '.join(info['tasks'])})"
    else:
        preset = presets.read_preset(file)
        info = {"ok": True, "file": str(file), "kind": "preset", "task": preset.task, "warnings": []}
        line = f"ok: {file}: preset for {preset.task}"
    if opts.json:
        typer.echo(json.dumps(info))
        return
    for warning in info["warnings"]:
        _stderr(f"warning: {warning}")
    typer.echo(line)


@presets_app.command("list")
@global_options("json")
def list_presets(
    task: Annotated[Optional[str], typer.Option(help="only presets for this task")] = None,
    opts: Globals = None,
) -> None:
    """List presets: built-in ones and yours ($STUDIO_HOME/presets), yours winning on a name clash."""
    from studio import presets, yamlfile
    from studio.errors import UsageError
    from studio.paths import PACKAGE_PRESETS

    rows = []
    for name, path in presets.list_presets().items():
        try:  # bounded like every YAML studio reads: one bad file must not stall the list
            data = yamlfile.read_yaml(path).data or {}
        except UsageError:
            data = {"description": "(not a valid preset: `studio presets show` says where)"}
        if not isinstance(data, dict):
            data = {}
        if task and data.get("task") != task:
            continue
        builtin = path.parent.resolve() == PACKAGE_PRESETS.resolve()
        rows.append({"name": name, "task": data.get("task"), "model": data.get("model"),
                     "description": data.get("description") or "", "source": "built-in" if builtin else "user",
                     "path": str(path)})
    if opts.json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "task", "model", "from", "description")
    for r in rows:
        table.add_row(r["name"], r["task"] or "", str(r["model"] or ""), r["source"], r["description"])
    Console().print(table)


@presets_app.command("show")
@global_options("json")
def show_preset(
    name: Annotated[str, typer.Argument(help="preset name (or a path to a preset file)")],
    opts: Globals = None,
) -> None:
    """Print a preset (validated first: a bad key is reported with its file and line)."""
    from studio import presets

    preset = presets.read_preset(name)
    if opts.json:
        typer.echo(json.dumps({"name": preset.name, "path": str(preset.path), "task": preset.task,
                               "description": preset.description, "params": _plain(preset.params),
                               "device": preset.device}))
        return
    typer.echo(f"# {preset.path}")
    typer.echo(preset.path.read_text(encoding="utf-8").rstrip("\n"))
