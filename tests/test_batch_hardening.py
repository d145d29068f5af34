"""Batch files and output folders from elsewhere, tried as a careless or hostile user would: nothing
is written or deleted outside --out, a manifest is never trusted or followed through a link, and
YAML is bounded before it is expanded (an alias bomb or a 100 MB file is refused at once, with
the memory and time measured on the real `studio` process).

Uses the toy pipelines of tests/test_batch.py (registered through the real registry)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import presets, yamlfile
from studio.errors import UsageError
from tests.test_batch import done_records, outputs_of, toys, write  # noqa: F401  (toys: a fixture)

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_job(tmp_path: Path, model: Path, **top) -> Path:
    return write(tmp_path / "b.yaml", {**top, "defaults": {"model": str(model), "width": 8, "height": 8},
                                       "jobs": [{"task": "toy-image", "prompt": "p", "seed": 1}]})


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def rewrite_manifest(out: Path, rows: list[dict]) -> None:
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- names inside --out
@pytest.mark.parametrize("template", ["../../x-{seed}", "/tmp/studio-abs-{seed}", "~/x-{seed}", "sub/../../x-{seed}",
                                      "{seed:/>4}-x", "..\\x-{seed}"])
def test_a_template_that_leaves_out_is_refused_at_validation_with_its_line(toys, tmp_path, cli, template):
    f = one_job(tmp_path, toys, template=template)
    for args in (("validate", f), ("run", f, "--out", tmp_path / "out")):
        result = cli(*args)
        assert result.exit_code == 2, result
        assert result.stderr.startswith("error: ") and "hint: " in result.stderr and "Traceback" not in result.output
        assert "outside the output folder" in result.stderr and "b.yaml:1" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.parent.glob("x-*")) and not list(Path("/tmp").glob("studio-abs-*"))


def test_a_template_with_a_subfolder_writes_inside_and_resumes(toys, tmp_path, cli):
    out = tmp_path / "out"
    f = one_job(tmp_path, toys, template="renders/{job}-{seed}")
    assert cli("run", f, "--out", out, "--quiet").exit_code == 0
    assert (out / "renders" / "job1-1.png").is_file()
    [record] = done_records(out)
    assert record["outputs"][0]["file"] == "renders/job1-1.png"
    again = cli("run", f, "--out", out, "--resume", "--json")
    assert json.loads(again.stdout.splitlines()[-1])["summary"]["skipped"] == 1


# --------------------------------------------------------------------------- --resume deletes only what studio wrote
def test_crafted_manifest_rows_cannot_make_resume_delete_or_read_outside_out(toys, tmp_path, cli):
    out = tmp_path / "out"
    f = one_job(tmp_path, toys)
    assert cli("run", f, "--out", out, "--quiet").exit_code == 0
    [record] = done_records(out)
    tag = record["job"]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    elsewhere = tmp_path / "elsewhere" / "victim2.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("also precious")
    crafted = [{"file": "../victim.txt", "job": tag, "sha256": sha256(victim)},
               {"file": str(elsewhere), "job": tag, "sha256": sha256(elsewhere)},
               {"event": "job-done", "job": tag, "name": "job1",
                "outputs": [{"file": "../victim.txt", "kind": "image", "sha256": sha256(victim)}]}]
    rewrite_manifest(out, [r for r in manifest_rows(out) if r.get("event") != "job-done"] + crafted)

    result = cli("run", f, "--out", out, "--resume", "--json")
    assert result.exit_code == 0, result
    assert victim.read_text() == "precious" and elsewhere.read_text() == "also precious"
    assert "ignored 2 row(s)" in result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["done"] == 1  # the crafted job-done row named a file outside: not trusted, the job redone
    assert outputs_of(out) == ["job1-1-p.png"]  # its own earlier output (hash matched) was replaced, not doubled


def test_resume_never_follows_a_symlink_at_an_output_or_on_its_way(toys, tmp_path, cli):
    out = tmp_path / "out"
    f = one_job(tmp_path, toys, template="sub/{job}")
    assert cli("run", f, "--out", out, "--quiet").exit_code == 0
    outside = tmp_path / "outside"
    shutil.move(out / "sub", outside)  # the same bytes (same sha256) now sit outside --out ...
    (out / "sub").symlink_to(outside)  # ... reached through a linked subfolder
    rewrite_manifest(out, [r for r in manifest_rows(out) if r.get("event") != "job-done"])
    result = cli("run", f, "--out", out, "--resume")
    assert (outside / "job1.png").is_file() and (outside / "job1.json").is_file()
    assert "symbolic link" in result.stderr
    assert result.exit_code == 1  # the redo refuses to write through the link, and says so

    out2 = tmp_path / "out2"
    f2 = one_job(tmp_path, toys)
    assert cli("run", f2, "--out", out2, "--quiet").exit_code == 0
    [name] = outputs_of(out2)
    target = tmp_path / "target.png"
    shutil.copy(out2 / name, target)  # same content: a hash check that followed the link would match
    (out2 / name).unlink()
    (out2 / name).symlink_to(target)
    rewrite_manifest(out2, [r for r in manifest_rows(out2) if r.get("event") != "job-done"])
    result = cli("run", f2, "--out", out2, "--resume")
    assert result.exit_code == 0, result
    assert target.is_file() and (out2 / name).is_symlink()
    assert f"keeping {out2 / name}: it is a symbolic link" in result.stderr


def test_resume_keeps_files_without_a_recorded_hash_or_that_changed_and_says_so(toys, tmp_path, cli):
    out = tmp_path / "out"
    f = write(tmp_path / "b.yaml", {"defaults": {"model": str(toys), "width": 8, "height": 8},
                                    "jobs": [{"task": "toy-image", "prompt": "p", "seeds": [1, 2]}]})
    assert cli("run", f, "--out", out, "--quiet").exit_code == 0
    first, second = outputs_of(out)
    rows = [r for r in manifest_rows(out) if r.get("event") != "job-done"]
    for r in rows:
        if r.get("file") == first:
            del r["sha256"]  # as an older studio wrote it
    rewrite_manifest(out, rows)
    (out / second).write_bytes((out / second).read_bytes() + b"edited")  # the user changed it
    result = cli("run", f, "--out", out, "--resume")
    assert result.exit_code == 0, result
    assert "records no sha256" in result.stderr and "changed since studio wrote it" in result.stderr
    assert {first, second} <= set(outputs_of(out)) and len(outputs_of(out)) == 4  # kept, and redone beside


@pytest.mark.parametrize("how", ["link to a file", "dangling link"])
def test_a_manifest_that_is_a_symlink_is_refused_and_never_written(toys, tmp_path, cli, how):
    out = tmp_path / "out"
    out.mkdir()
    other = tmp_path / "other.jsonl"
    if how == "link to a file":
        other.write_text("someone else's log\n")
    (out / "manifest.jsonl").symlink_to(other)
    f = one_job(tmp_path, toys)
    for extra in ((), ("--resume",), ("--resume", "--dry-run")):
        result = cli("run", f, "--out", out, *extra)
        assert result.exit_code == 2, result
        assert "symbolic link" in result.stderr and "Traceback" not in result.output
    assert outputs_of(out) == [] and (out / "manifest.jsonl").is_symlink()
    assert other.read_text() == "someone else's log\n" if how == "link to a file" else not other.exists()


# --------------------------------------------------------------------------- YAML bounded before it is expanded
def billion_laughs() -> str:
    """Nine levels of nine aliases: ~370 bytes that stand for 9**9 = 387 million strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\njobs: [{task: toy-image, prompt: *i}]\n"


