"""Issue 17, the writer's and the input images' side, tried as a careless or hostile user would:
output folders holding symlinks, templates that climb out of --out, three processes writing the
same names at once, a disk that fills mid-run, decompression bombs and 12000x12000 inputs, a
10,000-character prompt. What must hold: nothing written outside --out or through a link, no
finished output lost, no output without its sidecar and manifest row, one clear error line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.errors import InputFileError, RuntimeFailure, UsageError
from studio.outputs import OutputWriter, Result, read_manifest, write_text_file
from studio.pipeline import MAX_INPUT_PIXELS, image_size, load_image

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
def noise_result(seed: int, size: int = 16, **params) -> Result:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Result(kind="image", value=Image.fromarray(pixels), params={"prompt": "a fox", "seed": seed, **params},
                  extra={"model": {"name": "toy"}})


def outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if "." not in p.stem and not p.is_symlink())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_consistent(folder: Path) -> list[dict]:
    """Every manifest line parses; every output has its sidecar and exactly one row with its hash;
    every row names an output that is there; no temp file is left."""
    lines = (folder / "manifest.jsonl").read_text().splitlines() if (folder / "manifest.jsonl").exists() else []
    rows = [json.loads(line) for line in lines]  # a torn line would raise here
    files = outputs(folder)
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in files)
    for row in rows:
        image = folder / row["file"]
        assert row["sha256"] == sha(image)
        meta = json.loads(image.with_suffix(".json").read_text())
        assert meta["file"] == image.name
        with Image.open(image) as im:  # the sidecar belongs to this image, not a neighbour's
            assert json.loads(im.text["studio"])["params"] == meta["params"] == row["params"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not [p for p in folder.glob("*.json") if not p.is_symlink() and not p.with_suffix(".png").exists()]
    return rows


def blank_png(path: Path, width: int, height: int, color_type: int = 0, rows: bool = True) -> Path:
    """A valid PNG of a flat grey, written row by row (a 12000x12000 one is ~150 KB on disk and
    never exists in memory here). rows=False: the header alone, as a bomb needs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3}[color_type]
    packed = zlib.compressobj(6)
    body = []
    if rows:
        block = (b"\x00" + bytes([128]) * (width * channels)) * 64
        for _ in range(height // 64):
            body.append(packed.compress(block))
        body.append(packed.compress((b"\x00" + bytes([128]) * (width * channels)) * (height % 64)))
    body.append(packed.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """30000x30000 in a 57-byte file: Pillow refuses it as a DecompressionBombError."""
    return blank_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 30000, 30000, rows=False)


@pytest.fixture(scope="module")
def huge_grey(tmp_path_factory) -> Path:
    """12000x12000 grey, about 150 KB: the issue's `--init` that generated at its own size."""
    return blank_png(tmp_path_factory.mktemp("huge") / "huge.png", 12000, 12000, color_type=0)


# ----------------------------------------------------------------------------- paths stay inside --out
@pytest.mark.parametrize("template", ["../escaped-{seed}", "/tmp/studio-escaped-{seed}", "a/../../escaped-{seed}",
                                      "{prompt}"])
def test_templates_that_leave_out_are_refused_and_write_nothing(tmp_path, template):
    out = tmp_path / "out"
    result = noise_result(1, prompt="../../escaped")
    if template == "{prompt}":  # a field value cannot climb out either
        result.params["seed"] = "../../escaped"
        template = "{seed}"
    with pytest.raises(UsageError) as err:
        OutputWriter(out, task="image", template=template).write(result)
    assert "outside --out" in err.value.message and err.value.exit_code == 2
    assert not list(tmp_path.glob("escaped*")) and not list(Path("/tmp").glob("studio-escaped-*"))
    assert not (out / "manifest.jsonl").exists()


def test_a_subfolder_link_to_elsewhere_is_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="outside --out"):
        OutputWriter(out, task="image", template="sub/{seed}").write(noise_result(1))
    assert list(elsewhere.iterdir()) == []
    # a subfolder inside --out is fine, and the manifest names it
    path = OutputWriter(out, task="image", template="runs/{seed}").write(noise_result(1))
    assert path == out / "runs" / "1.png" and read_manifest(out)[0]["file"] == "runs/1.png"


@pytest.mark.parametrize("taken", ["image-1.png", "image-1.json"])
def test_a_dangling_symlink_at_an_output_or_sidecar_name_is_never_followed(tmp_path, taken):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    (out / taken).symlink_to(victim)
    path = OutputWriter(out, task="image", template="{task}-{seed}").write(noise_result(1))
    assert path.name == "image-1-1.png"  # the next free name, not a raw FileExistsError
    assert not victim.exists() and (out / taken).is_symlink()
    assert_consistent(out)


