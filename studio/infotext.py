"""A1111 infotext: the `parameters` PNG chunk written the way AUTOMATIC1111's web UI writes it,
and read back from A1111, Forge and ComfyUI PNGs.

The format is A1111's `create_infotext` (modules/processing.py): the prompt, a `Negative prompt:`
line, then one line of `Key: value` pairs joined by ", ", in A1111's key order (Steps, Sampler,
Schedule type, CFG scale, Seed, Size, Model hash, Model, Denoising strength, then the extensions'
entries), each value quoted as JSON when it holds a comma, colon or newline (infotext_utils.quote).
ControlNet units are written as sd-webui-controlnet writes them (`ControlNet 0: "Module: canny,
Model: ..., Weight: 1.0, ..."`, scripts/infotext.py), LoRAs as A1111's built-in Lora extension does
(`<lora:NAME:SCALE>` in the prompt, `Lora hashes: "NAME: HASH"`).

Written here because no library writes it (sd-parsers and A1111's own code only read it, and
A1111's is AGPL and tied to its web UI); the reader follows A1111's `parse_generation_parameters`
(infotext_utils.py) so that what A1111 reads, studio reads the same way.

This module is core: it knows the text format only. Which studio scheduler an A1111 sampler label
means is the image pipeline's business (pipelines/image.py `params_from_infotext`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from studio.errors import UsageError

# A1111's own pattern for one `Key: value` pair of the last line (infotext_utils.re_param_code)
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)(?::[^>]*)?>")

# studio control type -> the preprocessor ("module") name sd-webui-controlnet writes for it
CONTROLNET_MODULES = {"canny": "canny", "none": "none", "raw": "none", "shuffle": "shuffle",
                      "depth": "depth_midas", "pose": "openpose", "lineart": "lineart_realistic",
                      "lineart_anime": "lineart_anime", "softedge": "softedge_hed", "scribble": "scribble_hed",
                      "mlsd": "mlsd", "normal": "normal_bae"}

# ComfyUI KSampler names (comfy/samplers.py KSAMPLER_NAMES, SCHEDULER_NAMES) -> A1111 labels
COMFY_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
                  "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive",
                  "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "ddpm": "DDPM", "lcm": "LCM", "ddim": "DDIM", "uni_pc": "UniPC",
                  "uni_pc_bh2": "UniPC", "deis": "DEIS"}
COMFY_SCHEDULERS = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential",
                    "sgm_uniform": "SGM Uniform", "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta",
                    "kl_optimal": "KL Optimal"}


# ----------------------------------------------------------------------------- writing
def quote(value: Any) -> str:
    """A1111's infotext_utils.quote: JSON-quoted when the value holds ',', ':' or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _safe_name(text: str) -> str:
    # A1111 strips these from LoRA names in `Lora hashes` (lora_script.py remove_symbols); a ':' or
    # '>' would also end a <lora:...> tag early
    return re.sub(r"[:,<>]", "", str(text)).strip() or "lora"


def model_label(model: dict[str, Any] | None) -> str | None:
    """What A1111's `Model:` holds: the checkpoint's name without extension (studio: the alias,
    else the file's stem, the folder's name or the hub id)."""
    if not model:
        return None
    if model.get("alias"):
        return str(model["alias"])
    source = str(model.get("source") or model.get("name") or "")
    if model.get("kind") == "file":
        return Path(source).stem
    if model.get("kind") == "folder":
        return Path(source).name
    return source or None


def lora_tags(adapters: list[dict[str, Any]] | None) -> str:
    return " ".join(f"<lora:{_safe_name(a.get('name') or Path(str(a.get('source'))).stem)}:{float(a.get('scale', 1.0)):g}>"
                    for a in adapters or [])


