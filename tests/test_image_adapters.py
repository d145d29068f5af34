"""IP-Adapter, T2I-Adapter, the SDXL refiner and regional prompts on `studio image` (issue 22),
on tiny random models of the real architectures and the shipped starter model, offline.

What a user would notice: the reference image / control map / refiner changes the picture and
its absence (or scale 0) gives back exactly the plain picture, even in the same process after a
run that used them (the cached pipeline is left as it was found); the adapter map written beside
the image; A1111's entries in the PNG; replay making the same pixels; a studio output equal to
the diffusers script it stands for; regions that put each prompt's colour inside its own box;
one-line errors (exit 2, nothing written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# the image-feature tests' readers and checks, and their tiny SD fixture (sd)
from tests.test_image_features import images, infotext, pixels, refused, sd, sidecar  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "-q")


# ----------------------------------------------------------------------------- helpers
def gen(cli, model: Path, *args: str, out: str = "out", prompt: str = "a red cat") -> Path:
    before = set(images(out))
    r = cli("image", prompt, "--model", model, *FAST, *args, "-o", out)
    assert r.exit_code == 0, r
    made = sorted(set(images(out)) - before)
    assert len(made) == 1, made
    return made[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    square = np.zeros((64, 64, 3), dtype=np.uint8)
    square[16:48, 16:48] = (220, 40, 40)
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::8] = (40, 200, 90)
    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    paths = {"square": folder / "square.png", "stripes": folder / "stripes.png", "left": folder / "left.png"}
    Image.fromarray(square).save(paths["square"])
    Image.fromarray(stripes).save(paths["stripes"])
    Image.fromarray(left).save(paths["left"])
    return paths


@pytest.fixture(scope="module")
def baseline(sd, tmp_path_factory) -> np.ndarray:
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path_factory.mktemp("baseline")
    r = CliRunner().invoke(app, ["image", "a red cat", "--model", str(sd), *FAST, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return pixels(images(out)[0])


# ----------------------------------------------------------------------------- IP-Adapter
def test_ip_adapter_reference_image_steers_scale_0_is_plain_and_unloads(cli, sd, tiny, inputs, baseline):
    ip = tiny("ip-adapter")
    square = gen(cli, sd, "--ip-adapter", f"{inputs['square']}:0.8", "--ip-adapter-model", ip)
    stripes = gen(cli, sd, "--ip-adapter", f"{inputs['stripes']}:0.8", "--ip-adapter-model", ip)
    assert np.abs(pixels(square) - baseline).mean() > 1  # the reference image changes the picture
    assert np.abs(pixels(square) - pixels(stripes)).mean() > 1  # and which image it is matters
    # scale 0 runs through the loaded adapter and gives the plain picture, bit for bit
    zero = gen(cli, sd, "--ip-adapter", f"{inputs['square']}:0", "--ip-adapter-model", ip)
    assert np.array_equal(pixels(zero), baseline)
    # without --ip-adapter the same cached pipeline is back to the plain picture (adapter unloaded)
    assert np.array_equal(pixels(gen(cli, sd)), baseline)
    meta = sidecar(square)
    assert meta["params"]["ip_adapter"] == f"{inputs['square'].resolve()}:0.8"
    assert meta["ip_adapter"]["scale"] == 0.8 and meta["ip_adapter"]["weight_name"] == "ip-adapter.safetensors"
    # sd-webui-controlnet writes an IP-Adapter as a ControlNet unit
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: model, Weight: 0.8' in infotext(square), infotext(square)
    again = cli("replay", square, "-o", "replayed", "-q")
    assert again.exit_code == 0, again
    assert np.array_equal(pixels(images("replayed")[0]), pixels(square))


def test_ip_adapter_bad_input(cli, sd, tiny, inputs, tmp_path):
    ip = tiny("ip-adapter")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--ip-adapter", "nope.png", "--ip-adapter-model", ip,
            says="nope.png does not exist")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--ip-adapter", f"{inputs['square']}:20", "--ip-adapter-model", ip,
            says="scale 20 must be 0-10")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--ip-adapter-model", ip, says="applies with --ip-adapter")
    no_encoder = tmp_path / "lonely"
    no_encoder.mkdir()
    (no_encoder / "ip-adapter.safetensors").write_bytes((Path(ip) / "ip-adapter.safetensors").read_bytes())
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--ip-adapter", inputs["square"], "--ip-adapter-model", no_encoder,
            says="has no image_encoder/")
    # an SDXL adapter on an SD 1.x model: said before it runs, and the model still works after
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--ip-adapter", inputs["square"],
            "--ip-adapter-model", tiny("ip-adapter-sdxl"), says="does not fit")
    gen(cli, sd, out="after")


# ----------------------------------------------------------------------------- T2I-Adapter
def test_t2i_adapter_map_steers_is_written_beside_and_recorded(cli, sd, tiny, inputs, baseline):
    from studio.pipelines.control import canny

    adapter = tiny("t2i-adapter")
    made = gen(cli, sd, "--t2i-adapter", f"canny:{inputs['square']}:1", "--t2i-adapter-model", adapter)
    assert np.abs(pixels(made) - baseline).mean() > 1
    cmap = made.with_name(made.stem + ".t2i.png")  # beside the image, as NAME.control.png is
    assert np.array_equal(pixels(cmap), pixels_of(canny(Image.open(inputs["square"]).convert("RGB"))))
    text = infotext(made)
    assert 'ControlNet 0: "Module: canny, Model: model, Weight: 1.0' in text, text
    meta = sidecar(made)
    assert meta["params"]["t2i_adapters"] == [f"canny:{inputs['square'].resolve()}:1"]
    assert meta["t2i_adapters"][0]["model"]["source"] == str(adapter)
    weaker = gen(cli, sd, "--t2i-adapter", f"canny:{inputs['square']}:0.3", "--t2i-adapter-model", adapter, out="weak")
    assert np.abs(pixels(weaker) - baseline).mean() < np.abs(pixels(made) - baseline).mean()
    assert np.array_equal(pixels(gen(cli, sd, out="plain")), baseline)  # the base pipeline is untouched


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_t2i_adapter_refusals(cli, sd, tiny, inputs):
    adapter = tiny("t2i-adapter")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", f"canny:{inputs['square']}",
            "--t2i-adapter-model", adapter, "--control", f"canny:{inputs['square']}", says="cannot be combined with --control")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", f"canny:{inputs['square']}",
            "--t2i-adapter-model", adapter, "--init", inputs["square"], says="text-to-image only")
    refused(cli, "image", "a cat", "--model", sd, "--steps", "2", "--width", "72", "--height", "64", "-q",
            "--t2i-adapter", f"canny:{inputs['square']}", "--t2i-adapter-model", adapter, says="multiples of 16")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", "blur:x.png", says="unknown control type")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", f"canny:{inputs['square']}",
            "--t2i-adapter-model", adapter, "--t2i-adapter-model", adapter, says="2 --t2i-adapter-model for 1")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", f"canny:{inputs['square']}",
            "--t2i-adapter-model", sd, says="not a T2IAdapter")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--t2i-adapter", f"canny:{inputs['square']}",
            "--t2i-adapter-model", adapter, "--ip-adapter", inputs["square"], "--ip-adapter-model", tiny("ip-adapter"),
            says="needs SDXL")


# ----------------------------------------------------------------------------- SDXL refiner
def test_refiner_is_diffusers_base_plus_refiner_and_records_a1111_entries(cli, tiny):
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    sdxl, refiner = tiny("sdxl"), tiny("sdxl-refiner")
    made = gen(cli, sdxl, "--refiner", f"{refiner}:0.5", "--steps", "4", prompt="a red cat")
    text = infotext(made)
    assert f"Refiner: {refiner.name}, Refiner switch at: 0.5" in text, text
    meta = sidecar(made)
    assert meta["params"]["refiner"] == f"{refiner}:0.5" and meta["refiner"]["switch"] == 0.5

    # the ensemble of expert denoisers as diffusers' SDXL docs write it
    base = StableDiffusionXLPipeline.from_pretrained(sdxl)
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    for p in (base, ref):
        p.set_progress_bar_config(disable=True)
    latents = base("a red cat", num_inference_steps=4, guidance_scale=7.0, width=64, height=64, denoising_end=0.5,
                   output_type="latent", generator=torch.Generator().manual_seed(3)).images
    expected = ref("a red cat", image=latents, num_inference_steps=4, guidance_scale=7.0, denoising_start=0.5,
                   generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(pixels(made), pixels_of(expected))
    plain = gen(cli, sdxl, "--steps", "4", out="plain")
    assert np.abs(pixels(plain) - pixels(made)).mean() > 1  # the refiner did the last half

    again = cli("replay", made, "-o", "replayed", "-q")
    assert again.exit_code == 0, again
    assert np.array_equal(pixels(images("replayed")[0]), pixels(made))


def test_refiner_refusals(cli, sd, tiny, inputs):
    refiner, sdxl, ten = tiny("sdxl-refiner"), tiny("sdxl"), ("--steps", "10")
    refused(cli, "image", "a cat", "--model", sd, *FAST, *ten, "--refiner", refiner, says="for SDXL base models")
    refused(cli, "image", "a cat", "--model", sdxl, *FAST, *ten, "--refiner", f"{refiner}:1.5", says="between 0 and 1")
    refused(cli, "image", "a cat", "--model", sdxl, *FAST, "--refiner", f"{refiner}:0.9", says="no step (1.8 and 0.2)")
    refused(cli, "image", "a cat", "--model", sdxl, *FAST, *ten, "--refiner", refiner, "--init", inputs["square"],
            "--mask", inputs["left"], says="not inpainting")
    refused(cli, "image", "a cat", "--model", sdxl, *FAST, *ten, "--refiner", sd, says="not an SDXL refiner")


def test_a1111_infotext_of_these_features_reads_back():
    from studio.infotext import parse_a1111
    from studio.pipelines.image import params_from_infotext

    text = ("a castle\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 1024x1024, "
            "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.7, "
            'ControlNet 0: "Module: ip-adapter_clip_sdxl, Model: ip-adapter_sdxl [7d3d6ab1], Weight: 0.6, '
            'Guidance Start: 0, Guidance End: 1", ControlNet 1: "Module: canny, Model: t2iadapter_canny_sd15v2 [cecc6f4d], '
            'Weight: 0.9, Guidance Start: 0, Guidance End: 1"')
    params, notes = params_from_infotext(parse_a1111(text))
    said = " | ".join(notes)
    assert "refiner sd_xl_refiner_1.0 (switch at 0.7)" in said and "--refiner MODEL:0.7" in said
    assert "--ip-adapter IMAGE:0.6" in said and "--t2i-adapter canny:IMAGE:0.9" in said
    assert "ignored" not in said and "--control" not in said  # not mistaken for ControlNets or unknown fields
    # a refiner named by a card studio ships is used as is
    params, _ = params_from_infotext(parse_a1111(text.replace("sd_xl_refiner_1.0 [7440042bbd]", "sdxl-refiner")))
    assert params["refiner"] == "sdxl-refiner:0.7"


# ----------------------------------------------------------------------------- regional prompts
def test_a_whole_image_region_is_its_prompt_and_a_mask_equals_its_box(cli, sd, inputs):
    # one region over the whole image takes every pixel's prediction: the prompt itself, bit for bit
    direct = gen(cli, sd, prompt="a blue dog", out="direct")
    whole = gen(cli, sd, "--region", "a blue dog@0,0,1,1", prompt="a red cat", out="whole")
    assert np.array_equal(pixels(whole), pixels(direct))
    # a mask image marking the left half is the same region as the box 0,0,32,64 (pixels) or 0,0,0.5,1
    by_mask = gen(cli, sd, "--region", f"a blue dog@{inputs['left']}", out="mask")
    by_box = gen(cli, sd, "--region", "a blue dog@0,0,32,64", out="box")
    by_fraction = gen(cli, sd, "--region", "a blue dog@0,0,0.5,1", out="fraction")
    assert np.array_equal(pixels(by_mask), pixels(by_box)) and np.array_equal(pixels(by_box), pixels(by_fraction))
    assert np.abs(pixels(by_box) - pixels(direct)).mean() > 1  # half the image still follows "a red cat"
    meta = sidecar(by_mask)
    assert meta["params"]["regions"] == [f"a blue dog@{inputs['left'].resolve()}"]
    assert meta["regions"][0]["area"] == 0.5
    again = cli("replay", by_box, "-o", "replayed", "-q")
    assert again.exit_code == 0, again
    assert np.array_equal(pixels(images("replayed")[0]), pixels(by_box))


@pytest.mark.parametrize("region, says", [
    ("a cat", "is not PROMPT@BOX"),
    ("@0,0,1,1", "is not PROMPT@BOX"),
    ("a cat@1,2,3", "is not four numbers"),
    ("a cat@0.5,0,0.2,1", "x0 < x1"),
    ("a cat@0,0,128,64", "reaches outside the 64x64 image"),
    ("a cat@missing.png", "missing.png does not exist"),
])
def test_bad_regions_are_one_line_exit_2(cli, sd, region, says):
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--region", region, says=says)


def test_regions_refuse_what_they_cannot_blend(cli, sd, inputs):
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--region", "a dog@0,0,0.5,1",
            "--control", f"canny:{inputs['square']}", says="cannot be combined with --control")
    refused(cli, "image", "a cat", "--model", sd, *FAST, "--region", "a dog@0,0,0.5,1", "--attention-maps",
            says="--attention-maps")


def colour_shares(path: Path) -> dict[str, tuple[float, float]]:
    """Share of clearly red / clearly blue pixels in the (left, right) half. (A large circle drawn
    in a half-width region covers about a tenth of that half.)"""
    a = pixels(path)
    half = a.shape[1] // 2
    red = (a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)
    blue = (a[..., 2] > 150) & (a[..., 0] < 100) & (a[..., 1] < 150)
    return {"red": (red[:, :half].mean(), red[:, half:].mean()), "blue": (blue[:, :half].mean(), blue[:, half:].mean())}


def test_two_regions_two_colours_each_inside_its_box_on_the_starter(cli):
    """The starter model draws one shape per image; with two regions it draws a red square in the
    left half and a blue circle in the right, and swapping the boxes swaps the colours (same
    seeds): the regions, not the seed, put them there."""
    red = "a large red square in the center, white background"
    blue = "a large blue circle in the center, white background"
    common = ("white background", "--model", "starter-image", "--steps", "10", "--seeds", "0,1", "-q")
    r = cli("image", *common, "--region", f"{red}@0,0,0.5,1", "--region", f"{blue}@0.5,0,1,1", "-o", "ab")
    assert r.exit_code == 0, r
    s = cli("image", *common, "--region", f"{blue}@0,0,0.5,1", "--region", f"{red}@0.5,0,1,1", "-o", "ba")
    assert s.exit_code == 0, s
    for path in images("ab"):
        shares = colour_shares(path)
        (red_left, red_right), (blue_left, blue_right) = shares["red"], shares["blue"]
        assert red_left > 0.03 and red_left > 5 * red_right, shares  # red inside its box
        assert blue_right > 0.03 and blue_right > 5 * blue_left, shares  # blue inside its box
    for path in images("ba"):
        shares = colour_shares(path)
        (red_left, red_right), (blue_left, blue_right) = shares["red"], shares["blue"]
        assert red_right > 0.03 and red_right > 5 * red_left, shares
        assert blue_left > 0.03 and blue_left > 5 * blue_right, shares


# ----------------------------------------------------------------------------- files and help
def test_batch_file_jobs_take_the_new_fields(cli, sd, tiny, inputs, tmp_path):
    batch = tmp_path / "jobs.yaml"
    batch.write_text(f"""
