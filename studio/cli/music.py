"""`studio music midi|audio|render|train` and `studio eval music`.

Thin commands: options become requests for the "music-midi" / "music-audio" / "music-render"
tasks (pipelines/music_symbolic.py, pipelines/music_audio.py, pipelines/music_render.py), a
MidiTrainConfig (pipelines/training/midi_train.py), or calls into pipelines/music_metrics.py, all
imported inside the functions so `studio --help` stays fast.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import OUTPUT, Globals, engine_for, generating, global_options, new_app, run_command

music_app = new_app("Music: MIDI from a transformer over REMI tokens, audio from MusicGen, rendering, training.")

_C = "Musical controls"
_S = "Sampling"


def register(root: typer.Typer) -> None:
    root.add_typer(music_app, name="music")
    from studio.cli.eval import eval_app

    eval_app.command("music", help="Pitch-class histogram (+KL to a reference), scale consistency, note density, "
                                   "polyphony, pitch range, chord-tone ratio per bar, as JSON.")(eval_music)


# ----------------------------------------------------------------------------- midi
@music_app.command()
@generating
def midi(
    model: Annotated[str, typer.Option("--model", "-m", help="MIDI model: alias, hub id or folder (a causal LM + miditok tokenizer.json)")] = "auto",
    bars: Annotated[Optional[int], typer.Option(help="bars to generate (default 8; after the primer when continuing)", rich_help_panel=_C)] = None,
    seconds: Annotated[Optional[float], typer.Option(help="length in seconds instead of bars (tempo defaults to 120)", rich_help_panel=_C)] = None,
    tempo: Annotated[Optional[float], typer.Option(help="BPM, written into the MIDI (default: the model's choice)", rich_help_panel=_C)] = None,
    key: Annotated[Optional[str], typer.Option(help="keep pitches in a scale: C:major, A:minor, F#:dorian, Bb ...", rich_help_panel=_C)] = None,
    time_signature: Annotated[Optional[str], typer.Option(help="4/4, 3/4, 6/8 ... written into the MIDI", rich_help_panel=_C)] = None,
    chords: Annotated[Optional[str], typer.Option(help='one chord per bar, cycling: "C G Am F" (chord tones dominate each bar)', rich_help_panel=_C)] = None,
    program: Annotated[Optional[int], typer.Option(help="General MIDI program 0-127 for every note", rich_help_panel=_C)] = None,
    instrument: Annotated[Optional[str], typer.Option(help="General MIDI instrument name instead of --program (violin, flute, drums ...)", rich_help_panel=_C)] = None,
    primer: Annotated[Optional[Path], typer.Option(help="a MIDI file to continue", rich_help_panel=_C)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="sampling temperature (default 1.0)", rich_help_panel=_S)] = None,
    top_k: Annotated[Optional[int], typer.Option(help="sample among the k likeliest tokens (0/unset: all)", rich_help_panel=_S)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass (unset: off)", rich_help_panel=_S)] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="how many pieces (seeds seed, seed+1, ...)")] = None,
    render: Annotated[Optional[bool], typer.Option("--render/--no-render", help="also write NAME.render.wav (fluidsynth, or plain synthesis)", show_default=False)] = None,
    soundfont: Annotated[Optional[Path], typer.Option(help=".sf2 soundfont for --render (default: pretty_midi's General MIDI font)")] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="peft adapter PATH\\[:SCALE] from `studio adapt train --task midi` (repeatable)", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Generate MIDI with a transformer over REMI tokens; every control is enforced while decoding."""
    params = {"model": model if model != "auto" else None, "bars": bars, "seconds": seconds, "tempo": tempo, "key": key,
              "time_signature": time_signature, "chords": chords, "program": program, "instrument": instrument,
              "primer": str(primer) if primer else None, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "num_outputs": num, "render": render, "soundfont": str(soundfont) if soundfont else None,
              "adapters": tuple(lora) if lora else None}
    run_command("music-midi", params, opts)


