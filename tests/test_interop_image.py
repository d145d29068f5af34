"""Images as the ecosystem's own tools read them (issue 18): the A1111 `parameters` chunk read by
sd-parsers (a reader nobody on the project wrote) for every scheduler and every mode; A1111, Forge
and ComfyUI PNGs read back by `studio image --from` and `studio replay`; replay of one output of a
--num run and of a PNG whose sidecar is gone; LoRAs exported to kohya's layout and back, loaded
with diffusers' `load_lora_weights`, making the same pixels.

Fixture PNGs from other tools are written the way those tools write them: A1111
(modules/images.py) `PngInfo.add_text("parameters", infotext)`, ComfyUI (nodes.py SaveImage)
`add_text("prompt", json.dumps(api_graph))` and `add_text("workflow", ...)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ("--steps", "2")


# ----------------------------------------------------------------------------- helpers
def images(out: str | Path) -> list[Path]:
    return sorted(p for p in Path(out).glob("*.png") if "." not in p.stem)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def gen(cli, *args, out: str = "out") -> Path:
    before = set(images(out))
    r = cli("image", *args, "-o", out, "-q")
    assert r.exit_code == 0, r
    made = sorted(set(images(out)) - before)
    assert len(made) == 1, made
    return made[0]


def infotext(path: Path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


def read_with_sd_parsers(path: Path):
    """(sampler, prompt, negative) as sd-parsers' AUTOMATIC1111 parser reads the PNG."""
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators

    info = ParserManager().parse(path)
    assert info is not None and info.generator == Generators.AUTOMATIC1111, infotext(path)
    sampler = info.samplers[0]
    prompt = " ".join(p.value for p in sampler.prompts)
    negative = " ".join(p.value for p in sampler.negative_prompts)
    return sampler, prompt, negative


def a1111_png(path: Path, text: str, size=(64, 64)) -> Path:
    """A PNG as A1111 saves one (images.save_image_with_geninfo: add_text("parameters", ...))."""
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", size, (90, 120, 200)).save(path, pnginfo=info)
    return path


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash, computed here from the file as hashes.addnet_hash_safetensors does."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[10:40, 10:30] = (220, 40, 40)
    arr[5:25, 40:60] = (40, 200, 90)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="module")
