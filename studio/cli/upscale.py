"""`studio upscale IMAGE... --model M --scale N`: make images larger with a diffusers upscaler
(the SD x4 upscaler, the SD x2 latent upscaler) or, without weights, Lanczos/bicubic/nearest.

Thin: options become an UpscaleRequest (pipelines/upscale.py) and the engine does the rest.
Nothing heavy is imported here.
"""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import Globals, generating, run_command

_M = "Upscaler"
_D = "Diffusion upscalers"


def register(root: typer.Typer) -> None:
    root.command("upscale", no_args_is_help=True)(upscale)


@generating
def upscale(
    images: Annotated[List[Path], typer.Argument(help="images to upscale (one output each)", show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="SD x4 / x2 latent upscaler (alias, hub id, folder), or lanczos, bicubic, nearest (no weights)", rich_help_panel=_M, show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="output size / input size (default: the model's own, x4 or x2; 2 without weights)", rich_help_panel=_M, show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="what the image shows (the diffusion upscalers follow it)", rich_help_panel=_D, show_default=False)] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", "-n", help="negative prompt", rich_help_panel=_D, show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="denoising steps per pass", rich_help_panel=_D, show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "--cfg", help="guidance scale (default: the upscaler's own, 9)", rich_help_panel=_D, show_default=False)] = None,
    noise_level: Annotated[Optional[int], typer.Option("--noise-level", help="x4 upscaler: noise added first (more = more invented detail; 20)", rich_help_panel=_D, show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Upscale images: `studio upscale photo.png --model sd-x4-upscaler --prompt "a cat"`, or
    `--model lanczos --scale 2` without weights. `studio image --hires 2 --hires-upscaler MODEL`
    uses the same upscalers inside a hires fix."""
    params = {
        "images": tuple(str(p.expanduser().resolve()) for p in images), "model": model, "scale": scale,
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "guidance": guidance, "noise_level": noise_level,
    }
    run_command("upscale", params, opts)
