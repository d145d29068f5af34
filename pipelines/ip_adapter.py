"""IP-Adapter: an image as part of the prompt (`--ip-adapter IMAGE[:SCALE]`, `--ip-adapter-model`).

diffusers does the work: `load_ip_adapter` puts the adapter's image projection and its extra
key/value projections into the UNet's cross-attention, `set_ip_adapter_scale` weighs them, and
`prepare_ip_adapter_image_embeds` turns the reference image into the tokens the UNet attends to.
What studio adds: where the weights come from (a model card for the base family, a folder laid
out as h94/IP-Adapter's `models/` is: one `ip-adapter*.safetensors` beside `image_encoder/`, or a
single weight file with `image_encoder/` next to it), safetensors only unless --allow-pickle, the
image embedded once for every seed (and the hires pass), and the cached pipeline left exactly as it
was found when a later request names no adapter (diffusers' own unload_ip_adapter rebuilds
attention processors of default classes, which would drop the device manager's attention choice).

Nothing heavy at module level; nothing here imports pipelines/image.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.errors import InputFileError, UsageError
from studio.progress import quiet_libraries

if TYPE_CHECKING:
    from studio.device import DeviceManager
    from studio.models import ModelSpec

CARD_TASK = "ip-adapter"  # the task of IP-Adapter model cards (presets/models/ip-adapter-*.yaml)


@dataclass(frozen=True)
class IPAdapterSpec:
    """One `--ip-adapter IMAGE[:SCALE]`."""

    image: str  # the reference image
    scale: float = 1.0  # how strongly it steers: 0 = not at all, 1 = the adapter's full weight (0.5-0.8 is usual)

    def to_text(self) -> str:
        return f"{self.image}:{self.scale:g}"


def parse_ip_adapter(text: Any) -> IPAdapterSpec:
    """`IMAGE[:SCALE]`; the scale is taken from the right, so a path may hold ':'."""
    from studio.pipelines.control import existing_image, split_scale

    text = str(text).strip()
    hint = "e.g. --ip-adapter style.png or --ip-adapter style.png:0.6"
    if not text:
        raise UsageError("--ip-adapter needs an image", hint)
    image, scale = split_scale(text)
    scale = 1.0 if scale is None else scale
    if not (0.0 <= scale <= 10.0):
        raise UsageError(f"--ip-adapter scale {scale:g} must be 0-10", "1.0 is the adapter's full weight; 0.5-0.8 mixes with the prompt")
    return IPAdapterSpec(image=existing_image(image, "--ip-adapter image"), scale=scale)


def default_model(family: str) -> str:
    """The IP-Adapter card for a base family (sd15, sdxl, ...)."""
    from studio.pipelines.control import card_for

    name = card_for(CARD_TASK, family)
    if name is not None:
        return name
    raise UsageError(f"no IP-Adapter card for a {family} model",
                     "name one with --ip-adapter-model (a card, or a folder with ip-adapter*.safetensors and image_encoder/)")


@dataclass(frozen=True)
class Weights:
    """Where one IP-Adapter's files are, in load_ip_adapter's terms."""

    location: str  # a local folder or a hub id
    subfolder: str  # the weight file's folder inside it ("" = the top)
    weight_name: str  # the weight file
    image_encoder: str  # the image encoder's folder inside `location`
    label: str  # how the infotext names it (the card, else the file's stem)


def locate(spec: ModelSpec) -> Weights:
    """The files of an IP-Adapter: a card's params (subfolder, weight_name, image_encoder), or a
    local folder / file laid out as h94/IP-Adapter's."""
    from studio.safety import check_pickle

    params = dict((spec.card or {}).get("params") or {})
    label = spec.alias or Path(spec.source).stem
    if spec.kind == "file":
        path = Path(spec.source)
        check_pickle(path, allow_pickle=spec.allow_pickle, what="IP-Adapter")
        encoder = path.parent / params.get("image_encoder", "image_encoder")
        if not (encoder / "config.json").exists():
            raise InputFileError(f"IP-Adapter {path.name} has no image_encoder/ folder beside it",
                                 "put the CLIP image encoder (config.json + model.safetensors) in image_encoder/ next to the file, "
                                 "as h94/IP-Adapter's models/ folder holds it")
        return Weights(str(path.parent), "", path.name, encoder.name, label)
    if params.get("weight_name"):
        location = spec.location()
        sub = str(params.get("subfolder", ""))
        name = str(params["weight_name"])
        if not name.endswith(".safetensors") and not spec.allow_pickle:
            from studio.safety import ALLOW_HINT, PickleRefused

            raise PickleRefused(f"IP-Adapter {label}: {name} is a pickle, which can run code when loaded", ALLOW_HINT)
        encoder = str(params.get("image_encoder") or (f"{sub}/image_encoder" if sub else "image_encoder"))
        return Weights(location, sub, name, encoder, label)
    if spec.kind != "folder":
        raise UsageError(f"{spec.name} does not say which of its files is the IP-Adapter",
                         "pass a local folder (ip-adapter*.safetensors beside image_encoder/), or a model card with "
                         "params: {subfolder, weight_name, image_encoder}")
    folder = Path(spec.location())
    suffixes = (".safetensors",) + ((".bin", ".pt", ".pth") if spec.allow_pickle else ())
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    if not found:
        raise InputFileError(f"IP-Adapter folder {folder} holds no .safetensors weight file",
                             "pass the folder that holds ip-adapter*.safetensors and image_encoder/")
    if len(found) > 1:
        named = [p for p in found if p.name.startswith("ip-adapter")]
        if len(named) != 1:
            raise UsageError(f"IP-Adapter folder {folder} holds {len(found)} weight files ({', '.join(p.name for p in found[:3])})",
                             "pass the one you mean as a file: --ip-adapter-model FOLDER/NAME.safetensors")
        found = named
    if not (folder / "image_encoder" / "config.json").exists():
        raise InputFileError(f"IP-Adapter folder {folder} has no image_encoder/ (the CLIP image model it reads images with)",
                             "put config.json + model.safetensors of the image encoder in image_encoder/")
    return Weights(str(folder), "", found[0].name, "image_encoder", label)


