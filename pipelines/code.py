"""Code generation with any transformers causal LM: completion, chat, fill-in-the-middle,
repository context, and test-driven selection of sampled candidates in a sandbox.

How a model is prompted is read from its tokenizer, never from its name:

    chat        the tokenizer has a chat template (Qwen2.5-Coder-Instruct, ...): the prompt (and
                the instruction, the repository snippets) go in a user message; the reply's first
                fenced code block is the code
    completion  no chat template (StarCoder2, DeepSeek-Coder-base, ...) or --raw: the model
                continues the prompt; the code is prompt + continuation
    infill      --infill FILE --at LINE or --prefix/--suffix: the model's fill-in-the-middle tokens
                (StarCoder <fim_prefix>, SantaCoder <fim-prefix>, Qwen-Coder <|fim_prefix|>,
                CodeLlama <PRE>/<SUF>/<MID>, DeepSeek-Coder <｜fim▁begin｜>); the code is the
                file with the middle filled in

--context DIR ranks line windows of the folder's text files against the prompt with BM25
(rank-bm25) and puts the best into the prompt until the token budget is spent. --samples K
--tests FILE samples K candidates, drops those that do not parse, runs the rest against the
tests in pipelines/sandbox.py and keeps the first that passes (or the one passing most tests).

Tokens stream to stdout through the Progress streamer as they come; a stop string is held back
until it is clear it is not one, so what streams is exactly what the Result keeps. Nothing here
writes files: the CLI and the OutputWriter do.
"""

from __future__ import annotations

import ast
import contextlib
import keyword
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from studio import models
from studio.errors import InputFileError, RuntimeFailure, UsageError
from studio.outputs import Result


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

# language -> (file suffix, line-comment marker, fence names that count as this language)
LANGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "python": ("py", "#", ("python", "py", "python3")),
    "javascript": ("js", "//", ("javascript", "js", "jsx")),
    "typescript": ("ts", "//", ("typescript", "ts", "tsx")),
    "rust": ("rs", "//", ("rust", "rs")),
    "go": ("go", "//", ("go", "golang")),
    "c": ("c", "//", ("c", "h")),
    "cpp": ("cpp", "//", ("cpp", "c++", "cc", "hpp")),
    "java": ("java", "//", ("java",)),
    "bash": ("sh", "#", ("bash", "sh", "shell", "zsh")),
    "ruby": ("rb", "#", ("ruby", "rb")),
    "sql": ("sql", "--", ("sql",)),
}
FIM_MODELS_HINT = "use a fill-in-the-middle code model: starcoder2-3b, deepseek-coder-1.3b, qwen2.5-coder-1.5b-base or codellama-7b"


@dataclass(frozen=True)
class CodeRequest:
    prompt: str = ""  # code to continue, or what to write (chat models); "" with --infill/--prefix
    instruction: str | None = None  # what to do with the prompt's code, e.g. "add type hints"
    model: str = "auto"  # alias, hub id or folder; auto = the card marked default_for [code]
    max_tokens: int = 256  # most new tokens per candidate
    temperature: float = 0.2  # 0 = greedy (deterministic); > 0 samples
    top_p: float = 0.95  # nucleus sampling mass, when sampling
    stop: tuple[str, ...] = ()  # stop at the first of these strings (not kept)
    system: str | None = None  # system message for chat models
    lang: str = "python"  # language: prompt wording, which code fence to keep, file suffix
    raw: bool = False  # plain completion even when the model has a chat template
    infill: str | None = None  # file to fill in the middle of, at line `at`
    at: int | None = None  # 1-based line of `infill` before which the new code goes
    prefix: str | None = None  # code before the hole (instead of infill/at)
    suffix: str | None = None  # code after the hole
    context: str | None = None  # folder whose most relevant snippets join the prompt (BM25)
    context_tokens: int = 1024  # token budget for those snippets
    samples: int = 1  # candidates to sample; with tests the first that passes is kept
    tests: str | None = None  # Python test file (test_* functions and/or asserts) for the candidates
    timeout: float = 10.0  # seconds each candidate may run in the sandbox
    memory_mb: int = 512  # memory limit of the sandbox, MiB
    unsafe_exec: bool = False  # run tests without isolation where the sandbox cannot be had (recorded)
    stream: bool = False  # stream tokens to stdout as they come (the CLI sets it for one sample)
    seed: int | None = None  # sampling seed (recorded in the output)
    adapters: tuple[str, ...] = ()  # peft adapters, "PATH[:SCALE]" each (`studio adapt train --task code`)
    # syntax-guided decoding (Python completion and infill): each line is sampled again, up to
    # `syntax_tries` times, until the code so far still parses (codeop); None = the model card's
    # default (on for starter-code, whose 0.9M weights alone write valid Python half the time)
    syntax_check: bool | None = None
    syntax_tries: int = 8


# ----------------------------------------------------------------------------- FIM styles
@dataclass(frozen=True)
class FimStyle:
    """One family's fill-in-the-middle layout: prefix-suffix-middle (PSM) token order."""

    name: str
    prefix: str  # token before the code above the hole
    suffix: str  # token before the code below the hole
    middle: str  # token after which the model writes the middle
    stops: tuple[str, ...] = ()  # tokens that end the middle, besides the tokenizer's EOS
    bos: bool = False  # the sequence starts with BOS (sentencepiece families)
    strip_space: bool = False  # encode the suffix without sentencepiece's leading space (CodeLlama)


