"""Batch files, multi-step pipelines, resume and distributed runs (studio/batch.py, `studio run`).

The runner is tested on small real pipelines defined here (a seeded painter, a captioner that
describes pixels, a tone generator, an animator), registered through the real registry (and, for
the subprocess tests, through STUDIO_EXTRA_TASKS), so these tests do not depend on model code. The
end-to-end tests at the bottom run the same files on the tiny random models of pipelines/.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from studio import registry
from studio.errors import UsageError
from studio.outputs import Result, read_manifest, sha256_file
from studio.pipeline import load_image, seeds_for

ROOT = Path(__file__).resolve().parent.parent
MODULE = __name__  # "tests.test_batch" under pytest; the subprocesses import it the same way


# --------------------------------------------------------------------------- toy pipelines
def _load_weights(spec) -> dict:
    """The toys' 'weights': a JSON file in the model folder, read like a real model folder."""
    path = Path(spec.source) / "toy.json"
    if not path.exists():
        raise UsageError(f"{spec.source} holds no toy.json", "build the toy model first")
    return json.loads(path.read_text())


class _Toy:
    """A toy pipeline whose load only checks that its 'weights' are there."""

    @classmethod
    def load(cls, spec, device):
        _load_weights(spec)
        return cls()


@dataclass(frozen=True)
class PaintRequest:
    prompt: str  # picks the palette (crc32)
    model: str = "auto"  # folder holding toy.json
    seed: int | None = None  # noise seed
    seeds: tuple[int, ...] | None = None  # explicit seeds, one image each (lets the runner merge a sweep)
    width: int = 16  # image width
    height: int = 16  # image height
    num_outputs: int = 1  # images per request (seed, seed+1, ...)
    delay: float = 0.0  # seconds per image, so a kill lands mid-run
    fail: bool = False  # raise, to test that one failure does not stop a batch


class Paint:
    task = "toy-image"
    request_type = PaintRequest
    output_kinds = ("image",)
    loads = 0
    calls = 0

    @classmethod
    def load(cls, spec, device):
        cls.loads += 1
        self = cls()
        self.gain = _load_weights(spec)["gain"]
        return self

    def check_inputs(self, request):
        if request.width < 1 or request.height < 1:
            raise UsageError("width and height must be positive", "pass e.g. width: 16")

    def run(self, request, progress):
        Paint.calls += 1
        if request.fail:
            raise RuntimeError("the painter was asked to fail")
        out = []
        for seed in seeds_for(request.seed, request.num_outputs, request.seeds):
            time.sleep(request.delay)
            params = {**asdict(request), "seed": seed, "seeds": None, "num_outputs": 1}
            out.append(Result(kind="image", value=Image.fromarray(paint(request.prompt, seed, request.width, request.height, self.gain)), params=params))
        return out


def paint(prompt: str, seed: int, width: int = 16, height: int = 16, gain: float = 1.0) -> np.ndarray:
    """The pixels Paint makes for (prompt, seed): what a test expects to read back."""
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    return (rng.integers(0, 256, (height, width, 3)) * gain).clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DescribeRequest:
    images: list[str]  # image files
    model: str = "auto"  # folder holding toy.json


class Describe(_Toy):
    task = "toy-caption"
    request_type = DescribeRequest
    output_kinds = ("text",)
    seedless = True

    def run(self, request, progress):
        out = []
        for path in request.images:
            r, g, b = np.asarray(load_image(path)).reshape(-1, 3).mean(0).round().astype(int)
            text = f"a {'warm' if r > b else 'cool'} picture, mean colour {r} {g} {b}"
            out.append(Result(kind="text", value=text, params={**asdict(request), "images": [str(path)]}))
        return out


@dataclass(frozen=True)
class ToneRequest:
    prompt: str  # picks the pitch
    model: str = "auto"  # folder holding toy.json
    seed: int | None = None  # recorded
    seconds: float = 1.0  # length
    sample_rate: int = 16000  # Hz


class Tone(_Toy):
    task = "toy-audio"
    request_type = ToneRequest
    output_kinds = ("audio",)

    def run(self, request, progress):
        freq = 200 + zlib.crc32(request.prompt.encode()) % 600
        t = np.arange(int(request.seconds * request.sample_rate)) / request.sample_rate
        samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        return [Result(kind="audio", value=(samples, request.sample_rate), params=asdict(request))]


