"""The device manager: one object that decides device, precision, attention, offload,
quantisation and compilation, applies them to every model, and can say what it chose and why.

`DeviceSettings` is what the user asked for (flags < preset < environment-free defaults); it is
plain data and imports nothing heavy, so the CLI can build and validate it. `DeviceManager`
resolves `auto`, imports torch, and applies itself to models with `prepare(model)`.

Rules (DESIGN.md): a backend that was asked for and is missing is an error with a hint, never a
silent fallback; `auto` picks the best available and records the pick (see `describe()`), which
the output writer stores in every output's metadata.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from studio.errors import BackendUnavailable, UsageError

DEVICES_HELP = "auto|cpu|cuda[:N]|mps"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ATTENTIONS = ("auto", "sdpa", "flash", "xformers", "math", "sliced")
OFFLOADS = ("none", "model", "sequential")
QUANTIZE = ("none", "int8", "int4")

# environment variables that may set each field (below flags and presets in precedence)
ENV = {
    "device": "STUDIO_DEVICE",
    "precision": "STUDIO_PRECISION",
    "attention": "STUDIO_ATTENTION",
    "offload": "STUDIO_OFFLOAD",
    "quantize": "STUDIO_QUANTIZE",
    "compile": "STUDIO_COMPILE",
}


@dataclass(frozen=True)
class DeviceSettings:
    """What the user asked for. Hashable: part of the loaded-pipeline cache key."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (weights and autocast dtype)
    attention: str = "auto"  # auto | sdpa | flash | xformers | math | sliced
    offload: str = "none"  # none | model | sequential (diffusers CPU offload; accelerators only)
    quantize: str = "none"  # none | int8 | int4 (weight-only, torchao; bitsandbytes on CUDA)
    compile: bool = False  # torch.compile the denoiser / language model

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise UsageError(f"unknown device {dev!r}", f"use one of {DEVICES_HELP}")
        for name, allowed in (
            ("precision", PRECISIONS),
            ("attention", ATTENTIONS),
            ("offload", OFFLOADS),
            ("quantize", QUANTIZE),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"unknown {name} {value!r}", f"use one of {'|'.join(allowed)}")

    @classmethod
    def from_sources(cls, flags: dict[str, Any] | None = None, preset: dict[str, Any] | None = None,
                     env: dict[str, str] | None = None) -> "DeviceSettings":
        """Merge defaults < environment < preset < flags. `None` in flags means 'not given'."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for key, var in ENV.items():
            if env.get(var):
                values[key] = env[var].lower() in ("1", "true", "yes") if key == "compile" else env[var]
        for source in (preset or {}, flags or {}):
            for key, value in source.items():
                if key in ENV and value is not None:
                    values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# CPU feature flags that mean bf16 matmuls run natively (x86 AVX512-BF16 and AMX; Arm's BF16
# extension, "bf16" in /proc/cpuinfo's Features). Without one, torch emulates bf16 through fp32
# conversions: on a CPU without them a 256 px image took 6.5x longer in bf16 than in fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# attention choices that skip the fused SDPA kernels: every head's full (tokens x tokens) matrix is
# materialised (math: 6.7x slower than sdpa at 4096 tokens on this project's 2-core machine)
SLOW_ATTENTION = {
    "math": "computes attention without a fused kernel (the full tokens x tokens matrix), several times slower "
            "than sdpa at image sizes",
    "sliced": "computes attention slice by slice to save memory, slower than sdpa, which already avoids the "
              "full matrix",
}

log = logging.getLogger("studio.device")


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_cpu_flags(cpuinfo: str | None = None, env: dict[str, str] | None = None) -> frozenset[str] | None:
    """The CPU's feature flags: STUDIO_CPU_FLAGS (space/comma separated) if set, else the `flags`
    (x86) or `Features` (Arm) line of `cpuinfo` (default: /proc/cpuinfo). None when unknown
    (macOS, Windows): studio then warns about nothing it cannot know."""
    env = os.environ if env is None else env
    if env.get("STUDIO_CPU_FLAGS") is not None:
        return frozenset(env["STUDIO_CPU_FLAGS"].replace(",", " ").split())
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo("/proc/cpuinfo")
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def native_bf16(flags: Iterable[str] | None) -> bool | None:
    """True when the CPU computes bf16 natively, False when its flags say it does not, None unknown."""
    if flags is None:
        return None
    return any(f in set(flags) for f in NATIVE_BF16_FLAGS)


def module_available(name: str) -> bool:
    """True when `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class Resolved:
    """What `auto` became on this machine, and why. Stored in every output's metadata."""

    device: str
    precision: str
    attention: str
    offload: str
    quantize: str
    compile: bool
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # choices this device runs far slower than the default


class DeviceManager:
    """Resolves settings on this machine and applies them to models.

    Build once per process (or per distinct settings); pipelines call `prepare(model)` on every
    model they load, `autocast()` / `attention_context()` around inference, and `generator(seed)`
    for reproducible noise.
    """

    def __init__(self, settings: DeviceSettings | None = None, *, allow_bf16: bool = True,
                 cpu_flags: Iterable[str] | None = None):
        import torch

        self.torch = torch
        self.settings = settings or DeviceSettings()
        # the CPU's flags decide whether bf16 is fast here; a parameter so tests (and doctor) can
        # describe another CPU without mocking torch
        self.cpu_flags = frozenset(cpu_flags) if cpu_flags is not None else read_cpu_flags()
        self.resolved = self._resolve(self.settings, allow_bf16)
        for text in self.resolved.warnings:
            from studio.progress import setup_logging

            setup_logging()
            log.warning(text)
        self.device = torch.device(self.resolved.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.resolved.precision
        ]

    # ------------------------------------------------------------------ resolution
    def _resolve(self, s: DeviceSettings, allow_bf16: bool) -> Resolved:
        torch = self.torch
        why: dict[str, str] = {}
        warnings: list[str] = []
        cuda_ok = torch.cuda.is_available()
        mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()

        # 1. device
        if s.device == "auto":
            device = "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
            why["device"] = {"cuda": "a CUDA GPU is available", "mps": "Apple MPS is available",
                             "cpu": "no CUDA or MPS device found"}[device]
        else:
            device = s.device
            if device.startswith("cuda"):
                if not cuda_ok:
                    raise BackendUnavailable(
                        f"--device {device} was asked for but torch sees no CUDA GPU "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                        "use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU",
                    )
                index = int(device.split(":")[1]) if ":" in device else 0
                if index >= torch.cuda.device_count():
                    raise BackendUnavailable(
                        f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) found",
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
                    )
            elif device == "mps" and not mps_ok:
                raise BackendUnavailable("--device mps was asked for but MPS is not available here",
                                         "use --device cpu (or auto)")
            why["device"] = "asked for"
        kind = device.split(":")[0]

        # 2. precision
        if s.precision == "auto":
            if kind == "cuda":
                bf16_ok = torch.cuda.is_bf16_supported()
                precision = "bf16" if (bf16_ok and allow_bf16) else "fp16"
                why["precision"] = ("the GPU supports bf16 and the model allows it" if precision == "bf16"
                                    else "fp16 halves memory on the GPU" + ("" if bf16_ok else " (no bf16 support)"))
            elif kind == "mps":
                precision, why["precision"] = "fp16", "fp16 is MPS's fast path"
            else:
                # bf16 is faster on CPUs with avx512_bf16 but changes outputs; fp32 keeps seeds
                # reproducible across machines, so CPU bf16 is opt-in (benchmarks/precision.py),
                # and never suggested where the CPU would emulate it
                precision = "fp32"
                native = native_bf16(self.cpu_flags)
                why["precision"] = "CPU: fp32 keeps outputs exact" + (
                    "; this CPU has native bf16, pass --precision bf16 for speed" if native
                    else "; this CPU has no native bf16 (no avx512_bf16/amx_bf16), bf16 would be far slower"
                    if native is False else "")
        else:
            precision = s.precision
            if precision == "fp16" and kind == "cpu":
                # fp16 matmuls on CPU are slow and some ops lack kernels; say so rather than crawl
                raise BackendUnavailable("--precision fp16 is not supported on the CPU",
                                         "use --precision bf16 (fast on CPUs with AVX512-BF16) or fp32")
            if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
                raise BackendUnavailable("--precision bf16: this GPU has no bf16 support", "use --precision fp16")
            why["precision"] = "asked for"
            if precision == "bf16" and kind == "cpu" and native_bf16(self.cpu_flags) is False:
                why["precision"] = "asked for (this CPU has no native bf16)"
                warnings.append("--precision bf16 runs far slower than fp32 on this CPU: its flags show no avx512_bf16 "
                                "or amx_bf16, so torch emulates bf16; use --precision fp32 (or auto)")

        # 3. attention
        xformers_ok = module_available("xformers")
        if s.attention == "auto":
            attention = "sdpa"
            why["attention"] = "torch SDPA picks the fastest kernel it has for the inputs"
        else:
            attention = s.attention
            if attention in SLOW_ATTENTION:
                warnings.append(f"--attention {attention} {SLOW_ATTENTION[attention]}; use --attention sdpa (or auto)")
            if attention == "xformers":
                if kind != "cuda":
                    raise BackendUnavailable("--attention xformers needs a CUDA GPU",
                                             "use --attention sdpa (or flash: torch's SDPA flash kernel runs on CPU too)")
                if not xformers_ok:
                    raise BackendUnavailable("--attention xformers: the xformers package is not installed",
                                             "pip install 'studio[cuda]' or use --attention sdpa")
            why["attention"] = "asked for"

        # 4. offload
        if s.offload != "none" and kind == "cpu":
            raise BackendUnavailable(
                f"--offload {s.offload} moves weights between CPU and an accelerator; on the CPU there is nothing to offload to",
                "drop --offload, or run on a GPU (--device cuda)",
            )
        if s.offload != "none" and not module_available("accelerate"):
            raise BackendUnavailable("--offload needs accelerate", "pip install accelerate")
        why["offload"] = "asked for" if s.offload != "none" else "not asked for"

        # 5. quantisation
        if s.quantize != "none":
            if not module_available("torchao") and not (kind == "cuda" and module_available("bitsandbytes")):
                raise BackendUnavailable(f"--quantize {s.quantize} needs torchao (or bitsandbytes on CUDA)",
                                         "pip install torchao")
            if s.quantize == "int4" and kind != "cuda" and not module_available("mslk"):
                # torchao's int4 weight-only kernels are CUDA tinygemm, or 'plain' with the mslk package
                raise BackendUnavailable("--quantize int4 has no CPU kernel in this torchao build",
                                         "use --quantize int8 on the CPU (or int4 on a CUDA GPU)")
            why["quantize"] = "torchao weight-only " + s.quantize
        return Resolved(device=device, precision=precision, attention=attention, offload=s.offload,
                        quantize=s.quantize, compile=s.compile, reasons=why, warnings=warnings)

    def describe(self) -> dict[str, Any]:
        """What was asked for and what it became: stored in output metadata and shown by doctor."""
        r = asdict(self.resolved)
        out = {"requested": self.settings.to_dict(),
               "resolved": {k: v for k, v in r.items() if k not in ("reasons", "warnings")}, "reasons": r["reasons"]}
        if r["warnings"]:
            out["warnings"] = r["warnings"]
        return out

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    # ------------------------------------------------------------------ contexts
    def generator(self, seed: int):
        """A seeded torch.Generator. CPU generators give the same noise on every device, which is
        what makes `studio replay` and cross-machine seeds work (as A1111's 'CPU' RNG option)."""
        return self.torch.Generator("cpu").manual_seed(int(seed))

    def autocast(self):
        """Autocast for modules kept in fp32 when a lower precision was asked for (CPU bf16)."""
        if self.resolved.precision == "fp32":
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def attention_context(self):
        """Restricts torch SDPA to the asked kernel for the run (flash or math)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.resolved.attention == "flash":
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        if self.resolved.attention == "math":
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def inference(self):
        """Everything a pipeline wraps its forward passes in: no grad, attention kernel, autocast."""
        with self.torch.inference_mode(), self.attention_context(), self.autocast():
            yield

    # ------------------------------------------------------------------ applying
    def prepare(self, model: Any, *, quantize_modules: tuple[str, ...] | None = None) -> Any:
        """Apply precision, attention, quantisation, offload and compile to a diffusers pipeline,
        a transformers model or any torch module. Returns the (possibly wrapped) model."""
        if hasattr(model, "components") and hasattr(model, "to"):  # a diffusers DiffusionPipeline
            return self._prepare_pipeline(model, quantize_modules)
        if isinstance(model, self.torch.nn.Module):
            return self._prepare_module(model)
        raise TypeError(f"cannot prepare {type(model).__name__}")

    def _cast_dtype(self):
        # On CPU, bf16 weights are fast with avx512_bf16; fp16 is rejected in resolution.
        return self.dtype

    def _prepare_pipeline(self, pipe: Any, quantize_modules: tuple[str, ...] | None) -> Any:
        torch = self.torch
        r = self.resolved
        # precision first: quantising fp32 weights and then casting would undo it (and casting
        # an already-fp32 pipeline makes diffusers warn about fp32-only modules for nothing)
        if getattr(pipe, "dtype", None) != self._cast_dtype():
            pipe.to(dtype=self._cast_dtype())
        denoisers = [m for name in ("unet", "transformer", "controlnet", "prior") if
                     isinstance(m := getattr(pipe, name, None), torch.nn.Module)]
        # attention
        self._apply_pipeline_attention(pipe, denoisers)
        # quantisation of the big compute modules (denoiser and text encoders)
        if r.quantize != "none":
            names = quantize_modules or ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
            for name in names:
                module = getattr(pipe, name, None)
                if isinstance(module, torch.nn.Module):
                    self.quantize(module)
        # placement / offload
        if r.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif r.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if r.compile:
            for name in ("unet", "transformer"):
                module = getattr(pipe, name, None)
                if isinstance(module, torch.nn.Module):
                    setattr(pipe, name, torch.compile(module))
        return pipe

    def _apply_pipeline_attention(self, pipe: Any, denoisers: list) -> None:
        a = self.resolved.attention
        if a == "sliced":
            if not hasattr(pipe, "enable_attention_slicing"):
                raise BackendUnavailable(f"--attention sliced is not supported by {type(pipe).__name__}",
                                         "use --attention sdpa")
            pipe.enable_attention_slicing()
        elif a == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        elif a in ("sdpa", "flash", "math"):
            # diffusers' default processors call torch SDPA; flash/math pick its kernel at run
            # time (attention_context). Models on diffusers' attention dispatcher also get the
            # matching native backend so the choice is visible on the model.
            backend = {"sdpa": None, "flash": "_native_flash", "math": "_native_math"}[a]
            for module in denoisers:
                if backend and hasattr(module, "set_attention_backend"):
                    try:
                        module.set_attention_backend(backend)
                    except Exception:  # older UNet processors are not on the dispatcher
                        pass

    def _prepare_module(self, model: Any) -> Any:
        torch = self.torch
        r = self.resolved
        if any(p.dtype != self._cast_dtype() for p in model.parameters() if p.is_floating_point()):
            model.to(dtype=self._cast_dtype())
        if r.attention in ("xformers", "sliced"):
            raise BackendUnavailable(f"--attention {r.attention} applies to diffusers pipelines only",
                                     "use --attention sdpa, flash or math for this model")
        if (hasattr(model, "set_attn_implementation") and r.attention in ("sdpa", "flash", "math")
                and getattr(model, "_supports_sdpa", False)):
            # transformers models: keep SDPA (flash/math pick the kernel through attention_context)
            try:
                model.set_attn_implementation("sdpa")
            except Exception:  # models without SDPA support keep their eager attention
                pass
        if r.quantize != "none":
            self.quantize(model)
        if r.offload != "none":
            from accelerate import cpu_offload

            cpu_offload(model, execution_device=self.device)
        else:
            model.to(self.device)
        if r.compile:
            model = torch.compile(model)
        return model

    def quantize(self, module: Any) -> Any:
        """Weight-only int8/int4 quantisation of the Linear layers of `module`, in place."""
        kind = self.resolved.quantize
        if kind == "none":
            return module
        if not module_available("torchao"):
            raise BackendUnavailable(f"--quantize {kind} needs torchao", "pip install torchao")
        from torchao.quantization import quantize_

        if kind == "int8":
            from torchao.quantization import Int8WeightOnlyConfig

            config = Int8WeightOnlyConfig()
        else:
            from torchao.quantization import Int4WeightOnlyConfig

            # CUDA: tinygemm's tile-packed layout; elsewhere the plain layout (needs mslk)
            fmt = "tile_packed_to_4d" if self.device.type == "cuda" else "plain"
            config = Int4WeightOnlyConfig(group_size=32, int4_packing_format=fmt)
        try:
            quantize_(module, config)
        except Exception as exc:
            raise BackendUnavailable(f"--quantize {kind} failed on {type(module).__name__}: {exc}",
                                     "use --quantize int8, or none") from exc
        return module

    def with_settings(self, **changes: Any) -> "DeviceManager":
        return DeviceManager(replace(self.settings, **changes), cpu_flags=self.cpu_flags)


_MANAGERS: dict[tuple[DeviceSettings, frozenset[str] | None], DeviceManager] = {}


def get_device_manager(settings: DeviceSettings) -> DeviceManager:
    """One DeviceManager per distinct settings (and CPU flags) in a process: its warnings print once."""
    key = (settings, read_cpu_flags())
    if key not in _MANAGERS:
        _MANAGERS[key] = DeviceManager(settings, cpu_flags=key[1])
    return _MANAGERS[key]
