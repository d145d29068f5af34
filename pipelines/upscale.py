"""Upscaling: `studio upscale IMAGE --model M --scale N`, and the upscaler of `studio image --hires`.

Models: diffusers' two Stable Diffusion upscalers, loaded from any diffusers folder or hub id
whose model_index.json names them: StableDiffusionUpscalePipeline (stabilityai's x4 upscaler:
text-guided, 4x per pass, `noise_level` adds invented detail) and
StableDiffusionLatentUpscalePipeline (stabilityai's x2 latent upscaler, 2x per pass). ESRGAN-style
single files (ESRGAN, Real-ESRGAN, SwinIR, ... the `.pth`/`.safetensors` upscalers A1111 and
ComfyUI users keep in models/ESRGAN) through spandrel, which recognises the architecture from the
weights (`pip install 'studio[upscale]'`; a `.pth` is a pickle: --allow-pickle). And three with no
weights: `lanczos`, `bicubic`, `nearest` (PIL). A scale the model does not make in one
pass takes as many passes as it needs and a Lanczos resize to the exact size, as A1111 brings a
4x upscaler's result to "Upscale by 2".

One output per input image, at round(width * scale) x round(height * scale), recording its input,
model, scale and seed; `studio replay` makes it again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from studio.errors import BackendUnavailable, RuntimeFailure, UsageError
from studio.progress import quiet_libraries

if TYPE_CHECKING:  # types only
    from studio.device import DeviceManager
    from studio.models import ModelSpec
    from studio.outputs import Result
    from studio.progress import Progress

BUILTIN = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "nearest": "NEAREST"}  # name -> PIL resampling
MODEL_FACTORS = {"StableDiffusionUpscalePipeline": 4, "StableDiffusionLatentUpscalePipeline": 2}
MAX_SCALE = 16.0
MAX_OUTPUT_PIXELS = 8192 * 8192  # beyond this even a PIL resize needs gigabytes


@dataclass(frozen=True)
class UpscaleRequest:
    images: tuple[str, ...] = ()  # the images to upscale, one output each
    model: str = "auto"  # SD x4 / x2 latent upscaler (alias, hub id, folder), or lanczos | bicubic | nearest
    scale: float | None = None  # output size / input size; None: the model's own factor (x4, x2; 2 without weights)
    prompt: str = ""  # what the image shows (the diffusion upscalers follow it)
    negative_prompt: str = ""  # what to steer away from (needs guidance > 1)
    steps: int = 20  # denoising steps per pass (diffusion upscalers)
    guidance: float | None = None  # classifier-free guidance; None: the pipeline's own (9)
    noise_level: int = 20  # x4 upscaler: noise added to the input first (more = more invented detail)
    seed: int | None = None  # the noise seed (every image uses it)


class UpscalePipeline:
    task = "upscale"
    request_type = UpscaleRequest

    def __init__(self, pipe: Any, spec: ModelSpec, device: DeviceManager | None, resample: str | None = None):
        self.pipe = pipe  # a diffusers upscaler, or None for a PIL resampler
        self.spec = spec
        self.device = device
        self.resample = resample  # PIL resampling name when there are no weights

    @property
    def factor(self) -> int:
        """What one pass multiplies the size by."""
        if self.pipe is None:
            return 2
        if self._is_spandrel:
            return int(self.pipe.scale)
        return MODEL_FACTORS.get(type(self.pipe).__name__, 2)

    @property
    def _is_spandrel(self) -> bool:
        return type(self.pipe).__module__.startswith("spandrel")

    # -------------------------------------------------------------- models
    @classmethod
    def resolve_model(cls, name: str, **options: Any) -> ModelSpec:
        """lanczos / bicubic / nearest need no weights; anything else resolves as any model does."""
        from studio import models

        key = str(name or "auto").strip().lower()
        if key in BUILTIN:
            options.pop("task", None)
            return models.ModelSpec(name=key, source=key, kind="builtin", task="upscale", alias=key,
                                    **{k: v for k, v in options.items() if k in ("allow_pickle", "trust_remote_code", "offline")
                                       and v is not None})
        try:
            return models.resolve(name, **options)
        except UsageError as exc:
            if key == "auto":
                raise type(exc)(exc.message, (exc.hint + "; " if exc.hint else "")
                                + "or --model lanczos (no weights)") from exc
            raise

    @classmethod
    def load(cls, spec: ModelSpec, device: DeviceManager) -> UpscalePipeline:
        from studio import models

        if spec.kind == "builtin":
            return cls(None, spec, device, BUILTIN[spec.source])
        if spec.kind == "file":
            return cls(_load_spandrel(spec, device), spec, device)
        import diffusers

        with models.loading(spec, "upscaler"), quiet_libraries():
            location = spec.location()
            config = diffusers.DiffusionPipeline.load_config(location)
            name = str(config.get("_class_name", ""))
            if name not in MODEL_FACTORS:
                raise UsageError(f"{spec.alias or spec.name} is a {name or 'non-diffusers'} model, not an upscaler",
                                 "use the SD x4 upscaler, the SD x2 latent upscaler, or --model lanczos")
            pipe = getattr(diffusers, name).from_pretrained(location, dtype=device.dtype, **spec.load_kwargs(library="diffusers"))
            pipe = device.prepare(pipe)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, spec, device)

    # -------------------------------------------------------------- checks
    @classmethod
    def check_request(cls, request: UpscaleRequest, spec: ModelSpec | None, device: DeviceManager | None) -> None:
        if not request.images:
            raise UsageError("no image to upscale", "e.g. studio upscale photo.png --scale 2")
        if request.scale is not None and not (1.0 < float(request.scale) <= MAX_SCALE):
            raise UsageError(f"--scale {request.scale} must be more than 1 and at most {MAX_SCALE:g}",
                             "e.g. --scale 2 (twice the width and height)")
        if int(request.steps) < 1:
            raise UsageError(f"--steps {request.steps} must be at least 1", "e.g. --steps 20")
        if request.guidance is not None and float(request.guidance) < 0:
            raise UsageError(f"--guidance {request.guidance} must be >= 0", "e.g. --guidance 7")
        if not (0 <= int(request.noise_level) <= 1000):
            raise UsageError(f"--noise-level {request.noise_level} must be 0-1000", "the x4 upscaler's default is 20")
        for path in request.images:
            p = Path(str(path)).expanduser()
            if not p.is_file():
                from studio.errors import InputFileError

                raise InputFileError(f"image {path} does not exist" if not p.exists() else f"image {path} is not a file",
                                     "check the path")

    def check_inputs(self, request: UpscaleRequest) -> None:
        self.check_request(request, self.spec, None)
        max_noise = getattr(getattr(self.pipe, "config", None), "max_noise_level", None)
        if max_noise is not None and int(request.noise_level) > int(max_noise):
            raise UsageError(f"--noise-level {request.noise_level} is above this upscaler's {max_noise}",
                             f"use --noise-level 0-{max_noise}")

    # -------------------------------------------------------------- run
    def run(self, request: UpscaleRequest, progress: Progress) -> Iterator[Result]:
        from studio.outputs import Result
        from studio.pipeline import load_image

        # 1. check inputs
        self.check_inputs(request)
        scale = float(request.scale) if request.scale is not None else float(self.factor)
        for path in request.images:
            # 2. the input
            image = load_image(path, mode="RGB", what="image")
            w, h = image.size
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            if target[0] * target[1] > MAX_OUTPUT_PIXELS:
                raise UsageError(f"{Path(path).name} at x{scale:g} would be {target[0]}x{target[1]}",
                                 f"at most {MAX_OUTPUT_PIXELS // 10**6} megapixels: lower --scale")
            # 3. upscale
            out = self.upscale(image, scale, prompt=request.prompt, negative_prompt=request.negative_prompt,
                               seed=int(request.seed or 0), progress=progress, steps=int(request.steps),
                               guidance=request.guidance, noise_level=int(request.noise_level), target=target)
            # 4. the Result
            params = dataclasses.asdict(request)
            # params are the request for this one output (what replay runs); sizes go beside them
            params.update(images=[str(Path(path).expanduser().resolve())], scale=scale)
            kind = (self.pipe.architecture.name if self._is_spandrel else type(self.pipe).__name__) if self.pipe is not None else self.spec.source
            extra = {"upscaler": kind,
                     "passes": self._passes(scale), "input_size": [w, h], "size": list(target)}
            yield Result(kind="image", value=out, params=params, extra=extra)

    def _passes(self, scale: float) -> int:
        if self.pipe is None:
            return 1
        return max(1, math.ceil(math.log(scale) / math.log(self.factor) - 1e-9))

    def upscale(self, image: Any, scale: float, *, prompt: str = "", negative_prompt: str = "", seed: int = 0,
                progress: Any = None, steps: int = 20, guidance: float | None = None, noise_level: int = 20,
                target: tuple[int, int] | None = None) -> Any:
        """`image` (PIL) made `scale` times larger: model passes, then a Lanczos resize to the exact size."""
        import torch
        from PIL import Image

        w, h = image.size
        target = target or (max(1, round(w * scale)), max(1, round(h * scale)))
        if self.pipe is None:
            return image.resize(target, getattr(Image.Resampling, self.resample or "LANCZOS"))
        out = image
        if self._is_spandrel:
            return self._upscale_spandrel(image, scale, target, progress)
        for i in range(self._passes(scale)):
            # the upscalers' UNets and VAEs work on multiples of 8
            size = (max(8, out.size[0] // 8 * 8), max(8, out.size[1] // 8 * 8))
            if out.size != size:
                out = out.resize(size, Image.Resampling.LANCZOS)
            call: dict[str, Any] = {"prompt": prompt or "", "image": out, "num_inference_steps": steps,
                                    "output_type": "pil"}
            if negative_prompt:
                call["negative_prompt"] = negative_prompt
            if guidance is not None:
                call["guidance_scale"] = float(guidance)
            if type(self.pipe).__name__ == "StableDiffusionUpscalePipeline":
                call["noise_level"] = noise_level
            handle = progress.task(f"upscale pass {i + 1} x{self.factor} from {size[0]}x{size[1]}", total=steps) if progress else None
            if handle is not None:
                call["callback"] = lambda *_: handle.advance()
                call["callback_steps"] = 1
            try:
                with self.device.inference():
                    out = self.pipe(**call, generator=self.device.generator(seed)).images[0]
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise RuntimeFailure(f"out of memory upscaling {size[0]}x{size[1]}",
                                     "upscale a smaller image, or try --offload model / --precision bf16") from exc
            if handle is not None:
                handle.finish()
        if out.size != target:
            out = out.resize(target, Image.Resampling.LANCZOS)
        return out

    def _upscale_spandrel(self, image: Any, scale: float, target: tuple[int, int], progress: Any) -> Any:
        """An ESRGAN-style model: the whole image at once per pass (one forward, no noise), as
        many passes as the scale needs, then Lanczos to the exact size."""
        import numpy as np
        import torch
        from PIL import Image

        out = image
        passes = self._passes(scale)
        handle = progress.task(f"upscale x{self.factor} ({self.pipe.architecture.name})", total=passes) if progress else None
        for _ in range(passes):
            x = torch.from_numpy(np.asarray(out.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
            try:
                with torch.inference_mode():
                    y = self.pipe(x.to(self.device.device, self.pipe.dtype)).float().clamp(0, 1)  # (1, 3, H*f, W*f)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise RuntimeFailure(f"out of memory upscaling {out.size[0]}x{out.size[1]}",
                                     "upscale a smaller image") from exc
            out = Image.fromarray((y[0].permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8))
            if handle is not None:
                handle.advance()
        if handle is not None:
            handle.finish()
        if out.size != target:
            out = out.resize(target, Image.Resampling.LANCZOS)
        return out


def _load_spandrel(spec: ModelSpec, device: DeviceManager) -> Any:
    """An ESRGAN-style single file through spandrel (it reads the architecture and scale from the
    weights' names and shapes). The pickle gate runs first: spandrel would torch.load a .pth."""
    from studio.safety import check_pickle

    path = Path(spec.source)
    check_pickle(path, allow_pickle=spec.allow_pickle, what="upscaler")
    try:
        import spandrel
    except ImportError as exc:
        raise BackendUnavailable(f"{path.name} looks like an ESRGAN-style upscaler; reading it needs spandrel",
                                 "pip install 'studio[upscale]' (or pip install spandrel)") from exc
    try:
        descriptor = spandrel.ModelLoader().load_from_file(str(path))
    except Exception as exc:  # spandrel's UnsupportedModelError and the readers' errors
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path.name} is not an upscaler spandrel knows ({text})",
                         "pass an ESRGAN/Real-ESRGAN/SwinIR-style file, a diffusers upscaler folder, or --model lanczos") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR" or descriptor.scale < 2:
        raise UsageError(f"{path.name} is a {descriptor.architecture.name} {descriptor.purpose} model, not an upscaler",
                         "pass a super-resolution model (ESRGAN 4x, ...)")
    descriptor.to(device.device).eval()
    return descriptor
