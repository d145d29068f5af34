"""Batch files and scripted multi-step pipelines: one YAML file, many jobs, one process (or many).

    # examples/batch.yaml                          # a batch: independent jobs
    out: outputs/batch                           # output folder (--out wins)
    defaults:                                    # under every job (a job's own keys win)
      model: sd-turbo
      steps: 1
      device: cpu                                # device keys may sit anywhere a param can
    jobs:
      - prompt: "a {red|blue} {cat|dog} on a sofa"   # {a|b}: one job per choice (4 here)
        seeds: [1, 2, 3]                             # one job per seed (x3: 12 jobs)
      - task: music-audio
        preset: musicgen-small                       # a preset's values sit under the job's
        prompt: "lofi beat"

    # examples/storyboard.yaml                     # a pipeline: steps reading earlier outputs
    steps:
      hero:  {task: image, prompt: "a lighthouse at dusk", seed: 7}
      desc:  {task: caption, images: "${hero.image}"}
      theme: {task: music-audio, prompt: "${desc.text}, calm piano"}
      clip:  {task: video, init_image: "${hero.image}"}
      final: {task: mux, video: "${clip.video}", audio: "${theme.audio}"}

Merge order for one job: request defaults < model card < preset < `defaults:` < the job's keys <
command-line device flags. Everything is checked before anything runs (`studio validate`):
unknown keys and bad values name the key and `file:line`; `${step.kind}` references must name an
earlier step (no cycles) that makes that kind (image, text, audio, video, midi, json), going into
a field that takes it (an audio where an image is needed is an error).

Running (`Runner.run`): jobs sharing a model run back to back, so the registry's per-process
cache loads each model once, and a model is unloaded once no later job needs it; a job that fails
is recorded and the rest go on (the steps after a failed step are `blocked`). Every output goes
through the OutputWriter (atomic, manifest.jsonl row with sha256); after each job a `job-done`
record lists its outputs and their sha256. `resume=True` skips jobs whose record is there and
whose files still match, removes what an interrupted attempt left (temp files, outputs of a job
with no record) and redoes the rest. Under `accelerate launch` (or `processes=N`) jobs are split
with accelerate's `PartialState().split_between_processes`; a pipeline's steps stay together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import sys
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from studio import presets
from studio.device import ENV as DEVICE_KEYS
from studio.errors import RuntimeFailure, StudioError, UsageError

TOP_KEYS = ("name", "description", "out", "template", "defaults", "jobs", "steps")
JOB_META = ("task", "name", "preset", "seeds")  # a job's keys that are not request params
STEP_META = ("task", "preset")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
REF = re.compile(r"(?<!\$)\$\{\s*([A-Za-z][A-Za-z0-9_-]*)\.([a-z]+)(?:\[(\d+)\])?\s*\}")
ALTERNATION = re.compile(r"\{([^{}]*\|[^{}]*)\}")
MAX_JOBS = 100_000  # a typo in an alternation should not silently plan a million jobs

# what each built-in task makes (a pipeline class may say it itself with `output_kinds`)
OUTPUT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("image",), "caption": ("text",), "vqa": ("text",), "music-audio": ("audio",),
    "music-midi": ("midi",), "video": ("video",), "code": ("text",), "clip-embed": ("json",),
    "mux": ("video",),
}
REF_KINDS = ("image", "text", "audio", "video", "midi", "json", "file")
# a request field's name says what it takes when its type (str, Path) cannot
KIND_WORDS = {
    "image": {"image", "images", "mask", "photo", "photos", "picture"},
    "audio": {"audio", "melody", "wav", "sound"},
    "video": {"video", "videos"},
    "midi": {"midi", "primer"},
}


# =========================================================================== the file model
@dataclass(frozen=True)
class Ref:
    """One `${step.kind[index]}` reference in a step's parameter."""

    step: str  # the step it reads from
    kind: str  # image | text | audio | video | midi | json | file
    index: int  # which output of that kind (0 = the first)
    key: str  # the parameter it sits in
    whole: bool  # the whole value (a path or a text), not text inside a longer string
    where: str  # file:line


@dataclass
class Job:
    """One unit of work after expansion: a task and its parameters as the file gives them."""

    name: str  # unique in the file: a step's name, or job3 / job3.2 / the job's `name:` (+ .N)
    task: str  # registry task name, or "mux"
    params: dict[str, Any]  # request params (`defaults:` < the job's own); refs unresolved
    device: dict[str, Any]  # device settings from the file (`defaults:` < the job's own)
    preset: str | None  # preset name or path
    where: str  # file:line of the job (for messages)
    is_step: bool = False  # part of `steps:` (may read other steps' outputs)
    refs: list[Ref] = field(default_factory=list)  # references into earlier steps
    model: str = "auto"  # the model it will load (for grouping; preset's when the job has none)
    component: int = 0  # jobs of one component (a pipeline's connected steps) run in one process
    request_type: Any = field(default=None, repr=False)  # the task's Request class (steps: for type checks)

    @property
    def needs(self) -> list[str]:
        return sorted({r.step for r in self.refs})

    @property
    def group(self) -> str:
        """Jobs with the same group share a loaded model and run back to back."""
        return json.dumps([self.task, str(self.model), self.preset, sorted(self.device.items())], default=str)


