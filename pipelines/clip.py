"""CLIP with open_clip: loading, embedding, zero-shot and retrieval evaluation, and search.

Every CLIP model studio touches is an open_clip model, loaded through open_clip's own factory
(`create_model_and_transforms`, `get_tokenizer`, `load_checkpoint`), so a folder studio writes
(`make-tiny clip`, a training run) is also a folder open_clip loads with `local-dir:`. What a user
may pass as a model:

    ViT-B-32@laion2b_s34b_b79k   open_clip built-in architecture @ pretrained tag (or --pretrained)
    clip-vit-b-32                model card (presets/models/*.yaml) naming a hub repo
    laion/CLIP-ViT-B-32-...      hub repo in open_clip's layout (cached snapshot when offline)
    ./folder                     open_clip hub layout: open_clip_config.json + *.safetensors,
                                 or a training output folder (its final weights, else the
                                 latest checkpoint under checkpoints/)
    ./open_clip_model.safetensors  a checkpoint file with open_clip_config.json beside it
    local-dir:PATH / hf-hub:ID   open_clip's own schemas, passed through

`load_clip(name_or_spec, device)` returns `(model, preprocess, tokenizer)` ready for inference;
the captioning pipeline uses it for CLIP interrogation. `ClipEmbedder` is the "clip-embed" task.
Training lives in pipelines/training/clip_train.py.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from studio.errors import InputFileError, ModelNotAvailable, StudioError, UsageError
from studio.outputs import Result, atomic_path, write_text_file
from studio.pipeline import IMAGE_SUFFIXES, load_image


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

TASK = "clip-embed"
CONFIG_NAME = "open_clip_config.json"  # open_clip's hub layout (open_clip.constants.HF_CONFIG_NAME)
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
CHECKPOINTS_DIR = "checkpoints"  # training runs keep step-NNNNNNNN/ folders here


# ----------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ClipSource:
    """What open_clip is given for one model. Hashable: part of the loaded-pipeline cache key. It is
    the clip-embed task's model spec (ClipEmbedder.resolve_model): like a studio ModelSpec it has
    .name, .alias, .card, .notice and .identity(), which is all the engine asks of a spec."""

    model_name: str  # open_clip name: built-in ("ViT-B-32"), registered config stem, or "local-dir:PATH"
    pretrained: str | None = None  # tag or checkpoint file (only with a non-schema model_name)
    checkpoint: str | None = None  # a .safetensors file loaded after creation (checkpoint beside a config)
    label: str = ""  # what the user typed, for messages
    folder: str | None = None  # the local folder holding open_clip_config.json, when there is one
    ident: tuple = ()  # (key, value) pairs recorded in outputs (hub id, revision, path)
    notice: str | None = field(default=None, compare=False)  # one line for the user (fallbacks)
    card: Any = field(default_factory=dict, compare=False, hash=False)  # the alias's model card, if any

    @property
    def name(self) -> str:
        return self.label

    @property
    def alias(self) -> str | None:
        return dict(self.ident).get("alias")

    @property
    def has_weights(self) -> bool:
        return bool(self.pretrained or self.checkpoint or self.folder)

    def reload_args(self) -> tuple[str, str | None]:
        """(model, pretrained) that resolve_clip turns back into this source from any folder
        (an index records them so `clip search` embeds queries with the same model)."""
        ident = dict(self.ident)
        kind = ident.get("kind")
        if kind == "hub":
            return ident.get("alias") or ident["source"], None
        if kind == "file":
            return ident["path"], None
        if kind == "config":
            return ident["config"], self.pretrained
        if kind == "open_clip":
            return self.model_name, self.pretrained
        if self.folder:
            return self.folder, None
        return self.label, self.pretrained

    def identity_dict(self) -> dict[str, Any]:
        return {"name": self.label, "open_clip": self.model_name, "pretrained": self.pretrained,
                **dict(self.ident)}

    def identity(self) -> dict[str, Any]:
        """How outputs record the model (ModelSpec.identity's counterpart)."""
        return self.identity_dict()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a training run (checkpoints/step-N/), or None.
    Checkpoints are written into a temp folder and renamed, so a listed one is complete."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = [p for p in folder.glob("step-*") if p.is_dir() and (p / CONFIG_NAME).exists()
             and p.name[5:].isdigit()]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def resolve_clip(model: Any, *, pretrained: str | None = None, allow_pickle: bool = False,
                 offline: bool | None = None, require_weights: bool = True) -> ClipSource:
    """Turn a model name, path, ModelSpec or ClipSource into what open_clip needs, or a UsageError
    that says what would work. `require_weights=False` (training from scratch) allows a bare
    architecture name or config file."""
    import open_clip

    from studio import models
    from studio.safety import check_pickle

    if isinstance(model, ClipSource):
        return model
    if pretrained and Path(pretrained).expanduser().is_file():  # --pretrained FILE, for every kind of model
        check_pickle(Path(pretrained).expanduser(), allow_pickle=allow_pickle, what="--pretrained")
    if isinstance(model, models.ModelSpec):
        return _from_spec(model, pretrained, allow_pickle)
    name = str(model or "auto").strip()
    if name.startswith("local-dir:"):
        return _from_folder(Path(name[len("local-dir:"):]).expanduser(), name, allow_pickle, pretrained)
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return _from_config_file(path, pretrained, require_weights)
    if path.is_file() and path.suffix == ".safetensors" and pretrained is None:
        return _from_checkpoint_file(path, name, allow_pickle)
    base, _, tag = name.partition("@")
    if not path.exists() and base in open_clip.list_models():
        tag = tag or pretrained or None
        if tag and not (open_clip.get_pretrained_cfg(base, tag) or Path(tag).expanduser().is_file()):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(base)) or "none"
            raise UsageError(f"{tag!r} is neither a pretrained tag of {base} nor a checkpoint file",
                             f"tags of {base}: {tags}")
        if tag and Path(tag).expanduser().is_file():
            check_pickle(Path(tag).expanduser(), allow_pickle=allow_pickle, what="checkpoint")
        if not tag and require_weights:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(base)) or "none"
            raise UsageError(f"{base} is an architecture without weights",
                             f"name its weights: {base}@TAG (tags: {tags}) or --pretrained FILE")
        tag = str(Path(tag).expanduser().resolve()) if tag and Path(tag).expanduser().is_file() else tag
        return ClipSource(model_name=base, pretrained=tag, label=name, ident=(("kind", "open_clip"),))
    spec = models.resolve(name, task=TASK, allow_pickle=allow_pickle, offline=offline)
    return _from_spec(spec, pretrained, allow_pickle)


