"""Errors a user sees: one line saying what is wrong, one hint saying what to change.

Exit codes: 0 ok, 1 runtime failure (the model crashed, a disk filled), 2 bad input (a flag, a
file, a model name the user can fix). The CLI prints `error: message` and `hint: hint`, and a
traceback only with --debug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class StudioError(Exception):
    """A failure with a message and a hint for the user. Runtime failures exit 1."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, hint after it
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(StudioError):
    """Bad input the user can fix: a flag value, a missing file, an unknown name. Exits 2."""

    exit_code = EXIT_USAGE


class ModelNotAvailable(UsageError):
    """A model that cannot be found locally (offline) or on the hub."""


class BackendUnavailable(UsageError):
    """A requested device, precision, attention or quantisation backend that is not here."""


class InputFileError(UsageError):
    """An input file that is missing, unreadable or not of the expected kind."""


class RuntimeFailure(StudioError):
    """Something went wrong while running a model. Exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so every `finally` and
    context manager (temp files, progress bars, the manifest) cleans up the same way."""


# The interrupt a signal handler raised, kept until the command ends: an exception raised from a
# signal handler lands wherever the main thread happens to be, and some places swallow it (seen
# here: SIGTERM during model loading, after which the run went on denoising for minutes). Every
# progress step calls raise_if_signalled(), so a swallowed interrupt surfaces at the next step.
SIGNALLED: dict[str, type[BaseException] | None] = {"exc": None}


def raise_if_signalled() -> None:
    exc = SIGNALLED["exc"]
    if exc is not None:
        raise exc()
