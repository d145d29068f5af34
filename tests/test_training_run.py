"""The training layer itself (pipelines/training/run.py and checkpoint.py) on a tiny torch model
whose steps draw from every global generator a recipe may use (numpy for data, python's random
for augmentation, torch for dropout): exact resume, the run-folder rules, atomic checkpoints,
the metrics format, the precision words, early stop and pruning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.device import DeviceManager, DeviceSettings
from studio.errors import UsageError
from studio.pipelines.training.checkpoint import find_checkpoints, load_modules, save_modules
from studio.pipelines.training.run import TrainingRun, training_device
from studio.progress import Progress

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = DeviceManager(DeviceSettings(device="cpu", precision="fp32"))


def tiny_run(out: Path, *, steps: int = 6, resume: bool = False, lr: float = 0.05, save_every: int = 3,
             on_step=None, keep=None, stop_file=None, save_model=None, save_every_s=None):
    """A small recipe on TrainingRun, as a trainer writes one; returns (model, run)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    run = TrainingRun(out, {"lr": lr, "steps": steps}, device=CPU, resume=resume, samples_per_step=8, keep=keep,
                      must_match=("lr",))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + 0.5 * s))
    run.track(optimizer=optimizer, scheduler=scheduler, save_model=save_model or save_modules({"net": model}),
              load_model=load_modules({"net": model}))
    if run.restore() is None:
        np.random.seed(0)
        random.seed(0)

    def step(done: int) -> dict:
        x = torch.from_numpy(np.random.standard_normal((8, 4))).float() * random.uniform(0.5, 1.5)  # (8, 4)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        return {"loss": float(loss.detach()), "lr": lr_now}

    run.fit(step, total=steps, save_every=save_every, on_step=on_step, stop_file=stop_file, save_every_s=save_every_s)
    return model, run


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interrupt_at(n: int):
    def on_step(step, row):
        if step == n:
            raise KeyboardInterrupt
    return on_step


def test_a_resumed_run_takes_the_very_steps_of_an_uninterrupted_one(tmp_path):
    straight, _ = tiny_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "b", on_step=interrupt_at(4))  # after step 4; step 3's checkpoint is the last
    resumed, run = tiny_run(tmp_path / "b", resume=True)
    assert run.start == 3
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    same_keys = ("step", "loss", "lr")
    assert [{k: r[k] for k in same_keys} for r in rows(tmp_path / "a")] == \
           [{k: r[k] for k in same_keys} for r in rows(tmp_path / "b")]  # step 4 of the first try was dropped
    for row in rows(tmp_path / "b"):
        assert set(row) == {"step", "loss", "lr", "samples_per_s", "elapsed_s"} and row["samples_per_s"] > 0
    assert [c.path.name for c in find_checkpoints(tmp_path / "b")] == ["step-000003", "step-000006"]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "step-000006").iterdir()) == [
        "model.safetensors", "train_config.json", "trainer_state.json", "trainer_state.safetensors"]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_resuming_without_restoring_the_generators_would_differ(tmp_path, monkeypatch):
    """The exactness above is the RNG restore's doing: the same resume with fresh generators
    draws other batches (so the test above can fail)."""
    straight, _ = tiny_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "b", on_step=interrupt_at(3))
    monkeypatch.setattr("studio.pipelines.training.run.restore_rng", lambda state: None)
    resumed, _ = tiny_run(tmp_path / "b", resume=True)
    assert not all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_the_run_folder_rules(tmp_path):
    with pytest.raises(UsageError, match="nothing to resume") as err:
        tiny_run(tmp_path / "new", resume=True)
    assert "drop --resume" in err.value.hint
    tiny_run(tmp_path / "run", steps=3)
    with pytest.raises(UsageError, match="already holds a training run") as err:
        tiny_run(tmp_path / "run", steps=3)
    assert "--resume" in err.value.hint
    with pytest.raises(UsageError, match=r"different lr \(0.05 in the run, 0.1 now\)"):
        tiny_run(tmp_path / "run", steps=6, resume=True, lr=0.1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        tiny_run(tmp_path / "file")


def test_a_failed_checkpoint_leaves_nothing_and_the_run_resumes_from_the_one_before(tmp_path):
    calls = []

    def flaky(folder: Path) -> None:
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        save_modules({})(folder)

    with pytest.raises(OSError):
        tiny_run(tmp_path / "run", save_every=2, save_model=flaky)
    # step 2's checkpoint, and no half-written step-4 or temp folder beside it
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


def test_an_unreadable_checkpoint_says_what_to_do(tmp_path):
    tiny_run(tmp_path / "run", steps=3)
    (tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").write_text("{not json")
    with pytest.raises(UsageError) as err:
        tiny_run(tmp_path / "run", steps=6, resume=True)
    assert "step-000003 cannot be read" in err.value.message and "delete that folder" in err.value.hint


def test_stop_file_ends_early_with_a_checkpoint_and_keep_prunes(tmp_path):
    stop = tmp_path / "stop"

    def touch_at_4(step, row):
        if step == 4:
            stop.write_text("")

    _, run = tiny_run(tmp_path / "run", steps=8, save_every=1, keep=2, stop_file=stop, on_step=touch_at_4)
    assert run.step == 4 and not stop.exists()
    assert [c.path.name for c in find_checkpoints(tmp_path / "run")] == ["step-000003", "step-000004"]
    _, run = tiny_run(tmp_path / "run", steps=8, save_every=1, keep=2, resume=True)
    assert run.start == 4 and run.step == 8


def test_checkpoints_by_time(tmp_path):
    # the starters checkpoint every few minutes, whatever their step time
    tiny_run(tmp_path / "often", steps=4, save_every=0, save_every_s=1e-9)
    assert [c.step for c in find_checkpoints(tmp_path / "often")] == [1, 2, 3, 4]
    tiny_run(tmp_path / "rarely", steps=4, save_every=0, save_every_s=3600)
    assert [c.step for c in find_checkpoints(tmp_path / "rarely")] == [4]  # the end of the run only


def test_precision_comes_from_the_device_manager_and_the_old_words_still_work(capsys):
    progress = Progress(enabled=True)
    manager = training_device("cpu", "amp_bf16", progress=progress)
    assert manager.dtype == torch.bfloat16 and manager.device.type == "cpu"
    assert "amp_bf16 is bf16 autocast" in capsys.readouterr().err
    assert training_device("cpu", "fp32").dtype == torch.float32
    with pytest.raises(UsageError, match="amp .fp16 autocast. needs a GPU"):
        training_device("cpu", "amp")
    with pytest.raises(UsageError, match="unknown precision"):
        training_device("cpu", "fp8")
