"""Video: text-to-video, image-to-video, prompt travel, long clips and frame interpolation.

One `VideoPipeline` (task "video") over diffusers' video pipelines. Which diffusers class runs is
read from the model itself (model_index.json's `_class_name`, or the card's `pipeline:`), and a
"family" row below says what that class can do:

  animatediff  an SD 1.5 / SDXL base + a MotionAdapter (AnimateDiffPipeline, or a saved
               AnimateDiffPipeline folder). Prompt travel and long clips through FreeNoise
               (`enable_free_noise`: sliding context windows over the motion modules, per-frame
               prompt embeddings interpolated between keyframes); per-frame ControlNet through
               AnimateDiffControlNetPipeline; `--init` through AnimateDiffVideoToVideoPipeline
               (the still image repeated as a video and re-noised by `strength`).
  t2v-sd       ModelScope / zeroscope (TextToVideoSDPipeline, a UNet3D).
  svd          Stable Video Diffusion: animates `--init`, no prompt.
  i2vgen-xl    I2VGen-XL: `--init` + prompt.
  cogvideox, ltx, wan
               the transformer families; their image-to-video classes where diffusers has them
               (LTX's text-to-video weights also serve image-to-video; CogVideoX and Wan need
               their separate I2V checkpoints).

Frames come back as PIL images; `--interpolate K` then inserts K-1 flow-warped frames per pair
(pipelines/interpolate.py, no weights). The writer turns them into MP4/GIF/WebP/PNG frames.

Decoding is memory-aware: `_decode_plan` asks the device how much memory is free and picks the
VAE's decode chunk (frames decoded at once), slicing and tiling so a long clip decodes where the
denoiser fit; the pick is recorded in each output's metadata.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from studio import models
from studio.errors import InputFileError, UsageError
from studio.outputs import Result
from studio.pipeline import IMAGE_SUFFIXES, image_size, load_image, seeds_for
from studio.progress import quiet_libraries


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

FORMATS = ("mp4", "gif", "webp", "frames")


@dataclass(frozen=True)
class VideoRequest:
    prompt: str = ""  # what the clip shows (image-only models such as SVD take none)
    negative_prompt: str | None = None  # what to steer away from
    model: str = "auto"  # alias, hub id, local folder: an SD base, an AnimateDiff/T2V/SVD/... pipeline, or a motion adapter
    motion_adapter: str | None = None  # AnimateDiff motion module over an SD base (alias, hub id, folder)
    frames: int = 16  # frames the model generates (before --interpolate)
    fps: float | None = None  # playback frames/s of the file; None: the model's rate x interpolate
    width: int | None = None  # pixels; None: the model's native size
    height: int | None = None  # pixels; None: the model's native size
    steps: int = 25  # denoising steps
    guidance: float | None = None  # classifier-free guidance scale; None: the family's default
    seed: int | None = None  # noise seed (recorded); output i uses seed + i
    num_outputs: int = 1  # clips to generate, each with its own seed
    format: str = "mp4"  # mp4 | gif | webp | frames (a folder of numbered PNGs)
    init_image: str | None = None  # image-to-video: the first frame / the still to animate
    strength: float = 0.8  # AnimateDiff --init: how far the repeated still is re-noised (1 = ignore it)
    motion_bucket_id: int = 127  # SVD: amount of motion (higher moves more)
    noise_aug_strength: float = 0.02  # SVD: noise added to the init image (higher: less like it)
    prompt_map: Any = None  # prompt travel: {frame: prompt} or "0:a calm sea,16:a stormy sea"
    context_length: int | None = None  # FreeNoise window (frames); None: the motion adapter's native length
    context_stride: int = 4  # FreeNoise: frames between window starts
    controlnet: str | None = None  # ControlNet model (alias, hub id, folder) for per-frame conditioning
    control_frames: str | None = None  # folder of control images named by frame number (0.png, 0016.png, ...)
    control_scale: float = 1.0  # ControlNet conditioning scale
    interpolate: int = 1  # insert interpolate-1 flow-warped frames between each generated pair
    interpolate_method: str = "dis"  # dis | farneback (OpenCV optical flow)
    decode_chunk_size: int | None = None  # frames the VAE decodes at once; None: fit to free memory
    adapters: tuple[str, ...] = ()  # LoRAs "PATH_OR_ID[:SCALE]" for the SD base / denoiser (diffusers format)


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """What one diffusers video class needs and can do."""

    name: str
    t2v: str | None  # diffusers class for text-to-video (None: image-only)
    i2v: str | None  # diffusers class for --init (None: no image input)
    i2v_same_weights: bool  # the t2v weights also serve the i2v class (from_pipe)
    fps: float  # the rate the model was trained at (default playback rate)
    guidance: float  # the family's usual guidance
    size_multiple: int = 8  # width/height must be multiples of this
    frame_rule: tuple[int, int] | None = None  # frames must be a*k + b (temporal VAE compression)
    takes_prompt: bool = True
    width: int | None = None  # native size when the pipeline has no sample_size to read
    height: int | None = None


FAMILIES: dict[str, Family] = {
    "animatediff": Family("animatediff", "AnimateDiffPipeline", "AnimateDiffVideoToVideoPipeline", True, 8, 7.5),
    "animatediff-sdxl": Family("animatediff-sdxl", "AnimateDiffSDXLPipeline", None, False, 8, 5.0),
    "t2v-sd": Family("t2v-sd", "TextToVideoSDPipeline", None, False, 8, 9.0),
    "svd": Family("svd", None, "StableVideoDiffusionPipeline", False, 7, 3.0, takes_prompt=False),
    "i2vgen-xl": Family("i2vgen-xl", None, "I2VGenXLPipeline", False, 8, 9.0),
    "cogvideox": Family("cogvideox", "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", False, 8, 6.0,
                        16, (4, 1), width=720, height=480),
    "ltx": Family("ltx", "LTXPipeline", "LTXImageToVideoPipeline", True, 24, 3.0, 32, (8, 1), width=704, height=480),
    "wan": Family("wan", "WanPipeline", "WanImageToVideoPipeline", False, 16, 5.0, 16, (4, 1), width=832, height=480),
}

# model_index.json `_class_name` -> (family, whether the saved class is the image-to-video one)
CLASS_FAMILY: dict[str, tuple[str, bool]] = {
    "StableDiffusionPipeline": ("animatediff", False),  # an SD base: needs a motion adapter
    "StableDiffusionXLPipeline": ("animatediff-sdxl", False),
    "AnimateDiffPipeline": ("animatediff", False),
    "AnimateDiffSDXLPipeline": ("animatediff-sdxl", False),
    "TextToVideoSDPipeline": ("t2v-sd", False),
    "VideoToVideoSDPipeline": ("t2v-sd", False),
    "StableVideoDiffusionPipeline": ("svd", True),
    "I2VGenXLPipeline": ("i2vgen-xl", True),
    "CogVideoXPipeline": ("cogvideox", False),
    "CogVideoXImageToVideoPipeline": ("cogvideox", True),
    "LTXPipeline": ("ltx", False),
    "LTXImageToVideoPipeline": ("ltx", True),
    "WanPipeline": ("wan", False),
    "WanImageToVideoPipeline": ("wan", True),
}

# AnimateDiff's reference sampler (guoyww's configs and diffusers' docs): DDIM, linear betas.
ANIMATEDIFF_SCHEDULER = {"clip_sample": False, "timestep_spacing": "linspace", "beta_schedule": "linear",
                         "steps_offset": 1}


def _read_json(spec: models.ModelSpec, filename: str) -> dict[str, Any] | None:
    """A JSON file at the root of a model (local folder, cached snapshot or the hub); None if absent."""
    if spec.kind == "file":
        return None
    if spec.is_local or spec.offline or models.is_offline():
        path = Path(spec.location()) / filename
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(spec.source, filename, revision=spec.revision)).read_text(encoding="utf-8"))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # network, gated repo, unknown id
        raise models.ModelNotAvailable(f"could not read {filename} of {spec.alias or spec.source}: {exc}".splitlines()[0],
                                       f"check the id and your network, or `studio models pull {spec.alias or spec.source}`") from exc


def _class_name(spec: models.ModelSpec) -> str:
    """The diffusers class a model was saved as: the card's `pipeline:` wins, then model_index.json,
    then config.json (a lone MotionAdapter or ControlNet)."""
    if spec.card.get("pipeline"):
        return str(spec.card["pipeline"])
    if spec.kind == "file":
        raise UsageError(f"{Path(spec.source).name} is a single checkpoint file",
                         "video models load from diffusers folders (model_index.json); pass the folder or a hub id")
    for filename in ("model_index.json", "config.json"):
        data = _read_json(spec, filename)
        if data and data.get("_class_name"):
            return str(data["_class_name"])
    raise UsageError(f"{spec.alias or spec.source} has no model_index.json or config.json naming a diffusers class",
                     "pass a diffusers video model folder or hub id (`studio models list --task video`)")


def _diffusers_class(name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UsageError(f"this diffusers ({diffusers.__version__}) has no {name}", "upgrade diffusers")
    return cls


def _sub_spec(name: str, parent: models.ModelSpec, task: str | None = "video") -> models.ModelSpec:
    """Resolve a second model (motion adapter, ControlNet, AnimateDiff base) with the parent's safety flags."""
    return models.resolve(name, task=task, allow_pickle=parent.allow_pickle,
                          trust_remote_code=parent.trust_remote_code, offline=parent.offline or None)