def mask(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "mask.png"
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(path)
    return path


# ----------------------------------------------------------------------------- infotext, every scheduler
def test_every_scheduler_writes_a1111_labels_that_sd_parsers_reads(tiny, tmp_path):
    """Each studio scheduler, made from the tiny SD's config, goes through the real writer; what
    sd-parsers reads back is A1111's own label (modules/sd_samplers_kdiffusion.py), and reading
    the label back into studio gives the same scheduler."""
    from diffusers import EulerDiscreteScheduler

    from studio.device import module_available
    from studio.outputs import OutputWriter, Result
    from studio.pipelines.image import SCHEDULERS, a1111_sampler, make_scheduler, resolve_scheduler, scheduler_family

    base = EulerDiscreteScheduler.from_pretrained(tiny("sd"), subfolder="scheduler")  # the tiny SD's own
    writer = OutputWriter(tmp_path, task="image", template="{seed}")
    expected = {"euler": ("Euler", "Automatic"), "euler_karras": ("Euler", "Karras"), "euler_a": ("Euler a", "Automatic"),
                "heun": ("Heun", "Automatic"), "dpm2": ("DPM2", "Uniform"), "dpm2_karras": ("DPM2", "Karras"),
                "dpm2_a": ("DPM2 a", "Uniform"), "dpm++_2m": ("DPM++ 2M", "Uniform"),
                "dpm++_2m_karras": ("DPM++ 2M", "Karras"), "dpm++_2m_sde": ("DPM++ 2M SDE", "Uniform"),
                "dpm++_2m_sde_karras": ("DPM++ 2M SDE", "Karras"), "dpm++_2m_sde_exponential": ("DPM++ 2M SDE", "Exponential"),
                "dpm++_2s": ("DPM++ SDE", "Uniform"), "dpm++_2s_karras": ("DPM++ SDE", "Karras"),
                "ddim": ("DDIM", "Automatic"), "pndm": ("PLMS", "Automatic"), "unipc": ("UniPC", "Automatic"),
                "lcm": ("LCM", "Automatic"), "lms": ("LMS", "Automatic")}
    checked = 0
    for seed, name in enumerate(SCHEDULERS):
        cls = SCHEDULERS[name][0]
        if scheduler_family(cls) == "flow" or (cls == "LMSDiscreteScheduler" and not module_available("scipy")):
            continue
        labels = a1111_sampler(make_scheduler(name, base))
        if name in expected:
            assert (labels["sampler"], labels["schedule"]) == expected[name], name
        params = {"prompt": f"a lighthouse, {name}", "negative_prompt": "blurry, low", "steps": 20, "guidance": 6.5,
                  "seed": seed, "width": 64, "height": 64, "scheduler": name}
        image = Image.new("RGB", (64, 64))
        path = writer.write(Result(kind="image", value=image, params=params, extra={"sampler": labels}))
        sampler, prompt, negative = read_with_sd_parsers(path)
        assert sampler.name == labels["sampler"]
        assert sampler.parameters["scheduler"] == labels["schedule"]
        assert (prompt, negative) == (f"a lighthouse, {name}", "blurry, low")
        assert sampler.parameters["seed"] == str(seed) and sampler.parameters["steps"] == "20"
        assert sampler.parameters["cfg_scale"] == "6.5"
        label = labels["sampler"] + ("" if labels["schedule"] == "Automatic" else " " + labels["schedule"])
        assert resolve_scheduler(label, "diffusion")[0] == name, (name, label)
        checked += 1
    assert checked >= 22  # 26 minus the two flow samplers and, without scipy, the two LMS ones


# ----------------------------------------------------------------------------- infotext, every mode
def test_txt2img_infotext_is_a1111s_line_and_sd_parsers_reads_it(cli, tiny):
    checkpoint = tiny("sd") / "tiny-sd.safetensors"
    path = gen(cli, "a red cat, (snow:1.2)", "--negative", "blurry, low", "--model", checkpoint, *STEPS,
               "--guidance", "6.5", "--seed", "7", "--scheduler", "dpm++_2m_karras")
    lines = infotext(path).split("\n")
    short = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]  # A1111's "Model hash"
    assert lines == ["a red cat, (snow:1.2)", "Negative prompt: blurry, low",
                     f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 7, Size: 64x64, "
                     f"Model hash: {short}, Model: tiny-sd"]
    sampler, prompt, negative = read_with_sd_parsers(path)
    assert (sampler.name, prompt, negative) == ("DPM++ 2M", "a red cat, (snow:1.2)", "blurry, low")
    assert sampler.model.hash == short and sampler.model.name == "tiny-sd"


def test_the_models_default_scheduler_is_named_too(cli, tiny):
    """No --scheduler: the tiny SD's own EulerDiscreteScheduler is A1111's "Euler" (sd-parsers
    returned nothing for these before: no Sampler field)."""
    path = gen(cli, "a lighthouse", "--model", tiny("sd"), *STEPS, "--seed", "1")
    sampler, prompt, _ = read_with_sd_parsers(path)
    assert sampler.name == "Euler" and prompt == "a lighthouse"
    assert json.loads(path.with_suffix(".json").read_text())["params"]["scheduler"] is None


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet", "lora"])
def test_every_mode_reads_back_with_sd_parsers(cli, tiny, photo, mask, mode):
    from studio.infotext import parse_a1111

    sd, cn, lora = tiny("sd"), tiny("controlnet"), tiny("lora")
    extra = {"img2img": ["--init", photo, "--strength", "0.6"],
             "inpaint": ["--init", photo, "--mask", mask, "--strength", "0.9"],
             "controlnet": ["--control", f"canny:{photo}:0.8", "--control-model", cn],
             "lora": ["--lora", f"{lora}:0.7"]}[mode]
    path = gen(cli, "a red door", "-n", "fog", "--model", sd, *STEPS, "--seed", "11", "--scheduler", "euler_a",
               "--guidance", "5", *extra)
    sampler, prompt, negative = read_with_sd_parsers(path)
    assert sampler.name == "Euler a" and negative == "fog"
    assert sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "2"
    assert sampler.parameters["cfg_scale"] == "5.0"
    fields = parse_a1111(infotext(path))["fields"]  # A1111's own parsing rules
    if mode in ("img2img", "inpaint"):
        assert fields["Denoising strength"] == {"img2img": "0.6", "inpaint": "0.9"}[mode]
    if mode == "controlnet":
        # sd-webui-controlnet's unit, quoted as A1111 quotes a value holding commas and colons
        assert '"Module: canny, Model: model, Weight: 0.8, Guidance Start: 0.0, Guidance End: 1.0"' in infotext(path)
        assert fields["ControlNet 0"] == "Module: canny, Model: model, Weight: 0.8, Guidance Start: 0.0, Guidance End: 1.0"
    if mode == "lora":
        # A1111's Lora extension: the tag in the prompt, the addnet hash in `Lora hashes`
        assert prompt == f"a red door <lora:{lora.name}:0.7>"  # a LoRA folder is named by the folder
        assert fields["Lora hashes"] == f"{lora.name}: {addnet_hash(lora / 'pytorch_lora_weights.safetensors')}"
    else:
        assert prompt == "a red door"