defaults: {{model: "{sd}", steps: 2, width: 64, height: 64, seed: 3}}
jobs:
  - {{task: image, prompt: a red cat, ip_adapter: "{inputs['square']}:0.8", ip_adapter_model: "{tiny('ip-adapter')}"}}
  - {{task: image, prompt: a red cat, t2i_adapters: ["canny:{inputs['square']}"], t2i_adapter_models: ["{tiny('t2i-adapter')}"]}}
  - {{task: image, prompt: a red cat, regions: ["a blue dog@0,0,0.5,1"]}}
""")
    r = cli("run", batch, "-o", "ran", "-q")
    assert r.exit_code == 0, r
    made = images("ran")
    assert len(made) == 3
    kinds = sorted(k for p in made for k in ("ip_adapter", "t2i_adapters", "regions") if sidecar(p).get(k))
    assert kinds == ["ip_adapter", "regions", "t2i_adapters"]


def test_help_groups_the_new_options(cli):
    r = cli("image", "--help")
    assert r.exit_code == 0
    for panel in ("IP-Adapter and T2I-Adapter", "SDXL refiner", "Regional prompts"):
        assert panel in r.output, panel
    for option in ("--ip-adapter", "--t2i-adapter", "--refiner", "--region"):
        assert option in r.output, option
