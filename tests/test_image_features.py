"""The A1111/ComfyUI everyday features of `studio image` (issue 22) and `studio upscale`, on tiny
random models of the real architectures, offline: hires fix, textual inversion, clip skip, FreeU,
seamless tiling, mask blur, X/Y plots, folder img2img with resume.

What a user would notice: image sizes, pixels that change when a feature is on and come back
exactly when it is off again (a cached pipeline is left as it was found), A1111 infotext entries
that A1111 writes, replay that makes the same pixels, and one-line errors (exit 2, nothing written).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("--steps", "2", "--width", "64", "--height", "64", "--cfg", "1", "--seed", "3", "-q")


# ----------------------------------------------------------------------------- helpers
def images(out: str | Path) -> list[Path]:
    return sorted(p for p in Path(out).glob("*.png") if "." not in p.stem)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def infotext(path: Path) -> str:
    return Image.open(path).text["parameters"]


def sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def gen(cli, model: Path, *args: str, out: str = "out", prompt: str = "a red cat") -> list[Path]:
    before = set(images(out))
    r = cli("image", prompt, "--model", model, *FAST, *args, "-o", out)
    assert r.exit_code == 0, r
    return sorted(set(images(out)) - before)


def refused(cli, *args: str, says: str, out: str = "bad") -> None:
    r = cli(*args, "-o", out)
    assert r.exit_code == 2, r
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], r
    assert "hint: " in r.stderr and "Traceback" not in r.output
    assert not images(out)


@pytest.fixture(scope="module")
def sd(tiny) -> Path:
    return tiny("sd")


@pytest.fixture(scope="module")
def baseline(sd, tmp_path_factory) -> np.ndarray:
    """The plain image every feature is compared with (and must come back to)."""
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path_factory.mktemp("baseline")
    r = CliRunner().invoke(app, ["image", "a red cat", "--model", str(sd), *FAST, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return pixels(images(out)[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[8:40, 8:30] = (220, 40, 40)
    arr[30:60, 36:60] = (40, 200, 90)
    Image.fromarray(arr).save(path)
    return path


# ----------------------------------------------------------------------------- hires fix
def test_hires_pixel_upscale_repaints_at_twice_the_size_and_replays(cli, sd):
    first = gen(cli, sd, "--hires", "2:0.5")
    assert len(first) == 1 and Image.open(first[0]).size == (128, 128)
    text = infotext(first[0])
    # A1111's own entries: Size stays the first pass's, the hires pass's strength is Denoising strength
    for entry in ("Size: 64x64", "Denoising strength: 0.5", "Hires upscale: 2", "Hires upscaler: Lanczos"):
        assert entry in text, text
    assert "Hires steps" not in text  # A1111 writes it only when set
    meta = sidecar(first[0])
    assert meta["hires"]["size"] == [128, 128] and meta["params"]["hires"] == "2:0.5"
    again = cli("replay", first[0], "-o", "replayed", "-q")
    assert again.exit_code == 0, again
    assert np.array_equal(pixels(images("replayed")[0]), pixels(first[0]))


def test_hires_latent_and_steps(cli, sd, baseline):
    out = gen(cli, sd, "--hires", "1.5:0.6:3", "--hires-upscaler", "Latent (nearest)")
    assert Image.open(out[0]).size == (96, 96)
    text = infotext(out[0])
    assert "Hires upscaler: Latent (nearest)" in text and "Hires steps: 3" in text and "Hires upscale: 1.5" in text
    # the second pass repaints: not the first pass merely resized
    resized = np.asarray(Image.fromarray(baseline.astype(np.uint8)).resize((96, 96), Image.Resampling.LANCZOS)).astype(np.int16)
    assert np.abs(pixels(out[0]) - resized).mean() > 1


def test_hires_infotext_reads_back_as_the_hires_flags():
    from studio.infotext import parse_a1111
    from studio.pipelines.image import params_from_infotext

    text = ("a castle\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
            "Denoising strength: 0.45, Clip skip: 2, Tiling: True, Hires upscale: 2, Hires steps: 12, "
            "Hires upscaler: Latent, TI hashes: \"easyneg: 0123456789ab\", freeu_enabled: True, freeu_b1: 1.3, "
            "freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2")
    params, notes = params_from_infotext(parse_a1111(text))
    assert params["hires"] == "2:0.45:12" and params["hires_upscaler"] == "latent"
    assert "strength" not in params  # the hires pass's strength, not an img2img one
    assert params["clip_skip"] == 2 and params["tile"] is True and params["freeu"] == "0.9,0.2,1.3,1.4"
    assert any("easyneg" in n and "--embedding" in n for n in notes)
    assert not any("ignored" in n for n in notes), notes


def test_from_an_a1111_png_takes_the_feature_entries(cli, sd):
    """--from a PNG as A1111 saves it: hires, clip skip and tiling carry over; Mask blur without
    --mask is a note, not an error."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red cat\nSteps: 2, Sampler: Euler, CFG scale: 1, Seed: 3, Size: 64x64, "
                                "Denoising strength: 0.5, Clip skip: 2, Tiling: True, Mask blur: 4, Hires upscale: 1.5")
    Image.new("RGB", (8, 8)).save("a1111.png", pnginfo=info)
    r = cli("image", "--from", "a1111.png", "--model", sd, "-o", "from")
    assert r.exit_code == 0, r
    assert "Mask blur 4 applies with --init" in r.stderr
    (made,) = images("from")
    assert Image.open(made).size == (96, 96)
    text = infotext(made)
    assert all(e in text for e in ("Hires upscale: 1.5", "Denoising strength: 0.5", "Clip skip: 2", "Tiling: True"))


