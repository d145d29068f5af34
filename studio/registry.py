"""Task name -> pipeline class, as import strings, so naming a task imports nothing heavy.

Built-in tasks are registered the same way third-party ones are (simonw/llm's habit): a string
"module:Class". Other packages add tasks through the `studio.tasks` entry-point group. Loaded
pipelines are cached by (task, model spec, device settings) for the life of the process, so a
batch or multi-step pipeline file loads each model once.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from studio.errors import UsageError

BUILTIN_TASKS: dict[str, str] = {
    "image": "studio.pipelines.image:ImagePipeline",
    "caption": "studio.pipelines.caption:Captioner",
    "vqa": "studio.pipelines.caption:VQA",
    "clip-embed": "studio.pipelines.clip:ClipEmbedder",
    "music-midi": "studio.pipelines.music_symbolic:MidiGenerator",
    "music-audio": "studio.pipelines.music_audio:MusicGenerator",
    "video": "studio.pipelines.video:VideoPipeline",
    "code": "studio.pipelines.code:CodeGenerator",
    "mux": "studio.pipelines.mux:Mux",
    "video-interpolate": "studio.pipelines.interpolate:Interpolator",
    "music-render": "studio.pipelines.music_render:MidiRenderer",
    "upscale": "studio.pipelines.upscale:UpscalePipeline",
}


_ENTRY_POINT_TASKS: list[tuple[str, str]] = []  # read once per process: scanning every
_SCANNED: list[bool] = []  # installed package's metadata costs ~0.1 s, on every Engine.run


def tasks() -> dict[str, str]:
    found = dict(BUILTIN_TASKS)
    if not _SCANNED:
        try:
            from importlib.metadata import entry_points

            _ENTRY_POINT_TASKS.extend((ep.name, ep.value) for ep in entry_points(group="studio.tasks"))
        except Exception:  # broken third-party metadata must not break studio
            pass
        _SCANNED.append(True)
    for name, value in _ENTRY_POINT_TASKS:
        found.setdefault(name, value)
    # STUDIO_EXTRA_TASKS="name=module:Class,...": tasks from code that is not an installed package
    # (a script, a test, every worker `accelerate launch` starts), without entry points
    for item in os.environ.get("STUDIO_EXTRA_TASKS", "").split(","):
        name, sep, target = item.strip().partition("=")
        if sep and name.strip() and ":" in target:
            found.setdefault(name.strip(), target.strip())
    return found


def import_string(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def pipeline_class(task: str) -> type:
    if task in BUILTIN_TASKS:  # built-ins win over entry points anyway: no metadata scan for them
        return import_string(BUILTIN_TASKS[task])
    known = tasks()
    if task not in known:
        raise UsageError(f"unknown task {task!r}", f"tasks: {', '.join(sorted(known))}")
    return import_string(known[task])


def resolve_model(task: str, name: str, **options: Any) -> Any:
    """What the user typed as a model -> the spec `task`'s pipeline loads: studio.models.resolve
    (alias, hub id, folder, file), unless the pipeline names its models its own way and says so
    with a `resolve_model` classmethod taking the same arguments (clip-embed: open_clip's
    ARCH@TAG). A plugin's pipeline may do the same. `options`: allow_pickle, trust_remote_code,
    offline, as studio.models.resolve takes them."""
    from studio import models

    cls = pipeline_class(task)
    resolve = getattr(cls, "resolve_model", None) or models.resolve
    return resolve(name, task=getattr(cls, "task", task), **options)


_LOADED: dict[tuple, Any] = {}


def load_pipeline(task: str, spec: Any, device: Any, progress: Any = None) -> Any:
    """Load (or reuse) the pipeline for `task` on `spec` with `device`'s settings."""
    key = (task, spec, getattr(device, "settings", None))  # no device for a task that loads no model
    if key not in _LOADED:
        cls = pipeline_class(task)
        if progress is not None and spec is not None:
            with progress.status(f"loading {spec.alias or spec.name}"):
                _LOADED[key] = cls.load(spec, device)
        else:
            _LOADED[key] = cls.load(spec, device)
    return _LOADED[key]


def clear_cache() -> None:
    _LOADED.clear()


def loaded_keys() -> set[tuple]:
    """Keys of the pipelines loaded in this process (a batch run frees those it is done with)."""
    return set(_LOADED)


def unload(keys: Any) -> int:
    """Drop these loaded pipelines from the cache so their memory can be freed; returns how many."""
    return sum(_LOADED.pop(key, None) is not None for key in list(keys))
