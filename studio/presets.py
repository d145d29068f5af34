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
Files are read through studio/yamlfile.py (`read_yaml`, `YamlDoc.where`), shared with batch files and
model cards, which bounds every file before it is built (size, values after alias expansion, nesting).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass
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


# YAML with line numbers and bounds: studio/yamlfile.py (batch files and model cards read it too)
from studio.yamlfile import YamlDoc, read_yaml  # noqa: E402


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