def test_a_manifest_symlink_is_refused_and_its_target_never_appended_to(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "manifest.jsonl").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link") as err:  # before any work is done
        OutputWriter(out, task="image")
    assert err.value.hint and err.value.exit_code == 2
    # planted after the writer checked: the output it was writing is taken back
    (out / "manifest.jsonl").unlink()
    writer = OutputWriter(out, task="image")
    (out / "manifest.jsonl").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        writer.write(noise_result(1))
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    with pytest.raises(UsageError, match="symbolic link"):  # --resume reads it: never through a link
        read_manifest(out)


def test_a_fifo_at_the_manifest_is_an_error_not_a_hang(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "manifest.jsonl")
    with pytest.raises(UsageError, match="not a regular file"):
        OutputWriter(out, task="image")


def test_a_text_file_the_user_named_is_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    link = tmp_path / "photo.txt"
    link.symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        write_text_file(link, "a caption")
    assert not victim.exists()
    write_text_file(link, "a caption", overwrite=True)  # replaces the link itself
    assert not link.is_symlink() and link.read_text() == "a caption" and not victim.exists()


def test_cli_refuses_a_manifest_link_before_loading_anything(cli, tmp_path, photo_png):
    out = tmp_path / "maps"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "manifest.jsonl").symlink_to(victim)
    r = cli("control", "preprocess", "canny", photo_png, "-o", out)
    assert r.exit_code == 2, r
    assert r.stderr.startswith("error: ") and "symbolic link" in r.stderr and "hint: " in r.stderr
    assert "Traceback" not in r.stderr and victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


@pytest.fixture
def photo_png(tmp_path) -> Path:
    arr = np.zeros((48, 64, 3), dtype=np.uint8)
    arr[8:40, 16:48] = (220, 40, 40)
    path = tmp_path / "photo.png"
    Image.fromarray(arr).save(path)
    return path


# ----------------------------------------------------------------------------- concurrent runs
def _writer_process(out: str, worker: int, barrier, count: int) -> None:
    barrier.wait()  # all three start together, so they race for the same names
    writer = OutputWriter(out, task="image", template="{task}-{seed}")
    for seed in range(count):
        writer.write(noise_result(seed, size=64, worker=worker))


def test_three_processes_writing_the_same_names_lose_nothing(tmp_path):
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch's threads
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer_process, args=(str(out), w, barrier, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]  # before: one died of FileExistsError
    rows = assert_consistent(out)
    assert len(outputs(out)) == 24 and len(rows) == 24
    made = {(r["params"]["worker"], r["params"]["seed"]) for r in rows}
    assert made == {(w, s) for w in range(3) for s in range(8)}
    for row in rows:  # each file holds the pixels its own worker and seed made
        expected = np.random.default_rng(row["params"]["seed"]).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        assert np.array_equal(np.asarray(Image.open(out / row["file"])), expected)


# ----------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs (root only: skipped where mount is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'}); the RLIMIT_FSIZE test covers it")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_is_one_error_and_every_output_is_whole(small_disk):
    out = small_disk / "out"
    writer = OutputWriter(out, task="image", template="{task}-{seed}")
    written = 0
    with pytest.raises(RuntimeFailure) as err:
        for seed in range(1000):
            writer.write(noise_result(seed, size=40))
            written += 1
    assert 5 < written < 1000
    assert err.value.exit_code == 1 and "\n" not in err.value.message
    assert "No space left on device" in err.value.message and "free some space" in err.value.hint
    assert len(assert_consistent(out)) == written  # what was complete stays complete, nothing else


def test_disk_full_through_the_cli_is_one_line_and_exit_1(cli, small_disk, photo_png):
    out = small_disk / "maps"
    out.mkdir()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)  # leave no room for the map
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    r = cli("control", "preprocess", "canny", photo_png, "-o", out)
    assert r.exit_code == 1, r
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: could not write ") and "No space left on device" in lines[0]
    assert lines[1].startswith("hint: ") and len(lines) == 2 and "Traceback" not in r.stderr
    assert list(out.iterdir()) == []