def test_two_controlnets_write_numbered_maps_and_units(cli, tiny, photo):
    """README: one ControlNet writes NAME.control.png, several NAME.control-0.png, -1.png, in
    --control order; the infotext has ControlNet 0 and ControlNet 1."""
    from studio.infotext import parse_a1111

    sd, cn = tiny("sd"), tiny("controlnet")
    one = gen(cli, "a house", "--model", sd, *STEPS, "--seed", "2", "--control", f"canny:{photo}", "--control-model", cn)
    assert one.with_name(one.stem + ".control.png").is_file()
    two = gen(cli, "a house", "--model", sd, *STEPS, "--seed", "2", "--control", f"canny:{photo}:0.8",
              "--control", f"none:{photo}:0.5:0:0.5", "--control-model", cn, "--control-model", cn)
    assert two.with_name(two.stem + ".control-0.png").is_file() and two.with_name(two.stem + ".control-1.png").is_file()
    assert not two.with_name(two.stem + ".control.png").exists()
    fields = parse_a1111(infotext(two))["fields"]
    assert fields["ControlNet 0"].startswith("Module: canny,") and "Weight: 0.8" in fields["ControlNet 0"]
    assert fields["ControlNet 1"].startswith("Module: none,") and "Guidance End: 0.5" in fields["ControlNet 1"]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "NAME.control-0.png" in readme and "NAME.control.png" in readme


# ----------------------------------------------------------------------------- --scheduler, --list-schedulers
def test_list_schedulers_shows_a1111_labels(cli):
    r = cli("image", "--list-schedulers")
    assert r.exit_code == 0, r
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "DPM++ 2M" in rows["dpm++_2m_karras"] and "Karras" in rows["dpm++_2m_karras"]
    assert "Euler a" in rows["euler_a"] and "PLMS" in rows["pndm"]


def test_scheduler_accepts_a1111_labels_in_any_case(cli, tiny):
    sd = tiny("sd")
    ours = gen(cli, "a cat", "--model", sd, *STEPS, "--seed", "5", "--scheduler", "dpm++_2m_karras", out="a")
    for label in ("DPM++ 2M Karras", "dpm++ 2m karras", "DPM++ 2M"):  # plain "DPM++ 2M" is Karras, as in A1111
        theirs = gen(cli, "a cat", "--model", sd, *STEPS, "--seed", "5", "--scheduler", label, out="b")
        assert np.array_equal(pixels(ours), pixels(theirs)), label
        assert json.loads(theirs.with_suffix(".json").read_text())["params"]["scheduler"] == "dpm++_2m_karras"
    r = cli("image", "a cat", "--model", sd, *STEPS, "--scheduler", "DPM fast", "-o", "c")
    assert r.exit_code == 2 and "unknown scheduler 'DPM fast'" in r.stderr and "--list-schedulers" in r.stderr
    assert "Traceback" not in r.stderr and not images("c")


