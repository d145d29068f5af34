"""A batch / pipeline file read, checked and expanded into Jobs (everything `studio validate`
checks, before anything runs).

Merge order for one job: request defaults < model card < preset < `defaults:` < the job's keys <
command-line device flags. Unknown keys and bad values name the key and `file:line`; an output
name template must name a file inside the output folder; `{a|b}` choices and `seeds:` expand to
at most MAX_JOBS jobs, counted before they are built.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio import presets, registry, yamlfile
from studio.batch import graph
from studio.batch.model import Job
from studio.device import ENV as DEVICE_KEYS
from studio.errors import UsageError

TOP_KEYS = ("name", "description", "out", "template", "defaults", "jobs", "steps")
JOB_META = ("task", "name", "preset", "seeds")  # a job's keys that are not request params
STEP_META = ("task", "preset")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
ALTERNATION = re.compile(r"\{([^{}]*\|[^{}]*)\}")
MAX_JOBS = 100_000  # a typo in an alternation should not silently plan a million jobs
TEMPLATE_FIELDS = "{job} {date} {time} {task} {seed} {slug} {index} {model}"


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
    def load(cls, path: str | Path, *, unsafe_exec: bool = False) -> "BatchFile":
        return parse(read(path), unsafe_exec=unsafe_exec)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<python>", *, unsafe_exec: bool = False) -> "BatchFile":
        return parse(yamlfile.YamlDoc(source=source, data=data), unsafe_exec=unsafe_exec)

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


def read(path: str | Path) -> yamlfile.YamlDoc:
    """The file's YAML, bounded before it is built (yamlfile.read_yaml); the top-level `jobs:`
    entries are counted while they stream in."""
    return yamlfile.read_yaml(path, max_items={"jobs": yamlfile.MAX_YAML_ITEMS})


def load(path: str | Path, *, unsafe_exec: bool = False) -> BatchFile:
    """Read and validate a batch / pipeline file (everything `studio validate` checks).
    `unsafe_exec`: `studio run --unsafe-exec` was given, so jobs may set `unsafe_exec: true`."""
    return BatchFile.load(path, unsafe_exec=unsafe_exec)


def is_batch_data(data: Any) -> bool:
    """A batch file (jobs: list, steps: mapping) rather than a preset (task: and flat values,
    where `steps:` is a number of denoising steps)."""
    if not isinstance(data, dict):
        return True  # not a preset either: parse() says what a batch file looks like
    return "jobs" in data or isinstance(data.get("steps"), dict) or "task" not in data


def parse(doc: yamlfile.YamlDoc, *, unsafe_exec: bool = False) -> BatchFile:
    # 1. the file's own keys
    data, src = doc.data, doc.source
    defaults = _check_top(doc)
    template = data.get("template")
    if template is not None:
        check_template(template, doc.where("template"))
    raw_jobs = data.get("jobs") or []
    if not isinstance(raw_jobs, list):
        raise UsageError(f"jobs must be a list ({doc.where('jobs')})", "start each job with `- `")
    raw_steps = data.get("steps") or {}
    if not isinstance(raw_steps, dict):
        raise UsageError(f"steps must be a mapping of name: step ({doc.where('steps')})",
                         "e.g. steps:\\n  hero: {task: image, prompt: ...}")
    # 2. every job and step, checked against its task's Request; jobs expanded (counted first)
    parser = _Parser(doc, defaults, allow=frozenset({"unsafe_exec"}) if unsafe_exec else frozenset())
    width = len(str(len(raw_jobs)))
    jobs: list[Job] = []
    for i, raw in enumerate(raw_jobs):
        jobs.extend(parser.job(raw, ("jobs", i), default_name=f"job{i + 1:0{width}d}", room=MAX_JOBS - len(jobs)))
    steps = [parser.step(name, raw) for name, raw in raw_steps.items()]
    parser.check_names(jobs, steps)
    parser.check_defaults_used(jobs + steps)
    # 3. the graph: references, order, components
    graph.check_graph(steps, {j.name for j in jobs}, parser.task_class)
    jobs = graph.order_jobs(jobs)
    graph.assign_components(jobs, steps)
    out = Path(str(data["out"])).expanduser() if data.get("out") else None
    stem = Path(src).stem if not src.startswith("<") else "batch"
    return BatchFile(source=src, name=str(data.get("name") or stem), description=data.get("description"),
                     out=out, template=template, jobs=jobs + graph.order_steps(steps), warnings=parser.warnings)


def _check_top(doc: yamlfile.YamlDoc) -> dict[str, Any]:
    """The top-level keys; returns `defaults:`."""
    data, src = doc.data, doc.source
    if not isinstance(data, dict):
        raise UsageError(f"{src} must be a mapping with `jobs:` and/or `steps:`", "see examples/batch.yaml")
    for key in data:
        if key not in TOP_KEYS:
            hint = (f"{src} looks like a preset: use it as `studio {data['task']} ... --preset {src}`"
                    if "task" in data and not is_batch_data(data) else f"a batch file has: {', '.join(TOP_KEYS)}")
            raise UsageError(f"unknown key {key!r} at {doc.where(key)}{presets.did_you_mean(key, TOP_KEYS)}", hint)
    if not data.get("jobs") and not data.get("steps"):
        raise UsageError(f"{src} has no `jobs:` or `steps:`", "add a `jobs:` list or a `steps:` mapping")
    for key in ("name", "description", "out", "template"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UsageError(f"{key} must be text ({doc.where(key)})", f"fix {key!r}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"defaults must be a mapping ({doc.where('defaults')})", "e.g. defaults: {steps: 4}")
    for bad in ("name", "seeds"):
        if bad in defaults:
            raise UsageError(f"{bad!r} cannot be a default ({doc.where('defaults', bad)})", f"set {bad} on each job")
    return defaults


def check_template(template: str, where: str) -> None:
    """An output name template names a file inside the output folder (subfolders allowed): not
    absolute, no `..` (`../../x-{seed}` would write, and a later --resume delete, outside --out)."""
    def outside(name: str) -> bool:
        return name.startswith(("/", "~")) or ".." in name or "\\" in name or "\0" in name

    hint = f"use only {TEMPLATE_FIELDS}, plain text and subfolders: no '..' and no absolute path"
    if outside(template):
        raise UsageError(f"output name template {template!r} ({where}) would write outside the output folder", hint)
    probe = template.replace("{job}", "j")
    try:
        name = probe.format(date="d", time="t", task="t", seed=1, slug="s", index=0, model="m")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise UsageError(f"bad output name template {template!r} ({where}): {exc}", f"fields: {TEMPLATE_FIELDS}") from exc
    if outside(name) or not name.strip("/ "):  # a format spec can make text too: {seed:/>4}
        raise UsageError(f"output name template {template!r} ({where}) would write outside the output folder", hint)


class _Parser:
    """Turns the file's jobs and steps into validated Jobs, remembering each key's line."""

    def __init__(self, doc: yamlfile.YamlDoc, defaults: dict[str, Any], allow: frozenset[str] = frozenset()):
        self.doc = doc
        self.defaults = defaults
        self.allow = allow  # FLAG_ONLY keys the command line allowed (studio run --unsafe-exec)
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
        if task not in self._classes:  # one import and lookup per task, not per job
            self._classes[task] = registry.pipeline_class(task)
        return self._classes[task]

    def _where(self, path: tuple, raw: dict[str, Any]) -> Callable[[str], str]:
        def where(key: str) -> str:
            if key in raw:
                return self.doc.where(*path, key)
            if key in self.defaults:
                return self.doc.where("defaults", key)
            return self.doc.where(*path)
        return where

    # ------------------------------------------------------------------ one job or step
    def job(self, raw: Any, path: tuple, default_name: str, room: int = MAX_JOBS) -> list[Job]:
        label = f"job {path[1] + 1}"
        task, cls, params, device, preset, where = self._common(raw, path, label, JOB_META)
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"job name {name!r} ({where('name')}) must start with a letter and use {presets.NAME_OK}",
                             "e.g. name: portraits")
        label = f"job {name}"
        for key, value in params.items():
            if graph.has_ref(value):
                raise UsageError(f"{label}: {key} reads another job's output ({where(key)})",
                                 "only steps: can use ${name.kind}; move this job under steps:")
        seeds = self._seeds(raw, task, cls, label, where)
        params = self._check_values(task, cls, params, where, label)
        count = _alternations(params) * len(seeds)  # counted before anything is built
        if count > room:
            raise UsageError(f"{self.doc.source} expands to more than {MAX_JOBS} jobs ({label} alone makes {count}, "
                             f"{self.doc.where(*path)})", "check the {a|b} choices and seeds")
        combos = list(itertools.product(_expand_alternations(params, where, label), seeds))
        out = []
        for k, (variant, seed) in enumerate(combos):
            p = dict(variant)
            if seed is not None:
                p["seed"] = seed
            out.append(Job(name=name if len(combos) == 1 else f"{name}.{k + 1}", task=task, params=p,
                           device=dict(device), preset=preset, where=self.doc.where(*path), model=self._model(p, preset, cls)))
        return out

    def step(self, name: Any, raw: Any) -> Job:
        path = ("steps", name)
        if not isinstance(name, str) or not NAME.match(name):
            raise UsageError(f"step name {name!r} ({self.doc.where(*path)}) must start with a letter and use {presets.NAME_OK}",
                             "e.g. hero, desc, theme")
        label = f"step {name}"
        task, cls, params, device, preset, where = self._common(raw, path, label, STEP_META)
        params = self._check_values(task, cls, params, where, label)  # {a|b} stays text in steps
        refs = []
        for key, value in params.items():
            refs.extend(graph.find_refs(value, key, where(key), label))
        return Job(name=name, task=task, params=params, device=device, preset=preset, where=self.doc.where(*path),
                   is_step=True, refs=refs, model=self._model(params, preset, cls), request_type=cls.request_type)

    def _common(self, raw: Any, path: tuple, label: str, meta: tuple[str, ...]) -> tuple:
        """(task, class, params, device, preset name, where) of one job or step."""
        if not isinstance(raw, dict):
            raise UsageError(f"{label} ({self.doc.where(*path)}) must be a mapping of keys to values",
                             "e.g. {task: image, prompt: ...}")
        where = self._where(path, raw)
        merged = {**self.defaults, **raw}
        # 1. the task: the job's, else its preset's, else defaults'
        preset_name = merged.get("preset")
        preset = self._preset_for(preset_name, label, where)
        task = merged.get("task") or (preset.task if preset else None)
        if not task:
            raise UsageError(f"{label} ({self.doc.where(*path)}) has no task", "add e.g. `task: image` (or put it in defaults:)")
        if preset and preset.task != task:
            raise UsageError(f"{label}: preset {preset.name} is for {preset.task}, not {task} ({where('preset')})",
                             f"use a {task} preset")
        cls = self._class_for(str(task), label, where)
        if preset is not None and (preset.name, task) not in self._checked_presets:  # its own values, once
            presets.check_params(task, preset.params, preset.doc.where, f"preset {preset.path}", allow=self.allow)
            self._checked_presets.add((preset.name, task))
        # 2. which keys apply: the job's all must; defaults' only where the task has the field
        params, device = self._split(merged, raw, cls, str(task), label, meta, where)
        presets.check_head(device, where, label)
        # 3. required fields must come from somewhere
        have = set(params) | set(preset.params if preset else {})
        for name, (_, required) in presets.request_field_types(cls.request_type).items():
            if required and name not in have:
                raise UsageError(f"{label} ({self.doc.where(*path)}): {task} needs {name!r}", f"add `{name}: ...`")
        preset_name = str(preset_name) if preset_name is not None else None
        model = self._model(params, preset_name, cls)
        if model is not None:
            self._check_model(str(task), model, cls, where("model"))
        return task, cls, params, device, preset_name, where

    def _preset_for(self, name: Any, label: str, where: Callable[[str], str]) -> presets.Preset | None:
        if name is None:
            return None
        try:
            return self.preset(str(name))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc.message} ({where('preset')})", exc.hint) from exc

    def _class_for(self, task: str, label: str, where: Callable[[str], str]) -> type:
        try:
            return self.task_class(task)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc.message} ({where('task')})", exc.hint) from exc
        except ImportError as exc:
            raise UsageError(f"{label}: task {task} is not available in this install ({exc}) ({where('task')})",
                             "check `studio --help` for the tasks this build has") from exc

    def _split(self, merged: dict[str, Any], raw: dict[str, Any], cls: type, task: str, label: str,
               meta: tuple[str, ...], where: Callable[[str], str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(request params, device settings) of the merged keys; a job's own unknown key is an error."""
        fields = presets.request_field_types(cls.request_type)
        allowed_always = _always_allowed(cls)
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
        return params, device

    def _seeds(self, raw: dict[str, Any], task: str, cls: type, label: str, where: Callable[[str], str]) -> list[int | None]:
        seeds = raw.get("seeds")
        if seeds is None:
            return [None]
        if "seed" in raw:
            raise UsageError(f"{label} has both seed and seeds ({where('seeds')})", "keep one")
        if "seed" not in presets.request_field_types(cls.request_type):
            raise UsageError(f"{label}: {task} takes no seed ({where('seeds')})", "remove seeds:")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UsageError(f"{label}: seeds must be a list of whole numbers ({where('seeds')})", "e.g. seeds: [1, 2, 3]")
        return list(seeds)

    def _check_model(self, task: str, model: str, cls: type, where: str) -> None:
        """A model name must resolve (an alias, a hub id, a folder that exists). Weights that are
        not downloaded yet are a warning: `studio models pull` may still fetch them."""
        from studio import models

        if (task, model) in self._checked_models or "${" in model:
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

    def _check_values(self, task: str, cls: type, params: dict[str, Any], where: Callable, label: str) -> dict[str, Any]:
        plain = {k: v for k, v in params.items() if not graph.has_ref(v)}
        checked = presets.check_params(task, plain, where, label, request_type=cls.request_type,
                                       always_allowed=_always_allowed(cls), allow=self.allow)
        return {k: checked.get(k, v) for k, v in params.items()}

    def _model(self, params: dict[str, Any], preset: str | None, cls: type) -> str | None:
        """The model a job loads (it groups jobs); None for a task that loads none."""
        if not getattr(cls, "needs_model", True):
            return None
        if params.get("model"):
            return str(params["model"])
        if preset:
            return str(self.preset(preset).params.get("model") or "auto")
        return "auto"

    # ------------------------------------------------------------------ the whole file
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


def _always_allowed(cls: type) -> set[str]:
    """`model:` is accepted for every task that loads one, even where its Request has no field."""
    return presets.ALWAYS_ALLOWED if getattr(cls, "needs_model", True) else set()


def _alternations(params: dict[str, Any]) -> int:
    """How many variants `{a|b}` choices make, before they are built: twenty `{a|b}` in one
    prompt are a million jobs."""
    return math.prod(len(m.group(1).split("|")) for v in params.values() if isinstance(v, str) for m in ALTERNATION.finditer(v))


def _expand_alternations(params: dict[str, Any], where: Callable, label: str) -> list[dict[str, Any]]:
    """`{a|b}` in any text parameter: one variant per combination (a cartesian product, as
    dynamic-prompts' combinatorial mode). Braces without `|` stay as they are."""
    slots: list[tuple[str, list[str]]] = []
    for key, value in params.items():
        if isinstance(value, str):
            for m in ALTERNATION.finditer(value):
                slots.append((key, m.group(1).split("|")))
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
