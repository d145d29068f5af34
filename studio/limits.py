"""Up-front resource checks: what a request will take, against what the model and the machine allow,
decided before a model loads.

A pipeline's `check_request(request, spec, device)` classmethod (studio/pipeline.py) runs in the
engine before `registry.load_pipeline`: static checks (sizes, multiples, ranges) read the model's
own config files, and an estimate of the memory the run needs (weights not yet loaded plus the
activations of its largest step) is compared with the memory free on the device. What cannot fit
is exit 2 with the estimate and what to change, in well under a second, instead of gigabytes
allocated and minutes spent before the operating system or the library gives up
(`--width 100000 --height 100000` allocated 8 GB; `--frames 100000` 6.4 GB in 40 s).

Estimates are about, not exact: each pipeline's formula says where its numbers come from and was
measured on tiny models of the real architectures (tests/test_limits.py checks an estimate against
a measured peak); a request is refused only when the estimate does not fit. STUDIO_MAX_MEMORY (e.g. `24G`, `512M`, or `off`) replaces the detected free memory,
for a machine whose swap or other tenants studio cannot see.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

from studio.errors import UsageError

ENV_BUDGET = "STUDIO_MAX_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def size_in_bytes(text: str) -> float | None:
    """'24G', '512MB', '1.5GiB', '1048576' -> bytes (binary units); None when `text` is not a size.
    Each caller says what a non-size means for its own option (STUDIO_MAX_MEMORY, --memory-budget)."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtbi")
    try:
        value = float(number)
    except ValueError:
        return None
    unit = raw[len(number):]
    return value * _UNITS[unit] if 0 <= value < 2**64 and unit in _UNITS else None  # not inf, nan or negative


def fmt_bytes(n: float) -> str:
    """'8.2 GB', '310 MB', '12 TB': one rounded number a person reads at a glance (powers of 1024)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int | None:
    """'24G', '512M', '1.5GB', '1048576' -> bytes; 'off'/'0'/'none' -> None (no check)."""
    if str(text).strip().lower().replace(" ", "") in ("off", "none", "0", "no", "false", ""):
        return None
    value = size_in_bytes(text)
    if not value:  # not a size, or zero
        raise UsageError(f"{ENV_BUDGET}={text!r} is not a size", f"set e.g. {ENV_BUDGET}=16G (or off)")
    return int(value)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key.strip()] = int(parts[0]) * 1024  # the file says kB
    except OSError:
        pass
    return out


def memory_budget(device: Any) -> tuple[int | None, str]:
    """(bytes a run may use, what they are) on `device` (a DeviceManager): STUDIO_MAX_MEMORY when set,
    else the GPU's free memory, else the RAM the kernel calls available (MemAvailable: free plus
    what the page cache would give back; swap is not counted, a run that needs it crawls). None
    when nothing can be known (then nothing is refused)."""
    if os.environ.get(ENV_BUDGET) is not None:
        return parse_bytes(os.environ[ENV_BUDGET]), f"allowed by {ENV_BUDGET}"
    kind = getattr(getattr(device, "device", None), "type", "cpu")
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device.device)
        return int(free), f"free on {device.device}"
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"], "RAM available"
    try:  # macOS and other Unixes without /proc: physical memory, an upper bound
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def element_size(device: Any) -> int:
    """Bytes per value at the device's precision (fp32 4, fp16/bf16 2); 4 when there is no device."""
    dtype = getattr(device, "dtype", None)
    return int(getattr(dtype, "itemsize", 4) or 4) if dtype is not None else 4


# ---------------------------------------------------------------------------- a model's files, read locally
def model_folder(spec: Any) -> Path | None:
    """The local folder of a model (a folder spec, or a hub model's cached snapshot); None for a
    single file, or a hub model not in the cache: checks never reach the network."""
    kind = getattr(spec, "kind", None)
    if kind == "folder":
        return Path(spec.source)
    if kind == "hub":
        from studio.errors import ModelNotAvailable
        from studio.models import cached_snapshot

        try:
            return cached_snapshot(spec)
        except ModelNotAvailable:
            return None
    return None