def test_a1111_labels_resolve_as_a1111_means_them():
    from studio.pipelines.image import resolve_scheduler

    assert resolve_scheduler("Euler a")[0] == "euler_a"
    assert resolve_scheduler("DPM++ 2M SDE")[0] == "dpm++_2m_sde_exponential"  # A1111's default schedule for it
    assert resolve_scheduler("DPM++ 2M Uniform")[0] == "dpm++_2m"
    assert resolve_scheduler("DPM2 a Karras")[0] == "dpm2_a_karras"
    assert resolve_scheduler("Euler", "flow")[0] == "flow_euler"  # Forge's Flux label
    name, notes = resolve_scheduler("DPM++ 2M Exponential")
    assert name == "dpm++_2m" and "not in studio's table" in notes[0]
    assert resolve_scheduler("Restart")[0] is None


# ----------------------------------------------------------------------------- reading infotext
A1111_TEXT = ("a lighthouse at dusk, oil painting <lora:myStyle:0.7>\nwith two lines\n"
              "Negative prompt: blurry, (low quality:1.2)\n"
              "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, "
              "Model hash: 529c72f6c3, Model: mfcgPDXL_v10, Denoising strength: 0.33, Clip skip: 2, "
              'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and Resize, '
              'Guidance Start: 0.0, Guidance End: 1.0", Lora hashes: "myStyle: dba941975e80", Version: v1.10.1')


def test_parse_a1111_follows_a1111s_rules():
    from studio.infotext import parse_a1111

    got = parse_a1111(A1111_TEXT)
    assert got["prompt"] == "a lighthouse at dusk, oil painting <lora:myStyle:0.7>\nwith two lines"
    assert got["negative_prompt"] == "blurry, (low quality:1.2)"
    assert got["fields"]["Size"] == "64x48" and got["fields"]["Lora hashes"] == "myStyle: dba941975e80"
    assert got["fields"]["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b]")
    # a prompt alone (no settings line) is all prompt; the old combined label splits
    assert parse_a1111("just a prompt, with: a colon")["prompt"] == "just a prompt, with: a colon"
    from studio.pipelines.image import params_from_infotext, resolve_scheduler

    params, notes = params_from_infotext(parse_a1111("a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 9, Size: 512x768"))
    assert params == {"prompt": "a cat", "negative_prompt": "", "steps": 30, "guidance": 7.0, "seed": 9,
                      "width": 512, "height": 768, "scheduler": "DPM++ 2M Karras"} and notes == []
    # Forge on Flux: no true CFG, the distilled guidance is diffusers' guidance_scale; Euler there is flow_euler
    forge = ("a fox\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1, "
             "Size: 896x1152, Model hash: 4a9d59e8bf, Model: flux1-dev-bnb-nf4-v2, Version: f2.0.1v1.10.1-previous-313")
    params, notes = params_from_infotext(parse_a1111(forge))
    assert params["guidance"] == 3.5 and params["scheduler"] == "Euler Simple"
    assert resolve_scheduler(params["scheduler"], "flow")[0] == "flow_euler"
    assert any("Distilled CFG Scale 3.5" in n for n in notes) and any(n.endswith(": Version") for n in notes)


