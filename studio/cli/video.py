"""`studio video PROMPT ...` (text/image-to-video, prompt travel, long clips) and
`studio video interpolate CLIP --factor K`.

A click group cannot take a positional PROMPT and also have subcommands: click would read the
prompt as a subcommand name. `VideoGroup` therefore dispatches by the first word: `interpolate`
(or `generate`) runs that subcommand, anything else (a prompt, or an option such as --init) is
handed to `generate`. So `studio video "a calm sea"` and `studio video interpolate in.mp4` both
work; a prompt that is literally "interpolate" is written `studio video generate interpolate`.
"""

from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from studio.cli.common import OUTPUT, Globals, generating, global_options, new_app, run_command


class VideoGroup(typer.core.TyperGroup):
    """Routes `studio video ARGS`: a known subcommand name runs it, anything else is `generate ARGS`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


video_app = new_app(
    "Text-to-video, image-to-video (--init), prompt travel (--prompt-map), long clips and frame interpolation.\n\n"
    "[bold]studio video PROMPT [OPTIONS][/] generates (same as `studio video generate`); "
    "[bold]studio video interpolate CLIP --factor K[/] smooths any clip.",
    cls=VideoGroup,
)


def register(root: typer.Typer) -> None:
    root.add_typer(video_app, name="video")


_M = "Model"
_C = "Clip"
_T = "Prompt travel, long clips, control"


@video_app.command("generate")
@generating
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="what the clip shows (SVD takes none: give --init only)")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="alias, hub id or folder (default: animatediff-v3)", rich_help_panel=_M)] = None,
    motion_adapter: Annotated[Optional[str], typer.Option(help="AnimateDiff motion adapter over an SD base --model", rich_help_panel=_M)] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA PATH_OR_ID\\[:SCALE] for the SD base (repeatable)", rich_help_panel=_M, show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option(help="frames to generate (beyond 16 AnimateDiff slides context windows)", rich_help_panel=_C)] = None,
    fps: Annotated[Optional[float], typer.Option(help="playback frames/s (default: the model's rate x --interpolate)", rich_help_panel=_C)] = None,
    width: Annotated[Optional[int], typer.Option(help="width in pixels", rich_help_panel=_C)] = None,
    height: Annotated[Optional[int], typer.Option(help="height in pixels", rich_help_panel=_C)] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps", rich_help_panel=_C)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="guidance scale (default: the model family's)", rich_help_panel=_C)] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="negative prompt", rich_help_panel=_C)] = None,
    num_outputs: Annotated[Optional[int], typer.Option("--num-outputs", "-n", help="clips to make (seeds seed, seed+1, ...)", rich_help_panel=_C)] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="mp4|gif|webp|frames", rich_help_panel=_C)] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="image-to-video: the image to animate", rich_help_panel=_C)] = None,
    strength: Annotated[Optional[float], typer.Option(help="AnimateDiff --init: how much to change the still (0-1)", rich_help_panel=_C)] = None,
    motion_bucket_id: Annotated[Optional[int], typer.Option(help="SVD: amount of motion (default 127)", rich_help_panel=_C)] = None,
    interpolate: Annotated[Optional[int], typer.Option(help="insert K-1 flow-interpolated frames between each pair", rich_help_panel=_C)] = None,
    interpolate_method: Annotated[Optional[str], typer.Option(help="optical flow for --interpolate: dis|farneback", rich_help_panel=_C)] = None,
    prompt_map: Annotated[Optional[str], typer.Option(help='prompt travel: "0:a calm sea,16:a stormy sea"', rich_help_panel=_T)] = None,
    context_length: Annotated[Optional[int], typer.Option(help="AnimateDiff FreeNoise window in frames (default 16)", rich_help_panel=_T)] = None,
    context_stride: Annotated[Optional[int], typer.Option(help="frames between FreeNoise window starts (default 4)", rich_help_panel=_T)] = None,
    controlnet: Annotated[Optional[str], typer.Option(help="ControlNet model for per-frame control", rich_help_panel=_T)] = None,
    control_frames: Annotated[Optional[Path], typer.Option(help="folder of control images named by frame number", rich_help_panel=_T)] = None,
    control_scale: Annotated[Optional[float], typer.Option(help="ControlNet strength (default 1.0)", rich_help_panel=_T)] = None,
    decode_chunk_size: Annotated[Optional[int], typer.Option(help="frames the VAE decodes at once (default: fit free memory)", rich_help_panel=_T)] = None,
    *,
    opts: Globals,
) -> None:
    """Generate a clip: `studio video "a boat on a calm sea" --frames 16 --format gif`."""
    params: dict[str, Any] = {
        "prompt": prompt, "model": model, "motion_adapter": motion_adapter, "adapters": tuple(lora) if lora else None, "frames": frames, "fps": fps,
        "width": width, "height": height, "steps": steps, "guidance": guidance, "negative_prompt": negative,
        "num_outputs": num_outputs, "format": format.lower() if format else None,
        "init_image": str(init) if init else None, "strength": strength, "motion_bucket_id": motion_bucket_id,
        "interpolate": interpolate, "interpolate_method": interpolate_method, "prompt_map": prompt_map, "context_length": context_length,
        "context_stride": context_stride, "controlnet": controlnet,
        "control_frames": str(control_frames) if control_frames else None, "control_scale": control_scale,
        "decode_chunk_size": decode_chunk_size,
    }
    run_command("video", params, opts)


@video_app.command("interpolate")
@global_options("out", *OUTPUT)
def interpolate(
    clip: Annotated[Path, typer.Argument(help="an MP4/WebM/MOV, GIF, WebP, or a folder of numbered frames")],
    factor: Annotated[int, typer.Option("--factor", "-k", help="K: insert K-1 frames between each pair")] = 2,
    fps: Annotated[Optional[float], typer.Option(help="output frames/s (default: the clip's rate x K, same duration)")] = None,
    method: Annotated[str, typer.Option(help="optical flow: dis|farneback")] = "dis",
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="mp4|gif|webp|frames (default: the input's)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an output of the same name")] = False,
    opts: Globals = None,
) -> None:
    """Smooth any clip with optical-flow frame interpolation (OpenCV; no model weights).

    The "video-interpolate" task (pipelines/interpolate.py) through the engine, like every other
    command: its outputs carry the task and request, so `studio replay` makes the same frames.
    """
    from studio.outputs import slugify

    params = {"input": str(clip), "factor": factor, "fps": fps, "method": method,
              "format": format.lower() if format else None}
    # the name says what it came from: {date}-video-interpolate-x-CLIP-xK
    template = "{date}-{task}-x-" + slugify(f"{clip.stem}-x{factor}")
    run_command("video-interpolate", params, opts, template=template, overwrite=overwrite)
