"""Images: text-to-image, img2img, inpaint/outpaint, ControlNet, LoRA, prompt weighting and
cross-attention maps, on diffusers.

One load serves every mode: the text-to-image pipeline is loaded once (AutoPipelineForText2Image,
or `from_single_file` for one .safetensors checkpoint) and the img2img / inpaint / ControlNet
pipelines are made from it with `AutoPipeline*.from_pipe`, which shares the weights. Whatever the
family (SD 1.x/2.x, SDXL, SD3, Flux), diffusers' auto classes pick the pipeline class.

Reproducibility: each image gets its own CPU generator seeded with its seed (seed, seed+1, ... or
--seeds), and is generated alone, so any image of a batch replays bit for bit from its metadata.
A prompt without emphasis goes to diffusers verbatim: studio's output then equals a plain
diffusers script's (tests/test_image.py checks max pixel difference 0).

Nothing heavy is imported at module level: the CLI reads SCHEDULERS (and resolves A1111 sampler
labels) without importing torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from studio.errors import BackendUnavailable, InputFileError, RuntimeFailure, UsageError
from studio.pipeline import as_tuple as _as_tuple
from studio.progress import quiet_libraries


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.models import ModelSpec
    from studio.outputs import Result
    from studio.progress import Progress


# ----------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class ImageRequest:
    prompt: str = ""  # what to draw; A1111 emphasis (word:1.3) (word) [word] unless weighting is off
    negative_prompt: str = ""  # what to steer away from (needs guidance > 1 on most models)
    model: str = "auto"  # alias, hub id[@revision], diffusers folder or single .safetensors file
    seed: int | None = None  # first seed; image i of --num N uses seed + i (A1111's batch convention)
    seeds: tuple[int, ...] | None = None  # explicit seeds, one image each (instead of seed + num_outputs)
    num_outputs: int = 1  # how many images (one per seed)
    steps: int = 20  # denoising steps (img2img/inpaint run about steps * strength of them)
    guidance: float = 7.0  # classifier-free guidance scale; 0 or 1 turns it off (turbo models)
    width: int | None = None  # pixels; None: the init image's size, else the model's default
    height: int | None = None  # pixels; same rule as width
    scheduler: str | None = None  # studio name or A1111 label (see SCHEDULERS), any case; None keeps the model's own
    init_image: str | None = None  # img2img / inpaint source image
    strength: float | None = None  # how much of the init image to repaint; None: 0.75 img2img, 1.0 inpaint
    mask_image: str | None = None  # inpaint mask: white = repaint, black = keep
    outpaint: str | None = None  # "left:128,right:64,top:0,bottom:32": pad the init image and paint the border
    controls: tuple[str, ...] = ()  # ControlNet inputs, "TYPE:IMAGE[:SCALE[:START:END]]" each
    control_models: tuple[str, ...] = ()  # ControlNet per control, same order ("auto" = the card for TYPE)
    adapters: tuple[str, ...] = ()  # LoRAs, "PATH_OR_ID[:SCALE]" each
    fuse_adapters: bool = False  # merge the LoRAs into the weights (faster steps, equal up to rounding)
    weighting: bool = True  # parse A1111 emphasis through compel; False passes the prompt verbatim
    attention_maps: bool = False  # also write per-word cross-attention heatmaps and a contact sheet
    # A1111/ComfyUI everyday features (pipelines/image_features.py, hires.py, xy.py)
    hires: str | None = None  # hires fix "SCALE[:STRENGTH[:STEPS]]": generate, upscale, img2img at the new size
    hires_upscaler: str | None = None  # latent | lanczos (default) | bicubic | nearest | an upscaler model
    embeddings: tuple[str, ...] = ()  # textual inversion embeddings, "FILE_OR_ID[:TOKEN]" each (token: the file's name)
    clip_skip: int | None = None  # A1111's Clip skip: 2 = the text encoder's penultimate layer; None or 1 = the last
    freeu: bool | str = False  # FreeU: True = the model family's values, or "S1,S2,B1,B2"
    tile: bool | str = False  # seamless tiling (circular padding): True (both axes), "x" or "y"
    mask_blur: int | None = None  # blur the inpaint mask by this many pixels (A1111's Mask blur)
    xy: tuple[str, ...] = ()  # X/Y plot axes "NAME=V1,V2,..." (one or two): each combination, then a contact sheet
    # adapters, refiner, regions (pipelines/image_extras.py: ip_adapter.py, t2i_adapter.py, refiner.py, regions.py)
    ip_adapter: str | None = None  # IP-Adapter reference image "IMAGE[:SCALE]": the image steers as a prompt does
    ip_adapter_model: str | None = None  # the IP-Adapter (card, folder or file); None: the card for the model's family
    t2i_adapters: tuple[str, ...] = ()  # T2I-Adapter inputs, "TYPE:IMAGE[:SCALE]" each (types as --control)
    t2i_adapter_models: tuple[str, ...] = ()  # T2I-Adapter per input, same order ("auto" = the card for TYPE)
    refiner: str | None = None  # SDXL refiner "MODEL[:SWITCH]": it denoises the steps after SWITCH (0.8)
    regions: tuple[str, ...] = ()  # regional prompts "PROMPT@x0,y0,x1,y1" (pixels or fractions) or "PROMPT@MASK"


# ----------------------------------------------------------------------------- schedulers
# name -> (diffusers class, config overrides, A1111 sampler label). The classes and overrides
# follow diffusers' own A1111 table (docs: api/schedulers/overview, "DPM++ 2M Karras" =
# DPMSolverMultistepScheduler + use_karras_sigmas, "DPM++ SDE" = DPMSolverSinglestepScheduler, ...);
# the labels are A1111's own (modules/sd_samplers_kdiffusion.py samplers_k_diffusion,
# sd_samplers_timesteps.py, sd_samplers_lcm.py). A1111 (1.9+) writes the noise schedule apart,
# as `Schedule type` (a1111_schedule below). "flow" classes serve flow-matching models (SD3,
# Flux), labelled as Forge labels them; DDPM, DEIS and TCD have no A1111 sampler and keep their
# diffusers names. Old studio names (dpm++_2s = "DPM++ SDE") are kept so old outputs replay.
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}, "Heun"),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}, "LMS"),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS"),
    "dpm2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}, "DPM2"),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "DPM2"),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}, "DPM2 a"),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, "DPM2 a"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M"),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M SDE"),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M SDE"),
    "dpm++_2m_sde_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False,
                                                                  "use_exponential_sigmas": True}, "DPM++ 2M SDE"),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}, "DPM++ SDE"),
    "dpm++_2s_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "DPM++ SDE"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "deis": ("DEISMultistepScheduler", {}, "DEIS"),
    "lcm": ("LCMScheduler", {}, "LCM"),
    "tcd": ("TCDScheduler", {}, "TCD"),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}, "Heun"),
}

# A1111's schedule when `Schedule type` is Automatic (the `scheduler` option of its sampler table);
# samplers not named here use the model's own sigmas. Needed both ways: "DPM++ 2M" pasted from
# A1111 means Karras, and studio's plain dpm++_2m must say "Uniform" to mean the model's sigmas.
A1111_DEFAULT_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                          "DPM++ 2M SDE Heun": "Exponential", "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential",
                          "DPM2": "Karras", "DPM2 a": "Karras", "Restart": "Karras"}
# A1111's schedule labels (modules/sd_schedulers.py) by the diffusers config switch that makes them
_SIGMA_SCHEDULES = (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"), ("use_beta_sigmas", "Beta"))
A1111_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")


def scheduler_family(class_name: str) -> str:
    return "flow" if class_name.startswith("FlowMatch") else "diffusion"


def a1111_schedule(class_name: str, config: dict[str, Any], sampler: str) -> str:
    """The `Schedule type` A1111 would write for this scheduler config and sampler label: the
    sigma schedule it uses, or Automatic where that is the sampler's own (as A1111's UI writes)."""
    for key, label in _SIGMA_SCHEDULES:
        if config.get(key):
            return label
    if scheduler_family(class_name) == "flow":
        return "Simple"  # Forge's label for the flow models' shifted linear sigmas
    if config.get("timestep_spacing") == "trailing":
        return "SGM Uniform"  # diffusers' table: sgm_uniform = timestep_spacing="trailing"
    return "Uniform" if sampler in A1111_DEFAULT_SCHEDULE else "Automatic"


def a1111_sampler(scheduler: Any) -> dict[str, str]:
    """{"sampler", "schedule"}: A1111's labels for a live diffusers scheduler (the model's own
    default included), so every image's infotext names a sampler A1111 knows."""
    class_name = type(scheduler).__name__
    config = dict(getattr(scheduler, "config", {}) or {})
    sampler = None
    for _, (cls, overrides, label) in SCHEDULERS.items():
        if cls == class_name and overrides.get("algorithm_type", config.get("algorithm_type")) == config.get("algorithm_type"):
            sampler = label
            break
    if sampler is None and class_name == "DPMSolverMultistepScheduler":  # dpmsolver / sde-dpmsolver (not ++)
        sampler = "DPM++ 2M SDE" if str(config.get("algorithm_type", "")).startswith("sde") else "DPM++ 2M"
    sampler = sampler or class_name.removesuffix("Scheduler")
    return {"sampler": sampler, "schedule": a1111_schedule(class_name, config, sampler)}