def test_hires_with_an_upscaler_model(cli, sd, tiny):
    x4 = tiny("sd-upscale")
    out = gen(cli, sd, "--hires", "2:0.5", "--hires-upscaler", x4)
    assert Image.open(out[0]).size == (128, 128)
    assert f"Hires upscaler: {x4.name}" in infotext(out[0])
    assert sidecar(out[0])["hires"]["upscaler_model"]["source"] == str(x4)


@pytest.mark.parametrize("args, says", [
    (("--hires", "1"), "more than 1"),
    (("--hires", "2:1.5"), "strength"),
    (("--hires", "two"), "SCALE"),
    (("--hires", "2:0.05"), "no denoising step"),
    (("--hires-upscaler", "latent"), "--hires"),
    (("--clip-skip", "0"), "--clip-skip"),
    (("--clip-skip", "3"), "layers"),
    (("--freeu-params", "1,2"), "S1,S2,B1,B2"),
    (("--tile-axis", "z"), "--tile"),
    (("--mask-blur", "4"), "inpainting"),
    (("--embedding", "missing.safetensors"), "does not exist"),
    (("--xy", "steps=a,b"), "not a valid --steps"),
    (("--xy", "stepz=1,2"), "no such setting"),
    (("--xy", "steps=0,2"), "--steps 0"),
    (("--xy", "num=1,2"), "cannot be an axis"),
    (("--xy", "steps=1,2", "--num", "2"), "--num"),
    (("--xy", "steps=1", "--xy", "cfg=1", "--xy", "seed=1"), "at most two"),
    (("--xy", "clip-skip=1,3"), "cell clip-skip=3"),  # the model's own limit, before the first cell is made
    (("--resume",), "FOLDER"),
])
def test_bad_feature_flags_are_one_line_exit_2(cli, sd, args, says):
    refused(cli, "image", "a red cat", "--model", sd, *FAST, *args, says=says)


# ----------------------------------------------------------------------------- studio upscale
def test_upscale_x4_model_scale_and_replay(cli, tiny, photo):
    x4 = tiny("sd-upscale")
    r = cli("upscale", photo, "--model", x4, "--prompt", "a cat", "--steps", "2", "--seed", "1", "-o", "up", "-q")
    assert r.exit_code == 0, r
    (made,) = images("up")
    assert Image.open(made).size == (256, 256)
    meta = sidecar(made)
    assert meta["params"]["images"] == [str(photo.resolve())] and meta["params"]["scale"] == 4.0
    again = cli("replay", made, "-o", "up2", "-q")
    assert again.exit_code == 0, again
    assert np.array_equal(pixels(images("up2")[0]), pixels(made))
    r = cli("upscale", photo, "--model", x4, "--scale", "2", "--steps", "2", "--seed", "1", "-o", "up3", "-q")
    assert r.exit_code == 0, r
    assert Image.open(images("up3")[0]).size == (128, 128)