FIM_STYLES: tuple[FimStyle, ...] = (
    FimStyle("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
             stops=("<|endoftext|>", "<file_sep>", "<fim_pad>")),
    FimStyle("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>", stops=("<|endoftext|>", "<fim-pad>")),
    FimStyle("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
             stops=("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|im_end|>")),
    FimStyle("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", stops=("▁<EOT>",), bos=True, strip_space=True),
    FimStyle("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", bos=True),
)


def fim_style(tokenizer: Any) -> FimStyle | None:
    """The FIM layout this tokenizer's special tokens spell, or None."""
    vocab = tokenizer.get_vocab()
    for style in FIM_STYLES:
        if all(tok in vocab for tok in (style.prefix, style.suffix, style.middle)):
            return style
    return None


def fim_ids(tokenizer: Any, style: FimStyle, prefix: str, suffix: str) -> list[int]:
    """Token ids of a PSM infill prompt, assembled from ids so no special token is re-split."""
    vocab = tokenizer.get_vocab()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    suffix_ids = encode(suffix)
    if style.strip_space and suffix:
        # sentencepiece adds a dummy "▁" before the first piece; Meta's infilling drops it for
        # the suffix (CodeLlama's `encode_infilling`). Encode after a newline and cut that off.
        marker, both = encode("\n"), encode("\n" + suffix)
        if both[: len(marker)] == marker:
            suffix_ids = both[len(marker):]
    ids = [vocab[style.prefix], *encode(prefix), vocab[style.suffix], *suffix_ids, vocab[style.middle]]
    if style.bos and tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    return ids


# ----------------------------------------------------------------------------- text helpers
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str, lang: str = "python") -> str:
    """The code in a chat reply: the first fenced block in `lang` (else the first fenced block,
    else the whole reply). An unclosed fence (cut by max tokens) runs to the end."""
    blocks = FENCE.findall(text)
    names = LANGS.get(lang, ("txt", "#", (lang,)))[2]
    for name, body in blocks:
        if name.lower() in names:
            return body.rstrip() + "\n"
    if blocks:
        return blocks[0][1].rstrip() + "\n"
    return text.strip("\n") + "\n" if text.strip() else ""


CODE_STARTS = ("def ", "class ", "import ", "from ", "async def ", "@", "#!", "#include", "function ", "fn ",
               "func ", "package ", "public ", "const ", "let ", "var ", "use ", "select ", "SELECT ", '"""', "'''")


def looks_like_code(text: str, lang: str = "python") -> bool:
    """Whether a chat prompt is code to finish (a stub, a file) rather than a request in words."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith(CODE_STARTS):
        return True
    if lang == "python" and "\n" in text.strip():
        try:
            ast.parse(text + ("\n    pass\n" if text.rstrip().endswith(":") else ""))
            return True
        except SyntaxError:
            return False
    return False


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopFilter:
    """Streams text but holds back what could still become a stop string, so the stream ends
    exactly where the kept text does."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.done = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.done:
            return ""
        self.pending += text
        head, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.done, self.pending = True, ""
            return head
        if final:
            out, self.pending = self.pending, ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out


# ----------------------------------------------------------------------------- repository context
CONTEXT_SUFFIXES = {".py", ".pyi", ".js", ".jsx", ".ts", ".tsx", ".rs", ".go", ".c", ".h", ".cc", ".cpp", ".hpp",
                    ".java", ".kt", ".rb", ".sh", ".sql", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".cfg",
                    ".ini", ".json", ".html", ".css"}
SKIP_DIRS = {"node_modules", "__pycache__", "venv", "site-packages", "build", "dist", "outputs", "target"}
WINDOW, STRIDE = 30, 20  # lines per snippet, and the step between snippets (10 lines overlap)
MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 5000
STOPWORDS = set(keyword.kwlist) | {"self", "cls", "none", "true", "false", "print", "return", "int", "str", "the", "a"}


@dataclass
class Snippet:
    path: str  # relative to the context folder
    start: int  # first line, 1-based
    end: int  # last line, inclusive
    text: str
    score: float = 0.0
    tokens: int = 0

    def listing(self) -> dict[str, Any]:
        return {"path": self.path, "lines": [self.start, self.end], "tokens": self.tokens, "score": round(self.score, 3)}