def scheduler_labels(name: str) -> tuple[str, str]:
    """(A1111 sampler, Schedule type) of a studio scheduler name, as --list-schedulers shows them."""
    cls, overrides, label = SCHEDULERS[name]
    return label, a1111_schedule(cls, overrides, label)


def _schedule_of(name: str) -> str:
    cls, overrides, _ = SCHEDULERS[name]
    return next((label for key, label in _SIGMA_SCHEDULES if overrides.get(key)), "")


def split_a1111_label(text: str) -> tuple[str, str]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"): the pre-1.9 A1111 labels carried the schedule
    in the sampler name (A1111 splits them the same way, sd_samplers.get_sampler_and_scheduler)."""
    text = " ".join(str(text).split())
    for schedule in sorted(A1111_SCHEDULES, key=len, reverse=True):
        if text.lower().endswith(" " + schedule.lower()):
            return text[: -len(schedule) - 1], schedule
    return text, "Automatic"


def resolve_scheduler(text: str, family: str | None = None) -> tuple[str | None, list[str]]:
    """A studio name ("dpm++_2m_karras") or an A1111 label ("DPM++ 2M Karras", "dpm++ 2m",
    "Euler a", "DPM++ 2M SDE Exponential"), any case -> (studio name, notes). family ("diffusion"
    or "flow") picks between same-labelled samplers (A1111's "Euler" is euler on SD, flow_euler
    on Flux); None prefers the diffusion one. (None, notes) when nothing matches."""
    key = str(text).strip()
    sampler, schedule = split_a1111_label(key)
    # studio's lowercase names meet A1111's labels in a few words ("dpm2" is studio's plain DPM2,
    # "DPM2" is A1111's, which defaults to Karras): a name typed as studio spells it is studio's,
    # a label typed as A1111 spells it is A1111's, anything else in any case is whichever exists
    if key in SCHEDULERS or (key.lower() in SCHEDULERS and _canonical_sampler(sampler) != sampler):
        return key.lower(), []
    wanted = A1111_DEFAULT_SCHEDULE.get(_canonical_sampler(sampler) or "", "") if schedule == "Automatic" else schedule
    names = [n for n, (cls, _, label) in SCHEDULERS.items() if label.lower() == sampler.lower()]
    if not names:
        return None, [f"sampler {sampler!r} has no diffusers counterpart in studio"]
    if family is not None:
        names = [n for n in names if scheduler_family(SCHEDULERS[n][0]) == family] or names
    else:
        names = sorted(names, key=lambda n: scheduler_family(SCHEDULERS[n][0]) == "flow")
    for name in names:
        if _schedule_of(name) == wanted or (not _schedule_of(name) and wanted in ("", "Uniform", "Automatic", "Normal",
                                                                               "Simple", "SGM Uniform")):
            return name, []
    plain = next((n for n in names if not _schedule_of(n)), names[0])
    return plain, [f"schedule type {schedule} of {sampler} is not in studio's table; used {plain}"]


def _canonical_sampler(sampler: str) -> str | None:
    known = {label.lower(): label for _, _, label in SCHEDULERS.values()} | {s.lower(): s for s in A1111_DEFAULT_SCHEDULE}
    return known.get(sampler.lower())


def scheduler_name(text: str, current: Any) -> str:
    """The studio name that --scheduler TEXT means for this model (its family), or a UsageError."""
    family = scheduler_family(type(current).__name__)
    name, _ = resolve_scheduler(text, family)
    if name is None:
        raise UsageError(f"unknown scheduler {text!r}",
                         "`studio image --list-schedulers` lists studio's names and A1111's labels (either works)")
    return name


# infotext keys params_from_infotext turns into request fields (the rest are named in a note)
_INFOTEXT_USED = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Model",
                  "Model hash", "Lora hashes", "Distilled CFG Scale"}


def params_from_infotext(recipe: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """ImageRequest fields from A1111/Forge infotext or a simple ComfyUI graph, as
    studio/infotext.py parsed it ({"prompt", "negative_prompt", "fields"}), and notes for what
    does not carry over: LoRAs and ControlNets (their files are not in the PNG), the model (named,
    not included), samplers diffusers lacks, and every other field (ignored, named). The
    denoising strength comes back as "strength" and only means something with an init image."""
    from studio.infotext import CONTROLNET_MODULES, parse_controlnet_unit, split_lora_tags

    fields = dict(recipe.get("fields") or {})
    notes: list[str] = []
    prompt, loras = split_lora_tags(str(recipe.get("prompt") or ""))
    params: dict[str, Any] = {"prompt": prompt, "negative_prompt": str(recipe.get("negative_prompt") or "")}
    for name, scale in loras:
        notes.append(f"the prompt names LoRA {name} at {scale:g}: pass --lora FILE:{scale:g} to use it")

    def number(key: str, kind: type, field: str) -> None:
        if key in fields:
            try:
                params[field] = kind(float(fields[key])) if kind is int else kind(fields[key])
            except ValueError:
                notes.append(f"{key}: {fields[key]!r} is not a number; ignored")

    number("Steps", int, "steps")
    number("CFG scale", float, "guidance")
    number("Seed", int, "seed")
    number("Denoising strength", float, "strength")
    if "Distilled CFG Scale" in fields:
        # Forge's Flux infotext: "CFG scale: 1" (no true CFG) and the distilled guidance, which is
        # what diffusers' FluxPipeline takes as guidance_scale
        cfg = fields.get("CFG scale")
        number("Distilled CFG Scale", float, "guidance")
        notes.append(f"Distilled CFG Scale {fields['Distilled CFG Scale']} is studio's --guidance for Flux"
                     + (f" (CFG scale {cfg} not used)" if cfg is not None else ""))
    if "Size" in fields:
        m = re.match(r"^\s*(\d+)\s*x\s*(\d+)\s*$", str(fields["Size"]))
        if m:
            params["width"], params["height"] = int(m.group(1)), int(m.group(2))
        else:
            notes.append(f"Size: {fields['Size']!r} is not WIDTHxHEIGHT; ignored")
    if fields.get("Sampler"):
        schedule = str(fields.get("Schedule type") or "Automatic")
        label = str(fields["Sampler"]) if schedule == "Automatic" else f"{fields['Sampler']} {schedule}"
        name, why = resolve_scheduler(label)
        if name is None:
            notes.append(f"{why[0]}; the model's own sampler is used")
        else:
            params["scheduler"] = label  # the pipeline picks the entry that fits the model (Euler on Flux: flow_euler)
            notes.extend(why)
    from studio.pipelines.image_extras import from_infotext as extras_from_infotext

    extras_from_infotext(fields, params, notes)  # refiner, IP-Adapter and T2I-Adapter units (taken out of fields)
    for key in sorted(k for k in fields if re.fullmatch(r"ControlNet \d+", k)):
        unit = parse_controlnet_unit(fields[key])
        module = unit.get("Module", "?")
        kind = next((t for t, m in CONTROLNET_MODULES.items() if m == module), None) or module.split("_")[0]
        notes.append(f"{key} ({module}, {unit.get('Model', '?')}, weight {unit.get('Weight', '1')}) is not applied: "
                     f"pass --control {kind}:IMAGE:{unit.get('Weight', '1')} and --control-model")
    from studio.pipelines.image_features import INFOTEXT_KEYS, features_from_infotext

    features_from_infotext(fields, params, notes)  # clip skip, tiling, mask blur, FreeU, hires, embeddings
    ignored = [k for k in fields if k not in _INFOTEXT_USED | INFOTEXT_KEYS and not re.fullmatch(r"ControlNet \d+", k)]
    if ignored:
        notes.append(f"ignored (no studio setting): {', '.join(ignored)}")
    return params, notes


def make_scheduler(name: str, current: Any) -> Any:
    """A fresh scheduler of `name`'s class from the model's own scheduler config (so beta schedule,
    prediction type and timestep spacing stay the model's). `name` may be an A1111 label."""
    import diffusers

    name = scheduler_name(name, current)
    class_name, overrides, _ = SCHEDULERS[name]
    base = type(current).__name__
    if scheduler_family(class_name) != scheduler_family(base):
        fits = [n for n, (c, _, _) in SCHEDULERS.items() if scheduler_family(c) == scheduler_family(base)]
        raise UsageError(f"scheduler {name} does not fit this model (its own is {base}, a "
                         f"{scheduler_family(base)} sampler)", f"use one of: {', '.join(fits)}")
    cls = getattr(diffusers, class_name)
    if cls.__module__.startswith("diffusers.utils.dummy_"):  # diffusers' placeholder for a missing backend
        missing = cls.__module__.removeprefix("diffusers.utils.dummy_").removesuffix("_objects").split("_and_")
        extra = [m for m in missing if m != "torch"]
        raise BackendUnavailable(f"the {name} sampler needs {', '.join(extra)}, which is not installed",
                                 f"pip install {' '.join(extra)}, or pick another --scheduler")
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config(current.config, **{k: v for k, v in overrides.items() if k in accepted})


# ----------------------------------------------------------------------------- prompt weighting
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """A1111 emphasis -> [(text, weight)]: (x) x1.1, ((x)) x1.21, (x:1.5) x1.5, [x] /1.1, nested
    brackets multiply, \\( \\) \\[ \\] are literal, an unclosed bracket runs to the end (as in A1111).
    Written here because compel's own syntax differs ((x)1.5, x++) and A1111's parser is AGPL."""
    chunks: list[list[Any]] = []  # [text, weight]
    stack: list[tuple[str, int]] = []  # open brackets: (kind, index of the first chunk inside)
    buf: list[str] = []

    def flush() -> None:
        if buf:
            chunks.append(["".join(buf), 1.0])
            buf.clear()

    def scale(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt):
            buf.append(prompt[i + 1])
            i += 2
            continue
        if c in "([":
            flush()
            stack.append((c, len(chunks)))
        elif c == ":" and stack and stack[-1][0] == "(" and (m := _WEIGHT.match(prompt, i)):
            flush()
            _, start = stack.pop()
            scale(start, float(m.group(1)))
            i = m.end()
            continue
        elif c == ")" and stack and stack[-1][0] == "(":
            flush()
            scale(stack.pop()[1], 1.1)
        elif c == "]" and stack and stack[-1][0] == "[":
            flush()
            scale(stack.pop()[1], 1 / 1.1)
        else:
            buf.append(c)
        i += 1
    flush()
    for kind, start in stack:  # unclosed brackets apply to the rest of the prompt
        scale(start, 1.1 if kind == "(" else 1 / 1.1)
    merged: list[tuple[str, float]] = []
    for text, weight in chunks:
        weight = round(weight, 6)
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged


def plain_text(prompt: str) -> str:
    """The prompt without emphasis syntax (what the text encoder's tokens spell)."""
    return "".join(text for text, _ in parse_weighted(prompt))


def is_weighted(prompt: str) -> bool:
    return any(weight != 1.0 for _, weight in parse_weighted(prompt))


def _a1111_compel_class() -> type:
    """compel's Compel, reading A1111 syntax: its embedding machinery (weights applied by
    blending with the prompt minus the word, long prompts in 75-token chunks), our parser."""
    from compel import Compel
    from compel.prompt_parser import Conjunction, FlattenedPrompt

    class A1111Compel(Compel):
        @classmethod
        def parse_prompt_string(cls, prompt_string: str) -> Conjunction:
            parts = parse_weighted(prompt_string) or [("", 1.0)]
            return Conjunction([FlattenedPrompt(list(parts))])

        def build_conditioning_tensor(self, text: str, return_tokenization: bool = False) -> Any:
            conjunction = self.parse_prompt_string(text)
            conditioning, tokenization, _ = self.build_conditioning_tensor_for_conjunction(
                conjunction, return_tokenization=True)
            out: list[Any] = [conditioning]
            if return_tokenization:
                out.append(tokenization)
            if self.requires_pooled:
                # the pooled vector from the text without the bracket syntax (compel would pass it raw)
                out.append(self.conditioning_provider.get_pooled_embeddings([plain_text(text)], device=self.device))
            return tuple(out) if len(out) > 1 else conditioning

    return A1111Compel


def encode_weighted(pipe: Any, prompt: str, negative: str) -> dict[str, Any]:
    """prompt_embeds (and SDXL's pooled embeds) for a weighted prompt and its negative."""
    import torch
    from compel import ReturnedEmbeddingsType

    Compel = _a1111_compel_class()
    name = type(pipe).__name__
    if "XL" in name and getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "text_encoder", None) is not None:
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED  # what SDXL's UNet was trained on
        c1 = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, returned_embeddings_type=kind,
                    truncate_long_prompts=False)
        c2 = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, returned_embeddings_type=kind,
                    truncate_long_prompts=False, requires_pooled=True)
        left = c1([prompt, negative])  # (2, T, D1)
        right, pooled = c2([prompt, negative])  # (2, T, D2), (2, P)
        if left.shape[1] != right.shape[1]:
            raise RuntimeFailure("the two SDXL tokenizers split this prompt differently", "pass --no-weighting")
        embeds = torch.cat([left, right], dim=-1)  # (2, T, D1 + D2)
        out = {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:],
               "pooled_prompt_embeds": pooled[:1], "negative_pooled_prompt_embeds": pooled[1:]}
        if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            # what SDXL's own encode_prompt does for an empty negative prompt
            out["negative_prompt_embeds"] = out["negative_prompt_embeds"].new_zeros(out["negative_prompt_embeds"].shape)
            out["negative_pooled_prompt_embeds"] = out["negative_pooled_prompt_embeds"].new_zeros(out["negative_pooled_prompt_embeds"].shape)
        return out
    if name.startswith("StableDiffusion") and "3" not in name and getattr(pipe, "text_encoder", None) is not None:
        compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)
        embeds = compel([prompt, negative])  # (2, T, D), padded to one length
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
    raise UsageError(f"prompt weighting ((word:1.3), [word]) works with SD 1.x/2.x and SDXL, not {name}",
                     "pass --no-weighting to send the prompt verbatim")