def _with_card(source: ClipSource, spec: Any) -> ClipSource:
    # the alias's card travels with the source: the engine merges its defaults under the flags
    return replace(source, card=spec.card) if getattr(spec, "card", None) else source


def _from_spec(spec: Any, pretrained: str | None, allow_pickle: bool) -> ClipSource:
    from studio import models

    allow_pickle = allow_pickle or spec.allow_pickle
    if spec.kind == "folder":
        return _with_card(_from_folder(Path(spec.source), spec.name, allow_pickle, pretrained, alias=spec.alias), spec)
    if spec.kind == "file":
        return _with_card(_from_checkpoint_file(Path(spec.source), spec.name, allow_pickle), spec)
    # a hub repo in open_clip's layout: its cached snapshot (offline), or a download of just the
    # config, the safetensors weights and tokenizer files (pinned to the card's revision)
    if spec.offline or models.is_offline():
        folder = models.cached_snapshot(spec)
    else:
        from huggingface_hub import snapshot_download

        # only open_clip's files: laion repos also hold a transformers copy of the weights
        patterns = list(spec.card.get("files") or [CONFIG_NAME, WEIGHTS_NAME, "open_clip_pytorch_model.safetensors",
                                                   "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt"])
        if allow_pickle:
            patterns.append("open_clip_pytorch_model.bin")
        try:
            folder = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=patterns))
        except Exception as exc:
            raise ModelNotAvailable(f"could not fetch {spec.alias or spec.source} from the hub: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                    "check the id and your network, or pass a local folder with --model") from exc
    source = _from_folder(Path(folder), spec.name, allow_pickle, pretrained, alias=spec.alias)
    return ClipSource(model_name=source.model_name, label=source.label, folder=source.folder, card=spec.card,
                      ident=(("kind", "hub"), ("source", spec.source), ("revision", spec.revision or "main"),
                                ("commit", Path(folder).name)) + ((("alias", spec.alias),) if spec.alias else ()))


def _from_folder(folder: Path, label: str, allow_pickle: bool, pretrained: str | None,
                 alias: str | None = None) -> ClipSource:
    if pretrained:
        raise UsageError("--pretrained goes with an architecture name (ViT-B-32) or a config file, not a folder",
                         f"drop --pretrained: {folder} holds its own weights")
    if not folder.is_dir():
        raise UsageError(f"model folder {folder} does not exist", "check the path")
    notice = None
    if not (folder / CONFIG_NAME).exists():
        latest = latest_checkpoint(folder)
        if latest is not None:
            notice = f"{folder} has no final weights yet; using its latest checkpoint {latest.name}"
            folder = latest
        elif (folder / "config.json").exists():
            raise UsageError(f"{folder} is a transformers model folder, not an open_clip one",
                             "studio's CLIP commands use open_clip models: pass an open_clip hub repo "
                             "(e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K) or a folder with open_clip_config.json")
        else:
            raise UsageError(f"{folder} has no {CONFIG_NAME}",
                             "pass an open_clip model folder (`studio models make-tiny clip DIR` writes one) "
                             "or the --out folder of `studio clip train`")
    if not list(folder.glob("*.safetensors")):
        pickles = [p for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt")]
        if not pickles:
            raise UsageError(f"{folder} has a config but no weights", "copy open_clip_model.safetensors beside it")
        if not allow_pickle:
            raise UsageError(f"{folder} has only pickle weights ({pickles[0].name}), which can run code when loaded",
                             "convert them to .safetensors, or pass --allow-pickle if you trust the source")
    from studio.safety import check_pickle

    check_pickle(folder, allow_pickle=allow_pickle)  # a decoy .safetensors beside a pickle .bin too
    ident = (("kind", "folder"), ("path", str(folder.resolve()))) + ((("alias", alias),) if alias else ())
    return ClipSource(model_name=f"local-dir:{folder.resolve()}", label=label, folder=str(folder.resolve()),
                      ident=ident, notice=notice)


def _from_checkpoint_file(path: Path, label: str, allow_pickle: bool) -> ClipSource:
    from studio.models import file_sha256
    from studio.safety import check_pickle

    check_pickle(path, allow_pickle=allow_pickle)
    config = path.parent / CONFIG_NAME
    if not config.exists():
        raise UsageError(f"{path.name} has no {CONFIG_NAME} beside it, so its architecture is unknown",
                         f"pass the architecture and the file: --model ViT-B-32 --pretrained {path}")
    return ClipSource(model_name=f"local-dir:{path.parent.resolve()}", checkpoint=str(path.resolve()), label=label,
                      folder=str(path.parent.resolve()),
                      ident=(("kind", "file"), ("path", str(path.resolve())), ("sha256", file_sha256(path))))


def _from_config_file(path: Path, pretrained: str | None, require_weights: bool) -> ClipSource:
    """A custom architecture as open_clip JSON ({embed_dim, vision_cfg, text_cfg}), registered with
    open_clip.add_model_config so every open_clip function knows it by its file stem."""
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputFileError(f"model config {path} is not valid JSON: {exc}", "fix the file") from exc
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"{path} is not an open_clip model config",
                         "it needs embed_dim, vision_cfg and text_cfg (see open_clip/model_configs/*.json); "
                         "a folder with open_clip_config.json is passed as the folder itself")
    open_clip.add_model_config(path)
    if pretrained and not Path(pretrained).expanduser().is_file():
        raise UsageError(f"--pretrained {pretrained}: no such checkpoint file (tags only exist for built-in names)",
                         "pass a .safetensors file trained with this config")
    if require_weights and not pretrained:
        raise UsageError(f"{path.name} is an architecture without weights", "pass --pretrained FILE.safetensors")
    pretrained = str(Path(pretrained).expanduser().resolve()) if pretrained else None
    return ClipSource(model_name=path.stem, pretrained=pretrained, label=str(path),
                      ident=(("kind", "config"), ("config", str(path.resolve()))))


def model_config(source: ClipSource) -> dict[str, Any]:
    """The architecture dict of a source (what open_clip_config.json stores as model_cfg)."""
    import open_clip

    cfg = open_clip.get_model_config(source.model_name)
    if cfg is None:
        raise UsageError(f"no open_clip config for {source.model_name}", "check --model")
    return cfg


@contextlib.contextmanager
def _loading(source: ClipSource) -> Iterator[None]:
    """open_clip raises RuntimeError/FileNotFoundError/ValueError for missing weights and bad
    configs; turn them into one line that says what to change."""
    try:
        yield
    except StudioError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "download" in text.lower() or "hf hub" in text.lower():
            raise ModelNotAvailable(f"weights of {source.label} are not here and could not be downloaded: {text}",
                                    "run once with network access (open_clip caches them in the HF cache), "
                                    "or pass a local folder with --model") from exc
        raise UsageError(f"could not load CLIP model {source.label}: {text}",
                         "is this an open_clip model whose config matches its weights?") from exc


def create(source: ClipSource, *, device: Any = "cpu", load_weights: bool = True, **kwargs: Any):
    """open_clip.create_model_and_transforms for a source: (model, preprocess_train, preprocess_val)."""
    import logging

    import open_clip

    from studio.safety import forbid_remote_code_prompt

    forbid_remote_code_prompt()  # open_clip's Hugging Face text towers load without trust_remote_code
    # open_clip logs "initialized randomly" on the root logger when asked for no weights; that
    # is the point of load_weights=False (tiny models, training from scratch), so keep it quiet
    level = logging.root.level
    if not load_weights or not source.has_weights:
        logging.root.setLevel(logging.ERROR)
    try:
        with _loading(source):
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                source.model_name, pretrained=source.pretrained, load_weights=load_weights, device=device,
                weights_only=True, **kwargs)
            if source.checkpoint and load_weights:
                open_clip.load_checkpoint(model, source.checkpoint, weights_only=True)
    finally:
        logging.root.setLevel(level)
    return model, train_tf, val_tf


