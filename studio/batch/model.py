"""The units a batch file becomes: Jobs (with the Refs of a step), and the Outputs a finished job
leaves. Plain data; parse.py makes Jobs, graph.py orders them, runner.py runs them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    task: str  # registry task name
    params: dict[str, Any]  # request params (`defaults:` < the job's own); refs unresolved
    device: dict[str, Any]  # device settings from the file (`defaults:` < the job's own)
    preset: str | None  # preset name or path
    where: str  # file:line of the job (for messages)
    is_step: bool = False  # part of `steps:` (may read other steps' outputs)
    refs: list[Ref] = field(default_factory=list)  # references into earlier steps
    model: str | None = "auto"  # the model it will load (for grouping); None: the task loads none
    component: int = 0  # jobs of one component (a pipeline's connected steps) run in one process
    request_type: Any = field(default=None, repr=False)  # the task's Request class (steps: for type checks)

    @property
    def needs(self) -> list[str]:
        return sorted({r.step for r in self.refs})

    @property
    def group(self) -> str:
        """Jobs with the same group share a loaded model and run back to back."""
        return json.dumps([self.task, self.model, self.preset, sorted(self.device.items())], default=str)


@dataclass
class Output:
    """One finished output of a job: what later steps read and what resume verifies."""

    kind: str  # image | text | audio | video | midi | json | file
    path: Path  # the written file (or frames folder), inside the output folder
    sha256: str | None  # of the file (None for a folder)
    text: str | None = None  # the text itself, for text outputs

    def read_text(self) -> str:
        if self.text is None:
            self.text = self.path.read_text(encoding="utf-8")
        return self.text
