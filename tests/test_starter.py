"""Starter models: shapes-world data, the pixel checker, the training recipes (smoke runs of a
few steps through `studio train starter`), exact resume, and the shipped starters loading and
running through the normal CLI paths. Full training stays out of CI (it takes tens of minutes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "presets" / "starter"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- shapes world
def test_samples_are_a_pure_function_of_seed_and_index():
    from studio.pipelines.training import shapes as S

    a = [S.sample(0, i) for i in range(20)]
    assert [S.sample(0, i) for i in range(20)] == a
    assert list(S.samples(0, 5, start=10)) == a[10:15]  # sample i does not depend on how many are asked for
    assert [s.caption for s in S.samples(1, 20)] != [s.caption for s in a]  # another seed, another split
    one = next(s for s in a if len(s.shapes) == 1)
    first = one.shapes[0]
    assert one.caption.startswith(f"a {first.size} {first.colour} {first.shape} ")
    assert one.caption.endswith(f", {one.background} background")
    assert (f"what colour is the {first.shape}?", first.colour) in one.vqa
    two = next(s for s in S.samples(0, 50) if len(s.shapes) == 2)
    assert [s.position for s in two.shapes] in (["left", "right"], ["top", "bottom"])  # reading order


@pytest.mark.parametrize("size", [32, 64])
def test_pixel_checker_is_right_on_real_renders(size):
    from studio.pipelines.training import shapes as S

    items = list(S.samples(7, 200, two_shapes=0.0))
    report = S.prompt_following([S.render(s, size)[0] for s in items], items)
    assert report["prompt_following"] == 1.0, [r for r in report["samples"] if not r["ok"]][:3]


def test_pixel_checker_rejects_wrong_images():
    from PIL import Image

    from studio.pipelines.training import shapes as S

    blank = Image.new("RGB", (64, 64), (40, 80, 200))
    assert S.judge(blank).shape is None
    s = S.sample(3, 0, two_shapes=0.0)
    swapped = S.Sample(s.seed, s.index, s.background, (S.Shape(
        next(x for x in S.SHAPES if x != s.shapes[0].shape), s.shapes[0].colour, "large", "center", 0.5, 0.5, 0.24),), "")
    assert S.prompt_following([S.render(swapped, 64)[0]], [s])["prompt_following"] == 0.0


def test_prompts_are_pure_and_say_what_they_name():
    from studio.pipelines.training import shapes as S

    for family in S.FAMILIES:
        a = [S.prompt(1, i, family) for i in range(30)]
        assert [S.prompt(1, i, family) for i in range(30)] == a  # a pure function of (seed, index, family)
        for p in a:
            want = p.target.shapes[0]
            text = p.text.lower()
            assert ("colour" in p.named) == (want.colour in text.replace(f"{p.target.background} background", "")
                                             .replace(f"{p.target.background} backdrop", "")) or "background" in p.named
            if "shape" in p.named:
                assert want.shape in text
            if "background" not in p.named:
                assert p.target.background == "white"  # "a red circle" means a red circle on white
    assert S.prompt(1, 0, "template").text == S.caption_for(S.prompt(1, 0, "template").target.shapes, S.prompt(1, 0, "template").target.background)
    assert all("shape" not in S.prompt(1, i, "colour-only").named for i in range(20))
    assert all("colour" not in S.prompt(1, i, "shape-only").named for i in range(20))


def test_held_out_phrasings_never_reach_training():
    import re

    from studio.pipelines.training import shapes as S

    seen = set()
    families = set()
    for i in range(3000):
        p = S.training_prompt(0, i)
        families.add(p.family)
        seen |= set(re.findall(r"[a-z]+", p.text.lower()))
    assert "held-out" not in families and families == set(S.TRAINING_MIX)
    assert not seen & S.HELDOUT_WORDS
    vocab = set(S.prompt_words())
    assert not vocab & S.HELDOUT_WORDS and not vocab & set(S.JUNK)  # both reach the model as unknown pieces
    assert seen - vocab <= set(S.JUNK)  # every other training word is one token
    heldout = [S.prompt(1, i, "held-out").text.lower() for i in range(50)]
    # each held-out prompt has a word training never saw, or "please" where training never puts it (last)
    assert all(set(re.findall(r"[a-z]+", h)) & S.HELDOUT_WORDS or h.rstrip(".!").endswith(" please") for h in heldout)
    assert not any(p.rstrip(".!").lower().endswith(" please") for p in (S.training_prompt(0, i).text for i in range(3000)))


def test_checker_scores_every_family_position_and_size_on_real_renders():
    from studio.pipelines.training import shapes as S

    prompts = S.eval_prompts(1, 30)
    report = S.follow_report([S.render(p.target, 64)[0] for p in prompts], prompts)
    assert report["min_prompt_following"] == 1.0 and set(report["families"]) == set(S.FAMILIES)
    assert report["position_accuracy"] == 1.0 and report["size_accuracy"] == 1.0
    # the same shape moved to the opposite side, or drawn at the other size, is caught
    p = next(p for p in prompts if p.family == "template" and p.target.shapes[0].position == "left")
    s = p.target.shapes[0]
    moved = S.Sample(1, 0, p.target.background, (S.Shape(s.shape, s.colour, s.size, "right", 1 - s.cx, s.cy, s.r),), "")
    other = "large" if s.size == "small" else "small"
    resized = S.Sample(1, 0, p.target.background, (S.Shape(s.shape, s.colour, other, s.position, s.cx, s.cy,
                                                           S.SIZES[other]),), "")
    assert S.follows(S.render(moved, 64)[0], p)["position_ok"] is False
    assert S.follows(S.render(resized, 64)[0], p)["size_ok"] is False
    assert S.follows(S.render(p.target, 64)[0], p)["ok"]
    # a red circle that paints the whole image red is not a red circle on white
    from PIL import Image

    short = next(p for p in prompts if p.family == "short" and "background" not in p.named)
    flood = Image.new("RGB", (64, 64), S.COLOURS[short.target.shapes[0].colour])
    assert not S.follows(flood, short)["ok"]


def test_data_shapes_cli_writes_the_same_dataset_twice(cli, tmp_path):
    r = cli("data", "shapes", "--n", "6", "--size", "32", "--seed", "1", "--out", tmp_path / "a", "--quiet")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["n"] == 6
    assert cli("data", "shapes", "--n", "6", "--size", "32", "--seed", "1", "--out", tmp_path / "b", "-q").exit_code == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    meta = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 6 and all((tmp_path / "a" / m["file_name"]).exists() for m in meta)
    assert (tmp_path / "a" / "images" / "000000.txt").read_text().strip() == meta[0]["text"]
    from PIL import Image

    mask = Image.open(tmp_path / "a" / meta[0]["mask"])
    assert mask.size == (32, 32) and mask.getextrema() == (0, 255)
    assert (tmp_path / "a" / "pairs.csv").read_text().startswith("filepath,caption\n")
    assert "question" in (tmp_path / "a" / "vqa.jsonl").read_text()


def test_data_shapes_bad_input_exits_2_and_writes_nothing(cli, tmp_path):
    r = cli("data", "shapes", "--n", "0", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--n" in r.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = cli("data", "shapes", "--n", "2", "--out", tmp_path / "full")
    assert r.exit_code == 2 and "not empty" in r.stderr
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- training machinery
def _stage(work: Path, *, resume: bool, stop_at: int | None = None, dropout: float = 0.0):
    """One 6-step stage of a starter recipe on a tiny model, checkpointing after every step;
    `stop_at`: killed before that step. Returns the model."""
    import torch

    from studio.pipelines.training.starter import Run, train_loop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))
    run = Run("t", work.parent / "out", work, resume=resume, checkpoint_every_s=0.0)

    def loss_fn(step, g):
        if step == stop_at:
            raise KeyboardInterrupt  # a killed run
        x = torch.randn(8, 4, generator=g)
        return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()

    train_loop(run, "s", steps=6, params=list(model.parameters()), lr=1e-2, modules={"m": model},
               loss_fn=loss_fn, warmup=2, log_every=2)
    return model


def _log(work: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (work / "log.jsonl").read_text().splitlines())
            if r.get("stage") == "s" and "step" in r]


def _same(a, b) -> bool:
    import torch

    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    # dropout draws from torch's global generator, which the checkpoint carries
    straight = _stage(tmp_path / "a", resume=False, dropout=0.3)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "b", resume=False, stop_at=3, dropout=0.3)
    assert (tmp_path / "b" / "s" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    resumed = _stage(tmp_path / "b", resume=True, dropout=0.3)
    assert _same(straight, resumed)
    assert _log(tmp_path / "b") == _log(tmp_path / "a") and [r[0] for r in _log(tmp_path / "a")] == [2, 4, 6]
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["steps_per_s"] > 0
    assert (tmp_path / "b" / "s.done").exists()
    # a finished stage is skipped on --resume and gives back its weights
    again = _stage(tmp_path / "b", resume=True, stop_at=0, dropout=0.3)  # a step taken would raise
    assert _same(straight, again)


def _old_loop_snapshot(work: Path, steps_done: int, done: bool = False) -> Path:
    """WORK/s.pt as train_loop wrote it before TrainingRun (commit 0a2465f): the same AdamW,
    schedule and per-step generators as _stage, then torch.save of the modules' state_dicts,
    "opt", "sched" and "step"."""
    import math

    import torch

    from studio.pipelines.training.starter import step_generator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.0), torch.nn.Linear(8, 1))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 2) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / 6)))))
    for step in range(steps_done):
        x = torch.randn(8, 4, generator=step_generator(0, "s", step))
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    work.mkdir(parents=True)
    torch.save({"m": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": steps_done},
               work / "s.pt")
    if done:
        (work / "s.done").write_text("1.0")
    return work / "s.pt"


def test_a_work_folder_of_the_old_loop_still_resumes_and_is_not_rewritten(tmp_path):
    straight = _stage(tmp_path / "a", resume=False)
    old = _old_loop_snapshot(tmp_path / "b", 3)
    before = old.read_bytes()
    resumed = _stage(tmp_path / "b", resume=True)
    # it took steps 4..6 only (a start over would checkpoint 1..6), from the old weights and optimiser
    assert sorted(p.name for p in (tmp_path / "b" / "s" / "checkpoints").iterdir()) == [f"step-00000{i}" for i in (4, 5, 6)]
    assert _same(straight, resumed)
    assert old.read_bytes() == before
    # a stage the old loop finished: skipped, its weights loaded
    _old_loop_snapshot(tmp_path / "c", 6, done=True)
    assert _same(straight, _stage(tmp_path / "c", resume=True, stop_at=0))
    assert not (tmp_path / "c" / "s" / "checkpoints").exists()
    # without --resume the old snapshot is dropped and the stage starts over, as before
    assert _same(straight, _stage(tmp_path / "c", resume=False)) and not (tmp_path / "c" / "s.pt").exists()


def test_train_unknown_starter_is_a_usage_error(cli, tmp_path):
    r = cli("train", "starter", "nonsense", "--out", tmp_path / "x", "--smoke", "-q")
    assert r.exit_code == 2 and "unknown starter" in r.stderr


@pytest.fixture(scope="module")
def smoke_image(tmp_path_factory):
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path_factory.mktemp("smoke") / "image"
    r = CliRunner().invoke(app, ["train", "starter", "image", "--smoke", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_smoke_image_is_a_standard_stable_diffusion_folder(smoke_image):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(smoke_image)  # plain diffusers, no dtype argument
    assert pipe.tokenizer.tokenize("a small red circle")[2] == "red</w>"  # one token per shapes word
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)  # 16x16 latents, a 4x autoencoder
    sizes = [p.stat().st_size for p in smoke_image.rglob("*.safetensors")]
    assert sizes and max(sizes) < 5_000_000


def test_smoke_image_runs_through_studio_image(cli, smoke_image, tmp_path):
    r = cli("image", "a small red circle on the left, blue background", "--model", smoke_image, "--steps", "2",
            "--seed", "3", "--out", tmp_path / "o", "--json", "-q")
    assert r.exit_code == 0, r
    path = Path(json.loads(r.stdout.splitlines()[0])["path"])
    from PIL import Image

    assert Image.open(path).size == (64, 64)


def test_smoke_image_resume_reaches_the_same_weights(tmp_path, smoke_image):
    from typer.testing import CliRunner

    from studio.cli import app

    out = tmp_path / "again"
    r = CliRunner().invoke(app, ["train", "starter", "image", "--smoke", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert _digest(out) == _digest(smoke_image)  # same seed, same bytes
    r = CliRunner().invoke(app, ["train", "starter", "image", "--smoke", "--out", str(out), "--resume", "-q"])
    assert r.exit_code == 0, r.output  # every stage is done: resume republishes the same model
    assert _digest(out) == _digest(smoke_image)


def test_fresh_unet_keeps_the_init_autoencoder_and_text_words(cli, smoke_image, tmp_path):
    # --init with fresh_unet: a new (here 4-level) UNet on the init model's 64 px autoencoder
    out = tmp_path / "fresh"
    r = cli("train", "starter", "image", "--smoke", "--init", smoke_image, "--set", "fresh_unet=true",
            "--set", "unet_channels=[16,16,32,32]", "--set", "unplaced_keep=0.5", "--out", out, "-q")
    assert r.exit_code == 0, r
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert list(pipe.unet.config.block_out_channels) == [16, 16, 32, 32]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (smoke_image / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    import torch

    image = pipe("a red circle at the top", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # six levels cannot halve 16x16 latents five times: one line, exit 2
    r = cli("train", "starter", "image", "--smoke", "--init", smoke_image, "--set", "fresh_unet=true",
            "--set", "unet_channels=[16,16,16,16,16,16]", "--out", tmp_path / "bad", "-q")
    assert r.exit_code == 2 and "UNet levels" in r.stderr
    r = cli("train", "starter", "image", "--smoke", "--set", "unplaced_keep=0", "--out", tmp_path / "none", "-q")
    assert r.exit_code == 2 and "unplaced_keep" in r.stderr
    assert not list(tmp_path.glob("none*"))  # neither the output nor its work folder


def test_training_prompts_can_favour_named_places():
    from studio.pipelines.training import shapes as S

    plain = S.training_prompts(0, 400)
    assert plain == [S.training_prompt(0, i) for i in range(400)]  # the default is the old data, bytes and all
    placed = S.training_prompts(0, 400, unplaced_keep=0.5)
    share = lambda ps: sum("position" in p.named for p in ps) / len(ps)  # noqa: E731
    assert share(placed) > share(plain) + 0.1
    assert placed == S.training_prompts(0, 400, unplaced_keep=0.5)  # a pure function of its arguments
    with pytest.raises(ValueError):
        S.training_prompts(0, 4, unplaced_keep=0)


def test_smoke_control_steers_studio_image(cli, smoke_image, tmp_path):
    # the ControlNet recipe on the smoke image model, then through the normal --control path
    r = cli("train", "starter", "control", "--smoke", "--init", smoke_image, "--out", tmp_path / "control", "-q")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["recipe"]["init"] == str(smoke_image) and "mask_iou" in report["eval"]
    from diffusers import ControlNetModel

    # one stride-2 stem level per autoencoder level: 64 px masks -> 16x16 latents
    assert list(ControlNetModel.from_pretrained(tmp_path / "control").config.conditioning_embedding_out_channels) == [16, 32, 64]
    from studio.pipelines.training import shapes as S

    s = S.sample(1, 0, two_shapes=0.0)
    S.render(s, 64)[1].save(tmp_path / "mask.png")
    r = cli("image", s.caption, "--model", smoke_image, "--control", f"raw:{tmp_path / 'mask.png'}",
            "--control-model", tmp_path / "control", "--steps", "2", "--seed", "0", "--out", tmp_path / "o",
            "--json", "-q")
    assert r.exit_code == 0, r
    row = json.loads(r.stdout.splitlines()[0])
    from PIL import Image

    assert Image.open(row["path"]).size == (64, 64)
    r = cli("eval", "control", "--model", tmp_path / "control", "--base", smoke_image, "--n", "1", "--steps", "2", "-q")
    assert r.exit_code == 0, r
    assert 0.0 <= json.loads(r.stdout)["mask_iou"] <= 1.0


def test_init_on_a_starter_without_one_is_a_usage_error(cli, tmp_path):
    r = cli("train", "starter", "midi", "--smoke", "--init", "starter-midi", "--out", tmp_path / "m", "-q")
    assert r.exit_code == 2 and "cannot start from" in r.stderr, r
    assert not (tmp_path / "m").exists()
    # a starter that can continue from weights refuses another task's model before any training
    r = cli("train", "starter", "code", "--smoke", "--init", "starter-caption", "--out", tmp_path / "c", "-q")
    assert r.exit_code == 2 and "starter-caption is a caption model, not a code model" in r.stderr, r
    assert not (tmp_path / "c").exists()


def test_mask_iou_of_the_checker():
    from studio.pipelines.training import shapes as S
    from studio.pipelines.training.starter import mask_iou

    s = S.sample(1, 3, two_shapes=0.0)
    image, mask = S.render(s, 32)
    assert mask_iou(image, mask) == 1.0  # the real image's shape is exactly its mask
    other = S.render(S.sample(1, 4, two_shapes=0.0), 32)[1]
    assert mask_iou(image, other) < 0.8


@pytest.mark.parametrize("name", ["caption", "vqa", "clip"])
def test_smoke_training_of_each_starter(cli, tmp_path, name):
    r = cli("train", "starter", name, "--smoke", "--out", tmp_path / name, "-q")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["starter"] == name and report["eval"]["data_seed"] == 1
    assert any((tmp_path / name).glob("*.safetensors"))


# ----------------------------------------------------------------------------- the shipped starters
def _shipped(name: str) -> Path:
    folder = SHIPPED / name
    assert folder.is_dir(), f"starter {name} is not shipped: run `studio train starter {name} --out {folder}`"
    return folder


def test_shipped_weights_stay_small():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert files
    assert max(p.stat().st_size for p in files) < 5_000_000
    assert sum(p.stat().st_size for p in files) < 40_000_000


@pytest.mark.parametrize("prompt, colour, shape", [("a red circle", "red", "circle"), ("a blue square", "blue", "square"),
                                                    ("Green triangle please", "green", "triangle"),
                                                    ("purple colour square on a white background", "purple", "square")])
def test_starter_image_draws_prompts_as_people_type_them(cli, tmp_path, prompt, colour, shape):
    """The issue's complaint: "a red circle" painted the whole image red. Typed the way people do
    (no background named, capitals, fillers), the named colour and shape come out on white, at 64 px,
    judged by the pixel checker; the card's eval measures this on 600 held-out prompts."""
    _shipped("image")
    r = cli("image", prompt, "--model", "starter-image", "--seed", "0", "--out", tmp_path, "--json", "-q")
    assert r.exit_code == 0, r
    from PIL import Image

    from studio.pipelines.training import shapes as S

    image = Image.open(json.loads(r.stdout.splitlines()[0])["path"]).convert("RGB")
    verdict = S.judge(image)
    assert image.size == (64, 64)
    assert (verdict.colour, verdict.shape, verdict.background) == (colour, shape, "white"), verdict


