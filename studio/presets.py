"""Presets: YAML data holding defaults for one task.

    # presets/sd-turbo-fast.yaml
    task: image
    description: one-step previews on sd-turbo
    model: sd-turbo
    steps: 1
    guidance: 0.0
    precision: fp16          # device keys (device, precision, attention, offload, quantize, compile)

Keys other than task/description/device keys are request parameters of the task; the engine
rejects any the task does not know, naming the key and the file. Merge order: the request's
defaults < the model card's defaults < the preset < command-line flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.device import ENV as DEVICE_KEYS
from studio.errors import UsageError
from studio.paths import PACKAGE_PRESETS, user_presets_dir

META_KEYS = {"task", "description"}


def preset_dirs() -> list[Path]:
    return [user_presets_dir(), PACKAGE_PRESETS]


def find_preset(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for folder in preset_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name}{suffix}"
            if candidate.exists():
                return candidate
    raise UsageError(f"unknown preset {name!r}", "`studio presets list` shows the presets")


def list_presets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(preset_dirs()):  # user presets override shipped ones
        if folder.is_dir():
            for path in sorted(folder.glob("*.y*ml")):
                found[path.stem] = path
    return found


def load_preset(name: str, task: str | None = None) -> dict[str, Any]:
    """The preset as a flat dict (task and description removed), checked against `task`."""
    import yaml

    path = find_preset(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"preset {where} is not valid YAML", "fix the file's indentation and quoting") from exc
    if not isinstance(data, dict):
        raise UsageError(f"preset {path} must be a mapping of keys to values", "see `studio presets show sd-turbo-fast`")
    preset_task = data.get("task")
    if task and preset_task and preset_task != task:
        raise UsageError(f"preset {name} is for {preset_task}, not {task}", f"use a {task} preset")
    out = {k: v for k, v in data.items() if k not in META_KEYS}
    out["__source__"] = str(path)
    return out


def split_device(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request params, device settings) from a flat dict."""
    device = {k: v for k, v in values.items() if k in DEVICE_KEYS}
    params = {k: v for k, v in values.items() if k not in DEVICE_KEYS}
    return params, device


def save_preset(name: str, task: str, values: dict[str, Any], overwrite: bool = False) -> Path:
    import yaml

    from studio.outputs import write_text_file

    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"preset name {name!r} has characters other than letters, digits, - and _", "pick a plain name")
    path = user_presets_dir() / f"{name}.yaml"
    body = {"task": task, **{k: v for k, v in values.items() if v is not None and not k.startswith("__")}}
    return write_text_file(path, yaml.safe_dump(body, sort_keys=False), overwrite=overwrite)
