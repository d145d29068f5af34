"""T2I-Adapter: `--t2i-adapter TYPE:IMAGE[:SCALE]` (repeatable), beside `--control`.

A T2I-Adapter (TencentARC) steers the UNet with a control map as a ControlNet does, but is a
small convolutional network run once per image, not a copy of the UNet run at every step: about
77M parameters against a ControlNet's 360M for SD 1.5, and no per-step cost. diffusers runs it:
T2IAdapter / MultiAdapter and StableDiffusionAdapterPipeline / StableDiffusionXLAdapterPipeline,
made from the loaded base with `from_pipe` (weights shared, nothing copied). The maps come from
the same preprocessors as ControlNet's (pipelines/control.py: canny needs no weights), and the
adapter for a type from the model cards (`task: t2i-adapter`, `params: {control_type, base}`),
or `--t2i-adapter-model`.

diffusers has T2I-Adapter pipelines for text-to-image only, and none that takes a ControlNet as
well: both are refused before anything loads. Nothing heavy at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import UsageError
from studio.progress import quiet_libraries

if TYPE_CHECKING:
    from studio.device import DeviceManager

CARD_TASK = "t2i-adapter"


@dataclass(frozen=True)
class T2ISpec:
    """One `--t2i-adapter TYPE:IMAGE[:SCALE]`."""

    type: str  # preprocessor (canny, none, depth, ...): the same types as --control
    image: str  # a photo to preprocess, or a ready map for none/raw
    scale: float = 1.0  # adapter_conditioning_scale: how strongly the map steers

    def to_text(self) -> str:
        return f"{self.type}:{self.image}:{self.scale:g}"


def parse_t2i(text: Any) -> T2ISpec:
    """`TYPE:IMAGE[:SCALE]`; the scale is taken from the right so a path may hold ':'."""
    from studio.pipelines.control import canonical_type, existing_image, split_scale

    text = str(text).strip()
    hint = "e.g. --t2i-adapter canny:photo.png or --t2i-adapter canny:photo.png:0.8"
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise UsageError(f"--t2i-adapter {text!r} is not TYPE:IMAGE[:SCALE]", hint)
    kind = canonical_type(kind)
    image, scale = split_scale(rest)
    scale = 1.0 if scale is None else scale
    if scale < 0 or scale > 10:
        raise UsageError(f"--t2i-adapter {text!r}: scale {scale:g} must be 0-10", "1.0 is full strength")
    return T2ISpec(type=kind, image=existing_image(image, f"t2i-adapter image ({kind})"), scale=scale)


def default_model(kind: str, family: str) -> str:
    """The T2I-Adapter card for a control type on a base family."""
    from studio.pipelines.control import card_for

    if kind in ("none", "raw"):
        raise UsageError(f"--t2i-adapter {kind}:IMAGE passes a ready map, so studio cannot tell which adapter reads it",
                         "name it with --t2i-adapter-model (an alias, hub id or folder)")
    name = card_for(CARD_TASK, family, kind)
    if name is not None:
        return name
    raise UsageError(f"no T2I-Adapter card for type {kind!r} on a {family} model",
                     "name one with --t2i-adapter-model (an alias, hub id or folder); "
                     "`studio models list --task t2i-adapter` shows the cards")


_ADAPTERS: dict[tuple, Any] = {}


def load_adapter(name: str, device: DeviceManager, *, allow_pickle: bool = False, offline: bool = False,
                 trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(T2IAdapter prepared for `device`, its ModelSpec), cached per process."""
    from studio import models

    spec = models.resolve(name, task=CARD_TASK, allow_pickle=allow_pickle, offline=offline,
                          trust_remote_code=trust_remote_code)
    key = (spec, device.settings)
    if key not in _ADAPTERS:
        import diffusers

        with models.loading(spec, "T2I-Adapter"), quiet_libraries():
            if spec.kind == "file":
                raise UsageError(f"{spec.source} is one file; T2I-Adapters load from a folder (config.json + weights)",
                                 "pass the adapter's folder or hub id")
            location = spec.location()
            if Path(location).is_dir() and not (Path(location) / "config.json").exists():
                what = "a diffusers pipeline" if (Path(location) / "model_index.json").exists() else "a folder without config.json"
                raise UsageError(f"{name} is {what}, not a T2IAdapter", "pass a T2I-Adapter with --t2i-adapter-model")
            extra = {"revision": spec.revision} if spec.revision and spec.kind == "hub" and not spec.offline else {}
            config = diffusers.T2IAdapter.load_config(location, **extra)
            if config.get("_class_name") != "T2IAdapter":
                raise UsageError(f"{name} is a {config.get('_class_name', 'model of another kind')}, not a T2IAdapter",
                                 "pass a T2I-Adapter with --t2i-adapter-model")
            adapter = diffusers.T2IAdapter.from_pretrained(location, dtype=device.dtype,
                                                           **spec.load_kwargs(library="diffusers-model"))
            adapter = device.prepare(adapter)
        _ADAPTERS[key] = (adapter, spec)
    return _ADAPTERS[key]


def check_fits(adapter: Any, pipe: Any, label: str) -> None:
    """An adapter made for another base fails deep inside the UNet with a shape error; say so first."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError(f"{type(pipe).__name__} does not take a T2I-Adapter", "use an SD 1.x/2.x or SDXL model")
    xl = "XL" in type(pipe).__name__
    kind = adapter.config.adapter_type
    channels = list(adapter.config.channels)
    blocks = list(unet.config.block_out_channels)
    if (kind == "full_adapter_xl") != xl or channels[0] != blocks[0]:
        raise UsageError(f"T2I-Adapter {label} does not fit this base model ({kind}, {channels[0]} channels vs the "
                         f"UNet's {blocks[0]})", "use an adapter made for this base (sd15 or sdxl); "
                         "`studio models list --task t2i-adapter` shows the cards")


def downscale(adapters: list[Any]) -> int:
    """The size step the adapters need (diffusers refuses sizes their downsampling does not divide)."""
    return max(int(getattr(a, "total_downscale_factor", 8)) for a in adapters)


def pipe_for(image_pipeline: Any, adapters: list[Any]) -> Any:
    """The adapter pipeline for the base (SD or SDXL), made once per adapter set with from_pipe."""
    key = ("t2i-adapter", tuple(id(a) for a in adapters))
    pipes = image_pipeline._pipes
    if key not in pipes:
        from diffusers import MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

        base = image_pipeline.base
        name = type(base).__name__
        if not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3"):
            raise UsageError(f"diffusers has no T2I-Adapter pipeline for {name}", "use an SD 1.x/2.x or SDXL model")
        cls = StableDiffusionXLAdapterPipeline if "XL" in name else StableDiffusionAdapterPipeline
        adapter = adapters[0] if len(adapters) == 1 else MultiAdapter(adapters)
        with quiet_libraries():
            pipe = cls.from_pipe(base, adapter=adapter)
        pipe.set_progress_bar_config(disable=True)
        if image_pipeline.device.resolved.offload == "model":
            pipe.enable_model_cpu_offload(device=image_pipeline.device.device)
        pipes[key] = pipe
    return pipes[key]
