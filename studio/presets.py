"""Presets: YAML data holding defaults for one task.

    # presets/sd-turbo-fast.yaml
    task: image
    description: one-step previews on sd-turbo
    model: sd-turbo
    steps: 1
    guidance: 0.0
    precision: fp16          # device keys (device, precision, attention, offload, quantize, compile)

Keys other than task/description/device keys are request parameters of the task. Everything is
validated when the preset is read: an unknown key, a value of the wrong type or an unknown
device setting is an error naming the key and `file:line` (from YAML's node marks), before any
model loads. Merge order: the request's defaults < the model card's defaults < the preset <
command-line flags.

Shipped presets live in presets/*.yaml; a user's own in $STUDIO_HOME/presets/ (same name wins).
The YAML helpers here (`read_yaml`, `YamlDoc.where`) are shared with batch files (studio/batch/), and
bound every file before it is built (size, values after alias expansion, nesting, top-level entries).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.device import ATTENTIONS, OFFLOADS, PRECISIONS, QUANTIZE
from studio.device import ENV as DEVICE_KEYS
from studio.errors import UsageError
from studio.paths import PACKAGE_PRESETS, user_presets_dir

META_KEYS = {"task", "description"}
# keys the engine accepts for every task even where the Request has no such field: `model`
# picks what to load (the engine drops it afterwards for model-less requests)
ALWAYS_ALLOWED = {"model"}
NAME_OK = "letters, digits, - and _"
# request fields that only a command-line flag may turn on, never a file: a preset shared between
# people, or a batch file from elsewhere, must not run generated code without isolation. A batch
# file may set them when `studio run --unsafe-exec` says so (check_params' `allow`).
FLAG_ONLY = {"unsafe_exec": "--unsafe-exec"}


# --------------------------------------------------------------------------- YAML with line numbers
@dataclass
class YamlDoc:
    """A parsed YAML file plus the line of every key and item, so errors can say `file:line`."""

    source: str  # the file path (or "<python>" for data built in code)
    data: Any  # the plain Python data (dicts, lists, scalars)
    lines: dict[tuple, int] = field(default_factory=dict)  # (key, key, index, ...) -> 1-based line

    def where(self, *path: Any) -> str:
        """`file:line` of the deepest known prefix of `path` (the file alone when unknown)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.source}:{line}"
        return self.source


# Bounds on a YAML file, checked while it streams in, before any of it is built: a 370-byte alias
# bomb (`&a [*a, *a, ...]` nine levels deep stands for a billion values) or a 100 MB file of a
# million jobs is refused in milliseconds instead of minutes and gigabytes. Generous for any file a
# person writes: sweeps belong in `seeds:` and `{a|b}` choices, which expand after these checks.
# Each bound also caps the work done on a file that passes: libyaml hands Python one event per
# value (~2 us each here, 6 us on a loaded 2-core machine), and building a value costs more.
MAX_YAML_BYTES = 2 << 20  # 2 MiB, about 20000 one-line jobs
MAX_YAML_NODES = 250_000  # values (scalars, lists, mappings), an alias counting as all it stands for
MAX_YAML_DEPTH = 64  # lists and mappings inside each other
MAX_YAML_ITEMS = 10_000  # entries of a counted top-level list (a batch file's `jobs:`)
_TOO_BIG_HINT = ("a batch or preset file this large is a mistake (or a YAML alias bomb): split it, and sweep "
                 "with seeds: and {a|b} choices, which expand after this check")


def read_yaml(path: str | Path | None = None, *, text: str | None = None, source: str | None = None,
              max_items: dict[str, int] | None = None) -> YamlDoc:
    """Parse YAML keeping each key's line. Syntax errors and duplicate keys (which PyYAML would
    silently collapse, losing a job or a setting) are UsageErrors with `file:line`, and so is a
    file past the bounds above. `max_items` caps top-level entries while they stream in:
    {"jobs": 20000} stops at the 20001st job, before any job is built."""
    import yaml

    if text is None:
        text, source = _read_text(Path(path).expanduser(), source)  # type: ignore[arg-type]
    elif len(text) > MAX_YAML_BYTES:
        raise UsageError(f"{source or '<text>'} is {len(text) / 2**20:.1f} MB of YAML, more than studio reads "
                         f"({MAX_YAML_BYTES >> 20} MB)", _TOO_BIG_HINT)
    source = source or "<text>"
    _check_bounds(text, source, max_items or {})
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml: ~10x faster, same marks
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from exc
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, source)
    return YamlDoc(source=source, data=data, lines=lines)


