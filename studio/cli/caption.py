"""`studio caption`, `studio vqa` and `studio eval caption`.

Captions are text, so these commands print them (a table on a terminal; txt, JSONL or CSV for
scripts) or write them to --out FILE, and `--sidecar` writes photo.txt beside photo.jpg, the
caption files LoRA trainers read. The pipeline (pipelines/caption.py) runs through the Engine
with RunOptions(write=False): it returns Results and these commands format them. Nothing heavy
is imported at module level.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from studio.cli.common import Globals, generating

FORMATS = ("table", "txt", "jsonl", "csv")
_P = "Captioning"
_I = "Interrogation (CLIP tags)"
_O = "Output"


def register(root: typer.Typer) -> None:
    from studio.cli.eval import eval_app

    root.command("caption")(caption)
    root.command("vqa")(vqa)
    eval_app.command("caption")(eval_caption)


# --------------------------------------------------------------------------- helpers
def expand_images(inputs: list[Path], recursive: bool = False) -> list[str]:
    """Files as given; folders walked for image files (recursively with -r), sorted, hidden skipped."""
    from studio.errors import InputFileError, UsageError
    from studio.pipeline import IMAGE_SUFFIXES

    found: list[str] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputFileError(f"{raw} does not exist", "check the path")
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.glob("*")
            images = sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not images:
                deeper = "" if recursive else " (pass -r to look in subfolders)"
                raise UsageError(f"folder {raw} holds no images{deeper}",
                                 f"images are files ending in {', '.join(IMAGE_SUFFIXES)}")
            found.extend(str(p) for p in images)
        else:
            found.append(str(path))
    return list(dict.fromkeys(found))


def pick_format(fmt: Optional[str], out: Optional[Path], as_json: bool) -> str:
    from studio.errors import UsageError

    if fmt is None:
        if as_json:
            return "jsonl"
        if out is not None:
            return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(out.suffix.lower(), "txt")
        return "table" if sys.stdout.isatty() else "txt"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", f"use one of {'|'.join(FORMATS)}")
    if fmt == "table" and out is not None:
        raise UsageError("--format table is for the terminal", "use --format txt, jsonl or csv with --out")
    return fmt


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str], text_key: str, keys: list[str]) -> str:
    """rows as txt (just the text for one row, else KEY<TAB>...<TAB>text), JSONL or CSV."""
    import csv
    import io

    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if len(rows) == 1:
        return rows[0][text_key] + "\n"
    return "".join("\t".join(str(row[k]) for k in keys) + "\t" + row[text_key] + "\n" for row in rows)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=False)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


def emit(rows: list[dict[str, Any]], fmt: str, out: Optional[Path], overwrite: bool, *, columns: list[str],
         table_columns: list[str], text_key: str, keys: list[str], quiet: bool) -> None:
    from studio.outputs import write_text_file

    if fmt == "table":
        print_table(rows, table_columns)
        return
    text = render(rows, fmt, columns, text_key, keys)
    if out is not None:
        write_text_file(out, text, overwrite=overwrite)
        if not quiet:
            sys.stderr.write(f"wrote {out}\n")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def run_task(task: str, params: dict[str, Any], opts: Globals) -> list[Any]:
    """The Engine without writing: the Results come back to be formatted here."""
    from studio.cli.common import engine_for

    return engine_for(opts, opts.run_options(task, write=False)).run(task, params)


def report_failures(results: list[Any], total: int, what: str, quiet: bool) -> None:
    """Name each unreadable file on stderr; exit 1 if any (the others were still done)."""
    from studio.errors import RuntimeFailure

    failed = [r for r in results if r.extra.get("error")]
    for r in failed:
        sys.stderr.write(f"skipped {r.extra['image']}: {r.extra['error']}\n")
    if failed:
        paths = {r.extra["image"] for r in failed}
        raise RuntimeFailure(f"{len(paths)} of {total} {what} could not be read; the others were done",
                             "fix or remove the files named above and run again")


def model_name(result: Any) -> str:
    model = result.extra.get("model") or {}
    return model.get("alias") or model.get("name") or ""


def given(**values: Any) -> dict[str, Any]:
    """Only what was given: the model card's defaults fill the rest (Engine merge order)."""
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------- caption
@generating
def caption(
    inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders of images", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="alias, hub id or folder (default: the caption default, blip-base)", rich_help_panel=_P)] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="peft adapter PATH\\[:SCALE] from `studio adapt train --task caption` (repeatable)", rich_help_panel=_P, show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="BLIP/GIT: text the caption starts with; chat VLMs: the instruction; Florence-2: a task token", rich_help_panel=_P)] = None,
    question: Annotated[Optional[list[str]], typer.Option("--question", help="ask this of every image instead of captioning (repeatable)", rich_help_panel=_P, show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="most new tokens per caption (default: 30)", rich_help_panel=_P, show_default=False)] = None,
    beams: Annotated[Optional[int], typer.Option(help="beam search width, 1 = greedy (default: model card's, else 1)", rich_help_panel=_P, show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="images per forward pass (default: 8)", rich_help_panel=_P, show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="walk folders recursively", rich_help_panel=_P)] = False,
    interrogate: Annotated[bool, typer.Option("--interrogate", help="append the tags CLIP ranks best (a prompt for text-to-image)", rich_help_panel=_I)] = False,
    tags: Annotated[Optional[str], typer.Option(help="tag vocabulary: a file (one tag a line) or a built-in list: mediums, styles, lighting, colours, subjects (default: all)", rich_help_panel=_I, show_default=False)] = None,
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="open_clip model for --interrogate: alias, hf-hub:ID / ID, folder, or ARCH@TAG", rich_help_panel=_I, show_default=False)] = None,
    top_tags: Annotated[Optional[int], typer.Option("--top-tags", help="tags appended by --interrogate (default: 6)", rich_help_panel=_I, show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="table|txt|jsonl|csv (default: table on a terminal, else txt; from --out's suffix)", rich_help_panel=_O, show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the captions to this file instead of stdout", rich_help_panel=_O, show_default=False)] = None,
    sidecar: Annotated[bool, typer.Option("--sidecar", help="write photo.txt beside each photo.jpg (for LoRA training sets)", rich_help_panel=_O)] = False,
    sidecar_ext: Annotated[str, typer.Option("--sidecar-ext", help="sidecar suffix (kohya also reads .caption)", rich_help_panel=_O)] = "txt",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing sidecars / --out file", rich_help_panel=_O)] = False,
    opts: Globals = None,
) -> None:
    """Caption images (a file, many, or folders), or ask them --question; print or write the text.

    Examples: [cyan]studio caption photo.jpg[/] | [cyan]studio caption shots/ -r --sidecar[/] |
    [cyan]studio caption photo.jpg --interrogate[/] | [cyan]studio caption shots/ --question "is it night?" -f jsonl[/]
    """
    from studio.errors import UsageError

    fmt = pick_format(format, out, opts.json)
    images = expand_images(inputs, recursive)
    if question:
        clash = [flag for flag, on in (("--prompt", prompt), ("--interrogate", interrogate), ("--sidecar", sidecar),
                                       ("--tags", tags), ("--clip-model", clip_model), ("--top-tags", top_tags)) if on]
        if clash:
            raise UsageError(f"--question answers questions; {clash[0]} is for captions",
                             f"drop {clash[0]}, or drop --question to caption")
        return _answer(images, list(question), model, max_tokens, beams, batch_size, fmt, out, overwrite, opts, lora)

    ext = "." + sidecar_ext.lstrip(".")
    if sidecar:
        seen: dict[Path, str] = {}
        for p in images:
            other = seen.setdefault(Path(p).with_suffix(ext), p)
            if other != p:  # photo.jpg and photo.png would both claim photo.txt
                raise UsageError(f"{other} and {p} would share the caption file {Path(p).with_suffix(ext)}",
                                 "rename one of them, or caption them without --sidecar")
    if sidecar and not overwrite:
        # never replace a caption someone wrote; skipping them also makes a rerun resume a folder
        have = [p for p in images if Path(p).with_suffix(ext).exists()]
        if have:
            if not opts.quiet:
                sys.stderr.write(f"note: skipping {len(have)} image(s) that already have a {ext} caption "
                                 "(--overwrite to redo them)\n")
            images = [p for p in images if p not in set(have)]
            if not images:
                return
    params = given(images=images, model=model, prompt=prompt, max_tokens=max_tokens, beams=beams,
                   batch_size=batch_size, interrogate=interrogate or None, tags=tags, clip_model=clip_model,
                   top_tags=top_tags, adapters=tuple(lora) if lora else None)
    results = run_task("caption", params, opts)

    done = [r for r in results if not r.extra.get("error")]
    rows = []
    for r in done:
        row = {"path": r.extra["image"], "caption": r.value, "model": model_name(r), "seconds": r.extra["seconds"]}
        if "tags" in r.extra:
            row["tags"] = r.extra["tags"]
        rows.append(row)
    if sidecar:
        from studio.outputs import write_text_file

        for row in rows:
            write_text_file(Path(row["path"]).with_suffix(ext), row["caption"] + "\n", overwrite=overwrite)
        if not opts.quiet:
            sys.stderr.write(f"wrote {len(rows)} {ext} caption file(s)\n")
    if rows:
        emit(rows, fmt, out, overwrite, columns=["path", "caption", "model", "seconds"],
             table_columns=["path", "caption"], text_key="caption", keys=["path"], quiet=opts.quiet)
    report_failures(results, len(images), "images", opts.quiet)


# --------------------------------------------------------------------------- vqa
def _answer(images: list[str], questions: list[str], model: Optional[str], max_tokens: Optional[int],
            beams: Optional[int], batch_size: Optional[int], fmt: str, out: Optional[Path], overwrite: bool,
            opts: Globals, lora: Optional[list[str]] = None) -> None:
    params = given(images=images, questions=questions, model=model, max_tokens=max_tokens, beams=beams,
                   batch_size=batch_size, adapters=tuple(lora) if lora else None)
    results = run_task("vqa", params, opts)
    rows = [{"path": r.extra["image"], "question": r.extra["question"], "answer": r.value, "model": model_name(r),
             "seconds": r.extra["seconds"]} for r in results if not r.extra.get("error")]
    if rows:
        emit(rows, fmt, out, overwrite, columns=["path", "question", "answer", "model", "seconds"],
             table_columns=["path", "question", "answer"], text_key="answer", keys=["path", "question"],
             quiet=opts.quiet)
    report_failures(results, len(images), "images", opts.quiet)


@generating
def vqa(
    image: Annotated[Path, typer.Argument(help="an image file (use `caption DIR --question Q` for folders)", show_default=False)],
    questions: Annotated[list[str], typer.Argument(help="one or more questions", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="alias, hub id or folder (default: the vqa default, blip-vqa)")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="peft adapter PATH\\[:SCALE] from `studio adapt train --task caption` (repeatable)", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="most new tokens per answer (default: 20)", show_default=False)] = None,
    beams: Annotated[Optional[int], typer.Option(help="beam search width, 1 = greedy", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="pairs per forward pass (default: 8)", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="table|txt|jsonl|csv (default: table on a terminal, else txt)", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the answers to this file instead of stdout", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out file")] = False,
    opts: Globals = None,
) -> None:
    """Ask questions about an image: one answer per question.

    Example: [cyan]studio vqa photo.jpg "what colour is the car?" "how many people are there?"[/]
    """
    fmt = pick_format(format, out, opts.json)
    _answer(expand_images([image]), list(questions), model, max_tokens, beams, batch_size, fmt, out, overwrite, opts, lora)


