"""Contrastive training of a tiny open_clip CLIP on coloured shapes: the hard-negative loss on a
constructed batch, train -> checkpoint -> eval -> embed -> search through the CLI, exact resume,
accumulation, webdataset shards, and two CPU processes (gloo) against one with the same global
batch."""

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.pipelines.clip import ClipEmbedder
from studio.pipelines.tiny.clip import TINY_MODEL_CFG
from studio.pipelines.training.clip_train import ContrastiveLoss, TrainConfig, open_data, train
from studio.errors import UsageError
from tests.test_clip import make_shapes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def weights(folder: Path) -> dict:
    return load_file(str(Path(folder) / "open_clip_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def quick(shapes, out, tiny, **kw):
    """A TrainConfig for a few steps of the tiny model on the shapes."""
    base = dict(data=str(shapes / "pairs.csv"), out=str(out), model=str(tiny("clip")), steps=4, batch_size=8,
                lr=1e-3, save_every=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- the loss
def features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.6 * torch.randn(n, d, generator=g), dim=1)
    return img, txt


def reference_loss(img, txt, scale, k, weight, mem_img=None, mem_txt=None):
    """The documented formula written out row by row: each row's K hardest negatives count
    `weight` times in the InfoNCE denominator."""
    def one_side(rows, cols, extra):
        total = 0.0
        for i in range(rows.shape[0]):
            s = [float(scale * rows[i] @ c) for c in cols] + ([float(scale * rows[i] @ c) for c in extra] if extra is not None else [])
            negatives = sorted((v, j) for j, v in enumerate(s) if j != i)[::-1]
            hard = {j for _, j in negatives[:k]}
            denom = sum(math.exp(v) * (weight if j in hard else 1.0) for j, v in enumerate(s))
            total += -(s[i] - math.log(denom))
        return total / rows.shape[0]
    return (one_side(img, txt, mem_txt) + one_side(txt, img, mem_img)) / 2


def test_plain_loss_is_open_clips_and_hard_negatives_follow_the_formula():
    from open_clip.loss import ClipLoss

    img, txt = features()
    scale = torch.tensor(10.0)
    plain = ContrastiveLoss()(img, txt, scale)
    assert torch.equal(plain, ClipLoss()(img, txt, scale))
    assert float(ContrastiveLoss(hard_negatives=2, hard_weight=1.0)(img, txt, scale)) == pytest.approx(float(plain))
    hard = ContrastiveLoss(hard_negatives=2, hard_weight=3.0)(img, txt, scale)
    assert float(hard) == pytest.approx(reference_loss(img, txt, 10.0, 2, 3.0), rel=1e-5)
    assert float(hard) > float(plain)  # hard negatives weigh more: the same batch costs more


def test_hard_negatives_get_the_bigger_share_of_the_gradient():
    # image 0's caption is matched, caption 1 is almost the same (a hard negative), caption 2 is far
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0], [0.9, 0.5, 0], [0, 0.1, 1.0]]), dim=1)

    def push_from_image0(loss_fn):
        """How hard a gradient step moves each caption away from image 0."""
        t = txt.clone().requires_grad_(True)
        loss_fn(img, t, torch.tensor(10.0)).backward()
        return t.grad @ img[0]  # (3,)

    plain = push_from_image0(ContrastiveLoss())
    hard = push_from_image0(ContrastiveLoss(hard_negatives=1, hard_weight=4.0))
    # the hard caption is pushed away harder, the easy one is not, the matching one is pulled closer
    assert hard[1] > 1.2 * plain[1] > 0
    assert hard[2] / plain[2] < hard[1] / plain[1]
    assert hard[0] < plain[0] < 0


def test_memory_of_recent_embeddings_adds_negatives():
    img, txt = features(seed=1)
    old_img, old_txt = features(n=4, seed=2)
    loss_fn = ContrastiveLoss(hard_negatives=2, hard_weight=2.0, memory=3)
    loss_fn.update_memory(old_img, old_txt)
    assert loss_fn.memory_image.shape == (3, 8)  # newest first, capped at 3
    got = loss_fn(img, txt, torch.tensor(5.0))
    assert float(got) == pytest.approx(reference_loss(img, txt, 5.0, 2, 2.0, old_img[:3], old_txt[:3]), rel=1e-5)
    loss_fn.update_memory(img[:2], txt[:2])
    assert torch.equal(loss_fn.memory_image, torch.cat([img[:2], old_img[:1]]))


