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
import functools
import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from studio.errors import ModelNotAvailable, StudioError, UsageError
from studio.paths import PACKAGE_PRESETS, hf_cache_dir, is_offline, user_models_dir
from studio.safety import check_pickle, check_remote_code, forbid_remote_code_prompt

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HUB_PROBE_SECONDS = 1.5  # one HTTP request; without network the libraries retry for ~40 s instead
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
        if library.startswith("diffusers") and self.kind != "file":
            # load what `models pull` fetched: its fp16 variant where only that is here
            with contextlib.suppress(ModelNotAvailable):
                folder = self.source if self.is_local else (cached_snapshot(self) if self.kind == "hub" else None)
                if folder and (variant := cached_variant(folder)):
                    kwargs["variant"] = variant
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


_PROBES: dict[str, tuple[bool, float]] = {}  # endpoint -> (answer, when asked)
PROBE_KEEP_SECONDS = 300.0  # a long-lived process (studio serve) asks again after this


def hub_endpoint() -> str:
    """The hub the libraries talk to (HF_ENDPOINT, read when huggingface_hub is imported)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers one HTTP request within `timeout`, asked once per process (again
    after PROBE_KEEP_SECONDS, for a server that outlives a network outage).

    Without network, huggingface_hub retries each request with backoff (about 40 s before
    `studio image` failed); one short request, no retries, tells the same in at most `timeout`.
    Any HTTP answer counts (a mirror may 404 on /); a refused or timed-out connection, a failed
    name lookup or TLS handshake (a captive portal) does not. It goes through huggingface_hub's
    own HTTP client, so proxies and a custom client factory apply as they will to the download;
    it runs in a daemon thread because name resolution has no timeout of its own."""
    import threading
    import time

    endpoint = hub_endpoint()
    known = _PROBES.get(endpoint)
    if known is None or time.monotonic() - known[1] > PROBE_KEEP_SECONDS:
        from huggingface_hub.utils import get_session

        session = get_session()  # imported and built before the clock starts: a slow import is not "offline"
        answer: list[bool] = []

        def ask() -> None:
            try:
                session.head(endpoint, timeout=timeout, follow_redirects=False)
                answer.append(True)
            except Exception:  # httpx's ConnectError, TimeoutException, SSL errors, ...
                answer.append(False)

        thread = threading.Thread(target=ask, name="studio-hub-probe", daemon=True)
        thread.start()
        thread.join(timeout)
        _PROBES[endpoint] = (bool(answer and answer[0]), time.monotonic())
    return _PROBES[endpoint][0]


def _unreachable(spec: "ModelSpec") -> ModelNotAvailable:
    label = f"{spec.alias} ({spec.source})" if spec.alias else spec.source
    return ModelNotAvailable(
        f"model {label} is not in the local cache ({hf_cache_dir()}) and the hub ({hub_endpoint()}) cannot be reached",
        f"run `studio models pull {spec.alias or spec.source}` where there is network access, "
        "or pass a local folder with --model")


def _check_hub(spec: "ModelSpec") -> "ModelSpec":
    """An online hub spec, checked once against the network: reachable, it is returned as it is;
    unreachable, it runs from the cache (offline from here on, no retries), or it is an error
    naming `studio models pull` when the cache does not hold it."""
    if spec.kind != "hub" or spec.offline or is_offline() or hub_reachable():
        return spec
    cached = replace(spec, offline=True)
    if not is_available(cached):
        raise _unreachable(spec)
    return cached


