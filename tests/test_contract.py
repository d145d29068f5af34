"""The pipeline contract (studio/pipeline.py), checked on EVERY registered task, in the spirit of
diffusers' PipelineTesterMixin: each task's class satisfies the Protocol, loads its tiny model
from a saved folder through the real `from_pretrained` path, runs and returns Results without
writing a file, gives the same bytes for the same seed, and turns a bad request into exit 2
through the CLI. PARAMS keeps each task's accepted parameter set explicit (diffusers'
pipeline_params.py): a field added or renamed is a decision, not an accident.

A task registered without a CASE fails here: add its tiny model, a good and a bad request."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from studio import registry
from studio.pipeline import Pipeline, Request, contract_problems

pytestmark = pytest.mark.usefixtures("one_thread")

# each task's accepted request fields (ImageRequest & co.), as the contract promises them
PARAMS: dict[str, frozenset[str]] = {
    "image": frozenset({
        "prompt", "negative_prompt", "model", "seed", "seeds", "num_outputs", "steps", "guidance", "width", "height",
        "scheduler", "init_image", "strength", "mask_image", "outpaint", "controls", "control_models", "adapters",
        "fuse_adapters", "weighting", "attention_maps", "hires", "hires_upscaler", "embeddings", "clip_skip", "freeu",
        "tile", "mask_blur", "xy", "ip_adapter", "ip_adapter_model", "t2i_adapters", "t2i_adapter_models", "refiner",
        "regions"}),
    "caption": frozenset({
        "images", "model", "prompt", "max_tokens", "beams", "batch_size", "interrogate", "tags", "clip_model",
        "top_tags", "adapters"}),
    "vqa": frozenset({"images", "questions", "model", "max_tokens", "beams", "batch_size", "adapters"}),
    "clip-embed": frozenset({"inputs", "model", "kind", "batch_size", "normalize"}),
    "music-midi": frozenset({
        "model", "bars", "seconds", "tempo", "key", "time_signature", "chords", "program", "instrument", "primer",
        "temperature", "top_k", "top_p", "num_outputs", "seed", "render", "soundfont", "adapters"}),
    "music-audio": frozenset({
        "prompt", "model", "duration", "melody", "guidance", "temperature", "top_k", "top_p", "num_outputs", "seed",
        "format", "window", "extend_stride"}),
    "video": frozenset({
        "prompt", "negative_prompt", "model", "motion_adapter", "frames", "fps", "width", "height", "steps",
        "guidance", "seed", "num_outputs", "format", "init_image", "strength", "motion_bucket_id",
        "noise_aug_strength", "prompt_map", "context_length", "context_stride", "controlnet", "control_frames",
        "control_scale", "interpolate", "interpolate_method", "decode_chunk_size", "adapters"}),
    "code": frozenset({
        "prompt", "instruction", "model", "max_tokens", "temperature", "top_p", "stop", "system", "lang", "raw",
        "infill", "at", "prefix", "suffix", "context", "context_tokens", "samples", "tests", "timeout", "memory_mb",
        "stream", "seed", "adapters", "syntax_check", "syntax_tries", "unsafe_exec"}),
    "mux": frozenset({"video", "audio", "loop_video", "shortest", "audio_bitrate"}),
    "video-interpolate": frozenset({"input", "factor", "fps", "method", "format"}),
    "music-render": frozenset({"input", "soundfont", "rate", "plain", "format"}),
    "upscale": frozenset({"images", "model", "scale", "prompt", "negative_prompt", "steps", "guidance", "noise_level",
                          "seed"}),
}


@dataclass(frozen=True)
class Case:
    tiny: str | None  # the tiny model kind (studio.pipelines.tiny.KINDS); None: the task loads none
    good: dict[str, Any]  # a small request that runs in a second or two ({photo}, {video}, {audio} filled in)
    bad: dict[str, Any]  # a request the task must refuse with exit 2, and the words its error says
    says: str = ""
    outputs: int = 1  # Results the good request makes
    extra: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "image": Case("sd", {"prompt": "a red cat", "steps": 2, "width": 32, "height": 32, "guidance": 1.0, "num_outputs": 2},
                  {"prompt": "a red cat", "steps": 0}, says="--steps", outputs=2),
    "caption": Case("blip-caption", {"images": ["{photo}"], "max_tokens": 4}, {"images": ["{photo}"], "max_tokens": 0},
                    says="max-tokens"),
    "vqa": Case("blip-vqa", {"images": ["{photo}"], "questions": ["what colour is it"], "max_tokens": 4},
                {"images": ["{photo}"], "questions": [" "]}, says="question"),
    "clip-embed": Case("clip", {"inputs": ["{photo}", "a red square"]}, {"inputs": ["{photo}"], "batch_size": 0},
                       says="--batch-size"),
    "music-midi": Case("midi-lm", {"bars": 1, "num_outputs": 2}, {"bars": 0}, says="--bars", outputs=2),
    "music-audio": Case("musicgen", {"prompt": "calm piano", "duration": 0.3, "num_outputs": 2},
                        {"prompt": "calm piano", "duration": -1}, says="--duration", outputs=2),
    "video": Case("animatediff", {"prompt": "a calm sea", "frames": 4, "steps": 2, "guidance": 1.0, "width": 32,
                                  "height": 32}, {"prompt": "a calm sea", "frames": 0}, says="frames"),
    "code": Case("code-lm", {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 1.0},
                 {"prompt": "def add(a, b):", "max_tokens": 0}, says="max"),
    "mux": Case(None, {"video": "{video}", "audio": "{audio}"}, {"video": "{video}", "audio": "{audio}",
                                                                  "audio_bitrate": "loud"}, says="bitrate"),
    "video-interpolate": Case(None, {"input": "{video}", "factor": 2}, {"input": "{video}", "factor": 0}, says="factor"),
    "music-render": Case(None, {"input": "{midi}", "plain": True, "rate": 8000}, {"input": "{midi}", "rate": 0},
                         says="sample rate"),
    "upscale": Case("sd-upscale", {"images": ["{photo}"], "prompt": "a cat", "steps": 2},
                    {"images": ["{photo}"], "scale": 100}, says="--scale"),
}

TASKS = sorted(registry.tasks())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A photo, a short MP4, a short WAV and a MIDI file the cases read (no model makes them)."""
    import imageio.v3 as iio
    import soundfile

    folder = tmp_path_factory.mktemp("contract-inputs")
    photo = folder / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photo)
    video = folder / "clip.mp4"
    frames = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    iio.imwrite(video, frames, fps=6, codec="libx264", macro_block_size=1)
    audio = folder / "tone.wav"
    soundfile.write(audio, (0.2 * np.sin(np.linspace(0, 440 * 2 * np.pi, 8000))).astype(np.float32), 8000)
    import pretty_midi

    midi = folder / "song.mid"
    song = pretty_midi.PrettyMIDI(initial_tempo=120)
    piano = pretty_midi.Instrument(program=0)
    piano.notes += [pretty_midi.Note(velocity=90, pitch=p, start=0.25 * i, end=0.25 * i + 0.2) for i, p in enumerate((60, 64, 67))]
    song.instruments.append(piano)
    song.write(str(midi))
    return {"photo": str(photo), "video": str(video), "audio": str(audio), "midi": str(midi)}


