"""Loaded models kept warm between jobs, the least recently used evicted under a memory budget.

The registry already caches loaded pipelines for the life of a process (the CLI's batch files
rely on it); a server lives for days and sees many models, so this keeps the order they were
used in and how much memory each holds, and asks the registry to let the oldest go
(`registry.unload`) when a new one would not fit. Sizes are the bytes of each pipeline's torch
parameters and buffers (shared tensors counted once); before a load the weights' size on disk
stands in, so room is made first rather than after the peak.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from studio import registry


def default_budget() -> int:
    """80% of the GPU's memory where CUDA is, else half the machine's RAM: models on a CPU live
    in RAM beside everything else."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.8)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_size(text: str) -> int:
    """'12GB', '512M', '0.5g', '2000000' -> bytes."""
    from studio.limits import size_in_bytes

    value = size_in_bytes(text)
    if value is None:
        from studio.errors import UsageError

        raise UsageError(f"--memory-budget {text!r} is not a size", "e.g. --memory-budget 12GB or 512MB")
    return int(value)


def pipeline_bytes(pipeline: Any) -> int:
    """Bytes of the torch tensors a loaded pipeline holds (each storage once)."""
    if "torch" not in sys.modules:
        return 0
    import torch

    seen: set[int] = set()
    total = 0
    for module in _modules(pipeline, depth=0, visited=set()):
        for tensor in list(module.parameters()) + list(module.buffers()):
            try:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # meta or exotic tensors hold no memory here
                continue
    del torch
    return total


def _modules(obj: Any, depth: int, visited: set[int]) -> Any:
    import torch

    if id(obj) in visited or depth > 3:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield obj
        return
    components = getattr(obj, "components", None)  # a diffusers pipeline lists its modules
    if isinstance(components, dict):
        for value in components.values():
            yield from _modules(value, depth + 1, visited)
        return
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        values = vars(obj).values()
    else:
        return
    for value in values:
        yield from _modules(value, depth + 1, visited)


def disk_bytes(spec: Any) -> int:
    """The weights' size on disk: a stand-in for what loading them will take."""
    if spec is None or not getattr(spec, "is_local", False):
        return 0
    path = Path(spec.source)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors") if p.is_file())


class WarmModels:
    """The loaded pipelines in use order, with their sizes; loads one at a time."""

    def __init__(self, budget: int | None = None):
        self.budget = budget if budget is not None else default_budget()
        self.sizes: OrderedDict[tuple, int] = OrderedDict()  # registry key -> bytes, oldest first
        self.lock = threading.RLock()
        self.evicted: list[str] = []  # names let go, newest last (shown by /api/models)

    @staticmethod
    def key(task: str, spec: Any, device: Any) -> tuple:
        return (task, spec, getattr(device, "settings", None))  # the registry's own key

    def load(self, task: str, spec: Any, device: Any, progress: Any = None) -> Any:
        """The pipeline for (task, spec, device), loaded if need be, oldest others evicted to fit."""
        key = self.key(task, spec, device)
        with self.lock:
            if key not in registry.loaded_keys():
                self._make_room(disk_bytes(spec), keep=key)
            pipeline = registry.load_pipeline(task, spec, device, progress)
            if key not in self.sizes:
                self.sizes[key] = pipeline_bytes(pipeline) or disk_bytes(spec)
            self.sizes.move_to_end(key)
            self._make_room(0, keep=key)
            return pipeline

    def _make_room(self, needed: int, keep: tuple) -> None:
        # forget keys the registry no longer holds (a batch run in this process unloaded them)
        for key in [k for k in self.sizes if k not in registry.loaded_keys()]:
            del self.sizes[key]
        freed = False
        while self.sizes and sum(self.sizes.values()) + needed > self.budget:
            oldest = next((k for k in self.sizes if k != keep), None)
            if oldest is None:
                break  # the one model in use is larger than the budget: keep it, it is needed now
            del self.sizes[oldest]
            registry.unload([oldest])
            spec = oldest[1]
            self.evicted.append(f"{oldest[0]}:{getattr(spec, 'alias', None) or getattr(spec, 'name', spec)}")
            freed = True
        if freed:
            gc.collect()
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {"budget_bytes": self.budget, "used_bytes": sum(self.sizes.values()),
                    "loaded": [{"task": k[0], "model": getattr(k[1], "alias", None) or getattr(k[1], "name", None),
                                "bytes": v} for k, v in self.sizes.items()],
                    "evicted": self.evicted[-20:]}