def test_upscale_without_weights_is_pil_exactly(cli, photo):
    r = cli("upscale", photo, "--model", "lanczos", "--scale", "1.5", "-o", "up", "-q")
    assert r.exit_code == 0, r
    expected = np.asarray(Image.open(photo).convert("RGB").resize((96, 96), Image.Resampling.LANCZOS)).astype(np.int16)
    assert np.array_equal(pixels(images("up")[0]), expected)


def test_latent_upscaler_doubles(cli, tiny, photo):
    r = cli("upscale", photo, "--model", tiny("sd-latent-upscale"), "--steps", "2", "--seed", "1", "-o", "up", "-q")
    assert r.exit_code == 0, r
    assert Image.open(images("up")[0]).size == (128, 128)


def test_esrgan_file_through_spandrel(cli, sd, tiny, photo, tmp_path):
    """An ESRGAN-style single file (what A1111/ComfyUI users keep in models/ESRGAN): spandrel
    reads the architecture and its 4x from the weights; a .pth copy is a pickle and refused."""
    import torch
    from safetensors.torch import load_file

    esrgan = tiny("esrgan") / "tiny-esrgan-4x.safetensors"
    r = cli("upscale", photo, "--model", esrgan, "-o", "up", "-q")
    assert r.exit_code == 0, r
    made = images("up")[0]
    assert Image.open(made).size == (256, 256) and sidecar(made)["upscaler"] == "ESRGAN"
    r = cli("upscale", photo, "--model", esrgan, "--scale", "2", "-o", "up2", "-q")
    assert r.exit_code == 0 and Image.open(images("up2")[0]).size == (128, 128)
    out = gen(cli, sd, "--hires", "2:0.5", "--hires-upscaler", esrgan, out="hires")[0]
    assert Image.open(out).size == (128, 128) and "Hires upscaler: tiny-esrgan-4x" in infotext(out)
    pth = tmp_path / "esrgan.pth"
    torch.save(load_file(str(esrgan)), pth)
    refused(cli, "upscale", photo, "--model", pth, says="pickle")


@pytest.mark.parametrize("args, says", [
    (("--model", "lanczos", "--scale", "100"), "--scale"),
    (("--model", "lanczos", "--scale", "0.5"), "--scale"),
    (("--model", "lanczos", "--steps", "0"), "--steps"),
])
def test_upscale_bad_input(cli, photo, args, says):
    refused(cli, "upscale", photo, *args, says=says)


def test_upscale_missing_image_and_non_upscaler_model(cli, sd, photo):
    refused(cli, "upscale", "nothere.png", "--model", "lanczos", says="does not exist")
    refused(cli, "upscale", photo, "--model", sd, says="not an upscaler")


