"""The pipeline contract, in code, and the few helpers that three or more pipelines need.

ARCHITECTURE.md ("The contract") says where a pipeline sits; this module says what it is. A task
module (pipelines/<task>.py) defines a Request and a Pipeline that satisfy the two Protocols below:

    @dataclass(frozen=True)
    class XRequest:          # one field per user-visible choice, each with a comment;
        prompt: str          # shared names (SHARED_NAMES): prompt, negative_prompt, seed, steps,
        model: str = "auto"  # guidance, width, height, num_outputs, model, adapters, out_dir
        seed: int | None = None

    class XPipeline:
        task = "x"                     # the registry name (the model card's task for aliases)
        request_type = XRequest
        @classmethod
        def load(cls, spec: ModelSpec, device: DeviceManager) -> XPipeline: ...
        def check_inputs(self, request: XRequest) -> None: ...   # raise UsageError with a hint
        def run(self, request: XRequest, progress: Progress) -> Iterator[Result]:
            # 1. check inputs  2. prepare  3. generate (device.inference())  4. yield Results

`run` never writes user files and never prints. It yields (or returns a list of) studio.outputs
Result objects; the engine writes each one as soon as it is yielded and then lets go of its
payload, so a run of many outputs holds one at a time (`--num 200` peaks like `--num 10`). A
pipeline whose outputs are many yields them one by one.

Optional class attributes the engine reads: `seedless = True` (nothing random: no seed is drawn
or recorded), `needs_model = False` (no weights: load gets spec=None, device=None), and a
`resolve_model` classmethod for a task that names its models its own way (registry.resolve_model),
and a `check_request(request, spec, device)` classmethod: the checks that need no weights (ranges,
sizes against the model's config files, the memory estimate of studio/limits.py against the
device), which the engine runs before load (with device=None when it plans, without a device yet);
`check_inputs` keeps what needs the loaded model. tests/test_contract.py runs every registered task through `contract_problems` and the same checks.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Protocol, TypeVar, runtime_checkable

from studio.errors import InputFileError

if TYPE_CHECKING:  # types only: the contract imports nothing heavy (the CLI reads request fields)
    from typing_extensions import Self

    from studio.device import DeviceManager
    from studio.models import ModelSpec
    from studio.outputs import Result
    from studio.progress import Progress

# The argument names tasks share (ARCHITECTURE.md, the contract), and the spellings that mean one of them:
# a request field spelled the second way is a contract problem, so `--seed`, `--steps` and friends
# read the same in every command, preset and batch file.
SHARED_NAMES = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "num_outputs",
                "model", "adapters", "out_dir")
SYNONYMS = {"negative": "negative_prompt", "neg_prompt": "negative_prompt", "num": "num_outputs",
            "num_images": "num_outputs", "n_outputs": "num_outputs", "batch_count": "num_outputs",
            "num_inference_steps": "steps", "num_steps": "steps", "guidance_scale": "guidance", "cfg": "guidance",
            "cfg_scale": "guidance", "lora": "adapters", "loras": "adapters", "model_id": "model",
            "checkpoint": "model", "out": "out_dir", "output_dir": "out_dir", "random_seed": "seed"}


@runtime_checkable
class Request(Protocol):
    """A task's request: a frozen dataclass, one field per user-visible choice, each with a comment.
    A task that loads weights has a `model` field; a task that samples has a `seed` field."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


RequestT = TypeVar("RequestT", bound=Request, contravariant=True)


@runtime_checkable
class Pipeline(Protocol[RequestT]):
    """What the registry names and the engine drives: load once, check, run many times."""

    task: ClassVar[str]  # the registry name
    request_type: ClassVar[type]  # the frozen Request dataclass this pipeline takes

    @classmethod
    def load(cls, spec: ModelSpec, device: DeviceManager) -> Self:
        """Load the weights `spec` names onto `device` (called once per process and settings)."""
        ...

    def check_inputs(self, request: RequestT) -> None:
        """Raise a StudioError (UsageError, InputFileError) that tells the user what to change."""
        ...

    def run(self, request: RequestT, progress: Progress) -> Iterable[Result]:
        """The outputs, in order: a generator that yields each one as it is made, or a list."""
        ...