@dataclass
class BatchFile:
    """A validated batch / pipeline file, its jobs in execution order."""

    source: str  # file path or "<python>"
    name: str  # file stem (default output folder name)
    description: str | None
    out: Path | None  # output folder from the file
    template: str | None  # output name template from the file ({job} is the job's name)
    jobs: list[Job]  # in execution order
    warnings: list[str] = field(default_factory=list)  # e.g. a model that is not downloaded yet

    @classmethod
    def load(cls, path: str | Path) -> "BatchFile":
        return parse(presets.read_yaml(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<python>") -> "BatchFile":
        return parse(presets.YamlDoc(source=source, data=data))

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def components(self) -> list[list[Job]]:
        """Units of distribution, in execution order: one per job, one per connected set of steps."""
        out: dict[int, list[Job]] = {}
        for job in self.jobs:
            out.setdefault(job.component, []).append(job)
        return list(out.values())


# =========================================================================== tasks
@dataclass(frozen=True)
class MuxRequest:
    video: str = field(metadata={"kind": "video"})  # the video (mp4, webm, gif)
    audio: str = field(metadata={"kind": "audio"})  # the soundtrack (wav, flac, mp3, ogg)
    loop_video: bool = False  # repeat the video until the audio ends (a 1 s clip under a 10 s theme)
    shortest: bool = True  # end with the shorter stream (False: the longer one sets the length)
    audio_bitrate: str = "192k"  # AAC bitrate


class Mux:
    """The `mux` step: a video and a soundtrack into one MP4, with the ffmpeg imageio-ffmpeg ships
    (the same binary the writer encodes MP4s with; no system ffmpeg needed). The video stream is
    copied when it is already H.264 in MP4, else encoded with libx264; the audio becomes AAC."""

    task = "mux"
    request_type = MuxRequest
    seedless = True
    output_kinds = ("video",)

    def check_inputs(self, request: MuxRequest) -> None:
        for what, path in (("video", request.video), ("audio", request.audio)):
            p = Path(path)
            if not p.is_file():
                raise UsageError(f"mux: {what} {p} does not exist", f"pass the {what} file (or a ${{step.{what}}} reference)")
        if not re.fullmatch(r"\d+k?", request.audio_bitrate):
            raise UsageError(f"mux: audio_bitrate {request.audio_bitrate!r} is not like 192k", "use e.g. 128k or 192k")

    def run(self, request: MuxRequest, workdir: Path) -> Any:
        import subprocess

        import imageio_ffmpeg

        from studio.outputs import Result

        # 1. check inputs
        self.check_inputs(request)
        # 2. the ffmpeg command: loop the video if asked, copy H.264 MP4, else encode
        video, audio = Path(request.video), Path(request.audio)
        out = workdir / "mux.mp4"
        # a looped input cannot be stream-copied: ffmpeg's -shortest then misses the end
        copy = video.suffix.lower() in (".mp4", ".m4v", ".mov") and not request.loop_video
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error"]
        if request.loop_video:
            cmd += ["-stream_loop", "-1"]
        cmd += ["-i", str(video), "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0"]
        cmd += ["-c:v", "copy"] if copy else ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
        cmd += ["-c:a", "aac", "-b:a", request.audio_bitrate]
        # the length, given outright: ffmpeg's -shortest alone overshoots by seconds with a looped
        # input (its muxer queue), so it is only the fallback when a duration cannot be read
        length = _mux_length(video, audio, request)
        if length is not None:
            cmd += ["-t", f"{length:.3f}"]
        elif request.shortest or request.loop_video:
            cmd += ["-shortest"]
        cmd += ["-movflags", "+faststart", "-metadata", "comment=" + json.dumps(dataclasses.asdict(request)), str(out)]
        # 3. run it
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            first = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeFailure(f"mux: ffmpeg failed: {first}", "check that the video and audio files play")
        # 4. the Result (the writer copies the file into place atomically)
        return [Result(kind="file", value=out, params=dataclasses.asdict(request), fmt="mp4")]


def _mux_length(video: Path, audio: Path, request: MuxRequest) -> float | None:
    """Seconds the muxed file should last: the audio's when the video loops, the shorter of the
    two with `shortest`, else None (ffmpeg keeps both whole)."""
    try:
        import soundfile

        audio_s = float(soundfile.info(str(audio)).duration)
        if request.loop_video:
            return audio_s
        if not request.shortest:
            return None
        import imageio_ffmpeg

        _, video_s = imageio_ffmpeg.count_frames_and_secs(str(video))
        return min(audio_s, float(video_s))
    except Exception:  # a format soundfile or the probe cannot read: let ffmpeg decide
        return None


LOCAL_TASKS: dict[str, type] = {"mux": Mux}


def task_class(task: str) -> type:
    from studio import registry

    if task in LOCAL_TASKS:
        return LOCAL_TASKS[task]
    return registry.pipeline_class(task)


def output_kinds(task: str, cls: type | None = None) -> tuple[str, ...] | None:
    kinds = getattr(cls, "output_kinds", None) if cls is not None else None
    return tuple(kinds) if kinds else OUTPUT_KINDS.get(task)


def _base_types(hint: Any) -> set[type]:
    """The plain classes inside a type hint: `list[str] | None` -> {str, NoneType}."""
    if hint is None:
        return set()
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(hint)}
    if origin is not None:
        out: set[type] = set()
        for arg in typing.get_args(hint):
            if arg is not Ellipsis:
                out |= _base_types(arg)
        return out
    return {hint} if isinstance(hint, type) else set()


def _is_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (list, tuple, set, frozenset) or (origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        return True
    return any(_is_sequence(a) for a in typing.get_args(hint)) if origin is typing.Union or str(origin) == "<class 'types.UnionType'>" else False


def field_kind(request_type: type, name: str) -> str | None:
    """What a request field takes: a kind of output, "text", "number", "file" (any file) or
    None (unknown: anything goes). A field's `metadata={"kind": ...}` says it outright."""
    for f in dataclasses.fields(request_type):
        if f.name == name and f.metadata.get("kind"):
            return f.metadata["kind"]
    hint = presets.request_field_types(request_type).get(name, (None, False))[0]
    base = _base_types(hint) - {type(None)}
    tokens = set(name.lower().split("_"))
    if not base or base & {str, Path} or any(issubclass(b, os.PathLike) for b in base):
        for kind, words in KIND_WORDS.items():
            if tokens & words:
                return kind
    if base and base <= {int, float, bool}:
        return "number"
    if base and all(issubclass(b, (Path, os.PathLike)) for b in base):
        return "file"
    if str in base:
        return "text"
    return None


def _accepts(want: str | None, kind: str) -> bool:
    if want is None:
        return True
    if want == "file":
        return kind != "text"
    return want == kind


# =========================================================================== parsing
def load(path: str | Path) -> BatchFile:
    """Read and validate a batch / pipeline file (everything `studio validate` checks)."""
    return BatchFile.load(path)


def is_batch_data(data: Any) -> bool:
    """A batch file (jobs: list, steps: mapping) rather than a preset (task: and flat values,
    where `steps:` is a number of denoising steps)."""
    if not isinstance(data, dict):
        return True  # not a preset either: parse() says what a batch file looks like
    return "jobs" in data or isinstance(data.get("steps"), dict) or "task" not in data


def parse(doc: presets.YamlDoc) -> BatchFile:
    data = doc.data
    src = doc.source
    if not isinstance(data, dict):
        raise UsageError(f"{src} must be a mapping with `jobs:` and/or `steps:`", "see examples/batch.yaml")
    for key in data:
        if key not in TOP_KEYS:
            hint = (f"{src} looks like a preset: use it as `studio {data['task']} ... --preset {src}`"
                    if "task" in data and not is_batch_data(data) else f"a batch file has: {', '.join(TOP_KEYS)}")
            raise UsageError(f"unknown key {key!r} at {doc.where(key)}{presets.did_you_mean(key, TOP_KEYS)}", hint)
    if not data.get("jobs") and not data.get("steps"):
        raise UsageError(f"{src} has no `jobs:` or `steps:`", "add a `jobs:` list or a `steps:` mapping")
    for key, kind in (("name", str), ("description", str), ("out", str), ("template", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise UsageError(f"{key} must be text ({doc.where(key)})", f"fix {key!r}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"defaults must be a mapping ({doc.where('defaults')})", "e.g. defaults: {steps: 4}")
    for bad in ("name", "seeds"):
        if bad in defaults:
            raise UsageError(f"{bad!r} cannot be a default ({doc.where('defaults', bad)})", f"set {bad} on each job")
    template = data.get("template")
    if template is not None:
        _check_template(template, doc.where("template"))

    parser = _Parser(doc, defaults)
    raw_jobs = data.get("jobs") or []
    if not isinstance(raw_jobs, list):
        raise UsageError(f"jobs must be a list ({doc.where('jobs')})", "start each job with `- `")
    raw_steps = data.get("steps") or {}
    if not isinstance(raw_steps, dict):
        raise UsageError(f"steps must be a mapping of name: step ({doc.where('steps')})",
                         "e.g. steps:\\n  hero: {task: image, prompt: ...}")
    width = len(str(len(raw_jobs)))
    jobs: list[Job] = []
    for i, raw in enumerate(raw_jobs):
        jobs.extend(parser.job(raw, ("jobs", i), default_name=f"job{i + 1:0{width}d}"))
    steps = [parser.step(name, raw) for name, raw in raw_steps.items()]
    parser.check_names(jobs, steps)
    parser.check_defaults_used(jobs + steps)
    if len(jobs) > MAX_JOBS:
        raise UsageError(f"{src} expands to {len(jobs)} jobs (more than {MAX_JOBS})", "check the {a|b} choices and seeds")
    _check_graph(steps, {j.name for j in jobs}, parser.task_class)

    ordered = _order_jobs(jobs) + _order_steps(steps)
    for n, job in enumerate(ordered):
        if not job.is_step:
            job.component = n
    _assign_components(steps, start=len(ordered))
    out = Path(str(data["out"])).expanduser() if data.get("out") else None
    stem = Path(src).stem if not src.startswith("<") else "batch"
    return BatchFile(source=src, name=str(data.get("name") or stem), description=data.get("description"),
                     out=out, template=template, jobs=ordered, warnings=parser.warnings)


def _check_template(template: str, where: str) -> None:
    probe = template.replace("{job}", "j")
    try:
        probe.format(date="d", time="t", task="t", seed=1, slug="s", index=0, model="m")
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"bad output name template {template!r} ({where}): {exc}",
                         "fields: {job} {date} {time} {task} {seed} {slug} {index} {model}") from exc


class _Parser:
    """Turns the file's jobs and steps into validated Jobs, remembering each key's line."""

    def __init__(self, doc: presets.YamlDoc, defaults: dict[str, Any]):
        self.doc = doc
        self.defaults = defaults
        self.defaults_used: set[str] = set()
        self.warnings: list[str] = []
        self._checked_models: set[tuple[str, str]] = set()
        self._classes: dict[str, type] = {}
        self._presets: dict[str, presets.Preset] = {}
        self._checked_presets: set[tuple[str, str]] = set()

    def preset(self, name: str) -> presets.Preset:
        if name not in self._presets:
            self._presets[name] = presets.read_preset(name, check_task_params=False)
        return self._presets[name]

    def task_class(self, task: str) -> type:
        if task not in self._classes:  # the registry scans entry points on every lookup
            self._classes[task] = task_class(task)
        return self._classes[task]

    def _where(self, path: tuple, raw: dict[str, Any]) -> Callable[[str], str]:
        def where(key: str) -> str:
            if key in raw:
                return self.doc.where(*path, key)
            if key in self.defaults:
                return self.doc.where("defaults", key)
            return self.doc.where(*path)
        return where

    def _common(self, raw: Any, path: tuple, label: str, meta: tuple[str, ...]) -> tuple:
        doc = self.doc
        if not isinstance(raw, dict):
            raise UsageError(f"{label} ({doc.where(*path)}) must be a mapping of keys to values",
                             "e.g. {task: image, prompt: ...}")
        where = self._where(path, raw)
        merged = {**self.defaults, **raw}
        # 1. the task: the job's, else its preset's, else defaults'
        preset_name = merged.get("preset")
        preset = None
        if preset_name is not None:
            try:
                preset = self.preset(str(preset_name))
            except UsageError as exc:
                raise UsageError(f"{label}: {exc.message} ({where('preset')})", exc.hint) from exc
        task = merged.get("task") or (preset.task if preset else None)
        if not task:
            raise UsageError(f"{label} ({doc.where(*path)}) has no task", "add e.g. `task: image` (or put it in defaults:)")
        if preset and preset.task != task:
            raise UsageError(f"{label}: preset {preset.name} is for {preset.task}, not {task} ({where('preset')})",
                             f"use a {task} preset")
        try:
            cls = self.task_class(str(task))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc.message} ({where('task')})", exc.hint) from exc
        except ImportError as exc:
            raise UsageError(f"{label}: task {task} is not available in this install ({exc}) ({where('task')})",
                             "check `studio --help` for the tasks this build has") from exc
        if preset is not None and (preset.name, task) not in self._checked_presets:  # its own values, once
            presets.check_params(task, preset.params, preset.doc.where, f"preset {preset.path}")
            self._checked_presets.add((preset.name, task))
        request_type = cls.request_type
        fields = presets.request_field_types(request_type)
        allowed_always = set() if task in LOCAL_TASKS else presets.ALWAYS_ALLOWED
        # 2. which keys apply: the job's all must; defaults' only where the task has the field
        params: dict[str, Any] = {}
        device: dict[str, Any] = {}
        for key, value in merged.items():
            from_job = key in raw
            if key in meta or key in JOB_META:
                if from_job and key not in meta:
                    raise UsageError(f"{key!r} is not allowed in {label} ({where(key)})",
                                     "steps make one set of outputs; sweep seeds and {a|b} choices under jobs:")
                continue
            if key in DEVICE_KEYS:
                device[key] = value
                if not from_job:
                    self.defaults_used.add(key)
                continue
            if key not in fields and key not in allowed_always:
                if from_job:
                    raise UsageError(f"unknown key {key!r} in {label} ({where(key)}){presets.did_you_mean(key, fields)}",
                                     f"{task} takes: {', '.join(fields)}")
                continue  # a default another task in the file takes
            if not from_job:
                self.defaults_used.add(key)
            params[key] = value
        presets.check_head(device, where, label)
        # 3. required fields must come from somewhere
        have = set(params) | set(preset.params if preset else {})
        for name, (_, required) in fields.items():
            if required and name not in have:
                raise UsageError(f"{label} ({doc.where(*path)}): {task} needs {name!r}", f"add `{name}: ...`")
        model = params.get("model") or (preset.params.get("model") if preset else None) or "auto"
        self._check_model(str(task), str(model), cls, where("model"))
        return task, cls, request_type, params, device, (str(preset_name) if preset_name is not None else None), where

    def _check_model(self, task: str, model: str, cls: type, where: str) -> None:
        """A model name must resolve (an alias, a hub id, a folder that exists). Weights that are
        not downloaded yet are a warning: `studio models pull` may still fetch them."""
        from studio import models

        if task in LOCAL_TASKS or (task, model) in self._checked_models or "${" in model:
            return
        self._checked_models.add((task, model))
        try:
            spec = models.resolve(model, task=getattr(cls, "task", task), offline=True)
            if spec.kind == "hub" and not models.is_available(spec):
                self.warnings.append(f"model {model} ({where}) is neither a local folder nor in the hub cache "
                                     f"(`studio models pull {model}` if it is a hub id)")
        except models.ModelNotAvailable as exc:
            self.warnings.append(f"{exc.message} ({where})")
        except UsageError as exc:
            raise UsageError(f"{exc.message} ({where})", exc.hint) from exc

    def _check_values(self, task: str, request_type: type, params: dict[str, Any], where: Callable, label: str) -> dict[str, Any]:
        plain = {k: v for k, v in params.items() if not _has_ref(v)}
        checked = presets.check_params(task, plain, where, label, request_type=request_type,
                                       always_allowed=set() if task in LOCAL_TASKS else presets.ALWAYS_ALLOWED)
        return {k: checked.get(k, v) for k, v in params.items()}

    def job(self, raw: Any, path: tuple, default_name: str) -> list[Job]:
        label = f"job {path[1] + 1}"
        task, cls, request_type, params, device, preset, where = self._common(raw, path, label, JOB_META)
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"job name {name!r} ({where('name')}) must start with a letter and use {presets.NAME_OK}",
                             "e.g. name: portraits")
        label = f"job {name}"
        for key, value in params.items():
            if _has_ref(value):
                raise UsageError(f"{label}: {key} reads another job's output ({where(key)})",
                                 "only steps: can use ${name.kind}; move this job under steps:")
        seeds = raw.get("seeds")
        if seeds is not None:
            if "seed" in raw:
                raise UsageError(f"{label} has both seed and seeds ({where('seeds')})", "keep one")
            if "seed" not in presets.request_field_types(request_type):
                raise UsageError(f"{label}: {task} takes no seed ({where('seeds')})", "remove seeds:")
            if isinstance(seeds, int) and not isinstance(seeds, bool):
                seeds = [seeds]
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise UsageError(f"{label}: seeds must be a list of whole numbers ({where('seeds')})", "e.g. seeds: [1, 2, 3]")
        params = self._check_values(task, request_type, params, where, label)
        variants = _expand_alternations(params, where, label)
        seed_list: list[int | None] = list(seeds) if seeds else [None]
        combos = list(itertools.product(variants, seed_list))
        out = []
        for k, (variant, seed) in enumerate(combos):
            p = dict(variant)
            if seed is not None:
                p["seed"] = seed
            out.append(Job(name=name if len(combos) == 1 else f"{name}.{k + 1}", task=task, params=p,
                           device=dict(device), preset=preset, where=self.doc.where(*path), model=self._model(p, preset)))
        return out

    def step(self, name: Any, raw: Any) -> Job:
        path = ("steps", name)
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"step name {name!r} ({self.doc.where(*path)}) must start with a letter and use {presets.NAME_OK}",
                             "e.g. hero, desc, theme")
        label = f"step {name}"
        task, cls, request_type, params, device, preset, where = self._common(raw, path, label, STEP_META)
        params = self._check_values(task, request_type, params, where, label)  # {a|b} stays text in steps
        refs = []
        for key, value in params.items():
            refs.extend(_find_refs(value, key, where(key), label))
        return Job(name=name, task=task, params=params, device=device, preset=preset, where=self.doc.where(*path),
                   is_step=True, refs=refs, model=self._model(params, preset), request_type=request_type)

    def _model(self, params: dict[str, Any], preset: str | None) -> str:
        if params.get("model"):
            return str(params["model"])
        if preset:
            return str(self.preset(preset).params.get("model") or "auto")
        return "auto"

    def check_names(self, jobs: list[Job], steps: list[Job]) -> None:
        seen: dict[str, str] = {}
        for job in jobs + steps:
            if job.name in seen:
                raise UsageError(f"two jobs are named {job.name!r} ({seen[job.name]} and {job.where})", "give each a unique name")
            seen[job.name] = job.where

    def check_defaults_used(self, jobs: list[Job]) -> None:
        for key in self.defaults:
            if key in ("task", "preset"):
                continue
            if key not in self.defaults_used:
                tasks = sorted({j.task for j in jobs})
                raise UsageError(f"unknown key {key!r} in defaults ({self.doc.where('defaults', key)}): "
                                 f"no task in this file ({', '.join(tasks)}) takes it", "fix or remove it")


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _has_ref(value: Any) -> bool:
    return any("${" in s.replace("$${", "") for s in _strings(value))


def _find_refs(value: Any, key: str, where: str, label: str) -> list[Ref]:
    refs = []
    for text in _strings(value):
        stripped = text.strip()
        for m in REF.finditer(text):
            step, kind, index = m.group(1), m.group(2), int(m.group(3) or 0)
            if kind not in REF_KINDS:
                raise UsageError(f"{label}: ${{{step}.{kind}}} ({where}): {kind!r} is not an output kind",
                                 f"kinds: {', '.join(REF_KINDS)}")
            refs.append(Ref(step=step, kind=kind, index=index, key=key, whole=(m.group(0) == stripped), where=where))
        leftover = REF.sub("", text).replace("$${", "")
        if "${" in leftover:
            bad = leftover[leftover.index("${"):][:40]
            raise UsageError(f"{label}: malformed reference {bad!r} in {key} ({where})",
                             "write ${step.kind}, e.g. ${hero.image} or ${desc.text}; $${ is a literal ${")
    return refs


def _expand_alternations(params: dict[str, Any], where: Callable, label: str) -> list[dict[str, Any]]:
    """`{a|b}` in any text parameter: one variant per combination (a cartesian product, as
    dynamic-prompts' combinatorial mode). Braces without `|` stay as they are."""
    slots: list[tuple[str, list[str]]] = []
    for key, value in params.items():
        if isinstance(value, str):
            for m in ALTERNATION.finditer(value):
                options = m.group(1).split("|")
                slots.append((key, options))
            depth = 0
            for ch in value:
                depth += ch == "{"
                depth -= ch == "}"
                if depth > 1:
                    raise UsageError(f"{label}: nested braces in {key} ({where(key)})", "{a|b} choices cannot nest")
    if not slots:
        return [dict(params)]
    variants = []
    for choice in itertools.product(*[opts for _, opts in slots]):
        p = dict(params)
        picks = iter(choice)
        for key in dict.fromkeys(k for k, _ in slots):
            p[key] = ALTERNATION.sub(lambda m: next(picks), params[key])
        variants.append(p)
    return variants


def _check_graph(steps: list[Job], job_names: set[str], task_class: Callable[[str], type]) -> None:
    by_name = {s.name: s for s in steps}
    for step in steps:
        request_type = step.request_type
        for ref in step.refs:
            label = f"step {step.name}: ${{{ref.step}.{ref.kind}}}"
            if ref.step not in by_name:
                if ref.step in job_names:
                    raise UsageError(f"{label} ({ref.where}) names a job, not a step",
                                     "move it under steps: to read its output")
                raise UsageError(f"{label} ({ref.where}): no step is named {ref.step!r}{presets.did_you_mean(ref.step, by_name)}",
                                 f"steps: {', '.join(by_name)}")
            if ref.step == step.name:
                raise UsageError(f"{label} ({ref.where}): a step cannot read its own output", "read an earlier step")
            source = by_name[ref.step]
            makes = output_kinds(source.task, task_class(source.task))
            if makes is not None and ref.kind != "file" and ref.kind not in makes:
                raise UsageError(f"{label} ({ref.where}): {ref.step} is a {source.task} step and makes "
                                 f"{' and '.join(makes)}, not {ref.kind}", f"use ${{{ref.step}.{makes[0]}}}")
            kind = ref.kind if ref.kind != "file" else (makes[0] if makes and len(makes) == 1 else "file")
            want = field_kind(request_type, ref.key)
            if not _accepts(want, kind):
                needs = {"number": "a number", "text": "text", "file": "a file"}.get(want or "", f"an {want}" if want and want[0] in "aeiou" else f"a {want}")
                raise UsageError(f"{label} ({ref.where}): {ref.key} needs {needs}, but {ref.step} gives {kind}",
                                 f"pass a {want} output there" if want not in ("number",) else f"give {ref.key} a number")
            if not ref.whole and kind != "text":
                raise UsageError(f"{label} ({ref.where}): a {kind} reference must be the whole value of {ref.key}",
                                 f"write {ref.key}: ${{{ref.step}.{ref.kind}}} on its own")
    # cycles: depth-first, reporting the loop as a path
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in by_name[name].needs:
            if state.get(dep) == 1:
                loop = stack[stack.index(dep):] + [dep]
                raise UsageError(f"steps form a cycle: {' -> '.join(reversed(loop))} ({by_name[dep].where})",
                                 "a step can only read steps that do not read it back")
            if state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in by_name:
        if name not in state:
            visit(name)


def _order_jobs(jobs: list[Job]) -> list[Job]:
    """Group jobs that share a model (first appearance order), keeping file order inside a group."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [job for group in groups.values() for job in group]


def _order_steps(steps: list[Job]) -> list[Job]:
    """A topological order that, among the steps ready to run, prefers the model just used."""
    remaining = {s.name: s for s in steps}
    done: set[str] = set()
    order: list[Job] = []
    last_group = None
    while remaining:
        ready = [s for s in remaining.values() if set(s.needs) <= done]
        pick = next((s for s in ready if s.group == last_group), ready[0])
        order.append(pick)
        done.add(pick.name)
        last_group = pick.group
        del remaining[pick.name]
    return order


def _assign_components(steps: list[Job], start: int) -> None:
    parent = {s.name: s.name for s in steps}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in steps:
        for dep in s.needs:
            parent[find(s.name)] = find(dep)
    ids: dict[str, int] = {}
    for s in steps:
        s.component = ids.setdefault(find(s.name), start + len(ids))


# =========================================================================== outputs and the manifest
@dataclass
class Output:
    """One finished output of a job: what later steps read and what resume verifies."""

    kind: str  # image | text | audio | video | midi | json | file
    path: Path  # the written file (or frames folder)
    sha256: str | None  # of the file (None for a folder)
    text: str | None = None  # the text itself, for text outputs

    def read_text(self) -> str:
        if self.text is None:
            self.text = self.path.read_text(encoding="utf-8")
        return self.text


def _repair_manifest(path: Path) -> None:
    """A run killed mid-append can leave a torn last line; end it so the next row starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


TEMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


def _stale_temps(out_dir: Path) -> list[Path]:
    """Temp files an atomic write left behind when its process was killed (kill -9, power loss)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if TEMP.match(p.name))


class Manifest:
    """What an output folder's manifest.jsonl says: outputs by job, and finished jobs."""

    def __init__(self, out_dir: Path):
        from studio.outputs import read_manifest

        self.out_dir = out_dir
        self.done: dict[str, dict[str, Any]] = {}  # job tag -> its last job-done record
        self.files: dict[str, list[str]] = {}  # job tag -> output files the writer recorded
        self.tracked: dict[str, str | None] = {}  # file -> job tag, for every recorded output
        for row in read_manifest(out_dir):
            if row.get("event") == "job-done":
                self.done[row.get("job")] = row
            elif row.get("file") and not row.get("event"):
                self.tracked[row["file"]] = row.get("job")
                if row.get("job"):
                    self.files.setdefault(row["job"], []).append(row["file"])

    def verified(self, tag: str) -> list[Output] | None:
        """The job's outputs when its record is there and every file still matches its sha256."""
        from studio.outputs import sha256_file

        record = self.done.get(tag)
        if record is None:
            return None
        outputs = []
        for item in record.get("outputs") or []:
            path = self.out_dir / item["file"]
            if not path.exists():
                return None
            if item.get("sha256") is not None and (not path.is_file() or sha256_file(path) != item["sha256"]):
                return None
            outputs.append(Output(kind=item["kind"], path=path, sha256=item.get("sha256")))
        return outputs


def _remove_output(path: Path) -> None:
    """Remove one output and what the writer put beside it (sidecar, companion images)."""
    import shutil

    from studio.outputs import OutputWriter

    suffix = "" if path.is_dir() else path.suffix
    sidecar = OutputWriter.sidecar_for(path, suffix)
    with contextlib.suppress(Exception):
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        for name in (meta.get("companions") or {}).values():
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).unlink()
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        sidecar.unlink()


