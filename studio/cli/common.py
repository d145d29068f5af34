"""Shared CLI plumbing: the global options, defined once and applied once, the error handling
all commands share (StudioError, Ctrl-C, SIGTERM, a closed pipe), and output printing. Imports
nothing heavy (a test checks sys.modules).

Every command takes its global options from one decorator. A command that runs a task takes all
of them:

    @app.command()
    @generating
    def image(prompt: Annotated[str, typer.Argument(help=...)], ..., opts: Globals = None):
        run_command("image", {"prompt": prompt, ...}, opts)

and `generating` adds --device, --precision, --attention, --offload, --quantize, --compile,
--seed, --out, --quiet, --json, --debug, --offline, --preset, --save-preset, --allow-pickle,
--trust-remote-code, --server to its signature, then hands them over as one `Globals` object. A command
that needs only some of them names them (`@global_options("device", "precision", *OUTPUT,
"offline")`); --debug comes with every command. A command that gives one of these names its own
meaning (caption's --out FILE, a training run's --seed 0) declares that parameter itself and the
decorator leaves it alone. `apply_globals` is the one place --debug and --offline take effect.
"""

import errno
import functools
import inspect
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer import _click as click  # typer 0.29 vendors click
from typer.exceptions import Abort, Exit  # typer's own exit exceptions (not click's)

from studio.errors import SIGNALLED, RuntimeFailure, StudioError, Terminated

DEBUG = {"on": os.environ.get("STUDIO_DEBUG", "") not in ("", "0")}


@dataclass
class Globals:
    """The global options of one command line; a command that does not take one gets its default."""

    device: Optional[str] = None
    precision: Optional[str] = None
    attention: Optional[str] = None
    offload: Optional[str] = None
    quantize: Optional[str] = None
    compile: Optional[bool] = None
    seed: Optional[int] = None
    out: Optional[Path] = None
    quiet: bool = False
    json: bool = False
    debug: bool = False
    offline: bool = False
    preset: Optional[str] = None
    save_preset: Optional[str] = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    server: Optional[str] = None

    def device_flags(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "attention": self.attention,
                "offload": self.offload, "quantize": self.quantize, "compile": self.compile}

    def run_options(self, task: str, **overrides: Any):
        from studio.engine import RunOptions

        return RunOptions(device=self.device_flags(), out_dir=self.out or default_out_dir(task), quiet=self.quiet,
                          json=self.json, preset=self.preset, save_preset=self.save_preset,
                          allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code,
                          offline=self.offline, **overrides)

    def progress(self):
        """Bars and notes on stderr, none under --quiet or --json."""
        from studio.progress import Progress

        return Progress(enabled=not (self.quiet or self.json))

    def device_manager(self):
        """The DeviceManager these flags ask for (environment < flags), for commands that hold a
        model outside the engine: training."""
        from studio.device import DeviceSettings, get_device_manager

        return get_device_manager(DeviceSettings.from_sources(flags=self.device_flags()))


def default_out_dir(task: str) -> Path:
    return Path(os.environ.get("STUDIO_OUT") or "outputs")


