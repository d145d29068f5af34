"""How steps read each other: `${step.kind[index]}` references, what kind of output each task
makes and each request field takes, the checks on the graph (unknown step, wrong kind, cycle), the
run order, the connected components that stay in one process, and, at run time, references
replaced by the paths and texts of finished outputs."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from studio import presets
from studio.batch.model import Job, Output, Ref
from studio.errors import UsageError

REF = re.compile(r"(?<!\$)\$\{\s*([A-Za-z][A-Za-z0-9_-]*)\.([a-z]+)(?:\[(\d+)\])?\s*\}")
REF_KINDS = ("image", "text", "audio", "video", "midi", "json", "file")
# what each built-in task makes (a pipeline class may say it itself with `output_kinds`)
OUTPUT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("image",), "caption": ("text",), "vqa": ("text",), "music-audio": ("audio",),
    "music-midi": ("midi",), "video": ("video",), "code": ("text",), "clip-embed": ("json",),
}
# a request field's name says what it takes when its type (str, Path) cannot
KIND_WORDS = {
    "image": {"image", "images", "mask", "photo", "photos", "picture"},
    "audio": {"audio", "melody", "wav", "sound"},
    "video": {"video", "videos"},
    "midi": {"midi", "primer"},
}


# --------------------------------------------------------------------------- kinds
def output_kinds(task: str, cls: type | None = None) -> tuple[str, ...] | None:
    kinds = getattr(cls, "output_kinds", None) if cls is not None else None
    return tuple(kinds) if kinds else OUTPUT_KINDS.get(task)


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


def _accepts(want: str | None, kind: str) -> bool:
    if want is None:
        return True
    if want == "file":
        return kind != "text"
    return want == kind


# --------------------------------------------------------------------------- references in values
def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def has_ref(value: Any) -> bool:
    return any("${" in s.replace("$${", "") for s in _strings(value))


def find_refs(value: Any, key: str, where: str, label: str) -> list[Ref]:
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


# --------------------------------------------------------------------------- the graph
def check_graph(steps: list[Job], job_names: set[str], task_class: Callable[[str], type]) -> None:
    """Each reference names an earlier step that makes that kind, going into a field that takes
    it; and the steps form no cycle."""
    by_name = {s.name: s for s in steps}
    for step in steps:
        for ref in step.refs:
            _check_ref(step, ref, by_name, job_names, task_class)
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


def _check_ref(step: Job, ref: Ref, by_name: dict[str, Job], job_names: set[str], task_class: Callable[[str], type]) -> None:
    label = f"step {step.name}: ${{{ref.step}.{ref.kind}}}"
    if ref.step not in by_name:
        if ref.step in job_names:
            raise UsageError(f"{label} ({ref.where}) names a job, not a step", "move it under steps: to read its output")
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
    want = field_kind(step.request_type, ref.key)
    if not _accepts(want, kind):
        needs = {"number": "a number", "text": "text", "file": "a file"}.get(want or "", f"an {want}" if want and want[0] in "aeiou" else f"a {want}")
        raise UsageError(f"{label} ({ref.where}): {ref.key} needs {needs}, but {ref.step} gives {kind}",
                         f"pass a {want} output there" if want not in ("number",) else f"give {ref.key} a number")
    if not ref.whole and kind != "text":
        raise UsageError(f"{label} ({ref.where}): a {kind} reference must be the whole value of {ref.key}",
                         f"write {ref.key}: ${{{ref.step}.{ref.kind}}} on its own")


# --------------------------------------------------------------------------- order and components
def order_jobs(jobs: list[Job]) -> list[Job]:
    """Group jobs that share a model (first appearance order), keeping file order inside a group."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return [job for group in groups.values() for job in group]


def order_steps(steps: list[Job]) -> list[Job]:
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


def assign_components(jobs: list[Job], steps: list[Job]) -> None:
    """One component per job; connected steps share one (they run in one process)."""
    for n, job in enumerate(jobs):
        job.component = n
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
        s.component = ids.setdefault(find(s.name), len(jobs) + len(ids))


# --------------------------------------------------------------------------- at run time
def resolve(params: dict[str, Any], refs: list[Ref], outputs: dict[str, list[Output]], *, fingerprint: bool = False) -> dict[str, Any]:
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

    def value_of(m: re.Match) -> Any:
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
                return value_of(m)
            return REF.sub(lambda m: str(value_of(m)), value).replace("$${", "${")
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


def coerce(request_type: type, params: dict[str, Any], job: Job) -> dict[str, Any]:
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