# =========================================================================== running
@dataclass
class Outcome:
    """What happened to one job."""

    job: str  # the job's name
    task: str
    status: str  # done | skipped | failed | blocked
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None  # one line, for failed / blocked
    seconds: float = 0.0
    tag: str | None = None  # name#key, as the manifest records it
    process: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "task": self.task, "status": self.status, "error": self.error,
                "outputs": [str(o.path) for o in self.outputs], "seconds": round(self.seconds, 3),
                "process": self.process}


@dataclass
class Report:
    """The result of a run: one Outcome per job (all processes' when distributed)."""

    outcomes: list[Outcome]
    out_dir: Path
    seconds: float = 0.0
    processes: int = 1

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> int:
        """Jobs that did not produce their outputs (failed, or blocked by a failed step)."""
        return self.count("failed") + self.count("blocked")

    @property
    def exit_code(self) -> int:
        """How many jobs failed (capped at 100, clear of the shell's 126+ codes); 0 = all done."""
        return min(self.failed, 100)

    def outcome(self, name: str) -> Outcome:
        for o in self.outcomes:
            if o.job == name:
                return o
        raise KeyError(name)

    def paths(self, name: str) -> list[Path]:
        return [o.path for o in self.outcome(name).outputs]

    def text(self, name: str) -> str:
        return next(o for o in self.outcome(name).outputs if o.kind == "text").read_text()

    def summary(self) -> dict[str, Any]:
        return {"jobs": len(self.outcomes), "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "blocked": self.count("blocked"), "seconds": round(self.seconds, 3),
                "out": str(self.out_dir), "processes": self.processes,
                "failures": [{"job": o.job, "status": o.status, "error": o.error} for o in self.outcomes
                             if o.status in ("failed", "blocked")]}


