"""The `studio` command: one root Typer app; each command group lives in its own module and
registers itself here through `register(app)`. Nothing heavy is imported at this level."""

import importlib
import sys

import typer

from studio import __version__
from studio.cli.common import StudioGroup

app = typer.Typer(
    name="studio",
    help="A multimodal generation studio: images, captions, CLIP, music, video and code from open models.",
    cls=StudioGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"studio {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    """studio: generate and analyse images, music, video and code from the shell."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app(prog_name="studio")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