class IPAdapterSet:
    """The IP-Adapter loaded into one pipeline's UNet (shared by every mode made with from_pipe).
    `apply` makes what is loaded equal what a request names: another adapter is swapped in, none
    at all restores the UNet's attention processors and projection as they were before."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.loaded: tuple | None = None  # (ModelSpec, Weights) now in the UNet
        self._saved: dict[str, Any] | None = None

    def apply(self, spec: ModelSpec | None, device: DeviceManager) -> dict[str, Any] | None:
        """Load (or keep) `spec`'s adapter; None unloads. Returns its metadata."""
        if spec is None:
            self.clear()
            return None
        weights = locate(spec)
        if self.loaded is not None and self.loaded[0] == spec:
            return self._meta()
        self.clear()
        pipe = self.pipe
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(pipe, "load_ip_adapter"):
            raise UsageError(f"IP-Adapter works with UNet models (SD 1.x/2.x, SDXL), not {type(pipe).__name__}",
                             "drop --ip-adapter for this model")
        self._saved = {"processors": dict(unet.attn_processors), "proj": unet.encoder_hid_proj,
                       "type": unet.config.encoder_hid_dim_type,
                       "image_encoder": getattr(pipe, "image_encoder", None),
                       "feature_extractor": getattr(pipe, "feature_extractor", None)}
        from studio import models

        try:
            with models.loading(spec, "IP-Adapter"), quiet_libraries():
                encoder = self._image_encoder(spec, weights, device)
                pipe.register_modules(image_encoder=encoder)
                kwargs: dict[str, Any] = {"local_files_only": True} if (spec.offline or spec.is_local) else {}
                try:
                    pipe.load_ip_adapter(weights.location, subfolder=weights.subfolder, weight_name=weights.weight_name,
                                         image_encoder_folder=None, **kwargs)
                except (RuntimeError, ValueError) as exc:
                    if "size" not in str(exc).lower():
                        raise
                    # its projections are shaped for another UNet's cross-attention width
                    width = unet.config.cross_attention_dim
                    raise UsageError(f"IP-Adapter {weights.label} does not fit this base model ({type(pipe).__name__}, "
                                     f"cross-attention width {width})",
                                     "use an IP-Adapter made for this model's family (sd15, sdxl)") from exc
        except BaseException:
            self._restore()
            raise
        self.loaded = (spec, weights)
        return self._meta()

    def _image_encoder(self, spec: ModelSpec, weights: Weights, device: DeviceManager) -> Any:
        """The CLIP image encoder, loaded here rather than by load_ip_adapter: safetensors only
        (unless --allow-pickle), the device manager's precision and placement."""
        from transformers import CLIPVisionModelWithProjection

        kwargs: dict[str, Any] = {"dtype": device.dtype}
        if not spec.allow_pickle:
            kwargs["use_safetensors"] = True
        if spec.offline or spec.is_local:
            kwargs["local_files_only"] = True
        if spec.revision and spec.kind == "hub" and not spec.offline:
            kwargs["revision"] = spec.revision
        encoder = CLIPVisionModelWithProjection.from_pretrained(weights.location, subfolder=weights.image_encoder, **kwargs)
        return device.prepare(encoder)

    def _meta(self) -> dict[str, Any]:
        spec, weights = self.loaded  # type: ignore[misc]
        return {"model": spec.identity(), "weight_name": weights.weight_name, "label": weights.label}

    def clear(self) -> None:
        if self.loaded is None and self._saved is None:
            return
        self._restore()

    def _restore(self) -> None:
        saved, self._saved, self.loaded = self._saved, None, None
        if saved is None:
            return
        pipe, unet = self.pipe, self.pipe.unet
        unet.set_attn_processor(saved["processors"])
        unet.encoder_hid_proj = saved["proj"]
        unet.config.encoder_hid_dim_type = saved["type"]
        for name in ("image_encoder", "feature_extractor"):
            if getattr(pipe, name, None) is not saved[name]:
                if saved[name] is None:
                    setattr(pipe, name, None)
                    pipe.register_to_config(**{name: [None, None]})
                else:
                    pipe.register_modules(**{name: saved[name]})

    def set_scale(self, scale: float) -> None:
        self.pipe.set_ip_adapter_scale(float(scale))

    def embeds(self, image: Any, cfg: bool, device: DeviceManager) -> list[Any]:
        """The reference image's tokens as `ip_adapter_image_embeds` (with CFG: the zero image's
        first, as diffusers lays them out), made once and passed to whichever mode's pipeline."""
        with device.inference():
            return self.pipe.prepare_ip_adapter_image_embeds(ip_adapter_image=image, ip_adapter_image_embeds=None,
                                                             device=device.device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=cfg)
