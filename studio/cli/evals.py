"""`studio eval vqa`, `studio eval video`, `studio eval audio`: quality numbers as JSON for the
modalities that had no eval command. VQA runs through the Engine (RunOptions(write=False)) on
held-out shapes-world images and questions phrased the ways people ask (phrasing.py); video and
audio measure files (pipelines/media_metrics.py). Nothing heavy is imported at module level."""

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import Globals, generating, global_options


def register(root) -> None:
    from studio.cli.eval import eval_app

    eval_app.command("vqa")(generating(eval_vqa))
    eval_app.command("clip-shapes")(eval_clip_shapes)
    eval_app.command("video")(eval_video)
    eval_app.command("audio")(eval_audio)


def _emit(report: dict, report_out: Optional[Path]) -> None:
    text = json.dumps(report, indent=2)
    if report_out is not None:
        from studio.outputs import write_text_file

        write_text_file(report_out, text + "\n")
    sys.stdout.write(text + "\n")


# ----------------------------------------------------------------------------- vqa
def eval_vqa(
    model: Annotated[str, typer.Option("--model", "-m", help="VQA model: alias, folder or hub id")] = "starter-vqa",
    n: Annotated[int, typer.Option("--n", help="held-out shapes-world images to ask about")] = 200,
    data_seed: Annotated[int, typer.Option("--data-seed", help="shapes-world split the images come from (1 = held out)")] = 1,
    families: Annotated[Optional[str], typer.Option(help="comma-separated phrasing families to ask (default: all, and `template`)", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per forward pass")] = 32,
    report_out: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this file", show_default=False)] = None,
    samples: Annotated[bool, typer.Option("--samples", help="include every question, answer and prediction in the report")] = False,
    opts: Globals = None,
) -> None:
    """VQA accuracy per phrasing family on held-out shapes-world images, as JSON.

    The questions use phrasings no training question used ("which shape is shown?", "is there
    any circle", capitals, no question mark, filler words); the report gives accuracy per family
    (colour, shape, count, exists, size, position, background, binding), their minimum, and
    shapes.py's own template questions beside them.
    """
    import tempfile

    from studio.engine import Engine
    from studio.errors import UsageError
    from studio.pipelines.training import phrasing as P
    from studio.pipelines.training import shapes as S

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", "pass --n 200")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}", "pass --batch-size 32")
    known = (*P.VQA_FAMILIES, "template")
    wanted = [f.strip() for f in families.split(",") if f.strip()] if families else list(known)
    unknown = [f for f in wanted if f not in known]
    if unknown or not wanted:
        raise UsageError(f"unknown phrasing family {unknown[0] if unknown else families!r}", f"pick from: {', '.join(known)}")

    items = list(S.samples(data_seed, n))
    asked: dict[str, list[tuple[int, P.Question]]] = {}  # question text -> (image, question): one run per text
    for i, s in enumerate(items):
        questions = P.vqa_questions(s, heldout=True, families=[f for f in wanted if f != "template"])
        if "template" in wanted:
            questions += P.canonical_questions(s)
        for q in questions:
            asked.setdefault(q.question, []).append((i, q))
    progress = opts.progress()
    from studio.progress import Progress

    # the engine's own bars would show one "answering" bar per question text: one bar here instead
    engine = Engine(opts.run_options("vqa", write=False), progress=Progress(enabled=False))
    rows = []
    with tempfile.TemporaryDirectory(prefix="studio-eval-vqa-") as tmp, progress:
        paths = []
        for s in items:  # drawn at 64 px, as `studio data shapes` writes them
            path = Path(tmp) / f"{s.index:06d}.png"
            S.render(s, 64)[0].save(path)
            paths.append(str(path))
        handle = progress.task("asking", total=sum(len(v) for v in asked.values()))
        for text, pairs in asked.items():
            results = engine.run("vqa", {"images": [paths[i] for i, _ in pairs], "questions": [text], "model": model,
                                         "batch_size": batch_size})
            for (i, q), r in zip(pairs, results):
                rows.append({"image": i, "family": q.family, "question": q.question, "answer": q.answer,
                             "predicted": r.value if isinstance(r.value, str) else ""})
            handle.advance(len(pairs))
    report = {"task": "vqa", "model": model, "data_seed": data_seed, "images": n, **P.vqa_report(rows)}
    if samples:
        report["samples"] = rows
    _emit(report, report_out)


# ----------------------------------------------------------------------------- CLIP zero-shot per template
@global_options("device", "quiet", "offline", "allow_pickle")
def eval_clip_shapes(
    model: Annotated[str, typer.Option("--model", "-m", help="CLIP model: alias, folder, hub id, ARCH@TAG")] = "starter-clip",
    n: Annotated[int, typer.Option("--n", help="held-out single-shape images")] = 300,
    data_seed: Annotated[int, typer.Option("--data-seed", help="shapes-world split the images come from (1 = held out)")] = 1,
    templates: Annotated[str, typer.Option(help="heldout (templates no training caption used) | openai (80) | simple (7) | FILE with {} per line")] = "heldout",
    report_out: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this file", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """CLIP zero-shot top-1 per prompt template on held-out shapes-world images, as JSON.

    18 classes (colour x shape); each template alone ("a photo of a {}." with "red circle") gives
    one accuracy, their minimum beside them, and the shapes-world caption ensemble for reference.
    `studio clip eval` measures any labelled data set with templates ensembled.
    """
    from studio.errors import UsageError
    from studio.pipelines.clip import load_clip, load_templates
    from studio.pipelines.training import phrasing as P
    from studio.pipelines.training import shapes as S
    from studio.pipelines.training.starter import clip_zero_shot

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", "pass --n 300")
    chosen = P.CLIP_HELDOUT if templates == "heldout" else tuple(load_templates(templates))
    progress = opts.progress()
    with progress, progress.status(f"zero-shot over {n} images"):
        net, preprocess, tokenizer = load_clip(model, opts.device_manager(), allow_pickle=opts.allow_pickle)
        items = list(S.samples(data_seed, n, two_shapes=0.0))
        metrics = clip_zero_shot(net, preprocess, tokenizer, items, 64, templates=chosen)
    metrics["shapes_caption_ensemble_top1"] = round(metrics.pop("zero_shot_top1"), 4)
    _emit({"task": "clip-zero-shot", "model": model, "data_seed": data_seed, "templates_from": templates, **metrics},
          report_out)


# ----------------------------------------------------------------------------- video
@global_options("device", "quiet", "offline", "allow_pickle")
def eval_video(
    inputs: Annotated[List[Path], typer.Argument(help="video files (mp4, gif, webp), folders of them, or folders of frames", show_default=False)],
    clip_model: Annotated[Optional[str], typer.Option("--clip-model", help="open_clip model for CLIP consistency and CLIP score: alias (starter-clip), folder, hub id, ARCH@TAG", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(help="text each frame is scored against (default: the prompt in the file's studio sidecar)", show_default=False)] = None,
    report_out: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this file", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Measure videos without extra weights, as JSON.

    Frames, fps, duration, size and frame-to-frame difference; with --clip-model also CLIP frame
    consistency and each frame's CLIP score against the prompt (--prompt, or the one recorded in
    the file's studio sidecar).
    """
    from studio.errors import UsageError
    from studio.pipelines.media_metrics import VIDEO_SUFFIXES, expand_media, video_report

    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty", "pass the text the video should show, or leave --prompt out")
    if prompt is not None and clip_model is None:
        raise UsageError("--prompt needs a CLIP model to score frames against it", "add --clip-model starter-clip")
    paths = expand_media(inputs, VIDEO_SUFFIXES, frames_folders=True)
    clip = None
    progress = opts.progress()
    with progress:
        if clip_model is not None:
            from studio.pipelines.clip import load_clip

            with progress.status(f"loading {clip_model}"):
                net, preprocess, tokenizer = load_clip(clip_model, opts.device_manager(), allow_pickle=opts.allow_pickle)
                clip = (net, preprocess, tokenizer)
        handle = progress.task("measuring", total=len(paths))
        videos = []
        for path in paths:
            videos.append(video_report(path, clip=clip, prompt=prompt))
            handle.advance()
    _emit({"task": "video", "clip_model": clip_model, "videos": videos}, report_out)


# ----------------------------------------------------------------------------- audio
@global_options("quiet")
def eval_audio(
    inputs: Annotated[List[Path], typer.Argument(help="audio files (wav, flac, ogg) or folders of them", show_default=False)],
    silence_db: Annotated[float, typer.Option("--silence-db", help="windows quieter than this (dBFS) count as silence")] = -60.0,
    window: Annotated[float, typer.Option("--window", help="window length in seconds for silence and level range")] = 0.05,
    report_out: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this file", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Measure audio files without extra weights, as JSON.

    Duration, sample rate, channels, RMS and peak level (dBFS), crest factor, clipped samples,
    silence (share, leading, trailing, longest gap) and level range.
    """
    from studio.errors import UsageError
    from studio.pipelines.media_metrics import AUDIO_SUFFIXES, audio_report, expand_media

    if not -200.0 < silence_db < 0.0:
        raise UsageError(f"--silence-db {silence_db} is not a level below full scale", "pass e.g. --silence-db -60")
    if not 0.001 <= window <= 10.0:
        raise UsageError(f"--window {window} is outside 0.001..10 seconds", "pass e.g. --window 0.05")
    paths = expand_media(inputs, AUDIO_SUFFIXES)
    _emit({"task": "audio", "files": [audio_report(p, silence_db=silence_db, window_s=window) for p in paths]}, report_out)
