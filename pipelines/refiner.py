"""The SDXL refiner: `--refiner MODEL[:SWITCH]` (A1111's Refiner, "switch at" 0.8 by default).

SDXL was released as an ensemble of expert denoisers: the base model denoises the high-noise
part of the schedule and hands its latents to the refiner, trained on the low-noise part, which
finishes them. diffusers runs it as two calls over one schedule (its SDXL docs, "Base + refiner
model"): the base with `denoising_end=SWITCH` and `output_type="latent"`, then
StableDiffusionXLImg2ImgPipeline on the refiner's weights with `denoising_start=SWITCH` and the
latents as its image. The refiner is loaded once per process (its own VAE and second text
encoder, as the refiner repo ships them), with the same sampler as the base when --scheduler
names one, and the same seed's generator.

The infotext says what A1111 says: `Refiner: NAME [hash]` and `Refiner switch at: 0.8`.
Nothing heavy at module level; nothing here imports pipelines/image.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.errors import RuntimeFailure, UsageError
from studio.progress import quiet_libraries

if TYPE_CHECKING:
    from studio.device import DeviceManager

CARD_TASK = "refiner"
DEFAULT_SWITCH = 0.8  # A1111's default "Switch at"
# the scheduler settings that say which sampler runs (the rest of a config is the model's own)
_SAMPLER_KEYS = ("algorithm_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "solver_order")


@dataclass(frozen=True)
class RefinerSpec:
    """One `--refiner MODEL[:SWITCH]`."""

    model: str  # alias, hub id, folder or single .safetensors file of an SDXL refiner
    switch: float = DEFAULT_SWITCH  # the fraction of the schedule after which the refiner denoises

    def to_text(self) -> str:
        return f"{self.model}:{self.switch:g}"


def parse_refiner(text: Any) -> RefinerSpec | None:
    """`MODEL[:SWITCH]`; the switch is taken from the right (a number in (0, 1)), so a Windows
    path or a hub revision stays whole."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    hint = "e.g. --refiner sdxl-refiner or --refiner sdxl-refiner:0.7 (the refiner takes the last 30% of the steps)"
    model, sep, tail = text.rpartition(":")
    switch = DEFAULT_SWITCH
    if sep and model and re.fullmatch(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*", tail):
        switch = float(tail)
    else:
        model = text
    if not (0.0 < switch < 1.0):
        raise UsageError(f"--refiner switch {switch:g} must be between 0 and 1", hint)
    return RefinerSpec(model=model.strip(), switch=switch)


def check_static(request: Any) -> None:
    spec = parse_refiner(getattr(request, "refiner", None))
    if spec is None:
        return
    if request.mask_image or request.outpaint:
        raise UsageError("--refiner works with text-to-image and img2img, not inpainting",
                         "drop --refiner, or inpaint the refined image in a second run")
    steps = int(request.steps)
    # each model denoises its share of the schedule: less than one step's worth would be skipped
    if steps * spec.switch < 1 - 1e-9 or steps * (1 - spec.switch) < 1 - 1e-9:
        raise UsageError(f"--steps {steps} with the refiner switch at {spec.switch:g} leaves one of the two models "
                         f"no step ({steps * spec.switch:g} and {steps * (1 - spec.switch):g})",
                         "raise --steps (e.g. 20) or move the switch")


def check_loaded(pipe: Any, request: Any) -> None:
    if parse_refiner(getattr(request, "refiner", None)) is None:
        return
    name = type(pipe).__name__
    if "XL" not in name:
        raise UsageError(f"--refiner is for SDXL base models, not {name}",
                         "use an SDXL base (e.g. --model sdxl-base), or drop --refiner")


_REFINERS: dict[tuple, Any] = {}


def load_refiner(name: str, device: DeviceManager, *, allow_pickle: bool = False, offline: bool = False,
                 trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(StableDiffusionXLImg2ImgPipeline on the refiner's weights, its ModelSpec, its own
    scheduler), cached per process."""
    from studio import models

    spec = models.resolve(name, task=CARD_TASK, allow_pickle=allow_pickle, offline=offline,
                          trust_remote_code=trust_remote_code)
    key = (spec, device.settings)
    if key not in _REFINERS:
        from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline

        with models.loading(spec, "refiner"), quiet_libraries():
            if spec.kind == "file":
                from studio.safety import check_pickle

                check_pickle(spec.source, allow_pickle=spec.allow_pickle, what="refiner")
                pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(spec.source, dtype=device.dtype)
            else:
                location = spec.location()
                extra = {"revision": spec.revision} if spec.revision and spec.kind == "hub" and not spec.offline else {}
                config = DiffusionPipeline.load_config(location, **extra)
                if not str(config.get("_class_name", "")).startswith("StableDiffusionXL"):
                    raise UsageError(f"{name} is a {config.get('_class_name', 'model of another kind')}, not an SDXL refiner",
                                     "pass an SDXL refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0)")
                pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(location, dtype=device.dtype,
                                                                        **spec.load_kwargs(library="diffusers"))
            pipe = device.prepare(pipe)
        pipe.set_progress_bar_config(disable=True)
        _REFINERS[key] = (pipe, spec, pipe.scheduler)
    return _REFINERS[key]


def check_fits(refiner: Any, base: Any, label: str) -> None:
    """The refiner denoises the base's latents: their latent channels must agree."""
    got, want = refiner.unet.config.in_channels, base.unet.config.out_channels
    if got != want:
        raise UsageError(f"refiner {label} takes {got}-channel latents, the base makes {want}",
                         "use a refiner for this base (SDXL: stable-diffusion-xl-refiner-1.0)")


def scheduler_like(refiner: Any, default: Any, base_scheduler: Any, chosen: bool) -> Any:
    """The refiner's scheduler: its own, or with --scheduler the base's sampler on the refiner's config."""
    if not chosen:
        return default
    config = dict(default.config)
    config.update({k: v for k, v in base_scheduler.config.items() if k in _SAMPLER_KEYS})
    return type(base_scheduler).from_config(config)


def refine(refiner: Any, default_scheduler: Any, latents: Any, *, prompt: str, negative: str, request: Any,
           base_scheduler: Any, seed: int, device: DeviceManager, progress: Any, output_type: str, switch: float) -> Any:
    """The refiner's pass over the base's latents (1, C, h, w) from `switch` to the end."""
    import torch

    refiner.scheduler = scheduler_like(refiner, default_scheduler, base_scheduler, bool(request.scheduler))
    steps = int(request.steps)
    handle = progress.task(f"refiner from {switch:g} seed {seed}", total=max(1, steps - int(steps * switch)))
    call: dict[str, Any] = {"prompt": prompt, "image": latents, "num_inference_steps": steps,
                            "guidance_scale": float(request.guidance), "denoising_start": switch,
                            "output_type": output_type, "callback_on_step_end": progress.diffusers_callback(handle)}
    if negative:
        call["negative_prompt"] = negative
    try:
        with device.inference():
            out = refiner(**call, generator=device.generator(seed))
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise RuntimeFailure("out of memory in the refiner pass", "try --offload model / --precision bf16") from exc
    handle.finish()
    return out.images[0]


def infotext(meta: dict[str, Any], switch: float) -> dict[str, Any]:
    """A1111's entries: `Refiner: NAME [shorthash]` (the hash for checkpoint files) and `Refiner switch at`."""
    from studio.infotext import model_label

    label = model_label(meta) or str(meta.get("name"))
    if meta.get("kind") == "file" and meta.get("sha256"):
        label = f"{label} [{str(meta['sha256'])[:10]}]"
    return {"Refiner": label, "Refiner switch at": switch}


def from_infotext(fields: dict[str, Any], params: dict[str, Any], notes: list[str]) -> None:
    """--refiner from A1111's entries: a card studio knows by that name is used, else a note."""
    if not fields.get("Refiner"):
        return
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", str(fields["Refiner"])).strip()
    try:
        switch = float(fields.get("Refiner switch at", DEFAULT_SWITCH))
    except (TypeError, ValueError):
        switch = DEFAULT_SWITCH
    from studio.models import load_cards

    card = load_cards().get(name)
    if card is not None and card.get("task") == CARD_TASK:
        params["refiner"] = f"{name}:{switch:g}"
    else:
        notes.append(f"made with the refiner {name} (switch at {switch:g}), which the PNG does not hold: "
                     f"pass --refiner MODEL:{switch:g} to use it")
