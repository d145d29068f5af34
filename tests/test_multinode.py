"""Training across nodes: `studio clip train` and `studio adapt train` launched as two nodes of one
process each, which find each other through torchrun's c10d rendezvous on 127.0.0.1 and train
over gloo, end where one process ends with the same global batch (as tests/test_clip_train.py's
two-process check does for one machine).

The fast tests run torch's elastic launcher, the code behind `torchrun` (LaunchConfig ->
elastic_launch), in two forked "node" processes, so nothing pays torch's import again; the slow
ones run the real `torchrun --nnodes 2 ... -m studio ...` command lines a user types on each node.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_clip import make_shapes
from tests.test_clip_train import max_diff, quick, weights

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

CODE = "def greet_studio(name):\n    return 'hello studio ' + name\n\n\ndef twice(x):\n    return x + x\n" * 3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture
def code_data(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "greet.py").write_text(CODE)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- torch's launcher, forked
def _node(port: int, run_id: str, fn, args: tuple, errors) -> None:
    """One node: torch's elastic agent (what `torchrun --nnodes 2 --nproc-per-node 1
    --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT --local-addr 127.0.0.1` starts), running
    `fn(*args)` in one worker process it forks once the two nodes have met."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(LOOPBACK)
    config = LaunchConfig(min_nodes=2, max_nodes=2, nproc_per_node=1, run_id=run_id, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"timeout": 240}, max_restarts=0,
                          start_method="fork", local_addr="127.0.0.1", monitor_interval=0.2)
    try:
        elastic_launch(config, fn)(*args)
    except BaseException as exc:  # the parent fails the test with it
        errors.put(repr(exc)[:2000])


def two_nodes(fn, *args) -> None:
    ctx = multiprocessing.get_context("fork")  # torch and the libraries are imported already
    errors = ctx.Queue()
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    nodes = [ctx.Process(target=_node, args=(port, run_id, fn, args, errors)) for _ in range(2)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(timeout=400)
    assert errors.empty(), errors.get()
    assert [node.exitcode for node in nodes] == [0, 0]


def _clip_worker(cfg) -> None:
    from studio.pipelines.training.clip_train import train

    assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"] == "127.0.0.1"  # set by the rendezvous
    torch.set_num_threads(1)
    train(cfg)


def _adapt_worker(config) -> None:
    from studio.device import DeviceManager
    from studio.pipelines.training.adapters import train
    from studio.progress import Progress

    torch.set_num_threads(1)
    train(config, DeviceManager(), Progress(enabled=False))


def test_clip_training_on_two_nodes_matches_one_process_with_the_same_global_batch(shapes, tiny, tmp_path):
    from studio.pipelines.training.clip_train import train

    kw = dict(steps=3, save_every=0, hard_negatives=2, negative_memory=8)
    single = train(quick(shapes, tmp_path / "one", tiny, batch_size=8, **kw))
    two_nodes(_clip_worker, quick(shapes, tmp_path / "two", tiny, batch_size=4, **kw))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 5e-4


def adapt_config(tiny, data: Path, out: Path, **kw):
    from studio.pipelines.training.adapters import TrainConfig

    base = dict(base=str(tiny("code-lm")), data=str(data), task="code", rank=2, lr=5e-3, max_length=32,
                batch_size=2, dropout=0.1, steps=3, save_every=2, out=str(out))
    return TrainConfig(**{**base, **kw})


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def test_adapter_training_on_two_nodes_matches_one_process_that_accumulates_both_shares(tiny, code_data, tmp_path):
    from studio.device import DeviceManager
    from studio.pipelines.training.adapters import train
    from studio.progress import Progress

    # one process, 2 micro-batches a step == two nodes, 1 micro-batch each (the step's 2nd is node 2's)
    single = train(adapt_config(tiny, code_data, tmp_path / "one", accum=2), DeviceManager(), Progress(enabled=False))
    two_nodes(_adapt_worker, adapt_config(tiny, code_data, tmp_path / "two", accum=1))
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and max_diff(one, two) < 1e-5
    # and the second node's share counted: one process with its own share alone ends elsewhere
    train(adapt_config(tiny, code_data, tmp_path / "alone", accum=1), DeviceManager(), Progress(enabled=False))
    assert max_diff(adapter(tmp_path / "alone"), two) > 1e-4
    meta = json.loads((tmp_path / "two" / "studio.json").read_text())
    assert meta["result"]["last_loss"] == pytest.approx(single.losses[-1], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer: the first node
    assert [r["loss"] for r in rows] == pytest.approx(single.losses, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


# --------------------------------------------------------------------------- the real command lines
def torchrun(port: int, run_id: str, *studio_args: str) -> list[str]:
    """What a user types on each node (here both on 127.0.0.1)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--local-addr", "127.0.0.1", "-m", "studio", *studio_args]


def run_two_nodes(*studio_args: str) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, **LOOPBACK, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs = [subprocess.Popen(torchrun(port, run_id, *studio_args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


@pytest.mark.slow  # four fresh Python processes importing torch and open_clip / transformers
def test_torchrun_two_nodes_runs_studio_clip_train_and_studio_adapt_train(shapes, tiny, code_data, tmp_path):
    from studio.device import DeviceManager
    from studio.pipelines.training.adapters import train as adapt_train
    from studio.pipelines.training.clip_train import train as clip_train

    clip_single = clip_train(quick(shapes, tmp_path / "clip-one", tiny, steps=2, batch_size=8, save_every=0))
    run_two_nodes("clip", "train", "--data", str(shapes / "pairs.csv"), "--model", str(tiny("clip")), "--steps", "2",
                  "--lr", "1e-3", "--batch-size", "4", "--quiet", "--out", str(tmp_path / "clip-two"))
    assert max_diff(weights(tmp_path / "clip-one"), weights(tmp_path / "clip-two")) < 5e-4
    summary = json.loads((tmp_path / "clip-two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["loss"] == pytest.approx(clip_single["loss"], rel=1e-4)

    from studio.progress import Progress

    adapt_train(adapt_config(tiny, code_data, tmp_path / "lora-one", accum=2, dropout=0.0), DeviceManager(),
                Progress(enabled=False))
    nodes = run_two_nodes("adapt", "train", "--base", str(tiny("code-lm")), "--task", "code", "--data", str(code_data),
                          "--rank", "2", "--lr", "5e-3", "--max-length", "32", "--batch-size", "2", "--steps", "3",
                          "--save-every", "2", "--json", "--out", str(tmp_path / "lora-two"))
    reports = [json.loads(n.stdout) for n in nodes if n.stdout.strip()]
    assert len(reports) == 1  # the first process reports for both
    assert max_diff(adapter(tmp_path / "lora-one"), adapter(tmp_path / "lora-two")) < 1e-5