def get_tokenizer(source: ClipSource):
    import open_clip

    with _loading(source):
        return open_clip.get_tokenizer(source.model_name)


def load_clip(model: Any, device: Any = "cpu", *, pretrained: str | None = None, allow_pickle: bool = False):
    """Load a CLIP model for inference: `(model, preprocess, tokenizer)`.

    `model` is anything `resolve_clip` takes (name, alias, hub id, folder, checkpoint file,
    ModelSpec); `device` a torch device / string, or a studio DeviceManager (whose precision,
    quantisation and compile settings are then applied). The model is in eval mode.
    """
    source = resolve_clip(model, pretrained=pretrained, allow_pickle=allow_pickle)
    net, _, preprocess = create(source)
    net.eval()
    if hasattr(device, "prepare"):
        net = device.prepare(net)
    else:
        net = net.to(device)
    return net, preprocess, get_tokenizer(source)


def save_clip_folder(model: Any, model_cfg: dict[str, Any], folder: Path, *, extra: dict[str, Any] | None = None) -> None:
    """Write an open_clip hub-layout folder: open_clip_config.json (open_clip's own
    save_config_for_hf) and open_clip_model.safetensors. Each file is written atomically."""
    import torch
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = model.module if hasattr(model, "module") else model
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in net.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / CONFIG_NAME, overwrite=True) as tmp:
        save_config_for_hf(net, tmp, model_config=model_cfg)
        if extra:  # open_clip ignores keys it does not know; studio records where the weights came from
            data = json.loads(tmp.read_text())
            data.update(extra)
            tmp.write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------- evaluation