# ----------------------------------------------------------------------------- audio
@music_app.command()
@generating
def audio(
    prompt: Annotated[str, typer.Argument(help="what the music sounds like")],
    model: Annotated[str, typer.Option("--model", "-m", help="MusicGen model: musicgen-small (default), musicgen-medium, musicgen-melody, a hub id or folder")] = "auto",
    duration: Annotated[Optional[float], typer.Option(help="seconds of audio (default 10; longer than the model's window continues in windows)")] = None,
    melody: Annotated[Optional[Path], typer.Option(help="WAV/FLAC whose melody conditions the music (musicgen-melody models)")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (default 3; 1 turns it off)", rich_help_panel=_S)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="sampling temperature (default 1.0)", rich_help_panel=_S)] = None,
    top_k: Annotated[Optional[int], typer.Option(help="sample among the k likeliest codes (default 250)", rich_help_panel=_S)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass (unset: off)", rich_help_panel=_S)] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="how many clips (seeds seed, seed+1, ...)")] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="wav | flac")] = None,
    window: Annotated[Optional[float], typer.Option(help="seconds generated at once (default: the model's window, 30 s)")] = None,
    extend_stride: Annotated[Optional[float], typer.Option(help="seconds each further window adds (default 60% of the window, 18 s)")] = None,
    opts: Globals = None,
) -> None:
    """Generate audio with MusicGen from a text prompt (and a melody, with musicgen-melody)."""
    params = {"prompt": prompt, "model": model if model != "auto" else None, "duration": duration,
              "melody": str(melody) if melody else None, "guidance": guidance, "temperature": temperature,
              "top_k": top_k, "top_p": top_p, "num_outputs": num, "format": format, "window": window,
              "extend_stride": extend_stride}
    run_command("music-audio", params, opts)


# ----------------------------------------------------------------------------- render
@music_app.command("render")
@global_options(*OUTPUT)
def render_cmd(
    file: Annotated[Path, typer.Argument(help="the MIDI file to render")],
    soundfont: Annotated[Optional[Path], typer.Option(help=".sf2 soundfont (default: pretty_midi's General MIDI font; needs fluidsynth)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="output FILE.wav or FILE.flac (default: beside the MIDI, NAME.render.wav); never overwritten")] = None,
    rate: Annotated[int, typer.Option(help="sample rate")] = 44100,
    plain: Annotated[bool, typer.Option("--plain", help="use pretty_midi's plain synthesiser even when fluidsynth is here")] = False,
    opts: Globals = None,
) -> None:
    """Render a MIDI file to audio: fluidsynth with a General MIDI soundfont, or plain synthesis."""
    from studio.errors import UsageError

    target = out or file.with_name(file.stem + ".render.wav")
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in ("wav", "flac"):
        raise UsageError(f"--out {target} must end in .wav or .flac", "e.g. --out song.wav")
    params = {"input": str(file), "soundfont": str(soundfont) if soundfont else None, "rate": rate, "plain": plain,
              "format": fmt}
    # the "music-render" task through the engine, so the audio carries the task and request in its
    # tags (`studio replay` renders it again); the file is --out itself, or -1, -2 ... if taken
    options = opts.run_options("music-render", template=target.stem.replace("{", "{{").replace("}", "}}"))
    options.out_dir = target.parent
    (result,) = engine_for(opts, options).run("music-render", params)
    info = result.metadata.get("render") or {}
    summary = {"path": str(result.path), "engine": info.get("engine"), "soundfont": info.get("soundfont"),
               "seconds": info.get("seconds")}
    if opts.json:
        typer.echo(json.dumps(summary))
    elif not opts.quiet:
        sys.stderr.write(f"wrote {result.path} ({info.get('engine')})\n")


# ----------------------------------------------------------------------------- train
@music_app.command()
@global_options("device", "precision", *OUTPUT, "offline", "allow_pickle")
def train(
    data: Annotated[str, typer.Option(help="folder of MIDI files, or `bach` (music21's Bach chorales, converted to MIDI)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: checkpoints/step-NNNNNN/, final/, metrics.jsonl")] = Path("runs/midi-lm"),
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="MIDI model to fine-tune (alias, hub id, folder); default: a new one")] = None,
    size: Annotated[str, typer.Option(help="new model size: tiny | small | base")] = "small",
    steps: Annotated[int, typer.Option(help="optimizer steps in total (a resumed run continues up to this)")] = 1000,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    lr: Annotated[float, typer.Option(help="peak learning rate (warm-up, then cosine decay)")] = 3e-4,
    warmup: Annotated[Optional[int], typer.Option(help="warm-up steps (default 5% of --steps)")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.01,
    val_every: Annotated[int, typer.Option(help="validation loss every N steps (and at the end)")] = 100,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (and at the end)")] = 200,
    val_fraction: Annotated[float, typer.Option(help="share of files held out for validation")] = 0.1,
    limit: Annotated[Optional[int], typer.Option(help="use only the first N files (quick runs)")] = None,
    keep: Annotated[int, typer.Option(help="checkpoints kept")] = 3,
    seed: Annotated[int, typer.Option(help="seed for init and data order")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in --out")] = False,
    opts: Globals = None,
) -> None:
    """Train (or fine-tune) the MIDI model on MIDI files or the Bach chorales; resumable.
    --precision is the autocast dtype; the weights stay fp32."""
    from studio.pipelines.training.midi_train import MidiTrainConfig
    from studio.pipelines.training.midi_train import train as run_training
    from studio.models import resolve

    config = MidiTrainConfig(data=data, out=str(out), model=model, size=size, steps=steps, batch_size=batch_size,
                             seq_len=seq_len, lr=lr, warmup=warmup, weight_decay=weight_decay, val_every=val_every,
                             save_every=save_every, val_fraction=val_fraction, limit=limit, seed=seed, resume=resume,
                             keep=keep)
    spec = resolve(model, task="music-midi", allow_pickle=opts.allow_pickle, offline=opts.offline or None) if model else None
    progress = opts.progress()
    with progress:
        summary = run_training(config, opts.device_manager(), progress, spec=spec)
    if opts.json:
        typer.echo(json.dumps(summary))
    elif not opts.quiet:
        val = summary["val_loss"]
        sys.stderr.write(f"wrote {summary['final']} (step {summary['steps']}, loss {summary['train_loss']:.4f}"
                         + (f", val loss {val:.4f}" if val is not None else "") + ")\n")


# ----------------------------------------------------------------------------- eval
@global_options("quiet")
def eval_music(
    inputs: Annotated[List[Path], typer.Argument(help="MIDI files or folders of them")],
    reference: Annotated[Optional[str], typer.Option(help="folder of MIDI files, or `bach`: KL of pitch-class histograms to it")] = None,
    reference_limit: Annotated[Optional[int], typer.Option(help="use only the first N reference files")] = None,
    key: Annotated[Optional[str], typer.Option(help="measure the share of notes in this key (default: each file's recorded --key)")] = None,
    chords: Annotated[Optional[str], typer.Option(help='chords per bar to check (default: each file\'s recorded --chords)')] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="also write the report to this JSON file")] = None,
    opts: Globals = None,
) -> None:
    """Music statistics of MIDI files as JSON (stdout)."""
    from studio.pipelines.music_metrics import evaluate
    from studio.outputs import write_text_file

    progress = opts.progress()
    with progress:
        report = evaluate(inputs, reference=reference, reference_limit=reference_limit, key=key, chords=chords,
                          progress=progress)
    text = json.dumps(report, indent=2)
    if out is not None:
        write_text_file(out, text + "\n")
    typer.echo(text)
