"""Model resolution: aliases from cards, hub ids with revisions, local folders and files, the
offline error, safetensors-only loading, and the `auto` fallback to a starter model."""

import pytest

from studio import models
from studio.errors import ModelNotAvailable, UsageError


def write_card(home, name, **fields):
    import yaml

    folder = home / "models"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **fields}))


def test_alias_resolves_through_a_user_card(isolated_home):
    write_card(isolated_home, "my-sd", source="someorg/some-sd", task="image", defaults={"steps": 3})
    spec = models.resolve("my-sd@v2", task="image")
    assert (spec.kind, spec.source, spec.revision, spec.alias) == ("hub", "someorg/some-sd", "v2", "my-sd")
    assert spec.card["defaults"] == {"steps": 3}


def test_card_with_unknown_key_is_rejected_naming_it(isolated_home):
    write_card(isolated_home, "bad", source="a/b", tsak="image")
    with pytest.raises(UsageError, match="tsak"):
        models.resolve("bad")


def test_hub_id_with_revision_and_safe_load_kwargs():
    spec = models.resolve("org/model@abc123", task="image", offline=False)
    assert spec.kind == "hub" and spec.revision == "abc123"
    # offline env in tests drops revision; trust_remote_code is always said (unset, transformers asks on stdin)
    assert spec.load_kwargs() == {"use_safetensors": True, "trust_remote_code": False}
    assert spec.load_kwargs(library="diffusers-model") == {"use_safetensors": True}  # ModelMixin has no remote code
    assert models.resolve("org/model", allow_pickle=True, trust_remote_code=True).load_kwargs() == {"trust_remote_code": True}


def test_local_folder_and_checkpoint_files(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert models.resolve(str(folder)).kind == "folder"
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    assert models.resolve(str(ckpt)).kind == "file"
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(UsageError, match="pickle"):
        models.resolve(str(pickled))
    assert models.resolve(str(pickled), allow_pickle=True).kind == "file"


def test_missing_path_and_unknown_name_say_what_would_work():
    with pytest.raises(UsageError, match="does not exist"):
        models.resolve("./nowhere")
    with pytest.raises(UsageError) as err:
        models.resolve("not a model name!", task="image")
    assert "studio models list" in err.value.hint


def test_offline_hub_model_not_in_cache_names_alias_id_and_fix(isolated_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    write_card(isolated_home, "big-sd", source="someorg/big-sd", task="image")
    spec = models.resolve("big-sd", offline=True)
    with pytest.raises(ModelNotAvailable) as err:
        spec.location()
    assert "big-sd" in err.value.message and "someorg/big-sd" in err.value.message
    assert "studio models pull big-sd" in err.value.hint


def test_auto_falls_back_to_the_starter_with_a_notice(isolated_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    starter = tmp_path / "starter-weights"
    starter.mkdir()
    write_card(isolated_home, "zz-default", source="someorg/default", task="toy", default_for=["toy"])
    write_card(isolated_home, "zz-starter", source=str(starter), task="toy", starter_for=["toy"])
    spec = models.resolve("auto", task="toy", offline=True)
    assert spec.alias == "zz-starter" and spec.source == str(starter)
    assert "zz-default" in spec.notice and "offline" in spec.notice
    # online, the real default wins
    assert models.resolve("auto", task="toy", offline=False).alias == "zz-default"


def test_loading_turns_library_errors_into_clean_errors(tmp_path):
    spec = models.resolve(str(tmp_path))
    with pytest.raises(UsageError) as err:
        with models.loading(spec):
            raise OSError("Error no file named diffusion_pytorch_model.safetensors found in directory")
    assert "safetensors" in err.value.message and "--allow-pickle" in err.value.hint