_G = "Global options"
GLOBAL_OPTIONS: list[tuple[str, Any, Any]] = [
    ("device", Annotated[Optional[str], typer.Option(help="auto|cpu|cuda[:N]|mps", rich_help_panel=_G)], None),
    ("precision", Annotated[Optional[str], typer.Option(help="auto|fp32|fp16|bf16", rich_help_panel=_G)], None),
    ("attention", Annotated[Optional[str], typer.Option(help="auto|sdpa|flash|xformers|math|sliced", rich_help_panel=_G)], None),
    ("offload", Annotated[Optional[str], typer.Option(help="none|model|sequential (GPU only)", rich_help_panel=_G)], None),
    ("quantize", Annotated[Optional[str], typer.Option(help="none|int8|int4 weight-only quantisation", rich_help_panel=_G)], None),
    ("compile", Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model", rich_help_panel=_G, show_default=False)], None),
    ("seed", Annotated[Optional[int], typer.Option(help="random seed (recorded in every output)", rich_help_panel=_G)], None),
    ("out", Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default ./outputs)", rich_help_panel=_G)], None),
    ("quiet", Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or notes", rich_help_panel=_G)], False),
    ("json", Annotated[bool, typer.Option("--json", help="print JSON on stdout (one object per output) instead of text", rich_help_panel=_G)], False),
    ("debug", Annotated[bool, typer.Option("--debug", help="show tracebacks", rich_help_panel=_G)], False),
    ("offline", Annotated[bool, typer.Option("--offline", help="never reach the model hub (sets HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE)", rich_help_panel=_G)], False),
    ("preset", Annotated[Optional[str], typer.Option(help="preset name or YAML file with defaults", rich_help_panel=_G)], None),
    ("save_preset", Annotated[Optional[str], typer.Option(help="save these flags as a preset NAME", rich_help_panel=_G)], None),
    ("allow_pickle", Annotated[bool, typer.Option("--allow-pickle", help="allow pickle weights (.bin/.ckpt)", rich_help_panel=_G)], False),
    ("trust_remote_code", Annotated[bool, typer.Option("--trust-remote-code", help="allow a hub repo's own code", rich_help_panel=_G)], False),
    ("server", Annotated[Optional[str], typer.Option(envvar="STUDIO_SERVER", help="run on a `studio serve` at URL (warm models); files are still written here", rich_help_panel=_G, show_default=False)], None),
]
GLOBAL_NAMES = [name for name, _, _ in GLOBAL_OPTIONS]
_DEFAULTS = {name: default for name, _, default in GLOBAL_OPTIONS}

# groups of global options, for commands that take only some of them
DEVICE = ("device", "precision", "attention", "offload", "quantize", "compile")
OUTPUT = ("quiet", "json")
TRUST = ("allow_pickle", "trust_remote_code")


def apply_globals(g: Globals) -> None:
    """Process-wide effects of the global flags, before anything heavy is imported."""
    if g.debug:
        DEBUG["on"] = True
    if g.offline:
        # huggingface_hub reads the first, transformers' older code paths the second
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


def global_options(*names: str) -> Callable[[Callable], Callable]:
    """Add these global options (and --debug) to a command and pass them as `opts: Globals`."""
    unknown = [n for n in names if n not in _DEFAULTS]
    if unknown:
        raise ValueError(f"not a global option: {unknown[0]!r} (one of {', '.join(GLOBAL_NAMES)})")
    chosen = set(names) | {"debug"}

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        # a global the command defines itself (e.g. caption's --out FILE) stays the command's own
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
                 for name, ann, default in GLOBAL_OPTIONS if name in chosen and name not in sig.parameters]
        taken = [p.name for p in extra]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g = Globals(**{**_DEFAULTS, **{name: kwargs.pop(name) for name in taken if name in kwargs}})
            apply_globals(g)
            return fn(*args, **kwargs, opts=g)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        wrapper.__studio_globals__ = tuple(taken)  # type: ignore[attr-defined]  (tests walk the commands)
        del wrapper.__wrapped__  # typer must see the new signature, not the wrapped one
        return wrapper

    return decorate


# a command that runs a task: every global option
generating = global_options(*GLOBAL_NAMES)


def emitter(g: Globals) -> Callable[[dict[str, Any]], None]:
    """How a command reports each output: a JSON line with --json, else a short line on stderr."""
    from studio.engine import print_json

    if g.json:
        return print_json

    def human(summary: dict[str, Any]) -> None:
        if g.quiet:
            return
        if summary.get("path"):
            sys.stderr.write(f"wrote {summary['path']}" + (f" (seed {summary['seed']})" if summary.get("seed") is not None else "") + "\n")

    return human


def run_command(task: str, params: dict[str, Any], g: Globals, **run_overrides: Any) -> list[Any]:
    """The whole body of a thin generating command: params -> Engine -> written outputs."""
    if g.seed is not None and "seed" not in params:
        params = {**params, "seed": g.seed}
    return engine_for(g, g.run_options(task, **run_overrides), emit=emitter(g)).run(task, params)


def engine_for(g: Globals, options: Any, progress: Any = None, emit: Any = None) -> Any:
    """An Engine, or with --server URL (STUDIO_SERVER) a RemoteEngine: the same run on a `studio
    serve`'s warm models, its files written here as the Engine would write them."""
    from studio.engine import Engine

    if g.server:
        from studio.server.client import RemoteEngine

        return RemoteEngine(g.server, options, progress=progress or g.progress(), emit=emit)
    return Engine(options, progress=progress, emit=emit)


def fail(message: str, hint: str | None = None, code: int = 2) -> None:
    from studio.errors import StudioError as _E

    err = _E(message, hint)
    err.exit_code = code
    raise err


def print_error(exc: StudioError) -> None:
    sys.stderr.write(f"error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")


def _on_sigterm(signum: int, frame: Any) -> None:
    # remembered as well as raised: a library may turn the interrupt into its own error on the
    # way up (an import that fails half-way reads as "could not load the model"), and that error
    # must still end as a SIGTERM, not as bad input; or swallow it (errors.SIGNALLED)
    SIGNALLED["exc"] = Terminated
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    # Ctrl-C, remembered for the same reasons: under load it lands inside diffusers' lazy imports,
    # which re-raise it as "Failed to import ..." (exit 2) or "cannot load module more than once" (1)
    SIGNALLED["exc"] = KeyboardInterrupt
    raise KeyboardInterrupt()


def _silence_stdout() -> None:
    """The reader of our stdout is gone (`| head`): point fd 1 at /dev/null so the interpreter's
    last flush at exit does not raise BrokenPipeError again (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # in-process runners have no real fd 1
        pass


def _exit_code(exc: BaseException) -> int | None:
    """Say how `exc` ends the command (one line on stderr) and return the exit code, or None to
    let it propagate (typer's own exits; anything under --debug)."""
    if SIGNALLED["exc"] is Terminated:
        sys.stderr.write("interrupted (SIGTERM)\n")
        return 143
    if isinstance(exc, (Exit, Abort, click.exceptions.ClickException, SystemExit)):
        return None
    if isinstance(exc, KeyboardInterrupt) or SIGNALLED["exc"] is KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    if isinstance(exc, BrokenPipeError):
        _silence_stdout()
        return 1
    if not isinstance(exc, Exception) or DEBUG["on"]:
        return None
    if isinstance(exc, StudioError):
        print_error(exc)
        return exc.exit_code
    from studio.outputs import _no_space, disk_full_error

    full = _no_space(exc)
    if full is not None:  # a full disk, quota or file size limit met outside the writer (torch.save, a cache)
        name = getattr(full, "filename", None)
        print_error(disk_full_error(full, Path(str(name))) if name else
                    RuntimeFailure(f"a write failed: {os.strerror(full.errno or errno.ENOSPC)}",
                                   "free some space or pass --out on another disk"))
        return 1
    # a bug or a library failure: one line unless --debug
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    sys.stderr.write(f"error: {type(exc).__name__}: {first}\n"
                     "hint: rerun with --debug for the traceback, and report it if it looks like a bug\n")
    return 1


class StudioGroup(typer.core.TyperGroup):
    """The root group: turns StudioError into one line + hint and its exit code (2 bad input,
    1 runtime), anything unexpected into exit 1, with tracebacks only under --debug; Ctrl-C
    (130) and SIGTERM (143) into one line after the same cleanup; a closed stdout pipe into a
    quiet exit 1, the code click (help) and rich (tables) already end a closed pipe with."""

    def invoke(self, ctx: click.Context) -> Any:
        previous = previous_int = None
        if threading.current_thread() is threading.main_thread():
            SIGNALLED["exc"] = None
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
                previous_int = signal.signal(signal.SIGINT, _on_sigint)
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            code = _exit_code(exc)
            if code is None:
                raise
            raise Exit(code) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if previous_int is not None:
                signal.signal(signal.SIGINT, previous_int)


def new_app(help: str, **kwargs: Any) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=kwargs.pop("no_args_is_help", True), add_completion=False,
                       rich_markup_mode="rich", pretty_exceptions_enable=False, **kwargs)
