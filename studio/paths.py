"""Where studio keeps user data: $STUDIO_HOME (default ~/.studio) holds user presets and model
cards; the HF cache (HF_HOME / HF_HUB_CACHE) holds downloaded weights, as every HF tool expects."""

from __future__ import annotations

import os
from pathlib import Path

import studio.builtin

# The repository's presets/ folder, installed as the data package `studio.builtin` (pyproject.toml):
# shipped presets (*.yaml), model cards (models/), tag lists (tags/) and starter weights (starter/).
PACKAGE_PRESETS = Path(studio.builtin.__file__).resolve().parent


def studio_home() -> Path:
    return Path(os.environ.get("STUDIO_HOME") or Path.home() / ".studio").expanduser()


def user_presets_dir() -> Path:
    return studio_home() / "presets"


def user_models_dir() -> Path:
    return studio_home() / "models"


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    return home / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
