"""Waveform music: MusicGen (text -> audio, and melody-conditioned) through transformers.

audiocraft pins torch 2.1 and cannot be a dependency, so this is MusicGen as transformers ships
it (`MusicgenForConditionalGeneration`, `MusicgenMelodyForConditionalGeneration`), plus the two
things audiocraft's `MusicGen.generate` adds on top:

- durations beyond the model's window (30 s for the released models) by windowed continuation,
  audiocraft's `extend_stride` idea: generate one window; then, while more is needed, keep the
  last (window - stride) seconds of *tokens* as the prompt and generate up to a full window
  again, which adds `stride` seconds each time. Tokens (not re-encoded audio) carry over, and
  all tokens are decoded by EnCodec once at the end, so windows leave no seams;
- a progress bar in seconds of audio.

transformers' `generate` returns only the decoded waveform, so the tokens of each window are
read off a StoppingCriteria (which sees the full token matrix every step) and put through the
same delay-pattern undo that `generate` applies; a test checks that decoding them reproduces
the waveform `generate` returned.

Melody conditioning (--melody FILE.wav) needs musicgen-melody. Its chroma features are computed
here with torch.stft and transformers' `chroma_filter_bank`, the same arithmetic as
`MusicgenMelodyFeatureExtractor`, because that class requires torchaudio, which has no build for
this torch. Each window gets the chroma of its own stretch of the melody, as audiocraft does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from studio.errors import InputFileError, UsageError
from studio.models import ModelSpec, loading
from studio.outputs import Result
from studio.pipeline import seeds_for
from studio.progress import quiet_transformers


if TYPE_CHECKING:  # types only (ARCHITECTURE.md, the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.progress import Progress

AUDIO_FORMATS = ("wav", "flac")
MAX_WINDOW_SECONDS = 30.0  # what the released MusicGen models were trained on (audiocraft's max_duration)
STRIDE_SHARE = 0.6  # audiocraft's default extend_stride (18 s) over its window (30 s)
MAX_DURATION = 600.0


@dataclass(frozen=True)
class AudioRequest:
    """What `studio music audio` asks for. Every field is recorded in the sidecar and file tags."""

    prompt: str  # text description of the music
    model: str = "auto"  # alias, hub id or folder of a MusicGen (or MusicGen-melody) model
    duration: float = 10.0  # seconds of audio; past the model's window it continues in windows
    melody: str | None = None  # an audio file whose melody (chroma) conditions a musicgen-melody model
    guidance: float = 3.0  # classifier-free guidance scale (1 turns it off)
    temperature: float = 1.0  # sampling temperature (>0)
    top_k: int = 250  # sample among the k likeliest codes (audiocraft's default; 0: all)
    top_p: float | None = None  # nucleus sampling mass (None: off)
    num_outputs: int = 1  # how many clips; seeds seed, seed+1, ...
    seed: int | None = None  # random seed (the engine fills one in and records it)
    format: str = "wav"  # wav | flac
    window: float | None = None  # seconds generated at once (default: the model's window, 30 s at most)
    extend_stride: float | None = None  # seconds each further window adds (default: 60% of the window)


# ----------------------------------------------------------------------------- audio helpers
def resample(samples: Any, rate_from: int, rate_to: int) -> Any:
    """Band-limited resampling by FFT (scipy.signal.resample's method), in torch: torchaudio and
    scipy are not dependencies, and chroma features need nothing finer."""
    import torch

    if rate_from == rate_to:
        return samples
    x = torch.as_tensor(samples, dtype=torch.float32)
    n_in = x.shape[-1]
    n_out = max(1, int(round(n_in * rate_to / rate_from)))
    spectrum = torch.fft.rfft(x, dim=-1)
    keep = min(spectrum.shape[-1], n_out // 2 + 1)
    out_spec = torch.zeros(*spectrum.shape[:-1], n_out // 2 + 1, dtype=spectrum.dtype)
    out_spec[..., :keep] = spectrum[..., :keep]
    return torch.fft.irfft(out_spec, n=n_out, dim=-1) * (n_out / n_in)


def load_audio(path: str | Path, what: str = "melody") -> tuple[Any, int]:
    """(mono float32 samples (T,), rate) from a WAV/FLAC/OGG file; clean errors for bad files."""
    import numpy as np
    import soundfile as sf

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputFileError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file",
                             "pass a WAV or FLAC file")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)  # (T, C)
    except Exception as exc:  # soundfile.LibsndfileError / RuntimeError on unreadable bytes
        raise InputFileError(f"{what} {p} is not a readable audio file ({type(exc).__name__})",
                             "pass a WAV, FLAC or OGG file") from exc
    if data.shape[0] == 0:
        raise InputFileError(f"{what} {p} is empty", "pass an audio file with sound in it")
    return np.ascontiguousarray(data.mean(axis=1)), int(rate)


class ChromaExtractor:
    """MusicgenMelodyFeatureExtractor's chroma, without torchaudio: power spectrogram (hann,
    centred, reflect padding), chroma filter bank, then one-hot of the strongest pitch class per
    frame (normalisation does not change an argmax, so it is skipped)."""

    def __init__(self, sampling_rate: int = 32000, n_fft: int = 16384, hop_length: int = 4096,
                 chunk_length: int = 30, num_chroma: int = 12, **_: Any):
        import torch
        from transformers.audio_utils import chroma_filter_bank

        self.sampling_rate, self.n_fft, self.hop_length = int(sampling_rate), int(n_fft), int(hop_length)
        self.n_samples = int(chunk_length) * self.sampling_rate
        self.filters = torch.from_numpy(chroma_filter_bank(sampling_rate=self.sampling_rate, num_frequency_bins=self.n_fft,
                                                           tuning=0, num_chroma=num_chroma)).float()  # (12, F)

    def __call__(self, samples: Any, rate: int) -> Any:
        import torch

        wav = resample(samples, rate, self.sampling_rate)[: self.n_samples]
        wav = torch.nn.functional.pad(wav, (0, self.n_samples - wav.shape[-1]))  # the extractor pads to chunk_length
        window = torch.hann_window(self.n_fft)
        spec = torch.stft(wav, self.n_fft, self.hop_length, self.n_fft, window, center=True, pad_mode="reflect",
                          return_complex=True).abs() ** 2  # (F, frames)
        chroma = torch.einsum("cf,ft->tc", self.filters, spec)  # (frames, 12)
        one_hot = torch.zeros_like(chroma)
        one_hot.scatter_(-1, chroma.argmax(-1, keepdim=True), 1.0)
        return one_hot[None]  # (1, frames, 12)




# ----------------------------------------------------------------------------- token capture
def _capture_class() -> type:
    from transformers import StoppingCriteria

    class CodeCapture(StoppingCriteria):
        """Sees the whole (B*K, L) token matrix after every step: keeps it, and advances the
        progress bar; never stops generation."""

        def __init__(self, on_step: Any):
            self.ids = None
            self.on_step = on_step

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            self.ids = input_ids
            self.on_step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return CodeCapture


# ----------------------------------------------------------------------------- the pipeline
def _check_ranges(request: AudioRequest) -> None:
    """The request's own ranges: nothing here needs the weights (check_request runs it before they load)."""
    if not (request.prompt or "").strip() and not request.melody:
        raise UsageError("the prompt is empty", 'describe the music, e.g. "lo-fi beat with warm piano"')
    if not 0 < request.duration <= MAX_DURATION:
        raise UsageError(f"--duration must be between 0 and {MAX_DURATION:.0f} seconds, got {request.duration}",
                         "e.g. --duration 10")
    if request.guidance < 1:
        raise UsageError(f"--guidance must be 1 or more (1 turns guidance off), got {request.guidance}", "e.g. --guidance 3")
    if request.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {request.temperature}", "e.g. --temperature 1.0")
    if request.top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {request.top_k}", "e.g. --top-k 250 (0: all codes)")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {request.top_p}", "e.g. --top-p 0.9")
    if request.num_outputs < 1:
        raise UsageError(f"--num must be at least 1, got {request.num_outputs}", "e.g. --num 2")
    if request.format not in AUDIO_FORMATS:
        raise UsageError(f"unknown audio format {request.format!r}", "use --format wav or --format flac")
    for name in ("window", "extend_stride"):
        value = getattr(request, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}", "leave it out to use the model's")