@dataclass
class PlanItem:
    job: Job
    status: str  # run | skip | redo | run (after X)
    process: int = 0


def _jsonable(value: Any) -> Any:
    from studio.outputs import _jsonable as j

    return j(value)


class Runner:
    """Runs a batch / pipeline file: `Runner("file.yaml", out_dir=..., resume=True).run()`.

    Options mirror `studio run`: out_dir (else the file's `out:`, else outputs/<file name>),
    resume, device (flags that win over the file: {"device": "cpu", "precision": "bf16"}),
    quiet/json (what is printed), offline, allow_pickle, trust_remote_code. `emit` receives one
    dict per output (what --json prints). `unload_models=False` keeps every model loaded;
    `merge=1` runs every job as its own pipeline call."""

    def __init__(self, source: str | Path | dict[str, Any] | BatchFile, *, out_dir: str | Path | None = None,
                 resume: bool = False, device: dict[str, Any] | None = None, quiet: bool = True, json: bool = False,
                 offline: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
                 progress: Any = None, emit: Callable[[dict[str, Any]], None] | None = None,
                 unload_models: bool = True, run_id: str | None = None, merge: int = 8):
        from studio.progress import Progress

        if isinstance(source, BatchFile):
            self.file = source
        elif isinstance(source, dict):
            self.file = BatchFile.from_dict(source)
        else:
            self.file = BatchFile.load(source)
        self.out_dir = Path(out_dir).expanduser() if out_dir else (self.file.out or Path("outputs") / self.file.name)
        self.resume = resume
        self.device_flags = {k: v for k, v in (device or {}).items() if v is not None}
        self.quiet = quiet
        self.json = json
        self.offline = offline
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.progress = progress or Progress(enabled=not (quiet or json))
        self.emit = emit
        self.unload_models = unload_models
        self.merge = merge  # up to this many seed-only-different jobs per pipeline call (1 = never merge)
        self.run_id = run_id or os.environ.get("STUDIO_RUN_ID") or uuid.uuid4().hex[:12]
        self.outputs: dict[str, list[Output]] = {}
        self._group_keys: dict[str, set] = {}
        self._classes: dict[str, type] = {}
        self._presets: dict[str, presets.Preset] = {}

    def _cls(self, task: str) -> type:
        if task not in self._classes:  # the registry scans entry points on every lookup
            self._classes[task] = task_class(task)
        return self._classes[task]

    # ------------------------------------------------------------------ identity
    def _device_for(self, job: Job, state: Any = None) -> dict[str, Any]:
        flags = {**job.device, **self.device_flags}
        if state is not None and getattr(state, "num_processes", 1) > 1 and str(state.device).startswith("cuda"):
            if flags.get("device") in (None, "auto", "cuda"):
                flags["device"] = f"cuda:{state.local_process_index}"  # one GPU per process
        return flags

    def _preset(self, name: str) -> presets.Preset:
        if name not in self._presets:
            self._presets[name] = presets.read_preset(name, check_task_params=False)
        return self._presets[name]

    def _preset_signature(self, job: Job) -> str | None:
        """A preset counts by its contents: editing it makes its jobs new work."""
        if not job.preset:
            return None
        return hashlib.sha256(self._preset(job.preset).path.read_bytes()).hexdigest()[:16]

    def key(self, job: Job, upstream: dict[str, list[Output]] | None = None) -> str | None:
        """What makes a job's output what it is: task, parameters (a reference counts as the
        sha256 of what it reads), preset contents and device settings. None while an upstream
        step has not run yet."""
        upstream = self.outputs if upstream is None else upstream
        if any(r.step not in upstream for r in job.refs):
            return None
        params = _resolve(job.params, job.refs, upstream, fingerprint=True)
        device = {k: v for k, v in self._device_for(job).items() if k != "device" or v not in ("auto",)}
        payload = {"task": job.task, "params": _jsonable(params), "preset": self._preset_signature(job),
                   "device": _jsonable(device)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def _template(self, job: Job) -> str:
        template = self.file.template or ("{job}" if job.is_step else "{job}-{seed}-{slug}")
        return template.replace("{job}", job.name)

    # ------------------------------------------------------------------ planning
    def plan(self, processes: int = 1) -> list[PlanItem]:
        """What a run would do: each job with run / skip (done, files match) / redo, and which
        process would take it."""
        manifest = Manifest(self.out_dir) if self.resume else None
        known: dict[str, list[Output]] = {}
        items = []
        for job in self.file.jobs:
            status = "run"
            key = self.key(job, known)
            if manifest is not None:
                if key is None:
                    waiting = [r.step for r in job.refs if r.step not in known]
                    status = f"run (after {', '.join(sorted(set(waiting)))})"
                else:
                    tag = f"{job.name}#{key}"
                    outputs = manifest.verified(tag)
                    if outputs is not None:
                        status = "skip"
                        known[job.name] = outputs
                    elif tag in manifest.done:
                        status = "redo"
            items.append(PlanItem(job=job, status=status))
        units = self.file.components()
        index = {id(job): n for n, unit in enumerate(units) for job in unit}
        n = len(units)
        for item in items:  # the same split as PartialState.split_between_processes
            u = index[id(item.job)]
            per, extra = divmod(n, processes)
            for p in range(processes):
                start = p * per + min(p, extra)
                end = start + per + (1 if p < extra else 0)
                if start <= u < end:
                    item.process = p
                    break
        return items

    # ------------------------------------------------------------------ running
    def run(self) -> Report:
        started = time.perf_counter()
        state = self._state()
        units = self.file.components()
        rank = getattr(state, "process_index", 0)
        if state is not None and state.num_processes > 1:
            with state.split_between_processes(units) as mine:
                units = list(mine)
        main = state is None or state.is_main_process
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            from studio.outputs import MANIFEST

            if self.resume:
                _repair_manifest(self.out_dir / MANIFEST)
                stale = _stale_temps(self.out_dir)
                for path in stale:
                    _remove_output(path) if path.is_dir() else path.unlink(missing_ok=True)
                if stale:
                    self._note(f"removed {len(stale)} temp file(s) an interrupted run left in {self.out_dir}")
        if state is not None:
            state.wait_for_everyone()  # nobody reads the manifest while it is being repaired
        manifest = Manifest(self.out_dir)
        jobs = [job for unit in units for job in unit]
        if not self.resume and manifest.done:
            again = sum(1 for job in jobs if any(t.startswith(job.name + "#") for t in manifest.done))
            if again:
                self._note(f"{again} job(s) already ran into {self.out_dir}; pass --resume to skip the finished ones")
        last_use = {job.group: n for n, job in enumerate(jobs)}
        outcomes: list[Outcome] = []
        from studio.engine import Engine, RunOptions

        base = RunOptions(out_dir=self.out_dir, quiet=self.quiet, json=self.json, offline=self.offline,
                          allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code, write=False)
        engine = Engine(base, progress=self.progress)
        with self.progress:
            bar = self.progress.task(f"{self.file.name}", total=len(jobs))
            position = 0
            for chunk in self._chunks(jobs):
                ready = []
                for job in chunk:  # blocked / skipped jobs are settled before anything runs
                    prepared = self._prepare(job, manifest)
                    if isinstance(prepared, Outcome):
                        outcomes.append(prepared)
                    else:
                        ready.append(prepared)
                if len(ready) > 1:
                    outcomes.extend(self._run_merged(ready, engine, base, state))
                else:
                    outcomes.extend(self._run_ready(*r, engine=engine, base=base, state=state) for r in ready)
                by_name = {o.job: o for o in outcomes[-len(chunk):]}
                for job in chunk:
                    by_name[job.name].process = rank
                    position += 1
                    self._report(by_name[job.name], position, len(jobs))
                    bar.advance()
                if self.unload_models and last_use.get(chunk[-1].group) == position - 1 and position < len(jobs):
                    self._unload(chunk[-1].group)
        report = Report(outcomes=outcomes, out_dir=self.out_dir, seconds=time.perf_counter() - started,
                        processes=getattr(state, "num_processes", 1))
        if state is not None and state.num_processes > 1:
            from accelerate.utils import gather_object

            state.wait_for_everyone()
            everyone = gather_object([[dataclasses.asdict(o) for o in outcomes]])
            merged = []
            for part in everyone:
                for o in part:
                    o["outputs"] = [Output(**{**x, "path": Path(x["path"])}) for x in o["outputs"]]
                    merged.append(Outcome(**o))
            report.outcomes = merged
        return report

    def _state(self) -> Any:
        """accelerate's PartialState when launched as several processes, else None (no import)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        import torch
        from accelerate import PartialState

        cpu = not torch.cuda.is_available() or self.device_flags.get("device") == "cpu"
        return PartialState(cpu=cpu)

    def _note(self, text: str) -> None:
        if not (self.quiet or self.json):
            self.progress.note(text)

    def _report(self, outcome: Outcome, n: int, total: int) -> None:
        if outcome.status in ("failed", "blocked"):
            sys.stderr.write(f"error: job {outcome.job} {outcome.status}: {outcome.error}\n")
        elif not (self.quiet or self.json):
            where = ", ".join(str(o.path) for o in outcome.outputs[:3]) + (" ..." if len(outcome.outputs) > 3 else "")
            verb = "skipped (done)" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f}s"
            self.progress.console.print(f"[{n}/{total}] {outcome.job} ({outcome.task}) {verb}: {where}",
                                        highlight=False, markup=False)
        if self.emit is not None and outcome.status != "done":  # done jobs emitted one line per output
            self.emit({"job": outcome.job, "task": outcome.task, "status": outcome.status, "error": outcome.error,
                       "paths": [str(o.path) for o in outcome.outputs]})

    def _unload(self, group: str) -> None:
        from studio import registry

        keys = self._group_keys.pop(group, set())
        if keys and registry.unload(keys):
            import gc

            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def _chunks(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs that differ only in their seed, for a task whose Request takes `seeds`
        (the image pipeline), run as one call: the prompt is encoded and the pipeline set up once
        for the lot. Each job still gets its own outputs and record."""
        chunks: list[list[Job]] = []
        last = None
        for job in jobs:
            sig = self._merge_signature(job)
            if chunks and sig is not None and sig == last and len(chunks[-1]) < self.merge:
                chunks[-1].append(job)
            else:
                chunks.append([job])
            last = sig
        return chunks

    def _merge_signature(self, job: Job) -> str | None:
        if self.merge <= 1 or job.is_step or job.task in LOCAL_TASKS or "seed" not in job.params:
            return None
        fields = presets.request_field_types(self._cls(job.task).request_type)
        if "seeds" not in fields or "num_outputs" not in fields or "seeds" in job.params or job.params.get("num_outputs", 1) != 1:
            return None
        if job.preset and {"seeds", "num_outputs"} & set(self._preset(job.preset).params):
            return None
        rest = {k: v for k, v in job.params.items() if k != "seed"}
        return json.dumps([job.group, _jsonable(rest)], sort_keys=True, default=str)

    def _prepare(self, job: Job, manifest: Manifest) -> Outcome | tuple[Job, str, str]:
        """A blocked or skipped job's Outcome, or (job, key, tag) for a job to run."""
        # 1. inputs: a step whose upstream failed cannot run
        missing = [r.step for r in job.refs if r.step not in self.outputs]
        if missing:
            error = f"needs {', '.join(sorted(set(missing)))}, which did not finish"
            self._record({"event": "job-blocked", "job": job.name, "name": job.name, "error": error})
            return Outcome(job=job.name, task=job.task, status="blocked", error=error)
        key = self.key(job)
        tag = f"{job.name}#{key}"
        # 2. resume: skip what is done and intact; clear what an interrupted attempt left
        if self.resume:
            done = manifest.verified(tag)
            if done is not None:
                self.outputs[job.name] = done
                return Outcome(job=job.name, task=job.task, status="skipped", outputs=done, tag=tag)
            self._clear_leftovers(job, tag, manifest)
        return job, key, tag  # type: ignore[return-value]

    def _run_merged(self, ready: list[tuple[Job, str, str]], engine: Any, base: Any, state: Any) -> list[Outcome]:
        t0 = time.perf_counter()
        first = ready[0][0]
        seeds = [int(job.params["seed"]) for job, _, _ in ready]
        try:
            params = _coerce(self._cls(first.task).request_type, _resolve(first.params, [], {}), first)
            params.update(seed=seeds[0], seeds=tuple(seeds), num_outputs=len(seeds))
            results = self._execute(first, params, None, engine, base, state)
            by_seed = {int(r.params.get("seed", -1)): r for r in results}
            if len(results) != len(seeds) or set(by_seed) != set(seeds):
                raise RuntimeFailure("the merged call returned other seeds than asked for")
        except KeyboardInterrupt:
            raise
        except Exception:  # run them one by one, so that each failure is its own job's
            return [self._run_ready(*r, engine=engine, base=base, state=state) for r in ready]
        share = (time.perf_counter() - t0) / len(ready)
        return [self._run_ready(job, key, tag, engine=engine, base=base, state=state, results=[by_seed[int(job.params["seed"])]],
                                extra_seconds=share) for job, key, tag in ready]

    def _run_ready(self, job: Job, key: str, tag: str, *, engine: Any, base: Any, state: Any,
                   results: list[Any] | None = None, extra_seconds: float = 0.0) -> Outcome:
        from studio.outputs import MANIFEST, append_jsonl

        t0 = time.perf_counter() - extra_seconds
        # 3. run and write
        try:
            if results is None:
                params = _resolve(job.params, job.refs, self.outputs)
                params = _coerce(self._cls(job.task).request_type, params, job)
                results = self._execute(job, params, tag, engine, base, state)
            outputs = self._write(job, results, tag)
        except KeyboardInterrupt:
            raise
        except StudioError as exc:
            return self._failed(job, tag, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""), t0)
        except Exception as exc:  # a library failure in one job must not end the batch
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return self._failed(job, tag, f"{type(exc).__name__}: {first}", t0)
        # 4. the job's record: written last, so its presence means every output is complete
        seconds = time.perf_counter() - t0
        append_jsonl(self.out_dir / MANIFEST, {
            "event": "job-done", "job": tag, "name": job.name, "task": job.task, "key": key, "run": self.run_id,
            "process": getattr(state, "process_index", 0), "seconds": round(seconds, 4),
            "outputs": [{"file": o.path.name, "kind": o.kind, "sha256": o.sha256} for o in outputs]})
        self.outputs[job.name] = outputs
        return Outcome(job=job.name, task=job.task, status="done", outputs=outputs, seconds=seconds, tag=tag)

    def _failed(self, job: Job, tag: str, error: str, t0: float) -> Outcome:
        self._record({"event": "job-failed", "job": tag, "name": job.name, "error": error})
        return Outcome(job=job.name, task=job.task, status="failed", error=error, seconds=time.perf_counter() - t0, tag=tag)

    def _record(self, row: dict[str, Any]) -> None:
        from studio.outputs import MANIFEST, append_jsonl

        self.out_dir.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.out_dir / MANIFEST, {**row, "run": self.run_id})

    def _clear_leftovers(self, job: Job, tag: str, manifest: Manifest) -> None:
        """Outputs of an attempt at this very job (same name and key) that has no job-done record
        (killed mid-job), or whose record no longer verifies: the redo replaces them, so that
        each output exists once. A file the user changed (sha256 differs) is left alone."""
        from studio.outputs import read_metadata, sha256_file

        removed = 0
        names = set(manifest.files.get(tag, []))
        record = manifest.done.get(tag)
        hashes = {o["file"]: o.get("sha256") for o in (record or {}).get("outputs") or []}
        for name in names:
            path = self.out_dir / name
            if not path.exists():  # deleted by the user: its sidecar goes too, freeing the name
                _remove_output(path)
                continue
            if name in hashes and hashes[name] and path.is_file() and sha256_file(path) != hashes[name]:
                self._note(f"keeping {path}: it changed since studio wrote it")
                continue
            _remove_output(path)
            removed += 1
        # written but killed before its manifest row: the file's own metadata names the job
        for path in self.out_dir.iterdir() if self.out_dir.is_dir() else []:
            if (path.name in manifest.tracked or not path.name.startswith(job.name) or path.name.startswith(".")
                    or path.name.endswith(".json")):
                continue
            with contextlib.suppress(Exception):
                if read_metadata(path).get("job") == tag:
                    _remove_output(path)
                    removed += 1
        if removed:
            self._note(f"{job.name}: removed {removed} output(s) of an interrupted attempt; redoing it")

    def _execute(self, job: Job, params: dict[str, Any], tag: str | None, engine: Any, base: Any, state: Any) -> list[Any]:
        from studio import registry

        if job.task in LOCAL_TASKS:
            import tempfile

            pipeline = LOCAL_TASKS[job.task]()
            request = pipeline.request_type(**params)
            pipeline.check_inputs(request)
            workdir = tempfile.TemporaryDirectory(prefix="studio-mux-")
            results = pipeline.run(request, Path(workdir.name))
            for r in results:
                r.extra = {**({"job": tag} if tag else {}), **r.extra}
                r._workdir = workdir  # type: ignore[attr-defined]  # kept alive until written
            return results
        options = dataclasses.replace(base, preset=job.preset, device=self._device_for(job, state))
        before = registry.loaded_keys()
        try:
            return engine.run(job.task, params, job=tag, options=options)
        finally:
            self._group_keys.setdefault(job.group, set()).update(registry.loaded_keys() - before)

    def _write(self, job: Job, results: list[Any], tag: str) -> list[Output]:
        from studio.engine import Engine
        from studio.outputs import OutputWriter, sha256_file

        writer = OutputWriter(self.out_dir, task=job.task, template=self._template(job))
        makes = output_kinds(job.task, self._cls(job.task))
        outputs = []
        for index, result in enumerate(results):
            result.extra = {**result.extra, "job": tag}
            path = writer.write(result, index)
            kind = result.kind
            if kind == "file" and makes and len(makes) == 1:
                kind = makes[0]  # a muxed MP4 is a video to whoever reads it
            text = result.value if result.kind == "text" else None
            outputs.append(Output(kind=kind, path=path, sha256=sha256_file(path) if path.is_file() else None,
                                  text=str(text) if text is not None else None))
            if self.emit is not None:
                self.emit({**Engine.summary(result), "job": job.name, "status": "done"})
        workdir = getattr(results[0], "_workdir", None) if results else None
        if workdir is not None:
            workdir.cleanup()
        if not outputs:
            raise RuntimeFailure(f"{job.task} returned no outputs", "check the job's parameters")
        return outputs