def test_from_an_a1111_png_takes_its_recipe_and_notes_what_does_not_carry(cli, tiny, tmp_path):
    sd = tiny("sd")
    png = a1111_png(tmp_path / "00012-1234.png", A1111_TEXT, size=(64, 48))
    r = cli("image", "--from", png, "--model", sd, "-o", "from")
    assert r.exit_code == 0, r
    made = images("from")
    assert len(made) == 1
    params = json.loads(made[0].with_suffix(".json").read_text())["params"]
    assert params["prompt"] == "a lighthouse at dusk, oil painting\nwith two lines"
    assert params["negative_prompt"] == "blurry, (low quality:1.2)"
    assert (params["steps"], params["guidance"], params["seed"]) == (2, 6.5, 1234)
    assert (params["width"], params["height"], params["scheduler"]) == (64, 48, "dpm++_2m_karras")
    assert params["init_image"] is None and params["strength"] is None  # txt2img: no --init given
    notes = " ".join(r.stderr.split())
    assert "LoRA myStyle at 0.7" in notes and "--lora" in notes
    assert "ControlNet 0 (canny, control_v11p_sd15_canny [d14c016b], weight 0.8)" in notes
    assert "ignored (no studio setting): Version" in notes
    assert params["clip_skip"] == 2  # A1111's Clip skip is a studio setting too (--clip-skip)
    assert "denoising strength 0.33 is for img2img" in notes
    # the same recipe typed by hand makes the same pixels
    direct = gen(cli, "a lighthouse at dusk, oil painting\nwith two lines", "-n", "blurry, (low quality:1.2)", "--model", sd,
                 "--steps", "2", "--guidance", "6.5", "--seed", "1234", "--width", "64", "--height", "48",
                 "--scheduler", "DPM++ 2M Karras", "--clip-skip", "2", out="direct")
    assert np.array_equal(pixels(made[0]), pixels(direct))
    # flags override the PNG
    other = gen(cli, "--from", png, "--model", sd, "--seed", "5", "--steps", "1", out="override")
    p2 = json.loads(other.with_suffix(".json").read_text())["params"]
    assert (p2["seed"], p2["steps"], p2["guidance"]) == (5, 1, 6.5)