def _check_memory(request: AudioRequest, spec: ModelSpec, device: DeviceManager) -> dict[str, Any] | None:
    """A piece's peak against free memory: its tokens come window by window (the decoder's cache
    is bounded by the window), but EnCodec decodes the whole piece at once (run: step 3), at the
    full sample rate. Measured with transformers' EncodecModel (upsampling 8,5,4,4, 1500 frames,
    fp32): 214, 364 and 756 bytes a sample for 4, 16 and 32 filters, about 150 + 20 per filter;
    MusicGen's 64 filters at 32 kHz make that ~46 MB a second of audio (600 s: 27 GB)."""
    from studio.limits import check_fits, element_size, read_config, weight_values

    config = read_config(spec, "config.json")
    encoder = config.get("audio_encoder") or {}
    if not encoder:
        return None  # not a local MusicGen folder: load() says what it is
    rate = int(encoder.get("sampling_rate") or 32000)
    filters = int(encoder.get("num_filters") or 64)
    channels = int((config.get("decoder") or {}).get("audio_channels") or 1)
    elem = element_size(device)
    per_second = rate * channels * (150 + 20 * filters) * elem / 4
    seconds = float(request.duration)

    def hint(room: float) -> str:
        fit = int(room // per_second)
        return f"--duration {fit} or less" if fit >= 1 else "a shorter --duration"

    return check_fits(task="music-audio", spec=spec, device=device, work=per_second * seconds,
                      weights=weight_values(spec) * elem, what=f"{seconds:g} s of audio", hint=hint)


class MusicGenerator:
    """task "music-audio": MusicGen / MusicGen-melody with windowed continuation."""

    task = "music-audio"
    request_type = AudioRequest

    def __init__(self, model: Any, tokenizer: Any, device: DeviceManager, spec: ModelSpec, chroma: ChromaExtractor | None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.chroma = chroma  # None unless the model is a melody model
        audio_cfg = model.config.audio_encoder
        self.sampling_rate = int(audio_cfg.sampling_rate)
        self.frame_rate = float(audio_cfg.frame_rate)
        self.num_codebooks = int(model.decoder.num_codebooks)
        self.start_id = int(model.generation_config.decoder_start_token_id)
        self.channels = int(getattr(model.config.decoder, "audio_channels", 1))

    @property
    def is_melody(self) -> bool:
        return self.chroma is not None

    @classmethod
    def load(cls, spec: ModelSpec, device: DeviceManager) -> "MusicGenerator":
        from transformers import (AutoConfig, AutoTokenizer, MusicgenForConditionalGeneration,
                                  MusicgenMelodyForConditionalGeneration)
        from transformers.utils import cached_file

        location = spec.location()
        kwargs = spec.load_kwargs()
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
        with loading(spec, "MusicGen model"), quiet_transformers():
            config = AutoConfig.from_pretrained(location, **config_kwargs)
            model_type = getattr(config, "model_type", None)
            if model_type == "musicgen":
                model_cls = MusicgenForConditionalGeneration
            elif model_type == "musicgen_melody":
                model_cls = MusicgenMelodyForConditionalGeneration
            else:
                raise UsageError(f"{spec.alias or spec.name} is a {model_type} model, not MusicGen",
                                 "pass a MusicGen model, e.g. --model musicgen-small")
            model = model_cls.from_pretrained(location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **config_kwargs)
            chroma = None
            if model_type == "musicgen_melody":
                path = cached_file(location, "preprocessor_config.json", **{k: v for k, v in config_kwargs.items() if k == "revision"})
                chroma = ChromaExtractor(**json.loads(Path(path).read_text()))
        model.eval()
        with quiet_transformers():
            model = device.prepare(model)
        return cls(model, tokenizer, device, spec, chroma)

    # -- 1. inputs
    def _window(self, request: AudioRequest, text_len: int) -> tuple[int, int]:
        """(window frames, stride frames). The decoder's positions bound the window: prompt +
        new frames + the K-1 delay steps (+ the chroma and text prefix of melody models)."""
        max_pos = int(self.model.config.decoder.max_position_embeddings)
        prefix = (int(self.model.config.chroma_length) + text_len) if self.is_melody else 0
        limit = max_pos - self.num_codebooks - prefix - 1
        limit_s = limit / self.frame_rate
        if limit < 2:
            raise UsageError("this model's context is too short to generate audio", "use a real MusicGen model")
        if request.window is not None:
            if not 0 < request.window <= limit_s + 1e-9:
                raise UsageError(f"--window must be between 0 and {limit_s:.2f} s for this model, got {request.window}",
                                 "leave it out to use the model's window")
            window = int(round(request.window * self.frame_rate))
        else:
            window = int(min(MAX_WINDOW_SECONDS * self.frame_rate, limit))
        if request.extend_stride is not None:
            stride = int(round(request.extend_stride * self.frame_rate))
            if not 0 < stride < window:
                raise UsageError(f"--extend-stride must be positive and shorter than the window ({window / self.frame_rate:.2f} s)",
                                 f"e.g. --extend-stride {window * STRIDE_SHARE / self.frame_rate:.1f}")
        else:
            stride = max(1, int(window * STRIDE_SHARE))
        return max(2, window), stride

    @classmethod
    def check_request(cls, request: AudioRequest, spec: ModelSpec | None, device: DeviceManager | None) -> None:
        """What can be checked before the weights load (the engine calls this first): the request's
        ranges, and with a device, whether the audio's one EnCodec decode fits in free memory."""
        _check_ranges(request)
        if device is not None and spec is not None:
            _check_memory(request, spec, device)

    def check_inputs(self, request: AudioRequest) -> None:
        _check_ranges(request)
        if request.melody and not self.is_melody:
            raise UsageError(f"{self.spec.alias or self.spec.name} is not a melody model, so --melody cannot condition it",
                             "use --model musicgen-melody (or another MusicGen-melody model)")
        if request.melody:
            load_audio(request.melody)
        self._window(request, 1)

    # -- 2-4
    def run(self, request: AudioRequest, progress: Progress) -> Iterator[Result]:
        """Yields each piece as soon as it is decoded (the engine writes it and lets it go)."""
        import torch

        # 1. check inputs; text and melody
        self.check_inputs(request)
        text = self.tokenizer([request.prompt or ""], padding=True, return_tensors="pt")
        text = {k: v.to(self.device.device) for k, v in text.items()}
        window, stride = self._window(request, int(text["input_ids"].shape[-1]))
        melody = load_audio(request.melody) if request.melody else None
        total = int(math.ceil(request.duration * self.frame_rate))
        base = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}

        for index, seed in enumerate(seeds_for(request.seed or 0, request.num_outputs)):
            handle = progress.task(f"music {index + 1}/{request.num_outputs} (s of audio)", total=round(request.duration, 2))
            # 2. tokens, window by window
            devices = [self.device.device] if self.device.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), self.device.inference():
                torch.manual_seed(int(seed))
                codes, windows = self._generate_codes(text, melody, total, window, stride, request, handle)
                # 3. one EnCodec decode of all tokens
                audio = self._decode(codes)
            handle.finish()
            samples = audio[..., : int(round(request.duration * self.sampling_rate))]
            samples = samples[0] if samples.shape[0] == 1 else samples  # (T,) mono, (C, T) stereo
            # 4. results (the writer writes wav/flac with the request as a tag)
            extra = {"audio": {"sampling_rate": self.sampling_rate, "frame_rate": self.frame_rate, "frames": int(codes.shape[-1]),
                               "windows": windows, "window_s": round(window / self.frame_rate, 3),
                               "stride_s": round(stride / self.frame_rate, 3), "melody_conditioned": melody is not None}}
            yield Result(kind="audio", value=(samples, self.sampling_rate), params={**base, "seed": seed},
                         fmt=request.format, extra=extra)

    def _generate_codes(self, text: dict[str, Any], melody: tuple[Any, int] | None, total: int, window: int,
                        stride: int, request: AudioRequest, handle: Any) -> tuple[Any, int]:
        """(1, K, total) codes; windows after the first keep window - stride frames as prompt."""
        import torch
        from transformers import StoppingCriteriaList

        K = self.num_codebooks
        sampling = dict(do_sample=True, guidance_scale=float(request.guidance), temperature=float(request.temperature),
                        top_k=int(request.top_k), top_p=float(request.top_p or 1.0))
        codes = None
        windows = 0
        while codes is None or codes.shape[-1] < total:
            done = 0 if codes is None else codes.shape[-1]
            prompt = None if codes is None else codes[:, :, -(window - stride):]  # (1, K, P)
            prompt_len = 0 if prompt is None else prompt.shape[-1]
            new = min(window - prompt_len, total - done)
            steps = new + K - 1  # the delay pattern needs K-1 extra steps to finish the last frame
            per_step = new / self.frame_rate / steps
            capture = _capture_class()(lambda: handle.advance(per_step))
            kwargs: dict[str, Any] = dict(text)
            if prompt is not None:
                kwargs["decoder_input_ids"] = prompt.reshape(-1, prompt_len)  # (B*K, P)
            if melody is not None:
                start_s = (done - prompt_len) / self.frame_rate  # this window's stretch of the melody
                samples, rate = melody
                piece = samples[int(start_s * rate):]
                if len(piece) == 0:
                    piece = samples[-1:]
                kwargs["input_features"] = self.chroma(piece, rate).to(self.device.device, self.model.dtype)
            with quiet_transformers():  # e.g. melody models warn that a full 30 s chroma "exceeds" its 30 s
                self.model.generate(**kwargs, max_new_tokens=steps, stopping_criteria=StoppingCriteriaList([capture]),
                                    **sampling)
            produced = self._undelay(capture.ids, prompt, steps)  # (1, K, P + new)
            produced = produced[:, :, prompt_len:]
            codes = produced if codes is None else torch.cat([codes, produced], dim=-1)
            windows += 1
        return codes[:, :, :total], windows

    def _undelay(self, ids: Any, prompt: Any, steps: int) -> Any:
        """generate's own post-processing of the token matrix: apply the delay-pattern mask, drop
        the pad/start tokens, back to (B, K, frames)."""
        import torch

        K = self.num_codebooks
        start = torch.full((K, 1), self.start_id, dtype=torch.long, device=ids.device)
        first = start if prompt is None else torch.cat([start, prompt.reshape(K, -1).to(ids.device)], dim=-1)
        _, mask = self.model.decoder.build_delay_pattern_mask(first, pad_token_id=self.start_id,
                                                              max_length=first.shape[-1] + steps)
        out = self.model.decoder.apply_delay_pattern_mask(ids, mask)
        return out[out != self.start_id].reshape(1, K, -1)

    def _decode(self, codes: Any) -> Any:
        """EnCodec decode of (1, K, T) codes -> float32 numpy (C, samples)."""
        import torch

        enc = self.model.audio_encoder
        if self.channels == 1:
            audio = enc.decode(codes[None], audio_scales=[None]).audio_values  # (1, 1, T)
        else:  # stereo models interleave left/right codebooks
            left = enc.decode(codes[None, :, ::2], audio_scales=[None]).audio_values
            right = enc.decode(codes[None, :, 1::2], audio_scales=[None]).audio_values
            audio = torch.cat([left, right], dim=1)
        audio = audio[0].float().clamp(-1, 1).cpu().numpy()
        return audio