def test_starter_image_runs_through_the_cli_and_replays(cli, tmp_path):
    # prompt-following is measured by `studio eval image` and recorded in the model card; here:
    # the alias resolves, the model's own 64x64 size is used, and a seed replays bit for bit
    _shipped("image")
    paths = []
    for out in ("a", "b"):
        r = cli("image", "a large red circle in the center, white background", "--model", "starter-image",
                "--seed", "0", "--steps", "4", "--out", tmp_path / out, "--json", "-q")
        assert r.exit_code == 0, r
        paths.append(json.loads(r.stdout.splitlines()[0])["path"])
    from PIL import Image

    a, b = (Image.open(p) for p in paths)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_auto_falls_back_to_starter_image_offline(cli, tmp_path):
    _shipped("image")
    r = cli("image", "a small blue square on the left, yellow background", "--steps", "4", "--offline",
            "--out", tmp_path)
    assert r.exit_code == 0, r
    assert "using starter-image" in r.stderr and "sd-turbo" in r.stderr  # the one-line notice names both


def test_eval_image_reports_each_phrasing_family(cli):
    _shipped("image")
    r = cli("eval", "image", "--model", "starter-image", "--n", "2", "--family", "short", "--family", "held-out",
            "--samples", "-q")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["n"] == 4 and set(report["families"]) == {"short", "held-out"}
    assert report["min_prompt_following"] == min(f["prompt_following"] for f in report["families"].values())
    assert [s["family"] for s in report["samples"]] == ["short", "short", "held-out", "held-out"]


