"""Issue 18, media and downloads: studio's files as other tools read them, and downloads of only
what loads. Clips keep their frame rate in GIF/WebP ticks and stream (MP4 faststart); `models
pull` picks one weight set from a hub-style file list; `auto` finds out quickly that the hub is
unreachable; the README's music, video and replay lines do what they say."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores: no OpenMP contention


# ----------------------------------------------------------------------------- helpers
def mp4_top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order (ISO BMFF: 32-bit size + 4-char type, size 1
    means a 64-bit size follows, 0 means to the end of the file)."""
    data = path.read_bytes()
    boxes, i = [], 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = len(data) - i
        assert size >= 8, f"corrupt box at {i}"
        boxes.append(kind.decode("latin-1"))
        i += size
    return boxes


def ffmpeg_duration(path: Path) -> tuple[int, float, float]:
    """(decoded frames, decoded seconds, container Duration) read with imageio-ffmpeg's ffmpeg."""
    import re

    import imageio_ffmpeg

    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    header = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                            capture_output=True, text=True).stderr
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", header).groups()
    return frames, seconds, int(h) * 3600 + int(m) * 60 + float(s)


def pillow_frames(path: Path) -> list[int]:
    """Each frame's delay in ms as Pillow reads it (GIF: centiseconds x 10)."""
    with Image.open(path) as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # WebP sets a frame's duration as it decodes it
            delays.append(im.info["duration"])
    return delays


def distinct_frames(n: int, size: int = 32) -> list[Image.Image]:
    """n frames that all differ (Pillow merges identical consecutive GIF frames)."""
    frames = []
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:, :, 0] = (i * 37) % 256
        a[i % size, :, 1] = 255
        frames.append(Image.fromarray(a))
    return frames


def write_clip(tmp_path: Path, fmt: str, fps: float, n: int) -> Path:
    from studio.outputs import OutputWriter, Result

    result = Result("video", distinct_frames(n), {"prompt": "a clip", "seed": 1, "fps": fps}, fmt=fmt)
    return OutputWriter(tmp_path / "out", task="video").write(result)


# ----------------------------------------------------------------------------- clip timing
@pytest.mark.parametrize("fps,n", [(8, 8), (8, 17), (24, 30), (30000 / 1001, 24), (12.5, 10)])
def test_gif_keeps_the_asked_rate_on_average(tmp_path, fps, n):
    gif = write_clip(tmp_path, "gif", fps, n)
    delays = pillow_frames(gif)
    assert len(delays) == n
    assert sum(delays) / 1000 == pytest.approx(n / fps, rel=0.01)
    assert all(d % 10 == 0 for d in delays)  # GIF's tick is the centisecond
    # as ffmpeg's GIF muxer: each frame ends at the floor of its true time in ticks
    assert all(abs(sum(delays[:k]) - 1000 * k / fps) < 10 for k in range(1, n + 1))
    if fps == 8:
        assert delays[:4] == [120, 130, 120, 130]


def test_webp_keeps_the_asked_rate_in_milliseconds(tmp_path):
    webp = write_clip(tmp_path, "webp", 24, 24)
    delays = pillow_frames(webp)
    assert len(delays) == 24 and sum(delays) == 1000  # a fixed int(1000/24) = 41 ms would play 1.6% fast


@pytest.mark.parametrize("fps,n", [(8, 8), (24, 30)])
def test_mp4_is_faststart_and_keeps_its_frames_and_duration(tmp_path, fps, n):
    mp4 = write_clip(tmp_path, "mp4", fps, n)
    boxes = mp4_top_level_boxes(mp4)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # the index first: playable while downloading
    frames, seconds, container = ffmpeg_duration(mp4)
    assert frames == n
    assert seconds == pytest.approx(n / fps, rel=0.01) and container == pytest.approx(n / fps, rel=0.01)


