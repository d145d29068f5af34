"""Mux: a video and a soundtrack into one MP4 (the last step of a storyboard pipeline file).

    steps:
      clip:  {task: video, init_image: "${hero.image}"}
      theme: {task: music-audio, prompt: "calm piano"}
      final: {task: mux, video: "${clip.video}", audio: "${theme.audio}", loop_video: true}

It runs the ffmpeg that imageio-ffmpeg ships (the binary the writer encodes MP4s with), so no
system ffmpeg is needed. The video stream is copied when it is already H.264 in an MP4, else
encoded with libx264; the audio becomes AAC. A registered task like any other: the engine loads it,
calls `check_inputs` and `run`, and the OutputWriter copies the muxed file into place. It loads no
model (`needs_model = False`), so the engine resolves none and builds no device for it.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from studio.errors import InputFileError, RuntimeFailure, UsageError
from studio.outputs import Result, library_versions, request_tag

if TYPE_CHECKING:  # types only (the contract: studio/pipeline.py)
    from studio.device import DeviceManager
    from studio.models import ModelSpec
    from studio.progress import Progress


@dataclass(frozen=True)
class MuxRequest:
    video: str = field(metadata={"kind": "video"})  # the video (mp4, webm, gif)
    audio: str = field(metadata={"kind": "audio"})  # the soundtrack (wav, flac, mp3, ogg)
    loop_video: bool = False  # repeat the video until the audio ends (a 1 s clip under a 10 s theme)
    shortest: bool = True  # end with the shorter stream (False: the longer one sets the length)
    audio_bitrate: str = "192k"  # AAC bitrate


class Mux:
    task = "mux"
    request_type = MuxRequest
    seedless = True  # nothing random: the same inputs give the same file
    needs_model = False  # no weights: the engine resolves no model and builds no device
    output_kinds = ("video",)  # a `file` result that later steps read as ${step.video}

    @classmethod
    def load(cls, spec: ModelSpec | None = None, device: DeviceManager | None = None) -> "Mux":
        return cls()

    def check_inputs(self, request: MuxRequest) -> None:
        for what, path in (("video", request.video), ("audio", request.audio)):
            p = Path(path)
            if not p.is_file():
                raise InputFileError(f"mux: {what} {p} does not exist", f"pass the {what} file (or a ${{step.{what}}} reference)")
        if not re.fullmatch(r"[1-9]\d{0,3}k", request.audio_bitrate):
            raise UsageError(f"mux: audio_bitrate {request.audio_bitrate!r} is not like 192k", "use e.g. 128k or 192k")

    def run(self, request: MuxRequest, progress: Progress | None = None) -> list[Result]:
        import imageio_ffmpeg

        # 1. check inputs
        self.check_inputs(request)
        video, audio = Path(request.video), Path(request.audio)
        # 2. the ffmpeg command: loop the video if asked, copy H.264 MP4, else encode
        # a looped input cannot be stream-copied: ffmpeg's -shortest then misses the end
        copy = video.suffix.lower() in (".mp4", ".m4v", ".mov") and not request.loop_video
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error"]
        if request.loop_video:
            cmd += ["-stream_loop", "-1"]
        cmd += ["-i", str(video), "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0"]
        cmd += ["-c:v", "copy"] if copy else ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
        cmd += ["-c:a", "aac", "-b:a", request.audio_bitrate]
        # the length, given outright: ffmpeg's -shortest alone overshoots by seconds with a looped
        # input (its muxer queue), so it is only the fallback when a duration cannot be read
        length = _length(video, audio, request)
        if length is not None:
            cmd += ["-t", f"{length:.3f}"]
        elif request.shortest or request.loop_video:
            cmd += ["-shortest"]
        # 3. run it into a private temp folder, removed once the Result is gone (the writer has
        # copied the file into place by then); weakref.finalize also covers an early exit
        workdir = Path(tempfile.mkdtemp(prefix="studio-mux-"))
        out = workdir / "mux.mp4"
        # the comment every studio MP4 carries (studio.outputs.request_tag: the request plus the task),
        # so `studio replay` remuxes from the file alone; the writer copies this file as it is
        tag = request_tag({"task": self.task, "studio_version": library_versions().get("studio")}, dataclasses.asdict(request))
        cmd += ["-movflags", "+faststart", "-metadata", "comment=" + tag, str(out)]
        if progress is not None:
            with progress.status("muxing video and audio"):
                done = subprocess.run(cmd, capture_output=True, text=True)
        else:
            done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeFailure(f"mux: ffmpeg failed: {last[:300]}", "check that the video and audio files play")
        # 4. the Result: a finished file the writer copies (kind "file", read as a video)
        result = Result(kind="file", value=out, params=dataclasses.asdict(request), fmt="mp4")
        weakref.finalize(result, shutil.rmtree, workdir, True)
        return [result]


def _length(video: Path, audio: Path, request: MuxRequest) -> float | None:
    """Seconds the muxed file should last: the audio's when the video loops, the shorter of the
    two with `shortest`, else None (ffmpeg keeps both whole)."""
    try:
        import soundfile

        audio_s = float(soundfile.info(str(audio)).duration)
        if request.loop_video:
            return audio_s
        if not request.shortest:
            return None
        import imageio_ffmpeg

        _, video_s = imageio_ffmpeg.count_frames_and_secs(str(video))
        return min(audio_s, float(video_s))
    except Exception:  # a format soundfile or the probe cannot read: let ffmpeg decide
        return None