def test_eval_image_unknown_family_is_a_usage_error(cli):
    r = cli("eval", "image", "--family", "limericks", "--n", "1")
    assert r.exit_code == 2 and "limericks" in r.stderr and "held-out" in r.stderr


def test_starter_control_draws_inside_the_mask(cli, tmp_path):
    _shipped("image")
    _shipped("control")
    from PIL import Image

    from studio.pipelines.training import shapes as S
    from studio.pipelines.training.starter import mask_iou

    s = S.sample(1, 0, two_shapes=0.0)
    S.render(s, 32)[1].save(tmp_path / "mask.png")
    r = cli("image", s.caption, "--model", "starter-image", "--control", f"raw:{tmp_path / 'mask.png'}",
            "--control-model", "starter-control", "--seed", "0", "--out", tmp_path / "o", "--json", "-q")
    assert r.exit_code == 0, r
    image = Image.open(json.loads(r.stdout.splitlines()[0])["path"])
    assert mask_iou(image, Image.open(tmp_path / "mask.png")) >= 0.7  # the card: mean 0.876 on 50 masks


def test_starter_caption_and_vqa_through_the_cli(cli, tmp_path):
    _shipped("caption")
    _shipped("vqa")
    from studio.pipelines.training import shapes as S

    s = S.sample(1, 0, two_shapes=0.0)
    S.render(s, 64)[0].save(tmp_path / "shape.png")
    r = cli("caption", tmp_path / "shape.png", "--model", "starter-caption", "--json", "-q")
    assert r.exit_code == 0, r
    assert s.shapes[0].shape in r.stdout
    r = cli("vqa", tmp_path / "shape.png", f"what colour is the {s.shapes[0].shape}?", "--model", "starter-vqa",
            "--json", "-q")
    assert r.exit_code == 0, r
    assert s.shapes[0].colour in r.stdout