@dataclass(frozen=True)
class AnimateRequest:
    init_image: str  # the first frame
    model: str = "auto"  # folder holding toy.json
    seed: int | None = None  # recorded
    frames: int = 4  # frames to make
    fps: int = 4  # frames per second


class Animate(_Toy):
    task = "toy-video"
    request_type = AnimateRequest
    output_kinds = ("video",)

    def run(self, request, progress):
        first = np.asarray(load_image(request.init_image).resize((32, 32)))
        frames = [Image.fromarray(np.roll(first, 4 * i, axis=1)) for i in range(request.frames)]
        return [Result(kind="video", value=frames, params=asdict(request))]


TOYS = {"toy-image": "Paint", "toy-caption": "Describe", "toy-audio": "Tone", "toy-video": "Animate"}
EXTRA_TASKS = ",".join(f"{task}={MODULE}:{cls}" for task, cls in TOYS.items())


@pytest.fixture
def toys(monkeypatch, tmp_path):
    """Register the toy tasks through the registry and return a toy model folder."""
    for task, cls in TOYS.items():
        monkeypatch.setitem(registry.BUILTIN_TASKS, task, f"{MODULE}:{cls}")
    model = tmp_path / "toy-model"
    model.mkdir()
    (model / "toy.json").write_text(json.dumps({"gain": 1.0}))
    registry.clear_cache()
    yield model
    registry.clear_cache()


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def outputs_of(out: Path) -> list[str]:
    """Output files in a folder (no sidecars, manifest or hidden files)."""
    return sorted(p.name for p in out.iterdir()
                  if not p.name.startswith(".") and p.suffix != ".json" and p.name != "manifest.jsonl")


def done_records(out: Path) -> list[dict]:
    return [r for r in read_manifest(out) if r.get("event") == "job-done"]


# --------------------------------------------------------------------------- validation
def test_alternation_and_seeds_expand_and_jobs_sharing_a_model_run_together(toys, tmp_path):
    from studio.batch import BatchFile

    other = tmp_path / "other-model"
    other.mkdir()
    (other / "toy.json").write_text('{"gain": 0.5}')
    f = write(tmp_path / "b.yaml", {
        "defaults": {"model": str(toys), "width": 8},
        "jobs": [
            {"task": "toy-image", "prompt": "a {red|blue} {cat|dog}", "seeds": [1, 2]},
            {"task": "toy-image", "prompt": "plain", "model": str(other), "name": "odd"},
            {"task": "toy-audio", "prompt": "a {low|high} tone"},
            {"task": "toy-image", "prompt": "last", "seed": 3},
        ]})
    batch = BatchFile.load(f)
    names = [j.name for j in batch.jobs]
    # 8 + 1 + 2 + 1 jobs; the two toy-model image entries run back to back, before the other model
    assert names == [f"job1.{k}" for k in range(1, 9)] + ["job4", "odd", "job3.1", "job3.2"]
    prompts = [j.params["prompt"] for j in batch.jobs[:8:2]]
    assert prompts == ["a red cat", "a red dog", "a blue cat", "a blue dog"]
    assert [j.params["seed"] for j in batch.jobs[:2]] == [1, 2]
    assert batch.jobs[0].params["width"] == 8 and "width" not in batch.jobs[-1].params  # toy-audio has no width


