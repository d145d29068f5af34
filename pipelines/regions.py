"""Regional prompts: `--region "PROMPT@BOX_OR_MASK"` (repeatable) paints each region from its own
prompt, the base prompt everywhere else.

How: MultiDiffusion (Bar-Tal et al. 2023, region-based generation). At every denoising step the
UNet runs once on the whole latent with the base prompt and once per region on the latent crop
around that region with the region's prompt; the predictions are blended pixel by pixel with the
region masks as weights (a region's pixels take its prediction, overlaps average, the rest keeps
the base prompt's). Each mask is feathered a sixteenth of the image past its edge, so where two
regions (or a region and the background) meet their predictions are averaged over a band
instead of switching at one pixel, which left a visible seam (each crop's edge is an image
border to the model). Blending the model's predictions, not the latents after the step, keeps every
diffusers scheduler correct: each step is linear in the prediction, so one blended prediction is
the MultiDiffusion average of the per-region steps.

Why this method and not the alternatives:
  - attention masking (A1111's Regional Prompter, "Attention" mode) changes every cross-attention
    processor and leaves the model to place a whole object in a strip of an image it never saw
    split that way; small or distilled models (the starter) then paint the region's colour as a
    smear, or the object lands half outside.
  - running each region's prompt on the whole canvas and masking the result afterwards gives the
    region whatever part of the full-canvas picture falls inside it: "a red square" drawn in the
    middle of the canvas shows up in neither half.
  - on the crop, the model composes the region's picture inside the region's own frame, as it
    composes any image, so the object is inside its box; this is what MultiDiffusion's
    region-based mode does, and it needs no training, no new weights and no change to the model.
It is implemented as a wrapper around the UNet's forward for the duration of one call (the
diffusers pipeline then runs unchanged: every scheduler, guidance, img2img, inpaint, LoRA,
textual inversion, IP-Adapter, the hires pass), rather than a copy of the pipeline's loop.

Limits, checked before anything runs: UNet models only (SD 1.x/2.x, SDXL), not with ControlNet
or T2I-Adapter (their residuals are computed for the whole canvas) nor --attention-maps.

Nothing heavy at module level; nothing here imports pipelines/image.py.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from studio.errors import InputFileError, UsageError
from studio.pipeline import as_tuple as _as_tuple

_NUMBER = r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*"
_BOX = re.compile(rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$")
HINT = ('e.g. --region "a red square@0,0,0.5,1" (left half, as fractions) or --region "a cat@0,0,256,512" (pixels) '
        'or --region "a cat@mask.png" (white = the region)')


@dataclass(frozen=True)
class RegionSpec:
    """One `--region PROMPT@BOX_OR_MASK`."""

    prompt: str  # what to paint inside the region
    box: tuple[float, float, float, float] | None = None  # x0,y0,x1,y1: fractions of the image when all <= 1, else pixels
    mask: str | None = None  # a mask image (white = the region, grey = partly), resized to the image

    def to_text(self) -> str:
        where = self.mask if self.mask is not None else ",".join(f"{v:g}" for v in self.box or ())
        return f"{self.prompt}@{where}"

    @property
    def fractions(self) -> bool:
        return self.box is not None and all(0.0 <= v <= 1.0 for v in self.box)


def parse_region(text: Any) -> RegionSpec:
    """`PROMPT@x0,y0,x1,y1` or `PROMPT@MASK`: the last '@' splits (prompts may hold '@')."""
    text = str(text).strip()
    prompt, sep, where = text.rpartition("@")
    prompt, where = prompt.strip(), where.strip()
    if not sep or not prompt or not where:
        raise UsageError(f"--region {text!r} is not PROMPT@BOX or PROMPT@MASK", HINT)
    if _BOX.match(where):
        x0, y0, x1, y1 = (float(v) for v in where.split(","))
        if min(x0, y0, x1, y1) < 0 or x1 <= x0 or y1 <= y0:
            raise UsageError(f"--region box {where} must be x0,y0,x1,y1 with 0 <= x0 < x1 and 0 <= y0 < y1", HINT)
        return RegionSpec(prompt=prompt, box=(x0, y0, x1, y1))
    if "," in where and not Path(where).expanduser().exists():
        raise UsageError(f"--region box {where!r} is not four numbers x0,y0,x1,y1", HINT)
    path = Path(where).expanduser()
    if not path.exists():
        raise InputFileError(f"--region mask {where} does not exist", "pass a mask image (white = the region) or a box")
    if path.is_dir():
        raise InputFileError(f"--region mask {where} is a folder", "pass a mask image file")
    return RegionSpec(prompt=prompt, mask=str(path.resolve()))


def specs(request: Any) -> list[RegionSpec]:
    return [parse_region(r) for r in _as_tuple(getattr(request, "regions", ()))]


def check_static(request: Any) -> None:
    regions = specs(request)
    if not regions:
        return
    if len(regions) > 16:
        raise UsageError(f"{len(regions)} --region: at most 16", "merge regions that share a prompt into one mask")
    if _as_tuple(getattr(request, "controls", ())) or _as_tuple(getattr(request, "t2i_adapters", ())):
        raise UsageError("--region cannot be combined with --control or --t2i-adapter (their guidance is computed "
                         "for the whole image, the regions are painted on crops)", "drop one of them")
    if getattr(request, "attention_maps", False):
        raise UsageError("--region cannot be combined with --attention-maps", "drop --attention-maps")
    width, height = getattr(request, "width", None), getattr(request, "height", None)
    for r in regions:
        if r.box is not None and not r.fractions and width and height:
            _pixel_box(r, int(width), int(height))


def check_loaded(pipe: Any, request: Any) -> None:
    if _as_tuple(getattr(request, "regions", ())) and getattr(pipe, "unet", None) is None:
        raise UsageError(f"--region works with UNet models (SD 1.x/2.x, SDXL), not {type(pipe).__name__}",
                         "drop --region for this model")


def _pixel_box(r: RegionSpec, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = r.box or (0.0, 0.0, 1.0, 1.0)
    if r.fractions:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    box = (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
    if box[2] > width or box[3] > height:
        raise UsageError(f"--region box {','.join(f'{v:g}' for v in r.box or ())} reaches outside the "
                         f"{width}x{height} image", "use pixels inside the image, or fractions 0-1")
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise UsageError(f"--region box {','.join(f'{v:g}' for v in r.box or ())} is empty at {width}x{height}", HINT)
    return box


def region_mask(r: RegionSpec, width: int, height: int) -> Any:
    """The region's weight at every pixel, a float32 array (height, width) in [0, 1]."""
    import numpy as np

    if r.mask is not None:
        from PIL import Image

        from studio.pipeline import load_image

        image = load_image(r.mask, mode="L", what="region mask", max_size=(width, height), cover=True)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        mask = np.asarray(image, dtype=np.float32) / 255.0
        if float(mask.max()) < 0.5:
            raise InputFileError(f"region mask {Path(r.mask).name} is (almost) all black: it marks no region",
                                 "white marks the region")
        return mask
    x0, y0, x1, y1 = _pixel_box(r, width, height)
    mask = np.zeros((height, width), dtype=np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


# ----------------------------------------------------------------------------- the run
class Regions:
    """The regions of one request, prepared for one pipeline: masks at the image size, each
    region's prompt encoded once (for every seed and the hires pass)."""

    def __init__(self, pipe: Any, request: Any, width: int, height: int, device: Any, cfg: bool):
        from studio.pipelines import image_features as features

        self.specs = specs(request)
        self.masks = [region_mask(r, width, height) for r in self.specs]  # (H, W) each
        self.cfg = cfg
        self._latent_masks: dict[tuple[int, int], Any] = {}
        skip = features.clip_skip_argument(getattr(request, "clip_skip", None))
        by_layers = features.clip_skip_by_layers(pipe, False)
        self.embeds: list[tuple[Any, Any]] = []  # (prompt embeds (1, T, D), pooled (1, P) or None)
        with device.inference(), features.clip_skip_layers(pipe, request.clip_skip if by_layers else None):
            for r in self.specs:
                kwargs: dict[str, Any] = {"prompt": r.prompt, "device": device.device, "num_images_per_prompt": 1,
                                          "do_classifier_free_guidance": False}
                if skip and not by_layers:
                    kwargs["clip_skip"] = skip
                out = pipe.encode_prompt(**kwargs)
                pooled = out[2] if len(out) > 2 else None  # SDXL: (embeds, negative, pooled, negative pooled)
                self.embeds.append((out[0], pooled))

    def meta(self) -> list[dict[str, Any]]:
        return [{"prompt": r.prompt, **({"mask": r.mask} if r.mask else {"box": list(r.box or ())}),
                 "area": round(float(m.mean()), 4)} for r, m in zip(self.specs, self.masks)]

    def _at(self, h: int, w: int, like: Any) -> list[tuple[Any, tuple[int, int, int, int]]]:
        """(weights (1, 1, h, w), crop (y0, y1, x0, x1)) per region at this latent size: the mask
        averaged down to the latent grid, feathered a sixteenth of the image past its edge."""
        import torch
        import torch.nn.functional as F

        if (h, w) not in self._latent_masks:
            out = []
            for mask in self.masks:
                m = F.interpolate(torch.from_numpy(mask)[None, None], size=(h, w), mode="area")  # (1, 1, h, w)
                if float(m.max()) <= 1e-3:  # smaller than one latent pixel: its nearest latent pixel
                    m = F.interpolate(torch.from_numpy(mask)[None, None], size=(h, w), mode="bilinear")
                    m = (m >= m.max()).float()
                m = _feather(m, max(1, round(min(h, w) / 16)))
                rows = torch.nonzero(m[0, 0].amax(dim=1) > 1e-3).flatten()
                cols = torch.nonzero(m[0, 0].amax(dim=0) > 1e-3).flatten()
                # the crop is the weights' bounding box as it is: diffusers' UNet takes any size (it
                # hands its upsamplers the skip connections' sizes), and growing the crop to the
                # UNet's downsampling multiple lets the region's object spill further past its edge
                y0, y1 = int(rows[0]), int(rows[-1]) + 1
                x0, x1 = int(cols[0]), int(cols[-1]) + 1
                out.append((m, (y0, y1, x0, x1)))
            self._latent_masks[(h, w)] = out
        return [(m.to(device=like.device, dtype=like.dtype), crop) for m, crop in self._latent_masks[(h, w)]]

    @contextlib.contextmanager
    def active(self, unet: Any) -> Iterator[None]:
        """The UNet predicts region by region for the duration (its forward wrapped)."""
        import torch

        original = unet.forward
        had_own = "forward" in unet.__dict__

        def forward(sample: Any, timestep: Any, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
            for key in ("down_block_additional_residuals", "mid_block_additional_residual",
                        "down_intrablock_additional_residuals"):
                if kwargs.get(key) is not None:  # check_static keeps these out; never blend them wrongly
                    raise UsageError("--region cannot be combined with ControlNet or T2I-Adapter guidance", "drop one")
            return_dict = kwargs.pop("return_dict", True)
            base = original(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]  # (B, C, h, w)
            h, w = sample.shape[-2:]
            total = torch.zeros_like(base)
            weight_sum = torch.zeros_like(base[:, :1])  # (B, 1, h, w)
            covered = torch.zeros_like(base[:, :1])
            for (embeds, pooled), (mask, (y0, y1, x0, x1)) in zip(self.embeds, self._at(h, w, base)):
                crop = sample[..., y0:y1, x0:x1]
                pred = self._predict(original, crop, timestep, encoder_hidden_states, embeds, pooled, args, kwargs)
                m = mask[..., y0:y1, x0:x1]  # (1, 1, ch, cw)
                total[..., y0:y1, x0:x1] += pred * m
                weight_sum[..., y0:y1, x0:x1] += m
                covered = torch.maximum(covered, mask)
            background = (1.0 - covered).clamp(min=0.0)  # the base prompt keeps what no region claims
            out = (total + base * background) / (weight_sum + background).clamp(min=1e-6)
            if not return_dict:
                return (out,)
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)

        unet.forward = forward
        try:
            yield
        finally:
            if had_own:
                unet.forward = original
            else:
                unet.__dict__.pop("forward", None)

    def _predict(self, original: Any, crop: Any, timestep: Any, context: Any, embeds: Any, pooled: Any,
                 args: tuple, kwargs: dict[str, Any]) -> Any:
        """The UNet's prediction on a crop, the region's prompt in the conditional rows (the
        unconditional rows keep the negative prompt's, as the pipeline encoded it)."""
        import torch

        batch = crop.shape[0]
        cond = batch // 2 if self.cfg and batch % 2 == 0 else 0  # rows before `cond` are unconditional
        embeds = embeds.to(device=crop.device, dtype=context.dtype if context is not None else crop.dtype)
        added = dict(kwargs.get("added_cond_kwargs") or {})
        if pooled is not None and "text_embeds" in added:  # SDXL: the pooled prompt vector conditions too
            text = added["text_embeds"].clone()
            text[cond:] = pooled.to(text.dtype)
            added["text_embeds"] = text

        def call(lo: int, hi: int, ctx: Any) -> Any:
            kw = {k: _rows(v, lo, hi, batch) for k, v in kwargs.items() if k != "added_cond_kwargs"}
            if added:
                kw["added_cond_kwargs"] = _rows(added, lo, hi, batch)
            return original(crop[lo:hi], _rows(timestep, lo, hi, batch), ctx, *args, return_dict=False, **kw)[0]

        rows = embeds.expand(batch - cond, -1, -1)
        if not cond:
            return call(0, batch, rows)
        if context.shape[1] == rows.shape[1]:
            return call(0, batch, torch.cat([context[:cond], rows]))
        # the pipeline's prompt was encoded to another length (compel's long prompts): two calls
        return torch.cat([call(0, cond, context[:cond]), call(cond, batch, rows)])


def _rows(value: Any, lo: int, hi: int, batch: int) -> Any:
    """Rows lo:hi of a per-row tensor (also inside dicts and lists); anything else as it is."""
    if isinstance(value, dict):
        return {k: _rows(v, lo, hi, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, lo, hi, batch) for v in value)
    if getattr(value, "ndim", 0) > 0 and value.shape[0] == batch and (lo, hi) != (0, batch):
        return value[lo:hi]
    return value


def _feather(mask: Any, band: int) -> Any:
    """The mask's weight carried `band` latent pixels past its edge, falling linearly to 0: where
    two regions meet, or a region meets the background, their predictions are averaged across
    the band instead of switching at one pixel (a hard switch leaves a visible seam: each crop's
    edge is an image border to the model). MultiDiffusion averages overlapping windows the same way."""
    import torch
    import torch.nn.functional as F

    out, grown = mask, mask
    for k in range(1, band + 1):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)  # the mask dilated by k latent pixels
        out = torch.maximum(out, grown * (1 - k / (band + 1)))
    return out