def _resolve(params: dict[str, Any], refs: list[Ref], outputs: dict[str, list[Output]], *, fingerprint: bool = False) -> dict[str, Any]:
    """Parameters with `${step.kind}` replaced: a file reference by its path (fingerprint: by its
    sha256), a text reference by the text; `$${` becomes a literal `${`."""
    if not refs:
        return {k: _unescape(v) for k, v in params.items()}

    def pick(step: str, kind: str, index: int) -> Output:
        found = [o for o in outputs[step] if kind == "file" or o.kind == kind]
        if index >= len(found):
            raise UsageError(f"${{{step}.{kind}[{index}]}}: {step} made {len(found)} {kind} output(s)",
                             f"use an index below {len(found)}")
        return found[index]

    def value_of(m: re.Match, whole: bool) -> Any:
        out = pick(m.group(1), m.group(2), int(m.group(3) or 0))
        if out.kind == "text":
            return out.read_text()
        if fingerprint:
            return f"sha256:{out.sha256 or out.path.name}"
        return str(out.path.resolve())

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            m = REF.fullmatch(value.strip())
            if m:
                return value_of(m, True)
            return REF.sub(lambda m: str(value_of(m, False)), value).replace("$${", "${")
        if isinstance(value, (list, tuple)):
            return type(value)(sub(v) for v in value)
        return value

    return {k: sub(v) for k, v in params.items()}