def contract_problems(cls: type) -> list[str]:
    """What keeps `cls` from satisfying the pipeline contract ([] when nothing does): the members
    of `Pipeline`, a frozen-dataclass request, the shared argument names, `model` for a task that
    loads weights and `seed` for one that samples."""
    problems: list[str] = []
    name = getattr(cls, "__name__", repr(cls))
    if not isinstance(cls, Pipeline):  # a class object has the members as class attributes
        missing = [m for m in ("task", "request_type", "load", "check_inputs", "run") if not hasattr(cls, m)]
        problems.append(f"{name} lacks {', '.join(missing)}")
        return problems
    if not isinstance(cls.task, str) or not cls.task:
        problems.append(f"{name}.task must be the registry name (a non-empty str)")
    if not isinstance(inspect.getattr_static(cls, "load"), classmethod):
        problems.append(f"{name}.load must be a classmethod (load(spec, device) -> instance)")
    for method, wanted in (("check_inputs", ["request"]), ("run", ["request", "progress"])):
        params = list(inspect.signature(getattr(cls, method)).parameters)[1:]
        if params[: len(wanted)] != wanted:
            problems.append(f"{name}.{method} takes {params}, the contract says {wanted}")
    rt = cls.request_type
    if not (isinstance(rt, type) and dataclasses.is_dataclass(rt)):
        problems.append(f"{name}.request_type must be a dataclass, not {rt!r}")
        return problems
    if not rt.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        problems.append(f"{rt.__name__} must be frozen (@dataclass(frozen=True)): a request is a value")
    fields = [f.name for f in dataclasses.fields(rt)]
    for field in fields:
        if field in SYNONYMS:
            problems.append(f"{rt.__name__}.{field} should be named {SYNONYMS[field]!r} (the shared name)")
    if getattr(cls, "needs_model", True) and "model" not in fields:
        problems.append(f"{rt.__name__} has no `model` field, but {name} loads a model")
    if not getattr(cls, "seedless", False) and "seed" not in fields:
        problems.append(f"{rt.__name__} has no `seed` field; a task without randomness sets seedless = True")
    return problems


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# Inputs above this many pixels are refused before a pixel is decoded. It is where Pillow itself
# calls an image a decompression bomb (2 x Image.MAX_IMAGE_PIXELS, about 179 MP: a 30000x30000
# PNG of a few KB would decode to 3.6 GB). A 150 MP medium-format photo still opens; decoding
# costs up to 4 bytes a pixel (RGBA) before it is shrunk to the size a model works at.
MAX_INPUT_PIXELS = 178_956_970