# --------------------------------------------------------------------------- train -> checkpoint -> eval -> embed -> search
def test_train_from_a_custom_config_then_eval_embed_and_search(cli, shapes, tmp_path):
    import open_clip

    config = tmp_path / "tiny-clip-arch.json"
    config.write_text(json.dumps(TINY_MODEL_CFG))
    run = tmp_path / "run"
    r = cli("clip", "train", "--data", shapes / "pairs.csv", "--model", config, "--steps", "4", "--batch-size", "8",
            "--lr", "1e-3", "--save-every", "2", "--log-every", "1", "--hard-negatives", "2", "--val", shapes,
            "--out", run, "--device", "cpu")
    assert r.exit_code == 0, r
    assert "loss=" in r.stderr and "temp=" in r.stderr and "lr=" in r.stderr and "samples_s=" in r.stderr
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]
    for name in ckpts:
        assert sorted(p.name for p in (run / "checkpoints" / name).iterdir()) == [
            "open_clip_config.json", "open_clip_model.safetensors", "train_config.json", "trainer_state.json",
            "trainer_state.safetensors"]
    assert not list(run.rglob("*.tmp*"))
    final = weights(run)
    assert same(final, weights(run / "checkpoints" / "step-000004"))
    assert not same(final, weights(run / "checkpoints" / "step-000002"))
    # open_clip itself loads the checkpoints: by architecture name + file, and by local-dir
    open_clip.add_model_config(config)
    model, _, _ = open_clip.create_model_and_transforms(
        config.stem, pretrained=str(run / "checkpoints" / "step-000004" / "open_clip_model.safetensors"))
    assert same({k: v for k, v in model.state_dict().items()}, final)
    model2, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run}")
    assert same(model2.state_dict(), final)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["lr"] >= 0 and 0 < m["temperature"] < 1 and m["samples_per_s"] > 0 for m in steps)
    assert metrics[-1]["val"]["image_to_text_R@10"] >= 0  # --val ran at the end
    # the run folder is a model: eval, embed, search
    r = cli("clip", "eval", "--model", run, "--data", shapes / "pairs.csv", "--templates", "simple", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["classes"] == 12
    r = cli("clip", "embed", "--model", run / "checkpoints" / "step-000002", shapes, "--out", tmp_path / "idx")
    assert r.exit_code == 0, r
    r = cli("clip", "search", "--index", tmp_path / "idx", "a red circle", "-k", "2", "--json")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2


def test_training_improves_retrieval_and_zero_shot(shapes, tiny, tmp_path):
    data = open_data(str(shapes / "pairs.csv"))
    before = ClipEmbedder.load(tiny("clip"), "cpu").evaluate(data.iter_samples(), templates=["a {}."])
    train(TrainConfig(data=str(shapes / "pairs.csv"), out=str(tmp_path / "run"), model=str(tiny("clip")), epochs=10,
                      batch_size=12, lr=3e-3, save_every=0, augment=False, weight_decay=0.0))
    after = ClipEmbedder.load(tmp_path / "run", "cpu").evaluate(data.iter_samples(), templates=["a {}."])
    assert after["image_to_text_R@1"] >= before["image_to_text_R@1"] + 0.2
    assert after["zero_shot_top1"] >= before["zero_shot_top1"] + 0.2


# --------------------------------------------------------------------------- resume
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(cli, shapes, tiny, tmp_path):
    # accumulation, hard negatives and the negative memory all carry state across the interruption
    kw = dict(accum=2, batch_size=4, hard_negatives=2, negative_memory=8)
    train(quick(shapes, tmp_path / "a", tiny, **kw))

    def ctrl_c(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(quick(shapes, tmp_path / "b", tiny, **kw), on_step=ctrl_c)
    assert not (tmp_path / "b" / "open_clip_model.safetensors").exists()
    r = cli("clip", "train", "--data", shapes / "pairs.csv", "--model", tiny("clip"), "--steps", "4",
            "--batch-size", "4", "--accum", "2", "--hard-negatives", "2", "--negative-memory", "8", "--lr", "1e-3",
            "--save-every", "2", "--log-every", "1", "--out", tmp_path / "b", "--resume", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["resumed_from"] == 2
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # step 3 of the interrupted run was dropped and redone


def test_a_run_checkpointed_in_the_old_layout_resumes_exactly(shapes, tiny, tmp_path):
    """checkpoints/step-NNNNNNNN/ of the layout before the shared one (trainer_state.json with a
    `position`) still resumes bit for bit; the old folder is left as it was."""
    from tests.legacy_checkpoints import to_clip_v0

    kw = dict(hard_negatives=2, negative_memory=8)
    train(quick(shapes, tmp_path / "a", tiny, **kw))
    with pytest.raises(KeyboardInterrupt):
        train(quick(shapes, tmp_path / "b", tiny, **kw),
              on_step=lambda step, m: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None)
    old = to_clip_v0(tmp_path / "b" / "checkpoints" / "step-000002")
    assert old.name == "step-00000002"
    summary = train(quick(shapes, tmp_path / "b", tiny, resume=True, **kw))
    assert summary["resumed_from"] == 2
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    losses = [[(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
              for run in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000002", "step-000004"]


def test_resume_and_out_folder_guard_against_mixing_runs(cli, shapes, tiny, tmp_path):
    train(quick(shapes, tmp_path / "run", tiny, steps=2))
    args = ["clip", "train", "--data", shapes / "pairs.csv", "--model", tiny("clip"), "--steps", "2",
            "--batch-size", "8", "--lr", "1e-3", "--save-every", "2", "--out", tmp_path / "run"]
    r = cli(*args)
    assert r.exit_code == 2 and "already holds a training run" in r.stderr and "--resume" in r.stderr
    r = cli(*[a if a != "1e-3" else "2e-3" for a in args], "--resume")
    assert r.exit_code == 2 and "different lr" in r.stderr
    r = cli(*[a if a != "8" else "4" for a in args], "--resume")
    assert r.exit_code == 2 and "global batch" in r.stderr
    r = cli(*args, "--resume", "--json")  # a finished run resumes to the same end
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["resumed_from"] == 2 and json.loads(r.stdout)["loss"] > 0


def test_accumulation_keeps_the_contrastive_batch_whole(shapes, tiny, tmp_path):
    big = train(quick(shapes, tmp_path / "big", tiny, steps=3, batch_size=8, save_every=0))
    acc = train(quick(shapes, tmp_path / "acc", tiny, steps=3, batch_size=4, accum=2, save_every=0))
    assert big["loss"] == pytest.approx(acc["loss"], rel=1e-5)
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "acc")) < 1e-4


def test_fixed_temperature_locked_image_tower_checkpointing_and_bf16(shapes, tiny, tmp_path):
    before = weights(tiny("clip"))
    train(quick(shapes, tmp_path / "run", tiny, steps=2, temperature="fixed:0.05", lock_image=True,
                grad_checkpointing=True, precision="amp_bf16"))
    after = weights(tmp_path / "run")
    assert float(after["logit_scale"]) == pytest.approx(math.log(20.0), rel=1e-6)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))


def test_bad_training_options_are_usage_errors(cli, shapes, tiny, tmp_path):
    base = ["clip", "train", "--data", shapes / "pairs.csv", "--model", tiny("clip"), "--steps", "1",
            "--out", tmp_path / "run"]
    for extra, words in ((["--precision", "amp", "--device", "cpu"], "needs a GPU"),
                         (["--temperature", "0.07"], "fixed:0.07"),
                         (["--batch-size", "64"], "no full batch"),
                         (["--caption-key", "caption"], "no column 'caption'")):
        r = cli(*base, *extra)
        assert r.exit_code == 2 and words in r.stderr, (extra, r)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- data sources
def test_folder_tsv_and_webdataset_sources(shapes, tiny, tmp_path):
    import webdataset as wds

    folder = open_data(str(shapes))
    assert len(folder) == 24 and folder.sample(0).caption.startswith("a ")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("img\tcap\n" + "".join(f"{shapes / r[1].name}\t{r[2]}\n" for r in folder.rows))
    assert [s.caption for s in open_data(str(tsv), img_key="img", caption_key="cap").iter_samples()] == \
        [s.caption for s in folder.iter_samples()]
    # shards written with webdataset's own writer
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"shapes-{shard:03d}.tar")) as sink:
            for i, row in enumerate(folder.rows[shard * 12:(shard + 1) * 12]):
                sink.write({"__key__": f"s{shard}-{i:03d}", "png": row[1].read_bytes(), "txt": row[2],
                            "cls": row[2][2:]})
    pattern = str(tmp_path / "shards" / "shapes-{000..001}.tar")
    shards = open_data(pattern)
    assert len(shards) == 24
    assert sorted(s.caption for s in shards.iter_samples()) == sorted(s.caption for s in folder.iter_samples())
    # train on shards, interrupted and resumed, equals uninterrupted
    train(quick(shapes, tmp_path / "a", tiny, data=pattern, steps=3, save_every=1))
    with pytest.raises(KeyboardInterrupt):
        train(quick(shapes, tmp_path / "b", tiny, data=pattern, steps=3, save_every=1),
              on_step=lambda step, m: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None)
    train(quick(shapes, tmp_path / "b", tiny, data=pattern, steps=3, save_every=1, resume=True))
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # and evaluate on them (labels from the .cls entries)
    metrics = ClipEmbedder.load(tmp_path / "a", "cpu").evaluate(shards.iter_samples(), templates=["a {}."])
    assert metrics["samples"] == 24 and metrics["classes"] == 12


