"""LoRA file layouts: diffusers/peft (what `studio adapt train --task image` writes) <-> kohya (what
A1111, Forge, ComfyUI and most LoRA sites read): `studio adapt export LORA --format kohya|diffusers`.

The key renaming is diffusers' own: `lora_state_dict` reads either layout (kohya through
`_convert_non_diffusers_lora_to_diffusers`), `convert_unet_state_dict_to_peft` /
`convert_state_dict_to_peft` bring it to peft names, `convert_state_dict_to_kohya` writes kohya
names and `save_lora_weights` writes the diffusers file. What those utilities leave to the caller
is done here, each for a reason given where it is done: the per-module alpha (diffusers writes
alpha = rank; a LoRA trained with another alpha would change strength), kohya's `lora_te_` prefix
for a single text encoder (SD 1.x/2.x; SDXL keeps lora_te1_/lora_te2_), the `text_model` segment
that transformers 5's flattened CLIPTextModel no longer has in its module names, and kohya's
`ss_*`/`sshs_model_hash` metadata that A1111 reads for its hash.

Supports the UNet families (SD 1.x/2.x, SDXL), the layouts A1111 and kohya's scripts share.
"""

from __future__ import annotations

import collections
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import InputFileError, UsageError

FORMATS = ("kohya", "diffusers")
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class ExportReport:
    out: Path  # the file (kohya) or folder (diffusers) written
    format: str  # kohya | diffusers
    source_format: str  # what the input was
    tensors: int  # weight tensors written (alphas included for kohya)
    rank: int | list[int]  # the LoRA rank (a list when modules differ)
    alpha: float | list[float]  # kohya alpha (scale = alpha / rank)


def source_file(source: str | Path, *, allow_pickle: bool = False) -> Path:
    """The .safetensors file of a LoRA given as a file or a folder (`studio adapt train` output)."""
    from studio.adapters.lora import weight_file
    from studio.safety import check_pickle

    path = Path(source).expanduser()
    if not path.exists():
        raise InputFileError(f"LoRA {source} does not exist", "pass a LoRA .safetensors file or the folder holding it")
    check_pickle(path, allow_pickle=allow_pickle, what="LoRA")
    found = weight_file(str(path))
    if found is None or found.suffix != ".safetensors":
        raise UsageError(f"{source} holds no single LoRA .safetensors file",
                         "pass the .safetensors file itself (pickle .bin/.ckpt LoRAs are not converted)")
    return found


def layout(keys: list[str]) -> str:
    """kohya | diffusers | transformer (a DiT LoRA: Flux, SD3, ...) | unknown."""
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.")) for k in keys):
        return "transformer"
    if any(k.startswith(f"{c}.") for c in _COMPONENTS for k in keys):
        return "diffusers"
    return "unknown"


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _pipeline_class(keys: list[str]) -> Any:
    import diffusers

    sdxl = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)
    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


