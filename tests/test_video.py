"""Video: tiny AnimateDiff / TextToVideoSD / SVD models built with the real diffusers classes,
saved, and loaded back through `studio video` and the engine; every output format read back
(frame count, size, frame rate, the request in the MP4 comment)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FAST = ["--steps", "2", "--guidance", "1.0", "--frames", "8", "--quiet"]


# ----------------------------------------------------------------------------- helpers
def read_mp4(path: Path) -> tuple[list[np.ndarray], float, str]:
    """(frames, fps, the MP4 `comment` tag) read back with imageio-ffmpeg's own ffmpeg."""
    import imageio.v2 as iio2
    import imageio_ffmpeg

    reader = iio2.get_reader(str(path), format="FFMPEG")
    fps = reader.get_meta_data()["fps"]
    frames = [f for f in reader]
    reader.close()
    meta = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    comment = next((line[len("comment="):] for line in meta.splitlines() if line.startswith("comment=")), "")
    return frames, fps, comment


def read_animated(path: Path) -> tuple[list[Image.Image], list[int]]:
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            frames.append(im.convert("RGB"))
            durations.append(im.info.get("duration"))
    return frames, durations


def outputs(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


def engine_run(params: dict, **options):
    from studio.engine import Engine, RunOptions

    return Engine(RunOptions(quiet=True, write=False, **options)).run("video", params)


def arrays(result) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.float32) for f in result.value])  # (F, H, W, 3)


