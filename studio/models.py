"""Model resolution: alias | hub id[@revision] | local folder | single checkpoint file -> ModelSpec.

Aliases are model cards, YAML files in presets/models/ (shipped) and $STUDIO_HOME/models/ (the
user's), e.g.

    name: sd-turbo
    source: stabilityai/sd-turbo
    task: image
    default_for: [image]           # what `--model auto` picks when its weights are here
    defaults: {steps: 1, guidance: 0.0}

A card whose source is a relative path (`starter/image`) points inside the presets package: that
is how the starter models ship. Pipelines never parse names: they get a ModelSpec and call
`from_pretrained(spec.location(), **spec.load_kwargs())`, the same code path for hub models,
cached snapshots and the tiny models tests build.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from studio.errors import ModelNotAvailable, StudioError, UsageError
from studio.paths import PACKAGE_PRESETS, hf_cache_dir, is_offline, user_models_dir
from studio.safety import check_pickle, check_remote_code, forbid_remote_code_prompt

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CARD_KEYS = {"name", "source", "task", "description", "default_for", "starter_for", "defaults", "license",
             "revision", "pipeline", "files", "params", "training", "eval", "components", "notes"}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name. Hashable: part of the loaded-pipeline cache key."""

    name: str  # what the user typed (alias, hub id, path, or "auto")
    source: str  # hub repo id, or absolute local folder / file path
    kind: str  # "hub" | "folder" | "file"
    revision: str | None = None  # hub revision (branch, tag or commit)
    task: str | None = None  # the card's task, when an alias names one
    alias: str | None = None  # the card's name, when resolved through a card
    allow_pickle: bool = False  # allow .bin/.ckpt weights (pickle can run code)
    trust_remote_code: bool = False  # allow hub repos' own modelling code
    offline: bool = False  # never reach the hub
    notice: str | None = field(default=None, compare=False)  # one line to tell the user (auto picks)
    card: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_local(self) -> bool:
        return self.kind in ("folder", "file")

    def location(self) -> str:
        """What `from_pretrained` gets: a local path, or the hub id (online). Offline, a hub id
        becomes its cached snapshot folder, or a clear error naming the fix. A local path that
        holds a pickle is refused here, the one door every loader takes (unless --allow-pickle);
        online, `use_safetensors` keeps the libraries from fetching pickles."""
        label = f"model {self.alias or ''}".strip() if self.is_local else f"model {self.alias or self.source}"
        if self.is_local:
            folder = Path(self.source)
        elif self.offline or is_offline():
            folder = cached_snapshot(self)
        else:
            return self.source
        check_pickle(folder, allow_pickle=self.allow_pickle, what=label)
        if folder.is_dir():
            check_remote_code(folder, trust_remote_code=self.trust_remote_code, what=label)
        return str(folder)

    def load_kwargs(self, *, library: str = "transformers") -> dict[str, Any]:
        """Safe defaults for from_pretrained: safetensors only, no remote code, pinned revision.

        `trust_remote_code` is always there, False unless --trust-remote-code: left unset,
        transformers asks on stdin and `echo y |` would answer. library="diffusers-model" is for
        diffusers' ModelMixin classes (UNet, ControlNet, MotionAdapter): they have no remote-code
        path and warn about the unknown argument, so it is left out there."""
        forbid_remote_code_prompt()
        kwargs: dict[str, Any] = {}
        if not self.allow_pickle:
            kwargs["use_safetensors"] = True
        if self.revision and not self.is_local and not (self.offline or is_offline()):
            kwargs["revision"] = self.revision
        if library != "diffusers-model":
            kwargs["trust_remote_code"] = bool(self.trust_remote_code)
        return kwargs

    def config_kwargs(self) -> dict[str, Any]:
        """For AutoConfig / AutoTokenizer / AutoProcessor: revision and an explicit trust_remote_code."""
        return {k: v for k, v in self.load_kwargs().items() if k in ("revision", "trust_remote_code")}

    def identity(self) -> dict[str, Any]:
        """How outputs record the model: enough to find the same weights again."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "kind": self.kind}
        if self.alias:
            out["alias"] = self.alias
        if self.kind == "hub":
            out["revision"] = self.revision or "main"
            with contextlib.suppress(Exception):
                out["commit"] = Path(cached_snapshot(self)).name
        elif self.kind == "file":
            out["sha256"] = file_sha256(Path(self.source))
        return out


def file_sha256(path: Path, _cache: dict = {}) -> str:
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def cached_snapshot(spec: ModelSpec) -> Path:
    """The local snapshot folder of a hub model, or ModelNotAvailable naming alias, id and fix."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, or a cache without this revision
        label = f"{spec.alias} ({spec.source})" if spec.alias else spec.source
        raise ModelNotAvailable(
            f"model {label} is not in the local cache ({hf_cache_dir()}) and studio is offline",
            f"run `studio models pull {spec.alias or spec.source}` with network access, "
            "or pass a local folder with --model",
        ) from exc