@functools.lru_cache(maxsize=256)
def _read_json_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(spec: Any, filename: str) -> dict[str, Any]:
    """A JSON config inside a model's local folder (`unet/config.json`, `config.json`); {} when the
    model or the file is not on this machine. Parsed once per file version in a process."""
    folder = model_folder(spec)
    if folder is None:
        return {}
    path = folder / filename
    try:
        st = path.stat()
    except OSError:
        return {}
    return dict(_read_json_cached(str(path), st.st_mtime_ns, st.st_size) or {})


def _safetensors_params(path: Path) -> int:
    """Number of values stored in a .safetensors file, from its JSON header alone (8 bytes of
    length, then the header: nothing else is read)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                return 0
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return 0
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        total += count
    return total


def weight_values(spec: Any, subfolders: tuple[str, ...] | None = None) -> int:
    """Parameters of a model's .safetensors weights (headers only; a variant's duplicate files,
    e.g. `*.fp16.safetensors` beside the full ones, counted once per folder). 0 when unknown."""
    if getattr(spec, "kind", None) == "file":
        return _safetensors_params(Path(spec.source)) if str(spec.source).endswith(".safetensors") else 0
    folder = model_folder(spec)
    if folder is None or not folder.is_dir():
        return 0
    folders = [folder / s for s in subfolders] if subfolders else [folder, *[p for p in folder.iterdir() if p.is_dir()]]
    total = 0
    for sub in folders:
        if not sub.is_dir():
            continue
        files = sorted(sub.glob("*.safetensors"))
        plain = [p for p in files if len(p.suffixes) == 1] or files[:1]  # x.safetensors over x.fp16.safetensors
        total += sum(_safetensors_params(p) for p in plain)
    return total


def is_loaded(task: str, spec: Any, device: Any) -> bool:
    """True when this process already holds the pipeline (its weights are in memory, not to come)."""
    from studio import registry

    return (task, spec, getattr(device, "settings", None)) in registry.loaded_keys()


# ---------------------------------------------------------------------------- the check
def check_fits(*, task: str, spec: Any, device: Any, work: float, weights: float = 0.0, what: str,
               hint: str | Callable[[float], str]) -> dict[str, Any]:
    """Refuse (UsageError, exit 2) a run whose estimate does not fit the device's free memory.

    `work`: bytes of activations and outputs at the run's peak; `weights`: bytes of the weights,
    counted only when they are not loaded yet. `what`: the request in words ("100000x100000 px").
    `hint`: what to change, or a function of the bytes left for the work once the weights are in
    (so it can say what would fit: "--frames 120 or fewer"). Returns the estimate (tests read it)."""
    pending = 0.0 if is_loaded(task, spec, device) else float(weights)
    resolved = getattr(device, "resolved", None)
    if getattr(resolved, "offload", "none") != "none":
        pending = 0.0  # offloaded weights live in RAM and visit the GPU a model (or a layer) at a time
    elif getattr(resolved, "quantize", "none") in ("int8", "int4"):
        # weight-only quantisation stores most values (the Linear layers') in 1 byte, or half of one
        pending *= {"int8": 1.0, "int4": 0.5}[resolved.quantize] / element_size(device)
    need = float(work) + pending
    budget, source = memory_budget(device)
    estimate = {"need": int(need), "work": int(work), "weights": int(pending), "budget": budget, "source": source}
    if budget is not None and need > budget:
        split = f" ({fmt_bytes(pending)} of it weights)" if pending >= need * 0.05 else ""
        text = hint(max(0.0, budget - pending)) if callable(hint) else hint
        if ENV_BUDGET not in source:
            text += f"; where studio undercounts this machine's memory, set {ENV_BUDGET}=SIZE"
        raise UsageError(f"{task}: {what} needs about {fmt_bytes(need)}{split}, {fmt_bytes(budget)} {source}", text)
    return estimate