def test_from_an_a1111_png_with_init_uses_its_denoising_strength(cli, tiny, tmp_path, photo):
    png = a1111_png(tmp_path / "i2i.png", "a red door\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                    "Seed: 3, Size: 64x64, Denoising strength: 0.5")
    path = gen(cli, "--from", png, "--model", tiny("sd"), "--init", photo)
    params = json.loads(path.with_suffix(".json").read_text())["params"]
    assert params["strength"] == 0.5 and params["scheduler"] == "euler_a" and params["init_image"] == str(photo)


COMFY_GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 2, "cfg": 5.5, "sampler_name": "dpmpp_2m",
                                                "scheduler": "karras", "denoise": 1.0, "model": ["4", 0],
                                                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle on a hill", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def comfy_png(path: Path, graph: dict) -> Path:
    info = PngInfo()  # ComfyUI's SaveImage: the API graph as `prompt`, the UI graph as `workflow`
    info.add_text("prompt", json.dumps(graph))
    info.add_text("workflow", json.dumps({"nodes": [], "links": [], "version": 0.4}))
    Image.new("RGB", (64, 48)).save(path, pnginfo=info)
    return path


def test_from_a_comfyui_png(cli, tiny, tmp_path):
    path = gen(cli, "--from", comfy_png(tmp_path / "ComfyUI_00001_.png", COMFY_GRAPH), "--model", tiny("sd"))
    params = json.loads(path.with_suffix(".json").read_text())["params"]
    assert (params["prompt"], params["negative_prompt"]) == ("a castle on a hill", "text, watermark")
    assert (params["seed"], params["steps"], params["guidance"]) == (42, 2, 5.5)
    assert (params["width"], params["height"], params["scheduler"]) == (64, 48, "dpm++_2m_karras")


def test_a_comfyui_graph_too_complex_is_a_clear_error(cli, tmp_path):
    graph = json.loads(json.dumps(COMFY_GRAPH))
    graph["10"] = dict(graph["3"])  # a second KSampler (a hires pass)
    r = cli("image", "--from", comfy_png(tmp_path / "two.png", graph), "-o", "x")
    assert r.exit_code == 2 and "2 KSampler nodes" in r.stderr and "hint:" in r.stderr
    graph = json.loads(json.dumps(COMFY_GRAPH))
    graph["6"] = {"class_type": "ConditioningCombine", "inputs": {}}
    r = cli("image", "--from", comfy_png(tmp_path / "combine.png", graph), "-o", "x")
    assert r.exit_code == 2 and "ConditioningCombine" in r.stderr
    assert "Traceback" not in r.stderr and not Path("x").exists()


@pytest.mark.parametrize("kind", ["missing", "jpeg", "not-an-image", "no-chunks", "folder"])
def test_from_hostile_inputs_are_one_line_errors(cli, tmp_path, kind):
    path = tmp_path / "in.png"
    if kind == "jpeg":
        path = tmp_path / "photo.jpg"
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    elif kind == "not-an-image":
        path.write_text("Steps: 20, Sampler: Euler, CFG scale: 7")
    elif kind == "no-chunks":
        Image.new("RGB", (8, 8)).save(path)
    elif kind == "folder":
        path = tmp_path
    r = cli("image", "--from", path, "-o", "x")
    assert r.exit_code == 2, r
    assert r.stderr.startswith("error:") and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert not Path("x").exists()


def test_from_a_studio_png_is_its_whole_request(cli, tiny):
    r = cli("image", "a red cat", "-n", "dog", "--model", tiny("sd"), *STEPS, "--seed", "8", "--scheduler", "ddim",
            "--num", "2", "-o", "first", "-q")
    assert r.exit_code == 0, r
    first = images("first")[1]  # the second of the run, seed 9
    again = gen(cli, "--from", first, out="again")
    assert np.array_equal(pixels(first), pixels(again))
    p1, p2 = (json.loads(p.with_suffix(".json").read_text())["params"] for p in (first, again))
    assert p1 == p2
    assert p2["seed"] == 9 and p2["num_outputs"] == 1
    shifted = gen(cli, "--from", first, "--seed", "30", out="again")
    assert json.loads(shifted.with_suffix(".json").read_text())["params"]["seed"] == 30


# ----------------------------------------------------------------------------- replay
def test_replay_one_output_of_a_num_run_makes_only_that_one(cli, tiny):
    r = cli("image", "a red cat", "--model", tiny("sd"), *STEPS, "--seed", "20", "--num", "2", "-o", "run", "-q")
    assert r.exit_code == 0, r
    first, second = images("run")
    r = cli("replay", second, "-q")
    assert r.exit_code == 0, r
    new = [p for p in images("run") if p not in (first, second)]
    assert len(new) == 1 and np.array_equal(pixels(new[0]), pixels(second))
    assert json.loads(new[0].with_suffix(".json").read_text())["params"]["seed"] == 21


def test_replay_of_a_music_num_run_makes_one_piece(cli, tiny):
    """The replay rule is the same for every task that records num_outputs per output (music,
    audio, video record the run's N with each output's own seed)."""
    r = cli("music", "midi", "--model", tiny("midi-lm"), "--bars", "1", "--num", "2", "--seed", "3", "-o", "m", "-q")
    assert r.exit_code == 0, r
    mids = sorted(Path("m").glob("*.mid"))
    assert len(mids) == 2
    meta = json.loads(mids[1].with_suffix(".json").read_text())
    assert meta["params"]["num_outputs"] == 2  # what makes replay ask for both without the fix
    r = cli("replay", mids[1], "-q")
    assert r.exit_code == 0, r
    assert len(sorted(Path("m").glob("*.mid"))) == 3


def test_replay_from_the_pngs_own_chunks_when_the_sidecar_is_gone(cli, tiny):
    first = gen(cli, "a blue bird", "--model", tiny("sd"), *STEPS, "--seed", "4", "--scheduler", "euler_a", out="solo")
    first.with_suffix(".json").unlink()
    r = cli("replay", first, "-q")
    assert r.exit_code == 0, r
    again = [p for p in images("solo") if p != first]
    assert len(again) == 1 and np.array_equal(pixels(first), pixels(again[0]))


def test_replay_an_a1111_png(cli, tiny, tmp_path):
    png = a1111_png(tmp_path / "a1111.png", "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, "
                    "Schedule type: Automatic, CFG scale: 7, Seed: 77, Size: 64x64, Model: someModel")
    r = cli("replay", png, "--model", tiny("sd"), "-o", "rep")
    assert r.exit_code == 0, r
    (made,) = images("rep")
    params = json.loads(made.with_suffix(".json").read_text())["params"]
    assert (params["prompt"], params["negative_prompt"], params["seed"], params["scheduler"]) == ("a lighthouse", "fog", 77, "euler_a")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)  # no chunks at all (re-encoded by a website)
    r = cli("replay", plain, "-o", "rep")
    assert r.exit_code == 2 and "carries no generation settings" in r.stderr and "hint:" in r.stderr


