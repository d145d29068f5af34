"""The everyday A1111/ComfyUI image features of `studio image`, apart from the main pipeline
(pipelines/image.py calls these in small, named places): textual inversion embeddings, clip skip,
FreeU, seamless tiling, mask blur, folder img2img, and the A1111 infotext entries they write and
read. Hires fix lives in pipelines/hires.py, the X/Y plot in pipelines/xy.py.

Each is a thin layer over what diffusers already does: `load_textual_inversion` /
`unload_textual_inversion`, the pipelines' `clip_skip` argument, `enable_freeu` / `disable_freeu`,
`VaeImageProcessor.blur`. What studio adds is one way to ask for them, checks before anything
loads, the metadata, and leaving a cached pipeline exactly as it found it after each run (a later
request without the feature gets the same pixels as if it had never been used).

Nothing heavy is imported at module level, and nothing here imports pipelines/image.py (the
layer test forbids import loops): the image pipeline hands in what these helpers need.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from studio.errors import InputFileError, UsageError
from studio.pipeline import as_tuple as _as_tuple

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- textual inversion
@dataclass(frozen=True)
class EmbeddingSpec:
    """One `--embedding FILE_OR_ID[:TOKEN]`."""

    source: str  # a .safetensors/.pt file, a diffusers folder (learned_embeds.safetensors) or a hub id
    token: str  # the word that calls it in a prompt (A1111: the file's name)

    def to_text(self) -> str:
        return f"{self.source}:{self.token}"


_TOKEN = re.compile(r"^[^\s:/\\]+$")


def parse_embedding(text: str) -> EmbeddingSpec:
    """`FILE_OR_ID[:TOKEN]`; the token is the file's stem unless given (A1111 names an embedding
    by its file name). A path that exists as typed wins over a ':' split, so paths may hold ':'."""
    text = str(text).strip()
    if not text:
        raise UsageError("--embedding needs a file, folder or hub id", "e.g. --embedding easynegative.safetensors")
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).expanduser().exists() and (_TOKEN.match(tail) or Path(head).expanduser().exists()):
        source, token = head, tail
    else:
        source, token = text, ""
    path = Path(source).expanduser()
    if not token:
        token = path.stem if path.suffix else path.name.rstrip("/") or source
    if not _TOKEN.match(token):
        raise UsageError(f"--embedding token {token!r} has spaces, ':' or slashes",
                         f"name it: --embedding {source}:mytoken")
    if path.exists():
        source = str(path.resolve())
    elif source.startswith(("./", "../", "/", "~")) or path.suffix in (".safetensors", ".pt", ".bin", ".pth"):
        raise InputFileError(f"embedding {source} does not exist", "check the path")
    return EmbeddingSpec(source=source, token=token)


class EmbeddingSet:
    """The textual inversion embeddings loaded into one pipeline's tokenizer(s) and text
    encoder(s). `apply` makes the loaded set equal the requested one: what a request no longer
    names is unloaded (its token rows and tokenizer entries removed), so a cached pipeline never
    carries an earlier request's words."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.loaded: tuple[EmbeddingSpec, ...] = ()
        self.meta: list[dict[str, Any]] = []
        self._tokens: list[tuple[Any, Any, list[str]]] = []  # (tokenizer, text encoder, tokens added)

    def _encoders(self) -> list[tuple[str, Any, Any]]:
        """(A1111 key, tokenizer, text encoder) pairs this pipeline has: SD 1.x/2.x one, SDXL two."""
        pairs = []
        for key, tok, enc in (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = getattr(self.pipe, tok, None), getattr(self.pipe, enc, None)
            if tokenizer is not None and encoder is not None:
                pairs.append((key, tokenizer, encoder))
        return pairs

    def apply(self, specs: list[EmbeddingSpec], *, allow_pickle: bool, offline: bool) -> list[dict[str, Any]]:
        specs_t = tuple(specs)
        if specs_t == self.loaded:
            return list(self.meta)
        self.clear()
        if not specs_t:
            return []
        if not self._encoders() or not hasattr(self.pipe, "load_textual_inversion"):
            raise UsageError(f"textual inversion embeddings work with SD 1.x/2.x and SDXL, not {type(self.pipe).__name__}",
                             "drop --embedding for this model")
        tokens = [s.token for s in specs_t]
        if len(set(tokens)) != len(tokens):
            raise UsageError(f"two --embedding share the token {next(t for t in tokens if tokens.count(t) > 1)!r}",
                             "give one its own: --embedding FILE:othertoken")
        try:
            for spec in specs_t:
                self.meta.append(self._load(spec, allow_pickle=allow_pickle, offline=offline))
        except BaseException:
            self.clear()
            raise
        self.loaded = specs_t
        return list(self.meta)

    def clear(self) -> None:
        for tokenizer, encoder, added in reversed(self._tokens):
            if added:
                self.pipe.unload_textual_inversion(tokens=added, tokenizer=tokenizer, text_encoder=encoder)
        self._tokens = []
        self.loaded = ()
        self.meta = []

    def _load(self, spec: EmbeddingSpec, *, allow_pickle: bool, offline: bool) -> dict[str, Any]:
        from studio.progress import quiet_libraries
        from studio.safety import check_pickle

        path = Path(spec.source)
        pairs = self._encoders()
        meta: dict[str, Any] = {"source": spec.source, "token": spec.token}
        for _, tokenizer, _ in pairs:
            if spec.token in tokenizer.get_vocab():
                raise UsageError(f"--embedding token {spec.token!r} is already a word of this model's tokenizer",
                                 f"pick another: --embedding {spec.source}:<{spec.token}>")
        if path.exists():
            check_pickle(path, allow_pickle=allow_pickle, what="embedding")
            file = path if path.is_file() else None
            if file is not None:
                from studio.outputs import sha256_file

                meta["hash"] = sha256_file(file)[:12]  # A1111's TI shorthash: sha256 of the file
        else:
            file = None
        state = self._state(file) if file is not None else None
        try:
            with quiet_libraries():
                if state is not None and ("clip_l" in state or "clip_g" in state):
                    # SDXL embeddings as A1111 and kohya save them: one tensor per text encoder
                    keys = {k for k, _, _ in pairs}
                    if not {"clip_l", "clip_g"} <= set(state) or keys != {"clip_l", "clip_g"}:
                        raise UsageError(f"{path.name} is an SDXL embedding (clip_l/clip_g); this model is not SDXL",
                                         "use an embedding made for this model's family")
                    for key, tokenizer, encoder in pairs:
                        self._add(state[key], spec.token, tokenizer, encoder)
                elif state is not None:
                    vectors = _embedding_tensor(state, path)
                    key, tokenizer, encoder = pairs[0]
                    self._add(vectors, spec.token, tokenizer, encoder)
                else:  # a diffusers folder or hub id: diffusers finds learned_embeds.* itself
                    kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
                    if offline:
                        kwargs["local_files_only"] = True
                    key, tokenizer, encoder = pairs[0]
                    before = set(tokenizer.get_vocab())
                    self.pipe.load_textual_inversion(spec.source, token=spec.token, tokenizer=tokenizer,
                                                     text_encoder=encoder, **kwargs)
                    self._tokens.append((tokenizer, encoder, sorted(set(tokenizer.get_vocab()) - before)))
        except UsageError:
            raise
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "incorrect shape" in text or "size" in text.lower():
                width = pairs[0][2].get_input_embeddings().weight.shape[-1]
                raise UsageError(f"embedding {spec.source} does not fit this model (its text encoder takes "
                                 f"{width}-wide vectors)", "use an embedding made for this model's family") from exc
            raise UsageError(f"could not load embedding {spec.source}: {text}",
                             "pass an A1111 .safetensors/.pt embedding, a diffusers folder or a hub id") from exc
        added = self._tokens[-1][2] if self._tokens else []
        meta["vectors"] = max(1, len(added))
        return meta

    @staticmethod
    def _state(file: Path) -> dict[str, Any]:
        """The file's tensors. .safetensors directly; a pickle (.pt/.bin, allowed by the caller's
        check_pickle) through torch.load with weights_only, A1111's `string_to_param` layout."""
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                return load_file(str(file), device="cpu")
            except Exception as exc:
                raise UsageError(f"{file.name} is not a readable .safetensors file ({type(exc).__name__})",
                                 "check the file (an interrupted download?)") from exc
        import torch

        return torch.load(str(file), map_location="cpu", weights_only=True)

    def _add(self, vectors: Any, token: str, tokenizer: Any, encoder: Any) -> None:
        before = set(tokenizer.get_vocab())
        self.pipe.load_textual_inversion(vectors, token=token, tokenizer=tokenizer, text_encoder=encoder)
        self._tokens.append((tokenizer, encoder, sorted(set(tokenizer.get_vocab()) - before)))


def _embedding_tensor(state: dict[str, Any], path: Path) -> Any:
    """The (vectors, width) tensor of a one-model embedding file, whatever its layout: A1111's
    .pt (`string_to_param: {"*": T}`), A1111's .safetensors (`emb_params`), diffusers'
    learned_embeds ({token: T}), or any file holding one tensor."""
    if "string_to_param" in state:
        return state["string_to_param"]["*"]
    if "emb_params" in state:
        return state["emb_params"]
    tensors = [v for v in state.values() if hasattr(v, "shape")]
    if len(tensors) != 1:
        raise UsageError(f"{path.name} holds {len(tensors)} tensors ({', '.join(list(state)[:4])}), not one embedding",
                         "pass a textual inversion embedding (A1111 emb_params / string_to_param, or diffusers learned_embeds)")
    return tensors[0]


def expand_tokens(pipe: Any, text: str) -> str:
    """A multi-vector embedding's word spelled out as its tokens ("tok" -> "tok tok_1 tok_2"), what
    diffusers' encode_prompt does itself; the compel path (weighted prompts) needs it done first."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    if convert is None or tokenizer is None or not text:
        return text
    return convert(text, tokenizer)


# ----------------------------------------------------------------------------- clip skip
def clip_skip_argument(clip_skip: int | None) -> int | None:
    """A1111's `Clip skip: N` counts the last layer as 1 (2 = the penultimate layer's output);
    diffusers' `clip_skip` counts the layers skipped (1 = penultimate). None: not set."""
    if clip_skip is None or int(clip_skip) <= 1:
        return None
    return int(clip_skip) - 1