BAD_FILES = {
    # name: (yaml text, what the message must say, line)
    "unknown key": ("jobs:\n  - task: toy-image\n    prompt: x\n    stesp: 3\n", "'stesp'", 4),
    "unused default": ("defaults:\n  widht: 3\njobs:\n  - task: toy-image\n    prompt: x\n", "'widht'", 2),
    "bad value": ("jobs:\n  - task: toy-image\n    prompt: x\n    width: big\n", "width", 4),
    "bad device": ("defaults:\n  precision: fp64\njobs:\n  - {task: toy-image, prompt: x}\n", "precision", 2),
    "missing field": ("jobs:\n  - task: toy-image\n    seed: 1\n", "needs 'prompt'", 2),
    "unknown task": ("jobs:\n  - task: paint\n    prompt: x\n", "unknown task 'paint'", 2),
    "duplicate key": ("jobs:\n  - task: toy-image\n    prompt: x\n    prompt: y\n", "duplicate key 'prompt'", 4),
    "yaml syntax": ("jobs:\n  - task: toy-image\n    prompt: [x\n", "not valid YAML", 4),
    "unknown step": ("steps:\n  a: {task: toy-image, prompt: x}\n  b: {task: toy-caption, images: '${hreo.image}'}\n",
                     "no step is named 'hreo'", 3),
    "cycle": ("steps:\n  a: {task: toy-image, prompt: '${b.text}'}\n  b: {task: toy-caption, images: '${a.image}'}\n",
              "steps form a cycle: a -> b -> a", None),
    "audio for image": ("steps:\n  t: {task: toy-audio, prompt: x}\n  v: {task: toy-video, init_image: '${t.audio}'}\n",
                        "init_image needs an image, but t gives audio", 3),
    "kind not made": ("steps:\n  t: {task: toy-audio, prompt: x}\n  v: {task: toy-video, init_image: '${t.image}'}\n",
                      "makes audio, not image", 3),
    "file inside text": ("steps:\n  h: {task: toy-image, prompt: x}\n  t: {task: toy-audio, prompt: 'like ${h.image}'}\n",
                         "prompt needs text, but h gives image", 3),
    "ref in jobs": ("steps:\n  h: {task: toy-image, prompt: x}\njobs:\n  - {task: toy-caption, images: '${h.image}'}\n",
                    "only steps: can use", 4),
    "seeds in a step": ("steps:\n  h: {task: toy-image, prompt: x, seeds: [1, 2]}\n", "'seeds' is not allowed in step h", 2),
    "unknown top key": ("job:\n  - {task: toy-image, prompt: x}\n", "did you mean 'jobs'", 1),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_validate_rejects_bad_files_naming_key_and_line_before_anything_runs(toys, tmp_path, cli, case):
    text, says, line = BAD_FILES[case]
    f = write(tmp_path / "b.yaml", text)
    result = cli("validate", f)
    assert result.exit_code == 2, result
    assert result.stderr.startswith("error: ") and "hint: " in result.stderr and "Traceback" not in result.output
    assert says in result.stderr, result.stderr
    if line is not None:
        assert f"b.yaml:{line}" in result.stderr, result.stderr
    ran = cli("run", f, "--out", tmp_path / "out")  # `run` checks the same way, and writes nothing
    assert ran.exit_code == 2 and not (tmp_path / "out").exists()


def test_validate_accepts_good_files_and_presets(toys, tmp_path, cli, isolated_home):
    f = write(tmp_path / "ok.yaml", {"defaults": {"model": str(toys)},
                                     "jobs": [{"task": "toy-image", "prompt": "{a|b}", "seeds": [1, 2]}],
                                     "steps": {"h": {"task": "toy-image", "prompt": "x"},
                                               "d": {"task": "toy-caption", "images": "${h.image}"}}})
    result = cli("validate", f, "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout) | {"warnings": []} == {"ok": True, "file": str(f), "kind": "batch", "jobs": 4,
                                                             "steps": 2, "tasks": ["toy-caption", "toy-image"], "warnings": []}
    preset = write(tmp_path / "p.yaml", "task: toy-image\nwidth: 4\n")
    assert cli("validate", preset).stdout.startswith(f"ok: {preset}: preset for toy-image")


# --------------------------------------------------------------------------- running
def test_batch_runs_every_job_loads_each_model_once_and_counts_failures_in_the_exit_code(toys, tmp_path, cli):
    Paint.loads = 0
    f = write(tmp_path / "b.yaml", {
        "defaults": {"model": str(toys), "width": 8, "height": 8},
        "jobs": [{"task": "toy-image", "prompt": "cat {one|two}", "seed": 5},
                 {"task": "toy-image", "prompt": "boom", "fail": True, "name": "bad"},
                 {"task": "toy-image", "prompt": "bang", "fail": True, "name": "worse"},
                 {"task": "toy-audio", "prompt": "hum", "seconds": 0.25},
                 {"task": "toy-image", "prompt": "dog", "seed": 6}]})
    result = cli("run", f, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 2, result  # two jobs failed; the other four ran
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]["summary"]
    assert (summary["done"], summary["failed"], summary["jobs"]) == (4, 2, 6)
    assert {f["job"] for f in summary["failures"]} == {"bad", "worse"}
    assert "the painter was asked to fail" in result.stderr
    assert Paint.loads == 1  # one load for all five image jobs
    out = tmp_path / "out"
    written = {row["job"]: Path(row["path"]) for row in lines if row.get("status") == "done"}
    assert set(written) == {"job1.1", "job1.2", "job5", "job4"}
    assert np.array_equal(np.asarray(Image.open(written["job1.2"])), paint("cat two", 5, 8, 8))
    assert np.array_equal(np.asarray(Image.open(written["job5"])), paint("dog", 6, 8, 8))
    assert sorted(r["name"] for r in done_records(out)) == ["job1.1", "job1.2", "job4", "job5"]
    for record in done_records(out):  # each record names complete files and their hashes
        for item in record["outputs"]:
            assert sha256_file(out / item["file"]) == item["sha256"]


def test_a_seed_sweep_is_merged_into_one_pipeline_call_with_the_same_pixels(toys, tmp_path):
    from studio.batch import Runner

    data = {"defaults": {"model": str(toys), "width": 8, "height": 8},
            "jobs": [{"task": "toy-image", "prompt": "sweep", "seeds": [3, 9, 4, 7, 1]}]}
    Paint.calls = 0
    merged = Runner(data, out_dir=tmp_path / "merged", merge=4).run()
    assert Paint.calls == 2  # 4 + 1
    Paint.calls = 0
    single = Runner(data, out_dir=tmp_path / "single", merge=1).run()
    assert Paint.calls == 5
    for a, b in zip(merged.outcomes, single.outcomes):
        assert a.job == b.job and a.status == b.status == "done"
        assert np.array_equal(np.asarray(Image.open(a.outputs[0].path)), np.asarray(Image.open(b.outputs[0].path)))
    assert [json.loads(o.outputs[0].path.with_suffix(".json").read_text())["params"]["seed"]
            for o in merged.outcomes] == [3, 9, 4, 7, 1]


STORY = {
    "defaults": {"model": None},
    "steps": {
        "hero": {"task": "toy-image", "prompt": "a lighthouse at dusk", "seed": 7, "width": 32, "height": 32},
        "desc": {"task": "toy-caption", "images": "${hero.image}"},
        "theme": {"task": "toy-audio", "prompt": "${desc.text}, calm piano", "seconds": 2},
        "clip": {"task": "toy-video", "init_image": "${hero.image}", "frames": 4, "fps": 4},
        "final": {"task": "mux", "video": "${clip.video}", "audio": "${theme.audio}", "loop_video": True},
    }}


def story(toys) -> dict:
    return {**STORY, "defaults": {"model": str(toys)}}


def media_streams(path: Path) -> tuple[list[str], float]:
    """(stream kinds, duration in seconds) of a media file, from ffmpeg's own report."""
    import re

    import imageio_ffmpeg

    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                          capture_output=True, text=True).stderr
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", info).groups()
    return re.findall(r"Stream #\S+.*?: (Video|Audio)", info), int(h) * 3600 + int(m) * 60 + float(s)