def code_terms(text: str) -> list[str]:
    """BM25 terms of code: identifiers, lower-cased, plus their snake_case / camelCase parts."""
    terms = []
    for ident in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
        low = ident.lower()
        terms.append(low)
        parts = [p.lower() for p in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", ident)]
        if len(parts) > 1:
            terms.extend(parts)
    return terms


def repository_snippets(folder: Path, exclude: Path | None = None) -> list[Snippet]:
    """Overlapping line windows of the text files under `folder` (hidden, vendored and build
    folders skipped; large or binary files skipped)."""
    snippets: list[Snippet] = []
    files = 0
    exclude = exclude.resolve() if exclude else None
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(names):
            path = Path(root) / name
            if path.suffix.lower() not in CONTEXT_SUFFIXES or name.startswith("."):
                continue
            if exclude is not None and path.resolve() == exclude:
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            files += 1
            if files > MAX_FILES:
                return snippets
            rel = str(path.relative_to(folder))
            for start in range(0, max(len(lines), 1), STRIDE):
                chunk = lines[start:start + WINDOW]
                if any(line.strip() for line in chunk):
                    snippets.append(Snippet(rel, start + 1, start + len(chunk), "\n".join(chunk)))
                if start + WINDOW >= len(lines):
                    break
    return snippets


def retrieve_context(folder: Path, query: str, budget: int, count_tokens: Callable[[str], int],
                     exclude: Path | None = None) -> list[Snippet]:
    """The snippets of `folder` most relevant to `query` (BM25), best first, that fit in
    `budget` tokens together (each counted with its header line); overlapping windows of one
    file are not both taken."""
    from rank_bm25 import BM25Plus

    snippets = repository_snippets(folder, exclude)
    query_terms = [t for t in code_terms(query) if t not in STOPWORDS]
    if not snippets or not query_terms or budget <= 0:
        return []
    corpus = [code_terms(s.text) for s in snippets]
    # BM25Plus rather than Okapi: Okapi's idf goes negative for terms in over half of a small
    # corpus, which ranks the best match of a five-file folder below unrelated files.
    scores = BM25Plus(corpus).get_scores(query_terms)
    wanted = set(query_terms)
    order = sorted(range(len(snippets)), key=lambda i: (-scores[i], i))
    chosen: list[Snippet] = []
    used = 0
    for i in order:
        snippet = snippets[i]
        if not wanted & set(corpus[i]):  # shares no identifier with the prompt: not relevant
            continue
        if any(c.path == snippet.path and c.start <= snippet.end and snippet.start <= c.end for c in chosen):
            continue
        tokens = count_tokens(f"---- {snippet.path} (lines {snippet.start}-{snippet.end}) ----\n{snippet.text}\n")
        if used + tokens > budget:
            continue
        snippet.score, snippet.tokens = float(scores[i]), tokens
        chosen.append(snippet)
        used += tokens
    return chosen


def context_block(snippets: Sequence[Snippet], lang: str, *, chat: bool) -> str:
    """The snippets as prompt text: fenced sections for chat models, comment-headed code for
    completion models (the best snippet last, nearest to the prompt)."""
    if not snippets:
        return ""
    ordered = list(reversed(snippets))
    if chat:
        parts = [f"{s.path} (lines {s.start}-{s.end}):\n```{lang}\n{s.text}\n```" for s in ordered]
        return "Relevant code from the repository:\n\n" + "\n\n".join(parts) + "\n\n"
    mark = LANGS.get(lang, ("", "#", ()))[1]
    parts = [f"{mark} ---- {s.path} (lines {s.start}-{s.end}) ----\n{s.text}" for s in ordered]
    return f"{mark} Relevant code from the repository\n" + "\n\n".join(parts) + f"\n{mark} ----\n\n"


# ----------------------------------------------------------------------------- test-driven selection
@dataclass
class Selection:
    """Which candidate was kept and how every candidate did."""

    index: int  # the kept candidate (0-based)
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # per candidate: status, passed, total, error
    isolation: dict[str, Any] = field(default_factory=dict)  # what the sandbox applied

    @property
    def passed(self) -> bool:
        return self.outcomes[self.index]["status"] == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.index, "passed": self.passed, "candidates": self.outcomes}


def select_candidate(candidates: Sequence[str], tests: str, limits: Any = None,
                     note: Callable[[str], None] | None = None) -> Selection:
    """Run candidates against `tests` in order, in the sandbox: the first that passes every test
    is kept and the rest are not run; with none passing, the one passing most tests is kept
    (parsing beats not parsing, earlier beats later). Candidates that do not parse never run."""
    from studio.pipelines import sandbox

    limits = limits or sandbox.Limits()
    outcomes: list[dict[str, Any]] = []
    chosen = None
    for i, code in enumerate(candidates):
        problem = sandbox.parses(code)
        if problem:
            outcome = sandbox.Outcome("syntax", error=problem)
        else:
            outcome = sandbox.run_tests(code, tests, limits)
        row = {"candidate": i, **{k: v for k, v in outcome.to_dict().items() if k not in ("stdout", "stderr")},
               "summary": outcome.summary()}
        outcomes.append(row)
        if note:
            note(f"candidate {i + 1}/{len(candidates)}: {outcome.summary()}")
        if outcome.ok:
            chosen = i
            break
    for i in range(len(outcomes), len(candidates)):
        outcomes.append({"candidate": i, "status": "not run", "passed": 0, "total": 0, "error": None,
                         "summary": "not run: an earlier candidate passed"})
    if chosen is None:
        chosen = max(range(len(candidates)),
                     key=lambda i: (outcomes[i]["passed"], outcomes[i]["status"] != "syntax", -i))
    return Selection(chosen, outcomes, sandbox.isolation_report(limits))


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class Generation:
    text: str  # what the model wrote, cut at the first stop string
    tokens: int  # new tokens generated
    finish: str  # "stop" (stop string or end token), "length" (max_tokens reached) or "syntax"
    # (syntax-guided decoding found no line that parses in its tries: the text ends at the last good line)
    rejected: int = 0  # lines resampled by syntax-guided decoding