# ----------------------------------------------------------------------------- models pull
class LocalHub:
    """A hub on 127.0.0.1 serving ROOT/org/name folders as repos at one commit: the three
    endpoints huggingface_hub calls (model info, tree listing, file resolve), so diffusers'
    DiffusionPipeline.download and snapshot_download run unchanged against files made here."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root: Path):
        import hashlib
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub, self.root, self.requests = self, root, []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, data: bytes, headers: dict[str, str], body: bool, status: int = 200):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def answer(self, body: bool):
                path = urllib.parse.urlsplit(self.path).path
                parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
                hub.requests.append(f"{self.command} {path}")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.root / parts[2] / parts[3]
                    files = sorted(p for p in repo.rglob("*") if p.is_file())
                    if len(parts) > 4 and parts[4] == "tree":
                        listing = [{"type": "file", "path": p.relative_to(repo).as_posix(), "size": p.stat().st_size,
                                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]
                    else:
                        listing = {"id": f"{parts[2]}/{parts[3]}", "sha": hub.SHA, "private": False,
                                   "siblings": [{"rfilename": p.relative_to(repo).as_posix(), "size": p.stat().st_size}
                                                for p in files]}
                    return self.send(json.dumps(listing).encode(), {"Content-Type": "application/json"}, body,
                                     200 if repo.is_dir() else 404)
                if len(parts) >= 5 and parts[2] == "resolve":
                    file = hub.root / parts[0] / parts[1] / "/".join(parts[4:])
                    if not file.is_file():
                        return self.send(b"", {"X-Error-Code": "EntryNotFound"}, body, 404)
                    data = file.read_bytes()
                    return self.send(data, {"X-Repo-Commit": hub.SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, body)
                return self.send(b"", {}, body, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> set[str]:
        """Repo paths whose bytes were downloaded (GET on resolve)."""
        return {r.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests if r.startswith("GET") and "/resolve/" in r}


def layout(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub_repos(tiny, tmp_path_factory) -> Path:
    """ROOT/org/tiny-sd: a diffusers pipeline as the hub holds them (sd-turbo's shape): every
    weight in fp32 and as an .fp16 variant, .bin duplicates beside the safetensors, a single-file
    checkpoint at the root, a README. ROOT/org/tiny-lm: a transformers repo with consolidated and
    sharded safetensors, a .bin, TF/Flax/ONNX copies and a remote-code file."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("hub")
    repo = root / "org" / "tiny-sd"
    shutil.copytree(tiny("sd"), repo)
    pipe = StableDiffusionPipeline.from_pretrained(repo, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(repo, variant="fp16", safe_serialization=True)
    shutil.copy(repo / "unet/diffusion_pytorch_model.safetensors", repo / "unet/diffusion_pytorch_model.bin")
    shutil.copy(repo / "text_encoder/model.safetensors", repo / "text_encoder/pytorch_model.bin")
    if not any(p.suffix == ".safetensors" for p in repo.iterdir()):
        shutil.copy(repo / "unet/diffusion_pytorch_model.safetensors", repo / "tiny-sd.safetensors")
    (repo / "README.md").write_text("# tiny-sd\n")

    lm = root / "org" / "tiny-lm"
    lm.mkdir(parents=True)
    files = {"config.json": b"{}", "generation_config.json": b"{}", "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
             "special_tokens_map.json": b"{}", "merges.txt": b"", "vocab.json": b"{}", "README.md": b"# lm",
             ".gitattributes": b"", "modeling_lm.py": b"raise SystemExit", "model.safetensors": b"x" * 4000,
             "model-00001-of-00002.safetensors": b"x" * 2000, "model-00002-of-00002.safetensors": b"x" * 2000,
             "model.safetensors.index.json": b"{}", "pytorch_model.bin": b"x" * 4000,
             "pytorch_model.bin.index.json": b"{}", "tf_model.h5": b"x" * 4000, "flax_model.msgpack": b"x" * 4000,
             "onnx/model.onnx": b"x" * 4000}
    for name, data in files.items():  # each file's bytes differ: the cache stores a blob once per content
        (lm / name).parent.mkdir(parents=True, exist_ok=True)
        (lm / name).write_bytes(data + f" {name}".encode())
    return root


SD_FP32 = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
           "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "unet/config.json",
           "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
SD_FP16 = {n.replace(".safetensors", ".fp16.safetensors") for n in SD_FP32}


def test_pull_selects_one_variant_of_a_diffusers_pipeline(hub_repos):
    from studio.models import select_files

    repo = hub_repos / "org" / "tiny-sd"
    files = layout(repo)
    index = json.loads((repo / "model_index.json").read_text())
    cpu = select_files(files, model_index=index, variant=None)
    gpu = select_files(files, model_index=index, variant="fp16")
    assert set(cpu.names) == SD_FP32 and cpu.variant is None
    assert set(gpu.names) == SD_FP16 and gpu.variant == "fp16"
    # never the root single-file checkpoint, the .bin duplicates or the other variant
    for plan in (cpu, gpu):
        assert not any(n.endswith(".bin") or "/" not in n and n.endswith(".safetensors") for n in plan.names)
        assert plan.total == sum(files[n] for n in plan.names)
    assert gpu.total < 0.6 * cpu.total and cpu.total < 0.4 * sum(files.values())
    # a repo with no fp16 files: the variant quietly falls back to the plain files (as diffusers needs)
    plain = {n: s for n, s in files.items() if ".fp16." not in n}
    assert set(select_files(plain, model_index=index, variant="fp16").names) == SD_FP32


def test_pull_selects_one_weight_set_of_a_transformers_repo(hub_repos):
    from studio.errors import UsageError
    from studio.models import select_files

    files = layout(hub_repos / "org" / "tiny-lm")
    plan = select_files(files)
    configs = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "merges.txt", "vocab.json"}
    assert plan.layout == "transformers" and set(plan.names) == configs | {"model.safetensors"}
    assert "modeling_lm.py" in select_files(files, trust_remote_code=True).names
    # only shards: the shards and their index, never the .bin beside them
    sharded = {n: s for n, s in files.items() if n != "model.safetensors"}
    assert set(select_files(sharded).names) == configs | {"model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    # only pickles: refused unless allowed
    pickles = {n: s for n, s in files.items() if not n.endswith(".safetensors")}
    with pytest.raises(UsageError, match="--allow-pickle|pickle"):
        select_files(pickles)
    assert "pytorch_model.bin" in select_files(pickles, allow_pickle=True).names
    # open_clip's layout, and a card's own file list
    clip = {"open_clip_config.json": 10, "open_clip_model.safetensors": 100, "open_clip_pytorch_model.bin": 100,
            "model.safetensors": 100, "config.json": 10, "tokenizer.json": 10}
    assert set(select_files(clip).names) == {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"}
    assert select_files(clip, card_files=["open_clip_config.json", "open_clip_model.safetensors"]).total == 110
    with pytest.raises(UsageError, match="open_clip_model.safetensors"):
        select_files({"config.json": 1}, card_files=["open_clip_model.safetensors"])


def _offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(extra)
    return env


PULL_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from studio.cli import app
runner = CliRunner()
for args in json.loads(sys.argv[1]):
    r = runner.invoke(app, args)
    print(json.dumps({"args": args, "code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}), flush=True)
"""


def test_models_pull_downloads_what_the_plan_lists_through_diffusers(hub_repos, tmp_path):
    """The real `studio models pull` (diffusers' DiffusionPipeline.download, huggingface_hub's
    snapshot_download) against the local hub: the files that land in the cache are exactly the
    dry run's list, and a pipeline pulled as fp16 then loads without fetching anything else."""
    hf_home = tmp_path / "hf"
    commands = [
        ["models", "pull", "org/tiny-sd", "--dry-run"],
        ["models", "pull", "org/tiny-sd", "--dry-run", "--json", "--device", "cpu"],
        ["models", "pull", "org/tiny-sd", "--variant", "fp16", "--json"],
        ["models", "pull", "org/tiny-lm", "--json"],
        ["image", "a red circle", "--model", "org/tiny-sd", "--steps", "1", "--width", "32", "--height", "32",
         "--seed", "1", "-q", "--out", str(tmp_path / "img")],
    ]
    with LocalHub(hub_repos) as hub:
        env = _offline_env(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
        proc = subprocess.run([sys.executable, "-c", PULL_SCRIPT, json.dumps(commands)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [r["code"] for r in runs] == [0] * len(commands), runs
        text, cpu, fp16, lm = runs[0]["stdout"], *(json.loads(r["stdout"]) for r in runs[1:4])
        fetched = hub.fetched()

    # the dry run lists files and their total; the CPU picks the plain weights, fp16 the variant
    assert "org/tiny-sd: 10 files" in text and "unet/diffusion_pytorch_model.safetensors" in text and "not fetched" in text
    assert {f["path"] for f in cpu["files"]} == SD_FP32 and cpu["variant"] is None and "path" not in cpu
    assert cpu["total_bytes"] == sum(f["size"] for f in cpu["files"])
    assert {f["path"] for f in fp16["files"]} == SD_FP16 and fp16["variant"] == "fp16"
    snapshot = Path(fp16["path"])
    assert set(layout(snapshot)) == SD_FP16  # diffusers fetched what the plan says, nothing more
    assert set(layout(Path(lm["path"]))) == {f["path"] for f in lm["files"]}
    assert "model.safetensors" in layout(Path(lm["path"])) and not any(
        n.endswith((".bin", ".h5", ".msgpack", ".onnx", ".py")) or "-of-" in n for n in layout(Path(lm["path"])))
    # the image run loaded the fp16 files it found and fetched nothing (no fp32 weights, no .bin)
    assert fetched == SD_FP16 | set(layout(Path(lm["path"])))
    assert len(list((tmp_path / "img").glob("*.png"))) == 1


# ----------------------------------------------------------------------------- no network, no --offline
PROBE_SCRIPT = """
import json, time
t0 = time.perf_counter()
from huggingface_hub import snapshot_download  # start-up: what any hub access imports first (~1.4 s)
from studio import models
from studio.errors import ModelNotAvailable
imported = time.perf_counter() - t0
t = time.perf_counter()
spec = models.resolve("auto", task="image")
auto_s = time.perf_counter() - t
t = time.perf_counter()
try:
    models.resolve("sd15", task="image")
    error = None
except ModelNotAvailable as exc:
    error = [exc.message, exc.hint]
explicit_s = time.perf_counter() - t
print(json.dumps({"alias": spec.alias, "notice": spec.notice, "auto_s": auto_s, "explicit_s": explicit_s,
                  "error": error, "import_s": imported}))
"""


def test_auto_finds_out_quickly_that_the_hub_is_unreachable(tmp_path):
    """HF_HUB_OFFLINE unset, the hub at a closed port: `auto` knows within 2 s (one probe, no
    retries: the libraries' own retries took ~40 s) and picks the starter with its notice; a named
    model that is not cached is one error naming `studio models pull`, as fast."""
    env = _offline_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["auto_s"] < 2.0 and got["explicit_s"] < 0.5  # the second asks nothing: the answer is kept per process
    assert got["alias"] == "starter-image"
    assert "sd-turbo is not in the local cache" in got["notice"] and "cannot be reached" in got["notice"]
    message, hint = got["error"]
    assert "sd15" in message and "cannot be reached" in message and "studio models pull sd15" in hint


def test_studio_image_without_network_falls_back_to_the_starter(cli, tmp_path, monkeypatch):
    """`studio image` with the hub unreachable and no --offline: the one-line notice, then the
    starter's image (its sidecar names it), exit 0. In process: HF_HUB_OFFLINE is unset for studio
    and the hub's address (huggingface_hub reads HF_ENDPOINT once, at import) is a closed port."""
    import huggingface_hub.constants

    from studio import models

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(models, "_PROBES", {})
    out = tmp_path / "out"
    r = cli("image", "a large red circle in the center, blue background", "--steps", "2", "--seed", "0", "--out", out)
    assert r.exit_code == 0, r
    notice = " ".join(r.stderr.split())  # rich wraps long notes
    assert "using starter-image (sd-turbo is not in the local cache and the hub (http://127.0.0.1:9) cannot be reached)" in notice
    assert "Retrying" not in r.stderr
    png = next(out.glob("*.png"))
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["model"]["alias"] == "starter-image" and Image.open(png).size == (64, 64)


# ----------------------------------------------------------------------------- the README's music lines
def write_primer(path: Path, *, tempos: list[float], metre: tuple[int, int], bars: int = 2) -> Path:
    """A piano line of eighth notes in `metre`, with mido; tempos[i] (BPM) starts at bar i."""
    import mido

    tpq = 480
    bar_ticks = int(metre[0] * 4 / metre[1] * tpq)
    events = [(0, mido.MetaMessage("time_signature", numerator=metre[0], denominator=metre[1]))]
    events += [(i * bar_ticks, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))) for i, bpm in enumerate(tempos)]
    for i, start in enumerate(range(0, bars * bar_ticks, tpq // 2)):
        pitch = 60 + (i * 2) % 12
        events += [(start, mido.Message("note_on", note=pitch, velocity=90)),
                   (start + tpq // 2, mido.Message("note_off", note=pitch, velocity=0))]
    events.sort(key=lambda e: (e[0], e[1].type == "note_on"))  # note-offs before the next note-on
    mid = mido.MidiFile(ticks_per_beat=tpq)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    now = 0
    for tick, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    mid.save(str(path))
    return path


@pytest.fixture(scope="module")
def midi_lm(tiny):
    return tiny("midi-lm")


@pytest.mark.parametrize("metre,tempos", [((4, 4), [96]), ((3, 4), [96, 140]), ((12, 8), [72])])
def test_primer_continuation_keeps_the_primers_tempo_and_metre(cli, midi_lm, tmp_path, metre, tempos):
    """README: `--primer` without --tempo writes primer + continuation at the primer's exact tempo.
    The continuation used to change tempo (96 -> 128/182/108 BPM) and metre (12/8) at will."""
    import pretty_midi

    primer = write_primer(tmp_path / "primer.mid", tempos=tempos, metre=metre)
    expected = pretty_midi.PrettyMIDI(str(primer)).get_tempo_changes()
    for seed in range(2):
        out = tmp_path / f"o{seed}"
        r = cli("music", "midi", "--model", midi_lm, "--primer", primer, "--bars", "4", "--seed", seed, "-q", "--out", out)
        assert r.exit_code == 0, r
        song = pretty_midi.PrettyMIDI(str(next(out.glob("*.mid"))))
        times, bpms = song.get_tempo_changes()
        # the primer's tempo map exactly (to MIDI's microsecond resolution), no change of its own
        assert len(bpms) == len(tempos) and np.allclose(bpms, expected[1], rtol=0, atol=1e-4)
        assert np.allclose(bpms, tempos, rtol=0, atol=1e-3) and np.allclose(times, expected[0], atol=0.01)
        assert {(ts.numerator, ts.denominator) for ts in song.time_signature_changes} == {metre}
        primer_end = pretty_midi.PrettyMIDI(str(primer)).get_end_time()
        assert max(n.start for i in song.instruments for n in i.notes) > primer_end - 0.01  # it did continue


def test_plain_render_does_not_claim_fluidsynth_is_missing(cli, tmp_path):
    """README: `studio music render FILE --plain` is the sine synthesiser by choice; it used to
    print 'fluidsynth is not available' although fluidsynth was there."""
    primer = write_primer(tmp_path / "song.mid", tempos=[120], metre=(4, 4), bars=1)
    r = cli("music", "render", primer, "--plain", "--out", tmp_path / "plain.flac")
    assert r.exit_code == 0, r
    assert "not available" not in r.stderr and "fluidsynth" not in r.stderr
    meta = json.loads((tmp_path / "plain.json").read_text())
    assert meta["render"]["engine"] == "pretty_midi.synthesize"


# ----------------------------------------------------------------------------- quiet means quiet
COMMANDS_SCRIPT = """
import json, sys
from studio.cli import app
for args in json.loads(sys.argv[1]):
    for stream in (sys.stdout, sys.stderr):
        stream.write("\\n=== next ===\\n")
        stream.flush()
    try:
        app(args, prog_name="studio")
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    sys.stdout.write(f"\\n=== exit {code} ===\\n")
    sys.stdout.flush()
"""


def run_commands(commands: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """Run CLI commands in one fresh process (one start-up), each with the real stdout and stderr
    (what a library writes straight to the file descriptors included): (exit code, out, err)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", COMMANDS_SCRIPT, json.dumps([[str(a) for a in c] for c in commands])],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    outs = proc.stdout.split("\n=== next ===\n")[1:]
    errs = proc.stderr.split("\n=== next ===\n")[1:]
    assert len(outs) == len(commands) == len(errs), proc.stderr[-3000:]
    runs = []
    for out, err in zip(outs, errs):
        body, _, tail = out.rpartition("\n=== exit ")
        runs.append((int(tail.split()[0]) if tail.split()[0].isdigit() else 1, body, err))
    return runs


def test_quiet_video_and_eval_control_print_no_library_output(tiny, tmp_path):
    """README: `-q` video printed diffusers' "modules ... should be kept in float32: []" warning,
    and `studio eval control` printed diffusers' loading bars and notices around its JSON."""
    out = tmp_path / "clips"
    (video, v_out, v_err), (control, c_out, c_err) = run_commands([
        ["video", "a boat on a calm sea", "--model", tiny("animatediff"), "--frames", "8", "--steps", "2", "--seed", "1",
         "--format", "gif", "-q", "--out", out],
        ["eval", "control", "--n", "1", "--steps", "1"],
    ], tmp_path)
    assert video == 0 and v_err.strip() == "", v_err
    gif = next(out.glob("*.gif"))
    assert len(pillow_frames(gif)) == 8 and sum(pillow_frames(gif)) == 1000  # AnimateDiff's 8 fps, kept
    assert control == 0 and c_err.strip() == "", c_err
    assert json.loads(c_out)["task"] == "control"


# ----------------------------------------------------------------------------- replay from the file's own tags
MODEL = {"name": "m", "source": "/models/m", "kind": "folder", "alias": "starter-x"}
DEVICE = {"requested": {"device": "cpu", "precision": "fp32", "attention": "auto", "offload": "none",
                        "quantize": "none", "compile": False}, "resolved": {"device": "cpu"}}


@pytest.mark.parametrize("kind,fmt", [("video", "mp4"), ("video", "gif"), ("video", "webp"), ("audio", "wav"),
                                      ("audio", "flac"), ("midi", "mid")])
def test_every_tagged_format_carries_task_request_model_and_device(tmp_path, kind, fmt):
    """Written, sidecar deleted, read back from the file's own bytes: the task, the whole request
    (a 10,000-character prompt too: libsndfile alone cut WAV comments at ~2 KB), the model and
    the device settings asked for."""
    import pretty_midi

    from studio.outputs import OutputWriter, Result, read_metadata

    prompt = "a slow dawn over the harbour, " * 340  # ~10k characters, quotes and commas included
    params = {"prompt": prompt + '"quoted" = ; # \\ done', "seed": 7, "fps": 8, "steps": 3}
    value = {"video": distinct_frames(3), "audio": (np.zeros(800, np.float32), 8000),
             "midi": pretty_midi.PrettyMIDI()}[kind]
    result = Result(kind, value, params, fmt=fmt, extra={"model": MODEL, "device": DEVICE})
    path = OutputWriter(tmp_path, task="music-audio" if kind == "audio" else kind).write(result)
    path.with_name(path.name.removesuffix(path.suffix) + ".json").unlink()  # the sidecar is gone
    meta = read_metadata(path)
    assert meta["task"] == ("music-audio" if kind == "audio" else kind)
    assert meta["params"] == params and meta["model"] == MODEL and meta["device"]["requested"] == DEVICE["requested"]
    if fmt == "wav":  # other tools see the request too: ffmpeg reads the ID3 chunk
        import imageio_ffmpeg

        tags = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                              capture_output=True, text=True).stdout
        assert "a slow dawn over the harbour" in tags


def _replay(cli, path: Path, out: Path) -> Path:
    path.with_name(path.name.removesuffix(path.suffix) + ".json").unlink()
    r = cli("replay", path, "--out", out, "-q", "--json")
    assert r.exit_code == 0, r
    return Path(json.loads(r.stdout.strip().splitlines()[-1])["path"])


def mp4_frames(path: Path) -> list[np.ndarray]:
    import imageio.v2 as iio2

    reader = iio2.get_reader(str(path), format="FFMPEG")
    try:
        return [np.asarray(f) for f in reader]
    finally:
        reader.close()


def test_midi_wav_and_mp4_replay_without_their_sidecars(cli, tiny, midi_lm, tmp_path):
    """README: `studio replay` on an MP4 or WAV whose sidecar is gone used to fail although the
    file carries the request in its tags. Each replays from its own bytes to the same output,
    with the same model."""
    import pretty_midi
    import soundfile as sf

    models = {"mid": midi_lm, "wav": tiny("musicgen"), "mp4": tiny("animatediff")}
    runs = {
        "mid": ["music", "midi", "--bars", "2", "--key", "C:major"],
        "wav": ["music", "audio", "calm piano", "--duration", "0.5"],
        "mp4": ["video", "a boat", "--frames", "4", "--steps", "1"],
    }
    for fmt, args in runs.items():
        r = cli(*args, "--model", models[fmt], "--seed", "4", "--out", tmp_path / fmt, "-q", "--json")
        assert r.exit_code == 0, r
        first = Path(json.loads(r.stdout.strip().splitlines()[-1])["path"])
        again = _replay(cli, first, tmp_path / f"{fmt}-again")
        assert again.suffix == first.suffix == f".{fmt}"
        if fmt == "mid":
            a, b = ([(n.start, n.pitch) for i in pretty_midi.PrettyMIDI(str(p)).instruments for n in i.notes]
                    for p in (first, again))
        elif fmt == "wav":
            a, b = (sf.read(str(p))[0].tolist() for p in (first, again))
        else:
            a, b = (np.stack(mp4_frames(p)).tolist() for p in (first, again))
            assert len(a) == 4
        assert a and a == b, fmt
        meta = json.loads(again.with_name(again.name.removesuffix(again.suffix) + ".json").read_text())
        assert meta["params"]["seed"] == 4 and meta["model"]["source"] == str(Path(models[fmt]).resolve())


def test_a_gif_faster_than_50_fps_is_refused_before_generating(cli, tiny, tmp_path):
    """Past 50 fps GIF delays round to 1 cs, which browsers play as 10 cs: a clear error, no file."""
    r = cli("video", "a boat", "--model", tiny("animatediff"), "--frames", "4", "--steps", "1", "--fps", "60",
            "--format", "gif", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "GIF cannot play at 60 fps" in r.stderr and "--format mp4" in r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.gif"))
