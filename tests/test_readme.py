"""README.md's examples run as written (the project's rule: "keep README accurate: its examples
are run").

Every ```bash block of README.md is read in order and split into commands (a line, its `\\`
continuations, a heredoc). A command whose trailing comment says it needs what a test machine
lacks (`# needs the hub`, `# needs a GPU`, `# needs GPUs`, `# needs network`, `# needs a cluster`,
`# needs a running server`, `# needs hours`) or that does not end by itself (`# runs until
Ctrl-C`) is skipped; a documented exit code (`# exits 1`) is the one expected; every other
command must exit 0.

- test_every_studio_command_line_parses (fast): every `studio ...` in a bash block (also after
  `&&`, `|`, `do`, and `torchrun/accelerate ... -m studio`) names commands that exist, options
  those commands have, option values where an option takes one, and no more positional
  arguments than the command takes; inline `studio ...` code spans in the prose name existing
  commands and options.
- test_readme_runs_as_written (slow, a long while on 2 CPU cores): the commands run one after
  another in a fresh working folder (with the repository's examples/ copied in), `/tmp/` rewritten
  to a per-test folder, a fresh STUDIO_HOME and HF_HOME, HF_HUB_OFFLINE=1. A plain `studio ...`
  command runs in process (a subprocess pays ~5 s of imports, 200 times); anything with shell
  syntax runs in bash with the venv first on PATH. README_SUBPROCESS=1 runs every command in
  bash; README_FROM=N / README_UNTIL=N run only the commands starting between README lines N and
  M (what they read must then be there already: README_WORK=DIR keeps one working folder).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# what a command may need that a test machine lacks, said in its trailing comment
NEEDS = re.compile(r"#[^\n]*?\b(?:needs (the hub|a GPU|GPUs|network|a cluster|a running server|hours)|runs until (Ctrl-C))\b")
MARKS = {"the hub", "a GPU", "GPUs", "network", "a cluster", "a running server", "hours", "Ctrl-C"}
EXITS = re.compile(r"#[^\n]*?\bexits (\d+)\b")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
OPERATORS = {"&&", "||", "|", ";", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", "2>", "&>", ">&"}


@dataclass(frozen=True)
class Command:
    text: str  # as the README has it: continuation lines and heredoc included
    line: int  # the README line it starts on
    needs: str | None  # what it needs that the tests lack (the marker's words), None: it runs
    exit_code: int  # the exit code the README documents (0 unless `# exits N`)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) for every ```bash block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, body))
        i += 1
    return blocks


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of every bash block, in README order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found: list[Command] = []
    for first, body in bash_blocks(text):
        i = 0
        while i < len(body):
            line = body[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            start, parts = i, [line]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(body):
                i += 1
                parts.append(body[i])
            heredoc = HEREDOC.search(parts[0].split("#")[0])
            if heredoc:
                while i + 1 < len(body):
                    i += 1
                    parts.append(body[i])
                    if body[i].strip() == heredoc.group(2):
                        break
            command = "\n".join(parts)
            head = "\n".join(parts) if not heredoc else parts[0]  # markers live outside a heredoc's body
            needs = NEEDS.search(head)
            exits = EXITS.search(head)
            found.append(Command(command, first + start, (needs.group(1) or needs.group(2)) if needs else None,
                                 int(exits.group(1)) if exits else 0))
            i += 1
    return found


# --------------------------------------------------------------------------- words of a command
def _tokens(text: str) -> list[str]:
    """Shell words and operators of a command line, without executing anything. ANSI-C strings
    ($'...') become a placeholder word: their contents never name a command or an option."""
    text = text.replace("\\\n", " ")
    text = re.sub(r"\$'(?:[^'\\]|\\.)*'", "'ANSI_C'", text)
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def studio_argvs(command: str) -> list[list[str]]:
    """The argv of every studio invocation in a command: `studio ...` as a command of its own
    (also after &&, |, ;, `do`, an environment assignment) and `... -m studio ...`."""
    first_line = command.split("\n")[0] if HEREDOC.search(command.split("\n")[0]) else command
    segments: list[list[str]] = [[]]
    skip_next = False
    for token in _tokens(first_line):
        if skip_next:
            skip_next = False
            continue
        if token in OPERATORS:
            segments.append([])
        elif token in REDIRECTS:
            skip_next = True  # the file a redirect names is not an argument
        else:
            segments[-1].append(token)
    argvs = []
    for words in segments:
        while words and (words[0] in ("do", "then", "else", "time", "nice", "exec")
                         or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0])):
            words = words[1:]
        if words and words[0] == "studio":
            argvs.append(words[1:])
        elif "-m" in words:
            at = words.index("-m")
            if at + 1 < len(words) and words[at + 1] == "studio":
                argvs.append(words[at + 2:])
    return argvs


@functools.lru_cache(maxsize=1)
def _command_tree():
    """The click command of `studio` with every command module (built once: ~0.2 s a build)."""
    from typer.main import get_command

    from studio.cli import app

    return get_command(app)


def parse_problem(argv: list[str], *, positionals: bool = True) -> str | None:
    """Why `studio ARGV` would not parse (None: it parses): an unknown command or option, an
    option without its value, and with `positionals` an extra positional argument, a missing
    required argument or option. Parsed by the real command tree's own parsers (typer's click);
    nothing runs: no callbacks, no type conversion, so the files named need not exist."""
    cmd = _command_tree()
    args, path = list(argv), ["studio"]
    while hasattr(cmd, "list_commands"):  # a group
        if not args or args[0] in ("--help", "-h", "--version"):
            return None  # `studio models` lists its commands; --help/--version print and exit
        # the group's own parse_args: a group may route a first word itself (`studio video
        # PROMPT` -> `generate PROMPT`); resilient: no --help callback, no "missing command"
        group_ctx = cmd.context_class(cmd, info_name=path[-1], resilient_parsing=True)
        cmd.parse_args(group_ctx, list(args))
        rest = [*getattr(group_ctx, "_protected_args", []), *group_ctx.args]
        if not rest or rest[0].startswith("-"):
            return f"{' '.join(path)}: no command before {rest[0] if rest else 'the end'}"
        name, args = rest[0], rest[1:]
        sub = cmd.get_command(group_ctx, name)
        if sub is None:
            return f"{' '.join(path)}: no command {name!r} (it has {', '.join(cmd.list_commands(group_ctx))})"
        path.append(name)
        cmd = sub
    if "--help" in args:
        return None
    ctx = cmd.context_class(cmd, info_name=path[-1])
    try:
        values, extra, _ = cmd.make_parser(ctx).parse_args(args=list(args))
    except Exception as exc:  # the parser's UsageError: no such option, an option without its value
        if not hasattr(exc, "format_message"):
            raise
        if not positionals and type(exc).__name__ != "NoSuchOption":
            return None  # prose names an option without its value: "`studio code --tests` runs ..."
        return f"{' '.join(path)}: {exc.format_message()}"
    if not positionals:
        return None
    if extra:
        return f"{' '.join(path)}: unexpected extra arguments {extra}"
    missing = [p.opts[0] if p.param_type_name == "option" else p.name.upper() for p in cmd.params
               if p.required and values.get(p.name) in (None, ())]
    if missing:
        return f"{' '.join(path)}: missing {', '.join(missing)}"
    return None


def inline_studio_spans(text: str) -> list[tuple[int, str]]:
    """`studio ...` code spans in the prose (outside fenced blocks), with their line numbers."""
    spans, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            spans += [(n, m.group(1)) for m in re.finditer(r"`(studio [^`]+)`", line)]
    return spans


# --------------------------------------------------------------------------- the fast check
def test_readme_has_commands_and_marks_what_it_skips():
    commands = readme_commands()
    assert len(commands) > 100
    runnable = [c for c in commands if c.needs is None]
    assert len(runnable) > 0.7 * len(commands), "most README examples must run offline on tiny models"
    # the markers read as they are meant: one per skipped command, naming what it needs
    assert {c.needs for c in commands} - {None} <= MARKS


def test_the_command_splitter_reads_shell_as_bash_does():
    text = ("intro\n```bash\nstudio a b \\\n    --c d   # needs the hub\n# a comment\n"
            "python - <<'EOF'\nprint('# not a marker: needs a GPU')\nEOF\n"
            "studio x && studio y | head -1 > out.txt   # exits 3\n"
            "for k in a b; do studio make $k; done\ntorchrun --nproc-per-node 2 -m studio clip train --steps 2\n```\n")
    commands = readme_commands(text)
    assert [c.line for c in commands] == [3, 6, 9, 10, 11]
    assert commands[0].needs == "the hub" and commands[0].text.endswith("--c d   # needs the hub")
    assert commands[1].needs is None and commands[1].text.endswith("EOF")
    assert commands[2].exit_code == 3 and studio_argvs(commands[2].text) == [["x"], ["y"]]
    assert studio_argvs(commands[3].text) == [["make", "$k"]]
    assert studio_argvs(commands[4].text) == [["clip", "train", "--steps", "2"]]
    assert studio_argvs("studio code $'a\\n  b' -m x --max-tokens 4") == [["code", "ANSI_C", "-m", "x", "--max-tokens", "4"]]


def test_the_parse_check_catches_what_it_promises():
    assert parse_problem(["image", "a cat", "--steps", "4", "-o", "/tmp/x"]) is None
    assert parse_problem(["video", "a calm sea", "--frames", "8"]) is None  # routed to `video generate`
    assert parse_problem(["video", "interpolate", "in.mp4", "--factor", "3"]) is None
    assert "no command 'imgae'" in parse_problem(["imgae", "a cat"])
    assert "--stpes" in parse_problem(["image", "a cat", "--stpes", "4"])
    assert "requires an argument" in parse_problem(["image", "a cat", "--steps"])
    assert "extra arguments" in parse_problem(["music", "render", "a.mid", "b.mid"])
    assert "missing FILE" in parse_problem(["music", "render"])
    assert "missing --data" in parse_problem(["music", "train", "--steps", "2"])
    assert "no command" in parse_problem(["models", "pul", "sd-turbo"])


def test_every_studio_command_line_parses():
    problems = []
    for command in readme_commands():
        for argv in studio_argvs(command.text):
            problem = parse_problem(argv)
            if problem:
                problems.append(f"{command}\n    -> {problem}")
    text = README.read_text(encoding="utf-8")
    for line, span in inline_studio_spans(text):
        for argv in studio_argvs(span):
            # prose names commands with placeholders (`studio replay FILE`): words and options only
            problem = parse_problem(argv, positionals=False)
            if problem:
                problems.append(f"README.md:{line}: `{span}`\n    -> {problem}")
    assert not problems, "README command lines that do not parse:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the slow run
def _simple_studio(command: Command) -> bool:
    """A single `studio ...` invocation with no shell syntax besides quoting, globs, ~ and $VARs."""
    if "\n" in command.text.replace("\\\n", " ") or HEREDOC.search(command.text):
        return False
    try:
        words = _tokens(command.text)
    except ValueError:
        return False
    return bool(words) and words[0] == "studio" and not any(w in OPERATORS or w in REDIRECTS for w in words)


def _expand(text: str, env: dict[str, str], cwd: Path) -> list[str]:
    """The argv bash would build from `studio ...` (quotes, globs, ~, $VARs), nothing run."""
    script = "printf '%s\\0' " + text.split(None, 1)[1] if " " in text.strip() else "true"
    done = subprocess.run(["bash", "-c", script], capture_output=True, env=env, cwd=cwd, check=True)
    return [a.decode() for a in done.stdout.split(b"\0")[:-1]]


def _in_process(argv: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from studio import registry
    from studio.cli import make_app, modules_for
    from studio.cli.common import DEBUG

    DEBUG["on"] = False
    app = make_app(modules_for(argv))  # what `main()` builds for this argv
    try:
        result = CliRunner().invoke(app, argv, prog_name="studio")
    finally:
        registry.clear_cache()  # as a process would: every command loads its models afresh
    text = result.output + (result.stderr if result.stderr_bytes is not None and result.stderr not in result.output else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text += "".join(traceback.format_exception(result.exception))
    return result.exit_code, text


def _in_bash(text: str, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    done = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(8 * 3600)
def test_readme_runs_as_written(tmp_path, monkeypatch):
    keep = os.environ.get("README_WORK")
    base = Path(keep) if keep else tmp_path
    work, fake_tmp = base / "work", base / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    fake_tmp.mkdir(exist_ok=True)
    if not (work / "examples").exists():
        shutil.copytree(ROOT / "examples", work / "examples")
    for name, value in {"STUDIO_HOME": base / "studio-home", "HF_HOME": base / "hf-home", "HF_HUB_OFFLINE": "1",
                        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TMPDIR": fake_tmp}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("STUDIO_SERVER", "STUDIO_SERVER_TOKEN", "STUDIO_OUT", "STUDIO_DEVICE", "STUDIO_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(work)
    everything_in_bash = os.environ.get("README_SUBPROCESS") == "1"
    first, last = int(os.environ.get("README_FROM", 0)), int(os.environ.get("README_UNTIL", 10**9))

    failures, ran = [], 0
    for command in readme_commands():
        if command.needs is not None or not first <= command.line <= last:
            continue
        text = command.text.replace("/tmp/", f"{fake_tmp}/")
        exported = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(\S*)", text.strip())
        if exported:  # `export X=1` holds for the commands after it, as in the reader's shell
            monkeypatch.setenv(exported.group(1), exported.group(2))
            continue
        started = time.monotonic()
        env = dict(os.environ)
        if not everything_in_bash and _simple_studio(command):
            code, output = _in_process(_expand(text, env, work))
        else:
            code, output = _in_bash(text, env, work, timeout=3600)
        ran += 1
        print(f"{time.monotonic() - started:7.1f}s exit {code}  README.md:{command.line}", flush=True)  # pytest -s: live
        if code != command.exit_code:
            failures.append(f"{command}\n    exit {code} (README says {command.exit_code}):\n"
                            + "\n".join("      " + line for line in output.strip().splitlines()[-25:]))
            print(failures[-1], flush=True)
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} README commands failed:\n\n" + "\n\n".join(failures)