def python_prefix_ok(text: str, *, complete: bool = False) -> bool:
    """True when `text` is Python source or the beginning of some: codeop says complete (a code
    object) or incomplete (None), not wrong (SyntaxError). Unless `complete`, the last line may
    be cut off mid-token, so it is left out of the check."""
    import codeop
    import warnings

    if not complete:
        lines = text.split("\n")
        text = "\n".join(lines[:-1]) if len(lines) > 1 else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like are warnings, not errors
            codeop.compile_command(text + "\n", "<completion>", "exec")
        return True
    except (SyntaxError, ValueError, OverflowError):
        return False


def code_lines(text: str, start: int = 0) -> int:
    """How many lines of `text`, from character `start` on, hold code: a name, keyword, number,
    operator, or a string inside a statement, not only a comment, blank space, a docstring or the
    inside of a string. codeop (and ast) accept comment lines, blank lines and docstring text as
    valid Python, so a validity rate that counted those would credit a model that writes no code."""
    return len(code_rows(text, start))


def code_rows(text: str, start: int = 0) -> set[int]:
    """The line numbers (1-based) of code_lines, by the standard tokenizer. A statement made of
    string literals alone (a docstring) is not code; text cut off inside a bracket or a string is
    read up to where it stops."""
    import io
    import tokenize

    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
              tokenize.ENDMARKER, tokenize.ERRORTOKEN}
    strings = {tokenize.STRING} | {getattr(tokenize, name) for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                   if hasattr(tokenize, name)}
    first_row = text.count("\n", 0, start) + 1  # tokenize counts rows from 1
    first_col = start - (text.rfind("\n", 0, start) + 1)
    rows: set[int] = set()
    statement: list = []

    def flush() -> None:  # one logical line (statement) read: its rows hold code unless it is strings only
        significant = [t for t in statement if t.type not in layout]
        if significant and not all(t.type in strings for t in significant):
            rows.update(t.start[0] for t in significant
                        if t.start[0] > first_row or (t.start[0] == first_row and t.start[1] >= first_col))
        statement.clear()

    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NEWLINE:
                flush()
            else:
                statement.append(token)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # cut off mid-statement or mid-string: what was read so far counts
    flush()
    return rows


def comment_only(text: str, start: int = 0) -> bool:
    """True when what `text` holds from character `start` on is comments (and blank space) and
    nothing else: no code, no string (a '#' inside a string is text, and the tokenizer says so)."""
    import io
    import tokenize

    layout = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.ERRORTOKEN}
    first_row = text.count("\n", 0, start) + 1
    first_col = start - (text.rfind("\n", 0, start) + 1)
    kinds = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            row, col = token.start
            if token.type not in layout and (row > first_row or (row == first_row and col >= first_col)):
                kinds.add(token.type == tokenize.COMMENT)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return kinds == {True}


# check(generated, complete, new_from) -> "ok" (keep the new line), "comment" (it parses but is only a
# comment), or None (the code so far does not parse)
SyntaxCheck = Callable[[str, bool, int], "str | None"]


def syntax_check_after(head: str) -> SyntaxCheck | None:
    """The check syntax-guided decoding applies to text generated after `head` (the code before
    the new text), or None when `head` does not parse by itself (no continuation could). A new
    line (from `new_from` in `generated`) that is only a comment parses whatever the model meant,
    so it is told apart: decoding samples it again and keeps it only when no try wrote code."""
    if not python_prefix_ok(head):
        return None

    def check(generated: str, complete: bool, new_from: int = 0) -> str | None:
        text = head + generated
        if not python_prefix_ok(text, complete=complete):
            return None
        judged = text if complete else text[: text.rfind("\n")]  # as python_prefix_ok: a cut-off last line is not judged
        return "comment" if comment_only(judged, len(head) + new_from) else "ok"

    return check