def _text_encoders(pipe: Any) -> list[Any]:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def _layer_owner(encoder: Any) -> Any:
    """The CLIPEncoder holding the transformer layers: `encoder.encoder` in transformers 5 (which
    dropped CLIPTextModel.text_model), `encoder.text_model.encoder` before."""
    for owner in (getattr(encoder, "encoder", None), getattr(getattr(encoder, "text_model", None), "encoder", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner
    return None


def _encoder_layers(encoder: Any) -> Any:
    owner = _layer_owner(encoder)
    return owner.layers if owner is not None else None


def clip_skip_by_layers(pipe: Any, weighted: bool) -> bool:
    """Whether clip skip is applied by dropping layers (clip_skip_layers) rather than through the
    pipeline's `clip_skip` argument: for prompts encoded outside the call (compel), and for SD
    1.x/2.x, whose encode_prompt reads `text_encoder.text_model.final_layer_norm`, which
    transformers 5 no longer has (diffusers 0.42 raises AttributeError there). SDXL and SD3 index
    the hidden states only, so their argument works."""
    if weighted:
        return True
    name = type(pipe).__name__
    encoder = getattr(pipe, "text_encoder", None)
    return "XL" not in name and "3" not in name and encoder is not None and not hasattr(encoder, "text_model")


@contextlib.contextmanager
def clip_skip_layers(pipe: Any, clip_skip: int | None) -> Iterator[None]:
    """The text encoders without their last N-1 layers for the duration. The encoder's final layer
    norm then applies to the kept layers' output: what diffusers' clip_skip computes on SD
    (final_layer_norm(hidden_states[-(skip+1)])), and on SDXL's penultimate reading the hidden
    states move back the same way (the pooled vector then comes from the kept layers too, as the
    truncated encoder is what runs). compel itself only knows "penultimate", not N."""
    skip = clip_skip_argument(clip_skip)
    if not skip:
        yield
        return
    saved = []
    try:
        for encoder in _text_encoders(pipe):
            owner = _layer_owner(encoder)
            if owner is None:
                continue
            saved.append((owner, owner.layers))
            owner.layers = owner.layers[: len(owner.layers) - skip]
        yield
    finally:
        for owner, layers in saved:
            owner.layers = layers


# ----------------------------------------------------------------------------- FreeU
# FreeU's reference values (the FreeU repository's table, as diffusers' docs quote it)
FREEU_DEFAULTS = {"sd1": (0.9, 0.2, 1.5, 1.6), "sd2": (0.9, 0.2, 1.4, 1.6), "sdxl": (0.9, 0.2, 1.3, 1.4)}


def parse_freeu(value: Any) -> tuple[float, float, float, float] | str | None:
    """None (off), "auto" (the model family's values), or (s1, s2, b1, b2)."""
    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    text = str(value).strip().lower()
    if text in ("", "0", "false", "off", "no", "none"):
        return None
    if text in ("1", "true", "on", "yes", "auto", "default"):
        return "auto"
    parts = [p for p in re.split(r"[,\s]+", text) if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 4 or any(n < 0 or n > 10 for n in numbers):
        raise UsageError(f"--freeu-params {value!r} is not S1,S2,B1,B2 (four numbers 0-10)",
                         "e.g. --freeu-params 0.9,0.2,1.5,1.6 (SD 1.5), or just --freeu for the model's defaults")
    return numbers  # type: ignore[return-value]


def freeu_values(value: Any, pipe: Any) -> tuple[float, float, float, float] | None:
    parsed = parse_freeu(value)
    if parsed is None:
        return None
    if parsed != "auto":
        return parsed  # type: ignore[return-value]
    name = type(pipe).__name__
    if "XL" in name:
        return FREEU_DEFAULTS["sdxl"]
    width = getattr(getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", 768)
    return FREEU_DEFAULTS["sd2" if width == 1024 else "sd1"]


# ----------------------------------------------------------------------------- seamless tiling
def tile_axes(value: Any) -> str:
    """"" (off), "x", "y" or "xy" from --tile (True = both, as A1111's Tiling)."""
    if value is None or value is False:
        return ""
    if value is True:
        return "xy"
    text = str(value).strip().lower()
    if text in ("", "0", "false", "off", "no", "none"):
        return ""
    if text in ("1", "true", "on", "yes", "xy", "both"):
        return "xy"
    if text in ("x", "y"):
        return text
    raise UsageError(f"--tile {value!r} is not one of xy, x, y", "--tile makes both axes seamless; --tile-axis x only left-right")


def _one_axis_forward(conv: Any, axes: str) -> Any:
    # torch's padding_mode="circular" wraps both axes; one axis alone (a panorama that wraps left
    # to right but not top to bottom) pads that axis circularly and the other with zeros
    import torch.nn.functional as F

    py, px = conv.padding

    def forward(x: Any) -> Any:
        x = F.pad(x, (px, px, 0, 0), mode="circular" if "x" in axes else "constant")
        x = F.pad(x, (0, 0, py, py), mode="circular" if "y" in axes else "constant")
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    return forward


@contextlib.contextmanager
def seamless(pipe: Any, axes: str) -> Iterator[None]:
    """Every padded Conv2d of the denoiser, VAE and ControlNets wraps around the image's edges for
    the duration (A1111's Tiling: circular padding), so the image tiles without a seam."""
    if not axes:
        yield
        return
    import torch

    changed: list[tuple[Any, str, Any]] = []
    modules = [getattr(pipe, n, None) for n in ("unet", "vae", "transformer", "controlnet")]
    try:
        for module in modules:
            for m in (module.modules() if isinstance(module, torch.nn.Module) else []):
                if not isinstance(m, torch.nn.Conv2d) or isinstance(m.padding, str) or not any(m.padding):
                    continue
                changed.append((m, m.padding_mode, m.__dict__.get("forward")))
                if axes == "xy":
                    m.padding_mode = "circular"
                else:
                    m.forward = _one_axis_forward(m, axes)
        yield
    finally:
        for m, mode, forward in changed:
            m.padding_mode = mode
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


@contextlib.contextmanager
def effects(pipe: Any, request: Any) -> Iterator[None]:
    """FreeU and seamless tiling on `pipe` for one call; the pipeline is left as it was."""
    values = freeu_values(getattr(request, "freeu", None), pipe)
    if values is not None:
        s1, s2, b1, b2 = values
        pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    try:
        with seamless(pipe, tile_axes(getattr(request, "tile", None))):
            yield
    finally:
        if values is not None:
            pipe.disable_freeu()


# ----------------------------------------------------------------------------- mask blur
def blur_mask(mask: Any, pixels: int | None) -> Any:
    """A1111's Mask blur: a Gaussian blur of the inpaint mask (diffusers' VaeImageProcessor.blur),
    so the repainted region fades into the kept one."""
    if mask is None or not pixels:
        return mask
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.blur(mask, int(pixels))


# ----------------------------------------------------------------------------- folders
def is_folder(path: Any) -> bool:
    return bool(path) and Path(str(path)).expanduser().is_dir()


def folder_inputs(init: str, mask: str | None = None) -> list[tuple[str, str | None]]:
    """(init image, mask) pairs of a folder run, in name order: every image file of `init`, and
    with a mask folder, the mask of the same name (any image suffix) beside each."""
    folder = Path(init).expanduser()
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if not images:
        raise InputFileError(f"--init folder {init} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                             "pass a folder of images, or one image file")
    if mask is None:
        return [(str(p.resolve()), None) for p in images]
    mfolder = Path(mask).expanduser()
    if not mfolder.is_dir():
        raise UsageError(f"--init is a folder but --mask {mask} is a file",
                         "pass a folder of masks named like the images (or one --init image with this mask)")
    masks = {p.stem: p for p in sorted(mfolder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise InputFileError(f"--mask folder {mask} has no mask for {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
                             "each image needs a mask of the same name (any image suffix)")
    return [(str(p.resolve()), str(masks[p.stem].resolve())) for p in images]


# ----------------------------------------------------------------------------- checks
def check_static(request: Any, check_cell: Any = None) -> None:
    """The new fields' own values, before anything loads; `check_cell(request)` checks each X/Y
    plot cell as the flags themselves are checked (pipelines/image.py passes its own checks)."""
    from studio.pipelines import hires, xy

    for text in _as_tuple(getattr(request, "embeddings", ())):
        parse_embedding(text)
    clip_skip = getattr(request, "clip_skip", None)
    if clip_skip is not None and not (1 <= int(clip_skip) <= 12):
        raise UsageError(f"--clip-skip {clip_skip} must be 1-12", "1 = the last layer (no skip), 2 = the penultimate (A1111's 'Clip skip: 2')")
    parse_freeu(getattr(request, "freeu", None))
    tile_axes(getattr(request, "tile", None))
    blur = getattr(request, "mask_blur", None)
    if blur is not None:
        if int(blur) < 0 or int(blur) > 256:
            raise UsageError(f"--mask-blur {blur} must be 0-256 pixels", "A1111's default is 4")
        if not (request.mask_image or request.outpaint):
            raise UsageError("--mask-blur applies to inpainting only", "add --mask MASK (or --outpaint), or drop --mask-blur")
    if request.init_image and is_folder(request.init_image):
        folder_inputs(request.init_image, request.mask_image)
    elif request.mask_image and is_folder(request.mask_image):
        raise UsageError(f"--mask {request.mask_image} is a folder but --init is one image",
                         "pass --init FOLDER with a --mask FOLDER of the same names")
    hires.check_static(request)
    if getattr(request, "xy", ()):
        if check_cell is None:
            xy.parse_axes(request.xy, request)
        else:
            xy.check(request, check_cell)


def run_folder(image_pipeline: Any, request: Any, progress: Any) -> Iterator[Any]:
    """--init FOLDER (and --mask FOLDER): the request once per input, in name order, each output
    recording its own input (so each replays alone). The CLI resumes a folder run from --out's
    manifest; a batch file resumes by job."""
    import dataclasses

    pairs = folder_inputs(request.init_image, request.mask_image)
    for index, (init, mask) in enumerate(pairs):
        progress.note(f"input {index + 1}/{len(pairs)}: {Path(init).name}")
        yield from image_pipeline.run(dataclasses.replace(request, init_image=init, mask_image=mask), progress)


def check_loaded(pipe: Any, request: Any, accepted: set[str]) -> None:
    """What needs the loaded model: whether it has what each feature works on."""
    name = type(pipe).__name__
    if clip_skip_argument(getattr(request, "clip_skip", None)):
        if "clip_skip" not in accepted:
            raise UsageError(f"--clip-skip works with CLIP text encoders (SD 1.x/2.x, SDXL, SD3), not {name}",
                             "drop --clip-skip for this model")
        layers = [len(_encoder_layers(e) or []) for e in _text_encoders(pipe)]
        if layers and int(request.clip_skip) > min(layers):
            raise UsageError(f"--clip-skip {request.clip_skip} is more than this text encoder's {min(layers)} layers",
                             f"use --clip-skip 1-{min(layers)}")
    if parse_freeu(getattr(request, "freeu", None)) is not None and getattr(pipe, "unet", None) is None:
        raise UsageError(f"--freeu works with UNet models (SD 1.x/2.x, SDXL), not {name}", "drop --freeu")
    if tile_axes(getattr(request, "tile", None)) and getattr(pipe, "vae", None) is None:
        raise UsageError(f"--tile needs a VAE model, not {name}", "drop --tile")


# ----------------------------------------------------------------------------- infotext
def infotext_fields(request: Any, pipe: Any, embeddings: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """A1111's own entries for these features, in A1111's spelling: `Clip skip` and `Tiling`
    (create_infotext), `Mask blur` (img2img), `TI hashes` (textual inversion, name: shorthash)
    and Forge's built-in FreeU extension's `freeu_*` keys."""
    fields: dict[str, Any] = {}
    clip_skip = getattr(request, "clip_skip", None)
    if clip_skip is not None and int(clip_skip) > 1:
        fields["Clip skip"] = int(clip_skip)
    axes = tile_axes(getattr(request, "tile", None))
    if axes == "xy":
        fields["Tiling"] = "True"
    elif axes:
        fields["Tiling"] = axes  # studio's: one axis (A1111 has no key for it)
    if mode == "inpaint" and getattr(request, "mask_blur", None) is not None:
        fields["Mask blur"] = int(request.mask_blur)
    hashes = [f"{e['token']}: {e['hash']}" for e in embeddings if e.get("hash")]
    if hashes:
        fields["TI hashes"] = ", ".join(hashes)
    values = freeu_values(getattr(request, "freeu", None), pipe)
    if values is not None:
        s1, s2, b1, b2 = values
        fields.update({"freeu_enabled": "True", "freeu_b1": b1, "freeu_b2": b2, "freeu_s1": s1, "freeu_s2": s2})
    return fields


# infotext keys features_from_infotext reads (pipelines/image.py adds them to its used set)
INFOTEXT_KEYS = {"Clip skip", "Tiling", "Mask blur", "TI hashes", "freeu_enabled", "freeu_b1", "freeu_b2", "freeu_s1",
                 "freeu_s2", "Hires upscale", "Hires steps", "Hires upscaler"}


def features_from_infotext(fields: dict[str, Any], params: dict[str, Any], notes: list[str]) -> None:
    """Request fields from these features' infotext entries (A1111, Forge, studio), in place."""
    from studio.pipelines import hires

    def number(key: str) -> float | None:
        try:
            return float(fields[key])
        except (KeyError, TypeError, ValueError):
            return None

    skip = number("Clip skip")
    if skip is not None and skip > 1:
        params["clip_skip"] = int(skip)
    tiling = str(fields.get("Tiling", "")).strip()
    if tiling.lower() == "true":
        params["tile"] = True
    elif tiling.lower() in ("x", "y"):
        params["tile"] = tiling.lower()
    blur = number("Mask blur")
    if blur is not None:
        params["mask_blur"] = int(blur)
        notes.append(f"Mask blur {int(blur)} applies with --init IMAGE --mask MASK")
    if str(fields.get("freeu_enabled", "")).lower() == "true":
        values = [number(k) for k in ("freeu_s1", "freeu_s2", "freeu_b1", "freeu_b2")]
        params["freeu"] = ",".join(f"{v:g}" for v in values) if all(v is not None for v in values) else True  # type: ignore[union-attr]
    if fields.get("TI hashes"):
        names = [part.split(":")[0].strip() for part in str(fields["TI hashes"]).split(",") if part.strip()]
        notes.append(f"the prompt uses embedding(s) {', '.join(names)}: pass --embedding FILE for each "
                     "(the PNG names them, it does not hold them)")
    hires.from_infotext(fields, params, notes)
