"""Presets: validated YAML defaults for one task (studio/presets.py, `studio presets`, `--preset`).

Uses the core's toy task (tests/toy_pipeline.py) through the real registry, so what is tested is
the preset path itself: file:line errors, merge order, --save-preset round trips, and that every
preset shipped in presets/ is valid against the pipeline it is for.
"""

import json

import pytest
import yaml
from PIL import Image

from studio import presets, registry
from studio.errors import UsageError
from studio.paths import PACKAGE_PRESETS


@pytest.fixture
def toy(monkeypatch, isolated_home, tmp_path):
    monkeypatch.setitem(registry.BUILTIN_TASKS, "toy", "tests.toy_pipeline:ToyPipeline")
    weights = tmp_path / "toy-weights"
    weights.mkdir()
    registry.clear_cache()
    (isolated_home / "presets").mkdir()
    yield weights
    registry.clear_cache()


def user_preset(home, name: str, text: str):
    path = home / "presets" / f"{name}.yaml"
    path.write_text(text)
    return path


BAD = {
    # text, what the message says, line
    "unknown key": ("task: toy\ndescription: d\nwidht: 3\n", "unknown key 'widht'", 3),
    "suggestion": ("task: toy\nstesp: 2\n", "did you mean 'steps'", 2),
    "wrong type": ("task: toy\nsteps: many\n", "steps: Input should be a valid integer", 2),
    "bad precision": ("task: toy\nprecision: fp64\n", "precision: Input should be", 2),
    "bad device": ("task: toy\ndevice: gpu\n", "unknown device 'gpu'", 2),
    "compile not bool": ("task: toy\ncompile: maybe\n", "compile: Input should be a valid boolean", 2),
    "duplicate": ("task: toy\nwidth: 3\nheight: 2\nwidth: 4\n", "duplicate key 'width'", 4),
    "syntax": ("task: toy\nwidth: [3\nheight: 2\n", "not valid YAML", 3),
    "no task": ("width: 3\n", "has no `task:`", None),
    "unknown task": ("task: paint\nwidth: 3\n", "unknown task 'paint'", 1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_presets_name_the_key_and_the_file_line(toy, isolated_home, case):
    text, says, line = BAD[case]
    path = user_preset(isolated_home, "bad", text)
    with pytest.raises(UsageError) as err:
        presets.read_preset("bad")
    assert says in str(err.value), str(err.value)
    if line is not None:
        assert f"{path}:{line}" in err.value.message


def test_cli_show_of_a_bad_preset_exits_2_with_the_line(toy, isolated_home, cli):
    user_preset(isolated_home, "typo", "task: toy\nsteps: 2\nwidht: 3\n")
    result = cli("presets", "show", "typo")
    assert result.exit_code == 2
    assert "unknown key 'widht'" in result.stderr and "typo.yaml:3" in result.stderr and "hint:" in result.stderr
    assert cli("presets", "show", "nope").stderr.startswith("error: unknown preset 'nope'")


def test_preset_values_sit_between_card_defaults_and_flags_device_keys_included(toy, isolated_home, tmp_path):
    from studio import Studio

    user_preset(isolated_home, "wide", f"task: toy\nmodel: {toy}\nwidth: 12\nheight: 4\nsteps: 3\nprecision: bf16\n")
    st = Studio(out_dir=tmp_path / "out")
    [r] = st.run("toy", preset="wide", prompt="p", seed=1, height=3)
    assert (r.params["width"], r.params["height"], r.params["steps"]) == (12, 3, 3)
    assert Image.open(r.path).size == (12, 3)
    assert r.metadata["device"]["requested"]["precision"] == "bf16"  # a preset's device key applies
    flags = Studio(out_dir=tmp_path / "out2", precision="fp32")
    [r2] = flags.run("toy", preset="wide", prompt="p", seed=1)
    assert r2.metadata["device"]["requested"]["precision"] == "fp32"  # and a flag beats it


def test_a_preset_for_another_task_is_refused(toy, isolated_home):
    user_preset(isolated_home, "imagey", "task: image\nsteps: 3\n")
    with pytest.raises(UsageError, match="is for image, not toy"):
        presets.load_preset("imagey", "toy")


def test_save_preset_round_trips_through_the_cli_flags(toy, isolated_home, tmp_path):
    from studio.engine import Engine, RunOptions

    options = RunOptions(out_dir=tmp_path / "out", quiet=True, save_preset="mine",
                         device={"precision": "bf16", "device": None})
    Engine(options).run("toy", {"prompt": "x", "seed": 4, "width": 5, "model": str(toy)})
    saved = yaml.safe_load((isolated_home / "presets" / "mine.yaml").read_text())
    assert saved == {"task": "toy", "prompt": "x", "width": 5, "model": str(toy), "precision": "bf16"}
    assert "seed" not in saved  # a preset is for many runs, not one
    loaded = presets.load_preset("mine", "toy")
    assert loaded["width"] == 5 and loaded["precision"] == "bf16"
    again = RunOptions(out_dir=tmp_path / "out", quiet=True, save_preset="mine")
    with pytest.raises(UsageError, match="exists"):  # never silently replaced
        Engine(again).run("toy", {"prompt": "y", "model": str(toy)})


def test_presets_list_and_show_cover_built_in_and_user_presets(toy, isolated_home, cli):
    user_preset(isolated_home, "sd-turbo-fast", "task: image\ndescription: my own turbo\nsteps: 2\n")
    user_preset(isolated_home, "mine", "task: toy\ndescription: a toy preset\nwidth: 3\n")
    result = cli("presets", "list", "--json")
    assert result.exit_code == 0, result
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert {"sd-turbo-fast", "sdxl-quality", "musicgen-small", "animatediff-8f", "mine"} <= set(rows)
    assert rows["sd-turbo-fast"]["source"] == "user" and rows["sd-turbo-fast"]["description"] == "my own turbo"
    assert rows["sdxl-quality"]["source"] == "built-in" and rows["sdxl-quality"]["task"] == "image"
    only = cli("presets", "list", "--task", "music-audio", "--json")
    assert {json.loads(line)["task"] for line in only.stdout.splitlines()} == {"music-audio"}
    shown = cli("presets", "show", "mine")
    assert shown.exit_code == 0 and "description: a toy preset" in shown.stdout and "mine.yaml" in shown.stdout
    as_json = json.loads(cli("presets", "show", "mine", "--json").stdout)
    assert as_json["task"] == "toy" and as_json["params"] == {"width": 3}


SHIPPED = sorted(PACKAGE_PRESETS.glob("*.yaml"))


def test_the_required_built_in_presets_ship():
    assert {"sd-turbo-fast", "sdxl-quality", "musicgen-small", "animatediff-8f"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_preset_is_valid_for_its_pipeline_and_names_a_known_model(path):
    from studio import models

    data = yaml.safe_load(path.read_text())
    assert data.get("description"), "a shipped preset says what it is for"
    try:
        registry.pipeline_class(data["task"])
    except ImportError as exc:  # a pipeline not in this build yet: its fixed keys are still checked
        presets.read_preset(path, check_task_params=False)
        pytest.skip(f"{data['task']} pipeline not importable: {exc}")
    preset = presets.read_preset(path)
    if preset.params.get("model"):
        spec = models.resolve(preset.params["model"], task=preset.task, offline=True)
        assert spec.alias == preset.params["model"]  # a model card, not a typo that looks like a hub id