def _check_ranges(request: CodeRequest) -> None:
    """The request's own ranges and combinations: nothing here needs the weights (check_request
    runs it before they load; what needs the tokenizer, such as FIM tokens, waits for check_inputs)."""
    if request.lang not in LANGS:
        raise UsageError(f"unknown --lang {request.lang!r}", f"use one of {', '.join(LANGS)}")
    if request.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {request.max_tokens}", "pass --max-tokens 256")
    if request.temperature < 0:
        raise UsageError(f"--temperature must be 0 or more, got {request.temperature}", "0 is greedy; 0.2-0.8 samples")
    if not 0 < request.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {request.top_p}", "pass --top-p 0.95")
    if request.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {request.samples}", "pass --samples 4")
    if not 1 <= request.syntax_tries <= 100:
        raise UsageError(f"--syntax-tries must be 1-100, got {request.syntax_tries}", "pass --syntax-tries 8")
    if request.samples > 1 and request.temperature == 0:
        raise UsageError("--samples above 1 with --temperature 0 would give the same candidate every time",
                         "pass --temperature 0.6 (or higher) to sample different candidates")
    if request.timeout <= 0 or request.memory_mb < 16:
        raise UsageError("the sandbox needs --timeout above 0 and at least 16 MiB", "pass --timeout 10")
    if request.tests is not None:  # before generating: no isolation, no running (unless --unsafe-exec)
        from studio.pipelines import sandbox

        sandbox.require(sandbox.Limits(unsafe_exec=request.unsafe_exec))
    if request.context_tokens < 0:
        raise UsageError("--context-tokens must be 0 or more", "pass --context-tokens 1024")
    infill = request.infill is not None or request.prefix is not None or request.suffix is not None
    if request.at is not None and request.infill is None:
        raise UsageError("--at needs --infill FILE", "pass --infill FILE --at LINE")
    if request.infill is not None and (request.prefix is not None or request.suffix is not None):
        raise UsageError("--infill FILE and --prefix/--suffix both name the hole", "pass one of them")
    if infill and (request.prompt.strip() or request.instruction):
        raise UsageError("infill takes no PROMPT or instruction: the code around the hole is the prompt",
                         "drop PROMPT, or drop --infill/--prefix/--suffix")
    if not infill and not request.prompt.strip():
        raise UsageError("the prompt is empty", "pass PROMPT, - to read it from stdin, or --infill FILE --at LINE")
    if request.tests is not None and request.lang != "python":
        raise UsageError(f"--tests runs Python tests; --lang is {request.lang}", "drop --tests or use --lang python")
    if request.context is not None and not Path(request.context).expanduser().is_dir():
        raise InputFileError(f"--context {request.context} is not a folder", "pass a folder of source files")


