"""What a downloaded model may do when studio loads it: no pickle, no remote code, unless asked.

One pickle gate for every task: `check_pickle(path, allow_pickle=...)` refuses a weights file, a
model folder (every file in it, subfolders too: a decoy .safetensors beside a pickle .bin is
still refused), an adapter folder or a training checkpoint that holds a pickle, before any
library opens it. Unpickling runs whatever the file names (`__reduce__`): torch's
`weights_only=True` narrows that, but studio does not lean on a library default it does not
control. A file is a pickle by its name (.bin, .pt, .pth, .ckpt, .pkl, ...: what torch.load,
diffusers' and transformers' .bin fallbacks and open_clip read) or by its first bytes (a pickle
protocol header, or a zip holding data.pkl: torch.save's format under any name).

Remote code: transformers asks on stdin whether to run a repository's own code when
`trust_remote_code` is left unset, so `echo y | studio ...` would run it. Loads pass
`trust_remote_code` explicitly (ModelSpec.load_kwargs), and `forbid_remote_code_prompt()` turns
that question into an error for loads studio does not call itself (open_clip's Hugging Face
text towers call AutoConfig/AutoModel without the argument).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from studio.errors import UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
ALLOW_HINT = ("studio loads .safetensors only: convert them (or delete them where a .safetensors copy is there), "
              "or pass --allow-pickle if you trust the source")


class PickleRefused(UsageError):
    """A model, adapter or checkpoint holds pickle files and --allow-pickle was not passed. Exits 2."""


def is_pickle(path: Path) -> bool:
    """True when loading `path` could unpickle it: by its suffix, or by its first bytes."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 (legacy torch.save)
        return True
    if head == b"PK\x03\x04":  # torch.save's zip: archive/data.pkl
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return False


def pickle_files(path: Path) -> list[Path]:
    """The pickle files a loader could open at `path` (a file, or every file under a folder)."""
    path = Path(path)
    if path.is_file():
        return [path] if is_pickle(path) else []
    if not path.is_dir():
        return []
    found = []
    for base, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in (".git", ".cache")]  # VCS and download bookkeeping, never loaded
        found += [Path(base) / name for name in sorted(files) if is_pickle(Path(base) / name)]
    return found


def check_pickle(path: Path | str, *, allow_pickle: bool, what: str = "model") -> None:
    """Refuse (exit 2, naming --allow-pickle) unless `path` holds no pickle or the user allowed it."""
    if allow_pickle:
        return
    path = Path(path)
    found = pickle_files(path)
    if not found:
        return
    names = ", ".join(str(p.relative_to(path)) if p != path else p.name for p in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    where = f"{what} {path}" if path.is_dir() else f"{what} file"
    raise PickleRefused(f"{where}: {names}{more} {'is a pickle' if len(found) == 1 else 'are pickles'}, "
                        "which can run code when loaded", ALLOW_HINT)


def check_remote_code(folder: Path | str, *, trust_remote_code: bool, what: str = "model") -> None:
    """Refuse (exit 2, naming --trust-remote-code) a transformers folder that can only load by
    running its own code: an `auto_map` in config.json for a model_type transformers does not
    know. (For a type it knows, transformers uses its own classes when trust_remote_code is
    False, and nothing of the folder's runs.) Said before any library call, so the user reads
    what to pass instead of the library's error about a tokenizer it then failed to build."""
    import json

    if trust_remote_code:
        return
    config = Path(folder) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not auto_map or not isinstance(auto_map, dict):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if data.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    refs = [v if isinstance(v, str) else next((x for x in v if x), "") for v in auto_map.values()]
    modules = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if r})
    raise UsageError(f"{what} {folder} runs its own code when loaded ({', '.join(modules) or 'auto_map'} "
                     f"for model type {data.get('model_type')!r}), which studio does not run unless asked",
                     "pass --trust-remote-code if you trust the source and have read that code")


def forbid_remote_code_prompt() -> None:
    """Make transformers (and diffusers) raise instead of asking on stdin whether to run a
    repository's code when a load leaves trust_remote_code unset: their TIME_OUT_REMOTE_CODE = 0
    is the switch their own CI uses for that. Loads that pass trust_remote_code=True still run it.
    Only libraries already imported are touched (a load imports its library first), so a
    transformers load does not pay for importing diffusers."""
    import importlib
    import sys

    for name in ("transformers.dynamic_module_utils", "diffusers.utils.dynamic_modules_utils"):
        if name.split(".")[0] not in sys.modules:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "TIME_OUT_REMOTE_CODE"):
            module.TIME_OUT_REMOTE_CODE = 0
