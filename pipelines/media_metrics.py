"""What can be measured about a generated video or audio file without extra weights:
`studio eval video` and `studio eval audio`.

Video: frame count, rate, duration and size; how much consecutive frames differ (mean absolute
pixel difference, 0 = frozen, the cheap flicker/jump measure); and, with a CLIP model the user
names (an alias like starter-clip, a folder, an open_clip name), CLIP frame consistency (cosine
of consecutive frames' image embeddings, as VBench's subject/background consistency measures it)
and the CLIP score of every frame against the prompt (100 x max(cosine, 0), torchmetrics'
CLIPScore convention; computed here because torchmetrics' CLIPScore takes only transformers CLIP
models, and studio's CLIPs are open_clip).

Audio: duration, rate, channels, level (RMS and peak in dBFS, crest factor), clipped samples, and
silence (50 ms windows below a threshold: their share, the leading and trailing silence, the
longest gap). Level is plain RMS, not LUFS: BS.1770's K-weighting needs scipy's filters
(pyloudnorm), which studio does not depend on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from studio.errors import InputFileError, UsageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# ----------------------------------------------------------------------------- video
def read_video(path: str | Path) -> tuple[list[Any], float | None]:
    """(frames as HxWx3 uint8 arrays, frames per second or None) of a video file or a folder of
    numbered frames (what `studio video --format frames` writes)."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist", "pass a video file (mp4, gif, webp) or a folder of frames")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise InputFileError(f"{path} holds no frame images", "pass a folder of numbered PNG frames")
        from PIL import Image

        frames = []
        for f in files:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        return frames, _recorded_fps(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputFileError(f"{path.name} is not a video studio can read", f"pass one of: {', '.join(VIDEO_SUFFIXES)}")
    try:
        if suffix in (".gif", ".webp"):
            from PIL import Image, ImageSequence

            with Image.open(path) as im:
                frames, durations = [], []
                for frame in ImageSequence.Iterator(im):
                    frames.append(np.asarray(frame.convert("RGB")))
                    durations.append(frame.info.get("duration") or 0)
            mean_ms = sum(durations) / max(1, len(durations))
            return frames, (1000.0 / mean_ms if mean_ms > 0 else None)
        import imageio.v2 as iio2

        reader = iio2.get_reader(str(path), format="FFMPEG")
        try:
            fps = reader.get_meta_data().get("fps")
            frames = [np.asarray(f)[..., :3] for f in reader]
        finally:
            reader.close()
        return frames, float(fps) if fps else None
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputFileError(f"{path.name} could not be read as a video ({exc.__class__.__name__})",
                             "pass an mp4, gif or webp file") from exc


def _recorded_fps(path: Path) -> float | None:
    try:
        from studio.outputs import read_metadata

        params = read_metadata(path).get("params") or {}
        return float(params["fps"]) if params.get("fps") else None
    except (UsageError, KeyError, ValueError, TypeError):
        return None


def recorded_prompt(path: str | Path) -> str | None:
    """The prompt a studio output was made from (its sidecar), or None."""
    try:
        from studio.outputs import read_metadata

        prompt = (read_metadata(path).get("params") or {}).get("prompt")
        return prompt if isinstance(prompt, str) and prompt.strip() else None
    except (UsageError, ValueError):
        return None


def frame_differences(frames: Sequence[Any]) -> list[float]:
    """Mean absolute difference of each consecutive pair of frames, in [0, 1]."""
    import numpy as np

    return [float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)
            for a, b in zip(frames, frames[1:])]


def clip_frame_metrics(frames: Sequence[Any], clip: tuple[Any, Any, Any], prompt: str | None,
                       batch_size: int = 32) -> dict[str, Any]:
    """CLIP consistency of consecutive frames and, given a prompt, each frame's CLIP score."""
    import torch
    from PIL import Image

    model, preprocess, tokenizer = clip
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for start in range(0, len(frames), batch_size):
            batch = torch.stack([preprocess(Image.fromarray(f)) for f in frames[start:start + batch_size]])
            feats.append(model.encode_image(batch.to(device, dtype), normalize=True).float())
        image = torch.cat(feats)  # (F, D)
        out: dict[str, Any] = {}
        if len(frames) > 1:
            pairs = (image[1:] * image[:-1]).sum(-1)
            out["clip_frame_consistency"] = round(float(pairs.mean()), 4)
            out["clip_frame_consistency_min"] = round(float(pairs.min()), 4)
        if prompt:
            text = model.encode_text(tokenizer([prompt]).to(device), normalize=True).float()  # (1, D)
            scores = (100 * (image @ text.T).squeeze(1).clamp(min=0)).tolist()
            out.update(prompt=prompt, clip_score=round(sum(scores) / len(scores), 3), clip_score_min=round(min(scores), 3),
                       clip_score_per_frame=[round(s, 3) for s in scores])
    return out


