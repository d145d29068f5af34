"""peft adapters on transformers models (caption/VQA, code, MIDI LMs), plus what every adapter
shares: the method table, adapter metadata (`studio.json`), `info`, and `merge` for both
transformers and diffusers bases.

Using adapters on a transformers model is one call:

    from studio.adapters.peft_adapters import apply_adapters
    model = apply_adapters(model, ["runs/my-lora:0.8", "other-lora"], base_label="code-small")

peft injects the adapter layers into `model` in place (PeftModel wraps the same modules), so
the pipeline keeps calling `model.generate(...)` as before. Several adapters are active at
once, each at its scale (`LoraLayer.set_scale`: the trained alpha/r times SCALE), which is
exact for LoRA, LoHa and LoKr alike, with no weighted-merge arithmetic. `AdapterSet` keeps the
adapters loaded across runs of a cached pipeline and switches them exactly (a run without
--lora disables every adapter layer: outputs equal the base's bit for bit).

Diffusers pipelines load LoRAs through adapters/lora.py (`load_lora_weights`). Training them is
pipelines/training/adapters.py, a layer above: this package is inference-time only and imports
nothing from pipelines or training.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from studio.errors import BackendUnavailable, InputFileError, UsageError

METHODS = ("lora", "loha", "lokr", "ia3")
META_FILE = "studio.json"  # studio's own record beside peft's adapter_config.json
# names of output heads and embeddings: adapting them is rarely wanted and peft warns on tied weights
SKIP_TARGETS = {"lm_head", "embed_out", "output", "score", "classifier", "wte", "wpe", "embed_tokens"}
FEEDFORWARD_HINTS = ("mlp", "fc", "ffn", "up_proj", "down_proj", "gate_proj", "intermediate", "c_fc", "ff.")


# ----------------------------------------------------------------------------- configs
def default_targets(model: Any) -> list[str]:
    """The leaf names of every Linear (and GPT-2 Conv1D) layer except heads and embeddings:
    QLoRA's finding is that adapting all linear layers matches full fine-tuning best."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (torch.nn.Linear,)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}
    names -= SKIP_TARGETS
    return sorted(n for n in names if not n.isdigit())


def peft_config(method: str, *, rank: int, alpha: float | None, targets: Sequence[str], dropout: float = 0.0,
                task_type: str | None = None, feedforward: Sequence[str] | None = None) -> Any:
    """The peft config of `method` (lora | loha | lokr | ia3)."""
    import peft

    if method not in METHODS:
        raise UsageError(f"unknown adapter method {method!r}", f"use one of {'|'.join(METHODS)}")
    if rank < 1 and method != "ia3":
        raise UsageError(f"--rank must be at least 1, got {rank}", "pass --rank 8")
    alpha = float(alpha if alpha is not None else rank)
    common: dict[str, Any] = {"target_modules": list(targets)}
    if task_type:
        common["task_type"] = task_type
    if method == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, **common)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, **common)
    ff = list(feedforward) if feedforward is not None else [t for t in targets if any(h in t for h in FEEDFORWARD_HINTS)]
    return peft.IA3Config(feedforward_modules=ff, **common)