# ----------------------------------------------------------------------------- LoRA layouts
def _alpha_lora(out: Path) -> Path:
    """A tiny SD LoRA trained-style with lora_alpha 2 != rank 4 (scale 0.5), saved as studio's
    trainer saves one: save_lora_weights with peft's config as metadata."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.pipelines.tiny.image import _tiny_sd_unet

    torch.manual_seed(9)
    unet = _tiny_sd_unet()
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return out


def test_export_to_kohya_and_back_keeps_the_pixels(cli, tiny, tmp_path):
    from safetensors import safe_open

    sd, lora = tiny("sd"), tiny("lora")
    kohya = tmp_path / "style.safetensors"
    r = cli("adapt", "export", lora, "--format", "kohya", "-o", kohya, "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["format"] == "kohya"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = float(f.get_tensor("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"))
    # kohya's SD 1.x layout: lora_unet_<module>/lora_te_text_model_<module> with lora_down, lora_up, alpha
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert alpha == 4.0 and meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert meta["sshs_model_hash"][:12] == addnet_hash(kohya)

    back = tmp_path / "back"
    r = cli("adapt", "export", kohya, "--format", "diffusers", "-o", back)
    assert r.exit_code == 0, r
    info = json.loads(cli("adapt", "info", kohya, "--json").stdout)
    assert (info["format"], info["rank"], info["alpha"]) == ("kohya", 4, 4.0) and info["parts"] == ["text_encoder", "unet"]
    assert "to_q" in info["targets"] and "q_proj" in info["targets"]
    assert json.loads(cli("adapt", "info", back, "--json").stdout)["format"] == "diffusers"

    args = ("a red cat", "--model", sd, *STEPS, "--seed", "6")
    original = gen(cli, *args, "--lora", f"{lora}:0.8", out="orig")
    via_kohya = gen(cli, *args, "--lora", f"{kohya}:0.8", out="kohya")
    via_back = gen(cli, *args, "--lora", f"{back}:0.8", out="back")
    base = gen(cli, *args, out="base")
    assert not np.array_equal(pixels(base), pixels(original))
    assert np.abs(pixels(original) - pixels(via_kohya)).max() <= 1
    assert np.abs(pixels(original) - pixels(via_back)).max() <= 1


def test_kohya_export_keeps_an_alpha_other_than_the_rank(tiny, tmp_path):
    """diffusers' own load_lora_weights on the tiny SD: the original (alpha 2, rank 4), its kohya
    export and that export's diffusers export make the same image."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from studio.adapters.lora_convert import export

    original = _alpha_lora(tmp_path / "alpha2")
    kohya = export(original, "kohya", tmp_path / "alpha2.safetensors").out
    with safe_open(str(kohya), "pt") as f:
        assert {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")} == {2.0}
    back = export(kohya, "diffusers", tmp_path / "alpha2-back").out

    pipe = StableDiffusionPipeline.from_pretrained(tiny("sd"))
    pipe.set_progress_bar_config(disable=True)

    def draw(location: Path, weight_name: str) -> np.ndarray:
        pipe.load_lora_weights(str(location), weight_name=weight_name, adapter_name="x")
        image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images[0]
        pipe.delete_adapters("x")
        return image

    a = draw(original, "pytorch_lora_weights.safetensors")
    b = draw(kohya.parent, kohya.name)
    c = draw(back, "pytorch_lora_weights.safetensors")
    plain = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    assert np.abs(a - plain).max() > 1e-3  # the LoRA does something
    assert np.abs(a - b).max() < 1e-4 and np.abs(a - c).max() < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "is not a LoRA layout"),
    (["--format", "diffusers"], "already in diffusers layout"),
    (["--format", "kohya", "-o", "taken.safetensors"], "exists"),
    (["--format", "kohya", "-o", "style.bin"], "must end in .safetensors"),
])
def test_export_refuses_with_one_line(cli, tiny, args, message):
    Path("taken.safetensors").write_text("mine")
    r = cli("adapt", "export", tiny("lora"), *args)
    assert r.exit_code == 2, r
    assert message in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert Path("taken.safetensors").read_text() == "mine" and not Path("style.bin").exists()