def cached_variant(folder: str | Path) -> str | None:
    """"fp16" when a diffusers model folder (or cached snapshot) holds some component only in
    its fp16 variant, as `studio models pull` leaves it on a GPU machine: loading it without
    variant="fp16" would look for the fp32 files it does not have (and fetch them, online)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    by_component: dict[Path, set[bool]] = {}
    for weight in folder.rglob("*.safetensors"):
        if weight.parent != folder and weight.parent.parent != folder:
            continue
        is_variant = bool(_VARIANT_WEIGHT.fullmatch(weight.name))
        if is_variant or _PLAIN_WEIGHT.fullmatch(weight.name):
            by_component.setdefault(weight.parent, set()).add(is_variant)
    return "fp16" if any(kinds == {True} for kinds in by_component.values()) else None


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
        # huggingface_hub >= 1.x calls a snapshot "incomplete" unless it holds every file of the
        # repo; `models pull` fetches only what loads (one variant, no pickles), so a partial
        # snapshot is the normal case: the loader names any file that is really missing
        partial = getattr(exc, "snapshot_path", None)
        if partial and Path(partial).is_dir():
            return Path(partial)
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


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=1024)
def _parse_card(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """One card, parsed once per version of its file in a process. Read through yamlfile.read_yaml,
    bounded like every YAML studio reads (size, alias expansion, nesting): a user's card is as
    untrusted as a batch file, and cards are read on every resolve. ~1.2 ms a card here (plain
    libyaml: 0.5 ms), so a resolve parses only the card it needs (resolve, _cards_for)."""
    from studio.yamlfile import read_yaml

    file = Path(path)
    try:
        data = read_yaml(file).data or {}
    except UsageError as exc:
        raise UsageError(f"model card {exc.message}", "fix or remove the file") from exc
    if not isinstance(data, dict) or "source" not in data:
        raise UsageError(f"model card {file} has no `source`", "add `source: org/name` or a folder path")
    unknown = set(data) - CARD_KEYS
    if unknown:
        raise UsageError(f"model card {file}: unknown key {sorted(unknown)[0]!r}",
                         f"allowed keys: {', '.join(sorted(CARD_KEYS))}")
    data.setdefault("name", file.stem)
    data["_path"] = str(file)
    return data


def _card(path: Path) -> dict[str, Any]:
    """The parsed card at `path`, a copy the caller may edit."""
    return dict(_parse_card(*_stat_key(path)))


# a card's own top-level `name:` (a plain scalar, optionally quoted); other spellings are parsed
_NAME_LINE = re.compile(r"^name:[ \t]*(?:\"([^\"\n]+)\"|'([^'\n]+)'|([^\s#'\"][^#\n]*?))[ \t]*(?:#.*)?$", re.M)
_INDEX: dict[tuple, tuple[dict[str, Path], dict[Path, str]]] = {}


def _card_index() -> tuple[dict[str, Path], dict[Path, str]]:
    """(name -> card file, the user's overriding shipped ones of the same name; file -> its text)
    without parsing YAML: a card's name is its top-level `name:` line, else its file stem. Built
    once per set of card files in a process."""
    files = list(_card_files())
    key = tuple(_stat_key(p) for p in files)
    if key not in _INDEX:
        names: dict[str, Path] = {}
        texts: dict[Path, str] = {}
        for path in files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            texts[path] = text
            found = _NAME_LINE.search(text)
            if found:
                name = next(g for g in found.groups() if g)
            elif re.search(r"^name\s*:", text, re.M) or re.search(r"^[{\[]", text.lstrip(), re.M):
                name = str(_card(path)["name"])  # an unusual spelling (flow style, a block scalar): parse it
            else:
                name = path.stem
            names[name] = path
        _INDEX.clear()
        _INDEX[key] = (names, texts)
    return _INDEX[key]


def find_card(name: str) -> dict[str, Any] | None:
    """The card called `name` (a copy), parsing that card's file alone; None when there is none."""
    path = _card_index()[0].get(name)
    if path is None:
        return None
    data = _card(path)
    return data if data.get("name") == name else load_cards().get(name)


def load_cards() -> dict[str, dict[str, Any]]:
    """All model cards by name; the user's cards override shipped ones of the same name. Each file
    is parsed once per version in a process (every Engine.run resolves a model; re-reading every
    card each time cost ~0.1 s per image in a batch)."""
    cards: dict[str, dict[str, Any]] = {}
    for path in _card_index()[0].values():
        data = _card(path)
        cards[str(data["name"])] = data
    return cards


def _cards_for(key: str, task: str) -> list[dict[str, Any]]:
    """Cards whose `key` (default_for / starter_for) lists `task`, parsing only the files that
    mention `key` at all (a handful of the shipped cards)."""
    names, texts = _card_index()
    out = []
    for path in names.values():
        if key in texts.get(path, ""):
            data = _card(path)
            if task in (data.get(key) or []):
                out.append(data)
    return out


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
            trust_remote_code: bool = False, offline: bool | None = None, check_hub: bool = True) -> ModelSpec:
    """Turn what the user typed into a ModelSpec, or a UsageError saying what would work.

    Online, a hub model is checked against the network once per process (`hub_reachable`):
    unreachable, it runs from the cache, or is an error naming `studio models pull`; `auto` falls
    back to the starter instead. check_hub=False leaves that to the caller (`models pull`)."""
    spec = _resolve(name, task=task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, offline=offline)
    return _check_hub(spec) if check_hub else spec