def test_storyboard_steps_pass_images_text_and_audio_and_mux_the_final_mp4(toys, tmp_path):
    from studio.batch import run_file

    report = run_file(story(toys), out_dir=tmp_path / "story")
    assert report.failed == 0 and [o.job for o in report.outcomes] == ["hero", "desc", "theme", "clip", "final"]
    caption = report.text("desc")
    assert caption == (tmp_path / "story" / "desc.txt").read_text() and caption.startswith("a ")
    theme = json.loads((tmp_path / "story" / "theme.json").read_text())
    assert theme["params"]["prompt"] == f"{caption}, calm piano"  # the caption became the music prompt
    clip = json.loads((tmp_path / "story" / "clip.json").read_text())
    assert Path(clip["params"]["init_image"]) == (tmp_path / "story" / "hero.png").resolve()
    streams, seconds = media_streams(report.paths("final")[0])
    assert sorted(streams) == ["Audio", "Video"]
    assert 1.8 <= seconds <= 2.3  # the 1 s clip looped under the 2 s theme
    assert outputs_of(tmp_path / "story") == ["clip.mp4", "desc.txt", "final.mp4", "hero.png", "theme.wav"]


def test_mux_without_looping_ends_with_the_shorter_stream(toys, tmp_path):
    from studio.batch import run_file

    report = run_file({"defaults": {"model": str(toys)}, "steps": {
        "still": {"task": "toy-image", "prompt": "x", "seed": 1},
        "tone": {"task": "toy-audio", "prompt": "y", "seconds": 3},
        "clip": {"task": "toy-video", "init_image": "${still.image}", "frames": 6, "fps": 4},
        "both": {"task": "mux", "video": "${clip.video}", "audio": "${tone.audio}"}}}, out_dir=tmp_path / "m")
    assert report.failed == 0, report.summary()
    streams, seconds = media_streams(report.paths("both")[0])
    assert sorted(streams) == ["Audio", "Video"] and 1.4 <= seconds <= 1.7  # 6 frames at 4 fps, not 3 s


