"""The pipeline contract and the few helpers that three or more pipelines need.

A pipeline module (pipelines/<task>.py) defines

    @dataclass(frozen=True)
    class XRequest:          # one field per user-visible choice, each with a comment;
        prompt: str          # shared names: prompt, negative_prompt, seed, steps, guidance,
        model: str = "auto"  # width, height, num_outputs, model, adapters, out_dir
        seed: int | None = None

    class XPipeline:
        task = "x"                     # the registry name (the model card's task for aliases)
        request_type = XRequest
        @classmethod
        def load(cls, spec: ModelSpec, device: DeviceManager) -> "XPipeline": ...
        def check_inputs(self, request) -> None: ...   # raise UsageError with a hint
        def run(self, request, progress: Progress) -> list[Result]:
            # 1. check inputs  2. prepare  3. generate (device.inference())  4. Results

`run` never writes user files and never prints: it returns studio.outputs.Result objects and the
engine hands them to the OutputWriter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.errors import InputFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path, *, mode: str = "RGB", what: str = "image") -> Any:
    """Open an image file as a PIL image in `mode`; a missing or corrupt file is a clean error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a folder", "pass an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if im.mode != mode else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputFileError(f"{what} {path} is not a readable image ({type(exc).__name__})",
                             "pass a PNG, JPEG or WebP file") from exc


def seeds_for(seed: int, count: int, seeds: tuple[int, ...] | list[int] | None = None) -> list[int]:
    """Explicit seeds, or seed, seed+1, ... (A1111's batch convention): each output records its own."""
    if seeds:
        return [int(s) for s in seeds]
    return [int(seed) + i for i in range(count)]