def test_starter_clip_loads_with_open_clip():
    folder = _shipped("clip")
    from studio.pipelines.clip import load_clip
    from studio.pipelines.training import shapes as S
    from studio.pipelines.training.starter import clip_zero_shot

    model, preprocess, tokenizer = load_clip(str(folder))
    metrics = clip_zero_shot(model.float().eval(), preprocess, tokenizer, list(S.samples(1, 36, two_shapes=0.0)), 64)
    assert metrics["zero_shot_top1"] >= 0.75  # chance is 1/18; the card records the 300-image number


def test_smoke_training_of_the_code_starter_loads_in_studio_code(cli, tmp_path):
    r = cli("train", "starter", "code", "--smoke", "--out", tmp_path / "code", "-q")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout.splitlines()[-1])["starter"] == "code"
    r = cli("code", "def add(a, b):", "--model", tmp_path / "code", "--max-tokens", "4", "--seed", "1", "--json", "-q")
    assert r.exit_code == 0, r


def test_smoke_training_of_the_midi_starter_loads_in_studio_music(cli, tmp_path):
    r = cli("train", "starter", "midi", "--smoke", "--out", tmp_path / "midi", "-q")
    assert r.exit_code == 0, r
    assert (tmp_path / "midi" / "tokenizer.json").exists()  # miditok's file beside the GPT-2
    r = cli("music", "midi", "--model", tmp_path / "midi", "--bars", "1", "--key", "C:major", "--seed", "1",
            "--out", tmp_path / "o", "--json", "-q")
    assert r.exit_code == 0, r


def test_valid_prefix_check():
    from studio.pipelines.training.starter import valid_prefix

    assert valid_prefix("def f(x):\n    return (x +\n")  # incomplete but valid so far
    assert not valid_prefix("def f(x):\n    return )\n")