# A small parent process runs the command and reports its peak memory: a child forked straight from
# pytest starts with pytest's own pages resident (torch and all), and its ru_maxrss would count them.
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - started
print(json.dumps({"code": code, "wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measured(args: list[str], env: dict) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MB, stderr) of one command."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], env=env, capture_output=True, text=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return info["code"], info["wall"], info["rss_mb"], done.stderr


def test_an_alias_bomb_and_a_100_mb_file_are_refused_at_once_in_little_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert len(bomb.read_bytes()) < 400
    million = tmp_path / "million.yaml"
    line = '  - {task: image, prompt: "a photo of a cat, number 0000000", seed: 1, steps: 2, width: 256, height: 256}\n'
    with open(million, "w") as f:
        f.write("jobs:\n")
        for _ in range(100):
            f.write(line * 10_000)
    assert million.stat().st_size > 100e6
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STUDIO_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    studio = [sys.executable, "-m", "studio"]
    _, baseline, _, _ = measured(studio + ["--help"], env)  # the CLI's own start-up, on this machine now
    try:
        for args, says in ((["validate", bomb], "once its aliases are expanded"),
                           (["run", bomb, "--out", tmp_path / "out"], "once its aliases are expanded"),
                           (["validate", million], "more than studio reads"),
                           (["run", million, "--out", tmp_path / "out"], "more than studio reads")):
            code, wall, rss, stderr = measured(studio + args, env)
            assert code == 2, stderr
            assert stderr.startswith("error: ") and says in stderr and "hint: " in stderr, stderr
            assert rss < 200, f"{args[0]} {Path(args[1]).name}: {rss:.0f} MB"
            assert wall - baseline < 1.0, f"{args[0]} {Path(args[1]).name}: {wall:.2f} s (start-up {baseline:.2f} s)"
        assert not (tmp_path / "out").exists()
    finally:
        million.unlink()


def test_job_entries_are_counted_while_the_file_streams_in(toys, tmp_path, cli):
    many = tmp_path / "many.yaml"
    many.write_text("jobs:\n" + "  - {task: toy-image, prompt: x}\n" * (yamlfile.MAX_YAML_ITEMS + 1))
    started = time.perf_counter()
    result = cli("validate", many)
    assert time.perf_counter() - started < 2.0
    assert result.exit_code == 2 and f"many.yaml:{yamlfile.MAX_YAML_ITEMS + 2}" in result.stderr, result
    assert f"more than {yamlfile.MAX_YAML_ITEMS:,} entries under `jobs:`" in result.stderr


@pytest.mark.parametrize("text, says", [
    ("a: &a [1, *a]\njobs: [{task: toy-image, prompt: x}]\n", "recursive alias"),
    ("jobs:\n  - {task: toy-image, prompt: x, seed: " + "[" * 80 + "]" * 80 + "}\n", "nested more than"),
    ("jobs:\n  - task: toy-image\n    prompt: '" + "{a|b}" * 20 + "'\n", "expands to more than 100000 jobs"),
    ("jobs:\n  - task: toy-image\n    prompt: '{a|b|c|d|e|f|g|h|i|j}'\n    seeds: [" + ", ".join(map(str, range(10_001)))
     + "]\n", "expands to more than 100000 jobs"),  # 10 x 10001 seeds
])
def test_other_expansions_are_bounded_before_they_are_built(toys, tmp_path, cli, text, says):
    f = write(tmp_path / "b.yaml", text)
    result = cli("validate", f)
    assert result.exit_code == 2, result
    assert says in result.stderr and "b.yaml:" in result.stderr, result.stderr


def test_a_bomb_preset_is_refused_and_does_not_stall_presets_list(isolated_home, cli):
    (isolated_home / "presets").mkdir()
    (isolated_home / "presets" / "boom.yaml").write_text("task: image\n" + billion_laughs().replace("jobs:", "tags:"))
    started = time.perf_counter()
    with pytest.raises(UsageError) as err:
        presets.read_preset("boom")
    assert "once its aliases are expanded" in err.value.message
    listed = cli("presets", "list", "--json")
    assert listed.exit_code == 0, listed
    row = next(json.loads(line) for line in listed.stdout.splitlines() if json.loads(line)["name"] == "boom")
    assert "not a valid preset" in row["description"]
    assert time.perf_counter() - started < 3.0


# --------------------------------------------------------------------------- outputs stream to disk
class Counter:
    """A toy task that yields its images one by one and notes, before making each, how many of
    its outputs are already on disk (a runner that collected them first would see 0 each time)."""

    task = "toy-count"
    output_kinds = ("image",)
    folder: Path | None = None
    seen: list[int] = []

    @classmethod
    def load(cls, spec, device):
        return cls()

    def check_inputs(self, request):
        pass

    def run(self, request, progress):
        from PIL import Image

        from studio.outputs import Result

        for k in range(request.num_outputs):
            Counter.seen.append(len(list(Counter.folder.glob("*.png"))))
            yield Result(kind="image", value=Image.new("RGB", (8, 8), (k, 0, 0)),
                         params={"prompt": request.prompt, "seed": request.seed + k, "num_outputs": 1})


def test_a_jobs_outputs_are_written_as_the_pipeline_makes_them(toys, tmp_path, monkeypatch):
    from dataclasses import dataclass

    from studio import registry
    from studio.batch import run_file

    @dataclass(frozen=True)
    class CountRequest:
        prompt: str  # text
        model: str = "auto"  # unused
        seed: int | None = None  # first seed
        num_outputs: int = 1  # images

    Counter.request_type = CountRequest
    monkeypatch.setitem(registry.BUILTIN_TASKS, "toy-count", f"{__name__}:Counter")
    Counter.folder, Counter.seen = tmp_path / "out", []
    report = run_file({"jobs": [{"task": "toy-count", "prompt": "n", "seed": 1, "num_outputs": 5, "model": str(toys)}]},
                      out_dir=tmp_path / "out")
    assert report.failed == 0 and len(report.paths("job1")) == 5
    assert Counter.seen == [0, 1, 2, 3, 4]
