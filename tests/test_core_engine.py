"""The engine path shared by the CLI, batch files, replay and the Python API."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from studio import registry
from studio.errors import UsageError
from tests.toy_pipeline import ToyPipeline


@pytest.fixture(autouse=True)
def toy_task(monkeypatch, isolated_home):
    monkeypatch.setitem(registry.BUILTIN_TASKS, "toy", "tests.toy_pipeline:ToyPipeline")
    models = isolated_home / "models"
    models.mkdir()
    weights = isolated_home / "toy-weights"
    weights.mkdir()
    (models / "toy-model.yaml").write_text(yaml.safe_dump(
        {"name": "toy-model", "source": str(weights), "task": "toy", "default_for": ["toy"], "defaults": {"steps": 5, "width": 6}}))
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_python_api_runs_writes_and_reuses_the_loaded_pipeline(tmp_path):
    from studio import Studio

    st = Studio(device="cpu", out_dir=tmp_path / "out")
    before = ToyPipeline.loads
    first = st.toy(prompt="hello", seed=3, num_outputs=2)
    st.toy(prompt="again", seed=4)
    assert ToyPipeline.loads == before + 1  # one load per (task, model, device settings)
    assert [r.params["seed"] for r in first] == [3, 4]
    assert all(r.path.exists() for r in first)
    assert first[0].metadata["model"]["alias"] == "toy-model"
    assert first[0].metadata["device"]["resolved"]["device"] == "cpu"


def test_merge_order_card_defaults_then_preset_then_given(tmp_path, isolated_home):
    from studio import Studio

    presets = isolated_home / "presets"
    presets.mkdir()
    (presets / "wide.yaml").write_text("task: toy\nwidth: 12\nheight: 4\n")
    st = Studio(out_dir=tmp_path)
    [r] = st.run("toy", preset="wide", prompt="p", seed=1, height=3)
    assert (r.params["steps"], r.params["width"], r.params["height"]) == (5, 12, 3)
    assert r.value.size == (12, 3)


def test_unknown_parameter_names_itself_and_its_source(tmp_path, isolated_home):
    from studio import Studio

    (isolated_home / "presets").mkdir()
    (isolated_home / "presets" / "typo.yaml").write_text("task: toy\nstesp: 3\n")
    with pytest.raises(UsageError) as err:
        Studio(out_dir=tmp_path).run("toy", preset="typo", prompt="p")
    assert "stesp" in err.value.message and "typo.yaml" in err.value.message


def test_missing_seed_is_drawn_and_recorded(tmp_path):
    from studio import Studio

    [r] = Studio(out_dir=tmp_path).toy(prompt="p")
    assert isinstance(r.params["seed"], int)
    assert json.loads(r.path.with_suffix(".json").read_text())["params"]["seed"] == r.params["seed"]


def test_replay_reproduces_the_same_pixels(cli, tmp_path):
    from studio import Studio

    [r] = Studio(out_dir=tmp_path / "a").toy(prompt="replay me", seed=11)
    result = cli("replay", r.path, "--out", tmp_path / "b", "--json")
    assert result.exit_code == 0, result
    row = json.loads(result.stdout.splitlines()[0])
    assert np.array_equal(np.asarray(Image.open(row["path"])), np.asarray(Image.open(r.path)))


def test_cli_bad_input_is_one_line_exit_2_and_no_traceback(cli, tmp_path):
    from studio import Studio

    [r] = Studio(out_dir=tmp_path).toy(prompt="x", seed=1)
    sidecar = r.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["params"]["steps"] = 0
    sidecar.write_text(json.dumps(meta))
    result = cli("replay", sidecar, "--out", tmp_path / "c")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --steps must be at least 1") and "hint:" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*.png"))
    missing = cli("replay", tmp_path / "nope.png")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys, time; t=time.perf_counter()\n"
        "from typer.testing import CliRunner\nfrom studio.cli import app\n"
        "r = CliRunner()\n"
        "groups = [c.name for c in __import__('typer').main.get_command(app).commands.values()]\n"
        "for g in [[]] + [[n] for n in groups]:\n"
        "    res = r.invoke(app, g + ['--help'])\n"
        "    assert res.exit_code == 0, (g, res.output)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'numpy') if m in sys.modules]\n"
        "print(len(groups), heavy, round(time.perf_counter()-t, 3))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    n, heavy, seconds = out.stdout.split(" ", 1)[0], out.stdout.split("[", 1)[1].split("]")[0], float(out.stdout.split()[-1])
    assert heavy == "", f"--help imported {heavy}"
    assert seconds < 15.0  # every group's help in one process: ~1 s idle; generous for a loaded CI box


def test_doctor_json_tells_the_truth_about_this_machine(cli):
    import torch

    result = cli("doctor", "--json")
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    assert report["libraries"]["torch"] == torch.__version__.split("+")[0] or report["libraries"]["torch"] == torch.__version__
    assert report["auto"]["resolved"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["backends"]["offload"] is torch.cuda.is_available()
    assert report["hub"]["offline"] is True
