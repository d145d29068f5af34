"""Seeing: image captioning, visual question answering and CLIP interrogation.

Two tasks share this file because they share the models: `caption` (Captioner) and `vqa` (VQA).
Every model loads through transformers' Auto classes, so one code path serves

    BLIP                 BlipForConditionalGeneration     caption; --prompt is a prefix it continues
    BLIP VQA             BlipForQuestionAnswering         answers questions
    BLIP-2, GIT          AutoModelForImageTextToText      caption (prefix) and "Question: .. Answer:" VQA
    Florence-2           AutoModelForImageTextToText      --prompt is a task token such as <CAPTION>
    chat VLMs            AutoModelForImageTextToText      SmolVLM, Qwen2-VL, LLaVA, Idefics3: the prompt
                                                          goes through the processor's own chat template

`--interrogate` ranks a tag vocabulary (presets/tags/*.txt, or a file) against each image with
an open_clip model and appends the best tags to the caption: clip-interrogator's fast mode, which
turns any image into a usable text-to-image prompt.

Images are read here, one batch at a time, so a folder of thousands of photos never sits in
memory and one corrupt file is reported (a Result with extra["error"]) without stopping the
others. Nothing here writes files or prints: the CLI formats the Results (table, txt, JSONL, CSV,
sidecars) through studio.outputs.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from studio import models
from studio.errors import BackendUnavailable, InputFileError, UsageError
from studio.outputs import Result
from studio.paths import PACKAGE_PRESETS
from studio.pipeline import load_image


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

# What a chat VLM is asked when the user gives no --prompt: one sentence is what training-set
# captions and prompts want; a VLM's own default would be a paragraph.
CHAT_CAPTION_PROMPT = "Describe this image in one sentence."
FLORENCE_CAPTION_PROMPT = "<CAPTION>"
TAGS_DIR = PACKAGE_PRESETS / "tags"


@dataclass(frozen=True)
class CaptionRequest:
    images: list[str]  # image files, in order (the CLI expands folders)
    model: str = "auto"  # alias, hub id or folder; auto = the card marked default_for [caption]
    prompt: str | None = None  # BLIP/GIT/BLIP-2: a prefix the caption continues; chat VLMs: the instruction
    max_tokens: int = 30  # most new tokens per caption
    beams: int = 1  # beam search width (1 = greedy); captions are deterministic either way
    batch_size: int = 8  # images per forward pass
    interrogate: bool = False  # append the best CLIP-ranked tags to each caption
    tags: str | None = None  # tag vocabulary: a file, or a built-in list name (presets/tags); None = all built-ins
    clip_model: str = "auto"  # open_clip model for --interrogate: alias, hub id or folder
    top_tags: int = 6  # how many tags --interrogate appends
    adapters: tuple[str, ...] = ()  # peft adapters "PATH[:SCALE]" (studio adapt train --task caption)

    def __post_init__(self) -> None:
        _as_list(self, "images")


def _as_list(request: Any, name: str) -> None:
    """One path or question may be given bare (a batch file's `images: ${hero.image}`)."""
    value = getattr(request, name)
    if isinstance(value, (str, Path)):
        object.__setattr__(request, name, [str(value)])
    elif value is not None:
        object.__setattr__(request, name, [str(v) for v in value])


@dataclass(frozen=True)
class VQARequest:
    images: list[str]  # image files, in order
    questions: list[str]  # every question is asked of every image
    model: str = "auto"  # alias, hub id or folder; auto = the card marked default_for [vqa]
    max_tokens: int = 20  # most new tokens per answer
    beams: int = 1  # beam search width (1 = greedy)
    batch_size: int = 8  # (image, question) pairs per forward pass
    adapters: tuple[str, ...] = ()  # peft adapters "PATH[:SCALE]" (studio adapt train --task caption)

    def __post_init__(self) -> None:
        _as_list(self, "images")
        _as_list(self, "questions")


# --------------------------------------------------------------------------- the shared model
@dataclass
class _Batch:
    """One forward pass worth of work: images that share one prompt or question."""

    indices: list[int]  # positions in the request's output order
    paths: list[str]
    images: list[Any]  # PIL images
    text: str | None  # prompt (caption) or question (vqa)


def _family(config: Any, processor: Any) -> str:
    """How a model is prompted. model_type says it for the classic captioners; a chat template
    on the processor marks an instruction-following VLM."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch == "BlipForQuestionAnswering":
        return "blip-vqa"
    kind = getattr(config, "model_type", "")
    if kind in ("blip", "git", "florence2"):
        return {"blip": "blip", "git": "git", "florence2": "florence"}[kind]
    if kind == "blip-2":
        return "blip2"
    if getattr(processor, "chat_template", None):
        return "chat"
    return "prefix"


def _continuation(out: Any, input_ids: Any) -> Any:
    """Decoder-only models return prompt + new tokens; keep the new ones only."""
    if input_ids is None:
        return out
    n = input_ids.shape[1]
    if out.shape[1] >= n and bool((out[:, :n] == input_ids.to(out.device)).all()):
        return out[:, n:]
    return out


class _VisionLanguage:
    """Loads a transformers vision-language model + processor and runs batches through it."""

    task = "caption"
    request_type: type = CaptionRequest
    seedless = True  # greedy/beam decoding: nothing random to seed

    def __init__(self, model: Any, processor: Any, family: str, spec: models.ModelSpec, device: DeviceManager):
        self.model = model
        self.processor = processor
        self.family = family
        self.spec = spec
        self.device = device

    def _apply_adapters(self, adapters: Any) -> None:
        from studio.adapters.peft_adapters import apply_adapters

        apply_adapters(self.model, tuple(adapters or ()), base_label=self.spec.alias or self.spec.name,
                       allow_pickle=self.spec.allow_pickle, offline=self.spec.offline)

    @classmethod
    def load(cls, spec: models.ModelSpec, device: DeviceManager) -> "_VisionLanguage":
        try:
            from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForVisualQuestionAnswering, AutoProcessor
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise BackendUnavailable(f"transformers is not importable: {exc}", "pip install 'transformers>=5'") from exc

        from transformers.utils import logging as hf_logging

        location = spec.location()
        kwargs = spec.load_kwargs()
        # configs and processors are JSON: use_safetensors means nothing to them
        light = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
        # studio's progress shows the load; transformers' per-tensor bar would print even under --quiet
        hf_logging.disable_progress_bar()
        try:
            with models.loading(spec, "caption model"):
                try:
                    config = AutoConfig.from_pretrained(location, **light)
                    processor = AutoProcessor.from_pretrained(location, **light)
                    family = _family(config, processor)
                    auto = AutoModelForVisualQuestionAnswering if family == "blip-vqa" else AutoModelForImageTextToText
                    model = auto.from_pretrained(location, dtype=device.dtype, **kwargs)
                except ImportError as exc:  # e.g. SmolVLM's processor needs num2words
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise BackendUnavailable(f"{spec.alias or spec.name} needs a package that is not installed: {first}",
                                             "install the package the message names (pip install NAME)") from exc
        finally:
            hf_logging.enable_progress_bar()
        cls._check_family(spec, family)
        model.eval()
        # BLIP and GIT keep their own attention classes: transformers warns that SDPA cannot be
        # set on them, which tells a captioning user nothing they can act on
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = device.prepare(model)
        finally:
            hf_logging.set_verbosity(verbosity)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and family in ("chat", "blip2", "prefix"):
            # decoder-only generation continues the last token: pad on the left
            tokenizer.padding_side = "left"
        return cls(model, processor, family, spec, device)

    @classmethod
    def _check_family(cls, spec: models.ModelSpec, family: str) -> None:
        pass

    # ------------------------------------------------------------------ checks
    @classmethod
    def check_request(cls, request: Any, spec: models.ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the request's
        ranges, --max-tokens against the text decoder's positions (config.json), and with a device,
        whether one batch fits in free memory."""
        cls._check_fields(request)
        if spec is not None:
            _check_model_limits(cls.task, request, spec, device)

    @classmethod
    def _check_fields(cls, request: Any) -> None:
        """The request's own ranges (no weights needed): each task's own."""

    def check_inputs(self, request: Any) -> None:
        self._check_fields(request)

    # ------------------------------------------------------------------ batches
    def _read(self, batch_paths: Sequence[str]) -> tuple[list[Any], dict[int, InputFileError]]:
        """Open each image; unreadable ones become errors by position instead of stopping the run."""
        images, errors = [], {}
        for i, path in enumerate(batch_paths):
            try:
                # captioners look at a few hundred pixels a side (BLIP 384, SmolVLM tiles of 512):
                # a 12000x12000 photo is shrunk while it is opened, not in the processor (2.7 GB)
                images.append(load_image(path, max_size=2048))
            except InputFileError as exc:
                errors[i] = exc
                images.append(None)
        return images, errors

    def _inputs(self, images: list[Any], text: str | None, mode: str) -> tuple[dict[str, Any], Any]:
        """Processor outputs for one batch, and the prompt ids to strip (None: keep all)."""
        p, n = self.processor, len(images)
        if self.family == "chat":
            instruction = text or CHAT_CAPTION_PROMPT
            conversations = [[{"role": "user", "content": [{"type": "image", "image": im},
                                                           {"type": "text", "text": instruction}]}] for im in images]
            inputs = p.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
            return dict(inputs), inputs["input_ids"]
        if self.family == "git":
            # GIT continues [CLS] + text; the processor's trailing [SEP] would end it at once
            inputs = dict(p(images=images, return_tensors="pt"))
            if text:
                import torch

                ids = p.tokenizer(text, add_special_tokens=False)["input_ids"]
                inputs["input_ids"] = torch.tensor([[p.tokenizer.cls_token_id] + ids] * n)
                return inputs, inputs["input_ids"] if mode == "vqa" else None
            return inputs, None
        if self.family == "blip2" and mode == "vqa":
            text = f"Question: {text} Answer:"
        if self.family == "florence":
            text = text or FLORENCE_CAPTION_PROMPT
        kwargs = {"text": [text] * n, "padding": True} if text else {}
        inputs = dict(p(images=images, return_tensors="pt", **kwargs))
        # BLIP and BLIP-2/GIT captions read as prefix + continuation (the models' documented use)
        strip = self.family in ("chat", "prefix") or (mode == "vqa" and self.family == "blip2")
        return inputs, inputs.get("input_ids") if strip else None

    def _generate(self, images: list[Any], text: str | None, mode: str, max_tokens: int, beams: int) -> list[str]:
        """One batch through processor -> generate -> decode."""
        import torch

        inputs, prompt_ids = self._inputs(images, text, mode)
        model = self.model
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        moved = {k: (v.to(self.device.device, dtype=dtype) if torch.is_floating_point(v) else v.to(self.device.device))
                 if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with self.device.inference():
            out = model.generate(**moved, max_new_tokens=max_tokens, num_beams=beams, do_sample=False)  # (B, T)
        out = _continuation(out, prompt_ids)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [re.sub(r"\s+", " ", t).strip() for t in texts]

    def _run_batches(self, batches: Iterable[_Batch], total: int, mode: str, max_tokens: int, beams: int,
                     progress: Any, label: str, after: Callable[[list[int], list[Any]], None] | None = None,
                     ) -> tuple[dict[int, str], dict[int, float], dict[int, InputFileError]]:
        """Run every batch; `after(positions, images)` sees each batch's readable images (interrogation)."""
        texts: dict[int, str] = {}
        seconds: dict[int, float] = {}
        errors: dict[int, InputFileError] = {}
        handle = progress.task(label, total=total)
        for batch in batches:
            images, failed = self._read(batch.paths)
            for i, exc in failed.items():
                errors[batch.indices[i]] = exc
            keep = [i for i in range(len(images)) if i not in failed]
            if keep:
                t0 = time.perf_counter()
                answers = self._generate([images[i] for i in keep], batch.text, mode, max_tokens, beams)
                if after is not None:
                    after([batch.indices[i] for i in keep], [images[i] for i in keep])
                per_item = (time.perf_counter() - t0) / len(keep)
                for i, answer in zip(keep, answers):
                    texts[batch.indices[i]] = answer
                    seconds[batch.indices[i]] = per_item
            handle.advance(len(batch.paths))
        return texts, seconds, errors

    @staticmethod
    def _check_common(images: Sequence[str], max_tokens: int, beams: int, batch_size: int) -> None:
        if not images:
            raise UsageError("no images to read", "pass image files or a folder that holds some")
        if not 1 <= max_tokens <= 2048:
            raise UsageError(f"--max-tokens must be between 1 and 2048, got {max_tokens}", "pass e.g. --max-tokens 30")
        if beams < 1:
            raise UsageError(f"--beams must be at least 1, got {beams}", "pass --beams 1 (greedy) or more")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}", "pass --batch-size 8")

    @staticmethod
    def _all_failed(errors: dict[int, InputFileError], total: int, images: Sequence[str]) -> None:
        """One bad file on its own is bad input (exit 2); a few among many are reported per file."""
        if errors and len(errors) == total:
            count = len(set(images))
            if count == 1:
                raise errors[0]
            raise InputFileError(f"none of the {count} images could be read (first: {errors[0].message})",
                                 "pass PNG, JPEG or WebP files")


def _check_model_limits(task: str, request: Any, spec: models.ModelSpec, device: DeviceManager | None) -> dict[str, Any] | None:
    """--max-tokens against the text decoder's positions, and one batch's peak against free memory.

    A batch is min(--batch-size, images) items (VQA: images share a question). Each item is the
    processor's float pixels, the vision tower's activations (~16 hidden-width tensors a patch
    token, plus eager attention's heads x tokens x tokens, which BLIP's own attention class
    keeps), and per beam the decoder's key/value cache over prompt + new tokens and the float32
    logits of a step and their processed copies. The images as decoded before the processor
    (shrunk to at most 2048 px a side while opened) are not counted."""
    from studio.limits import check_fits, element_size, read_config, weight_values

    config = read_config(spec, "config.json")
    text = config.get("text_config") or {}
    positions = next((int(text[k]) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(text.get(k), int) and text[k] > 0), None)
    if positions is not None and request.max_tokens >= positions:
        raise UsageError(f"--max-tokens {request.max_tokens} is more than this model's {positions}-token text window",
                         f"pass --max-tokens {max(1, positions // 2)} or fewer")
    vision = config.get("vision_config") or {}
    if device is None or not vision or not text:
        return None
    elem = element_size(device)
    side, patch = int(vision.get("image_size") or 384), int(vision.get("patch_size") or 16)
    tokens = (side // max(patch, 1)) ** 2 + 1
    v_hidden, v_heads = int(vision.get("hidden_size") or 768), int(vision.get("num_attention_heads") or 12)
    image = side * side * 3 * 4 + tokens * v_hidden * elem * 16 + v_heads * tokens * tokens * elem
    layers, hidden = int(text.get("num_hidden_layers") or 12), int(text.get("hidden_size") or 768)
    prompt = 64 + (tokens if task == "vqa" or "chat" in str(config.get("model_type", "")) else 0)
    beam = 2 * layers * (prompt + request.max_tokens) * hidden * elem + int(text.get("vocab_size") or 32000) * 4 * 4
    per_item = image + int(request.beams) * beam
    batch = max(1, min(int(request.batch_size), len(request.images)))

    def hint(room: float) -> str:
        fit = int(room // per_item)
        return (f"--batch-size {fit} or less" if 1 <= fit < batch else "a smaller --batch-size") + " or fewer --beams"

    return check_fits(task=task, spec=spec, device=device, work=per_item * batch, weights=weight_values(spec) * elem,
                      what=f"a batch of {batch} image{'s' if batch != 1 else ''} x {request.beams} beam(s)", hint=hint)


def _chunks(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


# --------------------------------------------------------------------------- caption
class Captioner(_VisionLanguage):
    """`caption`: one caption per image, optionally with CLIP-ranked tags appended."""

    task = "caption"
    request_type = CaptionRequest

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._interrogators: dict[tuple, Interrogator] = {}

    @classmethod
    def _check_family(cls, spec: models.ModelSpec, family: str) -> None:
        if family == "blip-vqa":
            raise UsageError(f"{spec.alias or spec.name} is a question-answering model; it does not write captions",
                             "ask it questions with `studio vqa IMAGE QUESTION` (or caption --question), "
                             "or caption with a captioning model such as blip-base")

    @classmethod
    def _check_fields(cls, request: CaptionRequest) -> None:
        cls._check_common(request.images, request.max_tokens, request.beams, request.batch_size)
        if request.top_tags < 1:
            raise UsageError(f"--top-tags must be at least 1, got {request.top_tags}", "pass e.g. --top-tags 6")
        if request.interrogate:
            load_tags(request.tags)  # a missing or empty tag file fails before any model runs
        elif request.tags:
            raise UsageError("--tags is only used with --interrogate", "add --interrogate, or drop --tags")

    def run(self, request: CaptionRequest, progress: Progress) -> list[Result]:
        # 1. check inputs; adapters on (or all off when none are asked for)
        self.check_inputs(request)
        self._apply_adapters(request.adapters)
        order = list(range(len(request.images)))

        # 2. batches of images that share the prompt, read lazily (one batch in memory at a time)
        batches = (_Batch(idx, [request.images[i] for i in idx], [], request.prompt)
                   for idx in _chunks(order, request.batch_size))

        # 3. interrogation (optional): CLIP ranks the tag vocabulary against each batch's images
        tags: dict[int, list[tuple[str, float]]] = {}
        after = None
        if request.interrogate:
            interrogator = self.interrogator(request.clip_model, progress)
            tag_list = load_tags(request.tags)
            interrogator.tag_features(tag_list)  # encode the vocabulary once, before the first batch

            def after(positions: list[int], images: list[Any]) -> None:
                for i, found in zip(positions, interrogator.rank(images, tag_list, request.top_tags)):
                    tags[i] = found

        # 4. generate captions (unreadable files are recorded, not raised)
        captions, seconds, errors = self._run_batches(batches, len(order), "caption", request.max_tokens,
                                                      request.beams, progress, "captioning", after)
        self._all_failed(errors, len(order), request.images)

        # 5. Results in input order; each one's params replay that image alone
        base = {k: v for k, v in asdict(request).items() if k != "images"}
        results = []
        for i in order:
            path = request.images[i]
            params = {"images": [path], **base}
            if i in errors:
                exc = errors[i]
                results.append(Result(kind="json", value={"image": path, "error": exc.message, "hint": exc.hint},
                                      params=params, extra={"image": path, "error": exc.message}))
                continue
            text = captions[i]
            extra: dict[str, Any] = {"image": path, "caption": text, "seconds": round(seconds[i], 4)}
            if i in tags:
                extra["tags"] = [{"tag": t, "score": round(s, 4)} for t, s in tags[i]]
                text = append_tags(text, [t for t, _ in tags[i]])
            results.append(Result(kind="text", value=text, params=params, fmt="txt", extra=extra))
        return results

    def interrogator(self, name: str, progress: Any = None) -> "Interrogator":
        """The CLIP model for --interrogate, loaded once per (model, device settings)."""
        source = resolve_clip(name, self.spec)
        key = (source, self.device.settings)
        if key not in self._interrogators:
            if source.notice and progress is not None:
                progress.note(source.notice)
            if progress is not None:
                with progress.status(f"loading CLIP {source.label}"):
                    self._interrogators[key] = Interrogator.load(source, self.device)
            else:
                self._interrogators[key] = Interrogator.load(source, self.device)
        return self._interrogators[key]


def append_tags(caption: str, tags: Sequence[str]) -> str:
    """caption, tag, tag, ... without repeating what the caption already says."""
    low = caption.lower()
    extra = [t for t in tags if t.lower() not in low]
    return ", ".join([caption, *extra]) if caption else ", ".join(extra)


# --------------------------------------------------------------------------- vqa
class VQA(_VisionLanguage):
    """`vqa`: one answer per (image, question)."""

    task = "vqa"
    request_type = VQARequest

    @classmethod
    def _check_family(cls, spec: models.ModelSpec, family: str) -> None:
        if family in ("blip", "florence"):
            raise UsageError(f"{spec.alias or spec.name} is a captioning model; it cannot answer questions",
                             "use a VQA model (blip-vqa) or a chat VLM (smolvlm, qwen2-vl-2b) with --model")

    @classmethod
    def _check_fields(cls, request: VQARequest) -> None:
        cls._check_common(request.images, request.max_tokens, request.beams, request.batch_size)
        if not request.questions or any(not str(q).strip() for q in request.questions):
            raise UsageError("no question to ask", 'pass one or more questions, e.g. studio vqa photo.jpg "what colour is the car?"')

    def run(self, request: VQARequest, progress: Progress) -> list[Result]:
        # 1. check inputs; adapters on (or all off when none are asked for)
        self.check_inputs(request)
        self._apply_adapters(request.adapters)
        n_q = len(request.questions)
        total = len(request.images) * n_q

        # 2. batches share one question, so prompts have equal lengths: decoder-only models
        #    (GIT, BLIP-2) need no padding, and every model batches the same way
        def batches() -> Iterable[_Batch]:
            for q, question in enumerate(request.questions):
                for idx in _chunks(list(range(len(request.images))), request.batch_size):
                    yield _Batch([i * n_q + q for i in idx], [request.images[i] for i in idx], [], question)

        # 3. answer (output position = image-major: image 0's questions, then image 1's, ...)
        answers, seconds, errors = self._run_batches(batches(), total, "vqa", request.max_tokens, request.beams,
                                                     progress, "answering")
        self._all_failed(errors, total, request.images)

        # 4. Results: one per (image, question)
        base = {k: v for k, v in asdict(request).items() if k not in ("images", "questions")}
        results = []
        for pos in range(total):
            path, question = request.images[pos // n_q], request.questions[pos % n_q]
            params = {"images": [path], "questions": [question], **base}
            if pos in errors:
                exc = errors[pos]
                results.append(Result(kind="json", value={"image": path, "question": question, "error": exc.message},
                                      params=params, extra={"image": path, "question": question, "error": exc.message}))
                continue
            results.append(Result(kind="text", value=answers[pos], params=params, fmt="txt",
                                  extra={"image": path, "question": question, "seconds": round(seconds[pos], 4)}))
        return results


# --------------------------------------------------------------------------- interrogation
def tag_lists() -> dict[str, Path]:
    """The built-in tag vocabularies by name (presets/tags/NAME.txt)."""
    return {p.stem: p for p in sorted(TAGS_DIR.glob("*.txt"))}


def _read_tag_file(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def load_tags(source: str | None) -> list[str]:
    """Tags from a file, a built-in list name, or (None) every built-in list; order kept, no repeats."""
    if source:
        path = Path(source).expanduser()
        if path.is_file():
            tags = _read_tag_file(path)
        elif source in tag_lists():
            tags = _read_tag_file(tag_lists()[source])
        else:
            raise UsageError(f"tag list {source} is neither a file nor a built-in list",
                             f"pass a text file with one tag a line, or one of: {', '.join(tag_lists())}")
    else:
        tags = [t for p in tag_lists().values() for t in _read_tag_file(p)]
    tags = list(dict.fromkeys(tags))
    if not tags:
        raise UsageError(f"tag list {source or TAGS_DIR} holds no tags", "put one tag a line in the file")
    return tags


def resolve_clip(name: str | None, like: models.ModelSpec) -> Any:
    """--clip-model as studio.pipelines.clip's ClipSource (hashable): an alias (task clip-embed),
    `hf-hub:org/name`, org/name, an open_clip folder, or ARCH@TAG; pickle rules follow the caption model's."""
    from studio.pipelines.clip import resolve_clip as clip_source

    name = (name or "auto").strip()
    try:
        return clip_source(name, allow_pickle=like.allow_pickle, offline=like.offline or None)
    except UsageError as exc:
        if name == "auto":  # the user never named a CLIP model: say which flag picks one
            raise type(exc)(f"--interrogate: {exc.message}",
                            f"{exc.hint}; or pass --clip-model (an open_clip folder or hub id)") from exc
        raise


class Interrogator:
    """An open_clip model that ranks tags against images by cosine similarity (clip-interrogator's
    fast mode). Loading is pipelines/clip.py's `load_clip`, so --clip-model takes every name
    `studio clip` takes."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: DeviceManager, source: Any):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self._tag_cache: dict[tuple[str, ...], Any] = {}

    @classmethod
    def load(cls, source: Any, device: DeviceManager) -> "Interrogator":
        from studio.pipelines.clip import load_clip

        model, preprocess, tokenizer = load_clip(source, device)
        return cls(model, preprocess, tokenizer, device, source)

    def _dtype(self) -> Any:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def tag_features(self, tags: Sequence[str]) -> Any:
        """(N, D) unit text embeddings of the tags, computed once per vocabulary."""
        import torch

        key = tuple(tags)
        if key not in self._tag_cache:
            parts = []
            with self.device.inference():
                for start in range(0, len(tags), 256):
                    tokens = self.tokenizer(list(tags[start:start + 256])).to(self.device.device)  # (n, ctx)
                    feats = self.model.encode_text(tokens).float()  # (n, D)
                    parts.append(torch.nn.functional.normalize(feats, dim=-1))
            self._tag_cache[key] = torch.cat(parts)
        return self._tag_cache[key]

    def rank(self, images: Sequence[Any], tags: Sequence[str], top: int) -> list[list[tuple[str, float]]]:
        """For each image, the `top` tags with their cosine similarity, best first."""
        import torch

        text = self.tag_features(tags)  # (N, D)
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device.device, self._dtype())  # (B, 3, H, W)
        with self.device.inference():
            feats = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, D)
        sims = feats @ text.T  # (B, N)
        scores, idx = sims.topk(min(top, len(tags)), dim=-1)
        return [[(tags[j], float(s)) for s, j in zip(row_s.tolist(), row_i.tolist())] for row_s, row_i in zip(scores, idx)]


# --------------------------------------------------------------------------- evaluation
def normalise_caption(text: str) -> str:
    """Lowercase words without punctuation: what BLEU/CIDEr and exact-match compare.

    pycocoevalcap's own PTBTokenizer shells out to Java (Stanford CoreNLP); this is the same
    lowercase-and-strip-punctuation idea in Python so scoring needs no JVM.
    """
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, Any]:
    """BLEU-1..4 and CIDEr (pycocoevalcap's scorers) and exact match over the shared keys."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    keys = [k for k in references if k in predictions]
    if not keys:
        raise UsageError("nothing to score: no image has both a reference and a prediction",
                         "check that the folder holds images with caption sidecars")
    gts = {k: [normalise_caption(r) or "<empty>" for r in references[k]] for k in keys}
    res = {k: [normalise_caption(predictions[k]) or "<empty>"] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[k][0] in gts[k] for k in keys) / len(keys)
    return {"images": len(keys), "bleu_1": float(bleu[0]), "bleu_4": float(bleu[3]), "cider": float(cider),
            "exact_match": float(exact)}