def check_targets(model: Any, targets: Sequence[str], label: str) -> None:
    """--targets names that match no layer are a usage error naming what does exist."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    full = {name for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves and t not in full and not any(n.endswith("." + t) for n in full)]
    if missing:
        known = ", ".join(default_targets(model)[:12])
        raise UsageError(f"--targets {', '.join(missing)}: no such layer in {label}", f"linear layers of this model: {known}")


# ----------------------------------------------------------------------------- metadata
def write_metadata(folder: Path, meta: dict[str, Any]) -> Path:
    path = Path(folder) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_metadata(source: str | Path) -> dict[str, Any]:
    """Everything known about an adapter folder or file: studio.json, peft's adapter_config.json,
    or (a diffusers LoRA file) what its safetensors keys and metadata say."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputFileError(f"adapter {source} does not exist", "pass an adapter folder or .safetensors file")
    folder = path if path.is_dir() else path.parent
    info: dict[str, Any] = {"path": str(path)}
    if (folder / META_FILE).is_file():
        info.update(json.loads((folder / META_FILE).read_text()))
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        info.setdefault("format", "peft")
        info.setdefault("method", str(config.get("peft_type", "")).lower())
        info.setdefault("rank", config.get("r"))
        info.setdefault("alpha", config.get("lora_alpha", config.get("alpha")))
        targets = config.get("target_modules")
        info.setdefault("targets", sorted(targets) if isinstance(targets, list) else targets)
        info.setdefault("base", {"source": config.get("base_model_name_or_path")})
    weights = path if path.is_file() else next(iter(sorted(folder.glob("*.safetensors"))), None)
    if weights is not None and weights.suffix == ".safetensors":
        info.update({k: v for k, v in _safetensors_summary(weights).items() if k not in info or info[k] in (None, "")})
    if len(info) == 1:
        raise InputFileError(f"{source} holds no adapter (no adapter_config.json, {META_FILE} or .safetensors)",
                             "pass the folder `studio adapt train` wrote, or a LoRA .safetensors file")
    return info


# kohya module-name prefixes -> the pipeline component they adapt
_KOHYA_PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                "lora_transformer": "transformer"}
# the layer a kohya module name ends in (its names join the module path with "_", so the leaf is known only by name)
_KOHYA_LEAF = re.compile(r"_(to_q|to_k|to_v|to_out_0|q_proj|k_proj|v_proj|out_proj|proj_in|proj_out|ff_net_0_proj|"
                         r"ff_net_2|fc1|fc2|conv1|conv2|conv_shortcut|conv|time_emb_proj|proj|linear_1|linear_2)$")
_DOWN = re.compile(r"(lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$")