def _read_text(p: Path, source: str | None) -> tuple[str, str]:
    """The file's text, read only up to the size bound (a huge file is refused unread)."""
    if not p.exists():
        raise UsageError(f"{p} does not exist", "check the path")
    if p.is_dir():
        raise UsageError(f"{p} is a folder", "pass a YAML file")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise UsageError(f"{p} is {size / 2**20:.0f} MB, more than studio reads from a YAML file "
                             f"({MAX_YAML_BYTES >> 20} MB)", _TOO_BIG_HINT)
        with open(p, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # a device or a file still growing stops here too
        if len(raw) > MAX_YAML_BYTES:
            raise UsageError(f"{p} holds more than {MAX_YAML_BYTES >> 20} MB, more than studio reads from a YAML file",
                             _TOO_BIG_HINT)
        return raw.decode("utf-8"), source or str(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {p}: {exc}", "pass a UTF-8 YAML file") from exc


def _syntax_error(exc: Exception, source: str) -> UsageError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return UsageError(f"{where} is not valid YAML ({problem})", "fix the indentation and quoting on that line")


class _Open:
    """A list or mapping whose end has not streamed in yet."""

    __slots__ = ("anchor", "opened", "children", "cap", "name", "mapping")

    def __init__(self, anchor: str | None, opened: int, cap: int | None, name: Any, mapping: bool):
        self.anchor = anchor  # its anchor (&name), if any
        self.opened = opened  # values counted before it began (its size = count at its end - this)
        self.children = 0  # child nodes so far (a mapping's keys and values both count)
        self.cap = cap  # most entries allowed (max_items), or None
        self.name = name  # the top-level key it is the value of
        self.mapping = mapping


def _check_bounds(text: str, source: str, max_items: dict[str, int]) -> None:
    """Stream the YAML events (libyaml: no nodes are built) and stop at the first bound crossed:
    more than MAX_YAML_NODES values with every alias expanded, nesting deeper than MAX_YAML_DEPTH,
    a recursive alias, or more top-level entries under a key of `max_items` than it allows.
    PyYAML builds an alias as a shared node, so its cost shows only later, in whatever walks the
    data (35 s and 2.2 GB for a 370-byte bomb); counting here keeps every later step bounded.
    Syntax errors are left to the parse that follows, which reports them with their line."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    nodes = (yaml.ScalarEvent, yaml.AliasEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    anchors: dict[str, int] = {}  # anchor -> how many values it stands for
    stack: list[_Open] = []
    total = 0  # values so far, aliases expanded
    root_key: Any = None  # the top-level key whose value streams next
    try:
        while loader.check_event():
            event = loader.get_event()
            kind = type(event)
            if kind in ends:
                done = stack.pop()
                if done.anchor is not None:
                    anchors[done.anchor] = total - done.opened
                continue
            if kind not in nodes:
                continue
            # 1. count it: an alias as everything its anchor holds
            if kind is yaml.AliasEvent:
                if event.anchor not in anchors and any(o.anchor == event.anchor for o in stack):
                    raise UsageError(f"{_at(source, event)}: alias *{event.anchor} sits inside the value it names (a recursive alias)",
                                     "remove the alias")
                total += anchors.get(event.anchor, 1)
            else:
                total += 1
            if total > MAX_YAML_NODES:
                raise UsageError(f"{_at(source, event)}: the file holds more than {MAX_YAML_NODES:,} values once its aliases are "
                                 "expanded", _TOO_BIG_HINT)
            # 2. count it as an entry of its parent; remember top-level keys
            is_key = False
            if stack:
                parent = stack[-1]
                parent.children += 1
                if parent.cap is not None and parent.children > parent.cap * (2 if parent.mapping else 1):
                    raise UsageError(f"{_at(source, event)}: more than {parent.cap:,} entries under `{parent.name}:`", _TOO_BIG_HINT)
                is_key = parent.mapping and parent.children % 2 == 1
                if is_key and len(stack) == 1:
                    root_key = event.value if kind is yaml.ScalarEvent else None
            # 3. anchors and open collections
            if kind is yaml.ScalarEvent:
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif kind is not yaml.AliasEvent:
                top_value = len(stack) == 1 and stack[0].mapping and not is_key
                name = root_key if top_value else None
                stack.append(_Open(event.anchor, total - 1, max_items.get(name) if top_value else None, name,
                                   kind is yaml.MappingStartEvent))
                if len(stack) > MAX_YAML_DEPTH:
                    raise UsageError(f"{_at(source, event)}: lists and mappings nested more than {MAX_YAML_DEPTH} deep", "flatten the file")
    except yaml.YAMLError:
        return  # the parse that follows reports it, with its line
    finally:
        loader.dispose()


def _at(source: str, event: Any) -> str:
    return f"{source}:{event.start_mark.line + 1}"


def _walk(node: Any, path: tuple, lines: dict[tuple, int], source: str) -> None:
    import yaml

    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys keep the anchor's lines
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UsageError(f"duplicate key {key!r} at {source}:{line} (first at line {seen[key]})",
                                 "each key may appear once in a mapping; rename or merge them")
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, source)
            lines[path + (key,)] = line  # the key's own line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _walk(item, path + (index,), lines, source)


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- values
def _device_head_model():
    """The pydantic model of a preset's fixed keys (task, description, device settings)."""
    from pydantic import BaseModel, ConfigDict, field_validator

    Precision = typing.Literal[PRECISIONS]  # type: ignore[valid-type]
    Attention = typing.Literal[ATTENTIONS]  # type: ignore[valid-type]
    Offload = typing.Literal[OFFLOADS]  # type: ignore[valid-type]
    Quantize = typing.Literal[QUANTIZE]  # type: ignore[valid-type]

    class Head(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        task: typing.Optional[str] = None
        description: typing.Optional[str] = None
        device: typing.Optional[str] = None
        precision: typing.Optional[Precision] = None
        attention: typing.Optional[Attention] = None
        offload: typing.Optional[Offload] = None
        quantize: typing.Optional[Quantize] = None
        compile: typing.Optional[bool] = None

        @field_validator("device")
        @classmethod
        def _device(cls, value: str | None) -> str | None:
            if value is not None:
                from studio.device import DeviceSettings

                try:
                    DeviceSettings(device=value)
                except UsageError as exc:
                    raise ValueError(f"{exc.message}; {exc.hint}") from exc
            return value

    return Head


_HEAD = None


def check_head(values: dict[str, Any], where: Callable[[str], str], what: str) -> dict[str, Any]:
    """Validate task/description/device keys with pydantic; the first problem names key and line."""
    from pydantic import ValidationError

    global _HEAD
    if _HEAD is None:
        _HEAD = _device_head_model()
    try:
        _HEAD(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err.get("loc") else "?"
        raise UsageError(f"{what}: {key}: {_pydantic_message(err)} ({where(key)})",
                         f"fix {key!r} in the file") from exc
    return values


def _pydantic_message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if "input" in err and err.get("type") not in ("missing",):
        msg += f", got {err['input']!r}"
    return msg


@functools.lru_cache(maxsize=None)
def request_field_types(request_type: type) -> dict[str, tuple[Any, bool]]:
    """name -> (type hint or None when unresolvable, required?) for a Request dataclass."""
    try:
        hints = typing.get_type_hints(request_type)
    except Exception:  # forward refs to names the module imports lazily: skip type checks
        hints = {}
    out = {}
    for f in dataclasses.fields(request_type):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        out[f.name] = (hints.get(f.name), required)
    return out


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any):
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # a type pydantic has no schema for: accept as is
        return None


def check_value(hint: Any, value: Any) -> tuple[Any, str | None]:
    """(value as the Request's annotation wants it, None) or (value, why it is wrong).

    Lax pydantic validation: YAML's list becomes the tuple a field declares, a string a Path,
    while "fast" for an int field is an error. Types pydantic cannot describe pass unchecked."""
    from pydantic import ValidationError

    if hint is None:
        return value, None
    adapter = _adapter(hint)
    if adapter is None:
        return value, None
    try:
        return adapter.validate_python(value), None
    except ValidationError as exc:
        return value, _pydantic_message(exc.errors()[0])


def check_params(task: str, params: dict[str, Any], where: Callable[[str], str], what: str, *,
                 request_type: type | None = None, always_allowed: set[str] = ALWAYS_ALLOWED,
                 allow: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Validate request parameters of `task`: unknown keys and bad values name key and line, and
    a FLAG_ONLY key set true is refused unless `allow` names it (the command line's own flag).

    Returns the values converted to the Request's annotated types."""
    from studio import registry

    if request_type is None:
        request_type = getattr(registry.pipeline_class(task), "request_type", None)
    if request_type is None:
        return dict(params)
    fields = request_field_types(request_type)
    out = {}
    for key, value in params.items():
        if key in always_allowed and key not in fields:
            out[key] = value
            continue
        if key not in fields:
            raise UsageError(f"unknown key {key!r} in {what} ({where(key)}){did_you_mean(key, fields)}",
                             f"{task} takes: {', '.join(fields)}")
        converted, problem = check_value(fields[key][0], value)
        if problem:
            raise UsageError(f"{what}: {key}: {problem} ({where(key)})", f"fix {key!r} in the file")
        if key in FLAG_ONLY and converted and key not in allow:
            raise UsageError(f"{what}: {key}: true is not allowed in a file ({where(key)})",
                             f"only the command line turns it on: `{FLAG_ONLY[key]}` on the command, or "
                             f"`studio run FILE {FLAG_ONLY[key]}` for a batch file you trust")
        out[key] = converted
    return out


# --------------------------------------------------------------------------- presets
@dataclass
class Preset:
    """A validated preset file."""

    name: str  # file stem
    path: Path  # where it was read from
    task: str  # the task it holds defaults for
    description: str | None  # one line for `studio presets list`
    params: dict[str, Any]  # request parameters (model, steps, ...)
    device: dict[str, Any]  # device settings (device, precision, ...)
    doc: YamlDoc  # the parsed file, for `file:line` in later errors

    def flat(self) -> dict[str, Any]:
        return {**self.params, **self.device}


def preset_dirs() -> list[Path]:
    return [user_presets_dir(), PACKAGE_PRESETS]


def find_preset(name: str) -> Path:
    path = Path(str(name)).expanduser()
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for folder in preset_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    known = list_presets()
    raise UsageError(f"unknown preset {name!r}{did_you_mean(name, known)}",
                     "`studio presets list` shows the presets; a path to a .yaml file works too")


def list_presets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(preset_dirs()):  # user presets override shipped ones
        if folder.is_dir():
            for path in sorted(folder.glob("*.y*ml")):
                found[path.stem] = path
    return found


def read_preset(name: str | Path, task: str | None = None, *, check_task_params: bool = True) -> Preset:
    """Find, parse and validate a preset; `task` (when given) must match the preset's task."""
    path = find_preset(str(name))
    doc = read_yaml(path)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise UsageError(f"preset {doc.where()} must be a mapping of keys to values", "see `studio presets show sd-turbo-fast`")
    where = lambda key: doc.where(key)  # noqa: E731
    head = {k: v for k, v in data.items() if k in META_KEYS or k in DEVICE_KEYS}
    check_head(head, where, f"preset {path.name}")
    preset_task = data.get("task")
    if not preset_task:
        raise UsageError(f"preset {path} has no `task:`", "add e.g. `task: image` as its first line")
    if task and preset_task != task:
        raise UsageError(f"preset {path.stem} is for {preset_task}, not {task} ({doc.where('task')})", f"use a {task} preset")
    params = {k: v for k, v in data.items() if k not in head}
    if check_task_params:
        from studio import registry

        try:
            registry.pipeline_class(preset_task)
        except UsageError as exc:
            raise UsageError(f"preset {path.name}: {exc.message} ({doc.where('task')})", exc.hint) from exc
        params = check_params(preset_task, params, where, f"preset {path}")
    device = {k: v for k, v in head.items() if k in DEVICE_KEYS}
    return Preset(name=path.stem, path=path, task=preset_task, description=data.get("description"),
                  params=params, device=device, doc=doc)


def load_preset(name: str, task: str | None = None) -> dict[str, Any]:
    """The preset as a flat dict (task and description removed), validated against `task`."""
    preset = read_preset(name, task)
    out = preset.flat()
    out["__source__"] = str(preset.path)
    return out


def split_device(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request params, device settings) from a flat dict."""
    device = {k: v for k, v in values.items() if k in DEVICE_KEYS}
    params = {k: v for k, v in values.items() if k not in DEVICE_KEYS}
    return params, device


def save_preset(name: str, task: str, values: dict[str, Any], overwrite: bool = False) -> Path:
    import yaml

    from studio.outputs import _jsonable, write_text_file

    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"preset name {name!r} has characters other than {NAME_OK}", "pick a plain name")
    path = user_presets_dir() / f"{name}.yaml"
    # plain YAML types only (tuples and Paths would be written as python tags safe_load rejects)
    body = {"task": task, **{k: _jsonable(v) for k, v in values.items() if v is not None and not k.startswith("__")}}
    return write_text_file(path, yaml.safe_dump(body, sort_keys=False), overwrite=overwrite)
