"""Shared fixtures: an isolated STUDIO_HOME and output folder per test, the hub kept offline,
tiny models built once per session through the same builders `studio models make-tiny` uses,
and an in-process CLI runner (a subprocess pays ~5 s of torch import on this machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "studio_home"
    home.mkdir()
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("STUDIO_DEVICE", raising=False)
    monkeypatch.delenv("STUDIO_PRECISION", raising=False)
    monkeypatch.delenv("STUDIO_SERVER", raising=False)  # a developer's own server must not take the tests' jobs
    monkeypatch.delenv("STUDIO_SERVER_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core machine: one torch thread avoids OpenMP contention (up to 10x faster
    under load). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny("sd") -> folder of a tiny random model of that kind, built once per session."""
    from studio.pipelines.tiny import make_tiny

    built: dict[tuple[str, int], Path] = {}

    def get(kind: str, seed: int = 0) -> Path:
        if (kind, seed) not in built:
            built[(kind, seed)] = make_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}") / "model", seed=seed)
        return built[(kind, seed)]

    return get


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.output = result.output
        self.exception = result.exception

    def __repr__(self) -> str:
        return f"<exit {self.exit_code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}>"


@pytest.fixture
def cli():
    """cli("image", "a cat", "--steps", "2") -> result with exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from studio.cli import app
    from studio.cli.common import DEBUG

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        DEBUG["on"] = False
        return CliResult(runner.invoke(app, [str(a) for a in args], input=input))

    return invoke
