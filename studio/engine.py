"""The engine: the one path from a task name and parameters to written outputs.

CLI commands, `studio run` batch files, `studio replay` and the Python API all call
`Engine.run(task, params)` (or `Engine.stream`). Data flows one way (ARCHITECTURE.md):
params -> preset/card merge -> Request -> registry -> pipeline.load(spec, device)
-> pipeline.run(request, progress) -> each Result -> OutputWriter, as soon as it is made.

Outputs stream: `run` may yield its Results one by one (studio/pipeline.py), and the engine
writes each before asking for the next, then keeps only its path and metadata. A run of 200
images holds one image at a time, and what was finished before a failure stays on disk.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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


# Result kinds whose payload a written Result keeps: text is small, and callers print it (captions,
# answers, code); images, audio, video, MIDI and JSON are on disk once written.
KEEP_WHEN_WRITTEN = frozenset({"text"})


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


@dataclass
class Plan:
    """A run planned but not started (Engine.plan): everything decided before a model loads."""

    task: str  # the registry name
    cls: type  # the pipeline class the registry names
    spec: Any  # the resolved ModelSpec (None for a task that loads no model)
    device_settings: DeviceSettings  # flags < preset < environment, as the device manager takes them
    request: Any  # the frozen Request (seed drawn when none was given)
    options: RunOptions  # the run options it was planned with
    given: dict[str, Any]  # the parameters as given (None dropped): what --save-preset records


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
        """Run `task` and return its Results, each written as soon as the pipeline made it (unless
        options.write is False). A written Result keeps its path, params and metadata; its payload
        (`value`, `companions`) is let go unless it is text, so memory does not grow with the number
        of outputs: read the file for the pixels. Unwritten Results keep everything."""
        results = []
        for result in self.stream(task, params, job=job, options=options):
            if result.path is not None and result.kind not in KEEP_WHEN_WRITTEN:
                result.value = None
                result.companions = {}
            results.append(result)
        return results

    def stream(self, task: str, params: dict[str, Any], *, job: str | None = None,
               options: RunOptions | None = None) -> Iterator[Any]:
        """The Results of `task` one at a time, as the pipeline makes them; each is written (when
        options.write) and emitted before it is handed on, payload intact. A caller that writes
        for itself (the batch runner) streams with write=False and lets each one go."""
        yield from self.execute(self.plan(task, params, options=options), job=job)

    def plan(self, task: str, params: dict[str, Any], *, options: RunOptions | None = None,
             source: str = "the command line") -> "Plan":
        """Steps 1-2 of a run, nothing loaded: preset, device settings, model and the frozen
        Request. Bad input fails here (UsageError). The server plans a job when it is submitted,
        so a bad request is a 4xx at once, not a failed job later in the queue. `source` is where
        the parameters came from, as an unknown one's error names it."""
        from studio import presets, registry

        opts = options or self.options
        given = {k: v for k, v in params.items() if v is not None}
        sources = {k: source for k in given}

        # 1. preset and device settings (flags < preset < flags given)
        preset_values: dict[str, Any] = {}
        if opts.preset:
            preset_values = presets.load_preset(opts.preset, task)
            source = preset_values.pop("__source__")
            sources.update({k: f"preset {source}" for k in preset_values if k not in given})
        preset_params, preset_device = presets.split_device(preset_values)
        device_settings = DeviceSettings.from_sources(flags=opts.device, preset=preset_device)

        # 2. the model: card defaults sit under the preset (a task with `needs_model = False`,
        # such as mux, loads no weights: no model is resolved and no device is built for it)
        cls = registry.pipeline_class(task)
        needs_model = getattr(cls, "needs_model", True)
        model_name = given.get("model") or preset_params.get("model") or "auto"
        spec = registry.resolve_model(task, str(model_name), allow_pickle=opts.allow_pickle,
                                      trust_remote_code=opts.trust_remote_code, offline=opts.offline or None) if needs_model else None
        if spec is not None and spec.notice:
            if spec.notice not in self._noted:
                self._noted.add(spec.notice)
                self.progress.note(spec.notice)
        card_defaults = dict(spec.card.get("defaults") or {}) if spec is not None else {}
        fields = request_fields(cls.request_type)
        merged = {k: v for k, v in card_defaults.items() if k in fields}
        merged.update(preset_params)
        merged.update(given)
        merged["model"] = spec.name if "model" in fields and spec is not None else merged.get("model")
        if "model" not in fields:
            merged.pop("model", None)
        if "seed" in fields and merged.get("seed") is None and not getattr(cls, "seedless", False):
            merged["seed"] = secrets.randbelow(2**31)  # recorded, so any output can be replayed
        request = build_request(cls.request_type, merged, sources)
        # static request checks against the model's own configs (sizes, multiples, ranges): bad
        # input is refused here, before anything loads; the memory estimate waits for the device
        check_request = getattr(cls, "check_request", None)
        if check_request is not None:
            check_request(request, spec, None)
        return Plan(task=task, cls=cls, spec=spec, device_settings=device_settings, request=request,
                    options=opts, given=given)

    def device_for(self, plan: "Plan") -> Any:
        """The DeviceManager a plan runs on (None for a task that loads no model)."""
        from studio.device import get_device_manager

        return get_device_manager(plan.device_settings) if getattr(plan.cls, "needs_model", True) else None

    def execute(self, plan: "Plan", *, job: str | None = None) -> Iterator[Any]:
        """Steps 3-4 of a planned run: load (cached), check, run, write each Result as it comes."""
        from studio import presets, registry
        from studio.outputs import OutputWriter

        opts, task, spec, request = plan.options, plan.task, plan.spec, plan.request
        if opts.save_preset:
            path = presets.save_preset(opts.save_preset, task,
                                       {**{k: v for k, v in plan.given.items() if k != "seed"},
                                        **{k: v for k, v in opts.device.items() if v is not None}})
            self.progress.note(f"saved preset {opts.save_preset} to {path}")

        # what cannot fit on this device fails now (exit 2, with the estimate), before the model
        # loads; so does an unwritable --out, not after minutes of generation
        device = self.device_for(plan)
        check_request = getattr(plan.cls, "check_request", None)
        if check_request is not None:
            check_request(request, spec, device)
        writer = OutputWriter(opts.out_dir, task=task, template=opts.template, overwrite=opts.overwrite) if opts.write else None

        # 3. load (cached) and run; the libraries' own tqdm bars would fight our rich bars
        for lib in ("transformers", "diffusers"):
            if lib in sys.modules:
                sys.modules[lib].utils.logging.disable_progress_bar()
        t0 = time.perf_counter()
        with self.progress:
            pipeline = registry.load_pipeline(task, spec, device, self.progress)
            t1 = time.perf_counter()
            if hasattr(pipeline, "check_inputs"):
                pipeline.check_inputs(request)

            # 4. run: each output gets its metadata and is written before the next one is made
            extra = {"model": spec.identity() if spec is not None else None, "device": device.describe() if device else None,
                     "timings": {"load_s": round(t1 - t0, 4)}}
            if opts.preset:
                extra["preset"] = opts.preset
            if job:
                extra["job"] = job
            outputs = iter(pipeline.run(request, self.progress))
            making = 0.0  # seconds inside the pipeline so far; writing and the caller's time excluded
            for index in itertools.count():
                started = time.perf_counter()
                result = next(outputs, None)
                if result is None:
                    break
                making += time.perf_counter() - started
                # run_s: from the start of the run until this output was ready (the last one's is
                # the whole run's)
                timings = {**extra["timings"], "run_s": round(making, 4)}
                result.extra = {**extra, "timings": timings, **result.extra}
                if writer is not None:
                    writer.write(result, index)
                if self.emit is not None:
                    self.emit(self.summary(result))
                yield result

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
