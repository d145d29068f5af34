"""Hires fix (A1111's "Hires. fix"): generate at the model's size, upscale, then repaint the
upscaled image with img2img at the new size, so a model trained at 512 px makes a detailed
1024 px image instead of the doubled limbs it draws when asked for 1024 px directly.

`--hires SCALE[:STRENGTH[:STEPS]]` with `--hires-upscaler`:
  - `latent` (A1111's "Latent", also "Latent (nearest)", "Latent (bicubic)", "... antialiased"):
    the first pass stops before the VAE decode and its latents are interpolated
    (torch.nn.functional.interpolate, the same modes A1111 uses); img2img starts from them.
  - `lanczos` (default), `bicubic`, `nearest`: the decoded image resized with PIL.
  - a model (alias, folder, file, hub id): an upscaler the `upscale` task loads (diffusers' SD x4
    upscaler, SD x2 latent upscaler, ...), then resized to the exact target, as A1111 brings a
    4x ESRGAN result to "Upscale by 2".
The img2img pass takes STEPS (default: the first pass's) at STRENGTH (default 0.7, A1111's),
running int(STEPS * STRENGTH) of them as A1111 does. It runs without ControlNet.

The infotext says what A1111 says: `Hires upscale`, `Hires steps` (when given), `Hires upscaler`
and `Denoising strength`; `Size` stays the first pass's size, as in A1111.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from studio.errors import RuntimeFailure, UsageError

DEFAULT_STRENGTH = 0.7  # A1111's default hires denoising strength

# studio name -> (kind, mode, antialias, A1111 label)
UPSCALERS: dict[str, tuple[str, str, bool, str]] = {
    "latent": ("latent", "bilinear", False, "Latent"),
    "latent-antialiased": ("latent", "bilinear", True, "Latent (antialiased)"),
    "latent-bicubic": ("latent", "bicubic", False, "Latent (bicubic)"),
    "latent-bicubic-antialiased": ("latent", "bicubic", True, "Latent (bicubic antialiased)"),
    "latent-nearest": ("latent", "nearest", False, "Latent (nearest)"),
    "latent-nearest-exact": ("latent", "nearest-exact", False, "Latent (nearest-exact)"),
    "lanczos": ("pixel", "lanczos", False, "Lanczos"),
    "bicubic": ("pixel", "bicubic", False, "Bicubic"),
    "nearest": ("pixel", "nearest", False, "Nearest"),
}


@dataclass(frozen=True)
class HiresSpec:
    scale: float  # the second pass's size / the first pass's
    strength: float  # img2img denoising strength of the second pass
    steps: int | None  # the second pass's steps (None: the first pass's)


def parse_hires(text: Any) -> HiresSpec | None:
    """`SCALE[:STRENGTH[:STEPS]]` -> HiresSpec; None/"" -> None."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).strip().split(":")
    hint = "e.g. --hires 2 (twice the size), --hires 1.5:0.5 (strength 0.5), --hires 2:0.6:10 (10 steps)"
    if len(parts) > 3:
        raise UsageError(f"--hires {text!r} is not SCALE[:STRENGTH[:STEPS]]", hint)
    try:
        scale = float(parts[0].lower().removesuffix("x"))
        strength = float(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_STRENGTH
        steps = int(parts[2]) if len(parts) > 2 and parts[2] else None
    except ValueError:
        raise UsageError(f"--hires {text!r} is not SCALE[:STRENGTH[:STEPS]]", hint) from None
    if not (1.0 < scale <= 8.0):
        raise UsageError(f"--hires scale {scale:g} must be more than 1 and at most 8", hint)
    if not (0.0 < strength <= 1.0):
        raise UsageError(f"--hires strength {strength:g} must be in (0, 1]", "0.3 keeps the first pass, 0.7 is A1111's default")
    if steps is not None and steps < 1:
        raise UsageError(f"--hires steps {steps} must be at least 1", hint)
    return HiresSpec(scale=scale, strength=strength, steps=steps)


def _key(text: str) -> str:
    """A1111's labels ("Latent (nearest-exact)") and studio's names ("latent-nearest-exact") alike."""
    return re.sub(r"[\s_()]+", "-", str(text).strip().lower()).strip("-")


def upscaler_kind(text: Any) -> tuple[str, str, bool, str]:
    """(kind, mode, antialias, A1111 label); kind "model" means a model the upscale task loads."""
    if text is None or str(text).strip() == "":
        return UPSCALERS["lanczos"]
    key = _key(str(text))
    if key in UPSCALERS:
        return UPSCALERS[key]
    if key in ("none",):
        raise UsageError("--hires-upscaler none is not supported", "use latent, lanczos, bicubic, nearest, or an upscaler model")
    return ("model", str(text).strip(), False, str(text).strip())


def target_size(width: int, height: int, scale: float, factor: int) -> tuple[int, int]:
    """The second pass's size: scaled, down to a multiple of the model's size step."""
    return (max(factor, int(width * scale) // factor * factor), max(factor, int(height * scale) // factor * factor))


def check_static(request: Any) -> None:
    spec = parse_hires(getattr(request, "hires", None))
    upscaler = getattr(request, "hires_upscaler", None)
    if spec is None:
        if upscaler:
            raise UsageError("--hires-upscaler applies with --hires only", "add --hires 2 (or drop --hires-upscaler)")
        return
    if request.init_image:
        raise UsageError("--hires is for text-to-image; it cannot be combined with --init",
                         "for img2img at a larger size pass --width/--height, or upscale first: studio upscale IMAGE")
    steps = spec.steps or int(request.steps)
    if int(steps * spec.strength) < 1:
        raise UsageError(f"--hires {request.hires} leaves no denoising step ({steps} steps x strength {spec.strength:g})",
                         "raise the hires steps or strength")
    upscaler_kind(upscaler)


def check_loaded(pipe: Any, request: Any) -> None:
    if parse_hires(getattr(request, "hires", None)) is None:
        return
    kind = upscaler_kind(getattr(request, "hires_upscaler", None))[0]
    if kind == "latent" and getattr(pipe, "unet", None) is None:
        raise UsageError(f"latent hires upscaling works with UNet models (SD 1.x/2.x, SDXL), not {type(pipe).__name__}",
                         "use --hires-upscaler lanczos (the default) for this model")


def first_pass_output(request: Any) -> str:
    """The output_type the first pass asks for: latents for a latent upscaler (never decoded)."""
    spec = parse_hires(getattr(request, "hires", None))
    if spec is not None and upscaler_kind(getattr(request, "hires_upscaler", None))[0] == "latent":
        return "latent"
    return "pil"


def second_pass(image_pipeline: Any, first_pipe: Any, first: Any, call: dict[str, Any], request: Any, seed: int,
                size: tuple[int, int], factor: int, progress: Any, effects: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The upscaled, repainted image, its metadata and its infotext entries. `first` is the first
    pass's output (a PIL image, or latents (1, C, h, w) for a latent upscaler); `call` the first
    pass's arguments (its prompt encodings are reused), `first_pipe` the pipeline that ran it
    (its scheduler runs the second pass too, as A1111 keeps the sampler), `effects(pipe, request)`
    the FreeU/tiling context the first pass ran in (image_features.effects, passed in: the two
    modules must not import each other)."""
    import torch

    spec = parse_hires(request.hires)
    assert spec is not None
    kind, mode, antialias, label = upscaler_kind(getattr(request, "hires_upscaler", None))
    width, height = size
    tw, th = target_size(width, height, spec.scale, factor)
    steps = spec.steps or int(request.steps)

    # 1. upscale
    meta: dict[str, Any] = {"scale": spec.scale, "strength": spec.strength, "steps": steps, "upscaler": label,
                            "first_size": [width, height], "size": [tw, th]}
    if kind == "latent":
        import torch.nn.functional as F

        vsf = int(getattr(image_pipeline.base, "vae_scale_factor", 8) or 8)
        latents = first if first.ndim == 4 else first[None]  # (1, C, h, w)
        start = F.interpolate(latents, size=(th // vsf, tw // vsf), mode=mode,
                              **({"antialias": antialias} if mode in ("bilinear", "bicubic") else {}))  # (1, C, H, W)
    elif kind == "pixel":
        from PIL import Image

        resample = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                    "nearest": Image.Resampling.NEAREST}[mode]
        start = first.resize((tw, th), resample)
    else:
        start, model_meta = _model_upscale(image_pipeline, first, (tw, th), request, seed, progress)
        meta["upscaler_model"] = model_meta
        label = model_meta["label"]

    # 2. img2img at the new size, the first pass's prompt encodings reused, no ControlNet (its
    # maps were made at the first size; the first pass already followed them)
    if getattr(request, "controls", None) and seed == getattr(request, "seed", seed):
        progress.note("the hires pass runs without ControlNet (the first pass followed it)")
    pipe = image_pipeline._pipe_for("img2img", [])
    pipe.scheduler = first_pipe.scheduler
    accepted = set(_call_params(pipe))
    second = {k: v for k, v in call.items() if k in accepted and k not in (
        "image", "control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
        "callback_on_step_end", "width", "height", "output_type", "num_inference_steps", "strength")}
    second.update(image=start, strength=spec.strength, num_inference_steps=steps, output_type="pil")
    if "width" in accepted:
        second.update(width=tw, height=th)
    handle = progress.task(f"hires x{spec.scale:g} {tw}x{th} seed {seed}", total=max(1, int(steps * spec.strength)))
    if "callback_on_step_end" in accepted:
        second["callback_on_step_end"] = progress.diffusers_callback(handle)
    try:
        with image_pipeline.device.inference(), effects(pipe, request):
            output = pipe(**second, generator=image_pipeline.device.generator(seed))
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise RuntimeFailure(f"out of memory in the hires pass at {tw}x{th}",
                             "lower --hires, or try --offload model / --precision bf16") from exc
    handle.finish()
    infotext = {"Hires upscale": f"{spec.scale:g}", "Hires upscaler": label, "Denoising strength": spec.strength}
    if spec.steps:
        infotext["Hires steps"] = spec.steps
    return output.images[0], meta, infotext


def _call_params(pipe: Any) -> list[str]:
    import inspect

    return list(inspect.signature(type(pipe).__call__).parameters)


def _model_upscale(image_pipeline: Any, image: Any, size: tuple[int, int], request: Any, seed: int,
                   progress: Any) -> tuple[Any, dict[str, Any]]:
    """Upscale with a model the `upscale` task loads (cached like any pipeline), then bring the
    result to exactly `size` with Lanczos."""
    from PIL import Image

    from studio import registry

    spec = image_pipeline.spec
    uspec = registry.resolve_model("upscale", str(request.hires_upscaler), allow_pickle=spec.allow_pickle,
                                   trust_remote_code=spec.trust_remote_code, offline=spec.offline)
    upscaler = registry.load_pipeline("upscale", uspec, image_pipeline.device, None)
    factor = size[0] / image.size[0]
    out = upscaler.upscale(image, factor, prompt=request.prompt or "", negative_prompt=request.negative_prompt or "",
                           seed=seed, progress=progress)
    if out.size != size:
        out = out.resize(size, Image.Resampling.LANCZOS)
    from studio.infotext import model_label

    meta = dict(uspec.identity())
    meta["label"] = model_label(meta) or uspec.name  # as A1111 names a model: alias, file stem or folder name
    return out, meta


def from_infotext(fields: dict[str, Any], params: dict[str, Any], notes: list[str]) -> None:
    """--hires and --hires-upscaler from A1111's Hires entries. Its `Denoising strength` is then
    the hires pass's, not an img2img strength."""
    if "Hires upscale" not in fields:
        return
    try:
        scale = float(fields["Hires upscale"])
    except (TypeError, ValueError):
        notes.append(f"Hires upscale: {fields['Hires upscale']!r} is not a number; ignored")
        return
    strength = params.pop("strength", None)
    text = f"{scale:g}:{strength if strength is not None else DEFAULT_STRENGTH:g}"
    try:
        steps = int(float(fields.get("Hires steps") or 0))
    except ValueError:
        steps = 0
    if steps:
        text += f":{steps}"
    params["hires"] = text
    label = str(fields.get("Hires upscaler") or "").strip()
    if label:
        kind = upscaler_kind(label)
        if kind[0] == "model":
            notes.append(f"Hires upscaler {label} is a model the PNG names but does not hold: "
                         "pass --hires-upscaler MODEL to use it; lanczos is used instead")
        else:
            params["hires_upscaler"] = _key(label)