def parse_prompt_map(value: Any, default_prompt: str = "") -> dict[int, str] | None:
    """{frame: prompt} from a dict (presets; JSON sidecars turn keys into strings) or from
    "0:a calm sea,16:a stormy sea". Commas inside a prompt are kept: the text is split only at a
    comma followed by `N:`."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        parts = re.split(r",\s*(?=\d+\s*:)", value.strip())
        items = []
        for part in parts:
            frame, sep, prompt = part.partition(":")
            if not sep or not frame.strip().isdigit():
                raise UsageError(f"bad prompt map entry {part!r}", 'write FRAME:PROMPT pairs, e.g. "0:a calm sea,16:a stormy sea"')
            items.append((frame.strip(), prompt.strip()))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise UsageError(f"prompt_map must be a mapping or a string, not {type(value).__name__}",
                         'e.g. prompt_map: {0: "a calm sea", 16: "a stormy sea"}')
    out: dict[int, str] = {}
    for frame, prompt in items:
        try:
            index = int(frame)
        except (TypeError, ValueError):
            raise UsageError(f"prompt map key {frame!r} is not a frame number", "keys are frame numbers from 0") from None
        if index < 0:
            raise UsageError(f"prompt map frame {index} is negative", "frames count from 0")
        if not str(prompt).strip():
            raise UsageError(f"prompt map frame {index} has an empty prompt", "give each keyframe a prompt")
        out[index] = str(prompt).strip()
    if 0 not in out:
        if not default_prompt:
            raise UsageError("the prompt map has no prompt for frame 0", "add `0:...` or give the prompt argument")
        out[0] = default_prompt  # the positional prompt opens the clip
    return dict(sorted(out.items()))


def _frame_number(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def load_control_frames(folder: str | Path, frames: int, size: tuple[int, int]) -> tuple[list[Any], list[int]]:
    """One control image per frame from a folder of images named by frame number. Frames between
    keyframes hold the previous keyframe's image (frames before the first hold the first), the
    way animatediff-cli fills sparse control folders. Returns (images, keyframe numbers)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputFileError(f"control frames folder {folder} does not exist", "pass a folder of images named by frame number")
    numbered = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        index = _frame_number(path)
        if index is None:
            raise InputFileError(f"control image {path.name} has no frame number in its name", "name them 0.png, 0008.png, ...")
        if index in numbered:
            raise InputFileError(f"two control images for frame {index} ({numbered[index].name}, {path.name})", "keep one per frame")
        numbered[index] = path
    if not numbered:
        raise InputFileError(f"{folder} holds no control images", "add images named by frame number (0.png, 8.png, ...)")
    late = [i for i in numbered if i >= frames]
    if late:
        raise UsageError(f"control image for frame {late[0]} is past the clip's {frames} frames", "raise --frames or remove it")
    keys = sorted(numbered)
    images = {i: load_image(numbered[i], what="control image", max_size=size, cover=True).resize(size) for i in keys}
    out, current = [], images[keys[0]]
    for f in range(frames):
        current = images.get(f, current)
        out.append(current)
    return out, keys