def _safetensors_summary(path: Path) -> dict[str, Any]:
    """What a LoRA .safetensors file says about itself, in any of the layouts --lora loads:
    diffusers (unet./text_encoder. + lora.down or lora_linear_layer), peft (lora_A/lora_B) or
    kohya (lora_unet_/lora_te_ + lora_down/lora_up/alpha)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        header = f.metadata() or {}
        ranks = {tuple(f.get_slice(k).get_shape())[0] for k in keys if _DOWN.search(k)}
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    kohya = bool(keys) and all(k.startswith(tuple(p + "_" for p in _KOHYA_PARTS)) for k in keys)
    if kohya:
        modules = {k.split(".", 1)[0] for k in keys}
        parts = sorted({next(part for prefix, part in sorted(_KOHYA_PARTS.items(), key=lambda kv: -len(kv[0]))
                             if m.startswith(prefix + "_")) for m in modules})
        targets = sorted({m.group(1).replace("to_out_0", "to_out.0") for name in modules if (m := _KOHYA_LEAF.search(name))})
        fmt = "kohya"
    else:
        parts = sorted({k.split(".", 1)[0] for k in keys})
        targets = sorted({m.group(1) for k in keys
                          if (m := re.search(r"\.([A-Za-z_0-9]+(?:\.\d+)?)\.(?:lora_[AB]|lora\.(?:down|up)|lora_linear_layer\.(?:down|up))\.weight$", k))})
        fmt = "diffusers" if any(p in ("unet", "transformer", "text_encoder", "text_encoder_2") for p in parts) else "safetensors"
        lora_meta = header.get("lora_adapter_metadata")
        if lora_meta:  # diffusers' save_lora_weights records peft's config per component
            with contextlib.suppress(json.JSONDecodeError):
                alphas |= {float(v) for k, v in json.loads(lora_meta).items() if k.endswith(".lora_alpha")}
    out: dict[str, Any] = {"format": fmt, "parts": parts, "tensors": len(keys)}
    if ranks:
        out["method"] = "lora"
        out["rank"] = sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)
        if not alphas and fmt == "diffusers":
            alphas = set(ranks)  # no alpha stored: diffusers loads it at alpha = rank (scale 1)
    if alphas:
        out["alpha"] = sorted(alphas)[0] if len(alphas) == 1 else sorted(alphas)
    if targets:
        out["targets"] = targets
    if header.get(META_FILE):
        out.update(json.loads(header[META_FILE]))
    return out


def format_info(info: dict[str, Any]) -> str:
    """`studio adapt info` as readable lines."""
    base = info.get("base") or {}
    base_text = base.get("alias") or base.get("name") or base.get("source") if isinstance(base, dict) else base
    training = info.get("training") or {}
    rows = [("adapter", info.get("path")), ("task", info.get("task")), ("method", info.get("method")),
            ("rank", info.get("rank")), ("alpha", info.get("alpha")),
            ("targets", ", ".join(info["targets"]) if isinstance(info.get("targets"), list) else info.get("targets")),
            ("base model", base_text), ("format", info.get("format")),
            ("parts", ", ".join(info.get("parts", [])) if info.get("format") != "peft" else None),
            ("trainable params", info.get("trainable_params"))]
    rows += [(f"  {k}", v) for k, v in training.items()]
    return "\n".join(f"{k:<18} {v}" for k, v in rows if v not in (None, "", []))


# ----------------------------------------------------------------------------- using adapters
def _resolve(source: str, *, allow_pickle: bool = False, offline: bool | None = None) -> str:
    """A local adapter folder, or a hub id / alias through the model resolver."""
    from studio import models

    from studio.safety import PickleRefused, check_pickle

    path = Path(source).expanduser()
    if path.is_dir():
        check_pickle(path, allow_pickle=allow_pickle, what="adapter")  # peft falls back to adapter_model.bin
        return str(path.resolve())
    if path.is_file():
        raise UsageError(f"adapter {source} is a file; transformers adapters are peft folders",
                         "pass the folder holding adapter_config.json and adapter_model.safetensors")
    try:
        spec = models.resolve(source, allow_pickle=allow_pickle, offline=offline)
    except PickleRefused:
        raise
    except UsageError as exc:
        raise UsageError(f"adapter {source!r}: {exc.message}", "pass the folder `studio adapt train` wrote") from exc
    return spec.location()


def _base_of(model: Any) -> Any:
    """The transformers model under a PeftModel (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _adapter_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _fit_error(label: str, base_label: str, text: str, meta: dict[str, Any]) -> UsageError:
    trained_on = (meta.get("base") or {}).get("source") if isinstance(meta.get("base"), dict) else None
    hint = f"this adapter was trained on {trained_on}" if trained_on else "use an adapter trained for this base model"
    return UsageError(f"adapter {label} does not fit {base_label}: {text}", hint + "; pass a matching --model")


class AdapterSet:
    """The peft adapters loaded into one transformers model, and which are active at what scale."""

    def __init__(self, model: Any, base_label: str = "the model"):
        self.model = _base_of(model)
        self.base_label = base_label
        self.peft: Any = None  # the PeftModel wrapping self.model, once an adapter is loaded
        self.loaded: dict[str, str] = {}  # location -> adapter name

    def apply(self, texts: Iterable[str], *, allow_pickle: bool = False, offline: bool | None = None) -> list[dict[str, Any]]:
        """Make exactly these `PATH[:SCALE]` adapters active; returns what to record per adapter."""
        from studio.adapters.lora import parse_lora

        specs = [parse_lora(t) for t in texts]
        wanted: list[tuple[str, float, str, dict[str, Any]]] = []
        for spec in specs:
            location = _resolve(spec.source, allow_pickle=allow_pickle, offline=offline)
            if location not in self.loaded:
                self._load(location, spec.source, f"a{len(self.loaded)}")
            meta = _quiet_meta(location)
            wanted.append((self.loaded[location], spec.scale, spec.source, meta))
        names = [w[0] for w in wanted]
        if len(set(names)) != len(names):
            raise UsageError("the same adapter is given twice", "pass each --lora once, with one scale")
        if self.peft is None:
            return []
        if not wanted:
            self.peft.base_model.disable_adapter_layers()  # bypassed exactly: the base's outputs
            return []
        self.peft.base_model.enable_adapter_layers()
        for name, scale, source, meta in wanted:
            if scale != 1.0 and not all(hasattr(layer, "set_scale") for layer in self._layers(name)):
                raise UsageError(f"adapter {source} ({meta.get('method', 'this method')}) has no scale",
                                 f"pass {source} without :SCALE")
            for layer in self._layers(name):
                if hasattr(layer, "set_scale"):  # IA3 has no scale (only 1.0 gets here)
                    layer.set_scale(name, scale)
        # several active adapters add their deltas (LoRA/LoHa/LoKr layers sum every active adapter)
        self.peft.base_model.set_adapter(names)
        self.model.requires_grad_(False)  # set_adapter marks adapters trainable; here they only run
        return [{"source": s, "scale": sc, "adapter": n, "method": m.get("method"), "trained_on":
                 (m.get("base") or {}).get("source") if isinstance(m.get("base"), dict) else None}
                for n, sc, s, m in wanted]

    def _layers(self, name: str) -> list[Any]:
        # adapter_layer_names: ("lora_A", "lora_B", ...), ("hada_w1_a", ...), ("ia3_l",): per-adapter dicts
        return [layer for layer in _adapter_layers(self.model)
                if any(name in getattr(layer, attr, {}) for attr in getattr(layer, "adapter_layer_names", ()))]

    def _load(self, location: str, label: str, name: str) -> None:
        import warnings

        from peft import PeftModel

        meta = _quiet_meta(location)
        if not (Path(location) / "adapter_config.json").is_file():
            raise UsageError(f"adapter {label} has no adapter_config.json (not a peft adapter for a transformers model)",
                             "diffusers LoRAs (pytorch_lora_weights.safetensors) go to image/video models")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(already|multiple adapters|tied).*")
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, location, adapter_name=name)
                else:
                    self.peft.load_adapter(location, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            self._forget(name)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "size mismatch" in str(exc):
                text = "its layer shapes differ from the model's (" + text[:160] + ")"
            raise _fit_error(label, self.base_label, text, meta) from exc
        if not self._layers(name):
            self._forget(name)
            raise _fit_error(label, self.base_label, "none of its layers match the model's", meta)
        self.loaded[location] = name

    def _forget(self, name: str) -> None:
        if self.peft is None:
            return
        try:
            if name in self.peft.peft_config:
                if len(self.peft.peft_config) == 1:  # the only adapter: take the wrapper off again
                    self.peft.unload()
                    self.peft = None
                else:
                    self.peft.delete_adapter(name)
        except Exception:  # half-loaded: nothing more to undo
            pass


def _quiet_meta(location: str) -> dict[str, Any]:
    try:
        return read_metadata(location)
    except UsageError:
        return {}


def apply_adapters(model: Any, adapters: Sequence[str], *, base_label: str = "the model",
                   allow_pickle: bool = False, offline: bool | None = None) -> Any:
    """Load `PATH[:SCALE]` peft adapters into a transformers `model` (in place) and make them
    active; returns the model to keep using. Calling it again with another list switches the
    active set exactly (an empty list: the base model's outputs). Records go on
    `model._studio_adapter_records` for the caller's metadata."""
    base = _base_of(model)
    adapter_set = getattr(base, "_studio_adapters", None)
    if adapter_set is None:
        if not adapters:
            return model
        adapter_set = AdapterSet(base, base_label)
        base._studio_adapters = adapter_set
    base._studio_adapter_records = adapter_set.apply(adapters, allow_pickle=allow_pickle, offline=offline)
    return model


def adapter_records(model: Any) -> list[dict[str, Any]]:
    """What apply_adapters recorded on its last call (for output metadata)."""
    return list(getattr(_base_of(model), "_studio_adapter_records", []) or [])


# ----------------------------------------------------------------------------- loading bases
def is_diffusers_folder(location: str | Path) -> bool:
    return (Path(location) / "model_index.json").is_file()


def load_transformers(location: str, load_kwargs: dict[str, Any], *, dtype: Any = None, quantization_config: Any = None) -> tuple[Any, Any]:
    """(model, processor-or-tokenizer) of a transformers folder, the class named by its config's
    `architectures` (LlamaForCausalLM, BlipForConditionalGeneration, GPT2LMHeadModel, ...). A
    folder without a transformers processor (miditok MIDI models) gives None for the processor."""
    import transformers
    from transformers import AutoConfig

    light = {k: v for k, v in load_kwargs.items() if k != "use_safetensors"}
    config = AutoConfig.from_pretrained(location, **light)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    kwargs = dict(load_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = cls.from_pretrained(location, **kwargs)
    processor = None
    for auto in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            processor = auto.from_pretrained(location, **light)
            break
        except Exception:  # no processor files: e.g. a miditok tokenizer.json MIDI model
            continue
    if processor is not None and not hasattr(processor, "save_pretrained"):
        processor = None
    return model, processor


# ----------------------------------------------------------------------------- merge
@dataclass
class MergeReport:
    out: Path
    kind: str  # "transformers" | "diffusers"
    adapters: list[dict[str, Any]]


def merge(base: str, adapters: Sequence[str], out: Path, *, allow_pickle: bool = False, offline: bool | None = None,
          progress: Any = None) -> MergeReport:
    """Write base + adapters (at their scales) as one plain model folder that loads with
    from_pretrained and needs neither peft nor the adapters."""
    from studio import models
    from studio.outputs import atomic_path

    if not adapters:
        raise UsageError("merge needs at least one --lora", "studio adapt merge --base M --lora DIR --out merged/")
    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} exists", "pick a new --out folder; studio never overwrites")
    spec = models.resolve(base, allow_pickle=allow_pickle, offline=offline)
    label = spec.alias or spec.name
    location = spec.location()
    with atomic_path(out, is_dir=True) as tmp:
        if is_diffusers_folder(location):
            from diffusers import DiffusionPipeline

            from studio.adapters.lora import LoraSet, parse_lora

            with models.loading(spec, "base model"):
                pipe = DiffusionPipeline.from_pretrained(location, **spec.load_kwargs(library="diffusers"))
            records = LoraSet(pipe, base_label=label).apply([parse_lora(a) for a in adapters], fuse=True,
                                                           allow_pickle=allow_pickle, offline=bool(offline))
            pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay
            pipe.save_pretrained(tmp, safe_serialization=True)
            kind = "diffusers"
        else:
            with models.loading(spec, "base model"):
                model, processor = load_transformers(location, spec.load_kwargs())
            apply_adapters(model, adapters, base_label=label, allow_pickle=allow_pickle, offline=offline)
            records = adapter_records(model)
            adapter_set = model._studio_adapters
            merged = adapter_set.peft.merge_and_unload(adapter_names=[r["adapter"] for r in records])
            merged.save_pretrained(tmp, safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(tmp)
            for extra in ("tokenizer.json",):  # miditok's tokenizer lives beside MIDI models
                if processor is None and (Path(location) / extra).is_file():
                    (tmp / extra).write_bytes((Path(location) / extra).read_bytes())
            kind = "transformers"
        write_metadata(tmp, {"merged_from": {"base": spec.identity(), "adapters": records}, "kind": kind})
    return MergeReport(out=out, kind=kind, adapters=records)


def require_bitsandbytes(kind: str, device: Any) -> Any:
    """A BitsAndBytesConfig for a QLoRA-style frozen base, or a clear error where it cannot run."""
    from studio.device import module_available

    if device.type != "cuda":
        raise BackendUnavailable(f"--quantize-base {kind} trains on a bitsandbytes-quantised base, which needs a CUDA GPU",
                                 "drop --quantize-base on the CPU (LoRA on the full-precision base), or train on a GPU")
    if not module_available("bitsandbytes"):
        raise BackendUnavailable(f"--quantize-base {kind} needs bitsandbytes", "pip install bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
