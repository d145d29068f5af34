"""The image pipeline's second set of A1111/ComfyUI features, in one place pipelines/image.py
calls: IP-Adapter (pipelines/ip_adapter.py), T2I-Adapter (t2i_adapter.py), the SDXL refiner
(refiner.py) and regional prompts (regions.py).

image.py calls, in its run's numbered steps:
  check_static(request) / check_loaded(pipe, request)   before anything loads / on the loaded model
  run = extras.prepare(request, mode, w, h, note, plain) after the sizes are known: loads adapters,
                                                        preprocesses maps, loads the refiner
  run.pipe_for(mode, controlnets)                       the diffusers pipeline (an adapter pipeline
                                                        with --t2i-adapter)
  run.update_call(call, pipe, request)                  the call's arguments for these features
  pipe(**{**call, **run.first_pass})                    the base stops at the refiner's switch
  run.effects(pipe)                                     regional prompting around the call
  run.finish(image, request, seed, progress)           the refiner's pass
  run.describe(extra, companions, infotext)             metadata, maps beside the image, A1111 entries
and params_from_infotext calls from_infotext. Nothing here imports pipelines/image.py (the
layer test forbids import loops): what is needed from it (plain_text, _open) is handed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.errors import UsageError
from studio.pipeline import as_tuple as _as_tuple


# ----------------------------------------------------------------------------- checks
def check_static(request: Any) -> None:
    """The new fields' own values and combinations, before any weight is read."""
    from studio.pipelines import ip_adapter, refiner, regions, t2i_adapter

    if request.ip_adapter:
        ip_adapter.parse_ip_adapter(request.ip_adapter)
    elif request.ip_adapter_model and not _as_tuple(getattr(request, "xy", ())):  # an X/Y axis may set the image
        raise UsageError("--ip-adapter-model applies with --ip-adapter IMAGE", "add --ip-adapter IMAGE[:SCALE]")
    specs = [t2i_adapter.parse_t2i(t) for t in _as_tuple(request.t2i_adapters)]
    models_ = _as_tuple(request.t2i_adapter_models)
    if models_ and len(models_) != len(specs):
        raise UsageError(f"{len(models_)} --t2i-adapter-model for {len(specs)} --t2i-adapter",
                         "give one --t2i-adapter-model per --t2i-adapter, in the same order (auto = the card for TYPE)")
    if specs:
        if _as_tuple(request.controls):
            raise UsageError("--t2i-adapter cannot be combined with --control (diffusers has no pipeline that runs both)",
                             "steer with one kind: ControlNet or T2I-Adapter")
        if request.init_image:
            raise UsageError("--t2i-adapter works with text-to-image only (diffusers has no T2I-Adapter img2img pipeline)",
                             "drop --init, or use --control for img2img")
    refiner.check_static(request)
    regions.check_static(request)