def controlnet_unit(control: dict[str, Any]) -> str:
    """One sd-webui-controlnet unit (serialize_unit): `Key: value` pairs without commas or colons."""
    model = model_label(control.get("model")) or "None"
    fields = {"Module": CONTROLNET_MODULES.get(str(control.get("type")), str(control.get("type"))),
              "Model": re.sub(r"[:,]", "_", model), "Weight": float(control.get("scale", 1.0)),
              "Guidance Start": float(control.get("start", 0.0)), "Guidance End": float(control.get("end", 1.0))}
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def a1111_infotext(params: dict[str, Any], meta: dict[str, Any]) -> str:
    """The `parameters` text of an image output: params is the request as resolved for this image,
    meta the output's metadata (model identity, `sampler` labels, `controls`, `adapters`)."""
    if params.get("steps") is None:
        return ""  # not a generated image (a control map, a frame): there is no recipe to write
    adapters = [a for a in meta.get("adapters") or [] if isinstance(a, dict)]
    prompt = str(params.get("prompt") or "")
    tags = lora_tags(adapters)
    if tags:  # A1111 applies LoRAs named in the prompt, and records hashes only for those
        prompt = f"{prompt} {tags}" if prompt else tags
    sampler = meta.get("sampler") or {}
    model = meta.get("model") or {}
    fields: dict[str, Any] = {
        "Steps": params.get("steps"),
        "Sampler": sampler.get("sampler"),
        "Schedule type": sampler.get("schedule"),
        "CFG scale": params.get("guidance"),
        "Seed": params.get("seed"),
        "Size": f"{params['width']}x{params['height']}" if params.get("width") and params.get("height") else None,
        # A1111's short hash of a checkpoint file: the first 10 hex digits of its sha256
        "Model hash": str(model["sha256"])[:10] if model.get("kind") == "file" and model.get("sha256") else None,
        "Model": model_label(model),
        "Denoising strength": params.get("strength") if params.get("init_image") else None,
    }
    for i, control in enumerate(c for c in meta.get("controls") or [] if isinstance(c, dict)):
        fields[f"ControlNet {i}"] = controlnet_unit(control)
    hashes = {_safe_name(a.get("name") or a.get("source")): a["hash"] for a in adapters if a.get("hash")}
    if hashes:
        fields["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
    # entries a pipeline writes in A1111's own spelling (`Clip skip`, `Tiling`, `Mask blur`,
    # `Hires upscale`, `TI hashes`, ...: pipelines/image_features.py); a value set above stays
    for key, value in (meta.get("infotext") or {}).items():
        if fields.get(key) is None and value is not None:
            fields[key] = value
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = params.get("negative_prompt")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


# ----------------------------------------------------------------------------- reading
def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_a1111(text: str) -> dict[str, Any]:
    """{"prompt", "negative_prompt", "fields"} from A1111 infotext, as A1111's own
    parse_generation_parameters splits it: the last line is the settings when it holds at least
    three `Key: value` pairs; lines before `Negative prompt:` are the prompt."""
    *lines, last = str(text).strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        fields[key.strip()] = _unquote(value.strip())
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), "fields": fields}


def parse_controlnet_unit(text: str) -> dict[str, str]:
    """sd-webui-controlnet's parse_unit: "Module: canny, Model: x, Weight: 1.0" -> dict."""
    out = {}
    for item in str(text).split(","):
        key, sep, value = item.strip().partition(": ")
        if sep:
            out[key] = value
    return out


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:NAME:SCALE> tags, and the tags."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        try:
            found.append((m.group(1), float(m.group(2))))
        except ValueError:
            found.append((m.group(1), 1.0))
        return ""

    cleaned = _LORA_TAG.sub(take, prompt)
    if not found:
        return prompt, found
    lines = [re.sub(r"[ \t]{2,}", " ", line).strip().rstrip(",").strip() for line in cleaned.split("\n")]
    return "\n".join(lines).strip(), found


def _comfy_input(graph: dict[str, Any], link: Any, want: str, path: str) -> dict[str, Any]:
    if not (isinstance(link, list) and link and str(link[0]) in graph):
        raise UsageError(f"this ComfyUI workflow's {path} is not a simple link to a {want} node",
                         "copy the prompt and settings by hand, or export the image from a simple txt2img graph")
    return graph[str(link[0])]