# modes Pillow's reduce()/LANCZOS resize cannot filter (palette, 1-bit, 16-bit): converted first
_CONVERT_BEFORE_SHRINK = ("1", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N")


def _too_large(path: Path, what: str, size: tuple[int, int] | None, pixels: int | None) -> InputFileError:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    pixels = pixels if pixels is not None else (size[0] * size[1] if size else 0)
    return InputFileError(
        f"{what} {path} is {dims}{pixels / 1e6:.0f} megapixels, over the {MAX_INPUT_PIXELS / 1e6:.0f} MP studio opens "
        "(a larger image can be a decompression bomb)",
        "downscale it first, e.g. `magick in.png -resize 4096x4096 out.png`, and pass the smaller file")


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded; over MAX_INPUT_PIXELS, or not an
    image, is an InputFileError. Lets a caller pick its working size before it decodes."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except Image.DecompressionBombError:
        return load_image(path, what=what).size  # raises the too-large error, nothing decoded
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return load_image(path, what=what).size  # raises the matching missing/unreadable error
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise _too_large(path, what, size, None)
    return size


def _fit(size: tuple[int, int], box: tuple[int, int], cover: bool = False) -> tuple[int, int]:
    """`size` shrunk (aspect kept, never enlarged) to fit inside `box`, or with `cover` only as far
    as it still covers the box (the caller then crops or resizes to the box exactly)."""
    scales = (box[0] / size[0], box[1] / size[1])
    scale = min(max(scales) if cover else min(scales), 1.0)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def load_image(path: str | Path, *, mode: str = "RGB", what: str = "image",
               max_size: int | tuple[int, int] | None = None, cover: bool = False, note: Any = None) -> Any:
    """Open an image file as a PIL image in `mode`; a missing, corrupt or oversized file is a
    clean InputFileError (exit 2).

    The header is read first: above MAX_INPUT_PIXELS nothing is decoded. With `max_size` (a side
    length, or a (width, height) box) an image more than twice as large is shrunk to fit inside
    it (with `cover`: only as far as it still covers it, for a caller that resizes to the box
    next) while it is opened: a JPEG decodes straight at 1/2..1/8 scale (draft), others are reduced right after
    decoding, before any mode conversion, so a 12000x12000 input never exists as a full-size
    RGB copy, let alone as a float array in a model's processor. `note(text)` hears about it;
    the returned image's `info["original_size"]` and `info["original_mode"]` keep the file's own.
    """
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"{what} {path} is a folder", "pass an image file")
    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
    try:
        with warnings.catch_warnings():
            # the pixel limit is studio's (below), with a clear error instead of Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, what, None, int(found.group(1)) if found else None) from exc
    except unreadable as exc:
        raise InputFileError(f"{what} {path} is not a readable image ({type(exc).__name__})",
                             "pass a PNG, JPEG or WebP file") from exc
    image: Any = im
    original = im.size
    try:
        if original[0] * original[1] > MAX_INPUT_PIXELS:
            raise _too_large(path, what, original, None)
        box = (max_size, max_size) if isinstance(max_size, int) else tuple(max_size) if max_size else None
        target = _fit(original, box, cover) if box else original
        if max(target[0] / original[0], target[1] / original[1]) > 0.5:
            # under 2x the box, the caller's own single resize is better than two (and keeps
            # results identical to what a direct resize gave)
            target = original
        original_mode = im.mode
        if target != original:
            im.draft(None, target)  # JPEG: the decoder scales down by 2, 4 or 8 (no-op elsewhere)
        im.load()
        if image.size != target:
            if image.mode in _CONVERT_BEFORE_SHRINK:
                image = image.convert(mode)
            # reducing_gap: a cheap box reduce() to ~3x the target first, then LANCZOS
            image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if image.mode != mode:
            image = image.convert(mode)
        if image is im and getattr(im, "fp", None) is not None:
            image = im.copy()  # multi-frame files keep their file open after load(); a copy lets it close
    except Image.DecompressionBombError as exc:
        im.close()
        raise _too_large(path, what, original, None) from exc
    except unreadable as exc:
        im.close()
        raise InputFileError(f"{what} {path} is not a readable image ({type(exc).__name__})",
                             "pass a PNG, JPEG or WebP file") from exc
    except BaseException:
        im.close()
        raise
    if image is not im:
        im.close()  # the full-size decode is freed now, not when the caller's frame ends
    image.info["original_size"] = original
    image.info["original_mode"] = original_mode
    if target != original and note is not None:
        note(f"downscaled the {what} from {original[0]}x{original[1]} to {target[0]}x{target[1]} while opening it")
    return image


def as_tuple(value: Any) -> tuple:
    """A request field that takes one value or several (a tuple from the CLI, a list from YAML or
    JSON, a bare string or number from a preset) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        return (value,)
    return tuple(value)


def seeds_for(seed: int, count: int, seeds: tuple[int, ...] | list[int] | None = None) -> list[int]:
    """Explicit seeds, or seed, seed+1, ... (A1111's batch convention): each output records its own."""
    if seeds:
        return [int(s) for s in seeds]
    return [int(seed) + i for i in range(count)]