def _check_model_limits(request: CodeRequest, spec: models.ModelSpec, device: DeviceManager | None) -> dict[str, Any] | None:
    """--max-tokens against the model's positions, and the candidates' peak against free memory.

    All --samples candidates decode together (generate's num_return_sequences), each with its own
    key/value cache: 2 x layers x (prompt + new tokens) x the KV width, plus the prompt's one
    forward pass (~16 hidden-width tensors a token) and the sampling step's float32 logits and
    their processed copies (~4 a candidate). The prompt's tokens are guessed before the tokenizer
    loads: a token per 3 characters, plus the --context budget."""
    from studio.limits import check_fits, element_size, read_config, weight_values

    config = read_config(spec, "config.json")
    config = config.get("text_config") or config
    positions = next((int(config[k]) for k in ("max_position_embeddings", "n_positions", "seq_length")
                      if isinstance(config.get(k), int) and config[k] > 0), None)
    if positions is not None and request.max_tokens >= positions:
        raise UsageError(f"--max-tokens {request.max_tokens} fills the model's {positions}-token window, leaving no room "
                         "for the prompt", f"pass --max-tokens {positions // 2} or fewer")
    if device is None or not config.get("vocab_size"):
        return None
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv_width = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or hidden // max(heads, 1))
    text = len(request.prompt or "") + len(request.prefix or "") + len(request.suffix or "") + len(request.instruction or "")
    if request.infill is not None:
        with contextlib.suppress(OSError):
            text += Path(str(request.infill)).expanduser().stat().st_size
    tokens = text // 3 + (request.context_tokens if request.context else 0) + request.max_tokens
    tokens = min(tokens, positions or tokens)
    elem = element_size(device)
    per_sample = tokens * (2 * layers * kv_width + 16 * hidden) * elem + int(config["vocab_size"]) * 4 * 4
    samples = int(request.samples)

    def hint(room: float) -> str:
        fit = int(room // per_sample)
        return (f"--samples {fit} or fewer" if 1 <= fit < samples else "fewer --samples") + " or a lower --max-tokens"

    return check_fits(task="code", spec=spec, device=device, work=per_sample * samples,
                      weights=weight_values(spec) * elem,
                      what=f"{samples} candidate{'s' if samples != 1 else ''} of up to {tokens} tokens", hint=hint)


class CodeGenerator:
    task = "code"
    request_type = CodeRequest

    def __init__(self, model: Any, tokenizer: Any, spec: models.ModelSpec, device: DeviceManager):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.fim = fim_style(tokenizer)
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, spec: models.ModelSpec, device: DeviceManager) -> "CodeGenerator":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # studio shows its own progress
        tok_kwargs = {k: v for k, v in spec.load_kwargs().items() if k in ("revision", "trust_remote_code")}
        with models.loading(spec, "code model"):
            tokenizer = AutoTokenizer.from_pretrained(spec.location(), **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(spec.location(), dtype=device.dtype, **spec.load_kwargs())
        model.eval()
        model = device.prepare(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # batched sampling needs one; EOS is what base LMs pad with
        return cls(model, tokenizer, spec, device)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check_request(cls, request: CodeRequest, spec: models.ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the request's
        ranges, --max-tokens against the model's positions (config.json), and with a device,
        whether the candidates' caches fit in free memory."""
        _check_ranges(request)
        if spec is not None:
            _check_model_limits(request, spec, device)

    def check_inputs(self, request: CodeRequest) -> None:
        label = self.spec.alias or self.spec.name
        _check_ranges(request)
        infill = request.infill is not None or request.prefix is not None or request.suffix is not None
        if infill:
            if self.fim is None:
                raise UsageError(f"model {label} has no fill-in-the-middle tokens (looked for "
                                 f"{', '.join(s.middle for s in FIM_STYLES)})", FIM_MODELS_HINT)
            if request.infill is not None:
                self._infill_parts(request)  # file, line range
        if request.tests is not None:
            self._read_tests(request.tests)

    def _infill_parts(self, request: CodeRequest) -> tuple[str, str]:
        path = Path(str(request.infill)).expanduser()
        if not path.is_file():
            raise InputFileError(f"--infill {path} does not exist", "pass a source file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"--infill {path} is not a readable UTF-8 text file", "pass a source file") from exc
        lines = text.splitlines(keepends=True)
        if request.at is None:
            raise UsageError("--infill needs --at LINE (where the new code goes)", f"pass --at 1 .. {len(lines) + 1}")
        if not 1 <= request.at <= len(lines) + 1:
            raise UsageError(f"--at {request.at} is outside {path.name} ({len(lines)} lines)",
                             f"pass --at 1 .. {len(lines) + 1}")
        head = "".join(lines[: request.at - 1])
        if head and not head.endswith("\n"):
            head += "\n"
        return head, "".join(lines[request.at - 1:])

    @staticmethod
    def _read_tests(path_text: str) -> str:
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise InputFileError(f"--tests {path} does not exist", "pass a Python file of test_* functions or asserts")
        try:
            tests = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"--tests {path} is not a readable UTF-8 file", "pass a Python file") from exc
        try:
            tree = ast.parse(tests)
        except SyntaxError as exc:
            raise InputFileError(f"--tests {path} is not valid Python: {exc.msg} (line {exc.lineno})",
                                 "fix the test file") from exc
        if not tree.body:
            raise InputFileError(f"--tests {path} has no tests", "add test_* functions or assert statements")
        return tests

    # ------------------------------------------------------------------ run
    def run(self, request: CodeRequest, progress: Progress) -> list[Result]:
        # 1. check inputs; exactly the requested adapters active (none: the base model, bit for bit)
        self.check_inputs(request)
        from studio.adapters.peft_adapters import adapter_records, apply_adapters

        apply_adapters(self.model, tuple(request.adapters or ()), base_label=self.spec.alias or self.spec.name,
                       allow_pickle=self.spec.allow_pickle, offline=self.spec.offline)
        stops = tuple(request.stop or ())
        mode = "infill" if (request.infill is not None or request.prefix is not None or request.suffix is not None) \
            else "chat" if (self.chat and not request.raw) else "completion"

        # 2. the hole (infill) and the tests
        prefix = suffix = ""
        if mode == "infill":
            if request.infill is not None:
                prefix, suffix = self._infill_parts(request)
            else:
                prefix, suffix = request.prefix or "", request.suffix or ""
        tests = self._read_tests(request.tests) if request.tests is not None else None

        # 3. repository context within the token budget (what is left of the model's window)
        snippets: list[Snippet] = []
        if request.context is not None:
            bare = self._prompt_ids(request, mode, prefix, suffix, "")
            room = self._window() - len(bare) - request.max_tokens if self._window() else request.context_tokens
            budget = min(request.context_tokens, room - 24)  # 24: the block's own header and footer lines
            query = "\n".join(p for p in (request.prompt, request.instruction or "", prefix[-3000:], suffix[:1000]) if p)
            folder = Path(request.context).expanduser().resolve()
            exclude = Path(request.infill).expanduser() if request.infill else None
            snippets = retrieve_context(folder, query, budget, self._count_tokens, exclude)
            listing = ", ".join(f"{s.path}:{s.start}-{s.end}" for s in snippets)
            progress.note(f"context: {len(snippets)} snippet(s), {sum(s.tokens for s in snippets)} of "
                          f"{max(budget, 0)} tokens from {folder}" + (f": {listing}" if listing else " (nothing matched)"))

        # 4. the prompt: chat template, plain completion, or FIM tokens
        ids = self._prompt_ids(request, mode, prefix, suffix, context_block(snippets, request.lang, chat=mode == "chat"))
        window = self._window()
        if window and len(ids) + request.max_tokens > window:
            raise UsageError(f"the prompt is {len(ids)} tokens; with --max-tokens {request.max_tokens} that is more "
                             f"than the model's {window}-token window",
                             "shorten the prompt, or lower --max-tokens / --context-tokens")

        # 5. generate (streamed to stdout when asked and there is one candidate)
        end_tokens = self.fim.stops if mode == "infill" and self.fim else ()
        check = None
        if request.syntax_check and request.lang == "python" and mode != "chat":
            check = syntax_check_after(prefix if mode == "infill" else (request.prompt if not request.instruction else ""))
            if check is None:
                progress.note("syntax check off: the code before the new text does not parse by itself")
        generations = self.generate(ids, n=request.samples, max_tokens=request.max_tokens,
                                    temperature=request.temperature, top_p=request.top_p, stop=stops,
                                    seed=request.seed, end_tokens=end_tokens, progress=progress,
                                    stream=request.stream and request.samples == 1, check=check,
                                    tries=request.syntax_tries)
        codes = [self._code(request, mode, g.text, prefix, suffix) for g in generations]

        # 6. test-driven selection in the sandbox
        selection = None
        if tests is not None:
            from studio.pipelines import sandbox

            limits = sandbox.Limits(timeout_s=request.timeout, memory_mb=request.memory_mb, unsafe_exec=request.unsafe_exec)
            selection = select_candidate(codes, tests, limits, note=progress.note)
            pick = selection.outcomes[selection.index]
            verdict = "kept" if selection.passed else "no candidate passed every test; kept"
            progress.note(f"{verdict} candidate {selection.index + 1} of {len(codes)}: {pick['summary']} "
                          f"({'sandboxed' if selection.isolation.get('isolated') else 'NOT isolated: --unsafe-exec'})")
            keep = [selection.index]
        else:
            keep = list(range(len(codes)))

        # 7. Results (the CLI prints them; the OutputWriter writes them)
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(request).items()}
        suffix_name = LANGS[request.lang][0]
        results = []
        for i in keep:
            g = generations[i]
            extra: dict[str, Any] = {"mode": mode, "generated": g.text, "finish": g.finish,
                                     "tokens": {"prompt": len(ids), "new": g.tokens}}
            if len(codes) > 1:
                extra["sample"] = i
            if check is not None:
                extra["syntax"] = {"resampled_lines": g.rejected, "tries": request.syntax_tries}
            if mode == "infill" and self.fim:
                extra["fim"] = self.fim.name
            if request.context is not None:
                extra["context"] = [s.listing() for s in snippets]
            if request.adapters:
                extra["adapters"] = adapter_records(self.model)
            if selection is not None:
                extra["selection"] = selection.to_dict()
                extra["sandbox"] = selection.isolation
            results.append(Result(kind="text", value=codes[i], params=params, fmt=suffix_name, extra=extra))
        return results

    # ------------------------------------------------------------------ prompt building
    def _window(self) -> int | None:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, request: CodeRequest, mode: str, prefix: str, suffix: str, context: str) -> list[int]:
        lang = request.lang
        if mode == "infill":
            assert self.fim is not None
            return fim_ids(self.tokenizer, self.fim, context + prefix, suffix)
        if mode == "chat":
            if request.instruction:
                task = f"{request.instruction}\n\n```{lang}\n{request.prompt.rstrip()}\n```"
            elif looks_like_code(request.prompt, lang):  # a stub or the start of a file: finish it
                task = (f"Complete the following {lang} code. Reply with the complete code in one ```{lang} block."
                        f"\n\n```{lang}\n{request.prompt.rstrip()}\n```")
            else:
                task = f"{request.prompt.strip()}\n\nWrite it in {lang}; put the code in one ```{lang} block."
            messages = ([{"role": "system", "content": request.system}] if request.system else [])
            messages.append({"role": "user", "content": context + task})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        body = request.prompt
        if request.instruction:  # a base model has no instructions; a comment is the closest cue
            mark = LANGS[lang][1]
            body = f"{request.prompt.rstrip()}\n\n{mark} {request.instruction}\n"
        return self.tokenizer(context + body)["input_ids"]

    def _code(self, request: CodeRequest, mode: str, generated: str, prefix: str, suffix: str) -> str:
        """The candidate program a user keeps (and the tests run)."""
        if mode == "infill":
            return prefix + generated + suffix
        if mode == "chat":
            return extract_code(generated, request.lang)
        if request.instruction:
            return generated
        return request.prompt + generated

    # ------------------------------------------------------------------ generation
    def sample(self, prompt: str, *, n: int = 1, max_tokens: int = 256, temperature: float = 0.2,
               top_p: float = 0.95, stop: Sequence[str] = (), seed: int = 0, raw: bool = False,
               system: str | None = None, lang: str = "python", progress: Any = None,
               syntax_check: bool = False, syntax_tries: int = 8) -> tuple[str, list[Generation]]:
        """Generate n continuations of `prompt` (the eval's entry point): returns the mode used
        ("chat" or "completion") and the generations."""
        mode = "chat" if (self.chat and not raw) else "completion"
        request = CodeRequest(prompt=prompt, system=system, lang=lang, raw=raw)
        ids = self._prompt_ids(request, mode, "", "", "")
        check = syntax_check_after(prompt) if syntax_check and lang == "python" and mode == "completion" else None
        return mode, self.generate(ids, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   stop=stop if mode == "completion" else (), seed=seed, progress=progress,
                                   check=check, tries=syntax_tries)

    def generate(self, ids: list[int], *, n: int, max_tokens: int, temperature: float, top_p: float,
                 stop: Sequence[str], seed: int | None, end_tokens: Sequence[str] = (), progress: Any = None,
                 stream: bool = False, check: SyntaxCheck | None = None,
                 tries: int = 8) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        vocab = tok.get_vocab()
        eos = self.model.generation_config.eos_token_id
        eos_ids = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        eos_ids.update(vocab[t] for t in end_tokens if t in vocab)
        sampling = temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=sampling, num_return_sequences=n,
                                      eos_token_id=sorted(eos_ids), pad_token_id=tok.pad_token_id)
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:  # greedy: keep the model's sampling defaults from warning that they are unused
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tok)

        handle = None
        stop_filter = None
        if stream:
            streamer = progress.streamer(tok)
            sink, stop_filter = streamer.on_finalized_text, StopFilter(stop)

            def on_text(text: str, stream_end: bool = False) -> None:
                out = stop_filter.feed(text, final=stream_end)
                if out:
                    sink(out)

            streamer.on_finalized_text = on_text
            kwargs["streamer"] = streamer
        elif progress is not None:
            handle = progress.task("generating", total=max_tokens)

            class _Tick(StoppingCriteria):  # advances the bar once per generated token; never stops
                def __call__(self, input_ids, scores, **kw):
                    handle.advance(1)
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Tick()])

        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        if seed is not None:
            torch.manual_seed(int(seed))  # generate samples with torch's global RNG
        guided = None
        if check is not None:  # line by line (see _generate_guided): no streamer or stop strings inside generate
            for key in ("streamer", "stopping_criteria", "num_return_sequences", "stop_strings", "tokenizer"):
                kwargs.pop(key, None)
        try:
            if check is not None:
                guided = [self._generate_guided(ids, kwargs, max_tokens=max_tokens, temperature=temperature,
                                                stop=stop, eos_ids=eos_ids, check=check, tries=tries,
                                                emit=on_text if stream else None, handle=handle) for _ in range(n)]
            else:
                with self.device.inference():
                    out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        except torch.OutOfMemoryError as exc:
            raise RuntimeFailure("out of memory while generating",
                                 "lower --max-tokens or --samples, or pass --quantize int8") from exc
        if stop_filter is not None and not stop_filter.done and stop_filter.pending:
            sink(stop_filter.feed("", final=True))
        if handle is not None:
            handle.finish()
        if guided is not None:
            return guided

        generations = []
        for row in out[:, len(ids):]:
            row = row.tolist()
            ended = any(t in eos_ids for t in row)
            if ended:
                row = row[: next(i for i, t in enumerate(row) if t in eos_ids)]
            text, stopped = cut_at_stop(tok.decode(row, skip_special_tokens=True), stop)
            generations.append(Generation(text, len(row), "stop" if (ended or stopped) else "length"))
        return generations

    def _generate_guided(self, ids: list[int], kwargs: dict[str, Any], *, max_tokens: int, temperature: float,
                         stop: Sequence[str], eos_ids: set[int], check: SyntaxCheck, tries: int,
                         emit: Callable[[str], None] | None, handle: Any) -> Generation:
        """Syntax-guided decoding, one line at a time: sample up to the next newline, keep the line
        when check(text so far) holds, else sample it again (up to `tries` times; the retries at
        temperature >= 0.8, since a greedy retry would repeat the same line). A line that is only a
        comment is sampled again too, and kept only when every try was a comment or did not parse:
        a comment always parses, so without this a weak model escapes into comments. transformers has no
        grammar-constrained sampling for a whole language (its LogitsProcessors see one token, and a
        line of Python can only be judged once it is complete), hence this loop around generate()."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer

        class _LineEnd(StoppingCriteria):  # stops once the new tokens contain a newline
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kw):
                if handle is not None:
                    handle.advance(1)
                done = input_ids.shape[1] > self.start and "\n" in tok.decode(input_ids[0, -1:])  # the newest token
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        accepted: list[int] = []
        shown = ""
        finish, rejected = "length", 0
        while len(accepted) < max_tokens:
            cur = ids + accepted
            before = len(cut_at_stop(tok.decode(accepted, skip_special_tokens=True), stop)[0])
            comment = None  # the first try that parsed as a comment only: kept if no try writes code
            for attempt in range(tries):
                temp = temperature if attempt == 0 else max(temperature, 0.8)
                step_kwargs = {**kwargs, "max_new_tokens": max_tokens - len(accepted), "do_sample": temp > 0,
                               "stopping_criteria": StoppingCriteriaList([_LineEnd(len(cur))])}
                if temp > 0:
                    step_kwargs.update(temperature=temp, top_p=kwargs.get("top_p") or 0.95, top_k=None)
                input_ids = torch.tensor([cur], dtype=torch.long, device=self.model.device)
                with self.device.inference():
                    out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **step_kwargs)
                chunk = out[0, len(cur):].tolist()
                ended = any(t in eos_ids for t in chunk)
                if ended:
                    chunk = chunk[: next(i for i, t in enumerate(chunk) if t in eos_ids)]
                text, stopped = cut_at_stop(tok.decode(accepted + chunk, skip_special_tokens=True), stop)
                final = ended or stopped
                verdict = check(text, final, before)
                if verdict == "ok":
                    break
                if verdict == "comment" and comment is None:
                    comment = (chunk, text, final)
                rejected += 1
            else:
                if comment is None:  # no line parsed: end at the last good line
                    finish = "syntax"
                    break
                chunk, text, final = comment
            accepted += chunk
            if emit is not None and len(text) > len(shown):
                emit(text[len(shown):])
                shown = text
            if final:
                finish = "stop"
                break
        text, _ = cut_at_stop(tok.decode(accepted, skip_special_tokens=True), stop)
        if finish == "syntax":  # drop the cut-off start of the line that never parsed
            text = text[: text.rfind("\n") + 1]
        return Generation(text, len(accepted), finish, rejected)