# ----------------------------------------------------------------------------- textual inversion
@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> dict[str, Path]:
    """One made-up embedding in each layout people download: A1111 .safetensors (`emb_params`,
    two vectors), diffusers learned_embeds ({token: vector}) and A1111 .pt (`string_to_param`)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    a1111 = folder / "mystyle.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=g) * 2}, a1111)
    diffusers_dir = folder / "concept"
    diffusers_dir.mkdir()
    save_file({"<concept>": torch.randn(32, generator=g) * 2}, diffusers_dir / "learned_embeds.safetensors")
    pt = folder / "oldstyle.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 32, generator=g) * 2}, "name": "oldstyle"}, pt)
    return {"a1111": a1111, "diffusers": diffusers_dir, "pt": pt}


def test_embedding_changes_the_output_records_its_hash_and_unloads(cli, sd, embeddings, baseline):
    path = embeddings["a1111"]
    plain = gen(cli, sd, prompt="a photo of mystyle", out="plain")[0]
    used = gen(cli, sd, "--embedding", path, prompt="a photo of mystyle", out="used")[0]
    assert np.abs(pixels(used) - pixels(plain)).max() > 0
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f"TI hashes: \"mystyle: {short}\"" in infotext(used) or f"TI hashes: mystyle: {short}" in infotext(used)
    meta = sidecar(used)
    assert meta["embeddings"][0]["vectors"] == 2 and meta["params"]["embeddings"] == [f"{path}:mystyle"]
    again = cli("replay", used, "-o", "replayed", "-q")
    assert again.exit_code == 0 and np.array_equal(pixels(images("replayed")[0]), pixels(used))
    # the cached pipeline no longer knows the word: the same prompt without --embedding is the plain image
    assert np.array_equal(pixels(gen(cli, sd, prompt="a photo of mystyle", out="after")[0]), pixels(plain))
    assert np.array_equal(pixels(gen(cli, sd, out="after2")[0]), baseline)


def test_embedding_token_override_weighting_and_diffusers_layout(cli, sd, embeddings):
    named = gen(cli, sd, "--embedding", f"{embeddings['a1111']}:zzstyle", prompt="a photo of zzstyle", out="a")[0]
    weighted = gen(cli, sd, "--embedding", f"{embeddings['a1111']}:zzstyle", prompt="a photo of (zzstyle:1.3)", out="b")[0]
    assert np.abs(pixels(weighted) - pixels(named)).max() > 0
    concept = gen(cli, sd, "--embedding", f"{embeddings['diffusers']}:<concept>", prompt="a <concept> cat", out="c")[0]
    plain = gen(cli, sd, prompt="a <concept> cat", out="d")[0]
    assert np.abs(pixels(concept) - pixels(plain)).max() > 0


def test_pickle_embedding_needs_allow_pickle(cli, sd, embeddings):
    refused(cli, "image", "a photo of oldstyle", "--model", sd, *FAST, "--embedding", embeddings["pt"], says="pickle")
    out = gen(cli, sd, "--embedding", embeddings["pt"], "--allow-pickle", prompt="a photo of oldstyle")
    assert "TI hashes" in infotext(out[0])


def test_embedding_that_does_not_fit_the_model(cli, sd, tmp_path):
    import torch
    from safetensors.torch import save_file

    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, wide)
    refused(cli, "image", "wide", "--model", sd, *FAST, "--embedding", wide, says="does not fit")


def test_hostile_embedding_files(cli, sd, tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refused(cli, "image", "broken", "--model", sd, *FAST, "--embedding", garbage, says="not a readable")
    import torch
    from safetensors.torch import save_file

    many = tmp_path / "many.safetensors"
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, many)
    refused(cli, "image", "many", "--model", sd, *FAST, "--embedding", many, says="not one embedding")
    ok = tmp_path / "ok.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, ok)
    refused(cli, "image", "x", "--model", sd, *FAST, "--embedding", f"{ok}:two words", says="spaces")
    refused(cli, "image", "x", "--model", sd, *FAST, "--embedding", ok, "--embedding", f"{ok}:ok", says="share the token")


def test_sdxl_embedding_for_both_encoders_and_clip_skip(cli, tiny):
    """SDXL embeddings hold one tensor per text encoder (clip_l, clip_g), as A1111 and kohya save them."""
    import torch
    from safetensors.torch import save_file

    xl = tiny("sdxl")
    emb = Path("xlstyle.safetensors")
    save_file({"clip_l": torch.randn(2, 32) * 2, "clip_g": torch.randn(2, 32) * 2}, emb)
    plain = gen(cli, xl, prompt="a photo of xlstyle", out="a")[0]
    used = gen(cli, xl, "--embedding", emb, prompt="a photo of xlstyle", out="b")[0]
    assert np.abs(pixels(used) - pixels(plain)).max() > 0 and "TI hashes" in infotext(used)
    assert np.array_equal(pixels(gen(cli, xl, prompt="a photo of xlstyle", out="c")[0]), pixels(plain))
    skipped = gen(cli, xl, "--clip-skip", "2", prompt="a photo of xlstyle", out="d")[0]
    assert np.abs(pixels(skipped) - pixels(plain)).max() > 0 and "Clip skip: 2" in infotext(skipped)
    refused(cli, "image", "x", "--model", tiny("sd"), *FAST, "--embedding", emb, says="SDXL embedding")


# ----------------------------------------------------------------------------- clip skip
def test_clip_skip_is_diffusers_formula_and_recorded(cli, sd, baseline):
    """Clip skip 2 = the final layer norm over the penultimate layer's hidden states (what
    diffusers' clip_skip=1 computes): checked against a plain diffusers call with those embeddings."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = gen(cli, sd, "--clip-skip", "2")[0]
    assert "Clip skip: 2" in infotext(out)
    assert np.abs(pixels(out) - baseline).max() > 0
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = pipe.text_encoder.final_layer_norm(hidden)
    image = pipe(prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(pixels(out), np.asarray(image.convert("RGB")).astype(np.int16))
    # clip skip 1 is the last layer: the plain image
    assert np.array_equal(pixels(gen(cli, sd, "--clip-skip", "1", out="one")[0]), baseline)


def test_clip_skip_with_a_weighted_prompt(cli, sd):
    plain = gen(cli, sd, prompt="a (red:1.2) cat", out="a")[0]
    skipped = gen(cli, sd, "--clip-skip", "2", prompt="a (red:1.2) cat", out="b")[0]
    assert np.abs(pixels(plain) - pixels(skipped)).max() > 0


# ----------------------------------------------------------------------------- FreeU, tiling
def test_freeu_changes_the_image_is_recorded_and_switches_off(cli, sd, baseline):
    out = gen(cli, sd, "--freeu")[0]
    assert np.abs(pixels(out) - baseline).max() > 0
    text = infotext(out)
    assert "freeu_enabled: True" in text and "freeu_b1: 1.5" in text and "freeu_s2: 0.2" in text  # SD 1.5's values
    custom = gen(cli, sd, "--freeu-params", "0.5,0.5,1.1,1.1", out="custom")[0]
    assert "freeu_b1: 1.1" in infotext(custom) and np.abs(pixels(custom) - pixels(out)).max() > 0
    assert np.array_equal(pixels(gen(cli, sd, out="after")[0]), baseline)


def test_tile_through_the_cli_is_recorded_and_switches_off(cli, sd, baseline):
    tiled = gen(cli, sd, "--tile")[0]
    assert "Tiling: True" in infotext(tiled) and np.abs(pixels(tiled) - baseline).max() > 0
    assert "Tiling: x" in infotext(gen(cli, sd, "--tile-axis", "x", out="x")[0])
    assert np.array_equal(pixels(gen(cli, sd, out="after")[0]), baseline)


def test_tiled_images_continue_across_their_edges(sd):
    """Seamless means the image has no edge: with circular padding the UNet and VAE treat the
    canvas as a torus, so starting from noise shifted by 2 latent pixels gives exactly the same
    image shifted by 16 pixels (what makes a tile repeat without a seam). Without --tile the
    border padding breaks that; with one axis only that axis wraps. (Comparing raw edge columns
    says little on a tiny random model: its output is noise-like everywhere.)"""
    import torch
    from diffusers import StableDiffusionPipeline

    from studio.pipelines.image_features import seamless

    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(start, axes):
        with seamless(pipe, axes):
            out = pipe("a red cat", num_inference_steps=3, guidance_scale=1.0, width=64, height=64, latents=start.clone())
        return np.asarray(out.images[0]).astype(np.int16)

    def shift_error(axes, dim):
        a, b = run(latents, axes), run(torch.roll(latents, 2, dims=dim), axes)
        return int(np.abs(np.roll(a, 16, axis=dim - 2) - b).max())

    assert shift_error("xy", 3) <= 1 and shift_error("xy", 2) <= 1
    assert shift_error("", 3) > 20 and shift_error("", 2) > 20
    assert shift_error("x", 3) <= 1 and shift_error("x", 2) > 20
    # the pipeline is left as it was: plain padding again
    assert all(m.padding_mode == "zeros" and "forward" not in m.__dict__
               for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))


