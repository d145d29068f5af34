"""Tiny random models of real architectures, for smoke tests and for the test suite.

`studio models make-tiny KIND DIR` and the tests call the same builders: each builds a seeded
random model with a real library class and saves it with `save_pretrained`, so what is tested
is the same `from_pretrained(folder)` path a user's hub model takes (diffusers' own tests build
their `get_dummy_components` the same way). They live here, one module per family, apart from
the production pipelines they feed (ARCHITECTURE.md: test helpers are not pipeline code).
"""

from __future__ import annotations

from pathlib import Path

from studio.errors import UsageError
from studio.registry import import_string

# kind -> "module:builder"; strings, so naming the kinds (the CLI's help) imports no family
KINDS: dict[str, str] = {
    # images
    "sd": "studio.pipelines.tiny.image:make_tiny_sd",
    "sdxl": "studio.pipelines.tiny.image:make_tiny_sdxl",
    "controlnet": "studio.pipelines.tiny.image:make_tiny_controlnet",
    "lora": "studio.pipelines.tiny.image:make_tiny_lora",
    "ip-adapter": "studio.pipelines.tiny.adapters:make_tiny_ip_adapter",
    "ip-adapter-sdxl": "studio.pipelines.tiny.adapters:make_tiny_ip_adapter_sdxl",
    "t2i-adapter": "studio.pipelines.tiny.adapters:make_tiny_t2i_adapter",
    "sdxl-refiner": "studio.pipelines.tiny.adapters:make_tiny_sdxl_refiner",
    "sd-upscale": "studio.pipelines.tiny.upscale:make_tiny_sd_upscale",
    "sd-latent-upscale": "studio.pipelines.tiny.upscale:make_tiny_sd_latent_upscale",
    "esrgan": "studio.pipelines.tiny.upscale:make_tiny_esrgan",
    # seeing
    "blip-caption": "studio.pipelines.tiny.caption:make_tiny_blip_caption",
    "blip-vqa": "studio.pipelines.tiny.caption:make_tiny_blip_vqa",
    "vlm": "studio.pipelines.tiny.caption:make_tiny_vlm",
    "git": "studio.pipelines.tiny.caption:make_tiny_git",
    # clip
    "clip": "studio.pipelines.tiny.clip:make_tiny_clip",
    # music
    "midi-lm": "studio.pipelines.tiny.music_symbolic:make_tiny_midi_lm",
    "musicgen": "studio.pipelines.tiny.music_audio:make_tiny_musicgen",
    "musicgen-melody": "studio.pipelines.tiny.music_audio:make_tiny_musicgen_melody",
    # video
    "animatediff": "studio.pipelines.tiny.video:make_tiny_animatediff",
    "t2v": "studio.pipelines.tiny.video:make_tiny_t2v",
    "svd": "studio.pipelines.tiny.video:make_tiny_svd",
    "ltx": "studio.pipelines.tiny.video:make_tiny_ltx",
    "wan": "studio.pipelines.tiny.video:make_tiny_wan",
    # code
    "code-lm": "studio.pipelines.tiny.code:make_tiny_code_lm",
}


def make_tiny(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny `kind` model into `out_dir` and return the folder."""
    if kind not in KINDS:
        raise UsageError(f"unknown tiny model kind {kind!r}", f"kinds: {', '.join(KINDS)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty", "pick a new folder; studio never overwrites")
    out.mkdir(parents=True, exist_ok=True)
    builder = import_string(KINDS[kind])
    builder(out, seed=seed)
    return out
