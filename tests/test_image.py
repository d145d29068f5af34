"""`studio image`: every feature through the CLI on tiny random models of the real architectures
(tiny SD 1.x / SDXL / ControlNet / LoRA built by `studio models make-tiny`), offline.

What a user would notice: files and metadata written, pixels that reproduce under a seed and equal
a plain diffusers script's, errors that say what to change (exit 2, no file written).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

STEPS = ("--steps", "2")


# ----------------------------------------------------------------------------- helpers
def images(out: str | Path) -> list[Path]:
    """The main images of an output folder (companions are NAME.KIND.png)."""
    return sorted(p for p in Path(out).glob("*.png") if "." not in p.stem)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def gen(cli, *args: str, out: str = "out") -> list[Path]:
    before = set(images(out))
    r = cli("image", *args, *STEPS, "-o", out, "-q")
    assert r.exit_code == 0, r
    return sorted(set(images(out)) - before)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 70x50 RGBA image with shapes (edges for canny, a size that needs resizing)."""
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    arr = np.zeros((50, 70, 4), dtype=np.uint8)
    arr[..., 3] = 255
    arr[10:40, 10:30, :3] = (220, 40, 40)
    arr[5:25, 40:65, :3] = (40, 200, 90)
    Image.fromarray(arr, "RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "mask.png"
    m = np.zeros((48, 64), dtype=np.uint8)
    m[8:40, 16:48] = 255
    Image.fromarray(m).save(path)
    return path


# ----------------------------------------------------------------------------- text to image
def test_text2img_writes_images_with_metadata_and_consecutive_seeds(cli, tiny):
    sd = tiny("sd")
    r = cli("image", "a red cat on a hat", "--model", sd, *STEPS, "--seed", "5", "--num", "2",
            "--negative", "blue", "-o", "out", "--json")
    assert r.exit_code == 0, r
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [5, 6]
    paths = images("out")
    assert len(paths) == 2
    for path, seed in zip(sorted(paths, key=lambda p: sidecar(p)["params"]["seed"]), (5, 6)):
        meta = sidecar(path)
        assert meta["params"]["seed"] == seed and meta["params"]["num_outputs"] == 1
        assert meta["params"]["negative_prompt"] == "blue"
        assert (meta["params"]["width"], meta["params"]["height"]) == (64, 64)
        assert meta["pipeline"] == "StableDiffusionPipeline"
        parameters = Image.open(path).text["parameters"]
        assert parameters.startswith("a red cat on a hat\nNegative prompt: blue\n")
        assert f"Seed: {seed}" in parameters and "Steps: 2" in parameters and "Size: 64x64" in parameters
    rows = [json.loads(line) for line in Path("out/manifest.jsonl").read_text().splitlines()]
    assert sorted(row["seed"] for row in rows) == [5, 6]


def test_same_seed_same_pixels_other_seed_differs(cli, tiny):
    sd = tiny("sd")
    a = gen(cli, "a dog", "--model", sd, "--seed", "7", out="a")[0]
    b = gen(cli, "a dog", "--model", sd, "--seed", "7", out="b")[0]
    c = gen(cli, "a dog", "--model", sd, "--seed", "8", out="c")[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_seeds_list_one_image_per_seed_matching_single_runs(cli, tiny):
    sd = tiny("sd")
    paths = gen(cli, "a fox", "--model", sd, "--seeds", "3,1", out="many")
    by_seed = {sidecar(p)["params"]["seed"]: p for p in paths}
    assert set(by_seed) == {1, 3}
    single = gen(cli, "a fox", "--model", sd, "--seed", "1", out="one")[0]
    assert np.array_equal(pixels(by_seed[1]), pixels(single))  # a batch image equals its solo run


@pytest.mark.parametrize("scheduler", [None, "dpm++_2m_karras"])
def test_parity_with_a_plain_diffusers_script(cli, tiny, scheduler):
    """studio's image equals what a few lines of diffusers make with the same seed (max diff 0)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sd = tiny("sd")
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    if scheduler:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    plain = pipe("a lighthouse at dusk", num_inference_steps=2, guidance_scale=7.0, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(11)).images[0]
    args = ["--scheduler", scheduler] if scheduler else []
    ours = gen(cli, "a lighthouse at dusk", "--model", sd, "--seed", "11", "--guidance", "7", *args)[0]
    assert np.abs(pixels(ours) - np.asarray(plain).astype(np.int16)).max() == 0


def test_single_file_checkpoint_equals_the_folder(cli, tiny):
    sd = tiny("sd")
    folder = gen(cli, "a cat", "--model", sd, "--seed", "2", out="folder")[0]
    single = gen(cli, "a cat", "--model", Path(sd) / "tiny-sd.safetensors", "--seed", "2", out="single")[0]
    assert np.array_equal(pixels(folder), pixels(single))
    assert sidecar(single)["model"]["kind"] == "file" and len(sidecar(single)["model"]["sha256"]) == 64


def test_sdxl_text2img_with_weighting(cli, tiny):
    sdxl = tiny("sdxl")
    plain = gen(cli, "a red cat", "--model", sdxl, "--seed", "1", out="p")[0]
    weighted = gen(cli, "a (red:1.6) cat", "--model", sdxl, "--seed", "1", out="w")[0]
    assert sidecar(weighted)["pipeline"] == "StableDiffusionXLPipeline"
    assert sidecar(weighted)["weighting"].startswith("compel")
    assert not np.array_equal(pixels(plain), pixels(weighted))


def test_list_schedulers(cli):
    r = cli("image", "--list-schedulers")
    assert r.exit_code == 0, r
    for name in ("euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim", "lcm", "unipc", "flow_euler"):
        assert name in r.stdout


def test_every_scheduler_builds_from_the_model_config(tiny):
    from diffusers import StableDiffusionPipeline

    from studio.pipelines.image import SCHEDULERS, make_scheduler, scheduler_family
    from studio.device import module_available
    from studio.errors import BackendUnavailable, UsageError

    base = StableDiffusionPipeline.from_pretrained(tiny("sd")).scheduler
    one_per_class = {cls: name for name, (cls, _, _) in reversed(list(SCHEDULERS.items()))}
    for cls, name in one_per_class.items():
        if cls == "LMSDiscreteScheduler" and not module_available("scipy"):
            with pytest.raises(BackendUnavailable, match="needs scipy"):
                make_scheduler(name, base)
        elif scheduler_family(cls) == "flow":
            with pytest.raises(UsageError, match="does not fit"):
                make_scheduler(name, base)
        else:
            made = make_scheduler(name, base)
            assert type(made).__name__ == cls and made.config.beta_schedule == "scaled_linear"
    assert make_scheduler("dpm++_2m_karras", base).config.use_karras_sigmas is True
    assert make_scheduler("dpm++_2m", base).config.use_karras_sigmas is False


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["a cat", "--width", "60"], "multiple of 8"),
    (["a cat", "--steps", "0"], "at least 1"),
    (["a cat", "--guidance", "-1"], ">= 0"),
    (["", "--negative", ""], "prompt is empty"),
    (["a cat", "--scheduler", "warp"], "unknown scheduler"),
    (["a cat", "--scheduler", "flow_euler"], "does not fit"),
    (["a cat", "--seeds", "1,x"], "comma-separated"),
    (["a cat", "--strength", "0.5"], "--init"),
    (["a cat", "--init", "missing.png"], "does not exist"),
    (["a cat", "--init", "corrupt.png"], "not a readable image"),
    (["a cat", "--init", "photo.png", "--strength", "1.5"], "(0, 1]"),
    (["a cat", "--init", "photo.png", "--strength", "0.3"], "no denoising step"),
    (["a cat", "--init", "photo.png", "--outpaint", "left:12"], "multiple of 8"),
    (["a cat", "--init", "photo.png", "--outpaint", "sideways:8"], "SIDE:PIXELS"),
    (["a cat", "--mask", "photo.png"], "need an --init"),
    (["a cat", "--control", "sketchy:photo.png"], "unknown control type"),
    (["a cat", "--control", "canny:photo.png:1:0.8:0.2"], "start"),
    (["a cat", "--control", "none:photo.png"], "--control-model"),
    (["a cat", "--control", "depth:photo.png", "--control-model", "a", "--control-model", "b"], "one --control-model per"),
    (["a cat", "--lora", "no/such/lora.safetensors"], "LoRA"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tiny, photo, args, message):
    Path("corrupt.png").write_bytes(b"\x89PNG not really")
    Path("photo.png").write_bytes(photo.read_bytes())
    r = cli("image", "--model", tiny("sd"), *STEPS, "-o", "out", *args)
    assert r.exit_code == 2, r
    assert message in r.stderr, r
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] and "Traceback" not in r.stderr
    assert not images("out")


def test_prompt_missing_is_a_usage_error(cli):
    r = cli("image", "--num", "2")
    assert r.exit_code == 2 and "missing PROMPT" in r.stderr


# ----------------------------------------------------------------------------- img2img / inpaint / outpaint
def test_img2img_converts_and_resizes_with_notes(cli, tiny, photo):
    r = cli("image", "a red cat", "--model", tiny("sd"), *STEPS, "--init", photo, "--strength", "0.5",
            "--seed", "1", "-o", "out")
    assert r.exit_code == 0, r
    assert "resized the init image from 70x50 to 64x48" in r.stderr
    assert "converted the init image from RGBA to RGB" in r.stderr
    path = images("out")[0]
    assert Image.open(path).size == (64, 48)
    meta = sidecar(path)
    assert meta["pipeline"] == "StableDiffusionImg2ImgPipeline" and meta["params"]["strength"] == 0.5
    assert meta["params"]["init_image"] == str(photo)
    assert "Denoising strength: 0.5" in Image.open(path).text["parameters"]
    # strength changes how much of the init image survives
    stronger = gen(cli, "a red cat", "--model", tiny("sd"), "--init", photo, "--strength", "1.0", "--seed", "1", out="s")[0]
    assert not np.array_equal(pixels(path), pixels(stronger))


def test_inpaint_with_mask(cli, tiny, photo, mask):
    path = gen(cli, "a red cat", "--model", tiny("sd"), "--init", photo, "--mask", mask, "--seed", "1")[0]
    meta = sidecar(path)
    assert meta["pipeline"] == "StableDiffusionInpaintPipeline" and meta["mode"] == "inpaint"
    assert meta["params"]["strength"] == 1.0 and Image.open(path).size == (64, 48)


def test_outpaint_grows_the_canvas(cli, tiny, photo):
    path = gen(cli, "a red cat", "--model", tiny("sd"), "--init", photo, "--outpaint", "left:16,top:8", "--seed", "1")[0]
    assert Image.open(path).size == (64 + 16, 48 + 8)
    assert sidecar(path)["params"]["outpaint"] == "left:16,top:8"


def test_outpaint_canvas_and_mask():
    from studio.pipelines.image import outpaint_canvas

    image = Image.new("RGB", (32, 16), (200, 10, 10))
    canvas, m = outpaint_canvas(image, {"left": 8, "right": 0, "top": 0, "bottom": 8}, overlap=4)
    assert canvas.size == (40, 24) and m.size == (40, 24)
    m = np.asarray(m)
    assert m[0, 0] == 255 and m[20, 20] == 255  # the padding is repainted
    assert m[5, 30] == 0 and m[5, 9] == 255  # the image is kept, except a 4 px seam band
    assert np.asarray(canvas)[5, 20].tolist() == [200, 10, 10]


# ----------------------------------------------------------------------------- ControlNet
def test_controlnet_canny_saves_the_map_and_steers_the_image(cli, tiny, photo):
    import cv2

    sd, cn = tiny("sd"), tiny("controlnet")
    base = gen(cli, "a red cat", "--model", sd, "--seed", "4", out="base")[0]
    r = cli("image", "a red cat", "--model", sd, *STEPS, "--seed", "4", "--control", f"canny:{photo}:0.9",
            "--control-model", cn, "-o", "out")
    assert r.exit_code == 0, r
    assert "resized the canny control image from 70x50 to 64x64" in r.stderr
    path = images("out")[0]
    meta = sidecar(path)
    assert meta["pipeline"] == "StableDiffusionControlNetPipeline"
    assert meta["controls"][0]["type"] == "canny" and meta["controls"][0]["scale"] == 0.9
    control_map = path.with_name(meta["companions"]["control"])
    expected = cv2.Canny(np.asarray(Image.open(photo).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS).convert("L")), 100, 200)
    assert np.array_equal(np.asarray(Image.open(control_map))[..., 0], expected)
    assert not np.array_equal(pixels(path), pixels(base))


def test_multi_controlnet_with_img2img(cli, tiny, photo):
    sd, cn = tiny("sd"), tiny("controlnet")
    path = gen(cli, "a red cat", "--model", sd, "--seed", "4", "--init", photo, "--strength", "0.5",
               "--control", f"canny:{photo}", "--control", f"none:{photo}:0.5:0:0.5",
               "--control-model", cn, "--control-model", cn)[0]
    meta = sidecar(path)
    assert meta["pipeline"] == "StableDiffusionControlNetImg2ImgPipeline"
    assert [c["type"] for c in meta["controls"]] == ["canny", "none"]
    assert meta["controls"][1]["end"] == 0.5
    assert set(meta["companions"]) == {"control-0", "control-1"}


def test_controlnet_that_does_not_fit_the_base(cli, tiny, photo):
    r = cli("image", "a cat", "--model", tiny("sdxl"), *STEPS, "--control", f"canny:{photo}",
            "--control-model", tiny("controlnet"), "-o", "out")
    assert r.exit_code == 2, r
    assert "does not fit this base model" in r.stderr and not images("out")


def test_control_preprocess_writes_the_map(cli, photo):
    import cv2

    r = cli("control", "preprocess", "canny", photo, "--low", "50", "--high", "150", "-o", "maps", "--json")
    assert r.exit_code == 0, r
    path = Path(json.loads(r.stdout)["path"])
    expected = cv2.Canny(np.asarray(Image.open(photo).convert("L")), 50, 150)
    assert np.array_equal(np.asarray(Image.open(path))[..., 0], expected)
    assert json.loads(path.with_suffix(".json").read_text())["params"]["type"] == "canny"


def test_control_preprocessor_without_controlnet_aux_is_a_clear_error(cli, photo):
    from studio.device import module_available

    if module_available("controlnet_aux"):
        pytest.skip("controlnet-aux is installed here")
    r = cli("control", "preprocess", "depth", photo, "-o", "maps")
    assert r.exit_code == 2 and "controlnet-aux" in r.stderr and "pip install" in r.stderr


def test_parse_control_spec():
    from studio.pipelines.control import parse_control

    assert parse_control("canny:a.png").scale == 1.0
    spec = parse_control("openpose:dir:with:colons/p.png:0.7:0.1:0.9")
    assert (spec.type, spec.image, spec.scale, spec.start, spec.end) == ("pose", "dir:with:colons/p.png", 0.7, 0.1, 0.9)


# ----------------------------------------------------------------------------- LoRA
def test_lora_changes_the_image_scale_zero_and_unloaded_equal_the_base(cli, tiny):
    sd, lora = tiny("sd"), tiny("lora")
    base = gen(cli, "a cat", "--model", sd, "--seed", "3", out="base")[0]
    with_lora = gen(cli, "a cat", "--model", sd, "--seed", "3", "--lora", f"{lora}:0.8", out="lora")[0]
    zero = gen(cli, "a cat", "--model", sd, "--seed", "3", "--lora", f"{lora}:0", out="zero")[0]
    after = gen(cli, "a cat", "--model", sd, "--seed", "3", out="after")[0]
    assert not np.array_equal(pixels(base), pixels(with_lora))
    assert np.array_equal(pixels(base), pixels(zero))
    assert np.array_equal(pixels(base), pixels(after))  # a later run without --lora is the base again
    adapters = sidecar(with_lora)["adapters"]
    assert adapters[0]["scale"] == 0.8 and adapters[0]["source"] == str(lora)
    from safetensors import safe_open

    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), "pt") as f:  # both parts, as kohya LoRAs
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder"}


def test_two_loras_with_weights_and_fused(cli, tiny, tmp_path):
    from studio.pipelines.tiny import make_tiny

    sd, lora = tiny("sd"), tiny("lora")
    other = make_tiny("lora", tmp_path / "lora2", seed=5)
    file_lora = other / "pytorch_lora_weights.safetensors"
    base = gen(cli, "a cat", "--model", sd, "--seed", "3", out="base")[0]
    both = gen(cli, "a cat", "--model", sd, "--seed", "3", "--lora", f"{lora}:0.5", "--lora", f"{file_lora}:0.5", out="both")[0]
    one = gen(cli, "a cat", "--model", sd, "--seed", "3", "--lora", f"{lora}:0.5", out="one")[0]
    fused = gen(cli, "a cat", "--model", sd, "--seed", "3", "--lora", f"{lora}:0.5", "--lora", f"{file_lora}:0.5",
                "--fuse-lora", out="fused")[0]
    assert len(sidecar(both)["adapters"]) == 2
    assert not np.array_equal(pixels(both), pixels(one))
    assert np.abs(pixels(both) - pixels(fused)).max() <= 2  # merged weights: equal up to float rounding
    assert sidecar(fused)["adapters"][0]["fused"] is True
    after = gen(cli, "a cat", "--model", sd, "--seed", "3", out="after")[0]
    assert np.array_equal(pixels(base), pixels(after))  # unfusing restored the weights exactly


def test_lora_that_does_not_fit_the_base(cli, tiny):
    r = cli("image", "a cat", "--model", tiny("sdxl"), *STEPS, "--lora", tiny("lora"), "-o", "out")
    assert r.exit_code == 2, r
    assert "does not fit" in r.stderr and not images("out")
    # the failed adapter left nothing behind: the model still makes images
    assert gen(cli, "a cat", "--model", tiny("sdxl"), "--seed", "1", out="ok")


def test_parse_lora_spec():
    from studio.adapters.lora import parse_lora

    assert parse_lora("org/style-lora").scale == 1.0
    assert parse_lora("c:/x/style.safetensors:0.6").source == "c:/x/style.safetensors"
    assert parse_lora("style.safetensors:-0.5").scale == -0.5


# ----------------------------------------------------------------------------- prompt weighting
def test_parse_weighted_a1111_syntax():
    from studio.pipelines.image import is_weighted, parse_weighted, plain_text

    assert parse_weighted("a (red:1.5) cat") == [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]
    assert parse_weighted("((big)) [small]") == [("big", 1.21), (" ", 1.0), ("small", round(1 / 1.1, 6))]
    assert parse_weighted(r"a \(literal\) cat") == [("a (literal) cat", 1.0)]
    assert parse_weighted("(a (b:2))") == [("a ", 1.1), ("b", 2.2)]
    assert plain_text("a (red:1.5) [cat]") == "a red cat"
    assert not is_weighted("a (red:1.0) cat") and is_weighted("a (red) cat")


def test_weighting_changes_the_image_and_no_weighting_is_verbatim(cli, tiny):
    sd = tiny("sd")
    plain = gen(cli, "a red cat", "--model", sd, "--seed", "9", out="plain")[0]
    neutral = gen(cli, "a (red:1.0) cat", "--model", sd, "--seed", "9", out="neutral")[0]
    weighted = gen(cli, "a (red:1.6) cat", "--model", sd, "--seed", "9", out="weighted")[0]
    verbatim = gen(cli, "a (red:1.6) cat", "--model", sd, "--seed", "9", "--no-weighting", out="verbatim")[0]
    assert np.array_equal(pixels(plain), pixels(neutral))  # weight 1 is the plain prompt
    assert not np.array_equal(pixels(plain), pixels(weighted))
    assert not np.array_equal(pixels(weighted), pixels(verbatim))
    assert sidecar(weighted)["weighting"].startswith("compel") and sidecar(verbatim)["weighting"] == "none"


# ----------------------------------------------------------------------------- attention maps
def test_attention_maps_write_a_map_per_word_and_leave_the_image_unchanged(cli, tiny):
    sd = tiny("sd")
    plain = gen(cli, "a red cat", "--model", sd, "--seed", "6", out="plain")[0]
    path = gen(cli, "a red cat", "--model", sd, "--seed", "6", "--attention-maps", out="maps")[0]
    assert np.array_equal(pixels(plain), pixels(path))
    meta = sidecar(path)
    assert meta["attention_words"] == ["a", "red", "cat"]
    names = meta["companions"]
    assert {"attention", "attn-00-a", "attn-01-red", "attn-02-cat"} <= set(names)
    sheet = Image.open(path.with_name(names["attention"]))
    assert sheet.size[0] >= 4 * 128  # the image and three words, tiles of at least 128 px
    maps = [pixels(path.with_name(names[f"attn-0{i}-{w}"])) for i, w in enumerate(("a", "red", "cat"))]
    assert not np.array_equal(maps[1], maps[2])  # each word attends somewhere else


# ----------------------------------------------------------------------------- replay
def test_replay_reproduces_img2img_control_lora_bit_for_bit(cli, tiny, photo):
    sd, cn, lora = tiny("sd"), tiny("controlnet"), tiny("lora")
    first = gen(cli, "a (red:1.3) cat", "--model", sd, "--seed", "12", "--init", photo, "--strength", "0.6",
                "--control", f"canny:{photo}:0.8", "--control-model", cn, "--lora", f"{lora}:0.7",
                "--scheduler", "euler_a", out="run")[0]
    r = cli("replay", first, "-q")
    assert r.exit_code == 0, r
    again = [p for p in images("run") if p != first]
    assert len(again) == 1
    assert np.array_equal(pixels(first), pixels(again[0]))
    assert sidecar(again[0])["params"] == sidecar(first)["params"]


# ----------------------------------------------------------------------------- CLI import cost
def test_image_cli_imports_nothing_heavy():
    code = ("import sys, studio.cli.image, studio.pipelines.image, studio.pipelines.control, studio.adapters.lora; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2', 'compel') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- transformer families
@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3 (MMDiT transformer, flow matching, two CLIP encoders; SD3 runs without
    its optional T5), diffusers' get_dummy_components style, saved and loaded back like a user's."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from studio.pipelines.tiny.image import tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    text_encoder=tiny_text_encoder(projection=True), tokenizer=tiny_tokenizer(),
                                    text_encoder_2=tiny_text_encoder(projection=True), tokenizer_2=tiny_tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)
    out = tmp_path_factory.mktemp("tiny-sd3") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_sd3_transformer_family(cli, tiny_sd3, photo):
    path = gen(cli, "a red cat", "--model", tiny_sd3, "--seed", "1", "--scheduler", "flow_heun", out="a")[0]
    meta = sidecar(path)
    assert meta["pipeline"] == "StableDiffusion3Pipeline" and meta["scheduler"] == "FlowMatchHeunDiscreteScheduler"
    assert Image.open(path).size == (64, 64)
    again = gen(cli, "a red cat", "--model", tiny_sd3, "--seed", "1", "--scheduler", "flow_heun", out="b")[0]
    assert np.array_equal(pixels(path), pixels(again))
    i2i = gen(cli, "a red cat", "--model", tiny_sd3, "--seed", "1", "--init", photo, "--strength", "0.5", out="c")[0]
    assert sidecar(i2i)["pipeline"] == "StableDiffusion3Img2ImgPipeline"
    assert Image.open(i2i).size == (64, 48)  # 70x50 rounded down to multiples of 16
    verbatim = gen(cli, "a (red:1.3) cat", "--model", tiny_sd3, "--seed", "1", "--no-weighting", out="d")[0]
    assert sidecar(verbatim)["weighting"] == "none"


@pytest.mark.parametrize("args, message", [
    (["a cat", "--width", "72"], "multiple of 16"),
    (["a (red:1.3) cat"], "--no-weighting"),
    (["a cat", "--scheduler", "euler"], "flow_euler"),
    (["a cat", "--attention-maps"], "UNet"),
])
def test_sd3_rejects_what_it_cannot_do(cli, tiny_sd3, args, message):
    r = cli("image", "--model", tiny_sd3, *STEPS, "-o", "out", *args)
    assert r.exit_code == 2, r
    assert message in r.stderr and not images("out")