# ----------------------------------------------------------------------------- input parsing
def parse_outpaint(text: str) -> dict[str, int]:
    """"left:128,right:64" -> {"left": 128, "right": 64, "top": 0, "bottom": 0}; "all:64" pads every side."""
    pads = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        side, sep, value = part.partition(":")
        if not sep or side not in (*pads, "all") or not value.isdigit():
            raise UsageError(f"--outpaint {text!r} is not SIDE:PIXELS[,SIDE:PIXELS...]",
                             "sides: left, right, top, bottom, all; e.g. --outpaint left:128,right:64")
        for key in (pads if side == "all" else [side]):
            pads[key] = int(value)
    if not any(pads.values()):
        raise UsageError(f"--outpaint {text!r} pads nothing", "give at least one side more than 0 pixels")
    return pads


def _check_file(path: str | None, what: str) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise InputFileError(f"{what} {path} does not exist", "check the path")
    if p.is_dir():
        raise InputFileError(f"{what} {path} is a folder", "pass an image file")


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


# ----------------------------------------------------------------------------- checks before loading
def _check_static(request: ImageRequest, factor: int) -> None:
    """The request's own ranges and combinations, and sizes as multiples of `factor`: nothing
    here needs the weights, so the engine runs it before they load (check_request)."""
    if not str(request.prompt or "").strip() and not str(request.negative_prompt or "").strip():
        raise UsageError("the prompt is empty", 'describe the image, e.g. studio image "a lighthouse at dusk"')
    if request.steps is None or int(request.steps) < 1:
        raise UsageError(f"--steps {request.steps} must be at least 1", "e.g. --steps 20 (turbo models: 1-4)")
    if request.guidance is None or float(request.guidance) < 0:
        raise UsageError(f"--guidance {request.guidance} must be >= 0", "e.g. --guidance 7 (turbo models: 0)")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and (int(value) < factor or int(value) % factor):
            lower = max(factor, int(value) - int(value) % factor)
            raise UsageError(f"--{name} {value} is not a multiple of {factor} (this model's size step)",
                             f"use --{name} {lower} or {lower + factor}")
    seeds = _as_tuple(request.seeds)
    if int(request.num_outputs or 0) < 1:
        raise UsageError(f"--num {request.num_outputs} must be at least 1", "e.g. --num 4")
    if seeds and request.num_outputs not in (1, len(seeds)):
        raise UsageError(f"--num {request.num_outputs} and --seeds ({len(seeds)} seeds) disagree",
                         "--seeds makes one image per seed; drop --num")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))} must be whole numbers >= 0", "e.g. --seeds 1,2,3")
    if request.strength is not None and not (0.0 < float(request.strength) <= 1.0):
        raise UsageError(f"--strength {request.strength} must be in (0, 1]",
                         "0.3 keeps most of the init image, 1.0 repaints it fully")
    if (request.mask_image or request.outpaint) and not request.init_image:
        raise UsageError("--mask and --outpaint need an --init image", "pass --init IMAGE")
    if request.mask_image and request.outpaint:
        raise UsageError("--mask and --outpaint cannot be combined", "outpaint makes its own mask from the padding")
    if request.strength is not None and not request.init_image:
        raise UsageError("--strength applies to --init images only", "add --init IMAGE, or drop --strength")
    if request.outpaint:
        pads = parse_outpaint(request.outpaint)
        bad = {k: v for k, v in pads.items() if v % factor}
        if bad:
            side, value = next(iter(bad.items()))
            raise UsageError(f"--outpaint {side}:{value} is not a multiple of {factor}",
                             f"use {side}:{value - value % factor or factor}")
    from studio.pipelines import image_features as features

    if not features.is_folder(request.init_image):  # a folder of inputs is checked by features.check_static
        _check_file(request.init_image, "init image")
        _check_file(request.mask_image, "mask image")
    if request.init_image:
        strength = float(request.strength if request.strength is not None else ImagePipeline._mode_strength(request))
        if int(int(request.steps) * strength) < 1:
            raise UsageError(f"--steps {request.steps} with --strength {strength:g} leaves no denoising step",
                             "raise --steps or --strength")
    from studio.adapters.lora import parse_lora
    from studio.pipelines.control import parse_control

    controls = [parse_control(c) for c in _as_tuple(request.controls)]
    for c in controls:
        _check_file(c.image, f"control image ({c.type})")
    models_ = _as_tuple(request.control_models)
    if models_ and len(models_) != len(controls):
        raise UsageError(f"{len(models_)} --control-model for {len(controls)} --control",
                         "give one --control-model per --control, in the same order (auto = the default for TYPE)")
    for text in _as_tuple(request.adapters):
        parse_lora(text)
    features.check_static(request, lambda cell: _check_static(cell, factor))
    from studio.pipelines import image_extras

    image_extras.check_static(request)  # IP-Adapter, T2I-Adapter, refiner, regions