def _to_peft(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{component: peft-named state dict} from a diffusers-layout LoRA (old or new key style)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

    out: dict[str, dict[str, Any]] = {}
    for component in _COMPONENTS:
        part = {k[len(component) + 1:]: v for k, v in state_dict.items() if k.startswith(component + ".")}
        if not part:
            continue
        if component == "unet":
            out[component] = convert_unet_state_dict_to_peft(part)
        else:
            try:
                out[component] = convert_state_dict_to_peft(part)
            except ValueError:  # already peft names (lora_A/lora_B): the UNet mapping leaves them as they are
                out[component] = convert_unet_state_dict_to_peft(part)
    return out


def _peft_alphas(peft: dict[str, dict[str, Any]], metadata: dict[str, Any] | None) -> dict[str, float]:
    """{"unet.down_blocks...to_q": alpha} as diffusers' loader would set them: from the file's
    `lora_adapter_metadata` (peft's lora_alpha and alpha_pattern), else alpha = rank (scale 1)."""
    from peft.utils.other import get_pattern_key

    alphas: dict[str, float] = {}
    for component, part in peft.items():
        meta = {k[len(component) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(component + ".")}
        pattern = meta.get("alpha_pattern") or {}
        for key, weight in part.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            rank = int(weight.shape[0])
            if "lora_alpha" in meta:
                hit = get_pattern_key(list(pattern), module)
                alpha = float(pattern[hit]) if hit in pattern else float(meta["lora_alpha"])
            else:
                alpha = float(rank)
            alphas[f"{component}.{module}"] = alpha
    return alphas


def _kohya_base(component: str, module: str, single_te: bool) -> str:
    """The kohya module name as convert_state_dict_to_kohya spells it (lora_unet_down_blocks_0_...,
    lora_te1_...), and kohya's own as this function returns it: `lora_te_` for a single text encoder
    (SD 1.x/2.x; kohya's scripts and A1111 use lora_te1_/lora_te2_ for SDXL only) and the
    `text_model` segment that transformers 5's flattened CLIPTextModel dropped from its module
    names (kohya's names keep it: lora_te_text_model_encoder_layers_0_...)."""
    if component != "unet" and not module.startswith("text_model."):
        module = "text_model." + module
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te" if single_te else "lora_te1", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{module.replace('.', '_')}"


def addnet_hash(tensors: dict[str, Any]) -> str:
    """kohya's sshs_model_hash: sha256 of the safetensors tensor data, the header left out (the
    hash A1111 shows in `Lora hashes`)."""
    from safetensors.torch import save

    blob = save(tensors)
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def to_kohya(path: Path, studio_meta: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, safetensors metadata) of a diffusers/peft LoRA file in kohya's layout."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    tensors, _ = _read(path)
    cls = _pipeline_class(list(tensors))
    state_dict, _, metadata = cls.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
    peft = _to_peft(state_dict)
    alphas = _peft_alphas(peft, metadata)
    single_te = "text_encoder_2" not in peft
    # convert_state_dict_to_kohya's base name of each module -> (kohya's own name, its alpha)
    names: dict[str, tuple[str, float]] = {}
    for key, alpha in alphas.items():
        component, module = key.split(".", 1)
        theirs = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
        names[f"{theirs}_{module.replace('.', '_')}"] = (_kohya_base(component, module, single_te), alpha)
    converted = convert_state_dict_to_kohya({f"{c}.{k}": v for c, part in peft.items() for k, v in part.items()})
    out: dict[str, Any] = {}
    for key, value in converted.items():
        base, _, rest = key.partition(".")
        name, alpha = names[base]
        if rest == "alpha":
            value = torch.tensor(alpha)  # diffusers writes alpha = rank; the LoRA's own alpha keeps its strength
        out[f"{name}.{rest}"] = value.contiguous()
    ranks = [int(v.shape[0]) for k, v in out.items() if k.endswith(".lora_down.weight")]
    alpha_values = [float(v) for k, v in out.items() if k.endswith(".alpha")]
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(collections.Counter(ranks).most_common(1)[0][0]),
            "ss_network_alpha": f"{collections.Counter(alpha_values).most_common(1)[0][0]:g}",
            "sshs_model_hash": addnet_hash(out)}
    if studio_meta:
        meta["studio.json"] = studio_meta
    return out, meta


def to_diffusers(path: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(pipeline class, {component: diffusers-layout layers}) of a kohya LoRA file. Each module's
    alpha/rank scale is folded into its up weights, so the file loads at the same strength
    anywhere, with or without alpha support (diffusers' layout has no alpha)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    tensors, _ = _read(path)
    cls = _pipeline_class(list(tensors))
    baked: dict[str, Any] = {}
    for key, value in tensors.items():
        base, _, rest = key.partition(".")
        if rest == "alpha":
            continue
        if rest == "lora_up.weight" and f"{base}.alpha" in tensors:
            rank = tensors[f"{base}.lora_down.weight"].shape[0]
            value = value * (float(tensors[f"{base}.alpha"]) / rank)
        baked[key] = value
    state_dict, _ = cls.lora_state_dict(baked)
    layers = {c: convert_state_dict_to_diffusers(part) for c, part in _to_peft(state_dict).items()}
    return cls, layers


def export(source: str | Path, fmt: str, out: str | Path | None = None, *, allow_pickle: bool = False) -> ExportReport:
    """Write the LoRA at `source` in layout `fmt` (kohya: one .safetensors file; diffusers: a
    folder with pytorch_lora_weights.safetensors), never over an existing path."""
    from safetensors.torch import save_file

    from studio.outputs import atomic_path

    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt} is not a LoRA layout studio writes", f"use one of: {', '.join(FORMATS)}")
    path = source_file(source, allow_pickle=allow_pickle)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    have = layout(keys)
    if have == "transformer":
        raise UsageError(f"{path.name} is a LoRA for a transformer model (Flux, SD3, ...); kohya export covers "
                         "UNet models (SD 1.x/2.x, SDXL)", "use it as it is: --lora loads it")
    if have == "unknown":
        raise UsageError(f"{path.name} is not a LoRA in diffusers, peft or kohya layout", "pass a LoRA .safetensors file")
    if have == fmt:
        raise UsageError(f"{path.name} is already in {fmt} layout", "nothing to convert; --lora loads it as it is")
    name = path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem
    target = Path(out).expanduser() if out else Path(f"{name}-{fmt}" + (".safetensors" if fmt == "kohya" else ""))
    if target.exists() or target.is_symlink():
        raise UsageError(f"{target} exists", "pick a new --out; studio never overwrites")
    if fmt == "kohya":
        if target.suffix != ".safetensors":
            raise UsageError(f"--out {target} must end in .safetensors (a kohya LoRA is one file)",
                             f"e.g. --out {target.with_suffix('.safetensors').name}")
        studio_meta = (path.parent / "studio.json").read_text() if (path.parent / "studio.json").is_file() else None
        tensors, meta = to_kohya(path, studio_meta)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        count = len(tensors)
    else:
        cls, layers = to_diffusers(path)
        with atomic_path(target, is_dir=True) as tmp:
            cls.save_lora_weights(tmp, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
                                  **({"text_encoder_2_lora_layers": layers["text_encoder_2"]} if "text_encoder_2" in layers else {}),
                                  safe_serialization=True)
            with safe_open(str(path), framework="pt") as f:
                studio_meta = (f.metadata() or {}).get("studio.json")
            if studio_meta:
                (tmp / "studio.json").write_text(studio_meta)
        count = sum(len(v) for v in layers.values())
    summary = _rank_alpha(target if fmt == "kohya" else target / "pytorch_lora_weights.safetensors")
    return ExportReport(out=target, format=fmt, source_format=have, tensors=count, **summary)


def _rank_alpha(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        ranks = sorted({int(f.get_slice(k).get_shape()[0]) for k in keys if re.search(r"(lora_down|lora\.down|lora_linear_layer\.down|lora_A)\.weight$", k)})
        alphas = sorted({float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}) or [float(r) for r in ranks]
    return {"rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": alphas[0] if len(alphas) == 1 else alphas}
