"""The `studio` command: one root Typer app; each command group lives in its own module and
registers itself here through `register(app)`. Nothing heavy is imported at this level."""

import importlib
import sys

import typer

from studio import __version__
from studio.cli.common import StudioGroup

# command modules, in the order `studio --help` lists them
COMMAND_MODULES = [
    "studio.cli.image",
    "studio.cli.upscale",
    "studio.cli.caption",
    "studio.cli.clip",
    "studio.cli.music",
    "studio.cli.video",
    "studio.cli.code",
    "studio.cli.batch",
    "studio.cli.adapt",
    "studio.cli.starter",
    "studio.cli.eval",
    "studio.cli.evals",
    "studio.cli.models",
    "studio.cli.doctor",
    "studio.cli.replay",
    "studio.cli.serve",
]

# The first word after `studio` -> the one module that defines it. A run imports only that module
# (importing and registering all sixteen cost a tenth of a second of every `studio image`);
# `--help`, an unknown word and `eval` (whose subcommands come from several modules) import all.
# tests/test_cli_convention.py checks this table against what each module registers.
COMMAND_OWNERS = {
    "image": "studio.cli.image", "control": "studio.cli.image", "upscale": "studio.cli.upscale",
    "caption": "studio.cli.caption", "vqa": "studio.cli.caption", "clip": "studio.cli.clip",
    "music": "studio.cli.music", "video": "studio.cli.video", "code": "studio.cli.code",
    "run": "studio.cli.batch", "validate": "studio.cli.batch", "presets": "studio.cli.batch",
    "adapt": "studio.cli.adapt", "data": "studio.cli.starter", "train": "studio.cli.starter",
    "models": "studio.cli.models", "doctor": "studio.cli.doctor", "replay": "studio.cli.replay",
    "serve": "studio.cli.serve",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"studio {__version__}")
        raise typer.Exit()


def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    """studio: generate and analyse images, music, video and code from the shell."""


def make_app(modules: list[str] | None = None) -> typer.Typer:
    """The root app with the commands of `modules` (all of them when None)."""
    app = typer.Typer(
        name="studio",
        help="A multimodal generation studio: images, captions, CLIP, music, video and code from open models.",
        cls=StudioGroup,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
    )
    app.callback()(root)
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(app)
    return app


def modules_for(argv: list[str]) -> list[str] | None:
    """The command modules a command line needs (None: all)."""
    word = argv[0] if argv else ""
    owner = COMMAND_OWNERS.get(word)
    return [owner] if owner else None


_APP: list[typer.Typer] = []


def __getattr__(name: str):
    if name == "app":  # `from studio.cli import app`: every command (tests, CliRunner, scripts)
        if not _APP:
            _APP.append(make_app())
        return _APP[0]
    raise AttributeError(name)


def main() -> None:
    try:
        make_app(modules_for(sys.argv[1:]))(prog_name="studio")
    except KeyboardInterrupt:  # Ctrl-C before or after a command's own handling (start-up, exit)
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