# --------------------------------------------------------------------------- eval caption
@generating
def eval_caption(
    data: Annotated[Path, typer.Option("--data", help="folder of images with reference captions beside them (photo.txt; one reference a line)", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="caption model to score (default: the caption default)")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="as for `studio caption`")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="most new tokens per caption", show_default=False)] = None,
    beams: Annotated[Optional[int], typer.Option(help="beam search width", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="images per forward pass", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="walk --data recursively")] = False,
    ext: Annotated[str, typer.Option("--ext", help="reference caption suffix")] = "txt",
    limit: Annotated[Optional[int], typer.Option(help="score only the first N images", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="also write the JSON report to this file", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out file")] = False,
    opts: Globals = None,
) -> None:
    """Caption a folder whose images have reference captions and report BLEU-4, CIDEr and exact match as JSON.

    BLEU and CIDEr are pycocoevalcap's scorers (COCO caption evaluation) on lowercased words.
    """
    from studio.errors import UsageError

    suffix = "." + ext.lstrip(".")
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder", "pass a folder of images with .txt captions beside them")
    images = expand_images([data], recursive)
    references: dict[str, list[str]] = {}
    for path in images:
        ref = Path(path).with_suffix(suffix)
        if ref.is_file():
            lines = [line.strip() for line in ref.read_text(encoding="utf-8", errors="replace").splitlines()]
            if any(lines):
                references[path] = [line for line in lines if line]
    if not references:
        raise UsageError(f"no image in {data} has a {suffix} reference caption beside it",
                         f"write photo{suffix} next to photo.jpg (one reference caption a line)")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be at least 1, got {limit}", "pass --limit 100")
        references = dict(list(references.items())[:limit])

    params = given(images=list(references), model=model, prompt=prompt, max_tokens=max_tokens, beams=beams,
                   batch_size=batch_size)
    results = run_task("caption", params, opts)

    from studio.pipelines.caption import caption_scores

    predictions = {r.extra["image"]: r.value for r in results if not r.extra.get("error")}
    failed = [r.extra["image"] for r in results if r.extra.get("error")]
    report = {"task": "caption", "model": model_name(results[0]) if results else model, "data": str(data),
              **caption_scores(references, predictions),
              "without_reference": len(images) - len(references), "unreadable": len(failed),
              "seconds_per_image": round(sum(r.extra.get("seconds", 0.0) for r in results) / max(1, len(predictions)), 4)}
    text = json.dumps(report, indent=2)
    if out is not None:
        from studio.outputs import write_text_file

        write_text_file(out, text + "\n", overwrite=overwrite)
    sys.stdout.write(text + "\n")
    for path in failed:
        sys.stderr.write(f"skipped {path}: not a readable image\n")