# --------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg: TrainConfig, errors) -> None:
    # exactly what torchrun / accelerate launch give each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(cfg)
    except BaseException as exc:  # report to the parent, which fails the test
        errors.put(f"rank {rank}: {exc!r}")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(shapes, tiny, tmp_path):
    kw = dict(steps=3, save_every=0, hard_negatives=2, negative_memory=8)
    single = train(quick(shapes, tmp_path / "one", tiny, batch_size=8, **kw))
    ctx = multiprocessing.get_context("fork")  # the parent has torch + open_clip imported already
    errors = ctx.Queue()
    cfg = quick(shapes, tmp_path / "two", tiny, batch_size=4, **kw)
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, cfg, errors)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 5e-4


@pytest.mark.slow
def test_torchrun_launches_the_cli_on_two_processes(shapes, tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["--data", str(shapes / "pairs.csv"), "--model", str(tiny("clip")), "--steps", "2", "--lr", "1e-3",
              "--quiet"]
    subprocess.run([sys.executable, "-m", "studio", "clip", "train", *common, "--batch-size", "8",
                    "--out", str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(_free_port()), "-m", "studio", "clip", "train", *common,
                    "--batch-size", "4", "--out", str(tmp_path / "two")], check=True, env=env, timeout=300)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 5e-4
