"""Progress for long work: rich bars on stderr, bridged to diffusers' `callback_on_step_end` and
transformers' streamers. `Progress(enabled=False)` (--quiet, --json) keeps the same API and shows
nothing, so pipelines never check flags."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, Callable, Iterator

from studio.errors import raise_if_signalled

# A library warning longer than this is cut: diffusers' "The following part of your input was
# truncated because CLIP can only handle sequences up to 77 tokens: [...]" echoes the whole rest of
# a 10,000-character prompt, which buries everything else on the terminal.
MAX_MESSAGE_CHARS = 300


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}... [{len(text) - limit:,} more characters]"


class _StudioHandler(logging.Handler):
    """studio's own log lines as `warning: ...` on the stderr of the moment (a test runner's or
    rich's redirect included), the way errors print as `error: ...`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.levelname.lower()}: {shorten(record.getMessage())}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """Once per process: studio's `warning:` lines, and every library's warnings (log records and
    warnings.warn) cut to MAX_MESSAGE_CHARS. A record factory rather than a handler filter,
    because diffusers and transformers add their own handlers lazily, each on its own logger."""
    previous = logging.getLogRecordFactory()
    if not getattr(previous, "_studio_shortens", False):
        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if record.levelno >= logging.WARNING:
                with contextlib.suppress(Exception):  # a malformed record stays the library's problem
                    message = record.getMessage()
                    if len(message) > MAX_MESSAGE_CHARS:
                        record.msg, record.args = shorten(message), None
            return record

        factory._studio_shortens = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
    format_warning = warnings.formatwarning
    if not getattr(format_warning, "_studio_shortens", False):
        def formatwarning(message: Any, *args: Any, **kwargs: Any) -> str:
            return format_warning(shorten(str(message)), *args, **kwargs)

        formatwarning._studio_shortens = True  # type: ignore[attr-defined]
        warnings.formatwarning = formatwarning
    logger = logging.getLogger("studio")
    if not any(isinstance(h, _StudioHandler) for h in logger.handlers):
        logger.addHandler(_StudioHandler(logging.WARNING))
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-tensor loading bar and config warnings while loading: studio
    shows its own progress, and the bar would print even under --quiet."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While loading diffusers models: no diffusers/transformers progress bars or info/warning
    lines (studio shows its own "loading" line; their bars and dtype notices would interleave with
    it on stderr). Here, not in one pipeline, because image and control loading both need it."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


class TaskHandle:
    """One bar. `advance()` per step; `update(**fields)` for extra columns (loss, lr, ...)."""

    def __init__(self, progress: "Progress", task_id: Any):
        self._p = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        raise_if_signalled()  # a Ctrl-C or SIGTERM that a library swallowed ends the run here
        if self._p._rich is not None:
            self._p._rich.advance(self._id, n)

    def update(self, description: str | None = None, **fields: Any) -> None:
        if self._p._rich is not None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            kwargs: dict[str, Any] = {"info": info}
            if description is not None:
                kwargs["description"] = description
            self._p._rich.update(self._id, **kwargs)

    def set_total(self, total: float) -> None:
        if self._p._rich is not None:
            self._p._rich.update(self._id, total=total)

    def finish(self) -> None:
        if self._p._rich is not None:
            task = self._p._rich.tasks[[t.id for t in self._p._rich.tasks].index(self._id)]
            self._p._rich.update(self._id, completed=task.total or task.completed)


class Progress:
    def __init__(self, enabled: bool = True, console: Any = None):
        setup_logging()
        self.enabled = enabled and console is not False
        self._console = console
        self._rich = None
        self._depth = 0

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def __enter__(self) -> "Progress":
        self._depth += 1
        return self

    def _start(self) -> None:
        # started on the first bar, so a run that fails in its checks prints nothing but the error
        if self.enabled and self._rich is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self.console, transient=False,
            )
            self._rich.start()

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._rich is not None:
            self._rich.stop()
            self._rich = None

    def task(self, description: str, total: float | None = None) -> TaskHandle:
        if self._depth > 0:
            self._start()
        if self._rich is None:
            return TaskHandle(self, None)
        return TaskHandle(self, self._rich.add_task(description, total=total, info=""))

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        handle = self.task(text, total=None)
        try:
            yield
        finally:
            if self._rich is not None:
                self._rich.update(handle._id, total=1, completed=1)

    def note(self, text: str) -> None:
        """A one-line notice (auto picks, conversions). Shown unless quiet."""
        if self.enabled:
            self.console.print(f"[yellow]note:[/] {text}", highlight=False)

    # -------------------------------------------------------------- library bridges
    def diffusers_callback(self, handle: TaskHandle, extra: Callable | None = None) -> Callable:
        """A `callback_on_step_end` that advances `handle` once per denoising step."""

        def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            handle.advance(1)
            if extra is not None:
                extra(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        return callback

    def streamer(self, tokenizer: Any, on_text: Callable[[str], None] | None = None,
                 handle: TaskHandle | None = None, skip_prompt: bool = True) -> Any:
        """A transformers streamer: decoded text goes to `on_text` as it comes; `handle` advances
        per generated token."""
        from transformers.generation.streamers import TextStreamer

        class _Streamer(TextStreamer):
            def put(self, value):  # value: (B, T) token ids
                if handle is not None and not (self.skip_prompt and self.next_tokens_are_prompt):
                    handle.advance(value.shape[-1] if value.ndim > 1 else 1)
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if on_text is not None:
                    on_text(text)
                else:
                    sys.stdout.write(text)
                    sys.stdout.flush()

        return _Streamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
