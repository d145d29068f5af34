"""CLIP loading, embedding, search and evaluation on a tiny random open_clip model (the real ViT +
text-transformer CLIP class) built by `make-tiny clip` and loaded back through open_clip's own
`local-dir:` factory path. The image-caption data are coloured shapes drawn here with PIL."""

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.pipelines.clip import (ClipEmbedRequest, load_clip, load_index, resolve_clip, retrieval_metrics, search_index,
                            zero_shot_metrics)
from studio import Studio

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, variant: int = 0) -> Image.Image:
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    d = ImageDraw.Draw(im)
    o = 2 + 4 * variant
    rgb = COLOURS[colour]
    if shape == "circle":
        d.ellipse([o, o, o + 22, o + 22], fill=rgb)
    elif shape == "square":
        d.rectangle([o, o, o + 22, o + 22], fill=rgb)
    else:
        d.polygon([(o + 11, o), (o, o + 22), (o + 22, o + 22)], fill=rgb)
    return im


def make_shapes(root: Path, *, variants: int = 2, classes: bool = False) -> Path:
    """Coloured shapes with `.txt` captions ("a red circle") and a pairs.csv (filepath, title,
    label). classes=True puts each image in a subfolder named after its class (ImageFolder)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title,label"]
    for v in range(variants):
        for colour in COLOURS:
            for shape in SHAPES:
                rel = Path(f"{colour} {shape}" if classes else ".") / f"{colour}-{shape}-{v}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                draw(colour, shape, v).save(root / rel)
                (root / rel).with_suffix(".txt").write_text(f"a {colour} {shape}")
                rows.append(f"{rel.as_posix()},a {colour} {shape},{colour} {shape}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


def rows(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------- the tiny model
def test_tiny_clip_is_open_clip_hub_layout_and_loads_through_local_dir(tiny):
    import open_clip
    import torch

    folder = tiny("clip")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 32 and cfg["model_cfg"]["text_cfg"]["layers"] == 2
    model, preprocess, tokenizer = load_clip(folder)
    direct, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert tokenizer(["a red circle"]).shape == (1, 16)
    assert preprocess(draw("red", "circle")).shape == (3, 32, 32)


def test_tiny_builder_is_seeded(tmp_path):
    from studio.pipelines.tiny import make_tiny

    a = make_tiny("clip", tmp_path / "a", seed=3)
    b = make_tiny("clip", tmp_path / "b", seed=3)
    c = make_tiny("clip", tmp_path / "c", seed=4)
    data = [(p / "open_clip_model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] and data[0] != data[2]


def test_clip_embed_accepts_exactly_these_parameters():
    assert [f.name for f in fields(ClipEmbedRequest)] == ["inputs", "model", "kind", "batch_size", "normalize"]


# --------------------------------------------------------------------------- embed + search
def test_embed_images_and_texts_then_search_by_text_and_by_image(cli, tiny, shapes, tmp_path):
    model = tiny("clip")
    r = cli("clip", "embed", "--model", model, shapes, "a red circle", "a blue square", "--out", tmp_path / "idx",
            "--json", "--device", "cpu")
    assert r.exit_code == 0, r
    summary = json.loads(r.stdout)
    assert summary["count"] == 26 and summary["images"] == 24 and summary["texts"] == 2
    vectors = np.load(tmp_path / "idx.npy")
    assert vectors.dtype == np.float16 and vectors.shape == (26, 32)
    assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=1e-2)
    ids = [json.loads(line) for line in (tmp_path / "idx.jsonl").read_text().splitlines()]
    assert [i["row"] for i in ids] == list(range(26)) and ids[-1] == {"row": 25, "id": "a blue square", "kind": "text",
                                                                     "source": "a blue square"}
    meta = json.loads((tmp_path / "idx.json").read_text())
    assert meta["dim"] == 32 and meta["load"]["model"] == str(model.resolve())

    # text query: the identical text in the index is the best match (cosine 1)
    hits = rows(cli("clip", "search", "--index", tmp_path / "idx", "a red circle", "-k", "3", "--json").stdout)
    assert len(hits) == 3 and hits[0]["id"] == "a red circle" and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # image query, images only: the image itself comes first
    query = shapes / "green-square-1.png"
    r = cli("clip", "search", "--index", tmp_path / "idx.npy", "--image", query, "--kind", "image", "-k", "2", "--json")
    assert r.exit_code == 0, r
    hits = rows(r.stdout)
    assert hits[0]["source"] == str(query.resolve()) and all(h["kind"] == "image" for h in hits)
    # the table form names the results too
    table = cli("clip", "search", "--index", tmp_path / "idx", "a blue square", "-k", "1")
    assert table.exit_code == 0 and "a blue square" in table.stdout


def test_embeddings_match_a_direct_open_clip_forward(tiny, shapes):
    import torch

    from studio.pipelines.clip import ClipEmbedder

    model, preprocess, tokenizer = load_clip(tiny("clip"))
    embedder = ClipEmbedder.load(tiny("clip"), "cpu")
    image = shapes / "red-circle-0.png"
    with torch.no_grad():
        want_i = model.encode_image(preprocess(Image.open(image).convert("RGB"))[None], normalize=True)[0]
        want_t = model.encode_text(tokenizer(["a red circle"]), normalize=True)[0]
    assert np.allclose(embedder.embed_images([image])[0], want_i.numpy(), atol=1e-6)
    assert np.allclose(embedder.embed_texts(["a red circle"])[0], want_t.numpy(), atol=1e-6)


def test_embed_refuses_an_existing_index_and_missing_images_without_writing(cli, tiny, shapes, tmp_path):
    model = tiny("clip")
    (tmp_path / "idx.npy").write_bytes(b"keep me")
    r = cli("clip", "embed", "--model", model, "a cat", "--out", tmp_path / "idx")
    assert r.exit_code == 2 and "exists" in r.stderr and "--overwrite" in r.stderr
    assert (tmp_path / "idx.npy").read_bytes() == b"keep me" and not (tmp_path / "idx.jsonl").exists()
    r = cli("clip", "embed", "--model", model, shapes / "nope.png", "--out", tmp_path / "other")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not list(tmp_path.glob("other*"))
    r = cli("clip", "search", "--index", tmp_path / "missing", "x")
    assert r.exit_code == 2 and "clip embed" in r.stderr
    r = cli("clip", "search", "--index", tmp_path / "idx", "x", "--image", shapes / "red-circle-0.png")
    assert r.exit_code == 2 and "exactly one query" in r.stderr


def test_search_ranks_by_cosine_and_filters_by_kind(tmp_path):
    from studio.pipelines.clip import Item, save_index

    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0.8, 0.6, 0]], np.float32)
    items = [Item("image", "a", "a"), Item("image", "b", "b"), Item("text", "c", "c"), Item("text", "d", "d")]
    save_index(tmp_path / "x", vectors, items, {"load": {"model": "m"}})
    index = load_index(tmp_path / "x.npy")
    assert [h["id"] for h in search_index(index, [1, 0, 0], k=4)] == ["a", "d", "b", "c"]
    assert [h["id"] for h in search_index(index, [1, 0, 0], k=4, kind="text")] == ["d", "c"]
    assert search_index(index, [2, 0, 0], k=1)[0]["score"] == pytest.approx(1.0)  # queries are normalised


# --------------------------------------------------------------------------- evaluation
def test_metrics_on_constructed_embeddings():
    import torch

    eye = torch.eye(4)
    perfect = retrieval_metrics(eye, eye, ["a", "b", "c", "d"])
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0
    # image 0 is most similar to caption 1: wrong at R@1, right at R@5
    texts = eye[[1, 0, 2, 3]]
    m = retrieval_metrics(eye, texts, ["a", "b", "c", "d"])
    assert m["image_to_text_R@1"] == 0.5 and m["image_to_text_R@5"] == 1.0
    # duplicated captions: any identical caption counts as right
    assert retrieval_metrics(eye, texts, ["a", "a", "c", "d"])["image_to_text_R@1"] == 1.0
    classifier = torch.eye(4)  # (D, C): class c is direction c
    z = zero_shot_metrics(eye, ["x", "y", "z", "w"], classifier, ["x", "y", "w", "z"])
    assert z["zero_shot_top1"] == 0.5 and z["zero_shot_top5"] == 1.0 and z["classes"] == 4


def test_eval_reports_zero_shot_and_retrieval_as_table_and_json(cli, tiny, tmp_path):
    data = make_shapes(tmp_path / "classes", variants=1, classes=True)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"{c} {s}" for c in COLOURS for s in SHAPES) + "\n")
    r = cli("clip", "eval", "--model", tiny("clip"), "--data", data, "--labels", labels, "--templates", "simple",
            "--json", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["samples"] == 12 and report["classes"] == 12
    for key in ("zero_shot_top1", "zero_shot_top5", "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
                "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10"):
        assert 0.0 <= report[key] <= 1.0
    assert report["zero_shot_top5"] >= report["zero_shot_top1"]
    assert report["image_to_text_R@10"] >= report["image_to_text_R@5"] >= report["image_to_text_R@1"]
    assert json.loads((tmp_path / "m.json").read_text()) == report
    # `studio eval clip` is the same command; the table form prints every metric
    r = cli("eval", "clip", "--model", tiny("clip"), "--data", data, "--templates", "simple")
    assert r.exit_code == 0, r
    assert "zero_shot_top1" in r.stdout and "text_to_image_R@10" in r.stdout
    # a label outside --labels is a usage error naming it
    labels.write_text("red circle\nblue square\n")
    r = cli("clip", "eval", "--model", tiny("clip"), "--data", data, "--labels", labels, "--templates", "simple")
    assert r.exit_code == 2 and "not among" in r.stderr


def test_eval_through_the_engine_equals_in_process_scoring_on_a_folder_and_on_shards(cli, tiny, tmp_path):
    """`studio eval clip` embeds images, captions and class prompts through the engine (the
    clip-embed task) and scores the embeddings; training's validation scores in-process with the
    model. Same model, same data: the same numbers, also when the data come as webdataset shards,
    whose images have no path of their own (they go through a temp folder that is removed)."""
    import tempfile

    import webdataset as wds

    from studio.pipelines.clip import ClipEmbedder, load_templates
    from studio.pipelines.training.clip_train import open_data

    data = make_shapes(tmp_path / "classes", variants=2, classes=True)
    folder = open_data(str(data), need_captions=False)
    direct = ClipEmbedder.load(tiny("clip"), "cpu").evaluate(folder.iter_samples(), templates=load_templates("simple"))
    r = cli("eval", "clip", "--model", tiny("clip"), "--data", data, "--templates", "simple", "--json")
    assert r.exit_code == 0, r
    report = json.loads(r.stdout)
    assert report["samples"] == 24 and report["classes"] == 12
    assert {k: report[k] for k in direct} == pytest.approx(direct, abs=1e-6)

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "shapes-000.tar")) as sink:
        for i, (_, image, caption, label) in enumerate(folder.rows):
            sink.write({"__key__": f"s{i:03d}", "png": image.read_bytes(), "txt": caption, "cls": label})
    before = set(Path(tempfile.gettempdir()).glob("studio-clip-eval-*"))
    r = cli("eval", "clip", "--model", tiny("clip"), "--data", tmp_path / "shards" / "shapes-000.tar",
            "--templates", "simple", "--json")
    assert r.exit_code == 0, r
    assert {k: json.loads(r.stdout)[k] for k in direct} == pytest.approx(direct, abs=1e-6)
    assert set(Path(tempfile.gettempdir()).glob("studio-clip-eval-*")) == before


def test_pretrained_folds_into_one_model_name_on_every_clip_command(cli, tiny, tmp_path):
    """--model CONFIG.json --pretrained FILE (an architecture and its weights) embeds exactly as the
    folder holding both; --pretrained with a folder or with auto says what goes with it."""
    cfg = tmp_path / "tiny-arch.json"
    cfg.write_text(json.dumps(json.loads((tiny("clip") / "open_clip_config.json").read_text())["model_cfg"]))
    weights = tiny("clip") / "open_clip_model.safetensors"
    a = cli("clip", "embed", "a red circle", "--model", tiny("clip"), "--out", tmp_path / "a", "--json")
    b = cli("clip", "embed", "a red circle", "--model", cfg, "--pretrained", weights, "--out", tmp_path / "b", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, (a, b)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["load"] == {"model": str(cfg.resolve()), "pretrained": str(weights.resolve())}
    hit = cli("clip", "search", "--index", tmp_path / "b", "a red circle", "-k", "1", "--json")  # reloads cfg@weights
    assert hit.exit_code == 0 and json.loads(hit.stdout)["score"] == pytest.approx(1.0, abs=1e-3)
    r = cli("clip", "embed", "x", "--model", tiny("clip"), "--pretrained", weights, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--pretrained goes with an architecture name" in r.stderr
    r = cli("clip", "eval", "--data", tmp_path, "--pretrained", "laion2b_s34b_b79k")
    assert r.exit_code == 2 and "--model ViT-B-32 --pretrained laion2b_s34b_b79k" in r.stderr


def test_eval_data_errors_name_the_fix(cli, tiny, shapes, tmp_path):
    r = cli("clip", "eval", "--model", tiny("clip"), "--data", shapes / "pairs.csv", "--img-key", "path")
    assert r.exit_code == 2 and "no column 'path'" in r.stderr and "--img-key" in r.stderr
    bad = tmp_path / "templates.txt"
    bad.write_text("no placeholder here\n")
    r = cli("clip", "eval", "--model", tiny("clip"), "--data", shapes, "--templates", bad)
    assert r.exit_code == 2 and "{}" in r.stderr


# --------------------------------------------------------------------------- model resolution
def test_model_names_resolve_or_say_what_would_work(tmp_path, tiny):
    from studio.errors import UsageError

    src = resolve_clip(tiny("clip"))
    assert src.model_name.startswith("local-dir:") and src.reload_args() == (str(tiny("clip").resolve()), None)
    ckpt = resolve_clip(tiny("clip") / "open_clip_model.safetensors")
    assert ckpt.checkpoint.endswith("open_clip_model.safetensors")
    arch = resolve_clip("ViT-B-32@laion2b_s34b_b79k")
    assert (arch.model_name, arch.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(UsageError, match="without weights") as e:
        resolve_clip("ViT-B-32")
    assert "laion2b_s34b_b79k" in e.value.hint
    with pytest.raises(UsageError, match="neither a pretrained tag"):
        resolve_clip("ViT-B-32@no_such_tag")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="transformers model folder"):
        resolve_clip(hf)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text((tiny("clip") / "open_clip_config.json").read_text())
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="pickle"):
        resolve_clip(pickled)
    assert resolve_clip(pickled, allow_pickle=True).folder == str(pickled.resolve())


def test_default_model_is_a_card_and_offline_says_how_to_get_it(cli, shapes):
    from studio.models import load_cards

    defaults = [c for c in load_cards().values() if "clip-embed" in (c.get("default_for") or [])]
    assert [(c["name"], c["source"]) for c in defaults] == [("clip-vit-b-32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")]
    # the default named explicitly, offline and not cached: one error naming the fix
    r = cli("clip", "embed", "a cat", "--model", "clip-vit-b-32", "--out", "idx", "--offline")
    assert r.exit_code == 2 and "clip-vit-b-32" in r.stderr and "models pull" in r.stderr
    # `auto` offline falls back to the shipped starter instead of failing
    r = cli("clip", "embed", "a cat", "--out", "idx2", "--offline")
    assert r.exit_code == 0 and "starter-clip" in r.stderr


def test_clip_embed_task_through_the_engine(tiny, shapes):
    [result] = Studio(device="cpu").run("clip-embed", inputs=[str(shapes / "red-circle-0.png"), "a red circle"],
                                        model=str(tiny("clip")), write=False)
    assert result.kind == "json" and result.value["dim"] == 32
    assert [i["kind"] for i in result.value["items"]] == ["image", "text"]
    assert np.linalg.norm(result.value["items"][0]["embedding"]) == pytest.approx(1.0, abs=1e-4)