def test_steps_after_a_failed_step_are_blocked_and_counted(toys, tmp_path, cli):
    data = story(toys)
    data["steps"] = {**data["steps"], "hero": {**data["steps"]["hero"], "fail": True}}
    f = write(tmp_path / "s.yaml", data)
    result = cli("run", f, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 5, result  # hero failed; desc, theme, clip and final could not run
    assert "job hero failed" in result.stderr and "job final blocked: needs clip, theme" in result.stderr
    assert outputs_of(tmp_path / "out") == []


def test_dry_run_prints_the_plan_and_writes_nothing(toys, tmp_path, cli):
    f = write(tmp_path / "s.yaml", story(toys))
    result = cli("run", f, "--out", tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result
    plan = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(p["job"], p["after"], p["status"]) for p in plan] == [
        ("hero", [], "run"), ("desc", ["hero"], "run"), ("theme", ["desc"], "run"), ("clip", ["hero"], "run"),
        ("final", ["clip", "theme"], "run")]
    assert not (tmp_path / "out").exists()
    table = cli("run", f, "--out", tmp_path / "out", "--dry-run")
    assert table.exit_code == 0 and "final" in table.stdout and "clip, theme" in table.stdout


def test_resume_skips_complete_jobs_and_redoes_missing_or_interrupted_ones(toys, tmp_path, cli):
    out = tmp_path / "out"
    f = write(tmp_path / "b.yaml", {"defaults": {"model": str(toys), "width": 8, "height": 8},
                                    "jobs": [{"task": "toy-image", "prompt": "p", "seeds": [1, 2, 3, 4]}]})
    assert cli("run", f, "--out", out, "--quiet").exit_code == 0
    files = outputs_of(out)
    assert len(files) == 4
    before = {name: (out / name).stat().st_mtime_ns for name in files}
    # job1.1's file is deleted; job1.2 was "killed": its output is there, its job-done record is not,
    # and an atomic write of it left a temp file behind
    (out / files[0]).unlink()
    rows = (out / "manifest.jsonl").read_text().splitlines()
    kept = [r for r in rows if not ('"job-done"' in r and '"name": "job1.2"' in r)]
    (out / "manifest.jsonl").write_text("\n".join(kept) + "\n" + '{"file": "torn')  # and a torn last line
    (out / f".{Path(files[1]).stem}.a1b2c3d4.tmp.png").write_bytes(b"\x89PNG half")

    plan = cli("run", f, "--out", out, "--resume", "--dry-run", "--json")
    assert [json.loads(line)["status"] for line in plan.stdout.splitlines()] == ["redo", "run", "skip", "skip"]
    result = cli("run", f, "--out", out, "--resume", "--json")
    assert result.exit_code == 0, result
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert (summary["done"], summary["skipped"]) == (2, 2)
    assert outputs_of(out) == files  # the same four names: nothing lost, nothing twice
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    for name in files[2:]:  # untouched
        assert (out / name).stat().st_mtime_ns == before[name]
    for seed, name in zip([1, 2, 3, 4], files):
        assert np.array_equal(np.asarray(Image.open(out / name)), paint("p", seed, 8, 8))
    assert sorted(r["name"] for r in done_records(out)) == ["job1.1", "job1.1", "job1.2", "job1.3", "job1.4"]
    again = cli("run", f, "--out", out, "--resume", "--json")
    assert json.loads(again.stdout.splitlines()[-1])["summary"]["skipped"] == 4


def test_presets_sit_under_defaults_and_job_keys(toys, tmp_path, isolated_home):
    from studio.batch import run_file

    (isolated_home / "presets").mkdir()
    write(isolated_home / "presets" / "tiny-paint.yaml", {"task": "toy-image", "model": str(toys), "width": 4,
                                                          "height": 4, "seed": 1})
    report = run_file({"defaults": {"height": 6},
                       "jobs": [{"preset": "tiny-paint", "prompt": "a"},
                                {"preset": "tiny-paint", "prompt": "b", "height": 2}]}, out_dir=tmp_path / "out")
    sizes = [Image.open(o.outputs[0].path).size for o in report.outcomes]
    assert sizes == [(4, 6), (4, 2)]  # preset < defaults < job
    meta = json.loads(report.outcomes[0].outputs[0].path.with_suffix(".json").read_text())
    assert meta["preset"] == "tiny-paint" and meta["params"]["seed"] == 1


def test_the_python_api_builds_a_pipeline_in_code(toys, tmp_path):
    from studio.batch import Runner

    runner = Runner({"steps": {"hero": {"task": "toy-image", "prompt": "x", "seed": 2, "model": str(toys)},
                               "desc": {"task": "toy-caption", "images": ["${hero.image}"], "model": str(toys)}}},
                    out_dir=tmp_path / "api")
    assert [item.status for item in runner.plan()] == ["run", "run"]
    report = runner.run()
    expected = paint("x", 2).reshape(-1, 3).mean(0).round().astype(int)
    assert report.text("desc").endswith(" ".join(map(str, expected)))
    assert report.exit_code == 0 and report.summary()["done"] == 2


# --------------------------------------------------------------------------- crash and distribution (subprocesses)
def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STUDIO_EXTRA_TASKS": EXTRA_TASKS, "HF_HUB_OFFLINE": "1",
           "STUDIO_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    return env


def test_kill_9_mid_run_then_resume_loses_nothing_and_does_nothing_twice(toys, tmp_path):
    out = tmp_path / "out"
    seeds = list(range(12))
    f = write(tmp_path / "b.yaml", {"defaults": {"model": str(toys), "width": 64, "height": 64, "delay": 0.15},
                                    "jobs": [{"task": "toy-image", "prompt": "k", "seeds": seeds}]})
    cmd = [sys.executable, "-m", "studio", "run", str(f), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(done_records(out) if out.exists() else []) < 3:
        time.sleep(0.02)
    time.sleep(0.07)  # land inside a job (each takes 0.15 s before its write)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r["name"] for r in done_records(out)}
    assert 3 <= len(finished) < len(seeds), "the kill should land mid-run"

    resumed = subprocess.run(cmd + ["--resume", "--json"], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])["summary"]
    assert summary["skipped"] == len(finished) and summary["done"] == len(seeds) - len(finished)
    records = done_records(out)
    assert sorted(r["name"] for r in records) == sorted(f"job1.{k + 1}" for k in range(len(seeds)))  # each once
    files = outputs_of(out)
    assert len(files) == len(seeds)  # one output per job: none lost, none twice
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # nothing half-written remains
    by_file = {item["file"]: item["sha256"] for r in records for item in r["outputs"]}
    assert sorted(by_file) == files
    for k, seed in enumerate(seeds):
        [item] = next(r for r in records if r["name"] == f"job1.{k + 1}")["outputs"]
        assert sha256_file(out / item["file"]) == item["sha256"]
        assert np.array_equal(np.asarray(Image.open(out / item["file"])), paint("k", seed, 64, 64))


def test_two_processes_split_the_jobs_and_run_each_exactly_once(toys, tmp_path):
    out = tmp_path / "out"
    data = story(toys)
    data["jobs"] = [{"task": "toy-image", "prompt": "p {a|b|c}", "seeds": [1, 2]}]
    f = write(tmp_path / "b.yaml", data)
    done = subprocess.run([sys.executable, "-m", "studio", "run", str(f), "--out", str(out), "--processes", "2",
                           "--device", "cpu", "--json"], env=_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    assert (summary["jobs"], summary["done"], summary["processes"]) == (11, 11, 2)
    records = done_records(out)
    names = [r["name"] for r in records]
    assert sorted(names) == sorted(set(names)) and len(names) == 11  # every job exactly once
    by_process = {}
    for r in records:
        by_process.setdefault(r["process"], set()).add(r["name"])
    assert set(by_process) == {0, 1}  # both processes worked
    story_steps = {"hero", "desc", "theme", "clip", "final"}
    assert any(story_steps <= names for names in by_process.values())  # a pipeline stays in one process
    assert len(outputs_of(out)) == 11


# --------------------------------------------------------------------------- the real pipelines, on tiny models
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def tiny_example(path: Path, tiny, out: Path) -> Path:
    """The example with its `model: tiny/KIND` folders pointed at this session's tiny models."""
    import re

    text = re.sub(r"model: tiny/([\w-]+)", lambda m: f"model: {tiny(m.group(1))}", path.read_text())
    text = re.sub(r"(?m)^out: .*$", f"out: {out}", text)
    copy = out.parent / path.name
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_validates(path, cli):
    result = cli("validate", path, "--json")
    assert result.exit_code == 0, result
    info = json.loads(result.stdout)
    assert info["ok"] and info["jobs"] + info["steps"] >= 5


def test_a_batch_file_on_the_tiny_sd_model_matches_single_runs(tiny, tmp_path):
    from studio import Studio
    from studio.batch import run_file

    model = tiny("sd")
    report = run_file({"defaults": {"model": str(model), "steps": 1, "width": 32, "height": 32},
                       "jobs": [{"task": "image", "prompt": "a red {fox|owl}", "seeds": [4, 5]}]},
                      out_dir=tmp_path / "batch", device={"device": "cpu"})
    assert report.failed == 0 and [o.job for o in report.outcomes] == ["job1.1", "job1.2", "job1.3", "job1.4"]
    [single] = Studio(device="cpu", out_dir=tmp_path / "single").image(prompt="a red owl", seed=5, steps=1,
                                                                        width=32, height=32, model=str(model))
    batched = report.paths("job1.4")[0]  # owl, seed 5: run in one merged call with seed 4
    assert np.array_equal(np.asarray(Image.open(batched)), np.asarray(Image.open(single.path)))
    meta = json.loads(batched.with_suffix(".json").read_text())
    assert (meta["params"]["seed"], meta["params"]["num_outputs"], meta["params"]["seeds"]) == (5, 1, None)


@pytest.mark.slow  # four tiny models and five pipelines: ~1-3 min on a 2-core machine
def test_the_examples_run_end_to_end_on_tiny_models(tiny, tmp_path):
    from studio.batch import run_file

    story = run_file(tiny_example(ROOT / "examples" / "storyboard.yaml", tiny, tmp_path / "story"), device={"device": "cpu"})
    assert story.failed == 0, story.summary()
    assert outputs_of(tmp_path / "story") == ["clip.mp4", "desc.txt", "final.mp4", "hero.png", "theme.wav"]
    theme = json.loads((tmp_path / "story" / "theme.json").read_text())
    assert theme["params"]["prompt"].startswith(story.text("desc"))
    streams, seconds = media_streams(tmp_path / "story" / "final.mp4")
    assert sorted(streams) == ["Audio", "Video"] and seconds > 0.5

    batch = run_file(tiny_example(ROOT / "examples" / "batch.yaml", tiny, tmp_path / "batch"), device={"device": "cpu"})
    assert batch.failed == 0 and batch.count("done") == 18, batch.summary()
    assert len(outputs_of(tmp_path / "batch")) == 18
