"""studio: a multimodal generation studio for the shell.

`from studio import Studio` gives scripts the same tasks as the CLI. This module imports nothing
heavy: torch and the model libraries load only when a task runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Studio", "StudioError", "UsageError", "__version__"]

from studio.errors import StudioError, UsageError


def __getattr__(name: str):
    if name == "Studio":
        from studio.api import Studio

        return Studio
    raise AttributeError(name)
