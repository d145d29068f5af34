"""LoRA adapters for diffusers pipelines: `--lora PATH_OR_ID[:SCALE]`, several at once, fused or not.

Loading goes through diffusers' `load_lora_weights` (peft underneath), so every LoRA format
diffusers reads works: diffusers/peft, kohya and A1111 `.safetensors` files, hub repos. Several
adapters are mixed with `set_adapters(names, adapter_weights=scales)`; `fuse=True` merges them into
the weights (faster steps, the same images up to float rounding).

`LoraSet` keeps the adapters loaded on one pipeline between runs, so a batch that reuses a LoRA
loads it once; switching the active set is exact (disabled adapters are bypassed, not subtracted).
Training LoRAs lives apart (adapters/ training modules); this file only loads and fuses.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.errors import BackendUnavailable, UsageError
from studio.progress import quiet_libraries


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH_OR_ID[:SCALE]`."""

    source: str  # a .safetensors file, a folder, a hub id or a model card alias
    scale: float = 1.0  # adapter weight (0 = off, 1 = as trained; A1111's <lora:name:scale>)

    def to_text(self) -> str:
        return f"{self.source}:{self.scale:g}"


def parse_lora(text: str) -> LoraSpec:
    """`PATH_OR_ID[:SCALE]`; the scale is taken from the right, so paths may contain ':'."""
    text = str(text).strip()
    if not text:
        raise UsageError("--lora needs a path, hub id or alias", "e.g. --lora my-style.safetensors:0.8")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return LoraSpec(source=text)
        return LoraSpec(source=head, scale=scale)
    return LoraSpec(source=text)


