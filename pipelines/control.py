"""ControlNet helpers: control maps from images (preprocessors), `--control` specs, and loading a
ControlNet that fits a base model.

A control type names a preprocessor and, through the model cards, the ControlNet that reads its
maps (`controlnet-canny-sd15` has `params: {control_type: canny, base: sd15}`):

    canny           OpenCV Canny edges; no weights needed
    none / raw      the image already is a control map (pass --control-model)
    shuffle         controlnet-aux content shuffle; no weights needed
    depth, pose, lineart, lineart_anime, softedge, scribble, mlsd, normal
                    controlnet-aux detectors; their weights (lllyasviel/Annotators) are pickle files,
                    so they need `pip install 'studio[control]'`, the weights in the HF cache and
                    --allow-pickle

The image pipeline and the video pipeline share these helpers; nothing here imports torch,
diffusers or OpenCV at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.device import module_available
from studio.errors import BackendUnavailable, ModelNotAvailable, UsageError
from studio.progress import quiet_libraries

if TYPE_CHECKING:  # types only
    from studio.device import DeviceManager

# the hub repo controlnet-aux's detectors load their weights from
AUX_REPO = "lllyasviel/Annotators"

# type -> (what it does, controlnet-aux class or None, extra kwargs for the detector call, needs weights)
PREPROCESSORS: dict[str, tuple[str, str | None, dict[str, Any], bool]] = {
    "canny": ("Canny edges through OpenCV (no weights)", None, {}, False),
    "none": ("the image is already a control map", None, {}, False),
    "raw": ("the image is already a control map (same as none)", None, {}, False),
    "shuffle": ("content shuffle through controlnet-aux (no weights)", "ContentShuffleDetector", {}, False),
    "depth": ("MiDaS depth through controlnet-aux", "MidasDetector", {}, True),
    "pose": ("OpenPose skeletons through controlnet-aux", "OpenposeDetector", {}, True),
    "lineart": ("line art through controlnet-aux", "LineartDetector", {}, True),
    "lineart_anime": ("anime line art through controlnet-aux", "LineartAnimeDetector", {}, True),
    "softedge": ("HED soft edges through controlnet-aux", "HEDdetector", {}, True),
    "scribble": ("HED scribbles through controlnet-aux", "HEDdetector", {"scribble": True}, True),
    "mlsd": ("M-LSD straight lines through controlnet-aux", "MLSDdetector", {}, True),
    "normal": ("surface normals (BAE) through controlnet-aux", "NormalBaeDetector", {}, True),
}
ALIASES = {"openpose": "pose", "hed": "softedge"}


def control_types() -> list[str]:
    return list(PREPROCESSORS) + list(ALIASES)


def canonical_type(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PREPROCESSORS:
        raise UsageError(f"unknown control type {name!r}", f"types: {', '.join(control_types())}")
    return key


@dataclass(frozen=True)
class ControlSpec:
    """One `--control TYPE:IMAGE[:SCALE[:START:END]]`."""

    type: str  # preprocessor / ControlNet kind (canny, depth, none, ...)
    image: str  # the input image (a photo to preprocess, or a ready map for none/raw)
    scale: float = 1.0  # controlnet_conditioning_scale: how strongly the map steers
    start: float = 0.0  # fraction of the steps at which the ControlNet starts acting
    end: float = 1.0  # fraction of the steps at which it stops

    def to_text(self) -> str:
        return f"{self.type}:{self.image}:{self.scale:g}:{self.start:g}:{self.end:g}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# The image-conditioned extras (--ip-adapter, --t2i-adapter, --control) share these: one spelling
# of IMAGE[:SCALE], one check of the image file, one way to find the card for a base family.
def split_scale(text: str) -> tuple[str, float | None]:
    """`IMAGE[:SCALE]` -> (image, scale or None); the scale is taken from the right unless the whole
    text is an existing path, so a path may itself hold ':'."""
    from pathlib import Path

    image, sep, tail = text.rpartition(":")
    if sep and image and not Path(text).expanduser().exists() and _is_number(tail):
        return image, float(tail)
    return text, None


def existing_image(image: str, what: str) -> str:
    """`image` as an absolute path, or InputFileError naming `what` (e.g. "--ip-adapter image")."""
    from pathlib import Path

    from studio.errors import InputFileError

    path = Path(image).expanduser()
    if not path.exists():
        raise InputFileError(f"{what} {image} does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"{what} {image} is a folder", "pass an image file")
    return str(path.resolve())


def card_for(task: str, family: str, kind: str | None = None) -> str | None:
    """The first model card (by name) of `task` for a base family, and control type `kind` if given."""
    from studio.models import load_cards

    for name, card in sorted(load_cards().items()):
        params = card.get("params") or {}
        if card.get("task") == task and params.get("base") == family and (kind is None or params.get("control_type") == kind):
            return name
    return None


def parse_control(text: str) -> ControlSpec:
    """`TYPE:IMAGE[:SCALE[:START:END]]` -> ControlSpec; numbers are taken from the right so that a
    path may itself contain ':'."""
    kind, sep, rest = str(text).partition(":")
    if not sep or not rest:
        raise UsageError(f"--control {text!r} is not TYPE:IMAGE[:SCALE[:START:END]]",
                         "e.g. --control canny:photo.png or --control canny:photo.png:0.8:0:0.6")
    kind = canonical_type(kind)
    parts = rest.split(":")
    numbers: list[float] = []
    if len(parts) >= 4 and all(_is_number(p) for p in parts[-3:]):
        numbers = [float(p) for p in parts[-3:]]
        parts = parts[:-3]
    elif len(parts) >= 2 and _is_number(parts[-1]):
        numbers = [float(parts[-1])]
        parts = parts[:-1]
    image = ":".join(parts)
    if not image:
        raise UsageError(f"--control {text!r} names no image", "TYPE:IMAGE[:SCALE[:START:END]]")
    scale = numbers[0] if numbers else 1.0
    start, end = (numbers[1], numbers[2]) if len(numbers) == 3 else (0.0, 1.0)
    if scale < 0:
        raise UsageError(f"--control {text!r}: scale {scale:g} is negative", "use a scale >= 0 (1.0 is full strength)")
    if not (0.0 <= start < end <= 1.0):
        raise UsageError(f"--control {text!r}: start {start:g} / end {end:g} must satisfy 0 <= start < end <= 1",
                         "e.g. :1.0:0:0.6 lets the ControlNet act on the first 60% of the steps")
    return ControlSpec(type=kind, image=image, scale=scale, start=start, end=end)


# ----------------------------------------------------------------------------- preprocessors
_DETECTORS: dict[str, Any] = {}


def preprocess(kind: str, image: Any, *, low: int = 100, high: int = 200, allow_pickle: bool = False) -> Any:
    """The control map (PIL RGB, same size as `image`) for a control type."""
    kind = canonical_type(kind)
    if kind in ("none", "raw"):
        return image.convert("RGB")
    if kind == "canny":
        return canny(image, low=low, high=high)
    return _aux_preprocess(kind, image, allow_pickle=allow_pickle)


def canny(image: Any, *, low: int = 100, high: int = 200) -> Any:
    """Canny edges as a white-on-black RGB map (what the canny ControlNets were trained on)."""
    import cv2
    import numpy as np
    from PIL import Image

    if not (0 <= low < high):
        raise UsageError(f"canny thresholds low={low} high={high} must satisfy 0 <= low < high",
                         "the defaults are 100 and 200")
    gray = np.asarray(image.convert("L"))  # (H, W) uint8
    edges = cv2.Canny(gray, low, high)  # (H, W) 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))  # (H, W, 3)


def _aux_preprocess(kind: str, image: Any, *, allow_pickle: bool) -> Any:
    description, class_name, call_kwargs, needs_weights = PREPROCESSORS[kind]
    if not module_available("controlnet_aux"):
        raise BackendUnavailable(f"the {kind} preprocessor needs controlnet-aux, which is not installed",
                                 "pip install 'studio[control]' (or use canny, or none with a ready map)")
    import controlnet_aux

    if kind not in _DETECTORS:
        cls = getattr(controlnet_aux, class_name)
        if not needs_weights:
            _DETECTORS[kind] = cls()
        else:
            if not allow_pickle:
                raise UsageError(f"the {kind} preprocessor's weights ({AUX_REPO}) are pickle files, which can run code",
                                 "pass --allow-pickle if you trust them, or use canny")
            try:
                _DETECTORS[kind] = cls.from_pretrained(AUX_REPO)
            except Exception as exc:  # offline without the cache, or a network error
                raise ModelNotAvailable(f"the {kind} preprocessor's weights ({AUX_REPO}) are not available: "
                                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                                        f"download them once with network access (huggingface-cli download {AUX_REPO}), "
                                        "or use canny") from exc
    width, height = image.size
    out = _DETECTORS[kind](image.convert("RGB"), **call_kwargs)
    # detectors resize to their own working resolution; the map must match the generation size
    return out.convert("RGB").resize((width, height))


# ----------------------------------------------------------------------------- ControlNet models
def base_family(pipe: Any) -> str:
    """sd15 | sd2 | sdxl | sd3 | flux | <class name>: which ControlNets fit this base."""
    name = type(pipe).__name__
    if "XL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion"):
        dim = getattr(getattr(pipe, "unet", None), "config", {}).get("cross_attention_dim")
        return "sd2" if dim == 1024 else "sd15"
    return name


def default_control_model(kind: str, family: str) -> str:
    """The model card name of the ControlNet for a control type on a base family."""
    if kind in ("none", "raw"):
        raise UsageError(f"--control {kind}:IMAGE passes a ready map, so studio cannot tell which ControlNet reads it",
                         "name it with --control-model (an alias, hub id or folder)")
    name = card_for("control", family, kind)
    if name is not None:
        return name
    raise UsageError(f"no ControlNet card for control type {kind!r} on a {family} model",
                     "name one with --control-model (an alias, hub id or folder); "
                     "`studio models list --task control` shows the cards")


_CONTROLNETS: dict[tuple, Any] = {}


def load_controlnet(name: str, device: DeviceManager, *, allow_pickle: bool = False, offline: bool = False,
                    trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(ControlNet model prepared for `device`, its ModelSpec), cached per process. The model class
    comes from the folder's config (ControlNetModel, SD3ControlNetModel, FluxControlNetModel, ...)."""
    from studio import models

    spec = models.resolve(name, task="control", allow_pickle=allow_pickle, offline=offline,
                          trust_remote_code=trust_remote_code)
    key = (spec, device.settings)
    if key not in _CONTROLNETS:
        import diffusers

        with models.loading(spec, "ControlNet"), quiet_libraries():
            if spec.kind == "file":
                model = diffusers.ControlNetModel.from_single_file(spec.source, dtype=device.dtype)
            else:
                location = spec.location()
                config = diffusers.ControlNetModel.load_config(location, **({"revision": spec.revision} if spec.revision and spec.kind == "hub" and not spec.offline else {}))
                class_name = config.get("_class_name", "ControlNetModel")
                cls = getattr(diffusers, class_name, None)
                if cls is None or "ControlNet" not in class_name:
                    raise UsageError(f"{name} is a {class_name}, not a ControlNet",
                                     "pass a ControlNet with --control-model")
                model = cls.from_pretrained(location, dtype=device.dtype, **spec.load_kwargs(library="diffusers-model"))
            model = device.prepare(model)
        _CONTROLNETS[key] = (model, spec)
    return _CONTROLNETS[key]


def check_fits(controlnet: Any, pipe: Any, label: str) -> None:
    """A ControlNet made for another base fails deep inside the UNet; say so before running."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise UsageError(f"{type(pipe).__name__} does not take a ControlNet", "use an SD 1.x/2.x, SDXL, SD3 or Flux model")
    c, d = controlnet.config, denoiser.config
    for key in ("cross_attention_dim", "block_out_channels", "joint_attention_dim", "addition_embed_type"):
        if key in c and key in d and c[key] != d[key]:
            got, want = c[key], d[key]
            raise UsageError(f"ControlNet {label} does not fit this base model ({key} {got} vs the model's {want})",
                             f"use a ControlNet made for this base ({base_family(pipe)}); "
                             "`studio models list --task control` shows the cards")