# ---------------------------------------------------------------------------- model cards
def _card_files() -> Iterator[Path]:
    for folder in (PACKAGE_PRESETS / "models", user_models_dir()):
        if folder.is_dir():
            yield from sorted(folder.glob("*.yaml"))


_CARDS_CACHE: dict[tuple, dict[str, dict[str, Any]]] = {}


def load_cards() -> dict[str, dict[str, Any]]:
    """All model cards by name; the user's cards override shipped ones of the same name. Parsed
    once per set of files (path, mtime, size): every Engine.run resolves a model, and re-reading
    every card each time cost ~0.1 s per image in a batch."""
    files = list(_card_files())
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    if key not in _CARDS_CACHE:
        _CARDS_CACHE.clear()
        _CARDS_CACHE[key] = _parse_cards(files)
    return {name: dict(card) for name, card in _CARDS_CACHE[key].items()}  # callers may edit their copy


def _parse_cards(files: list[Path]) -> dict[str, dict[str, Any]]:
    import yaml

    cards: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml: every resolve reads all cards
        except yaml.YAMLError as exc:
            raise UsageError(f"model card {path} is not valid YAML: {exc}".splitlines()[0], "fix or remove the file")
        if not isinstance(data, dict) or "source" not in data:
            raise UsageError(f"model card {path} has no `source`", "add `source: org/name` or a folder path")
        unknown = set(data) - CARD_KEYS
        if unknown:
            raise UsageError(f"model card {path}: unknown key {sorted(unknown)[0]!r}",
                             f"allowed keys: {', '.join(sorted(CARD_KEYS))}")
        name = data.setdefault("name", path.stem)
        data["_path"] = str(path)
        cards[name] = data
    return cards


def _card_source(card: dict[str, Any]) -> tuple[str, str]:
    """(kind, source) of a card: relative paths are inside the presets package."""
    source = str(card["source"])
    base = Path(card["_path"]).parent.parent if card.get("_path") else PACKAGE_PRESETS
    if source.startswith(("./", "../", "/", "~")) or (base / source).exists() or source.startswith("starter/"):
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = (base / source).resolve()
        return ("file" if path.suffix in CHECKPOINT_SUFFIXES else "folder"), str(path)
    return "hub", source


def is_available(spec: ModelSpec) -> bool:
    """True when the weights are on this machine (local path, or a cached hub snapshot)."""
    if spec.is_local:
        return Path(spec.source).exists()
    try:
        cached_snapshot(spec)
        return True
    except ModelNotAvailable:
        return False


def resolve(name: str, *, task: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False, offline: bool | None = None) -> ModelSpec:
    """Turn what the user typed into a ModelSpec, or a UsageError saying what would work."""
    offline = is_offline() if offline is None else offline
    common = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, offline=offline)
    name = (name or "auto").strip()

    if name == "auto":
        return _resolve_auto(task, common)

    cards = load_cards()
    base_name, _, revision = name.partition("@")
    if base_name in cards:
        card = cards[base_name]
        kind, source = _card_source(card)
        if kind != "hub" and not Path(source).exists():
            raise ModelNotAvailable(f"model {base_name}: its weights are not at {source}",
                                    f"train them with `studio train starter {base_name.removeprefix('starter-')}`"
                                    if base_name.startswith("starter-") else "fix the card's source")
        _check_task(base_name, card.get("task"), task)
        return ModelSpec(name=name, source=source, kind=kind, revision=revision or card.get("revision"),
                         task=card.get("task"), alias=base_name, card=card, **common)

    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            check_pickle(path, allow_pickle=allow_pickle)  # now, not after minutes of other work
            return ModelSpec(name=name, source=str(path), kind="folder", task=task, **common)
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise UsageError(f"{name} is not a model folder or checkpoint file",
                             f"expected a folder or a file ending in {', '.join(CHECKPOINT_SUFFIXES)}")
        check_pickle(path, allow_pickle=allow_pickle)
        return ModelSpec(name=name, source=str(path), kind="file", task=task, **common)
    if name.startswith(("./", "../", "/", "~")) or name.endswith(CHECKPOINT_SUFFIXES):
        raise UsageError(f"model path {name} does not exist", "check the path")
    if HUB_ID.match(base_name):
        return ModelSpec(name=name, source=base_name, kind="hub", revision=revision or None, task=task, **common)
    known = ", ".join(sorted(n for n, c in cards.items() if task is None or c.get("task") == task)) or "none"
    raise UsageError(f"unknown model {name!r}",
                     f"use an alias ({known}), a hub id like org/name[@revision], or a local folder; "
                     "`studio models list` shows the aliases")