def test_a_manifest_that_cannot_grow_takes_the_output_back(tmp_path):
    """RLIMIT_FSIZE: the image and sidecar fit, the manifest row does not (EFBIG at the last step)."""
    out = tmp_path / "out"
    out.mkdir()
    limit = 64 * 1024
    manifest = out / "manifest.jsonl"
    row = json.dumps({"file": "old.png", "pad": "x" * 200}) + "\n"
    manifest.write_text(row * ((limit - 100) // len(row)))
    before = manifest.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_outputs_hardening import noise_result
        from studio.errors import StudioError
        from studio.outputs import OutputWriter
        try:
            OutputWriter({str(out)!r}, task="image").write(noise_result(1, size=32))
        except StudioError as exc:
            print(exc.exit_code, exc.message)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("1 could not write manifest.jsonl"), r
    assert manifest.read_bytes() == before  # no torn line; the partial write was cut back
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]  # no image without its row


def test_a_line_torn_by_a_crash_is_ended_before_the_next_row(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"file": "a.png"}\n{"file": "torn')
    OutputWriter(out, task="image").write(noise_result(1))
    rows = read_manifest(out)
    assert [r["file"] for r in rows][0] == "a.png" and rows[-1]["seed"] == 1 and len(rows) == 2


# ----------------------------------------------------------------------------- input images
def test_a_decompression_bomb_is_a_clear_usage_error(bomb):
    for call in (lambda: load_image(bomb, what="init image"), lambda: image_size(bomb, "init image")):
        with pytest.raises(InputFileError) as err:
            call()
        assert "900 megapixels" in err.value.message and "init image" in err.value.message
        assert err.value.exit_code == 2 and "downscale" in err.value.hint


def test_a_bomb_through_the_cli_is_exit_2_not_an_internal_bug(cli, bomb):
    r = cli("control", "preprocess", "canny", bomb, "-o", "maps")
    assert r.exit_code == 2, r
    assert r.stderr.startswith("error: ") and "megapixels" in r.stderr
    assert "report it" not in r.stderr and "Traceback" not in r.stderr and not Path("maps").exists()


def test_over_the_cap_is_refused_from_the_header(tmp_path, monkeypatch):
    import studio.pipeline

    path = blank_png(tmp_path / "wide.png", 4000, 100, rows=False)  # no pixel data: decoding would fail
    monkeypatch.setattr(studio.pipeline, "MAX_INPUT_PIXELS", 300_000)
    with pytest.raises(InputFileError, match="4000x100 = 0 megapixels"):
        load_image(path)
    assert MAX_INPUT_PIXELS >= 12000 * 12000  # a 144 MP photo is large but sane


def test_large_inputs_are_shrunk_while_opened(tmp_path):
    notes = []
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(jpeg)
    image = load_image(jpeg, max_size=256, note=notes.append)
    assert image.size == (256, 192) and image.mode == "RGB" and image.info["original_size"] == (2000, 1500)
    assert notes == ["downscaled the image from 2000x1500 to 256x192 while opening it"]
    cover = load_image(jpeg, max_size=(256, 64), cover=True)  # still covers the box for the caller's crop
    assert cover.size == (256, 192)
    palette = tmp_path / "p.png"
    Image.new("P", (3000, 1000), 3).save(palette)
    assert load_image(palette, max_size=300, mode="L").size == (300, 100)
    small = load_image(palette, max_size=2000)  # under twice the box: left for the caller's one resize
    assert small.size == (3000, 1000) and "original_size" in small.info


def test_a_12000px_init_generates_at_the_models_default_size(cli, tiny, huge_grey):
    r = cli("image", "a grey cat", "--model", tiny("sd"), "--steps", "2", "--strength", "0.5", "--init", huge_grey, "--seed", "1", "-o", "out")
    assert r.exit_code == 0, r
    [path] = outputs(Path("out"))
    assert Image.open(path).size == (64, 64)  # the tiny model's default, not 12000x12000
    assert "resized the init image from 12000x12000 to 64x64" in r.stderr


def test_captioning_a_12000px_photo_stays_small(tiny, tmp_path, huge_grey):
    """Measured in a subprocess: the peak after captioning a 12000x12000 image minus the peak after
    a small one (the model loaded and used). Before: the full-size RGB copy and the processor's
    float arrays (2.7 GB). Now the decode itself is what remains: 1 byte a pixel for this grey
    PNG (144 MB), 4 for RGB (about 570 MB, measured by hand: too slow to decode in every run)."""
    model = tiny("blip-caption")
    big = huge_grey
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(small)
    script = textwrap.dedent(f"""
        import resource
        from studio import Studio
        studio = Studio(device="cpu")
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        studio.run("caption", images=[{str(small)!r}], model={str(model)!r}, max_tokens=4, write=False)
        before = peak()
        [r] = studio.run("caption", images=[{str(big)!r}], model={str(model)!r}, max_tokens=4, write=False)
        print(round(peak() - before), repr(r.value))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    extra_mb = int(r.stdout.split()[0])
    assert extra_mb < 400, f"captioning 12000x12000 took {extra_mb} MB more than a small image"


# ----------------------------------------------------------------------------- long prompts
def test_a_10k_character_prompt_is_not_echoed_whole(cli, tiny):
    """diffusers warns "The following part of your input was truncated ... : [the rest of the
    prompt]" through its own stderr handler; collected here on the same library loggers."""
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    seen = Collect()
    libraries = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in libraries:
        logger.addHandler(seen)
    try:
        prompt = "red cat " * 1300
        r = cli("image", prompt, "--model", tiny("sd"), "--steps", "1", "--width", "64", "--height", "64",
                "--seed", "1", "-o", "out")
    finally:
        for logger in libraries:
            logger.removeHandler(seen)
    assert r.exit_code == 0, r
    [warning] = [line for line in seen.lines if "truncated" in line]  # the library still says so ...
    assert "more characters]" in warning and len(warning) < 400  # ... in one short line
    assert max(len(line) for line in seen.lines + r.stderr.splitlines()) < 400