def case_for(task: str) -> Case:
    if task not in CASES:
        pytest.fail(f"task {task!r} is registered but has no contract case: add its tiny model and a good and a "
                    f"bad request to CASES in {Path(__file__).name}, and its fields to PARAMS")
    return CASES[task]


def fill(value: Any, inputs: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return inputs[value[1:-1]]
    if isinstance(value, list):
        return [fill(v, inputs) for v in value]
    return value


def request_values(task: str, kind: str, tiny, inputs, **overrides: Any) -> dict[str, Any]:
    case = case_for(task)
    values = {k: fill(v, inputs) for k, v in getattr(case, kind).items()}
    if case.tiny is not None:
        values["model"] = str(tiny(case.tiny))
    values.update(overrides)
    return values


def load(task: str, values: dict[str, Any]):
    """The pipeline and its request, loaded the way the engine loads them (resolve -> registry)."""
    from studio.device import DeviceSettings, get_device_manager
    from studio.engine import build_request

    cls = registry.pipeline_class(task)
    if getattr(cls, "needs_model", True):
        spec = registry.resolve_model(task, values["model"])
        device = get_device_manager(DeviceSettings(device="cpu"))
    else:
        spec = device = None
    return registry.load_pipeline(task, spec, device), build_request(cls.request_type, values)


def fingerprint(result) -> bytes:
    """The payload as bytes: what 'the same output' means for each kind."""
    v = result.value
    if result.kind == "image":
        return repr(v.size).encode() + np.asarray(v).tobytes()
    if result.kind == "audio":
        samples, rate = v
        return repr(rate).encode() + np.ascontiguousarray(samples).tobytes()
    if result.kind == "midi":
        return repr([(i.program, i.is_drum, [(n.pitch, n.velocity, round(n.start, 6), round(n.end, 6)) for n in i.notes])
                     for i in v.instruments]).encode()
    if result.kind == "video":
        return b"".join(np.asarray(f).tobytes() for f in v)
    if result.kind == "text":
        return str(v).encode()
    if result.kind == "json":
        return json.dumps(v, sort_keys=True, default=lambda o: np.asarray(o).tolist()).encode()
    if result.kind == "file":
        return Path(v).read_bytes()
    raise AssertionError(f"unknown result kind {result.kind}")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the checks
def test_every_case_names_a_registered_task():
    assert set(CASES) <= set(TASKS), f"CASES for unregistered tasks: {set(CASES) - set(TASKS)}"
    assert set(PARAMS) == set(CASES)


def test_the_contract_checker_catches_what_it_promises():
    """contract_problems is itself tested: each breach it names is found."""
    @dataclasses.dataclass  # not frozen, a synonym, no seed
    class Loose:
        cfg: float = 7.0
        model: str = "auto"

    class Broken:
        task = "broken"
        request_type = Loose

        def load(self, spec, device):  # not a classmethod
            return self

        def check_inputs(self, request):
            pass

        def run(self, req, bar):  # the contract's names are request, progress
            return []

    problems = " | ".join(contract_problems(Broken))
    for words in ("classmethod", "frozen", "'guidance'", "seed", "run takes"):
        assert words in problems, (words, problems)
    assert contract_problems(type("Nothing", (), {})) == ["Nothing lacks task, request_type, load, check_inputs, run"]


@pytest.mark.parametrize("task", TASKS)
def test_satisfies_the_protocol_and_keeps_its_parameter_set(task):
    cls = registry.pipeline_class(task)
    assert isinstance(cls, Pipeline)
    assert contract_problems(cls) == []
    case_for(task)
    fields = {f.name for f in dataclasses.fields(cls.request_type)}
    assert fields == PARAMS[task], (f"{task}: added {sorted(fields - PARAMS[task])}, "
                                    f"removed {sorted(PARAMS[task] - fields)}")


@pytest.mark.parametrize("task", TASKS)
def test_loads_runs_writes_nothing_and_is_reproducible(task, tiny, inputs, tmp_path, monkeypatch):
    from studio.outputs import Result
    from studio.progress import Progress

    case = case_for(task)
    cls = registry.pipeline_class(task)
    values = request_values(task, "good", tiny, inputs)
    seeded = not getattr(cls, "seedless", False)
    if seeded:
        values["seed"] = 7
    pipeline, request = load(task, values)
    assert isinstance(request, Request)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.model = "other"  # type: ignore[misc]  # a request is a value

    # run with the working folder and the temp folder watched: a pipeline writes no file
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = files_under(tmp_path)
    pipeline.check_inputs(request)
    results = list(pipeline.run(request, Progress(enabled=False)))
    assert len(results) == case.outputs
    assert all(isinstance(r, Result) and r.path is None for r in results)
    assert files_under(tmp_path) - before - files_under(scratch) == set(), "the pipeline wrote into the working folder"
    if seeded:
        assert [r.params["seed"] for r in results] == list(range(7, 7 + case.outputs))
    first = [fingerprint(r) for r in results]

    again = [fingerprint(r) for r in pipeline.run(request, Progress(enabled=False))]
    assert again == first, "same request and seed, different output"
    if seeded:
        other = [fingerprint(r) for r in pipeline.run(dataclasses.replace(request, seed=1000), Progress(enabled=False))]
        assert other[0] != first[0], "the seed does not reach the output"
    del results
    gc.collect()
    assert files_under(scratch) == set(), "temp files outlive the Results"


def payload(result) -> Any:
    """The object that holds an output's bulk (something a weak reference can watch)."""
    v = result.value
    return v[0] if isinstance(v, (tuple, list)) else v


@pytest.mark.parametrize("task", TASKS)
def test_many_outputs_stream_one_at_a_time(task, tiny, inputs, tmp_path):
    """A task that makes --num outputs yields them: each is written before the next is made, and
    neither the pipeline nor the engine holds an earlier one (peak memory does not grow with --num)."""
    from studio.engine import Engine, RunOptions

    cls = registry.pipeline_class(task)
    if "num_outputs" not in {f.name for f in dataclasses.fields(cls.request_type)}:
        pytest.skip(f"{task} makes one output per request")
    assert inspect.isgeneratorfunction(cls.run), f"{cls.__name__}.run returns a list: yield each output instead"
    values = request_values(task, "good", tiny, inputs, num_outputs=3, seed=3)
    refs = []
    engine = Engine(RunOptions(out_dir=tmp_path / "out", quiet=True))
    for result in engine.stream(task, values):
        assert result.path.is_file()  # written before it is handed on
        refs.append(weakref.ref(payload(result)))
        del result  # reference counting frees a let-go output at once (no gc pass needed)
        assert [r() is None for r in refs[:-1]] == [True] * (len(refs) - 1), "an earlier output is still held"
    assert len(refs) == 3
    written = engine.run(task, {**values, "num_outputs": 2})
    assert [r.value for r in written] == [None, None] and all(r.path.is_file() for r in written)


@pytest.mark.parametrize("task", TASKS)
def test_a_bad_request_is_exit_2_with_a_hint_and_writes_nothing(task, tiny, inputs, cli, tmp_path):
    """Through the CLI (`studio replay` of a crafted sidecar runs any task through the engine)."""
    case = case_for(task)
    meta = tmp_path / "bad.json"
    meta.write_text(json.dumps({"task": task, "params": request_values(task, "bad", tiny, inputs, seed=1)
                                if not getattr(registry.pipeline_class(task), "seedless", False)
                                else request_values(task, "bad", tiny, inputs)}))
    out = tmp_path / "out"
    result = cli("replay", meta, "--out", out)
    assert result.exit_code == 2, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and case.says in errors[0], result
    assert "hint: " in result.stderr and "Traceback" not in result.output
    assert not out.exists() or not files_under(out)