# Zero-shot prompt templates: open_clip's (CLIP paper's) 80 ImageNet templates, its 7-template
# subset, or one template per line of a file ("a photo of a {}." with {} for the class name).
def load_templates(spec: str) -> list[Any]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    if spec == "none":
        return ["{}"]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"unknown templates {spec!r}", "use openai, simple, none, or a file with one template per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line and "{c}" not in line]
    if not lines or bad:
        raise UsageError(f"templates file {path} needs one template per line, each with {{}} for the class name",
                         'e.g. "a photo of a {}."')
    return [line.replace("{c}", "{}") for line in lines]


def load_labels(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"labels file {path} does not exist", "pass a text file with one class name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise UsageError(f"labels file {path} has {len(names)} class name(s)", "zero-shot needs at least two classes")
    return names


def recall_at_k(similarity: Any, positives: Any, ks: Sequence[int]) -> dict[int, float]:
    """Share of rows whose top-k columns hold at least one positive. similarity (N, M), positives
    a (N, M) bool mask (several captions may be equally right, e.g. duplicates)."""
    import torch

    out = {}
    order = similarity.argsort(dim=1, descending=True)  # (N, M)
    hits = torch.gather(positives, 1, order)  # (N, M) positives in ranked order
    for k in ks:
        out[k] = float(hits[:, : min(k, hits.shape[1])].any(dim=1).float().mean())
    return out


def retrieval_metrics(image_emb: Any, text_emb: Any, captions: Sequence[str], ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k. A caption counts as right for an image when it is
    that image's caption or an identical string (datasets repeat captions; counting those as
    misses would punish the model for the data)."""
    import torch

    sim = image_emb @ text_emb.T  # (N, N) cosine similarity (embeddings are unit length)
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    positives = ids[:, None] == ids[None, :]  # (N, N)
    metrics = {}
    for k, v in recall_at_k(sim, positives, ks).items():
        metrics[f"image_to_text_R@{k}"] = v
    for k, v in recall_at_k(sim.T, positives.T, ks).items():
        metrics[f"text_to_image_R@{k}"] = v
    return metrics


def zero_shot_metrics(image_emb: Any, labels: Sequence[str], classifier: Any, classnames: Sequence[str]) -> dict[str, float]:
    """Top-1/top-5 accuracy of a zero-shot classifier (D, C) on images with known labels."""
    import torch

    index = {c: i for i, c in enumerate(classnames)}
    missing = sorted({lab for lab in labels if lab not in index})
    if missing:
        raise UsageError(f"label {missing[0]!r} of the data is not among the {len(classnames)} class names",
                         "add it to the --labels file (one class name per line)")
    target = torch.tensor([index[lab] for lab in labels])
    logits = image_emb @ classifier  # (N, C)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
    return {"zero_shot_top1": float((top[:, 0] == target).float().mean()),
            "zero_shot_top5": float((top == target[:, None]).any(dim=1).float().mean()),
            "classes": len(classnames)}


# ----------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class ClipEmbedRequest:
    inputs: tuple[str, ...] = ()  # image files, folders of images, or texts (see `kind`)
    model: str = "auto"  # alias, hub id, open_clip name@tag, or an open_clip folder
    kind: str = "auto"  # auto: existing image files/folders are images, other strings texts | image | text
    batch_size: int = 32  # images or texts per forward pass
    normalize: bool = True  # unit-length embeddings (cosine similarity = dot product)


@dataclass
class Item:
    """One input of an embedding run: what it is, and the id the index records for it."""

    kind: str  # image | text
    id: str  # the path as given (images) or the text itself
    source: str  # absolute path (images) or the text


def expand_inputs(inputs: Iterable[str], kind: str = "auto") -> list[Item]:
    """Images (files, or folders searched recursively for image files) and texts, in order.
    A string that names an image file that does not exist is an error, not a text."""
    if kind not in ("auto", "image", "text"):
        raise UsageError(f"unknown kind {kind!r}", "use auto, image or text")
    items: list[Item] = []
    for raw in inputs:
        raw = str(raw)
        if kind == "text":
            items.append(Item("text", raw, raw))
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InputFileError(f"folder {path} holds no images", f"image suffixes: {', '.join(IMAGE_SUFFIXES)}")
            items += [Item("image", str(p), str(p.resolve())) for p in found]
        elif path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or kind == "image"):
            items.append(Item("image", raw, str(path.resolve())))
        elif kind == "image" or path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputFileError(f"image {raw} does not exist", "check the path (or pass --kind text to embed it as text)")
        else:
            items.append(Item("text", raw, raw))
    if not items:
        raise UsageError("nothing to embed", "pass image files, folders of images, or texts")
    return items


class ClipEmbedder:
    """The clip-embed task: image and text embeddings from one open_clip model."""

    task = TASK
    request_type = ClipEmbedRequest
    seedless = True  # embeddings are deterministic: no seed to record

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, source: ClipSource, device: DeviceManager | str):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.device = device  # a studio DeviceManager (training and eval scripts may pass "cpu")

    @classmethod
    def resolve_model(cls, name: str, *, task: str | None = None, allow_pickle: bool = False,
                      trust_remote_code: bool = False, offline: bool | None = None) -> ClipSource:
        """The engine's model resolution for this task (studio.registry.resolve_model): open_clip
        names models its own way (ARCH@TAG, CONFIG.json@FILE, training run folders, hub repos in
        its layout), which studio.models does not know. `NAME@WEIGHTS` with a local NAME is a
        name with --pretrained folded in."""
        base, sep, tag = str(name).rpartition("@")
        if sep and base and Path(base).expanduser().exists():
            return resolve_clip(base, pretrained=tag, allow_pickle=allow_pickle, offline=offline)
        return resolve_clip(name, allow_pickle=allow_pickle, offline=offline)

    @classmethod
    def load(cls, spec: Any, device: DeviceManager | str, *, pretrained: str | None = None) -> "ClipEmbedder":
        source = resolve_clip(spec, pretrained=pretrained, allow_pickle=getattr(spec, "allow_pickle", False))
        model, preprocess, tokenizer = load_clip(source, device)
        return cls(model, preprocess, tokenizer, source, device)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.embed_texts(["x"]).shape[1])

    def check_inputs(self, request: ClipEmbedRequest) -> None:
        if request.batch_size < 1:
            raise UsageError(f"--batch-size {request.batch_size} must be at least 1", "pass e.g. --batch-size 32")
        if not request.inputs:
            raise UsageError("nothing to embed", "pass image files, folders of images, or texts")
        expand_inputs(request.inputs, request.kind)

    def _input_size(self) -> tuple[int, int] | None:
        """(width, height) the visual tower takes (open_clip's visual.image_size), None if unknown."""
        size = getattr(getattr(self.model, "visual", None), "image_size", None)
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return (int(size[1]), int(size[0]))  # open_clip keeps (height, width)
        return None

    @classmethod
    def check_request(cls, request: ClipEmbedRequest, spec: Any, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the batch size,
        that there is something to embed, and with a device a batch's memory. open_clip names its
        architectures in code, not in a config file read before loading, so an image is costed as
        ViT-L/14's at 224 px in fp32, about 20 MB (257 tokens x 1024 wide, the MLP 4x that): an
        upper figure for the usual models (ViT-B/32 needs a tenth), so only absurd batches fail."""
        if request.batch_size < 1:
            raise UsageError(f"--batch-size {request.batch_size} must be at least 1", "pass e.g. --batch-size 32")
        if not request.inputs:
            raise UsageError("nothing to embed", "pass image files, folders of images, or texts")
        if device is not None:
            from studio.limits import check_fits

            folders = any(Path(str(x)).expanduser().is_dir() for x in request.inputs)
            batch = int(request.batch_size) if folders else min(int(request.batch_size), len(request.inputs))
            per_image = 20 << 20
            check_fits(task=TASK, spec=spec, device=device, work=batch * per_image, what=f"a batch of {batch} inputs",
                       hint=lambda room: f"--batch-size {max(1, int(room // per_image))} or less")

    def _tensor_device(self):
        return self.device.device if hasattr(self.device, "device") else self.device

    def embed_images(self, images: Sequence[Any], *, batch_size: int = 32, progress: Any = None,
                     normalize: bool = True) -> Any:
        """(N, D) float32 numpy embeddings of PIL images or image paths."""
        import numpy as np
        import torch

        handle = progress.task("embedding images", total=len(images)) if progress is not None else None
        out = []
        for start in range(0, len(images), batch_size):
            # a photo far larger than the model's input is shrunk while it is opened (only as far as
            # it still covers the preprocess's resize + crop), never held at full size in a batch
            box = self._input_size()
            chunk = [load_image(x, max_size=box, cover=True) if isinstance(x, (str, Path)) else x.convert("RGB")
                     for x in images[start:start + batch_size]]
            pixels = torch.stack([self.preprocess(im) for im in chunk]).to(self._tensor_device())  # (B, 3, H, W)
            with self._inference():
                emb = self.model.encode_image(pixels.to(self._dtype()), normalize=normalize)  # (B, D)
            out.append(emb.float().cpu().numpy())
            if handle is not None:
                handle.advance(len(chunk))
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 32, progress: Any = None,
                    normalize: bool = True) -> Any:
        """(N, D) float32 numpy embeddings of texts (truncated to the model's context length)."""
        import numpy as np

        handle = progress.task("embedding texts", total=len(texts)) if progress is not None else None
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            tokens = self.tokenizer(chunk).to(self._tensor_device())  # (B, context_length)
            with self._inference():
                emb = self.model.encode_text(tokens, normalize=normalize)  # (B, D)
            out.append(emb.float().cpu().numpy())
            if handle is not None:
                handle.advance(len(chunk))
        return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)

    def _inference(self):
        return self.device.inference() if hasattr(self.device, "inference") else _no_grad()

    def _dtype(self):
        return next(self.model.parameters()).dtype

    def embed_items(self, items: Sequence[Item], *, batch_size: int = 32, progress: Any = None,
                    normalize: bool = True) -> Any:
        """Embeddings of mixed image/text items, in the items' order."""
        import numpy as np

        images = [i for i, it in enumerate(items) if it.kind == "image"]
        texts = [i for i, it in enumerate(items) if it.kind == "text"]
        parts = {}
        if images:
            parts["image"] = self.embed_images([items[i].source for i in images], batch_size=batch_size,
                                               progress=progress, normalize=normalize)
        if texts:
            parts["text"] = self.embed_texts([items[i].source for i in texts], batch_size=batch_size,
                                             progress=progress, normalize=normalize)
        dim = next(iter(parts.values())).shape[1]
        out = np.zeros((len(items), dim), np.float32)
        if images:
            out[images] = parts["image"]
        if texts:
            out[texts] = parts["text"]
        return out

    def run(self, request: ClipEmbedRequest, progress: Progress) -> list[Result]:
        # 1. check inputs (files exist, kinds known)
        self.check_inputs(request)
        items = expand_inputs(request.inputs, request.kind)
        # 2. embed images and texts in batches
        vectors = self.embed_items(items, batch_size=request.batch_size, progress=progress,
                                   normalize=request.normalize)
        # 3. one JSON result: ids, kinds and vectors (the CLI writes .npy + .jsonl instead)
        reload_model, reload_pretrained = self.source.reload_args()
        value = {"model": self.source.identity_dict(), "load": {"model": reload_model, "pretrained": reload_pretrained},
                 "dim": int(vectors.shape[1]), "normalized": request.normalize,
                 "items": [{"id": it.id, "kind": it.kind, "embedding": [round(float(x), 6) for x in vec]}
                           for it, vec in zip(items, vectors)]}
        params = {"inputs": list(request.inputs), "kind": request.kind, "model": request.model,
                  "name": f"{len(items)} embeddings"}
        return [Result(kind="json", value=value, params=params, extra={"notice": self.source.notice} if self.source.notice else {})]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, samples: Iterable[Any], *, classnames: Sequence[str] | None = None,
                 templates: Sequence[Any] | None = None, batch_size: int = 64, progress: Any = None,
                 total: int | None = None) -> dict[str, Any]:
        """Zero-shot top-1/5 (when samples carry labels) and image<->text recall@1/5/10 (when they
        carry captions) over `samples` (objects with .image() -> PIL, .caption, .label), streamed
        (training's validation). `studio eval clip` computes the same numbers from the clip-embed
        task's embeddings: eval_plan, template_texts and embedding_metrics serve both."""
        import numpy as np

        image_emb, captions, labels = [], [], []
        handle = progress.task("evaluating", total=total) if progress is not None else None
        batch: list[Any] = []

        def flush() -> None:
            if batch:
                image_emb.append(self.embed_images([s.image() for s in batch], batch_size=len(batch)))
                if handle is not None:
                    handle.advance(len(batch))
                batch.clear()

        for sample in samples:
            batch.append(sample)
            captions.append(sample.caption)
            labels.append(sample.label)
            if len(batch) == batch_size:
                flush()
        flush()
        captioned, classnames = eval_plan(captions, labels, classnames)
        texts = self.embed_texts(captions, batch_size=batch_size) if captioned else None  # (N, D)
        classes = None
        if classnames is not None:
            prompts = template_texts(classnames, list(templates or load_templates("openai")))
            classes = self.embed_texts(prompts, batch_size=batch_size)  # (C*T, D)
        return embedding_metrics(np.concatenate(image_emb), captions, labels, text_emb=texts, classnames=classnames,
                                 class_text_emb=classes)


def eval_plan(captions: Sequence[str | None], labels: Sequence[str | None],
              classnames: Sequence[str] | None = None) -> tuple[bool, list[str] | None]:
    """What an evaluation of these samples measures, checked before anything is embedded:
    retrieval when every sample has a caption, zero-shot when every sample has a label (over the
    given class names, else the labels found). Returns (retrieval?, class names or None)."""
    count = len(captions)
    if count == 0:
        raise UsageError("the evaluation data holds no samples", "check --data")
    with_captions = sum(1 for c in captions if c)
    if 0 < with_captions < count:
        raise UsageError(f"{count - with_captions} of {count} samples have no caption",
                         "give every image a caption, or none (zero-shot only)")
    have_labels = all(lab is not None for lab in labels)
    if classnames is None and have_labels:
        classnames = sorted(set(labels))
    if classnames is not None and not have_labels:
        raise UsageError("--labels was given but the data carries no labels",
                         "add a label column (--label-key), class subfolders, or .cls entries in the shards")
    if classnames is not None:
        if len(classnames) < 2:
            raise UsageError("zero-shot needs at least two classes", "pass --labels FILE with the class names")
        missing = sorted({lab for lab in labels if lab not in set(classnames)})
        if missing:
            raise UsageError(f"label {missing[0]!r} of the data is not among the {len(classnames)} class names",
                             "add it to the --labels file (one class name per line)")
    if not with_captions and classnames is None:
        raise UsageError("nothing to evaluate: the data has neither captions nor labels",
                         "give images .txt captions or class labels")
    return with_captions == count, list(classnames) if classnames is not None else None


def template_texts(classnames: Sequence[str], templates: Sequence[Any]) -> list[str]:
    """Every zero-shot prompt, class-major (C*T): each template (a "{}" string or a callable, as
    open_clip's lists hold) filled with each class name."""
    return [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]


def zero_shot_classifier(class_text_emb: Any, n_classes: int) -> Any:
    """(D, C) zero-shot weights from the unit-length embeddings of template_texts: each class's
    mean over its templates, renormalised. This is open_clip.build_zero_shot_classifier's
    arithmetic; that function wants the model itself, and here the embeddings may come from the
    clip-embed task through the engine."""
    import torch

    emb = torch.as_tensor(class_text_emb, dtype=torch.float32)
    emb = emb.reshape(n_classes, -1, emb.shape[-1]).mean(dim=1)  # (C, D)
    return (emb / emb.norm(dim=1, keepdim=True)).T  # (D, C)


def embedding_metrics(image_emb: Any, captions: Sequence[str | None], labels: Sequence[str | None], *,
                      text_emb: Any = None, classnames: Sequence[str] | None = None,
                      class_text_emb: Any = None) -> dict[str, Any]:
    """The evaluation's numbers from unit-length embeddings (numpy or torch): images (N, D),
    their captions (N, D) for recall@k, the class prompts (C*T, D) for zero-shot, as eval_plan
    decided."""
    import torch

    images = torch.as_tensor(image_emb, dtype=torch.float32)  # (N, D)
    metrics: dict[str, Any] = {"samples": len(captions)}
    if text_emb is not None:
        metrics.update(retrieval_metrics(images, torch.as_tensor(text_emb, dtype=torch.float32), captions))
    if classnames is not None:
        classifier = zero_shot_classifier(class_text_emb, len(classnames))  # (D, C)
        metrics.update(zero_shot_metrics(images, labels, classifier, classnames))
    return metrics


@contextlib.contextmanager
def _no_grad():
    import torch

    with torch.inference_mode():
        yield


# ----------------------------------------------------------------------------- index + search
@dataclass
class Index:
    """Embeddings (N, D) float16 (unit length), one row per entry, and where they came from."""

    vectors: Any
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    path: Path


def index_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """FILE(.npy) -> (FILE.npy, FILE.jsonl, FILE.json): vectors, ids, and metadata (model)."""
    path = Path(path).expanduser()
    stem = path.with_suffix("") if path.suffix in (".npy", ".jsonl", ".json") else path
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".jsonl"), stem.with_name(stem.name + ".json")


def save_index(path: str | Path, vectors: Any, items: Sequence[Item], meta: dict[str, Any], *,
               overwrite: bool = False) -> tuple[Path, Path, Path]:
    """Write FILE.npy (float16 vectors), FILE.jsonl (one row per vector: row, id, kind, source) and
    FILE.json (model and settings, so `clip search` embeds queries with the same model)."""
    import numpy as np

    npy, jsonl, meta_path = index_paths(path)
    if not overwrite:
        for p in (npy, jsonl, meta_path):
            if p.exists():
                raise UsageError(f"{p} exists", "pick another --out, or pass --overwrite to replace it")
    with atomic_path(npy, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(vectors, dtype=np.float16))
    lines = [json.dumps({"row": i, "id": it.id, "kind": it.kind, "source": it.source}, ensure_ascii=False)
             for i, it in enumerate(items)]
    write_text_file(jsonl, "\n".join(lines) + "\n", overwrite=overwrite)
    write_text_file(meta_path, json.dumps({**meta, "count": len(items), "dim": int(vectors.shape[1]),
                                           "dtype": "float16", "vectors": npy.name, "ids": jsonl.name},
                                          indent=2, ensure_ascii=False), overwrite=overwrite)
    return npy, jsonl, meta_path


def load_index(path: str | Path) -> Index:
    import numpy as np

    npy, jsonl, meta_path = index_paths(path)
    for p in (npy, jsonl):
        if not p.exists():
            raise InputFileError(f"index file {p} does not exist", "write an index with `studio clip embed ... --out FILE`")
    try:
        vectors = np.load(npy, allow_pickle=False)
    except ValueError as exc:
        raise InputFileError(f"{npy} is not a numeric .npy array", "rebuild the index with `studio clip embed`") from exc
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    if vectors.ndim != 2 or len(rows) != vectors.shape[0]:
        raise InputFileError(f"index {npy.name} has {vectors.shape[0] if vectors.ndim else 0} vectors but "
                             f"{jsonl.name} lists {len(rows)} ids", "rebuild the index with `studio clip embed`")
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return Index(vectors=vectors, rows=rows, meta=meta, path=npy)


def search_index(index: Index, query: Any, *, k: int = 5, kind: str | None = None) -> list[dict[str, Any]]:
    """The k rows most similar (cosine) to `query` (D,), best first, optionally of one kind."""
    import numpy as np

    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != index.vectors.shape[1]:
        raise UsageError(f"the query embedding has {q.shape[0]} dimensions but the index has {index.vectors.shape[1]}",
                         "search with the model that built the index (see its .json)")
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    vectors = index.vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    scores = vectors @ q / np.maximum(norms, 1e-12)  # (N,) cosine similarity
    candidates = np.arange(len(index.rows))
    if kind:
        candidates = np.array([i for i, r in enumerate(index.rows) if r.get("kind") == kind], dtype=int)
    if candidates.size == 0:
        return []
    order = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
    return [{"rank": r + 1, "score": round(float(scores[i]), 6), **index.rows[i]} for r, i in enumerate(order)]


__all__ = ["ClipEmbedder", "ClipEmbedRequest", "ClipSource", "load_clip", "resolve_clip",
           "save_clip_folder", "latest_checkpoint", "retrieval_metrics", "zero_shot_metrics", "save_index",
           "eval_plan", "template_texts", "zero_shot_classifier", "embedding_metrics",
           "load_index", "search_index", "expand_inputs", "load_templates", "load_labels"]