def _resolve(name: str, *, task: str | None, allow_pickle: bool, trust_remote_code: bool,
             offline: bool | None) -> ModelSpec:
    offline = is_offline() if offline is None else offline
    common = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, offline=offline)
    name = (name or "auto").strip()

    if name == "auto":
        return _resolve_auto(task, common)

    base_name, _, revision = name.partition("@")
    card = find_card(base_name)  # this card's file alone is parsed
    if card is not None:
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
    known = ", ".join(sorted(n for n, c in load_cards().items() if task is None or c.get("task") == task)) or "none"
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
    default = next(iter(_cards_for("default_for", task)), None)
    starter = next(iter(_cards_for("starter_for", task)), None)
    candidates = []
    if default:
        kind, source = _card_source(default)
        candidates.append(ModelSpec(name=default["name"], source=source, kind=kind, revision=default.get("revision"),
                                    task=default.get("task"), alias=default["name"], card=default, **common))
    default_spec = candidates[0] if candidates else None
    unreachable = False
    if default_spec:
        if common["offline"]:
            if is_available(default_spec):
                return default_spec
        elif default_spec.kind != "hub" or is_offline() or hub_reachable():  # HF_HUB_OFFLINE: no probe either
            return default_spec
        else:  # online, but the hub does not answer: the cache, else the starter
            unreachable = True
            cached = replace(default_spec, offline=True)
            if is_available(cached):
                return cached
    if starter:
        kind, source = _card_source(starter)
        if Path(source).exists():
            why = (f"{default_spec.alias} is not in the local cache and the hub ({hub_endpoint()}) cannot be reached"
                   if unreachable else
                   f"{default_spec.alias} is not in the local cache and studio is offline" if default_spec
                   else f"no default {task} model is set")
            return ModelSpec(name=starter["name"], source=source, kind=kind, task=starter.get("task"),
                             alias=starter["name"], card=starter,
                             notice=f"using {starter['name']} ({why}); pass --model to choose", **common)
    if default_spec:
        if unreachable:
            raise _unreachable(default_spec)
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


# ---------------------------------------------------------------------------- pulling
# weight file names diffusers and transformers load (diffusers' pipeline_loading_utils uses the same)
_WEIGHT_PREFIX = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_SHARD = r"-\d{5}-of-\d{5}"
_PLAIN_WEIGHT = re.compile(rf"{_WEIGHT_PREFIX}(?:{_SHARD})?\.(?:safetensors|bin)")


def _variant_re(variant: str) -> re.Pattern:
    """`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`, and the legacy
    `model-00001-of-00002.fp16.safetensors`, as diffusers matches them."""
    v = re.escape(variant)
    return re.compile(rf"{_WEIGHT_PREFIX}\.{v}(?:{_SHARD})?\.(?:safetensors|bin)|{_WEIGHT_PREFIX}{_SHARD}\.{v}\.(?:safetensors|bin)")


_VARIANT_WEIGHT = _variant_re("fp16")
# root files a diffusers pipeline download takes besides model_index.json (diffusers' constants)
_DIFFUSERS_ROOT = ("model_index.json", "config.json", "scheduler_config.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json",
                   "tokenizer.json", "tokenizer_config.json")
# root files transformers and open_clip read besides weights: configs, tokenizers, processors
_TEXT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_OTHER_FORMATS = (".bin", ".msgpack", ".onnx", ".pb", ".h5", ".ckpt", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class PullPlan:
    """What `studio models pull` fetches from one repo: the files one load of it reads."""

    layout: str  # diffusers-pipeline | diffusers-model | transformers | open_clip | card
    variant: str | None  # the weights' variant ("fp16") or None for the plain files
    files: tuple[tuple[str, int | None], ...]  # (path in the repo, size in bytes) to fetch, sorted
    left: tuple[tuple[str, int | None], ...] = ()  # what the repo also holds and no load reads

    @property
    def total(self) -> int:
        return sum(size or 0 for _, size in self.files)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.files]