def _check_task(alias: str, card_task: str | None, task: str | None) -> None:
    if task and card_task and card_task != task and not _compatible(card_task, task):
        raise UsageError(f"model {alias} is a {card_task} model, not a {task} model",
                         f"pick a {task} model: `studio models list --task {task}`")


def _compatible(card_task: str, task: str) -> bool:
    # a text-to-image model also serves img2img/inpaint/control/video bases
    families = [{"image", "control", "video"}, {"caption", "vqa"}]
    return any(card_task in f and task in f for f in families)


def _resolve_auto(task: str | None, common: dict[str, Any]) -> ModelSpec:
    if not task:
        raise UsageError("--model auto needs a task", "name a model with --model")
    cards = load_cards()
    default = next((c for c in cards.values() if task in (c.get("default_for") or [])), None)
    starter = next((c for c in cards.values() if task in (c.get("starter_for") or [])), None)
    candidates = []
    if default:
        kind, source = _card_source(default)
        candidates.append(ModelSpec(name=default["name"], source=source, kind=kind, revision=default.get("revision"),
                                    task=default.get("task"), alias=default["name"], card=default, **common))
    default_spec = candidates[0] if candidates else None
    if default_spec and (not common["offline"] or is_available(default_spec)):
        return default_spec
    if starter:
        kind, source = _card_source(starter)
        if Path(source).exists():
            why = (f"{default_spec.alias} is not in the local cache and studio is offline" if default_spec
                   else f"no default {task} model is set")
            return ModelSpec(name=starter["name"], source=source, kind=kind, task=starter.get("task"),
                             alias=starter["name"], card=starter,
                             notice=f"using {starter['name']} ({why}); pass --model to choose", **common)
    if default_spec:
        cached_snapshot(default_spec)  # raises the offline error naming the fix
    raise ModelNotAvailable(f"no model available for {task}", "pass --model (an alias, hub id or local folder)")


@contextlib.contextmanager
def loading(spec: ModelSpec, what: str = "model") -> Iterator[None]:
    """Turn library load errors into one-line StudioErrors that say what to do."""
    forbid_remote_code_prompt()  # the libraries are imported by now
    try:
        yield
    except StudioError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        label = spec.alias or spec.name
        if "safetensors" in text.lower() and not spec.allow_pickle:
            raise UsageError(f"{label} has no .safetensors weights (only pickle files)",
                             "pass --allow-pickle if you trust the source") from exc
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):  # transformers says so on a later line
            raise UsageError(f"{label} needs its own modelling code", "pass --trust-remote-code if you trust it") from exc
        if spec.kind == "hub" and isinstance(exc, OSError):
            raise ModelNotAvailable(f"could not load {what} {label} from the hub: {text}",
                                    f"check the id and your network, or `studio models pull {label}`") from exc
        raise UsageError(f"could not load {what} from {spec.source}: {text}",
                         f"is this a {spec.task or 'matching'} model? `studio models info {spec.name}` shows what it is") from exc


def pull(spec: ModelSpec, allow_patterns: list[str] | None = None) -> Path:
    """Download a hub model into the HF cache (safetensors and configs only unless pickle is allowed)."""
    if spec.is_local:
        return Path(spec.source)
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or (["*.json", "*.txt", "*.model", "*.safetensors", "*.yaml", "*.py" if spec.trust_remote_code else "*.json"]
                                  + (["*.bin", "*.ckpt", "*.pt"] if spec.allow_pickle else []))
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ModelNotAvailable("studio is offline (HF_HUB_OFFLINE is set)", "unset HF_HUB_OFFLINE to download")
    return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=patterns))