def check_loaded(pipe: Any, request: Any) -> None:
    from studio.pipelines import refiner, regions

    name = type(pipe).__name__
    if request.ip_adapter and (getattr(pipe, "unet", None) is None or not hasattr(pipe, "load_ip_adapter")):
        raise UsageError(f"--ip-adapter works with UNet models (SD 1.x/2.x, SDXL), not {name}", "drop --ip-adapter")
    if _as_tuple(request.t2i_adapters) and (not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3")):
        raise UsageError(f"--t2i-adapter works with SD 1.x/2.x and SDXL, not {name}", "drop --t2i-adapter")
    if request.ip_adapter and _as_tuple(request.t2i_adapters) and "XL" not in name:
        raise UsageError("--ip-adapter with --t2i-adapter needs SDXL (diffusers' SD 1.x T2I-Adapter pipeline takes no "
                         "image prompt)", "drop one of them for this model")
    refiner.check_loaded(pipe, request)
    regions.check_loaded(pipe, request)


def _cfg(pipe: Any, request: Any) -> bool:
    """diffusers' do_classifier_free_guidance for this call."""
    unet = getattr(pipe, "unet", None)
    return float(request.guidance) > 1.0 and getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is None


# ----------------------------------------------------------------------------- per pipeline
class Extras:
    """Held by one ImagePipeline: the IP-Adapter loaded into its UNet (shared by every mode)."""

    def __init__(self, image_pipeline: Any):
        from studio.pipelines.ip_adapter import IPAdapterSet

        self.owner = image_pipeline
        self.ip = IPAdapterSet(image_pipeline.base)

    def prepare(self, request: Any, mode: str, width: int, height: int, note: Callable[[str], None],
                plain: Callable[[str], str]) -> "ExtrasRun":
        return ExtrasRun(self, request, mode, width, height, note, plain)


class ExtrasRun:
    """These features for one request: what was loaded and made for it, used by every seed."""

    def __init__(self, extras: Extras, request: Any, mode: str, width: int, height: int,
                 note: Callable[[str], None], plain: Callable[[str], str]):
        self.extras = extras
        self.owner = owner = extras.owner
        self.request = request
        self.size = (width, height)
        self.plain = plain
        self.first_pass: dict[str, Any] = {}  # arguments of the base call only (not of the hires pass)
        self.regions: Any = None
        spec = owner.spec
        self.load_options = {"allow_pickle": spec.allow_pickle, "offline": spec.offline,
                             "trust_remote_code": spec.trust_remote_code}
        self._prepare_t2i(request, width, height, note)
        self._prepare_ip(request)
        self._prepare_refiner(request)

    # -------------------------------------------------------------- T2I-Adapter
    def _prepare_t2i(self, request: Any, width: int, height: int, note: Callable[[str], None]) -> None:
        from studio.pipelines import t2i_adapter
        from studio.pipelines.control import base_family, preprocess

        self.t2i: list[tuple[Any, Any]] = []  # (T2IAdapter, T2ISpec)
        self.t2i_maps: list[Any] = []
        self.t2i_meta: list[dict[str, Any]] = []
        specs = [t2i_adapter.parse_t2i(t) for t in _as_tuple(request.t2i_adapters)]
        if not specs:
            return
        owner = self.owner
        names = list(_as_tuple(request.t2i_adapter_models)) or ["auto"] * len(specs)
        family = base_family(owner.base)
        for spec, name in zip(specs, names):
            if not name or name == "auto":
                name = t2i_adapter.default_model(spec.type, family)
            adapter, aspec = t2i_adapter.load_adapter(name, owner.device, **self.load_options)
            t2i_adapter.check_fits(adapter, owner.base, aspec.alias or aspec.name)
            image = owner._open(spec.image, f"t2i-adapter image ({spec.type})", "RGB", note, max_size=(width, height))
            source = image.info.get("original_size", image.size)
            if source != (width, height):
                from PIL import Image

                note(f"resized the {spec.type} t2i-adapter image from {source[0]}x{source[1]} to {width}x{height}")
                image = image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
            self.t2i.append((adapter, spec))
            self.t2i_maps.append(preprocess(spec.type, image, allow_pickle=owner.spec.allow_pickle))
            self.t2i_meta.append({"type": spec.type, "image": spec.image, "scale": spec.scale, "model": aspec.identity()})
        step = t2i_adapter.downscale([a for a, _ in self.t2i])
        if width % step or height % step:
            lower_w, lower_h = max(step, width - width % step), max(step, height - height % step)
            raise UsageError(f"--t2i-adapter needs --width/--height multiples of {step} (this adapter's downscaling); "
                             f"got {width}x{height}", f"use --width {lower_w} --height {lower_h}")

    # -------------------------------------------------------------- IP-Adapter
    def _prepare_ip(self, request: Any) -> None:
        from studio import models
        from studio.pipelines import ip_adapter
        from studio.pipelines.control import base_family

        self.ip = ip_adapter.parse_ip_adapter(request.ip_adapter) if request.ip_adapter else None
        self.ip_meta: dict[str, Any] | None = None
        if self.ip is None:
            self.extras.ip.apply(None, self.owner.device)
            return
        name = request.ip_adapter_model or "auto"
        if name == "auto":
            name = ip_adapter.default_model(base_family(self.owner.base))
        spec = models.resolve(name, task=ip_adapter.CARD_TASK, **self.load_options)
        self.ip_meta = self.extras.ip.apply(spec, self.owner.device)

    # -------------------------------------------------------------- refiner
    def _prepare_refiner(self, request: Any) -> None:
        from studio.pipelines import refiner

        self.refiner_spec = refiner.parse_refiner(request.refiner)
        self.refiner: tuple[Any, Any, Any] | None = None
        if self.refiner_spec is None:
            return
        self.refiner = refiner.load_refiner(self.refiner_spec.model, self.owner.device, **self.load_options)
        refiner.check_fits(self.refiner[0], self.owner.base, self.refiner[1].alias or self.refiner[1].name)

    # -------------------------------------------------------------- the call
    def pipe_for(self, mode: str, controlnets: list) -> Any:
        if self.t2i:
            from studio.pipelines import t2i_adapter

            return t2i_adapter.pipe_for(self.owner, [a for a, _ in self.t2i])
        return self.owner._pipe_for(mode, controlnets)

    def update_call(self, call: dict[str, Any], pipe: Any, request: Any) -> None:
        import inspect

        accepted = set(inspect.signature(type(pipe).__call__).parameters)
        name = type(pipe).__name__
        self.pipe = pipe  # its scheduler (the request's sampler) is the refiner's too
        if self.t2i:
            call["image"] = self.t2i_maps if len(self.t2i_maps) > 1 else self.t2i_maps[0]
            scales = [s.scale for _, s in self.t2i]
            call["adapter_conditioning_scale"] = scales if len(scales) > 1 else scales[0]
        if self.ip is not None:
            if "ip_adapter_image_embeds" not in accepted:
                raise UsageError(f"diffusers' {name} takes no IP-Adapter image",
                                 "drop --ip-adapter for this combination (SD 1.x T2I-Adapter pipelines lack it)")
            from studio.pipeline import load_image

            self.extras.ip.set_scale(self.ip.scale)
            reference = load_image(self.ip.image, mode="RGB", what="ip-adapter image", max_size=1024)
            call["ip_adapter_image_embeds"] = self.extras.ip.embeds(reference, _cfg(pipe, request), self.owner.device)
        if self.refiner is not None:
            if "denoising_end" not in accepted:
                raise UsageError(f"diffusers' {name} cannot stop at the refiner's switch", "drop --refiner for this mode")
            self.final_output = call.get("output_type", "pil")
            self.first_pass = {"denoising_end": self.refiner_spec.switch, "output_type": "latent"}
        if _as_tuple(request.regions):
            from studio.pipelines.regions import Regions

            self.regions = Regions(pipe, request, self.size[0], self.size[1], self.owner.device, _cfg(pipe, request))

    @contextlib.contextmanager
    def effects(self, pipe: Any) -> Iterator[None]:
        """Regional prompting around one call; diffusers' adapter pipelines still decode through
        their deprecated decode_latents, whose FutureWarning -q must not print."""
        import warnings

        with contextlib.ExitStack() as stack:
            if self.t2i:
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message=".*decode_latents.*", category=FutureWarning)
            if self.regions is not None:
                stack.enter_context(self.regions.active(pipe.unet))
            yield

    def with_effects(self, inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """`inner(pipe, request)` (FreeU, tiling) plus these effects, for the hires pass."""

        @contextlib.contextmanager
        def both(pipe: Any, request: Any) -> Iterator[None]:
            with inner(pipe, request), self.effects(pipe):
                yield

        return both

    def finish(self, image: Any, request: Any, seed: int, progress: Any) -> Any:
        """The refiner's pass over the base's latents; without a refiner, the image as it is."""
        if self.refiner is None:
            return image
        from studio.pipelines import refiner

        pipe, spec, default = self.refiner
        latents = image if image.ndim == 4 else image[None]  # (1, C, h, w)
        prompt, negative = request.prompt or "", request.negative_prompt or ""
        if request.weighting:
            prompt, negative = self.plain(prompt), self.plain(negative)
        return refiner.refine(pipe, default, latents, prompt=prompt, negative=negative, request=request,
                              base_scheduler=self.pipe.scheduler,
                              seed=seed, device=self.owner.device, progress=progress, output_type=self.final_output,
                              switch=self.refiner_spec.switch)

    # -------------------------------------------------------------- records
    def params(self) -> dict[str, Any]:
        """The request's fields as recorded (absolute paths, parsed forms), so each output replays."""
        from studio.pipelines.regions import specs as region_specs

        out: dict[str, Any] = {"t2i_adapters": [s.to_text() for _, s in self.t2i],
                               "t2i_adapter_models": [_local(m) for m in _as_tuple(self.request.t2i_adapter_models)],
                               "regions": [r.to_text() for r in region_specs(self.request)]}
        if self.ip is not None:
            out["ip_adapter"] = self.ip.to_text()
            out["ip_adapter_model"] = _local(self.request.ip_adapter_model)
        if self.refiner_spec is not None:
            out["refiner"] = dataclasses.replace(self.refiner_spec, model=_local(self.refiner_spec.model)).to_text()
        return out

    def describe(self, extra: dict[str, Any], companions: dict[str, Any], infotext: dict[str, Any]) -> None:
        """Metadata, the adapter maps beside the image (NAME.t2i.png, as NAME.control.png), and
        A1111's entries: sd-webui-controlnet writes T2I-Adapter and IP-Adapter units as
        `ControlNet N` (numbered after the ControlNets), A1111 the refiner's own two."""
        from studio.infotext import controlnet_unit

        unit = len(extra.get("controls") or [])
        if self.t2i:
            for i, cmap in enumerate(self.t2i_maps):
                companions["t2i" if len(self.t2i_maps) == 1 else f"t2i-{i}"] = cmap
            extra["t2i_adapters"] = self.t2i_meta
            for meta in self.t2i_meta:
                infotext[f"ControlNet {unit}"] = controlnet_unit({**meta, "start": 0.0, "end": 1.0})
                unit += 1
        if self.ip is not None and self.ip_meta is not None:
            family = "sdxl" if "XL" in type(self.owner.base).__name__ else "sd15"
            extra["ip_adapter"] = {"image": self.ip.image, "scale": self.ip.scale, **self.ip_meta}
            infotext[f"ControlNet {unit}"] = controlnet_unit({"type": f"ip-adapter_clip_{family}", "scale": self.ip.scale,
                                                              "model": self.ip_meta["model"]})
        if self.refiner is not None:
            from studio.pipelines import refiner

            meta = self.refiner[1].identity()
            extra["refiner"] = {"model": meta, "switch": self.refiner_spec.switch}
            infotext.update(refiner.infotext(meta, self.refiner_spec.switch))
        if self.regions is not None:
            extra["regions"] = self.regions.meta()


def _local(name: Any) -> Any:
    """A model named by a local path, made absolute (a card or hub id as it is), so it replays anywhere."""
    from studio.models import load_cards

    if not name or str(name) in load_cards():  # a card's name wins over a folder of that name, as in resolve
        return name
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else name


# ----------------------------------------------------------------------------- infotext
def from_infotext(fields: dict[str, Any], params: dict[str, Any], notes: list[str]) -> None:
    """What A1111 wrote for these features, taken out of `fields` (so the caller does not list it
    as ignored): the refiner (refiner.from_infotext), and sd-webui-controlnet units that are
    IP-Adapter or T2I-Adapter units (their images are not in the PNG: a note each)."""
    import re

    from studio.infotext import parse_controlnet_unit
    from studio.pipelines import refiner

    refiner.from_infotext(fields, params, notes)
    fields.pop("Refiner", None)
    fields.pop("Refiner switch at", None)
    for key in sorted(k for k in list(fields) if re.fullmatch(r"ControlNet \d+", k)):
        unit = parse_controlnet_unit(fields[key])
        module, model, weight = unit.get("Module", ""), unit.get("Model", "?"), unit.get("Weight", "1")
        if module.startswith("ip-adapter") or model.lower().startswith("ip-adapter"):
            notes.append(f"{key} is an IP-Adapter ({model}, weight {weight}): pass --ip-adapter IMAGE:{weight} "
                         "(the PNG does not hold the reference image)")
            fields.pop(key)
        elif "t2iadapter" in model.lower().replace("-", "").replace("_", ""):
            kind = module.split("_")[0] or "none"
            notes.append(f"{key} is a T2I-Adapter ({module}, {model}, weight {weight}): pass --t2i-adapter "
                         f"{kind}:IMAGE:{weight} and --t2i-adapter-model")
            fields.pop(key)


def abs_region(text: str) -> str:
    """A --region's mask path made absolute (a box is kept as typed), for the CLI."""
    prompt, sep, where = str(text).rpartition("@")
    if sep and where and Path(where).expanduser().exists():
        return f"{prompt}@{Path(where).expanduser().resolve()}"
    return text

