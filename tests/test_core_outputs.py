"""The output writer: atomic, never overwriting, metadata a user's other tools can read, and a
manifest that concurrent processes append to without losing or tearing lines."""

import json
import multiprocessing as mp

import numpy as np
import pytest
from PIL import Image

from studio.errors import UsageError
from studio.outputs import OutputWriter, Result, append_jsonl, read_manifest, read_metadata, write_text_file


def image_result(seed=1, prompt="a red fox, (snow:1.2)"):
    img = Image.fromarray((np.random.default_rng(seed).random((16, 24, 3)) * 255).astype("uint8"))
    params = {"prompt": prompt, "negative_prompt": "blurry", "steps": 4, "guidance": 7.5, "seed": seed,
              "width": 24, "height": 16, "scheduler": "euler_a"}
    # the image pipeline records A1111's sampler labels beside the studio name (studio/infotext.py writes them)
    return Result(kind="image", value=img, params=params, extra={"model": {"name": "tiny-sd", "alias": "tiny-sd"},
                                                                 "sampler": {"sampler": "Euler a", "schedule": "Automatic"}})


def test_png_carries_a1111_parameters_and_studio_json(tmp_path):
    path = OutputWriter(tmp_path, task="image").write(image_result())
    with Image.open(path) as im:
        text = dict(im.text)
    lines = text["parameters"].splitlines()
    assert lines[0] == "a red fox, (snow:1.2)"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == "Steps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 24x16, Model: tiny-sd"
    assert json.loads(text["studio"])["params"]["seed"] == 1
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["task"] == "image" and sidecar["versions"]["torch"]
    assert read_metadata(path)["params"]["prompt"] == "a red fox, (snow:1.2)"


def test_never_overwrites_names_get_a_counter_and_manifest_records_hashes(tmp_path):
    writer = OutputWriter(tmp_path, task="image", template="{task}-{seed}")
    first = writer.write(image_result())
    second = writer.write(image_result())
    assert first.name == "image-1.png" and second.name == "image-1-1.png"
    rows = read_manifest(tmp_path)
    assert [r["file"] for r in rows] == [first.name, second.name]
    import hashlib

    assert rows[0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    bad = image_result()
    bad.value = "not an image"
    out = tmp_path / "out"
    with pytest.raises(Exception):
        OutputWriter(out, task="image", template="x").write(bad)
    assert [p.name for p in out.iterdir()] == []


def test_unwritable_or_file_out_dir_is_a_usage_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        OutputWriter(f, task="image")


def test_text_sidecar_refuses_to_overwrite_unless_asked(tmp_path):
    target = tmp_path / "photo.txt"
    write_text_file(target, "first")
    with pytest.raises(UsageError, match="exists"):
        write_text_file(target, "second")
    write_text_file(target, "second", overwrite=True)
    assert target.read_text() == "second"


@pytest.mark.parametrize("kind,value,fmt", [
    ("audio", (np.sin(np.linspace(0, 440, 8000)).astype("float32"), 8000), "wav"),
    ("audio", (np.zeros((2, 4000), dtype="float32"), 8000), "flac"),
    ("text", "def f():\n    return 1\n", "py"),
    ("json", {"a": [1, 2]}, "json"),
])
def test_other_kinds_write_readable_files(tmp_path, kind, value, fmt):
    path = OutputWriter(tmp_path, task="t").write(Result(kind=kind, value=value, params={"seed": 3}, fmt=fmt))
    assert path.suffix == f".{fmt}"
    if kind == "audio":
        import soundfile as sf

        data, rate = sf.read(str(path))
        assert rate == 8000 and len(data) == (8000 if fmt == "wav" else 4000)
    elif kind == "text":
        assert path.read_text() == value


def _append_many(path, worker):
    for i in range(200):
        append_jsonl(path, {"worker": worker, "i": i, "pad": "x" * 500})


def test_manifest_appends_from_concurrent_processes_never_tear(tmp_path):
    path = tmp_path / "manifest.jsonl"
    procs = [mp.get_context("fork").Process(target=_append_many, args=(path, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 400 and {(r["worker"], r["i"]) for r in rows} == {(w, i) for w in range(2) for i in range(200)}


def test_companions_and_frames_follow_the_free_name_and_never_merge_into_a_folder(tmp_path):
    (tmp_path / "image-1").mkdir()  # a user's folder where a frames output would go
    (tmp_path / "image-1" / "mine.txt").write_text("keep")
    writer = OutputWriter(tmp_path, task="image", template="{task}-{seed}")
    frames = writer.write(Result(kind="video", value=[image_result(i).value for i in range(3)], params={"seed": 1},
                                 fmt="frames"))
    assert frames.name == "image-1-1" and sorted(p.name for p in frames.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (tmp_path / "image-1").iterdir()) == ["mine.txt"]
    (tmp_path / "image-1.control.png").write_bytes(b"user's")  # only a companion's name is taken
    result = image_result()
    result.companions = {"control": image_result(2).value}
    main = writer.write(result)
    # image-1: its companion's name is taken; image-1-1: the frames' sidecar image-1-1.json is
    assert main.name == "image-1-2.png" and (tmp_path / "image-1-2.control.png").exists()
    assert (tmp_path / "image-1.control.png").read_bytes() == b"user's" and not (tmp_path / "image-1.png").exists()
    assert json.loads(main.with_suffix(".json").read_text())["companions"] == {"control": "image-1-2.control.png"}