def video_report(path: str | Path, *, clip: tuple[Any, Any, Any] | None = None, prompt: str | None = None) -> dict[str, Any]:
    frames, fps = read_video(path)
    if not frames:
        raise InputFileError(f"{Path(path).name} holds no frames", "pass a video with at least one frame")
    diffs = frame_differences(frames)
    h, w = frames[0].shape[:2]
    report: dict[str, Any] = {
        "path": str(path), "frames": len(frames), "fps": round(fps, 3) if fps else None,
        "duration_s": round(len(frames) / fps, 3) if fps else None, "width": int(w), "height": int(h),
        "frame_difference": round(sum(diffs) / len(diffs), 5) if diffs else None,
        "frame_difference_max": round(max(diffs), 5) if diffs else None,
        # pairs that barely change (< 0.2% of the pixel range): a frozen clip scores 1.0
        "static_pairs": round(sum(d < 0.002 for d in diffs) / len(diffs), 4) if diffs else None,
    }
    if clip is not None:
        report.update(clip_frame_metrics(frames, clip, prompt if prompt is not None else recorded_prompt(path)))
    return report


# ----------------------------------------------------------------------------- audio
def read_audio(path: str | Path) -> tuple[Any, int]:
    """(samples as float32 (T, C) in [-1, 1], sample rate) through soundfile."""
    import numpy as np
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path} does not exist", "pass an audio file (wav, flac, ogg)")
    if path.suffix.lower() in (".mid", ".midi"):
        raise UsageError(f"{path.name} is MIDI, not audio", "measure MIDI with `studio eval music`, or render it first: studio music render")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise InputFileError(f"{path.name} could not be read as audio", "pass a wav, flac or ogg file") from exc
    return np.asarray(samples), int(rate)


def _db(value: float) -> float | None:
    import math

    return round(20 * math.log10(value), 2) if value > 0 else None  # None: digital silence (-inf dBFS)


def audio_report(path: str | Path, *, silence_db: float = -60.0, window_s: float = 0.05) -> dict[str, Any]:
    import numpy as np

    samples, rate = read_audio(path)
    n = samples.shape[0]
    report: dict[str, Any] = {"path": str(path), "sample_rate": rate, "channels": int(samples.shape[1]),
                              "duration_s": round(n / rate, 4) if rate else None}
    if n == 0:
        return {**report, "rms_dbfs": None, "peak_dbfs": None, "silence_share": 1.0}
    power = (samples.astype(np.float64) ** 2).mean(axis=1)  # (T,) mean power over channels
    rms, peak = float(np.sqrt(power.mean())), float(np.abs(samples).max())
    hop = max(1, int(rate * window_s))
    windows = n // hop or 1
    levels = np.sqrt(power[: windows * hop].reshape(windows, -1).mean(axis=1)) if n >= hop else np.sqrt(power.mean())[None]
    with np.errstate(divide="ignore"):
        levels_db = 20 * np.log10(np.maximum(levels, 1e-12))
    silent = levels_db < silence_db
    longest = current = 0
    for s in silent:
        current = current + 1 if s else 0
        longest = max(longest, current)
    leading = int(np.argmax(~silent)) if (~silent).any() else windows
    trailing = int(np.argmax(~silent[::-1])) if (~silent).any() else windows
    loud = levels_db[~silent]
    report.update({
        "rms_dbfs": _db(rms), "peak_dbfs": _db(peak),
        "crest_db": round(_db(peak) - _db(rms), 2) if rms > 0 else None,
        "clipped_share": round(float((np.abs(samples) >= 0.999).any(axis=1).mean()), 6),
        "silence_threshold_dbfs": silence_db, "window_s": window_s,
        "silence_share": round(float(silent.mean()), 4),
        "leading_silence_s": round(leading * hop / rate, 3), "trailing_silence_s": round(trailing * hop / rate, 3),
        "longest_silence_s": round(longest * hop / rate, 3),
        # spread of the non-silent windows' levels (95th - 10th percentile, as EBU's loudness range
        # takes them, without the K-weighting)
        "level_range_db": round(float(np.percentile(loud, 95) - np.percentile(loud, 10)), 2) if loud.size else None,
    })
    return report


def expand_media(inputs: Sequence[str | Path], suffixes: tuple[str, ...], *, frames_folders: bool = False) -> list[Path]:
    """Files given, and the matching files inside folders given (a folder of frames counts as
    one video when `frames_folders` and it holds no video files)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes and f.is_file())
            if found:
                out += found
            elif frames_folders and any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir()):
                out.append(p)
            else:
                raise InputFileError(f"{p} holds no {'/'.join(s.lstrip('.') for s in suffixes)} files",
                                     "pass files, or a folder that holds some")
        elif not p.is_file():
            raise InputFileError(f"{p} does not exist", "pass existing files or folders")
        elif p.suffix.lower() in (".mid", ".midi"):
            raise UsageError(f"{p.name} is MIDI", "measure MIDI with `studio eval music`, or render it first: studio music render")
        elif p.suffix.lower() not in suffixes:
            raise InputFileError(f"{p.name} is not a file this command reads", f"pass one of: {', '.join(suffixes)}")
        else:
            out.append(p)
    if not out:
        raise UsageError("nothing to measure", "pass one or more files")
    return out