def _unescape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$${", "${")
    if isinstance(value, (list, tuple)):
        return type(value)(_unescape(v) for v in value)
    return value


def _coerce(request_type: type, params: dict[str, Any], job: Job) -> dict[str, Any]:
    """A resolved reference into a list field becomes a one-item list; then the usual checks."""
    fields = presets.request_field_types(request_type)
    out = {}
    for key, value in params.items():
        hint = fields.get(key, (None, False))[0]
        if key in {r.key for r in job.refs}:
            if isinstance(value, str) and _is_sequence(hint):
                value = [value]
            value, problem = presets.check_value(hint, value)
            if problem:
                raise UsageError(f"{job.name}: {key}: {problem}", f"check the reference in {key} ({job.where})")
        out[key] = value
    return out


# =========================================================================== entry points
def run_file(source: str | Path | dict[str, Any], **options: Any) -> Report:
    """Run a batch / pipeline file (or the same structure as a dict) and return its Report.

        from studio.batch import run_file
        report = run_file("examples/storyboard.yaml", out_dir="outputs/story", device={"device": "cpu"})
        report.failed, report.paths("hero"), report.text("desc")
    """
    return Runner(source, **options).run()


def launch(path: str | Path, processes: int, argv: list[str], *, cpu: bool) -> dict[str, Any]:
    """`studio run FILE --processes N`: start N workers with `accelerate launch` (torchrun under
    it), each running `studio run FILE` on its share; return the run's summary (Report.summary)."""
    import socket
    import subprocess
    import tempfile

    with socket.socket() as s:  # a free port, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="studio-run-") as tmp:
        summary = Path(tmp) / "summary.json"
        # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the
        # workers' PartialState(cpu=True) joins a gloo group instead (accelerate's --cpu launcher
        # starts one process unless MPI is installed)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "studio", "run", str(path), *argv]
        env = {**os.environ, "STUDIO_RUN_SUMMARY": str(summary), "STUDIO_RUN_ID": uuid.uuid4().hex[:12]}
        if cpu:
            env.setdefault("ACCELERATE_USE_CPU", "true")
        code = subprocess.run(cmd, env=env).returncode
        if not summary.exists():
            raise RuntimeFailure(f"accelerate launch exited with {code} before the run finished",
                                 "rerun with --debug, or without --processes to see the error")
        report = json.loads(summary.read_text())
    return report
