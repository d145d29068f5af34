"""Issue 18, media and downloads: studio's files as other tools read them, and downloads of only
what loads. Clips keep their frame rate in GIF/WebP ticks and stream (MP4 faststart); `models
pull` picks one weight set from a hub-style file list; `auto` finds out quickly that the hub is
unreachable; the README's music, video and replay lines do what they say."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers
def mp4_top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order (ISO BMFF: 32-bit size + 4-char type, size 1
    means a 64-bit size follows, 0 means to the end of the file)."""
    data = path.read_bytes()
    boxes, i = [], 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = len(data) - i
        assert size >= 8, f"corrupt box at {i}"
        boxes.append(kind.decode("latin-1"))
        i += size
    return boxes


def ffmpeg_duration(path: Path) -> tuple[int, float, float]:
    """(decoded frames, decoded seconds, container Duration) read with imageio-ffmpeg's ffmpeg."""
    import re

    import imageio_ffmpeg

    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    header = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                            capture_output=True, text=True).stderr
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", header).groups()
    return frames, seconds, int(h) * 3600 + int(m) * 60 + float(s)


def pillow_frames(path: Path) -> list[int]:
    """Each frame's delay in ms as Pillow reads it (GIF: centiseconds x 10)."""
    with Image.open(path) as im:
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # WebP sets a frame's duration as it decodes it
            delays.append(im.info["duration"])
    return delays


def distinct_frames(n: int, size: int = 32) -> list[Image.Image]:
    """n frames that all differ (Pillow merges identical consecutive GIF frames)."""
    frames = []
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:, :, 0] = (i * 37) % 256
        a[i % size, :, 1] = 255
        frames.append(Image.fromarray(a))
    return frames


def write_clip(tmp_path: Path, fmt: str, fps: float, n: int) -> Path:
    from studio.outputs import OutputWriter, Result

    result = Result("video", distinct_frames(n), {"prompt": "a clip", "seed": 1, "fps": fps}, fmt=fmt)
    return OutputWriter(tmp_path / "out", task="video").write(result)


# ----------------------------------------------------------------------------- clip timing
@pytest.mark.parametrize("fps,n", [(8, 8), (8, 17), (24, 30), (30000 / 1001, 24), (12.5, 10)])
def test_gif_keeps_the_asked_rate_on_average(tmp_path, fps, n):
    gif = write_clip(tmp_path, "gif", fps, n)
    delays = pillow_frames(gif)
    assert len(delays) == n
    assert sum(delays) / 1000 == pytest.approx(n / fps, rel=0.01)
    assert all(d % 10 == 0 for d in delays)  # GIF's tick is the centisecond
    # as ffmpeg's GIF muxer: each frame ends at the floor of its true time in ticks
    assert all(abs(sum(delays[:k]) - 1000 * k / fps) < 10 for k in range(1, n + 1))
    if fps == 8:
        assert delays[:4] == [120, 130, 120, 130]


def test_webp_keeps_the_asked_rate_in_milliseconds(tmp_path):
    webp = write_clip(tmp_path, "webp", 24, 24)
    delays = pillow_frames(webp)
    assert len(delays) == 24 and sum(delays) == 1000  # a fixed int(1000/24) = 41 ms would play 1.6% fast


@pytest.mark.parametrize("fps,n", [(8, 8), (24, 30)])
def test_mp4_is_faststart_and_keeps_its_frames_and_duration(tmp_path, fps, n):
    mp4 = write_clip(tmp_path, "mp4", fps, n)
    boxes = mp4_top_level_boxes(mp4)
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # the index first: playable while downloading
    frames, seconds, container = ffmpeg_duration(mp4)
    assert frames == n
    assert seconds == pytest.approx(n / fps, rel=0.01) and container == pytest.approx(n / fps, rel=0.01)