# ----------------------------------------------------------------------------- mask blur
def test_mask_blur_softens_the_inpaint_edge(cli, sd, photo, tmp_path):
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(mask)
    args = ("--init", photo, "--mask", mask)
    sharp = gen(cli, sd, *args, out="sharp")[0]
    soft = gen(cli, sd, *args, "--mask-blur", "8", out="soft")[0]
    assert "Mask blur: 8" in infotext(soft) and "Mask blur" not in infotext(sharp)
    assert np.abs(pixels(soft) - pixels(sharp)).max() > 0


def test_blur_mask_is_diffusers_blur():
    from diffusers.image_processor import VaeImageProcessor

    from studio.pipelines.image_features import blur_mask

    m = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12))
    assert blur_mask(m, None) is m
    blurred = np.asarray(blur_mask(m, 4))
    assert np.array_equal(blurred, np.asarray(VaeImageProcessor.blur(m, 4)))
    assert 0 < blurred[12, 8] < 255  # a hard edge became a ramp


# ----------------------------------------------------------------------------- X/Y plot
def test_xy_plot_cells_with_their_own_settings_and_a_labelled_sheet(cli, sd):
    r = cli("image", "a red cat", "--model", sd, *FAST, "--xy", "steps=1,2", "--xy", "cfg=1,3", "-o", "plot", "--json")
    assert r.exit_code == 0, r
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 5
    cells, sheet = [Path(row["path"]) for row in rows[:4]], Path(rows[4]["path"])
    settings = [(sidecar(c)["params"]["steps"], sidecar(c)["params"]["guidance"]) for c in cells]
    assert settings == [(1, 1.0), (2, 1.0), (1, 3.0), (2, 3.0)]  # X inner, Y outer, as A1111 fills
    assert all(sidecar(c)["params"]["xy"] == () or sidecar(c)["params"]["xy"] == [] for c in cells)
    # one cell replays alone with its own settings
    again = cli("replay", cells[2], "-o", "cell", "-q")
    assert again.exit_code == 0 and len(images("cell")) == 1
    assert np.array_equal(pixels(images("cell")[0]), pixels(cells[2]))
    # the sheet: 2x2 images below the X labels and right of the Y labels, text drawn in the margins
    grid = pixels(sheet)
    h, w = grid.shape[:2]
    assert w > 128 and h > 128
    left, top = w - 128, h - 128
    assert np.array_equal(grid[top:top + 64, left:left + 64], pixels(cells[0]))
    assert np.array_equal(grid[top + 64:, left + 64:], pixels(cells[3]))
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any()  # dark label text
    meta = sidecar(sheet)
    assert [a["values"] for a in meta["xy_grid"]["axes"]] == [["1", "2"], ["1", "3"]]
    assert [c["file"] for c in meta["xy_grid"]["cells"]] == [c.name for c in cells]