def moving_square(t: float, size: int = 48) -> np.ndarray:
    """A textured square moving right on a textured background (ground truth at any time t)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = np.stack([60 + 40 * np.sin(xx / 5), 80 + 30 * np.cos(yy / 4), 100 + 20 * np.sin((xx + yy) / 6)], -1)
    x0, y0 = 8 + 3.0 * t, 14 + 1.0 * t
    inside = (xx >= x0) & (xx < x0 + 16) & (yy >= y0) & (yy < y0 + 16)
    fg = np.stack([200 + 40 * np.sin((xx - x0) / 2), 120 + 60 * np.cos((yy - y0) / 3), 60 + 0 * xx], -1)
    return np.clip(np.where(inside[..., None], fg, bg), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def ad(tiny):
    return tiny("animatediff")


@pytest.fixture(scope="session")
def t2v(tiny):
    return tiny("t2v")


@pytest.fixture(scope="session")
def svd(tmp_path_factory):
    from studio.pipelines.tiny.video import make_tiny_svd

    out = tmp_path_factory.mktemp("tiny-svd") / "model"
    make_tiny_svd(out)
    return out


@pytest.fixture(scope="session")
def transformer_models(tmp_path_factory):
    from studio.pipelines.tiny.video import make_tiny_ltx, make_tiny_wan

    root = tmp_path_factory.mktemp("tiny-dit")
    make_tiny_ltx(root / "ltx")
    make_tiny_wan(root / "wan")
    return root


@pytest.fixture
def init_png(tmp_path):
    path = tmp_path / "init.png"
    Image.fromarray(moving_square(0, 40)).save(path)
    return path


# ----------------------------------------------------------------------------- contract
def test_request_fields_are_explicit():
    from studio.pipelines.video import VideoRequest

    assert [f.name for f in dataclasses.fields(VideoRequest)] == [
        "prompt", "negative_prompt", "model", "motion_adapter", "frames", "fps", "width", "height", "steps", "guidance",
        "seed", "num_outputs", "format", "init_image", "strength", "motion_bucket_id", "noise_aug_strength", "prompt_map",
        "context_length", "context_stride", "controlnet", "control_frames", "control_scale", "interpolate",
        "interpolate_method", "decode_chunk_size", "adapters"]


def test_video_cards_resolve_and_animatediff_is_the_default():
    from studio.models import load_cards, resolve

    cards = load_cards()
    expected = {"animatediff-v3": "guoyww/animatediff-motion-adapter-v1-5-3", "zeroscope": "cerspense/zeroscope_v2_576w",
                "modelscope-t2v": "ali-vilab/text-to-video-ms-1.7b", "svd": "stabilityai/stable-video-diffusion-img2vid-xt",
                "cogvideox-2b": "THUDM/CogVideoX-2b", "ltx-video": "Lightricks/LTX-Video",
                "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
    for name, source in expected.items():
        assert cards[name]["source"] == source and cards[name]["task"] == "video"
        assert resolve(name, task="video").source == source
    defaults = [n for n, c in cards.items() if "video" in (c.get("default_for") or [])]
    assert defaults == ["animatediff-v3"]
    # the adapter card names its SD base, which resolves to a real card
    assert resolve(cards["animatediff-v3"]["components"]["base"], task="image").source == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_offline_default_model_is_a_clear_error(cli, tmp_path):
    r = cli("video", "a calm sea", "--offline", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "animatediff-v3" in r.stderr and "studio models pull" in r.stderr


def test_prompt_map_parsing():
    from studio.pipelines.video import parse_prompt_map
    from studio.errors import UsageError

    assert parse_prompt_map("0:a calm sea, blue sky,16:a stormy sea") == {0: "a calm sea, blue sky", 16: "a stormy sea"}
    assert parse_prompt_map({"8": "night", 0: "day"}) == {0: "day", 8: "night"}  # JSON sidecars stringify keys
    assert parse_prompt_map("8:night", default_prompt="day") == {0: "day", 8: "night"}
    for bad in ("8:night", "x:night", "0:"):
        with pytest.raises(UsageError):
            parse_prompt_map(bad)


# ----------------------------------------------------------------------------- text-to-video
def test_animatediff_mp4_read_back(cli, ad, tmp_path):
    out = tmp_path / "o"
    r = cli("video", "a calm sea", "--model", ad, *FAST, "--seed", "3", "--out", out, "--json")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    path = Path(summary["path"])
    assert path.suffix == ".mp4" and summary["seed"] == 3
    frames, fps, comment = read_mp4(path)
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3) and fps == pytest.approx(8.0)
    request = json.loads(comment)  # the request travels inside the MP4
    assert request["prompt"] == "a calm sea" and request["seed"] == 3 and request["frames"] == 8
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["video"]["pipeline"] == "AnimateDiffPipeline" and sidecar["params"]["fps"] == 8.0
    assert sidecar["video"]["decode"]["chunk"] >= 1
    # `studio replay` re-runs the recorded request: the same clip again, beside the first
    again = cli("replay", path, "--quiet", "--json")
    assert again.exit_code == 0, again
    replayed = Path(json.loads(again.stdout.strip().splitlines()[-1])["path"])
    assert replayed != path and len(read_mp4(replayed)[0]) == 8
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(frames, read_mp4(replayed)[0])) == 0


def test_lora_on_the_sd_base_changes_frames_and_is_recorded(cli, ad, tiny, tmp_path):
    out = tmp_path / "o"
    runs = []
    for extra in (["--lora", f"{tiny('lora')}:0.8"], []):
        r = cli("video", "a calm sea", "--model", ad, *FAST, "--seed", "3", "--out", out, "--json", *extra)
        assert r.exit_code == 0, r
        runs.append(Path(json.loads(r.stdout.strip().splitlines()[-1])["path"]))
    with_lora, base = (read_mp4(p)[0] for p in runs)
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(with_lora, base)) > 0
    assert json.loads(runs[0].with_suffix(".json").read_text())["adapters"][0]["scale"] == 0.8
    assert "adapters" not in json.loads(runs[1].with_suffix(".json").read_text())  # off again without --lora


def test_seed_reproduces_base_plus_adapter_equals_folder_and_chunked_decode_matches(ad):
    common = {"prompt": "a calm sea", "frames": 8, "steps": 2, "guidance": 1.0}
    a, a2 = engine_run({**common, "model": str(ad), "seed": 5, "num_outputs": 2})
    # the explicit base + adapter path loads the same weights: same pixels
    b = engine_run({**common, "model": str(ad), "motion_adapter": str(ad / "motion_adapter"), "seed": 5,
                    "decode_chunk_size": 3})[0]
    assert (a.params["seed"], a2.params["seed"]) == (5, 6)
    assert np.abs(arrays(a) - arrays(b)).max() <= 1.0  # decoding 3 frames at a time changes nothing
    assert b.extra["video"]["decode"]["chunk"] == 3
    assert np.abs(arrays(a) - arrays(a2)).mean() > 1.0  # another seed, another clip


def test_t2v_frames_folder_and_no_init(cli, t2v, tmp_path, init_png):
    out = tmp_path / "o"
    r = cli("video", "a calm sea", "--model", t2v, *FAST, "--format", "frames", "--out", out)
    assert r.exit_code == 0, r
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1
    pngs = sorted(folders[0].glob("*.png"))
    assert [p.name for p in pngs][:2] == ["00000.png", "00001.png"] and len(pngs) == 8
    assert Image.open(pngs[0]).size == (32, 32)
    assert json.loads((out / (folders[0].name + ".json")).read_text())["video"]["pipeline"] == "TextToVideoSDPipeline"
    bad = cli("video", "a calm sea", "--model", t2v, *FAST, "--init", init_png, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "image-to-video" in bad.stderr


def test_saved_animatediff_pipeline_folder_loads(ad, tmp_path):
    """A whole AnimateDiffPipeline saved with save_pretrained (the hub layout of merged models)."""
    from studio.device import DeviceManager
    from studio.models import resolve

    from studio.pipelines.video import VideoPipeline, VideoRequest

    vp = VideoPipeline.load(resolve(str(ad), task="video"), DeviceManager())
    pipe = vp._animatediff(VideoRequest(prompt="x"))
    pipe.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "model_index.json").read_text())["_class_name"] == "AnimateDiffPipeline"
    r = engine_run({"prompt": "a calm sea", "model": str(tmp_path / "full"), "frames": 4, "steps": 2, "guidance": 1.0, "seed": 1})[0]
    assert len(r.value) == 4 and r.extra["video"]["pipeline"] == "AnimateDiffPipeline"
    with pytest.raises(Exception, match="already holds its motion modules"):
        engine_run({"prompt": "x", "model": str(tmp_path / "full"), "motion_adapter": str(ad / "motion_adapter"),
                    "frames": 4, "steps": 1, "seed": 1})


# ----------------------------------------------------------------------------- prompt travel, long clips, control
def test_prompt_travel_changes_later_frames(cli, ad, tmp_path):
    common = {"model": str(ad), "frames": 8, "steps": 2, "guidance": 1.0, "seed": 2}
    still = engine_run({**common, "prompt": "a calm sea", "prompt_map": "0:a calm sea"})[0]
    # the keyframes come from a preset file, as a YAML mapping
    preset = tmp_path / "travel.yaml"
    preset.write_text('task: video\nprompt_map:\n  0: a calm sea\n  6: a stormy sea at night\n')
    travel = engine_run({**common, "prompt": "a calm sea"}, preset=str(preset))[0]
    assert travel.extra["video"]["free_noise"] == {"context_length": 8, "context_stride": 4, "prompt_travel": True}
    assert travel.params["prompt_map"] == {0: "a calm sea", 6: "a stormy sea at night"}
    diff = np.abs(arrays(still) - arrays(travel)).mean(axis=(1, 2, 3))  # per frame
    assert diff[-1] > 0.5  # the keyframe's prompt reached the end of the clip
    # a keyframe past the clip is a usage error, and nothing is written
    out = tmp_path / "o"
    r = cli("video", "a calm sea", "--model", ad, *FAST, "--prompt-map", "0:a,12:b", "--out", out)
    assert r.exit_code == 2 and "past the clip" in r.stderr and "--frames" in r.stderr
    assert not out.exists() or not outputs(out, ".mp4")


def test_prompt_travel_needs_animatediff(cli, t2v, tmp_path):
    r = cli("video", "a", "--model", t2v, *FAST, "--prompt-map", "0:a,4:b", "--out", tmp_path)
    assert r.exit_code == 2 and "AnimateDiff" in r.stderr


def test_long_clip_slides_context_windows(ad):
    r = engine_run({"prompt": "a calm sea", "model": str(ad), "frames": 12, "steps": 2, "guidance": 1.0, "seed": 1})[0]
    assert len(r.value) == 12  # beyond the tiny adapter's 8-frame native length
    assert r.extra["video"]["free_noise"] == {"context_length": 8, "context_stride": 4, "prompt_travel": False}


def test_per_frame_controlnet_from_folder(cli, ad, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    Image.fromarray(moving_square(0, 32)).save(control / "0000.png")
    Image.fromarray(moving_square(4, 32)).save(control / "frame_4.png")
    out = tmp_path / "o"
    r = cli("video", "a square", "--model", ad, *FAST, "--controlnet", ad / "controlnet", "--control-frames", control,
            "--format", "gif", "--out", out)
    assert r.exit_code == 0, r
    gif = outputs(out, ".gif")[0]
    meta = json.loads(gif.with_suffix(".json").read_text())
    assert meta["video"]["pipeline"] == "AnimateDiffControlNetPipeline" and meta["video"]["control_keyframes"] == [0, 4]
    frames, durations = read_animated(gif)
    assert len(frames) == 8 and frames[0].size == (32, 32)
    assert all(abs(d - 125) <= 10 for d in durations)  # 8 fps in GIF's 10 ms ticks
    Image.fromarray(moving_square(9, 32)).save(control / "0009.png")
    late = cli("video", "a square", "--model", ad, *FAST, "--controlnet", ad / "controlnet", "--control-frames", control,
               "--out", tmp_path / "late")
    assert late.exit_code == 2 and "frame 9" in late.stderr


# ----------------------------------------------------------------------------- image-to-video
def test_svd_image_to_video_webp(cli, svd, tmp_path, init_png):
    out = tmp_path / "o"
    r = cli("video", "--init", init_png, "--model", svd, "--frames", "4", "--steps", "2", "--format", "webp",
            "--width", "32", "--height", "32", "--quiet", "--out", out)
    assert r.exit_code == 0, r
    webp = outputs(out, ".webp")[0]
    frames, durations = read_animated(webp)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    assert durations[0] == int(1000 / 7)  # SVD's native 7 fps
    meta = json.loads(webp.with_suffix(".json").read_text())
    assert meta["video"]["mode"] == "image-to-video" and meta["params"]["init_image"] == str(init_png)
    no_init = cli("video", "--model", svd, "--frames", "4", "--out", tmp_path / "x")
    assert no_init.exit_code == 2 and "--init" in no_init.stderr
    prompt = cli("video", "a boat", "--init", init_png, "--model", svd, "--frames", "4", "--out", tmp_path / "y")
    assert prompt.exit_code == 2 and "no prompt" in prompt.stderr


def test_animatediff_init_image_and_interpolate_flag(ad, init_png):
    r = engine_run({"prompt": "a square", "model": str(ad), "frames": 8, "steps": 2, "guidance": 1.0, "seed": 1,
                    "init_image": str(init_png), "strength": 0.6, "interpolate": 2})[0]
    assert r.extra["video"]["pipeline"] == "AnimateDiffVideoToVideoPipeline"
    assert r.extra["video"]["generated_frames"] == 8 and len(r.value) == 15  # 7 in-between frames
    assert r.params["fps"] == 16.0  # same duration at twice the rate
    # the generated frames are kept as they were: every other output frame
    assert r.value[0].size == (32, 32)


# ----------------------------------------------------------------------------- transformer families
def test_ltx_text_and_image_to_video_share_weights(transformer_models, init_png):
    ltx = str(transformer_models / "ltx")
    common = {"prompt": "a calm sea", "model": ltx, "frames": 5, "steps": 2, "width": 32, "height": 32, "seed": 1}
    t2v = engine_run(common)[0]
    i2v = engine_run({**common, "init_image": str(init_png)})[0]
    assert t2v.extra["video"]["pipeline"] == "LTXPipeline" and len(t2v.value) == 5 and t2v.params["fps"] == 24.0
    assert i2v.extra["video"]["pipeline"] == "LTXImageToVideoPipeline" and len(i2v.value) == 5
    from studio.errors import UsageError

    with pytest.raises(UsageError, match="4k\\+1 frames") as err:  # the tiny VAE compresses time 4x
        engine_run({**common, "frames": 6})
    assert "--frames 5" in err.value.hint
    with pytest.raises(UsageError, match="multiple of 32"):
        engine_run({**common, "width": 48})


def test_wan_text_to_video_and_no_init_on_t2v_weights(transformer_models, init_png):
    from studio.errors import UsageError

    wan = str(transformer_models / "wan")
    r = engine_run({"prompt": "a calm sea", "model": wan, "frames": 5, "steps": 2, "width": 32, "height": 32, "seed": 1})[0]
    assert r.extra["video"]["pipeline"] == "WanPipeline" and len(r.value) == 5 and r.value[0].size == (32, 32)
    assert r.params["fps"] == 16.0
    with pytest.raises(UsageError, match="image-to-video checkpoint"):
        engine_run({"prompt": "x", "model": wan, "frames": 5, "steps": 1, "init_image": str(init_png)})


# ----------------------------------------------------------------------------- interpolation
def test_flow_interpolation_beats_repetition_and_blending():
    from studio.pipelines.interpolate import middle_frame

    for method in ("farneback", "dis"):
        errors = {"flow": 0.0, "repeat": 0.0, "blend": 0.0}
        for t in (0, 2, 4):
            a, truth, b = moving_square(t), moving_square(t + 1).astype(np.float32), moving_square(t + 2)
            errors["flow"] += np.abs(middle_frame(a, b, 0.5, method=method) - truth).mean()
            errors["repeat"] += np.abs(a - truth).mean()
            errors["blend"] += np.abs((a.astype(np.float32) + b) / 2 - truth).mean()
        assert errors["flow"] < 0.8 * errors["blend"] < 0.8 * errors["repeat"], (method, errors)
        if method == "dis":  # the default
            assert errors["repeat"] / errors["flow"] > 3.0, errors


def test_interpolate_command_on_an_mp4(cli, tmp_path):
    import imageio.v2 as iio2

    clip = tmp_path / "in.mp4"
    writer = iio2.get_writer(str(clip), format="FFMPEG", fps=10, codec="libx264", macro_block_size=1, pixelformat="yuv420p")
    for t in range(0, 10, 2):
        writer.append_data(moving_square(t))
    writer.close()
    out = tmp_path / "o"
    r = cli("video", "interpolate", clip, "--factor", "3", "--out", out, "--json")
    assert r.exit_code == 0, r
    path = Path(json.loads(r.stdout.strip().splitlines()[-1])["path"])
    frames, fps, comment = read_mp4(path)
    assert len(frames) == (5 - 1) * 3 + 1 and fps == pytest.approx(30.0) and frames[0].shape == (48, 48, 3)
    assert json.loads(comment)["factor"] == 3
    # gif in, gif out; a single-frame clip and a bad factor are usage errors
    gif = tmp_path / "in.gif"
    Image.fromarray(moving_square(0)).save(gif, save_all=True, append_images=[Image.fromarray(moving_square(2))], duration=100)
    r = cli("video", "interpolate", gif, "--out", out)
    assert r.exit_code == 0, r
    frames, durations = read_animated(outputs(out, ".gif")[0])
    assert len(frames) == 3 and durations[0] == 50
    one = tmp_path / "one.gif"
    Image.fromarray(moving_square(0)).save(one)
    assert cli("video", "interpolate", one, "--out", out).exit_code == 2
    assert cli("video", "interpolate", clip, "--factor", "0", "--out", out).exit_code == 2
    assert cli("video", "interpolate", tmp_path / "missing.mp4", "--out", out).exit_code == 2


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, words", [
    (["--format", "avi"], "mp4, gif, webp"),
    (["--width", "30"], "multiple of 8"),
    (["--init", "nope.png"], "does not exist"),
    (["--context-length", "20"], "--context-length"),
    (["--controlnet", "x"], "go together"),
    (["--interpolate", "0"], "interpolation factor"),
])
def test_bad_input_is_exit_2_with_a_hint_and_no_file(cli, ad, tmp_path, args, words):
    out = tmp_path / "o"
    r = cli("video", "a calm sea", "--model", ad, *FAST, *args, "--out", out)
    assert r.exit_code == 2, r
    assert words in r.stderr and "hint:" in r.stderr
    assert not out.exists() or not [p for p in out.iterdir() if p.name != "manifest.jsonl"]


def test_cli_routes_prompt_and_subcommands(cli):
    r = cli("video", "--help")
    assert r.exit_code == 0 and "interpolate" in r.stdout and "generate" in r.stdout
    assert "--factor" in cli("video", "interpolate", "--help").stdout
    assert "--prompt-map" in cli("video", "generate", "--help").stdout
