"""The engine: the one path from a task name and parameters to written outputs.

CLI commands, `studio run` batch files, `studio replay` and the Python API all call
`Engine.run(task, params)`. Data flows one way (DESIGN.md):
params -> preset/card merge -> Request -> registry -> pipeline.load(spec, device)
-> pipeline.run(request, progress) -> Results -> OutputWriter.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.device import DeviceSettings
from studio.errors import UsageError
from studio.progress import Progress


@dataclass
class RunOptions:
    """Everything about a run that is not the request itself."""

    device: dict[str, Any] = field(default_factory=dict)  # device flags as given (None = not given)
    out_dir: Path = Path("outputs")  # where outputs go
    quiet: bool = False  # no progress bars or notes
    json: bool = False  # one JSON object per output on stdout
    preset: str | None = None  # preset name or path
    save_preset: str | None = None  # write the given flags as a user preset
    allow_pickle: bool = False  # allow pickle (.bin/.ckpt) weights
    trust_remote_code: bool = False  # allow hub repos' modelling code
    offline: bool = False  # never reach the hub
    overwrite: bool = False  # replace outputs of the same name instead of adding -1, -2, ...
    template: str = "{date}-{task}-{seed}-{slug}"  # output file name template
    write: bool = True  # write outputs (False: return Results only, e.g. captions printed)


def request_fields(request_type: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(request_type)}


def build_request(request_type: type, values: dict[str, Any], sources: dict[str, str] | None = None) -> Any:
    """The frozen Request from merged values; an unknown key is an error naming it and where it came from."""
    known = request_fields(request_type)
    unknown = [k for k in values if k not in known]
    if unknown:
        key = unknown[0]
        where = (sources or {}).get(key, "the request")
        raise UsageError(f"unknown parameter {key!r} in {where}",
                         f"{request_type.__name__} takes: {', '.join(known)}")
    return request_type(**values)


class Engine:
    """Runs tasks with one set of run options; caches loaded pipelines through the registry."""

    def __init__(self, options: RunOptions | None = None, progress: Progress | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None):
        self.options = options or RunOptions()
        self.progress = progress or Progress(enabled=not (self.options.quiet or self.options.json))
        self.emit = emit
        self._noted: set[str] = set()  # notices said once per engine (an eval runs a task many times)

    def run(self, task: str, params: dict[str, Any], *, job: str | None = None,
            options: RunOptions | None = None) -> list[Any]:
        from studio import presets, registry
        from studio.device import get_device_manager
        from studio.outputs import OutputWriter

        opts = options or self.options
        given = {k: v for k, v in params.items() if v is not None}
        sources = {k: "the command line" for k in given}

        # 1. preset and device settings (flags < preset < flags given)
        preset_values: dict[str, Any] = {}
        if opts.preset:
            preset_values = presets.load_preset(opts.preset, task)
            source = preset_values.pop("__source__")
            sources.update({k: f"preset {source}" for k in preset_values if k not in given})
        preset_params, preset_device = presets.split_device(preset_values)
        device_settings = DeviceSettings.from_sources(flags=opts.device, preset=preset_device)

        # 2. the model: card defaults sit under the preset
        cls = registry.pipeline_class(task)
        model_name = given.get("model") or preset_params.get("model") or "auto"
        spec = registry.resolve_model(task, str(model_name), allow_pickle=opts.allow_pickle,
                                      trust_remote_code=opts.trust_remote_code, offline=opts.offline or None)
        if spec.notice:
            if spec.notice not in self._noted:
                self._noted.add(spec.notice)
                self.progress.note(spec.notice)
        card_defaults = dict(spec.card.get("defaults") or {})
        fields = request_fields(cls.request_type)
        merged = {k: v for k, v in card_defaults.items() if k in fields}
        merged.update(preset_params)
        merged.update(given)
        merged["model"] = spec.name if "model" in fields else merged.get("model")
        if "model" not in fields:
            merged.pop("model", None)
        if "seed" in fields and merged.get("seed") is None and not getattr(cls, "seedless", False):
            merged["seed"] = secrets.randbelow(2**31)  # recorded, so any output can be replayed
        request = build_request(cls.request_type, merged, sources)

        if opts.save_preset:
            path = presets.save_preset(opts.save_preset, task,
                                       {**{k: v for k, v in given.items() if k != "seed"},
                                        **{k: v for k, v in opts.device.items() if v is not None}})
            self.progress.note(f"saved preset {opts.save_preset} to {path}")

        # an unwritable --out fails now (exit 2), not after minutes of generation
        writer = OutputWriter(opts.out_dir, task=task, template=opts.template, overwrite=opts.overwrite) if opts.write else None

        # 3. load (cached) and run; the libraries' own tqdm bars would fight our rich bars
        for lib in ("transformers", "diffusers"):
            if lib in sys.modules:
                sys.modules[lib].utils.logging.disable_progress_bar()
        device = get_device_manager(device_settings)
        t0 = time.perf_counter()
        with self.progress:
            pipeline = registry.load_pipeline(task, spec, device, self.progress)
            t1 = time.perf_counter()
            if hasattr(pipeline, "check_inputs"):
                pipeline.check_inputs(request)
            results = pipeline.run(request, self.progress)
        t2 = time.perf_counter()

        # 4. metadata and writing
        extra = {"model": spec.identity(), "device": device.describe(),
                 "timings": {"load_s": round(t1 - t0, 4), "run_s": round(t2 - t1, 4)}}
        if opts.preset:
            extra["preset"] = opts.preset
        if job:
            extra["job"] = job
        for index, result in enumerate(results):
            result.extra = {**extra, **result.extra}
            if writer is not None:
                writer.write(result, index)
            if self.emit is not None:
                self.emit(self.summary(result))
        return results

    @staticmethod
    def summary(result: Any) -> dict[str, Any]:
        """The JSON object `--json` prints for one output."""
        out: dict[str, Any] = {"task": result.metadata.get("task") or result.extra.get("task"),
                               "path": str(result.path) if result.path else None, "kind": result.kind,
                               "seed": result.params.get("seed"), "model": (result.extra.get("model") or {}).get("name")}
        if result.kind == "text":
            out["text"] = result.value
        if result.extra.get("job"):
            out["job"] = result.extra["job"]
        for key in ("timings",):
            if key in result.extra:
                out[key] = result.extra[key]
        return out


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