def _base(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _weights(names: set[str], variant: str | None, ext: str) -> set[str]:
    """The weight files (and shard index) of one component with extension `ext`, as diffusers'
    variant_compatible_siblings picks them: the variant's files where the component has any,
    else the plain ones."""
    kind = re.escape(ext[1:])
    if variant:
        v = re.escape(variant)
        found = {n for n in names if n.endswith(ext) and _variant_re(variant).fullmatch(_base(n))}
        if found:
            index = re.compile(rf"{_WEIGHT_PREFIX}\.{kind}\.(?:index\.{v}|{v}\.index)\.json")
            return found | {n for n in names if index.fullmatch(_base(n))}
    index = re.compile(rf"{_WEIGHT_PREFIX}\.{kind}\.index\.json")
    return {n for n in names if (n.endswith(ext) and _PLAIN_WEIGHT.fullmatch(_base(n))) or index.fullmatch(_base(n))}


def _has_variant(names: set[str], variant: str) -> bool:
    return any(_variant_re(variant).fullmatch(_base(n)) for n in names)


def _no_safetensors(source: str, names: set[str]) -> UsageError:
    pickles = sorted(n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth")))
    if pickles:
        return UsageError(f"{source} has no .safetensors weights (only pickle files such as {pickles[0]})",
                          "pass --allow-pickle if you trust the source")
    return UsageError(f"{source} holds no weights studio can load", "check the id (`studio models info`)")


def select_files(files: Mapping[str, int | None], *, source: str = "the repo", model_index: Mapping[str, Any] | None = None,
                 variant: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
                 card_files: list[str] | None = None) -> PullPlan:
    """The files one load of a repo reads, from its file list alone (path -> size): pure, so a
    dry run, the real pull and the tests share it.

    - a card's `files:` list wins (open_clip repos that also hold a transformers copy);
    - a diffusers pipeline (model_index.json): diffusers' own rule (DiffusionPipeline.download):
      each component's `variant` weights where it has them, else its plain ones; safetensors only
      (pickles with allow_pickle when a component has no safetensors); configs and whole
      non-weight folders (scheduler, tokenizer); never a root single-file checkpoint;
    - open_clip (open_clip_config.json): its config, one weight file and tokenizer files;
    - a lone diffusers model or a transformers model: root configs and tokenizer files and ONE
      weight set: the consolidated file where there is one (what both libraries load first),
      else the shards and their index; never .bin beside safetensors, never TF/Flax/ONNX copies.
    """
    names = set(files)
    chosen: set[str]
    layout = "transformers"
    used_variant = None
    if card_files:
        layout = "card"
        missing = [f for f in card_files if f not in names]
        if missing:
            raise UsageError(f"{source} holds no {missing[0]} (its model card lists it)", "fix the card's `files:` list")
        chosen = set(card_files)
    elif model_index is not None or "model_index.json" in names:
        layout = "diffusers-pipeline"
        model_index = model_index or {}
        folders = [k for k, v in model_index.items() if isinstance(v, list) and k != "_class_name"]
        groups: dict[str, set[str]] = {}
        for n in names:  # diffusers groups depth-2 files by folder, all others under the root
            parts = n.split("/")
            groups.setdefault(parts[0] if len(parts) == 2 else "", set()).add(n)
        weight_folders = {k for k in folders if any(_PLAIN_WEIGHT.fullmatch(_base(n)) or _variant_re(variant or "fp16").fullmatch(_base(n))
                                                    for n in groups.get(k, ()))}
        if variant and not _has_variant(names, variant):
            variant = None  # diffusers refuses a variant the repo does not have: the plain files then
        used_variant = variant
        safe = all(any(n.endswith(".safetensors") for n in _weights(groups.get(k, set()), variant, ".safetensors"))
                   for k in weight_folders)
        if not safe and not allow_pickle:
            raise _no_safetensors(source, names)
        ext = ".safetensors" if safe else ".bin"
        chosen = set()
        for group in groups.values():
            chosen |= _weights(group, variant, ext)
        for k in folders:
            if k in weight_folders:
                chosen |= {f"{k}/config.json"} & names
            else:
                chosen |= {n for n in names if n.startswith(f"{k}/")}
        chosen |= set(_DIFFUSERS_ROOT) & names
        if trust_remote_code:
            chosen |= {"pipeline.py"} & names
        # diffusers' ignore patterns: the other weight format, Flax and ONNX files, and their indexes
        other = (".bin", ".msgpack", ".onnx", ".pb") if safe else (".safetensors", ".msgpack", ".onnx", ".pb")
        chosen = {n for n in chosen if not n.endswith(other) and not any(f"{o}.index." in n for o in other)}
    elif "open_clip_config.json" in names:
        layout = "open_clip"
        weights = [w for w in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors") if w in names]
        if not weights and allow_pickle:
            weights = [w for w in ("open_clip_pytorch_model.bin",) if w in names]
        if not weights:
            raise _no_safetensors(source, names)
        tokenizer = {n for n in names if "/" not in n and (n.startswith("tokenizer") or n in
                                                          ("special_tokens_map.json", "vocab.json", "merges.txt"))}
        chosen = {"open_clip_config.json", weights[0]} | tokenizer
    else:
        root = {n for n in names if "/" not in n}
        diffusers_model = any(n.startswith("diffusion_pytorch_model") for n in root)
        layout = "diffusers-model" if diffusers_model else "transformers"
        if diffusers_model:
            if variant and not _has_variant(root, variant):
                variant = None
            used_variant = variant
        weights = _weights(root, variant if diffusers_model else None, ".safetensors")
        if not any(w.endswith(".safetensors") for w in weights):
            if not allow_pickle:
                raise _no_safetensors(source, names)
            weights = _weights(root, None, ".bin")
            if not weights:
                raise _no_safetensors(source, names)
        # one weight set: the consolidated file wins over shards (both libraries look for it first)
        consolidated = {w for w in weights if not re.search(_SHARD, w) and not w.endswith(".json")}
        if consolidated:
            weights = {sorted(consolidated, key=len)[0]}
        chosen = weights | {n for n in root if n.endswith(_TEXT_SUFFIXES) and not re.search(r"\.(bin|safetensors|msgpack|h5)\.index", n)}
        if trust_remote_code:
            chosen |= {n for n in root if n.endswith(".py")}
    chosen = {n for n in chosen if n in names}
    keep = tuple(sorted((n, files[n]) for n in chosen))
    left = tuple(sorted((n, files[n]) for n in names - chosen))
    return PullPlan(layout=layout, variant=used_variant, files=keep, left=left)


def pull_variant(device: Any) -> str | None:
    """The variant the device manager's precision implies: "fp16" on a GPU (or MPS) running fp16
    or bf16, which the pipelines cast the fp16 files to; None on the CPU, which computes in fp32
    (or bf16 from the full-precision files: fp16 would round the weights first)."""
    resolved = device.resolved
    return "fp16" if str(resolved.device).split(":")[0] != "cpu" and resolved.precision in ("fp16", "bf16") else None


def repo_files(spec: ModelSpec) -> tuple[dict[str, int | None], dict[str, Any] | None]:
    """(path -> size, model_index.json or None) of a hub repo: one API call for the listing
    (HfApi.model_info with files_metadata), one small download for a pipeline's index."""
    import json

    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(spec.source, revision=spec.revision, files_metadata=True)
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    index = None
    if "model_index.json" in files:
        index = json.loads(Path(hf_hub_download(spec.source, "model_index.json", revision=info.sha)).read_text(encoding="utf-8"))
    return files, index


def plan_pull(spec: ModelSpec, variant: str | None) -> PullPlan:
    files, index = repo_files(spec)
    return select_files(files, source=spec.source, model_index=index, variant=variant, allow_pickle=spec.allow_pickle,
                        trust_remote_code=spec.trust_remote_code, card_files=list(spec.card.get("files") or []) or None)


def pull(spec: ModelSpec, plan: PullPlan) -> Path:
    """Download what `plan` names into the HF cache. A diffusers pipeline goes through diffusers'
    own download (DiffusionPipeline.download, the variant and safetensors rule its loader uses);
    anything else through snapshot_download with exactly the planned files."""
    if spec.is_local:
        return Path(spec.source)
    if is_offline():
        raise ModelNotAvailable("studio is offline (HF_HUB_OFFLINE or --offline)", "unset HF_HUB_OFFLINE to download")
    if plan.layout == "diffusers-pipeline":
        from diffusers import DiffusionPipeline

        # use_safetensors=None with --allow-pickle: safetensors still win where every component has
        # them (False would make diffusers ignore them and fetch the .bin files)
        return Path(DiffusionPipeline.download(spec.source, revision=spec.revision, variant=plan.variant,
                                               use_safetensors=None if spec.allow_pickle else True,
                                               trust_remote_code=spec.trust_remote_code))
    from huggingface_hub import snapshot_download

    # fnmatch patterns: escape the glob characters a file name may hold
    patterns = [re.sub(r"([\[\]*?])", r"[\1]", name) for name in plan.names]
    return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=patterns))
