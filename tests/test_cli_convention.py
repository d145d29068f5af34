"""One CLI convention: every command takes its global options (--debug, --offline, --quiet,
--json, the device flags, ...) from the one decorator in studio/cli/common.py, so each reads and
behaves the same everywhere; and every command ends the same way when the user stops it (Ctrl-C,
SIGTERM) or stops reading its output (`| head`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STUDIO = [sys.executable, "-m", "studio"]
# a command may give these names a meaning of its own (caption's --out FILE, a training run's
# folder, a training seed that defaults to 0); every other global name means one thing everywhere
OWN_MEANING = {"out", "seed"}
# commands that load a model: where --device and --offline apply, they must be there
LOADS_A_MODEL = ["image", "caption", "vqa", "code", "run", "replay", "clip train", "clip eval", "clip embed",
                 "clip search", "music midi", "music audio", "music train", "video generate", "adapt train",
                 "eval caption", "eval clip", "eval code", "eval image"]


def commands() -> dict[str, object]:
    """'clip eval' -> its click command, for every command `studio` has."""
    from typer.main import get_command

    from studio.cli import app

    found: dict[str, object] = {}

    def walk(cmd: object, path: list[str]) -> None:
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, path + [name])
        else:
            found[" ".join(path)] = cmd

    walk(get_command(app), [])
    return found


def shared_options() -> dict[str, object]:
    """The global options as `generating` defines them: name -> click option."""
    import typer
    from typer.main import get_command

    from studio.cli.common import generating

    probe = typer.Typer()

    @probe.command()
    @generating
    def everything(opts=None):
        pass

    return {p.name: p for p in get_command(probe).params}


def test_every_command_takes_the_global_options_from_the_one_decorator():
    shared = shared_options()
    flags = {flag: name for name, p in shared.items() for flag in p.opts + p.secondary_opts}
    found = commands()
    assert len(found) >= 40 and "clip eval" in found and "models list" in found
    for path, cmd in found.items():
        taken = getattr(cmd.callback, "__studio_globals__", None)
        assert taken is not None, f"`studio {path}` does not take its options from global_options"
        params = {p.name: p for p in cmd.params}
        assert "debug" in params, f"`studio {path}` has no --debug"
        for name in taken:  # the decorator's: the same flags and words as everywhere else
            p, want = params[name], shared[name]
            assert (p.opts, p.secondary_opts, p.help, p.default) == (want.opts, want.secondary_opts, want.help, want.default), (path, name)
        for p in cmd.params:  # nothing of the command's own wears a global option's flag
            clash = {flags[f] for f in p.opts + p.secondary_opts if f in flags} - set(taken)
            assert not clash or p.name in OWN_MEANING, f"`studio {path}` defines its own {p.opts} beside the global one"
    for path in LOADS_A_MODEL:
        params = {p.name for p in found[path].params}
        assert {"device", "precision", "offline"} <= params, f"`studio {path}` loads a model but lacks device/offline flags"


@pytest.mark.parametrize("path", ["models list", "clip eval", "music render", "adapt info", "eval code", "image"])
def test_help_lists_the_global_options_in_one_panel_with_the_same_words(cli, path):
    r = cli(*path.split(), "--help")
    assert r.exit_code == 0, r
    text = r.stdout
    assert "Global options" in text
    panel = text[text.index("Global options"):]
    assert "--debug" in panel and "show tracebacks" in panel
    for flag in ("--quiet", "--json", "--offline"):
        assert flag not in text or flag in panel, f"{path}: {flag} outside the global panel"


def test_offline_sets_both_hub_variables_on_every_kind_of_command(cli, monkeypatch, tmp_path):
    folder = tmp_path / "a-model-folder"
    folder.mkdir()
    runs = [
        ("models", "info", folder, "--offline"),  # a model command that succeeds
        ("image", "--offline"),  # a generating command that stops at bad input
        ("adapt", "train", "--base", folder, "--data", "nowhere", "--task", "nonsense", "-o", "x", "--offline"),
    ]
    for args in runs:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        r = cli(*args)
        assert r.exit_code in (0, 2), r
        assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1", args
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert cli("models", "info", folder).exit_code == 0
    assert "TRANSFORMERS_OFFLINE" not in os.environ  # only the flag sets them


def test_debug_shows_the_traceback_on_commands_that_had_no_debug_flag(cli):
    quiet = cli("models", "info", "no-such-model")
    assert quiet.exit_code == 2 and quiet.stderr.startswith("error: unknown model") and "Traceback" not in quiet.output
    loud = cli("models", "info", "no-such-model", "--debug")
    assert loud.exit_code != 0 and type(loud.exception).__name__ == "UsageError"  # raised, not turned into one line


def test_every_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from typer.testing import CliRunner\n"
        "from studio.cli import app\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_cli_convention import commands\n"
        "r = CliRunner()\n"
        "paths = list(commands())\n"
        "for path in paths:\n"
        "    res = r.invoke(app, path.split() + ['--help'])\n"
        "    assert res.exit_code == 0, (path, res.output)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'numpy') if m in sys.modules]\n"
        "print(len(paths), ','.join(heavy) or '-', round(time.perf_counter() - t, 3))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, heavy, seconds = out.stdout.split()
    assert int(n) >= 40
    assert heavy == "-", f"--help imported {heavy}"
    assert float(seconds) < 30.0  # every command's help in one process: ~2 s idle; generous for a loaded box


# --------------------------------------------------------------------------- how a run ends
def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}: {path.read_text(errors='replace')}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "interrupted (SIGTERM)"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_ends_a_run_like_ctrl_c_one_line_and_no_temp_file(tiny, tmp_path, sig, code, line):
    """A run stopped mid-way by a service manager (SIGTERM) or by the user (Ctrl-C): one line,
    the conventional exit code, no traceback, and nothing half-written in --out."""
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        # --save-preset prints its note just before the model loads: from then on the run is under way
        proc = subprocess.Popen(STUDIO + ["image", "a red circle", "--model", str(tiny("sd")), "--steps", "5000",
                                          "--width", "64", "--height", "64", "--out", str(out), "--save-preset", "sig"],
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
                                # a shell's background job ignores SIGINT; Ctrl-C at a terminal is not ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for(err, "saved preset", proc)
        time.sleep(1.0)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    text = err.read_text()
    # the shell sees 128 + signal either way: exit(130/143), or (Ctrl-C) Python ending the process by
    # the signal itself after the same cleanup and line, as it does when a KeyboardInterrupt once
    # left a C-level eval on the way (pybind11 code in torch), and as a well-behaved Unix program may
    assert proc.returncode == code or (sig == signal.SIGINT and proc.returncode == -sig), text
    assert text.rstrip("\n").splitlines()[-1] == line, text
    assert "Traceback" not in text and "error:" not in text
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [n for n in left if ".tmp" in n or n.endswith(".png")], left


@pytest.mark.parametrize("args", [["models", "list", "--json"], ["presets", "list", "--json"], ["clip", "eval", "--help"],
                                  ["--help"], ["models", "list"]])
def test_a_closed_pipe_ends_quietly(args):
    """`studio ... | head -1`: the reader goes away; studio stops without a BrokenPipeError."""
    proc = subprocess.Popen(STUDIO + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before studio writes its first line
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert stderr == "", stderr
    assert proc.returncode == 1  # what click (help) and rich (tables) end a closed pipe with


def test_head_takes_the_first_line_and_studio_stays_quiet(tmp_path):
    r = subprocess.run(f"{sys.executable} -m studio models list --json | head -1", shell=True, capture_output=True,
                       text=True, timeout=60)
    assert r.stderr == "" and r.stdout.count("\n") == 1 and r.stdout.startswith('{"name": ')


def test_each_command_word_names_the_module_that_defines_it():
    """`studio WORD ...` imports only COMMAND_OWNERS[WORD]: the table must match what each module registers."""
    import typer

    from studio import cli

    registered: dict[str, set[str]] = {}
    for module in cli.COMMAND_MODULES:
        group = typer.main.get_command(cli.make_app([module]))
        registered[module] = set(getattr(group, "commands", {}))
    for module, words in registered.items():
        for word in words - {"eval"}:
            assert cli.COMMAND_OWNERS.get(word) == module, f"`studio {word}` comes from {module}; COMMAND_OWNERS says {cli.COMMAND_OWNERS.get(word)}"
    every = set().union(*registered.values())
    assert set(cli.COMMAND_OWNERS) | {"eval"} == every
    assert cli.modules_for(["image", "a cat"]) == ["studio.cli.image"]
    assert cli.modules_for(["eval", "caption"]) is None and cli.modules_for(["--help"]) is None
