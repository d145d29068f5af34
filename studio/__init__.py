"""studio: a multimodal generation studio for the shell.

`from studio import Studio` gives scripts the same tasks as the CLI. This module imports nothing
heavy: torch and the model libraries load only when a task runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Studio", "StudioError", "UsageError", "__version__"]

import logging as _logging

from studio.errors import StudioError, UsageError

# Version-skew noise printed on every import (torch 2.14 deprecates a torchao registration;
# diffusers 0.42 looks for torchao classes 0.18 moved). Neither affects studio: keep it off
# the user's terminal. Set here because they fire at import time, before any pipeline runs.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def __getattr__(name: str):
    if name == "Studio":
        from studio.api import Studio

        return Studio
    raise AttributeError(name)