def parse_comfyui(prompt_json: str) -> dict[str, Any]:
    """The same shape as parse_a1111 from a ComfyUI `prompt` chunk (the API graph), when it is a
    simple graph: one KSampler whose positive/negative are CLIPTextEncode nodes with literal text.
    Anything else is a UsageError saying so (studio does not run ComfyUI graphs)."""
    try:
        graph = json.loads(prompt_json)
    except json.JSONDecodeError as exc:
        raise UsageError("the ComfyUI `prompt` chunk is not valid JSON", "re-export the image from ComfyUI") from exc
    if not isinstance(graph, dict):
        raise UsageError("the ComfyUI `prompt` chunk is not a node graph", "re-export the image from ComfyUI")
    samplers = [(k, n) for k, n in graph.items() if isinstance(n, dict) and n.get("class_type") in ("KSampler", "KSamplerAdvanced")]
    hint = "copy the prompt and settings by hand (studio reads ComfyUI graphs with one KSampler and plain CLIPTextEncode prompts)"
    if len(samplers) != 1:
        raise UsageError(f"this ComfyUI workflow has {len(samplers)} KSampler nodes, not one", hint)
    node = samplers[0][1]
    inputs = node.get("inputs") or {}

    def text_of(link: Any, which: str) -> str:
        encoder = _comfy_input(graph, link, "CLIPTextEncode", f"{which} prompt")
        text = (encoder.get("inputs") or {}).get("text")
        if encoder.get("class_type") != "CLIPTextEncode" or not isinstance(text, str):
            raise UsageError(f"this ComfyUI workflow's {which} prompt comes from a {encoder.get('class_type')} node, "
                             "not a CLIPTextEncode with its own text", hint)
        return text

    fields: dict[str, Any] = {}
    seed = inputs.get("seed", inputs.get("noise_seed"))
    for key, value in (("Steps", inputs.get("steps")), ("CFG scale", inputs.get("cfg")), ("Seed", seed)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fields[key] = str(value)
    sampler = inputs.get("sampler_name")
    if isinstance(sampler, str):
        fields["Sampler"] = COMFY_SAMPLERS.get(sampler, sampler)
    schedule = inputs.get("scheduler")
    if isinstance(schedule, str):
        fields["Schedule type"] = COMFY_SCHEDULERS.get(schedule, schedule)
    denoise = inputs.get("denoise")
    if isinstance(denoise, (int, float)) and float(denoise) < 1.0:
        fields["Denoising strength"] = str(denoise)
    latent = inputs.get("latent_image")
    if isinstance(latent, list) and str(latent[0]) in graph:
        lat = graph[str(latent[0])]
        w, h = (lat.get("inputs") or {}).get("width"), (lat.get("inputs") or {}).get("height")
        if lat.get("class_type") == "EmptyLatentImage" and isinstance(w, int) and isinstance(h, int):
            fields["Size"] = f"{w}x{h}"
    for n in graph.values():
        if isinstance(n, dict) and n.get("class_type") == "CheckpointLoaderSimple":
            name = (n.get("inputs") or {}).get("ckpt_name")
            if isinstance(name, str):
                fields["Model"] = Path(name).stem
    return {"prompt": text_of(inputs.get("positive"), "positive"),
            "negative_prompt": text_of(inputs.get("negative"), "negative") if inputs.get("negative") is not None else "",
            "fields": fields}


def read_png_text(path: str | Path) -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt), or a UsageError when it is no readable PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise UsageError(f"{Path(path).name} is a {im.format} image, not a PNG",
                                 "pass a PNG written by studio, A1111, Forge or ComfyUI")
            return {str(k): str(v) for k, v in (getattr(im, "text", None) or {}).items()}
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"{Path(path).name} is not a readable PNG ({type(exc).__name__})",
                         "pass a PNG written by studio, A1111, Forge or ComfyUI") from exc


def png_recipe(path: str | Path) -> dict[str, Any]:
    """{"source": "studio" | "a1111" | "comfyui", ...} from a PNG's own chunks: studio's JSON
    (`studio`), else A1111/Forge infotext (`parameters`), else a ComfyUI graph (`prompt`)."""
    chunks = read_png_text(path)
    if chunks.get("studio"):
        try:
            meta = json.loads(chunks["studio"])
        except json.JSONDecodeError:
            meta = None
        if isinstance(meta, dict) and "task" in meta:
            return {"source": "studio", "meta": meta}
    if chunks.get("parameters"):
        return {"source": "a1111", **parse_a1111(chunks["parameters"])}
    if chunks.get("prompt"):
        return {"source": "comfyui", **parse_comfyui(chunks["prompt"])}
    raise UsageError(f"{Path(path).name} carries no generation settings (no studio, A1111 `parameters` or "
                     "ComfyUI `prompt` chunk)", "pass a PNG as studio, A1111, Forge or ComfyUI saved it "
                     "(sites that re-encode images drop these chunks)")
