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
or recorded), `needs_model = False` (no weights: load gets spec=None, device=None). tests/
test_contract.py runs every registered task through `contract_problems` and the same checks.
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

# The argument names tasks share (DESIGN.md "Contracts"), and the spellings that mean one of them:
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
