"""The sandbox and test-driven selection, on candidates we control (a tiny random LM writes
garbage, so the behaviours that matter are pinned with fixed candidate strings): passing,
failing, not parsing, looping forever, allocating without bound, flooding stdout, and refusing
to run at all where no sandbox can be had. Attacks on the sandbox are in test_sandbox_attacks.py.

Where bubblewrap is absent these run with --unsafe-exec (the counting and the limits behave the
same); where it is present they run isolated."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from studio.pipelines import sandbox
from studio.pipelines.code import select_candidate

UNSAFE = shutil.which("bwrap") is None  # no isolation tool: run the behaviours unisolated, as the user could

ADD_TESTS = "def test_small():\n    assert add(1, 2) == 3\n\ndef test_negative():\n    assert add(-1, 1) == 0\n"
PASSING = "def add(a, b):\n    return a + b\n"
FAILING = "def add(a, b):\n    return a - b\n"
NOT_PARSING = "def add(a, b)\n    return a + b\n"
LOOPING = "def add(a, b):\n    while True:\n        pass\n"
GREEDY = "def add(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(10**7))\n"
FAST = sandbox.Limits(timeout_s=2.5, memory_mb=256, unsafe_exec=UNSAFE)  # for candidates that must be killed: short
SAFE = sandbox.Limits(timeout_s=30, memory_mb=256, unsafe_exec=UNSAFE)  # for the rest: generous, so a loaded machine never flakes


def test_passing_and_failing_candidates_are_counted_per_test():
    ok = sandbox.run_tests(PASSING, ADD_TESTS, SAFE)
    assert (ok.status, ok.passed, ok.total) == ("passed", 2, 2)
    bad = sandbox.run_tests(FAILING, ADD_TESTS, SAFE)
    assert (bad.status, bad.passed, bad.total) == ("failed", 0, 2)
    assert bad.tests[0] == {"name": "test_small", "passed": False, "error": "AssertionError (tests.py:2)"}


def test_tests_may_import_the_candidate_as_a_module():
    tests = "from solution import add\n\ndef test_add():\n    assert add(2, 2) == 4\n"
    assert sandbox.run_tests(PASSING, tests, SAFE).summary() == "passed 1/1"


def test_a_loop_is_killed_at_the_wall_timeout_and_keeps_the_tests_already_passed():
    code = "def quick():\n    return 1\n\ndef slow():\n    while True:\n        pass\n"
    tests = "def test_quick():\n    assert quick() == 1\n\ndef test_slow():\n    slow()\n"
    outcome = sandbox.run_tests(code, tests, FAST)
    assert outcome.status == "timeout"
    assert "killed after 2.5 s" in outcome.error
    assert outcome.passed == 1 and outcome.total == 2  # the report is written test by test
    assert outcome.seconds < 2.5 + 2.0


def test_unbounded_allocation_hits_the_memory_limit():
    outcome = sandbox.run_tests(GREEDY, ADD_TESTS, SAFE)
    assert outcome.status == "memory"
    assert "256 MiB" in outcome.error


def test_no_secret_reaches_the_sandbox(monkeypatch):
    monkeypatch.setenv("STUDIO_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    code = "import os\ndef leaked():\n    return {k: v for k, v in os.environ.items() if 'SECRET' in k or 'TOKEN' in k}\n"
    tests = "import os\ndef test_env():\n    assert leaked() == {}, leaked()\n    assert set(os.environ) <= {'PATH', 'LANG', 'HOME', 'TMPDIR', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'LC_CTYPE', 'PWD'}\n"
    outcome = sandbox.run_tests(code, tests, SAFE)
    assert outcome.status == "passed", outcome.summary()
    assert "scrubbed" in outcome.isolation["environment"]


def test_without_bubblewrap_generated_code_is_refused_unless_unsafe_exec(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox._availability.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable) as refused:
            sandbox.run_tests(PASSING, ADD_TESTS, dataclasses.replace(SAFE, unsafe_exec=False))
        assert "bubblewrap (bwrap) is not installed" in refused.value.message
        assert "apt-get install bubblewrap" in refused.value.hint and "--unsafe-exec" in refused.value.hint
        assert refused.value.exit_code == 2
        with pytest.raises(sandbox.SandboxUnavailable):  # the selection refuses too, before running anything
            select_candidate([PASSING], ADD_TESTS, dataclasses.replace(SAFE, unsafe_exec=False))
        outcome = sandbox.run_tests(PASSING, ADD_TESTS, dataclasses.replace(SAFE, unsafe_exec=True))
        assert outcome.summary() == "passed 2/2"
        assert outcome.isolation["isolated"] is False and outcome.isolation["unsafe_exec"] is True
        assert "NOT isolated" in outcome.isolation["filesystem"]
    finally:
        sandbox._availability.cache_clear()


def test_flooding_stdout_stops_at_the_output_limit():
    outcome = sandbox.run_tests("def spam():\n    while True:\n        print('x' * 1000)\n", "spam()\n",
                                sandbox.Limits(timeout_s=5, output_mb=1, unsafe_exec=UNSAFE))
    assert outcome.status == "output"
    assert "1 MiB" in outcome.error and outcome.seconds < 5  # killed at the limit, not at the timeout
    assert len(outcome.stdout) <= 4000  # the outcome keeps a tail, not the flood


def test_selection_keeps_the_first_passing_candidate_and_reports_the_others():
    candidates = [NOT_PARSING, FAILING, LOOPING, PASSING, PASSING]
    notes = []
    selection = select_candidate(candidates, ADD_TESTS, FAST, note=notes.append)
    assert selection.index == 3 and selection.passed
    statuses = [o["status"] for o in selection.outcomes]
    assert statuses == ["syntax", "failed", "timeout", "passed", "not run"]
    assert selection.outcomes[0]["error"].startswith("SyntaxError")
    assert [o["passed"] for o in selection.outcomes[1:4]] == [0, 0, 2]
    assert len(notes) == 4 and "timeout" in notes[2]
    assert selection.isolation["network"]


def test_selection_without_a_passing_candidate_keeps_the_one_passing_most_tests():
    half = "def add(a, b):\n    return 3\n"  # passes test_small only
    selection = select_candidate([NOT_PARSING, FAILING, half, GREEDY], ADD_TESTS, SAFE)
    assert not selection.passed
    assert [o["status"] for o in selection.outcomes] == ["syntax", "failed", "failed", "memory"]
    assert selection.index == 2 and selection.outcomes[2]["passed"] == 1


def test_the_cli_refuses_without_bubblewrap_and_records_unsafe_exec(cli, tiny, monkeypatch, tmp_path):
    import json

    lm = tiny("code-lm")
    tests = tmp_path / "test_add.py"
    tests.write_text(ADD_TESTS)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap anywhere
    sandbox._availability.cache_clear()
    try:
        refused = cli("code", "def add(a, b):", "--model", lm, "--tests", tests, "--max-tokens", "4")
        assert refused.exit_code == 2, refused
        assert "bubblewrap (bwrap) is not installed" in refused.stderr and "--unsafe-exec" in refused.stderr
        assert len([line for line in refused.stderr.splitlines() if line.startswith("error:")]) == 1
        assert cli("eval", "code", "--model", lm, "--limit", "1").exit_code == 2  # before loading the model
        ran = cli("code", "def add(a, b):", "--model", lm, "--tests", tests, "--max-tokens", "4", "--unsafe-exec",
                  "--json", "-o", tmp_path / "out")
        assert ran.exit_code == 0, ran
        row = json.loads(ran.stdout.splitlines()[-1])
        assert row["sandbox"]["isolated"] is False and row["sandbox"]["unsafe_exec"] is True
        sidecar = json.loads(Path(row["path"]).with_suffix(".json").read_text())
        assert sidecar["sandbox"]["unsafe_exec"] is True  # the output's own metadata says it ran unisolated
    finally:
        sandbox._availability.cache_clear()


@pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("unshare") is None,
                    reason="needs bwrap and unshare(1) to build a machine that refuses user namespaces")
def test_where_namespaces_are_refused_studio_refuses_too_and_says_how_to_allow_them():
    # a user namespace whose limit of nested user namespaces is 0: what a locked-down container is
    script = ("from studio.pipelines import sandbox\n"
              "try:\n    sandbox.run_tests('x = 1')\nexcept sandbox.SandboxUnavailable as e:\n"
              "    print('REFUSED', e.exit_code, e.message, '|', e.hint)\n"
              "o = sandbox.run_tests('def f():\\n    return 1\\n', 'assert f() == 1', sandbox.Limits(unsafe_exec=True))\n"
              "print('UNSAFE', o.summary(), o.isolation['isolated'])\n")
    setup = ["unshare", "--user", "--map-root-user", "sh", "-c", "echo 0 > /proc/sys/user/max_user_namespaces"]
    probe = subprocess.run(setup, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine cannot build a user namespace to lock down: {probe.stderr.strip()[:200]}")
    proc = subprocess.run([*setup[:-1], f"{setup[-1]} && exec {sys.executable} -c \"$0\"", script],
                          capture_output=True, text=True, timeout=120)
    assert "REFUSED 2 refusing to run generated code: this machine refuses the sandbox's user namespace" in proc.stdout, proc
    assert "allow user namespaces" in proc.stdout and "--unsafe-exec" in proc.stdout
    assert "UNSAFE passed 1/1 False" in proc.stdout, proc
