"""The Python API: the same tasks as the CLI, through the same engine.

    from studio import Studio
    st = Studio(device="cpu", out_dir="outputs")
    images = st.image(prompt="a lighthouse at dusk", steps=4, seed=1)   # list[Result], written
    text = st.run("caption", images=["photo.jpg"], write=False)[0].value

Each method name is a task (`music_midi` is the task `music-midi`); keyword arguments are the
task's request fields. Results carry `.path` once written and `.metadata`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.engine import Engine, RunOptions
from studio.progress import Progress


class Studio:
    def __init__(self, *, device: str | None = None, precision: str | None = None, attention: str | None = None,
                 offload: str | None = None, quantize: str | None = None, compile: bool | None = None,
                 out_dir: str | Path = "outputs", progress: bool = False, offline: bool = False,
                 allow_pickle: bool = False, trust_remote_code: bool = False, overwrite: bool = False):
        self.options = RunOptions(
            device={"device": device, "precision": precision, "attention": attention, "offload": offload,
                    "quantize": quantize, "compile": compile},
            out_dir=Path(out_dir), quiet=not progress, offline=offline, allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code, overwrite=overwrite)
        self.engine = Engine(self.options, progress=Progress(enabled=progress))

    def run(self, task: str, *, preset: str | None = None, write: bool = True, **params: Any) -> list[Any]:
        """Run `task` with request fields `params`; returns the Results (written unless write=False)."""
        from dataclasses import replace

        options = replace(self.options, preset=preset, write=write)
        return self.engine.run(task, params, options=options)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        task = name.replace("_", "-")

        def call(**params: Any) -> list[Any]:
            return self.run(task, **params)

        call.__name__ = name
        return call