def _adapter_name(index: int, source: str) -> str:
    # peft adapter names become module attribute keys: letters, digits and underscores only
    stem = Path(source.rstrip("/")).stem or "lora"
    return f"lora{index}_" + (re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:40] or "x")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LoraSet:
    """The LoRAs loaded into one diffusers pipeline, and which of them are active."""

    def __init__(self, pipe: Any, base_label: str = "the model"):
        self.pipe = pipe
        self.base_label = base_label
        self.loaded: dict[str, str] = {}  # resolved location -> adapter name
        self.fused: tuple | None = None  # the (names, scales) merged into the weights, if any
        self._unfused: dict[tuple, Any] = {}  # exact copies of the weights a fuse changed

    def _resolve(self, spec: LoraSpec, *, allow_pickle: bool, offline: bool) -> tuple[str, dict[str, Any], Any]:
        """(what load_lora_weights gets, its kwargs, the ModelSpec) for a LoRA source."""
        from studio import models
        from studio.safety import PickleRefused

        try:
            mspec = models.resolve(spec.source, allow_pickle=allow_pickle, offline=offline)
        except PickleRefused:
            raise
        except UsageError as exc:
            raise UsageError(f"LoRA {spec.source!r}: {exc.message}",
                             "pass a .safetensors file, a folder with pytorch_lora_weights.safetensors, or a hub id") from exc
        kwargs: dict[str, Any] = {}
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if mspec.kind == "file":
            path = Path(mspec.source)
            return str(path.parent), {**kwargs, "weight_name": path.name}, mspec
        return mspec.location(), kwargs, mspec

    def apply(self, specs: list[LoraSpec], *, fuse: bool = False, allow_pickle: bool = False,
              offline: bool = False) -> list[dict[str, Any]]:
        """Make exactly `specs` active (with their scales) and return what to record per adapter."""
        pipe = self.pipe
        if specs and not hasattr(pipe, "load_lora_weights"):
            raise UsageError(f"{type(pipe).__name__} does not take LoRA adapters", "drop --lora for this model")
        wanted: list[tuple[str, float, dict[str, Any], dict[str, Any]]] = []
        for spec in specs:
            location, kwargs, mspec = self._resolve(spec, allow_pickle=allow_pickle, offline=offline)
            key = f"{location}|{kwargs.get('weight_name', '')}"
            if key not in self.loaded:
                self._unfuse()
                name = _adapter_name(len(self.loaded), spec.source)
                self._load(location, kwargs, name, spec.source)
                self.loaded[key] = name
            wanted.append((self.loaded[key], spec.scale, mspec.identity(), _a1111_identity(location, kwargs)))

        names = [n for n, _, _, _ in wanted]
        if len(set(names)) != len(names):
            raise UsageError("the same LoRA is given twice", "pass each --lora once, with one scale")
        state = (tuple(names), tuple(s for _, s, _, _ in wanted)) if fuse else None
        if self.fused is not None and self.fused != state:
            self._unfuse()
        if not wanted:
            if self.loaded:
                pipe.disable_lora()  # bypassed: outputs equal the base model's exactly
            return []
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[s for _, s, _, _ in wanted])
        if fuse and self.fused is None:
            self._unfused = {key: p.detach().clone() for key, p in self._base_params().items()}
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            self.fused = state
        # name and hash: what A1111 writes for a LoRA (<lora:NAME:SCALE>, `Lora hashes: "NAME: HASH"`)
        return [{"source": spec.source, "scale": scale, "adapter": name, "model": ident, "fused": bool(fuse), **a1111}
                for spec, (name, scale, ident, a1111) in zip(specs, wanted)]

    def _forget(self, name: str) -> None:
        if name in _all_adapters(self.pipe):
            try:
                self.pipe.delete_adapters(name)
            except Exception:  # a half-loaded adapter: nothing more to undo
                pass

    def _base_params(self) -> dict[tuple, Any]:
        """The weights under every LoRA layer (what fusing changes), by (component, module, name)."""
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        found: dict[tuple, Any] = {}
        for component in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            model = getattr(self.pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                continue
            for module_name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    for name, param in module.get_base_layer().named_parameters(recurse=False):
                        found[(component, module_name, name)] = param
        return found

    def _unfuse(self) -> None:
        if self.fused is not None:
            import torch

            # unfuse_lora subtracts the merged deltas, which restores the weights only up to float
            # rounding; the copies taken before fusing make later runs equal the base bit for bit
            self.pipe.unfuse_lora()
            with torch.no_grad():
                for key, param in self._base_params().items():
                    if key in self._unfused:
                        param.copy_(self._unfused[key])
            self._unfused = {}
            self.fused = None

    def _load(self, location: str, kwargs: dict[str, Any], name: str, label: str) -> None:
        pipe = self.pipe
        before = set(_all_adapters(pipe))
        try:
            # quiet_libraries: transformers 5 also prints a "LOAD REPORT" naming the other loaded
            # adapters' keys as missing when a second LoRA goes into the same text encoder
            with quiet_libraries(), warnings.catch_warnings():
                # "no LoRA keys for the text encoder" is normal for UNet-only LoRAs, and peft's
                # "multiple adapters" notice is what several --lora mean
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                pipe.load_lora_weights(location, adapter_name=name, **kwargs)
        except Exception as exc:
            self._forget(name)
            text = _first_line(exc)
            if "version of PEFT" in text:
                # transformers 5 loads text-encoder LoRAs only with a newer peft than may be installed
                raise BackendUnavailable(f"LoRA {label} has text-encoder weights, and this transformers needs a newer peft "
                                         f"to load them ({text})", "pip install -U peft") from exc
            if isinstance(exc, (OSError, FileNotFoundError)) or "no file named" in text.lower():
                raise UsageError(f"LoRA {label}: no LoRA weights found ({text})",
                                 "pass the .safetensors file itself, or a folder holding pytorch_lora_weights.safetensors"
                                 + ("" if kwargs.get("use_safetensors") is None else "; pickle LoRAs need --allow-pickle")) from exc
            raise UsageError(f"LoRA {label} does not fit {self.base_label}: {text}",
                             "use a LoRA trained for this base model (an SD 1.5 LoRA does not fit SDXL, and so on)") from exc
        if name not in set(_all_adapters(pipe)) - before:
            # diffusers only warns when no key matches the model; a LoRA that changes nothing is an error here
            self._forget(name)
            raise UsageError(f"LoRA {label} does not fit {self.base_label}: none of its weights match the model's layers",
                             "use a LoRA trained for this base model (an SD 1.5 LoRA does not fit SDXL, and so on)")


def weight_file(location: str, weight_name: str | None = None) -> Path | None:
    """The .safetensors file load_lora_weights reads from a LoRA location (file, folder), if local."""
    path = Path(location)
    if weight_name:
        path = path / weight_name
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return path / "pytorch_lora_weights.safetensors"
        found = sorted(path.glob("*.safetensors"))
        return found[0] if len(found) == 1 else None
    return None


def a1111_hash(path: Path, _cache: dict = {}) -> str:
    """A1111's short hash of a LoRA .safetensors file: the first 12 hex digits of the sha256 of its
    tensor data, the safetensors header left out (kohya's / sd-webui-additional-networks' "addnet
    hash", hashes.addnet_hash_safetensors), or the `sshs_model_hash` a kohya trainer stored."""
    import hashlib
    import json

    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _cache:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n) or b"{}")
            stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
            if stored:
                _cache[key] = str(stored)
            else:
                h = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                _cache[key] = h.hexdigest()
    return _cache[key][:12]


def _a1111_identity(location: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    path = weight_file(location, kwargs.get("weight_name"))
    if path is None:
        return {"name": Path(location.rstrip("/")).name}
    name = path.parent.name if path.name == "pytorch_lora_weights.safetensors" else path.stem
    try:
        return {"name": name, "hash": a1111_hash(path)}
    except (OSError, ValueError):  # an unreadable header: the loader reports the real problem
        return {"name": name}


def _all_adapters(pipe: Any) -> list[str]:
    try:
        return [n for names in pipe.get_list_adapters().values() for n in names]
    except Exception:  # no peft layers yet
        return []