# ----------------------------------------------------------------------------- checks before loading
def _check_ranges(request: VideoRequest, size_multiple: int, family: str | None) -> None:
    """The request's own ranges, and sizes as multiples of `size_multiple`: nothing here needs
    the weights (check_request runs it before they load, check_inputs again with the loaded rules)."""
    if request.format not in FORMATS:
        raise UsageError(f"unknown video format {request.format!r}", f"use one of {', '.join(FORMATS)}")
    for name, value, low in (("frames", request.frames, 1), ("steps", request.steps, 1),
                             ("num_outputs", request.num_outputs, 1), ("context_stride", request.context_stride, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= {low}, not {value!r}", "pass a positive number")
    if request.fps is not None and not (0 < float(request.fps) <= 240):
        raise UsageError(f"--fps must be in (0, 240], not {request.fps}", "8 to 30 is usual")
    from studio.pipelines.interpolate import check_factor

    check_factor(request.interpolate, request.interpolate_method)
    if request.interpolate > 1 and request.frames < 2:
        raise UsageError("--interpolate needs at least 2 frames", "raise --frames")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None and (not isinstance(value, int) or value < size_multiple or value % size_multiple):
            raise UsageError(f"--{name} {value} must be a multiple of {size_multiple} for {family or 'video'} models",
                             f"try {max(size_multiple, round((value or 0) / size_multiple) * size_multiple)}")
    if request.decode_chunk_size is not None and request.decode_chunk_size < 1:
        raise UsageError("--decode-chunk-size must be >= 1", "or leave it out to fit free memory")


@dataclass(frozen=True)
class _VideoProfile:
    """What a video model's config files say about sizes and memory, read before its weights load
    (local folders and cached snapshots only: studio.limits.read_config). Unknown (a hub model not
    downloaded yet): SD 1.5 AnimateDiff's numbers."""

    family: str | None = None  # FAMILIES name, when the class is known
    multiple: int = 8  # width/height multiple (the family's floor; check_inputs re-checks the loaded model's)
    scale: int = 8  # pixels per latent pixel side (VAE downscale x transformer patch)
    time: int = 1  # frames per latent frame (the transformer families' temporal VAE compression)
    default: tuple[int, int] = (512, 512)  # native size when the request gives none
    vae: tuple[int, int] = (128, 256)  # the VAE decoder's channels at full and half resolution
    width: int = 320  # the denoiser's activations per latent pixel (UNet's first level; transformer's width)
    heads: int = 8  # attention heads (for --attention math)
    guidance: float = 7.5  # the family's default guidance (above 1: two passes per step)
    values: int = 0  # parameters of the weights (0: unknown)

    @classmethod
    def of(cls, spec: models.ModelSpec | None) -> "_VideoProfile":
        from studio.limits import read_config, weight_values

        if spec is None:
            return cls()
        name = str(spec.card.get("pipeline") or read_config(spec, "model_index.json").get("_class_name")
                   or read_config(spec, "config.json").get("_class_name") or "")
        values = weight_values(spec)
        holder = spec  # the folder whose unet/ and vae/ configs describe the denoiser
        if name == "MotionAdapter":
            base = (spec.card.get("components") or {}).get("base")
            try:
                holder = _sub_spec(str(base), spec, task="image") if base else None
            except UsageError:
                holder = None
            values += weight_values(holder) if holder is not None else 0
            family = FAMILIES["animatediff"]
        elif name in CLASS_FAMILY:
            family = FAMILIES[CLASS_FAMILY[name][0]]
        else:
            return cls(values=values)
        vae = read_config(holder, "vae/config.json") if holder is not None else {}
        unet = read_config(holder, "unet/config.json") if holder is not None else {}
        transformer = read_config(holder, "transformer/config.json") if holder is not None else {}
        channels = list(vae.get("decoder_block_out_channels") or vae.get("block_out_channels") or [])
        vae_channels = (int(channels[0]), int(channels[1] if len(channels) > 1 else channels[0])) if channels else cls.vae
        if family.frame_rule is None:  # the UNet families: latent pixels = pixels / 2**(VAE levels - 1)
            scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae.get("block_out_channels") else 8
            blocks = list(unet.get("block_out_channels") or [320])
            head_dim = unet.get("attention_head_dim") or 8
            heads = unet.get("num_attention_heads") or (blocks[0] // head_dim if isinstance(head_dim, int) else 8)
            side = unet.get("sample_size")
            default = ((int(side[1]) * scale, int(side[0]) * scale) if isinstance(side, (list, tuple))
                       else (int(side) * scale,) * 2 if side else (family.width or 512, family.height or 512))
            return cls(family=family.name, multiple=family.size_multiple, scale=scale, default=default, vae=vae_channels,
                       width=int(blocks[0]), heads=int(heads[0] if isinstance(heads, (list, tuple)) else heads),
                       guidance=family.guidance, values=values)
        heads = int(transformer.get("num_attention_heads") or 8)
        return cls(family=family.name, multiple=family.size_multiple, scale=family.size_multiple, time=family.frame_rule[0],
                   default=(family.width or 512, family.height or 512), vae=vae_channels,
                   width=heads * int(transformer.get("attention_head_dim") or 64), heads=heads,
                   guidance=family.guidance, values=values)

    def check_memory(self, request: VideoRequest, spec: models.ModelSpec | None, device: DeviceManager) -> dict[str, Any]:
        """The peak of one clip (clips are made one at a time), against free memory.

        Denoising runs every latent frame at once (AnimateDiff's FreeNoise windows only its motion
        modules; the spatial layers still see all frames): measured on a tiny AnimateDiff (UNet
        widths 16/32, 32x32 px) at 64-1024 frames, 0.9-1.3 MB a frame = about 36 tensors of the
        UNet's first width per latent pixel and pass (two passes with guidance). Decoding goes a
        chunk of frames at a time (at least one frame's VAE pass, image.py's formula), then every
        frame is held as floats and as an image (~15 bytes a pixel), interpolated frames as images."""
        from studio.limits import check_fits, element_size

        elem = element_size(device)
        w, h = int(request.width or self.default[0]), int(request.height or self.default[1])
        pixels, frames = w * h, int(request.frames)
        guidance = self.guidance if request.guidance is None else float(request.guidance)
        passes = 2 if guidance > 1 else 1
        tokens = pixels / self.scale**2  # per latent frame
        latent_frames = -(-frames // self.time)
        per_frame = passes * tokens * self.width * elem * 36 / self.time
        denoise = per_frame * frames
        attention = getattr(getattr(device, "resolved", None), "attention", "sdpa")
        if attention == "math":  # the full (tokens x tokens) matrices SDPA never holds
            n = latent_frames * tokens if self.time > 1 else tokens
            denoise += passes * self.heads * n**2 * elem * (1 if self.time > 1 else latent_frames)
        c0, c1 = self.vae
        held_per_frame = pixels * (15 + 3 * max(1, int(request.interpolate)))
        decode = pixels * (elem * (4.5 * c0 + c1) + 100) + held_per_frame * frames
        work = max(denoise, decode)

        def hint(room: float) -> str:
            fit = int(room // max(per_frame, held_per_frame, 1))
            fewer = f"--frames {fit} or fewer" if 1 <= fit < frames else "fewer --frames"
            return f"{fewer} at {w}x{h}, or a smaller --width/--height (longer clips: generate parts, or --interpolate)"

        return check_fits(task="video", spec=spec, device=device, work=work, weights=self.values * elem,
                          what=f"{frames} frames at {w}x{h}", hint=hint)


# ----------------------------------------------------------------------------- the pipeline
class VideoPipeline:
    task = "video"
    request_type = VideoRequest

    def __init__(self, spec: models.ModelSpec, device: DeviceManager, family: Family, class_name: str, pipe: Any = None):
        self.spec = spec
        self.device = device
        self.family = family
        self.class_name = class_name  # what the model was saved as
        self.pipe = pipe  # the loaded diffusers pipeline (None for an SD base until an adapter is known)
        self._variants: dict[tuple, Any] = {}  # (kind, model specs) -> derived pipelines, built once
        self._needs_adapter = class_name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "MotionAdapter")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, spec: models.ModelSpec, device: DeviceManager) -> "VideoPipeline":
        class_name = _class_name(spec)
        if class_name == "MotionAdapter":
            # a motion adapter named as the model (e.g. the animatediff-v3 card): its base comes
            # from the card's `components: {base: ...}`, loaded once an adapter is combined in run()
            return cls(spec, device, FAMILIES["animatediff"], class_name)
        if class_name not in CLASS_FAMILY:
            raise UsageError(f"{spec.alias or spec.source} is a {class_name}, not a video model studio runs",
                             f"video classes: {', '.join(sorted(CLASS_FAMILY))} (an SD base needs --motion-adapter)")
        family = FAMILIES[CLASS_FAMILY[class_name][0]]
        self = cls(spec, device, family, class_name)
        if not self._needs_adapter:
            with models.loading(spec, "video model"), quiet_libraries():
                pipe = _diffusers_class(class_name).from_pretrained(spec.location(), **spec.load_kwargs(library="diffusers"))
            self.pipe = self._prepare(pipe)
        return self

    def _prepare(self, pipe: Any) -> Any:
        pipe.set_progress_bar_config(disable=True)  # studio's own bar shows the steps
        # loading and the precision cast make diffusers warn "modules in UNetMotionModel should be
        # kept in float32: []" (there are none): noise on stderr, printed even under --quiet
        with quiet_libraries():
            return self.device.prepare(pipe)

    @property
    def is_i2v_model(self) -> bool:
        return CLASS_FAMILY.get(self.class_name, ("", False))[1]

    def _base_and_adapter(self, request: VideoRequest) -> tuple[models.ModelSpec, models.ModelSpec]:
        """(SD base, motion adapter) for an AnimateDiff run on a base model or a lone adapter."""
        if self.class_name == "MotionAdapter":
            if request.motion_adapter:
                raise UsageError(f"{self.spec.alias or self.spec.name} is itself a motion adapter",
                                 "pass the SD base with --model and the adapter with --motion-adapter")
            base = (self.spec.card.get("components") or {}).get("base")
            if not base:
                raise UsageError(f"{self.spec.alias or self.spec.name} is a motion adapter and names no base model",
                                 "pass --model BASE --motion-adapter ADAPTER (e.g. --model sd15 --motion-adapter animatediff-v3)")
            return _sub_spec(str(base), self.spec, task="image"), self.spec
        if request.motion_adapter:
            return self.spec, _sub_spec(request.motion_adapter, self.spec)
        # the layout `make-tiny animatediff` and AnimateDiffPipeline saves use: motion_adapter/ inside
        if self.spec.is_local and (Path(self.spec.source) / "motion_adapter" / "config.json").is_file():
            return self.spec, _sub_spec(str(Path(self.spec.source) / "motion_adapter"), self.spec)
        raise UsageError(f"{self.spec.alias or self.spec.name} is a Stable Diffusion base: AnimateDiff needs a motion adapter",
                         "add --motion-adapter animatediff-v3 (or a MotionAdapter folder / hub id)")

    def _animatediff(self, request: VideoRequest) -> Any:
        """The AnimateDiff pipeline for this request: the loaded one, or base + adapter (cached)."""
        if not self._needs_adapter:
            if request.motion_adapter:
                raise UsageError(f"{self.spec.alias or self.spec.name} already holds its motion modules ({self.class_name})",
                                 "drop --motion-adapter, or pass an SD base with --model")
            return self.pipe
        base, adapter = self._base_and_adapter(request)
        key = ("animatediff", base, adapter)
        if key not in self._variants:
            from diffusers import DDIMScheduler, MotionAdapter

            with models.loading(adapter, "motion adapter"), quiet_libraries():
                motion = MotionAdapter.from_pretrained(adapter.location(), **adapter.load_kwargs(library="diffusers-model"))
            base_class = _class_name(base)
            cls_name = {"StableDiffusionPipeline": "AnimateDiffPipeline",
                        "StableDiffusionXLPipeline": "AnimateDiffSDXLPipeline"}.get(base_class)
            if cls_name is None:
                raise UsageError(f"AnimateDiff's base must be a Stable Diffusion 1.5 or SDXL model, not a {base_class}",
                                 "pass an SD base with --model (e.g. sd15)")
            with models.loading(base, "AnimateDiff base model"), quiet_libraries():
                # diffusers turns the base's UNet2D into a UNetMotionModel with the adapter's motion modules
                pipe = _diffusers_class(cls_name).from_pretrained(base.location(), motion_adapter=motion,
                                                                  **base.load_kwargs(library="diffusers"))
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **ANIMATEDIFF_SCHEDULER)
            self._variants[key] = self._prepare(pipe)
        return self._variants[key]

    def _controlnet_pipe(self, base_pipe: Any, request: VideoRequest) -> Any:
        cn_spec = _sub_spec(request.controlnet, self.spec, task=None)
        key = ("controlnet", id(base_pipe), cn_spec)
        if key not in self._variants:
            from diffusers import AnimateDiffControlNetPipeline, ControlNetModel

            with models.loading(cn_spec, "ControlNet"), quiet_libraries():
                controlnet = ControlNetModel.from_pretrained(cn_spec.location(), **cn_spec.load_kwargs(library="diffusers-model"))
            controlnet = self.device.prepare(controlnet)
            pipe = AnimateDiffControlNetPipeline.from_pipe(base_pipe, controlnet=controlnet)
            pipe.set_progress_bar_config(disable=True)
            self._variants[key] = pipe
        return self._variants[key]

    def _i2v_pipe(self, base_pipe: Any) -> Any:
        """The image-to-video class over the same weights (AnimateDiff video2video, LTX I2V)."""
        key = ("i2v", id(base_pipe))
        if key not in self._variants:
            pipe = _diffusers_class(self.family.i2v).from_pipe(base_pipe)
            pipe.set_progress_bar_config(disable=True)
            self._variants[key] = pipe
        return self._variants[key]

    # ------------------------------------------------------------------ checks
    def _rules(self) -> tuple[int, tuple[int, int] | None]:
        """(size multiple, frames rule a*k+b) of the loaded model: the transformer families read
        them off the pipeline (VAE compression x patch size), since variants differ (LTX 0.9.x
        compresses time 8x, a custom VAE may not); the family table is the fallback."""
        fam, pipe = self.family, self.pipe
        if pipe is None or fam.frame_rule is None:
            return fam.size_multiple, fam.frame_rule
        spatial = (getattr(pipe, "vae_spatial_compression_ratio", None) or getattr(pipe, "vae_scale_factor_spatial", None))
        temporal = (getattr(pipe, "vae_temporal_compression_ratio", None) or getattr(pipe, "vae_scale_factor_temporal", None))
        patch = getattr(pipe, "transformer_spatial_patch_size", None)
        if patch is None:
            cfg_patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
            patch = cfg_patch[-1] if isinstance(cfg_patch, (list, tuple)) else cfg_patch
        # the family's multiple is the floor: the pipelines check it themselves (LTX: 32)
        multiple = max(fam.size_multiple, int(spatial * (patch or 1))) if spatial else fam.size_multiple
        rule = (int(temporal), 1) if temporal else fam.frame_rule
        return multiple, rule

    @classmethod
    def check_request(cls, request: VideoRequest, spec: models.ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): ranges,
        sizes against the family's multiple, and with a device, whether the clip fits in memory
        (studio/limits.py). The frame rule and what depends on the loaded class stay in check_inputs."""
        profile = _VideoProfile.of(spec)
        _check_ranges(request, profile.multiple, profile.family)
        if device is not None:
            profile.check_memory(request, spec, device)

    def check_inputs(self, request: VideoRequest) -> None:
        fam = self.family
        label = self.spec.alias or self.spec.name
        size_multiple, frame_rule = self._rules()
        _check_ranges(request, size_multiple, fam.name)
        playback = float(request.fps) if request.fps else float(fam.fps) * max(1, int(request.interpolate or 1))
        if request.format == "gif" and playback > 50:
            # GIF delays are whole centiseconds, and browsers slow a 0 or 1 cs delay to 10 cs
            raise UsageError(f"a GIF cannot play at {playback:g} fps (its frame delays are whole centiseconds "
                             "and browsers slow delays under 2 cs to 10 cs)", "use --format mp4 or webp, or --fps 50 or less")
        if frame_rule:
            a, b = frame_rule
            if (request.frames - b) % a:
                k = max(1, round((request.frames - b) / a))
                raise UsageError(f"{label} generates {a}k+{b} frames (its VAE compresses time {a}x), not {request.frames}",
                                 f"use --frames {a * k + b}")

        # prompt and image
        has_init = bool(request.init_image)
        if fam.takes_prompt and not (request.prompt or "").strip() and not request.prompt_map:
            raise UsageError(f"{label} needs a prompt", 'give one: studio video "a boat on a calm sea"')
        if not fam.takes_prompt and (request.prompt or "").strip():
            raise UsageError(f"{label} ({fam.name}) animates the --init image and takes no prompt", "drop the prompt")
        if has_init:
            image_size(request.init_image, what="--init image")  # missing, unreadable or too large: from the header
            if fam.i2v is None:
                raise UsageError(f"{label} ({fam.name}) has no image-to-video mode",
                                 "use an image-to-video model: svd, an AnimateDiff model, or an LTX/Wan/CogVideoX I2V checkpoint")
            if not self.is_i2v_model and not fam.i2v_same_weights:
                raise UsageError(f"{label} is a text-to-video {fam.name} checkpoint; --init needs its image-to-video checkpoint",
                                 f"pass an {fam.i2v} model with --model")
            if not 0.0 < request.strength <= 1.0:
                raise UsageError(f"--strength must be in (0, 1], not {request.strength}", "0.6-0.9 keeps the still recognisable")
        elif self.is_i2v_model:
            raise UsageError(f"{label} is an image-to-video model ({self.class_name})", "pass the first frame with --init IMAGE")

        # AnimateDiff-only features
        animatediff = fam.name.startswith("animatediff")
        travel = parse_prompt_map(request.prompt_map, request.prompt)
        if travel is not None:
            if not animatediff:
                raise UsageError(f"prompt travel needs an AnimateDiff model (FreeNoise prompt interpolation); {label} is {fam.name}",
                                 "use --model animatediff-v3 (or an SD base with --motion-adapter)")
            late = [f for f in travel if f >= request.frames]
            if late:
                raise UsageError(f"prompt map frame {late[0]} is past the clip's {request.frames} frames (0..{request.frames - 1})",
                                 f"raise --frames above {late[0]} or move the keyframe")
        if request.context_length is not None:
            if not animatediff:
                raise UsageError(f"--context-length applies to AnimateDiff's sliding windows; {label} is {fam.name}", "drop it")
            if request.context_length < 2 or request.context_length > request.frames:
                raise UsageError(f"--context-length must be 2..{request.frames} (the clip's frames), not {request.context_length}",
                                 "16 matches AnimateDiff's training length")
        if bool(request.controlnet) != bool(request.control_frames):
            raise UsageError("--controlnet and --control-frames go together", "pass both: a ControlNet model and a folder of control images")
        if request.controlnet:
            if fam.name != "animatediff":
                raise UsageError(f"per-frame ControlNet needs an SD 1.5 AnimateDiff model; {label} is {fam.name}",
                                 "use --model animatediff-v3 with --controlnet")
            if has_init:
                raise UsageError("--init and --controlnet cannot be combined here", "use one of them")
            if not Path(request.control_frames).expanduser().is_dir():
                raise InputFileError(f"control frames folder {request.control_frames} does not exist",
                                     "pass a folder of images named by frame number")

    # ------------------------------------------------------------------ running
    def run(self, request: VideoRequest, progress: Progress) -> Iterator[Result]:
        """Yields each clip as soon as it is made (the engine writes it and lets its frames go)."""
        import torch

        from studio.pipelines.interpolate import interpolate_frames

        # 1. check inputs
        self.check_inputs(request)
        fam = self.family
        travel = parse_prompt_map(request.prompt_map, request.prompt)

        # 2. pick the diffusers pipeline for this request
        base = self._animatediff(request) if fam.name.startswith("animatediff") else self.pipe
        # LoRAs go on the base: from_pipe variants below share its UNet, so they see them too.
        # One LoraSet per base pipeline keeps loaded adapters between runs (exactly those asked are active).
        from studio.adapters.lora import LoraSet, parse_lora

        loras = self.__dict__.setdefault("_loras", {})
        if request.adapters or id(base) in loras:
            lora_set = loras.setdefault(id(base), LoraSet(base, base_label=self.spec.alias or self.spec.name))
            lora_records = lora_set.apply([parse_lora(a) for a in request.adapters],
                                          allow_pickle=self.spec.allow_pickle, offline=self.spec.offline)
        else:
            lora_records = []
        pipe, mode = base, "text-to-video"
        if request.init_image:
            mode = "image-to-video"
            pipe = base if self.is_i2v_model else self._i2v_pipe(base)
        elif request.controlnet:
            pipe, mode = self._controlnet_pipe(base, request), "controlnet"

        # 3. sizes, rates and guidance this run resolves to (recorded in the outputs)
        width, height = self._size(pipe, request)
        interp = request.interpolate
        fps = float(request.fps) if request.fps else float(fam.fps) * interp
        guidance = fam.guidance if request.guidance is None else float(request.guidance)
        # a large still is shrunk while it is opened (only as far as it still covers the clip's size)
        init = (load_image(request.init_image, what="--init image", max_size=(width, height), cover=True).resize((width, height))
                if request.init_image else None)

        # 4. long clips and prompt travel: FreeNoise sliding windows over the motion modules
        free_noise = self._set_free_noise(pipe, request, travel) if fam.name.startswith("animatediff") else None

        # 5. memory-aware decoding
        decode = self._decode_plan(pipe, request, width, height)

        # 6. call arguments shared by every output
        kwargs = self._call_kwargs(pipe, request, width, height, guidance, fps / interp, init, travel)
        control_keys = None
        if request.controlnet:
            kwargs["conditioning_frames"], control_keys = load_control_frames(request.control_frames, request.frames, (width, height))
            kwargs["controlnet_conditioning_scale"] = float(request.control_scale)
        if "decode_chunk_size" in self._params(pipe):
            kwargs["decode_chunk_size"] = decode["chunk"]

        # 7. generate: one clip per seed
        base_seed = request.seed if request.seed is not None else 0
        for index, seed in enumerate(seeds_for(base_seed, request.num_outputs)):
            handle = progress.task(f"video {index + 1}/{request.num_outputs}" if request.num_outputs > 1 else "video",
                                   total=request.steps)
            call = dict(kwargs, generator=self.device.generator(seed))
            self._progress_kwargs(pipe, progress, handle, call)
            with self.device.inference():
                try:
                    output = pipe(**call)
                except ValueError as exc:  # the pipeline's own input checks (sizes, frame counts)
                    raise UsageError(f"{type(pipe).__name__} refused the request: {str(exc).splitlines()[0]}",
                                     "check --frames/--width/--height against the model card (`studio models info`)") from exc
                except torch.cuda.OutOfMemoryError as exc:
                    from studio.errors import RuntimeFailure

                    raise RuntimeFailure("out of GPU memory while generating the clip",
                                         "lower --frames, --width/--height or --decode-chunk-size, or use --offload model") from exc
            handle.finish()
            frames = _to_pil_frames(output.frames)
            generated = len(frames)

            # 8. frame interpolation (no weights)
            if interp > 1:
                ih = progress.task("interpolating", total=len(frames) - 1)
                frames = interpolate_frames(frames, interp, method=request.interpolate_method, on_pair=ih.advance)

            params = dataclasses.asdict(request)
            params.update(seed=seed, width=frames[0].width, height=frames[0].height, fps=round(fps, 4), guidance=guidance,
                          prompt_map=travel, init_image=str(request.init_image) if request.init_image else None)
            extra = {"video": {"family": fam.name, "pipeline": type(pipe).__name__, "mode": mode,
                               "generated_frames": generated, "frames": len(frames), "free_noise": free_noise,
                               "decode": decode, "control_keyframes": control_keys}}
            if lora_records:
                extra["adapters"] = lora_records
            yield Result(kind="video", value=frames, params=params, fmt=request.format, extra=extra)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _params(pipe: Any) -> set[str]:
        return set(inspect.signature(type(pipe).__call__).parameters)

    def _size(self, pipe: Any, request: VideoRequest) -> tuple[int, int]:
        """(width, height): asked for, else the card's defaults, else the model's native size."""
        if request.width and request.height:
            return request.width, request.height
        unet = getattr(pipe, "unet", None)
        native = None
        if unet is not None and getattr(unet.config, "sample_size", None):
            side, f = unet.config.sample_size, pipe.vae_scale_factor
            native = (side * f, side * f) if isinstance(side, int) else (side[1] * f, side[0] * f)  # (h, w) configs
        if native is None:
            native = (self.family.width or 512, self.family.height or 512)
        return request.width or native[0], request.height or native[1]

    def _set_free_noise(self, pipe: Any, request: VideoRequest, travel: dict[int, str] | None) -> dict[str, Any] | None:
        """Turn FreeNoise on for clips longer than the adapter's native length or with a prompt
        map (diffusers interpolates per-frame prompt embeddings only on its FreeNoise path), and
        off otherwise: the setting lives in the UNet, which cached pipelines share."""
        if not hasattr(pipe, "enable_free_noise"):
            if travel or request.frames > self._native_frames(pipe):
                raise UsageError(f"{type(pipe).__name__} has no FreeNoise support for long clips or prompt travel",
                                 f"keep --frames <= {self._native_frames(pipe)} and drop --prompt-map")
            return None
        native = self._native_frames(pipe)
        wanted = bool(travel) or request.frames > native or request.context_length is not None
        if not wanted:
            _disable_free_noise(pipe)
            return None
        context = min(request.context_length or native, request.frames)
        pipe.enable_free_noise(context_length=context, context_stride=request.context_stride)
        return {"context_length": context, "context_stride": request.context_stride, "prompt_travel": bool(travel)}

    @staticmethod
    def _native_frames(pipe: Any) -> int:
        # AnimateDiff v1.5 adapters hold 32 positions but were trained on 16-frame clips
        adapter = getattr(pipe, "motion_adapter", None)
        max_len = getattr(getattr(adapter, "config", None), "motion_max_seq_length", 32) if adapter is not None else 32
        return min(16, int(max_len))

    def _decode_plan(self, pipe: Any, request: VideoRequest, width: int, height: int) -> dict[str, Any]:
        """How the VAE decodes: frames at once (decode_chunk_size), slicing, tiling. Sized from the
        memory free on the device so long clips decode where the denoiser fit."""
        import torch

        vae = getattr(pipe, "vae", None)
        dev = self.device.device
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
        else:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        elem = torch.finfo(self.device.dtype).bits // 8
        channels = 128
        if vae is not None and getattr(vae.config, "block_out_channels", None):
            channels = int(vae.config.block_out_channels[0])
        # peak decoder activations per frame: about 8 full-resolution tensors of the first block's width
        per_frame = 8 * channels * width * height * elem
        budget = int(free * 0.5)
        chunk = request.decode_chunk_size or max(1, min(request.frames, budget // max(per_frame, 1)))
        tiling = per_frame > budget  # one frame alone would not fit: decode it in tiles
        # pipelines without a decode_chunk_size argument decode every frame in one call; slicing
        # splits that batch when it would not fit
        slicing = "decode_chunk_size" not in self._params(pipe) and chunk < request.frames
        if vae is not None:
            if hasattr(vae, "use_tiling"):
                vae.use_tiling = tiling
            else:
                tiling = False
            if hasattr(vae, "use_slicing"):
                vae.use_slicing = slicing
            else:
                slicing = False
        return {"chunk": int(chunk), "slicing": slicing, "tiling": tiling, "free_mb": free // 2**20,
                "per_frame_mb": round(per_frame / 2**20, 1)}

    def _call_kwargs(self, pipe: Any, request: VideoRequest, width: int, height: int, guidance: float,
                     model_fps: float, init: Any, travel: dict[int, str] | None) -> dict[str, Any]:
        params = self._params(pipe)
        fam = self.family
        kw: dict[str, Any] = {"height": height, "width": width, "num_inference_steps": request.steps, "output_type": "pil"}
        if "num_frames" in params:
            kw["num_frames"] = request.frames
        if fam.takes_prompt:
            kw["prompt"] = travel if travel else request.prompt
            if request.negative_prompt and "negative_prompt" in params:
                kw["negative_prompt"] = request.negative_prompt
        if fam.name == "svd":
            # SVD's guidance ramps from min to max across frames
            kw.update(max_guidance_scale=guidance, min_guidance_scale=min(1.0, guidance), fps=max(1, round(model_fps) - 1),
                      motion_bucket_id=request.motion_bucket_id, noise_aug_strength=request.noise_aug_strength)
        else:
            kw["guidance_scale"] = guidance
        if "target_fps" in params:  # I2VGen-XL conditions on the frame rate
            kw["target_fps"] = max(1, round(model_fps))
        if "frame_rate" in params:  # LTX conditions on the frame rate
            kw["frame_rate"] = max(1, round(model_fps))
        if init is not None:
            if "video" in params:  # AnimateDiff video2video: the still repeated as a clip
                kw["video"] = [init] * request.frames
                kw["strength"] = request.strength
                kw.pop("num_frames", None)
            else:
                kw["image"] = init
        return kw

    def _progress_kwargs(self, pipe: Any, progress: Any, handle: Any, call: dict[str, Any]) -> None:
        params = self._params(pipe)
        if "callback_on_step_end" in params:
            call["callback_on_step_end"] = progress.diffusers_callback(handle)
        elif "callback" in params:  # older pipelines (TextToVideoSD): callback(step, timestep, latents)
            call["callback"] = lambda step, t, latents: handle.advance(1)
            call["callback_steps"] = 1


def _disable_free_noise(pipe: Any) -> None:
    """diffusers' disable_free_noise assumes the mid block has motion modules (adapters without a
    motion mid block fail there); this walks only the blocks that have them."""
    from diffusers.models.attention import FreeNoiseTransformerBlock

    if not any(isinstance(m, FreeNoiseTransformerBlock) for m in pipe.unet.modules()):
        pipe._free_noise_context_length = None
        return
    for block in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]:
        if getattr(block, "motion_modules", None) is not None:
            pipe._disable_free_noise_in_block(block)
    pipe._free_noise_context_length = None


def _to_pil_frames(frames: Any) -> list[Any]:
    """The first clip of a pipeline output as PIL frames (pipelines return nested lists, arrays or tensors)."""
    import numpy as np
    from PIL import Image

    clip = frames[0]
    if hasattr(clip, "detach"):  # torch (F, C, H, W) in [0, 1]
        clip = clip.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(clip, np.ndarray):  # (F, H, W, C) in [0, 1]
        return [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in clip]
    return [f.convert("RGB") for f in clip]