@dataclass(frozen=True)
class _ImageProfile:
    """What the model's config files say about sizes and memory, read before its weights load
    (studio.limits.read_config: local folders and cached snapshots only). A single-file
    checkpoint, or a hub model not downloaded yet, gets SD's numbers; check_inputs re-checks sizes
    on the loaded model."""

    factor: int = 8  # width/height multiple (VAE downscale x transformer patch)
    scale: int = 8  # VAE downscale: latent pixels = pixels / scale**2
    default: tuple[int, int] = (512, 512)  # the model's native size
    vae: tuple[int, int] = (128, 256)  # the decoder's channels at full and half resolution
    width: int = 320  # the denoiser's widest activations per latent pixel (UNet's first level; transformer's width)
    patch: int = 1  # latent pixels per token side (transformers)
    heads: int = 8  # attention heads at the first level
    values: int = 0  # parameters of the weights (0: unknown)

    @classmethod
    def of(cls, spec: ModelSpec | None) -> "_ImageProfile":
        from studio.limits import read_config, weight_values

        if spec is None:
            return cls()
        index = read_config(spec, "model_index.json")
        vae = read_config(spec, "vae/config.json")
        unet = read_config(spec, "unet/config.json")
        transformer = read_config(spec, "transformer/config.json")
        channels = list(vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or [])
        scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 8
        patch, factor = 1, max(8, scale)  # the UNet pipelines check multiples of 8 (image.py: size_factor)
        if str(index.get("_class_name", "")).startswith("Flux"):
            patch, factor = 2, scale * 2
        elif isinstance(transformer.get("patch_size"), int) and transformer["patch_size"] > 1:
            patch, factor = transformer["patch_size"], scale * transformer["patch_size"]
        size = (unet or transformer).get("sample_size") or (128 if str(index.get("_class_name", "")).startswith("Flux") else None)
        if isinstance(size, (list, tuple)):
            default = (int(size[1]) * scale, int(size[0]) * scale)
        else:
            default = (int(size) * scale,) * 2 if size else cls.default
        if unet:
            blocks = list(unet.get("block_out_channels") or [320])
            head_dim = unet.get("attention_head_dim") or 8
            heads = unet.get("num_attention_heads") or (blocks[0] // head_dim if isinstance(head_dim, int) else 8)
            width = int(blocks[0])
        elif transformer:
            heads = int(transformer.get("num_attention_heads") or 8)
            width = heads * int(transformer.get("attention_head_dim") or 64)
        else:
            heads, width = cls.heads, cls.width
        heads = int(heads[0] if isinstance(heads, (list, tuple)) else heads)
        vae_channels = (int(channels[0]), int(channels[1] if len(channels) > 1 else channels[0])) if channels else cls.vae
        return cls(factor=factor, scale=scale, default=default, vae=vae_channels, width=width, patch=patch,
                   heads=heads, values=weight_values(spec))

    def size(self, request: ImageRequest) -> tuple[int, int]:
        """The size the run will generate at (image.py: _prepare_images): asked for, else the
        default; an --init image without sizes is brought to at most the default's pixel count,
        then the outpaint padding is added."""
        w, h = int(request.width or self.default[0]), int(request.height or self.default[1])
        if request.outpaint:
            pads = parse_outpaint(request.outpaint)
            w += pads.get("left", 0) + pads.get("right", 0)
            h += pads.get("top", 0) + pads.get("bottom", 0)
        from studio.pipelines.hires import parse_hires, target_size

        hires = parse_hires(request.hires)
        if hires is not None:  # the second pass is the largest
            w, h = target_size(w, h, hires.scale, self.factor)
        return w, h

    def check_memory(self, request: ImageRequest, spec: ModelSpec | None, device: DeviceManager) -> dict[str, Any]:
        """The peak of one image (images are made one at a time, --num streams), against free memory.

        Measured on tiny SD models at 512-1536 px, fp32 (tests/test_limits.py): the VAE decoder
        holds about 4.5 tensors of its full-resolution width and one of the width above it per
        pixel, plus ~100 bytes of output conversion (float image, array, PIL); e.g. SD's VAE
        (128, 256 channels) about 3.4 KB a pixel, 3.6 GB at 1024x1024. The denoiser works at
        latent resolution: ~36 tensors of its first width per latent pixel (measured on the tiny
        AnimateDiff UNet, video.py; the tiny image UNets are too small to show beside their VAE),
        doubled by classifier-free guidance and per ControlNet; math/sliced attention adds the
        full tokens x tokens matrices that SDPA avoids."""
        from studio.limits import check_fits, element_size

        elem = element_size(device)
        w, h = self.size(request)
        pixels = w * h
        c0, c1 = self.vae
        vae = pixels * (elem * (4.5 * c0 + c1) + 100)
        batch = 2 if float(request.guidance or 0) > 1 else 1
        tokens = pixels / self.scale**2 / self.patch**2
        denoiser = batch * tokens * self.width * elem * 36 * (1 + len(_as_tuple(request.controls)))
        attention = getattr(getattr(device, "resolved", None), "attention", "sdpa")
        if attention == "math":
            denoiser += batch * self.heads * tokens**2 * elem
        elif attention == "sliced":
            denoiser += batch * tokens**2 * elem

        def hint(room: float) -> str:
            # the largest size of the same shape whose VAE pass fits what the weights leave
            side = (room / (elem * (4.5 * c0 + c1) + 100) / pixels) ** 0.5
            fw, fh = (int(w * side) // self.factor * self.factor, int(h * side) // self.factor * self.factor)
            fits = f" (about {fw}x{fh} fits)" if min(fw, fh) >= self.factor and side < 1 else ""
            return (f"lower --width/--height{fits}; this model's native size is {self.default[0]}x{self.default[1]}"
                    + ("; or use --attention sdpa" if attention in ("math", "sliced") else ""))

        return check_fits(task="image", spec=spec, device=device, work=max(vae, denoiser), weights=self.values * elem,
                          what=f"{w}x{h} px", hint=hint)


# ----------------------------------------------------------------------------- the pipeline
class ImagePipeline:
    task = "image"
    request_type = ImageRequest

    def __init__(self, pipe: Any, spec: ModelSpec, device: DeviceManager, notes: list[str] | None = None):
        from studio.adapters.lora import LoraSet

        self.base = pipe  # the text-to-image pipeline; every other mode shares its weights
        self.spec = spec
        self.device = device
        self.load_notes = notes or []
        self.loras = LoraSet(pipe, base_label=spec.alias or spec.name)
        self._pipes: dict[tuple, Any] = {}  # (mode, controlnet ids) -> diffusers pipeline from from_pipe
        self._default_scheduler = pipe.scheduler
        from studio.pipelines.image_features import EmbeddingSet

        self.embeddings = EmbeddingSet(pipe)  # textual inversion tokens loaded now (shared by every mode)
        from studio.pipelines.image_extras import Extras

        self.extras = Extras(self)  # the IP-Adapter loaded now; T2I-Adapters, refiner and regions per run

    # -------------------------------------------------------------- loading
    @classmethod
    def load(cls, spec: ModelSpec, device: DeviceManager) -> ImagePipeline:
        from studio import models

        notes: list[str] = []
        with models.loading(spec, "image model"), quiet_libraries():
            if spec.kind == "file":
                pipe = _load_single_file(spec, device, notes)
            else:
                pipe = _load_pretrained(spec, device, notes)
            pipe = device.prepare(pipe)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, spec, device, notes)

    # -------------------------------------------------------------- sizes
    def size_factor(self) -> int:
        """Width and height must be multiples of this (the VAE's downscale times the patch size)."""
        pipe = self.base
        vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        if type(pipe).__name__.startswith("Flux"):
            return vsf * 2  # Flux packs 2x2 latent patches
        transformer = getattr(pipe, "transformer", None)
        patch = getattr(getattr(transformer, "config", None), "patch_size", None)
        if isinstance(patch, int) and patch > 1:
            return vsf * patch
        return max(8, vsf)  # the UNet pipelines check multiples of 8

    def default_size(self) -> tuple[int, int]:
        pipe = self.base
        vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        size = getattr(pipe, "default_sample_size", None)
        if size is None:
            denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
            size = getattr(denoiser.config, "sample_size", 64) if denoiser is not None else 64
        if isinstance(size, (list, tuple)):
            return int(size[1]) * vsf, int(size[0]) * vsf
        return int(size) * vsf, int(size) * vsf

    # -------------------------------------------------------------- checks
    @classmethod
    def check_request(cls, request: ImageRequest, spec: ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the request's
        own ranges, sizes against the model's configs, and with a device, whether the largest
        step fits in its free memory (studio/limits.py)."""
        profile = _ImageProfile.of(spec)
        _check_static(request, profile.factor)
        if device is not None:
            profile.check_memory(request, spec, device)

    def check_inputs(self, request: ImageRequest) -> None:
        factor = self.size_factor()  # the loaded model's, which a single-file checkpoint only now tells
        _check_static(request, factor)
        if request.scheduler is not None:
            make_scheduler(request.scheduler, self._default_scheduler)  # raises on unknown / misfit names
        if request.attention_maps and getattr(self.base, "unet", None) is None:
            raise UsageError("--attention-maps needs a UNet model (SD 1.x/2.x or SDXL)",
                             "drop --attention-maps for transformer models such as SD3 and Flux")
        if request.weighting and (is_weighted(request.prompt or "") or is_weighted(request.negative_prompt or "")):
            name = type(self.base).__name__
            if not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3"):
                raise UsageError(f"prompt weighting ((word:1.3), [word]) works with SD 1.x/2.x and SDXL, not {name}",
                                 "pass --no-weighting to send the prompt verbatim")
        from studio.pipelines import hires
        from studio.pipelines.image_features import check_loaded

        check_loaded(self.base, request, _call_params(self.base))
        hires.check_loaded(self.base, request)
        from studio.pipelines import image_extras

        image_extras.check_loaded(self.base, request)

    @staticmethod
    def _mode_strength(request: ImageRequest) -> float:
        return 1.0 if (request.mask_image or request.outpaint) else 0.75

    # -------------------------------------------------------------- run
    def run(self, request: ImageRequest, progress: Progress) -> Iterator[Result]:
        """Yields each image as soon as it is made (the engine writes it and lets it go)."""
        import torch

        from studio.adapters.lora import parse_lora
        from studio.outputs import Result
        from studio.pipeline import seeds_for

        # 1. check inputs; an X/Y plot and a folder of inputs run this once per cell / input
        from studio.pipelines import hires, image_features as features, xy

        if request.xy:
            yield from xy.run(self, request, progress, lambda pipeline, cell: pipeline.run(cell, progress))
            return
        if features.is_folder(request.init_image):
            yield from features.run_folder(self, request, progress)
            return
        self.check_inputs(request)
        notes = list(self.load_notes)

        def note(text: str) -> None:
            notes.append(text)
            progress.note(text)

        mode = "inpaint" if (request.mask_image or request.outpaint) else "img2img" if request.init_image else "text2img"
        strength = float(request.strength) if request.strength is not None else (self._mode_strength(request) if mode != "text2img" else None)

        # 2. sizes and input images: init (resized to a valid size), mask, outpaint canvas, control maps
        width, height, init, mask = self._prepare_images(request, note)
        controls, control_maps, control_meta = self._prepare_controls(request, width, height, note)
        extras = self.extras.prepare(request, mode, width, height, note, plain_text)  # T2I/IP-Adapter, refiner

        # 3. the diffusers pipeline for this mode (shared weights), its scheduler and adapters
        pipe = extras.pipe_for(mode, [c for c, _ in controls])
        pipe.scheduler = (make_scheduler(request.scheduler, self._default_scheduler)
                          if request.scheduler else self._default_scheduler)
        adapters = self.loras.apply([parse_lora(a) for a in _as_tuple(request.adapters)],
                                    fuse=bool(request.fuse_adapters), allow_pickle=self.spec.allow_pickle,
                                    offline=self.spec.offline)
        embeddings = self.embeddings.apply([features.parse_embedding(e) for e in _as_tuple(request.embeddings)],
                                           allow_pickle=self.spec.allow_pickle, offline=self.spec.offline)

        # 4. the prompt: verbatim, or A1111 emphasis through compel (encoded once for all seeds)
        call, weighted = self._prompt_arguments(request, pipe, embeddings)
        # 5. the call's arguments for this mode
        call.update(self._mode_arguments(request, pipe, mode, weighted, width, height, init, mask, strength,
                                         controls, control_maps))
        extras.update_call(call, pipe, request)  # adapter maps, IP-Adapter embeds, refiner switch, regions
        accepted = _call_params(pipe)
        call = {k: v for k, v in call.items() if k in accepted or k in ("prompt",)}
        steps_run = int(request.steps) if strength is None else min(int(int(request.steps) * strength), int(request.steps))

        # 6. generate: one image per seed, each with its own CPU generator
        seeds = seeds_for(int(request.seed or 0), int(request.num_outputs), _as_tuple(request.seeds) or None)
        base_params = self._recorded_params(request, width, height, strength, controls, extras)
        infotext = features.infotext_fields(request, pipe, embeddings, mode)
        fixed_extra, fixed_companions = self._shared_metadata(pipe, mode, weighted, control_maps, control_meta,
                                                              adapters, embeddings)
        for index, seed in enumerate(seeds):
            handle = progress.task(f"image {index + 1}/{len(seeds)} seed {seed}", total=steps_run)
            if "callback_on_step_end" in accepted:
                call["callback_on_step_end"] = progress.diffusers_callback(handle)
            maps = None
            try:
                with (self.device.inference(), self._attention_maps(request, pipe, width, height) as maps,
                      features.effects(pipe, request), extras.effects(pipe)):
                    output = pipe(**{**call, **extras.first_pass}, generator=self.device.generator(seed))
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise RuntimeFailure(f"out of memory generating {width}x{height}",
                                     "lower --width/--height, or try --offload model / --precision bf16") from exc
            handle.finish()
            image = extras.finish(output.images[0], request, seed, progress)  # the refiner's pass, if any
            image_infotext = dict(infotext)
            hires_meta = None
            if request.hires:
                image, hires_meta, entries = hires.second_pass(self, pipe, image, call, request, seed, (width, height),
                                                               self.size_factor(), progress,
                                                               extras.with_effects(features.effects))
                image_infotext.update(entries)
            extra, companions = dict(fixed_extra), dict(fixed_companions)
            if hires_meta:
                extra["hires"] = hires_meta
            extras.describe(extra, companions, image_infotext)  # adapters, refiner, regions; maps beside the image
            if image_infotext:
                extra["infotext"] = image_infotext  # A1111's entries for these features (studio/infotext.py)
            if maps is not None:
                self._attention_companions(request, pipe, maps, image, extra, companions)
            if getattr(output, "nsfw_content_detected", None) and any(output.nsfw_content_detected or []):
                note("the model's safety checker blanked this image")
            if notes:
                extra["notes"] = list(notes)
            yield Result(kind="image", value=image, params={**base_params, "seed": seed},
                         extra=extra, companions=companions)

    # -------------------------------------------------------------- steps of run
    def _recorded_params(self, request: ImageRequest, width: int, height: int, strength: float | None,
                         controls: list, extras: Any) -> dict[str, Any]:
        """The request as each image records it (the sidecar, replay): one image per record, the
        size and strength used, paths absolute, names as studio spells them."""
        from studio.pipelines import image_features as features

        params = dataclasses.asdict(request)
        params.update(
            seeds=None, num_outputs=1, width=width, height=height, strength=strength,
            init_image=_abs(request.init_image) if request.init_image else None,
            mask_image=_abs(request.mask_image) if request.mask_image else None,
            controls=[s.to_text() for _, s in controls], adapters=[a for a in _as_tuple(request.adapters)],
            control_models=list(_as_tuple(request.control_models)),
            # the studio name, also when the request named an A1111 label ("DPM++ 2M Karras")
            scheduler=scheduler_name(request.scheduler, self._default_scheduler) if request.scheduler else None,
            embeddings=[features.parse_embedding(e).to_text() for e in _as_tuple(request.embeddings)],
            **extras.params(),
        )
        return params

    @staticmethod
    def _shared_metadata(pipe: Any, mode: str, weighted: bool, control_maps: list, control_meta: Any,
                         adapters: Any, embeddings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """What every image of one request records (mode, pipeline, scheduler, adapters, ...) and the
        control maps written beside each."""
        extra: dict[str, Any] = {"mode": mode, "pipeline": type(pipe).__name__,
                                 "scheduler": type(pipe.scheduler).__name__,
                                 "sampler": a1111_sampler(pipe.scheduler),  # A1111's label, the default's too
                                 "weighting": "compel (A1111 syntax)" if weighted else "none"}
        companions: dict[str, Any] = {}
        if control_maps:
            for i, cmap in enumerate(control_maps):
                companions["control" if len(control_maps) == 1 else f"control-{i}"] = cmap
            extra["controls"] = control_meta
        if adapters:
            extra["adapters"] = adapters
        if embeddings:
            extra["embeddings"] = embeddings
        return extra, companions

    def _attention_companions(self, request: ImageRequest, pipe: Any, maps: Any, image: Any, extra: dict[str, Any],
                              companions: dict[str, Any]) -> None:
        """--attention-maps: each prompt word's heat map beside the image, and a contact sheet."""
        words = self._words(request, pipe, maps)
        if words:
            from studio.pipelines.attention_maps import render

            overlays, sheet = render(image, words)
            companions["attention"] = sheet
            companions.update(overlays)
            extra["attention_words"] = [w for w, _ in words]
    def _prompt_arguments(self, request: ImageRequest, pipe: Any, embeddings: Any) -> tuple[dict[str, Any], bool]:
        """The prompt part of the call (text, or embeddings when weighted or clip-skipped by layers),
        and whether A1111 weighting was applied."""
        from studio.pipelines import image_features as features

        prompt, negative = request.prompt or "", request.negative_prompt or ""
        weighted = bool(request.weighting and (is_weighted(prompt) or is_weighted(negative)))
        call: dict[str, Any] = {}
        with self.device.inference():
            if weighted:
                if embeddings:  # a multi-vector embedding's word becomes its tokens, as encode_prompt does
                    prompt, negative = features.expand_tokens(pipe, prompt), features.expand_tokens(pipe, negative)
                with features.clip_skip_layers(pipe, request.clip_skip):
                    call.update(encode_weighted(pipe, prompt, negative))
            elif features.clip_skip_by_layers(pipe, weighted) and features.clip_skip_argument(request.clip_skip):
                text, neg = (plain_text(prompt), plain_text(negative)) if request.weighting else (prompt, negative)
                with features.clip_skip_layers(pipe, request.clip_skip):
                    out = pipe.encode_prompt(text, self.device.device, 1, float(request.guidance) > 1.0, neg or None)
                call.update(prompt_embeds=out[0], negative_prompt_embeds=out[1])
            else:
                text, neg = (plain_text(prompt), plain_text(negative)) if request.weighting else (prompt, negative)
                call["prompt"] = text
                if neg:
                    if "negative_prompt" not in _call_params(pipe):
                        raise UsageError(f"{type(pipe).__name__} takes no negative prompt", "drop --negative")
                    call["negative_prompt"] = neg
        return call, weighted

    @staticmethod
    def _mode_arguments(request: ImageRequest, pipe: Any, mode: str, weighted: bool, width: int, height: int,
                        init: Any, mask: Any, strength: float | None, controls: list, control_maps: list) -> dict[str, Any]:
        """Steps, guidance, sizes, input images and ControlNet settings for this mode."""
        from studio.pipelines import hires, image_features as features

        call: dict[str, Any] = dict(num_inference_steps=int(request.steps), guidance_scale=float(request.guidance),
                                    output_type=hires.first_pass_output(request))
        if features.clip_skip_argument(request.clip_skip) and not features.clip_skip_by_layers(pipe, weighted):
            call["clip_skip"] = features.clip_skip_argument(request.clip_skip)
        if mode == "text2img":
            call.update(width=width, height=height)
            if controls:
                call["image"] = control_maps if len(control_maps) > 1 else control_maps[0]
        else:
            # width/height too: SD3/Flux img2img would otherwise fall back to their default size
            call.update(image=init, strength=strength, width=width, height=height)
            if mode == "inpaint":
                call.update(mask_image=mask)
            if controls:
                call["control_image"] = control_maps if len(control_maps) > 1 else control_maps[0]
        if controls:
            specs = [s for _, s in controls]
            many = len(specs) > 1
            call["controlnet_conditioning_scale"] = [s.scale for s in specs] if many else specs[0].scale
            call["control_guidance_start"] = [s.start for s in specs] if many else specs[0].start
            call["control_guidance_end"] = [s.end for s in specs] if many else specs[0].end
        return call
    def _prepare_images(self, request: ImageRequest, note: Any) -> tuple[int, int, Any, Any]:
        """(width, height, init image, mask) at a size the model accepts; every resize is a note."""
        factor = self.size_factor()
        if not request.init_image:
            dw, dh = self.default_size()
            return int(request.width or dw), int(request.height or dh), None, None
        from studio.pipeline import image_size

        dw, dh = self.default_size()
        # the size comes from the header: a 12000x12000 file is shrunk while it is opened, to the
        # same size whether --width/--height were given or came from a replayed output
        source = image_size(request.init_image, "init image")
        if request.width and request.height:
            target = (int(request.width), int(request.height))
        else:
            w, h = source
            if request.width:  # keep the aspect ratio when one side is given
                w, h = int(request.width), max(factor, round(h * int(request.width) / w / factor) * factor)
            elif request.height:
                w, h = max(factor, round(w * int(request.height) / h / factor) * factor), int(request.height)
            elif w * h > dw * dh:
                # never at a large init's own size (12000x12000 would take GBs and hours): the
                # model's default number of pixels, in the init's aspect ratio
                scale = (dw * dh / (w * h)) ** 0.5
                w, h = max(factor, round(w * scale / factor) * factor), max(factor, round(h * scale / factor) * factor)
            target = (max(factor, w - w % factor), max(factor, h - h % factor))
        init = self._open(request.init_image, "init image", "RGB", note, max_size=target)
        if source != target:
            if request.width and request.height:
                why = ""
            elif not (request.width or request.height) and source[0] * source[1] > dw * dh:
                why = f" (the pixel count of the model's default {dw}x{dh}; pass --width/--height for another size)"
            else:
                why = f" (a multiple of {factor})"
            note(f"resized the init image from {source[0]}x{source[1]} to {target[0]}x{target[1]}{why}")
        if init.size != target:
            init = init.resize(target, _lanczos())
        mask = None
        if request.mask_image:
            mask = self._open(request.mask_image, "mask image", "L", note, max_size=init.size)
            msize = mask.info.get("original_size", mask.size)
            if msize != init.size:
                note(f"resized the mask from {msize[0]}x{msize[1]} to {init.size[0]}x{init.size[1]}")
                mask = mask.resize(init.size, _lanczos()) if mask.size != init.size else mask
        if request.outpaint:
            init, mask = outpaint_canvas(init, parse_outpaint(request.outpaint), overlap=factor)
            note(f"outpainting: canvas {init.size[0]}x{init.size[1]}, the padding is repainted")
        from studio.pipelines.image_features import blur_mask

        mask = blur_mask(mask, request.mask_blur)
        return init.size[0], init.size[1], init, mask

    @staticmethod
    def _open(path: str, what: str, mode: str, note: Any, max_size: tuple[int, int] | None = None) -> Any:
        from studio.pipeline import load_image

        # cover: shrunk only as far as it still covers the size it is resized to next
        image = load_image(path, mode=mode, what=what, max_size=max_size, cover=True)
        original = image.info.get("original_mode", mode)
        if original != mode and not (mode == "L" and original == "1"):
            dropped = " (transparency dropped)" if "A" in original or "transparency" in image.info else ""
            note(f"converted the {what} from {original} to {mode}{dropped}")
        return image

    def _prepare_controls(self, request: ImageRequest, width: int, height: int, note: Any) -> tuple[list, list, list]:
        """[(controlnet, spec)], [control map PIL], [metadata] for the --control inputs."""
        from studio.pipelines.control import base_family, check_fits, default_control_model, load_controlnet, parse_control, preprocess

        specs = [parse_control(c) for c in _as_tuple(request.controls)]
        if not specs:
            return [], [], []
        names = list(_as_tuple(request.control_models)) or ["auto"] * len(specs)
        family = base_family(self.base)
        controls, maps, meta = [], [], []
        for spec, name in zip(specs, names):
            if not name or name == "auto":
                name = default_control_model(spec.type, family)
            controlnet, cspec = load_controlnet(name, self.device, allow_pickle=self.spec.allow_pickle,
                                                offline=self.spec.offline, trust_remote_code=self.spec.trust_remote_code)
            check_fits(controlnet, self.base, cspec.alias or cspec.name)
            image = self._open(spec.image, f"control image ({spec.type})", "RGB", note, max_size=(width, height))
            source = image.info.get("original_size", image.size)
            if source != (width, height):
                note(f"resized the {spec.type} control image from {source[0]}x{source[1]} to {width}x{height}")
                image = image.resize((width, height), _lanczos()) if image.size != (width, height) else image
            cmap = preprocess(spec.type, image, allow_pickle=self.spec.allow_pickle)
            spec = dataclasses.replace(spec, image=_abs(spec.image))
            controls.append((controlnet, spec))
            maps.append(cmap)
            meta.append({"type": spec.type, "image": spec.image, "scale": spec.scale, "start": spec.start,
                         "end": spec.end, "model": cspec.identity()})
        return controls, maps, meta

    def _pipe_for(self, mode: str, controlnets: list) -> Any:
        """The diffusers pipeline for a mode (and ControlNets), made once with from_pipe: it shares
        the base pipeline's modules, so no weights are loaded or copied."""
        if mode == "text2img" and not controlnets:
            return self.base
        key = (mode, tuple(id(c) for c in controlnets))
        if key not in self._pipes:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

            auto = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                    "inpaint": AutoPipelineForInpainting}[mode]
            kwargs: dict[str, Any] = {}
            if controlnets:
                kwargs["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
            try:
                pipe = auto.from_pipe(self.base, **kwargs)
            except (ValueError, KeyError) as exc:
                what = mode + (" with ControlNet" if controlnets else "")
                raise UsageError(f"diffusers has no {what} pipeline for {type(self.base).__name__}",
                                 "use an SD 1.x/2.x, SDXL, SD3 or Flux model for this mode") from exc
            pipe.set_progress_bar_config(disable=True)
            if self.device.resolved.offload == "model":
                pipe.enable_model_cpu_offload(device=self.device.device)  # hooks for the added ControlNet too
            self._pipes[key] = pipe
        return self._pipes[key]

    def _attention_maps(self, request: ImageRequest, pipe: Any, width: int, height: int) -> Any:
        import contextlib

        if not request.attention_maps:
            return contextlib.nullcontext()
        from studio.pipelines.attention_maps import CrossAttentionMaps

        unet = getattr(pipe, "unet", None)
        vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        no_cfg_model = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None
        cfg = float(request.guidance) > 1.0 and not no_cfg_model  # diffusers' do_classifier_free_guidance
        return CrossAttentionMaps(unet, (height // vsf, width // vsf), cfg=cfg)

    def _words(self, request: ImageRequest, pipe: Any, maps: Any) -> list:
        from studio.pipelines.attention_maps import word_maps

        token_maps = maps.token_maps()
        if token_maps is None:
            return []
        text = plain_text(request.prompt or "") if request.weighting else (request.prompt or "")
        return word_maps(pipe.tokenizer, text, token_maps)


def _call_params(pipe: Any) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


def _lanczos() -> Any:
    from PIL import Image

    return Image.Resampling.LANCZOS


def outpaint_canvas(image: Any, pads: dict[str, int], overlap: int = 8) -> tuple[Any, Any]:
    """(canvas, mask) for outpainting: the image in the middle of a larger canvas whose border is
    the image's edge pixels stretched outwards and blurred (a starting point the model repaints
    fully), and a mask that is white over the border plus `overlap` pixels into the image, so the
    seam is repainted too."""
    import cv2
    import numpy as np
    from PIL import Image

    arr = np.asarray(image.convert("RGB"))  # (H, W, 3)
    l, r, t, b = pads["left"], pads["right"], pads["top"], pads["bottom"]
    canvas = cv2.copyMakeBorder(arr, t, b, l, r, cv2.BORDER_REPLICATE)  # (H+t+b, W+l+r, 3)
    H, W = canvas.shape[:2]
    k = max(3, (max(l, r, t, b) // 2) | 1)  # odd kernel, about half the widest pad
    blurred = cv2.GaussianBlur(canvas, (k, k), 0)
    inside = np.zeros((H, W), dtype=bool)
    inside[t:t + arr.shape[0], l:l + arr.shape[1]] = True
    canvas = np.where(inside[..., None], canvas, blurred)
    mask = np.full((H, W), 255, dtype=np.uint8)
    y0, y1 = t + (overlap if t else 0), t + arr.shape[0] - (overlap if b else 0)
    x0, x1 = l + (overlap if l else 0), l + arr.shape[1] - (overlap if r else 0)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 0  # keep the image, minus the overlap band
    return Image.fromarray(canvas), Image.fromarray(mask)


# ----------------------------------------------------------------------------- loading helpers
def _load_kwargs(spec: ModelSpec, device: DeviceManager, config: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"dtype": device.dtype, **spec.load_kwargs(library="diffusers")}
    if "safety_checker" in config:
        # A1111/ComfyUI run without it; loading it costs a second CLIP model
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for name, value in config.items():
        if isinstance(value, (list, tuple)) and list(value) == [None, None]:
            # a component saved as None (SD3 without its T5) must be passed as None again
            kwargs.setdefault(name, None)
    return kwargs


def _load_pretrained(spec: ModelSpec, device: DeviceManager, notes: list[str]) -> Any:
    import diffusers
    from diffusers import DiffusionPipeline

    location = spec.location()
    extra = {"revision": spec.revision} if spec.revision and spec.kind == "hub" and not spec.offline else {}
    try:
        config = DiffusionPipeline.load_config(location, **extra)
    except Exception as exc:
        if spec.kind == "folder" and not (Path(location) / "model_index.json").exists():
            raise UsageError(f"{spec.source} is not a diffusers pipeline folder (no model_index.json)",
                             "pass a folder saved with save_pretrained, a hub id, or a single .safetensors file") from exc
        raise
    # A folder saved as a text-to-image pipeline loads through its own class: diffusers'
    # AutoPipelineForText2Image would first import its whole table of pipelines (Kandinsky, GLM,
    # ControlNet, ... and their transformers models), about a second of a `studio image` process
    # for nothing (benchmarks/image_overhead.py). Other classes (an img2img or inpaint repo) still
    # go through the auto class, which maps them to their text-to-image sibling.
    name = str(config.get("_class_name") or "")
    own = getattr(diffusers, name, None) if _is_text2img_class(name) else None
    loader = own if own is not None else diffusers.AutoPipelineForText2Image
    return loader.from_pretrained(location, **_load_kwargs(spec, device, config))


def _is_text2img_class(name: str) -> bool:
    """A pipeline class that AutoPipelineForText2Image maps to itself (diffusers' own table, for the
    families studio serves), so loading it directly gives the very same pipeline."""
    return name in {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                    "FluxPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "KolorsPipeline",
                    "AuraFlowPipeline", "SanaPipeline", "HunyuanDiTPipeline", "LuminaText2ImgPipeline"}


class _LazyCheckpoint(dict):
    """Key names of a .safetensors file, tensors read only when asked: enough for diffusers'
    model-type detection without reading gigabytes twice."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt")
        super().__init__({k: None for k in self._file.keys()})

    def __getitem__(self, key: str) -> Any:
        if dict.__getitem__(self, key) is None:
            dict.__setitem__(self, key, self._file.get_tensor(key))
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


# single-file model types -> the diffusers pipeline class that reads them
_SINGLE_FILE_CLASSES = {
    "v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline", "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline", "sd35_medium": "StableDiffusion3Pipeline", "sd35_large": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline", "flux-schnell": "FluxPipeline",
}


def _load_single_file(spec: ModelSpec, device: DeviceManager, notes: list[str]) -> Any:
    """One .safetensors checkpoint (A1111/Civitai style) through diffusers' from_single_file.

    The checkpoint holds weights only; the component configs come from, in order: the model
    card's `components: {config: FOLDER_OR_HUB_ID}`, a diffusers folder (model_index.json) the
    file sits in, or diffusers' default repo for the detected type (which must be in the HF cache
    when offline)."""
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from studio.safety import check_pickle

    path = Path(spec.source)
    check_pickle(path, allow_pickle=spec.allow_pickle)
    try:
        model_type = infer_diffusers_model_type(_LazyCheckpoint(str(path))) if path.suffix == ".safetensors" else "v1"
    except Exception as exc:
        raise UsageError(f"{path.name} is not a readable .safetensors checkpoint ({type(exc).__name__})",
                         "check the file (an interrupted download?)") from exc
    class_name = _SINGLE_FILE_CLASSES.get(model_type)
    if class_name is None:
        raise UsageError(f"{path.name} is a {model_type} checkpoint, not a text-to-image model studio loads from one file",
                         "use a diffusers folder or hub id for this model")
    config = ((spec.card or {}).get("components") or {}).get("config")
    if config is None and (path.parent / "model_index.json").exists():
        config = str(path.parent)
    if config and Path(config).is_dir():  # components may load from the config folder too
        check_pickle(config, allow_pickle=spec.allow_pickle, what="config folder")
    kwargs: dict[str, Any] = {"dtype": device.dtype}
    if config:
        kwargs["config"] = config
        notes.append(f"single-file checkpoint: configs from {config}")
    if spec.offline:
        kwargs["local_files_only"] = True
    cls = getattr(diffusers, class_name)
    if class_name.startswith("StableDiffusion") and "3" not in class_name and "XL" not in class_name:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as exc:
        if not config and ("offline" in str(exc).lower() or "local" in str(exc).lower() or "connect" in str(exc).lower()):
            raise UsageError(f"{path.name} needs its base model's configs, which are not in the local cache",
                             "run once with network access, or write a model card with `components: {config: FOLDER}`") from exc
        raise
    text2img = diffusers.AutoPipelineForText2Image.from_pipe(pipe)
    return text2img
