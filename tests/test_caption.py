"""Captioning, VQA and CLIP interrogation on tiny random models of the real architectures (BLIP,
BLIP VQA, LLaVA, open_clip CLIP), built by the `make-tiny` builders and loaded back through the
same Auto classes a hub model takes."""

import csv
import io
import json
from dataclasses import fields

import pytest
from PIL import Image

from studio.pipelines.caption import CaptionRequest, VQARequest, caption_scores, load_tags
from studio import Studio

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 40), (250, 250, 250)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture
def photos(tmp_path):
    """A folder of four distinct colour photos, a corrupt .png, a text file and a subfolder photo."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"p{i}.png"
        Image.new("RGB", (40 + 8 * i, 36), colour).save(path)
        paths.append(path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.md").write_text("not an image")
    Image.new("RGB", (30, 30), (120, 60, 10)).save(folder / "sub" / "deep.jpg")
    return folder, paths


def rows(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def caption_alone(model, path, **kw):
    [r] = Studio(device="cpu").run("caption", images=[str(path)], model=str(model), write=False, **kw)
    return r.value


# --------------------------------------------------------------------------- request contract
def test_caption_and_vqa_accept_exactly_these_parameters():
    assert [f.name for f in fields(CaptionRequest)] == [
        "images", "model", "prompt", "max_tokens", "beams", "batch_size", "interrogate", "tags", "clip_model",
        "top_tags", "adapters"]
    assert [f.name for f in fields(VQARequest)] == ["images", "questions", "model", "max_tokens", "beams", "batch_size",
                                                    "adapters"]


# --------------------------------------------------------------------------- captions
def test_single_image_caption_is_printed_deterministic_and_replayable(cli, tiny, photos):
    model = tiny("blip-caption")
    _, paths = photos
    first = cli("caption", paths[0], "--model", model, "--max-tokens", "6")
    assert first.exit_code == 0, first
    text = first.stdout.strip()
    assert text and "\n" not in text
    assert cli("caption", paths[0], "--model", model, "--max-tokens", "6").stdout.strip() == text
    # the Python API gives the same text, and a Result's params replay that one image
    [r] = Studio(device="cpu").run("caption", images=[str(paths[0])], model=str(model), max_tokens=6, write=False)
    assert r.value == text
    [again] = Studio(device="cpu").run("caption", write=False, **r.params)
    assert again.value == text


def test_folder_is_batched_and_a_corrupt_file_is_reported_without_stopping_the_rest(cli, tiny, photos):
    model = tiny("blip-caption")
    folder, paths = photos
    result = cli("caption", folder, "--model", model, "--max-tokens", "5", "--batch-size", "3", "-f", "jsonl")
    assert result.exit_code == 1, result  # some failed
    out = rows(result.stdout)
    assert [r["path"] for r in out] == [str(p) for p in paths]  # sorted, notes.md and sub/ left out
    assert all(r["model"] == str(model) and r["seconds"] > 0 for r in out)
    assert "broken.png" in result.stderr and "1 of 5 images could not be read" in result.stderr
    # batched captions are the captions each image gets alone, and the images are told apart
    assert [r["caption"] for r in out[:2]] == [caption_alone(model, p, max_tokens=5) for p in paths[:2]]
    assert len({r["caption"] for r in out}) > 1
    # -r walks subfolders
    deep = cli("caption", folder, "-r", "--model", model, "--max-tokens", "3", "-f", "jsonl", "-q")
    assert any(r["path"].endswith("sub/deep.jpg") for r in rows(deep.stdout))


def test_csv_txt_and_out_file_which_is_never_overwritten(cli, tiny, photos, tmp_path):
    model = tiny("blip-caption")
    _, paths = photos
    args = ["caption", paths[0], paths[1], "--model", model, "--max-tokens", "4"]
    table = list(csv.DictReader(io.StringIO(cli(*args, "-f", "csv").stdout)))
    assert [row["path"] for row in table] == [str(paths[0]), str(paths[1])]
    txt = cli(*args, "-f", "txt").stdout.splitlines()
    assert txt == [f"{row['path']}\t{row['caption']}" for row in table]

    out = tmp_path / "caps.jsonl"
    assert cli(*args, "--out", out).exit_code == 0
    assert [r["caption"] for r in rows(out.read_text())] == [row["caption"] for row in table]  # format from suffix
    again = cli(*args, "--out", out)
    assert again.exit_code == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert cli(*args, "--out", out, "--overwrite").exit_code == 0


def test_sidecars_are_written_beside_photos_and_never_replace_a_caption(cli, tiny, photos):
    model = tiny("blip-caption")
    folder, paths = photos
    (folder / "broken.png").unlink()
    paths[1].with_suffix(".txt").write_text("my own words\n")
    result = cli("caption", folder, "--model", model, "--max-tokens", "4", "--sidecar", "-f", "jsonl")
    assert result.exit_code == 0, result
    assert paths[1].with_suffix(".txt").read_text() == "my own words\n"  # untouched
    assert "skipping 1 image" in result.stderr
    written = {r["path"]: r["caption"] for r in rows(result.stdout)}
    assert str(paths[1]) not in written
    for p in (paths[0], paths[2], paths[3]):
        assert p.with_suffix(".txt").read_text() == written[str(p)] + "\n"
    redo = cli("caption", paths[1], "--model", model, "--max-tokens", "4", "--sidecar", "--overwrite", "-q")
    assert redo.exit_code == 0
    assert paths[1].with_suffix(".txt").read_text() == redo.stdout


def test_precision_and_int8_flags_apply_to_captioning(cli, tiny, photos):
    model = tiny("blip-caption")
    _, paths = photos
    for flags in (["--precision", "bf16"], ["--quantize", "int8"]):
        result = cli("caption", paths[0], "--model", model, "--max-tokens", "4", "-f", "jsonl", *flags)
        assert result.exit_code == 0, result
        assert rows(result.stdout)[0]["caption"]


# --------------------------------------------------------------------------- vqa
def test_vqa_answers_every_question_for_every_image(cli, tiny, photos):
    model = tiny("blip-vqa")
    folder, paths = photos
    result = cli("vqa", paths[0], "what colour is it?", "how many dogs?", "--model", model, "-f", "jsonl")
    assert result.exit_code == 0, result
    out = rows(result.stdout)
    assert [(r["path"], r["question"]) for r in out] == [(str(paths[0]), "what colour is it?"),
                                                         (str(paths[0]), "how many dogs?")]
    assert all(r["answer"] for r in out)
    # a folder with --question: one answer per image, the corrupt one reported
    batch = cli("caption", folder, "--question", "is it red?", "--model", model, "-f", "csv", "-b", "3")
    assert batch.exit_code == 1
    table = list(csv.DictReader(io.StringIO(batch.stdout)))
    assert [row["path"] for row in table] == [str(p) for p in paths]
    assert {row["question"] for row in table} == {"is it red?"}


def test_chat_vlm_is_prompted_through_its_processors_chat_template(cli, tiny, photos):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = tiny("vlm")
    _, paths = photos
    result = cli("vqa", paths[2], "What colour is the sky?", "--model", model, "--max-tokens", "6", "-f", "jsonl")
    assert result.exit_code == 0, result
    [row] = rows(result.stdout)
    # the same answer straight from transformers, with the template the processor ships
    processor = AutoProcessor.from_pretrained(model)
    vlm = AutoModelForImageTextToText.from_pretrained(model)
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.open(paths[2]).convert("RGB")},
                                                 {"type": "text", "text": "What colour is the sky?"}]}]
    inputs = processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = vlm.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert row["answer"] == " ".join(expected.split())
    # captions from a chat VLM batch with left padding: same text as one image at a time
    batch = cli("caption", paths[0], paths[3], "--model", model, "--max-tokens", "5", "-b", "2", "-f", "jsonl")
    assert [r["caption"] for r in rows(batch.stdout)] == [caption_alone(model, p, max_tokens=5) for p in (paths[0], paths[3])]


# --------------------------------------------------------------------------- interrogate
def test_interrogate_appends_the_tags_clip_ranks_best(cli, tiny, photos, tmp_path):
    import open_clip
    import torch

    model, clip = tiny("blip-caption"), tiny("clip")
    _, paths = photos
    tag_file = tmp_path / "tags.txt"
    tags = ["oil painting", "neon lights", "watercolor", "portrait", "golden hour"]
    tag_file.write_text("# my tags\n" + "\n".join(tags) + "\n\n")
    result = cli("caption", paths[0], "--model", model, "--max-tokens", "4", "--interrogate", "--clip-model", clip,
                 "--tags", tag_file, "--top-tags", "2", "-f", "jsonl")
    assert result.exit_code == 0, result
    [row] = rows(result.stdout)
    # the same ranking straight from open_clip
    net, pre = open_clip.create_model_from_pretrained(f"local-dir:{clip}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip}")
    with torch.no_grad():
        img = torch.nn.functional.normalize(net.encode_image(pre(Image.open(paths[0]).convert("RGB"))[None]), dim=-1)
        txt = torch.nn.functional.normalize(net.encode_text(tok(tags)), dim=-1)
    best = [tags[i] for i in (img @ txt.T)[0].topk(2).indices.tolist()]
    assert [t["tag"] for t in row["tags"]] == best
    assert row["caption"].endswith(", " + ", ".join(best))


def test_builtin_tag_vocabulary_is_a_few_hundred_tags_in_named_lists():
    every = load_tags(None)
    assert 250 <= len(every) <= 1000 and len(set(every)) == len(every)
    assert "golden hour" in load_tags("lighting") and "watercolor painting" in load_tags("mediums")
    for name in ("mediums", "styles", "lighting", "colours", "subjects"):
        assert load_tags(name)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, needle", [
    (["missing.jpg"], "does not exist"),
    (["{photo}", "--max-tokens", "0"], "--max-tokens"),
    (["{photo}", "--question", "why?", "--interrogate"], "--interrogate"),
    (["{photo}", "--tags", "lighting"], "--interrogate"),
    (["{photo}", "--interrogate", "--tags", "nope.txt"], "tag list"),
    (["{photo}", "--format", "yaml"], "--format"),
    (["{broken}"], "not a readable image"),
])
def test_bad_input_is_one_line_with_a_hint_and_exit_2(cli, tiny, photos, args, needle):
    folder, paths = photos
    args = [a.format(photo=paths[0], broken=folder / "broken.png") for a in args]
    result = cli("caption", *args, "--model", tiny("blip-caption"))
    assert result.exit_code == 2, result
    assert needle in result.stderr and "hint:" in result.stderr
    assert result.stdout == ""


def test_a_model_for_the_other_task_is_refused_with_the_fix(cli, tiny, photos):
    _, paths = photos
    asked = cli("caption", paths[0], "--model", tiny("blip-vqa"))
    assert asked.exit_code == 2 and "question-answering" in asked.stderr and "studio vqa" in asked.stderr
    told = cli("vqa", paths[0], "what?", "--model", tiny("blip-caption"))
    assert told.exit_code == 2 and "captioning model" in told.stderr


# --------------------------------------------------------------------------- eval
def test_caption_scores_follow_coco_bleu_and_cider():
    refs = {"a": ["a red car on a street", "a car parked on the road"], "b": ["two dogs play in the snow"],
            "c": ["a bowl of fruit on a table"]}
    same = caption_scores(refs, {"a": "A red car on a street.", "b": "two dogs play in the snow", "c": "a bowl of fruit on a table"})
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6) and same["exact_match"] == 1.0 and same["cider"] > 1.0
    off = caption_scores(refs, {"a": "green mountains at dawn", "b": "two dogs play in the snow", "c": "an empty room"})
    assert off["bleu_4"] < same["bleu_4"] and off["cider"] < same["cider"]
    assert off["exact_match"] == pytest.approx(1 / 3)


def test_eval_caption_scores_a_folder_against_its_sidecars(cli, tiny, photos):
    model = tiny("blip-caption")
    folder, paths = photos
    (folder / "broken.png").unlink()
    made = cli("caption", folder, "--model", model, "--max-tokens", "6", "--sidecar", "-q")
    assert made.exit_code == 0, made
    paths[3].with_suffix(".txt").unlink()  # an image without a reference is not scored
    report = cli("eval", "caption", "--data", folder, "--model", model, "--max-tokens", "6")
    assert report.exit_code == 0, report
    data = json.loads(report.stdout)
    assert data["images"] == 3 and data["without_reference"] == 1
    assert data["exact_match"] == 1.0 and data["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    paths[0].with_suffix(".txt").write_text("a completely different reference\n")
    worse = json.loads(cli("eval", "caption", "--data", folder, "--model", model, "--max-tokens", "6").stdout)
    assert worse["exact_match"] == pytest.approx(2 / 3) and worse["bleu_4"] < 1.0


# --------------------------------------------------------------------------- prompt styles
def test_prefix_models_continue_the_prompt_and_vqa_answers_leave_the_question_out(tiny, photos, tmp_path):
    from studio.pipelines.tiny.caption import make_tiny_git

    _, paths = photos
    images = [str(p) for p in paths[:3]]
    st = Studio(device="cpu")
    # BLIP: --prompt is the start of the caption (the model's documented conditional captioning)
    blip = st.run("caption", images=images[:1], model=str(tiny("blip-caption")), prompt="a photo of",
                  max_tokens=4, write=False)
    assert blip[0].value.startswith("a photo of ")
    # GIT: [CLS] + prompt, continued; batched captions equal one-at-a-time ones
    git = tmp_path / "git"
    git.mkdir()
    make_tiny_git(git)
    batch = st.run("caption", images=images, model=str(git), prompt="a photo of", max_tokens=4, batch_size=3, write=False)
    assert all(r.value.startswith("a photo of ") for r in batch)
    assert [r.value for r in batch] == [caption_alone(git, p, prompt="a photo of", max_tokens=4) for p in images]
    answers = st.run("vqa", images=images[:2], questions=["what colour is it", "how many"], model=str(git),
                     max_tokens=4, write=False)
    assert [(r.extra["image"], r.extra["question"]) for r in answers] == [
        (images[0], "what colour is it"), (images[0], "how many"), (images[1], "what colour is it"), (images[1], "how many")]
    assert all(r.value and not r.value.startswith(r.extra["question"]) for r in answers)


def test_two_photos_that_would_share_a_sidecar_are_refused_before_any_work(cli, tiny, photos):
    folder, paths = photos
    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "p0.jpg")
    result = cli("caption", paths[0], folder / "p0.jpg", "--sidecar", "--model", tiny("blip-caption"))
    assert result.exit_code == 2 and "p0.txt" in result.stderr
    assert not paths[0].with_suffix(".txt").exists()