def test_xy_ranges_prompt_sr_and_a_feature_axis(cli, sd):
    from studio.pipelines.image import ImageRequest
    from studio.pipelines.xy import cells, parse_axes

    request = ImageRequest(prompt="a red cat", xy=("steps=2-6 (+2)", "prompt_sr=red,blue"))
    axes = parse_axes(request.xy, request)
    assert axes[0].values == (2, 4, 6) and [c.prompt for _, _, c in cells(request, axes)][-1] == "a blue cat"
    assert parse_axes(("cfg=1-2 [3]",), request)[0].values == (1.0, 1.5, 2.0)
    r = cli("image", "a red cat", "--model", sd, *FAST, "--xy", "clip-skip=1,2", "-o", "plot", "--json")
    assert r.exit_code == 0, r
    made = [Path(json.loads(line)["path"]) for line in r.stdout.splitlines()]
    assert len(made) == 3 and "Clip skip: 2" in infotext(made[1]) and "Clip skip" not in infotext(made[0])
    assert "Sampler: Euler" in infotext(made[2])  # the sheet carries the plot's recipe, as A1111's grid does


# ----------------------------------------------------------------------------- folders
def _folder(path: Path, names: list[str], colour: tuple[int, int, int] = (200, 60, 60)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[8 * i:8 * i + 24, 10:50] = colour
        Image.fromarray(arr).save(path / name)
    return path


def test_init_folder_one_output_per_input_and_resume(cli, sd, tmp_path):
    inputs = _folder(tmp_path / "in", ["a.png", "b.png"])
    (inputs / "notes.txt").write_text("not an image")
    base = ("image", "a red cat", "--model", sd, "--steps", "2", "--cfg", "1", "--strength", "0.5", "-o", "batch", "-q")
    r = cli(*base, "--init", inputs)
    assert r.exit_code == 0, r
    made = images("batch")
    assert sorted(Path(sidecar(p)["params"]["init_image"]).name for p in made) == ["a.png", "b.png"]
    assert len({sidecar(p)["params"]["seed"] for p in made}) == 1  # one seed for the folder
    # a third input arrives: --resume makes only it, with the folder's seed
    _folder(inputs, ["a.png", "b.png", "c.png"])
    r = cli(*base, "--init", inputs, "--resume")
    assert r.exit_code == 0, r
    now = images("batch")
    assert len(now) == 3
    new = sidecar(sorted(set(now) - set(made))[0])["params"]
    assert Path(new["init_image"]).name == "c.png" and new["seed"] == sidecar(made[0])["params"]["seed"]
    r = cli(*base[:-1], "--init", inputs, "--resume")  # everything done: nothing new, and it says so
    assert r.exit_code == 0 and len(images("batch")) == 3 and "skipped 3 of 3" in r.stderr


def test_init_and_mask_folders_match_by_name(cli, sd, tmp_path):
    inputs = _folder(tmp_path / "in", ["one.png", "two.jpg"])
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("one.png", "two.png"):
        Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(masks / name)
    r = cli("image", "a red cat", "--model", sd, "--steps", "2", "--cfg", "1", "--init", inputs, "--mask", masks,
            "--mask-blur", "2", "-o", "inpainted", "-q")
    assert r.exit_code == 0, r
    made = images("inpainted")
    pairs = sorted((Path(sidecar(p)["params"]["init_image"]).stem, Path(sidecar(p)["params"]["mask_image"]).stem) for p in made)
    assert pairs == [("one", "one"), ("two", "two")]
    (masks / "two.png").unlink()
    refused(cli, "image", "a red cat", "--model", sd, *FAST, "--init", inputs, "--mask", masks, says="no mask for two.jpg")


def test_batch_file_jobs_take_the_new_fields(cli, sd, tmp_path):
    batch = tmp_path / "jobs.yaml"
    batch.write_text(f"""
defaults: {{model: "{sd}", steps: 2, guidance: 1, width: 64, height: 64, seed: 3}}
jobs:
  - {{task: image, prompt: a red cat, hires: "2:0.5", clip_skip: 2, tile: true}}
  - {{task: image, prompt: a red cat, xy: ["steps=1,2"]}}
""")
    r = cli("run", batch, "-o", "ran", "-q")
    assert r.exit_code == 0, r
    made = images("ran")
    assert len(made) == 4  # one hires image, two cells and their sheet
    big = [p for p in made if Image.open(p).size == (128, 128)]
    assert len(big) == 1 and all(e in infotext(big[0]) for e in ("Hires upscale: 2", "Clip skip: 2", "Tiling: True"))


def test_the_gallery_command_line_remakes_the_image(cli, sd, embeddings):
    """`studio serve`'s gallery shows each output's command: with the new flags it runs as typed."""
    import shlex

    from studio.server.gallery import command_line

    made = gen(cli, sd, "--embedding", embeddings["a1111"], "--freeu-params", "0.9,0.2,1.2,1.3", "--tile-axis", "x",
               "--clip-skip", "2", "--hires", "1.5:0.5", prompt="a photo of mystyle")[0]
    meta = sidecar(made)
    line = command_line("image", meta["params"], str(sd))
    for flag in ("--embedding", "--freeu-params 0.9,0.2,1.2,1.3", "--tile-axis x", "--clip-skip 2", "--hires 1.5:0.5"):
        assert flag in line, line
    r = cli(*shlex.split(line)[1:], "-o", "again", "-q")
    assert r.exit_code == 0, r
    assert np.array_equal(pixels(images("again")[0]), pixels(made))
    assert command_line("upscale", {"images": ["/a.png", "/b.png"], "model": "lanczos", "scale": 2.0}).startswith(
        "studio upscale /a.png /b.png --model lanczos --scale 2.0")


def test_help_groups_the_options(cli):
    r = cli("image", "--help")
    assert r.exit_code == 0
    for panel in ("Hires fix", "FreeU and tiling", "X/Y plot", "Adapters and prompt", "Init image, inpaint and outpaint"):
        assert panel in r.output, panel
