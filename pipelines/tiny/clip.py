"""A tiny random open_clip CLIP in open_clip's hub layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.outputs import atomic_path
from studio.pipelines.clip import CONFIG_NAME, ClipSource, create, save_clip_folder

# A tiny CLIP of the real ViT + text-transformer architecture: 2 layers per tower, width 32,
# 32x32 images in 8x8 patches, open_clip's bundled BPE vocabulary (so its SimpleTokenizer works
# unchanged) and 16-token captions. About 1.6M parameters, 1.5M of them the token embedding.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_tiny_clip(out: Path, seed: int = 0) -> None:
    """A seeded tiny random open_clip CLIP in open_clip's hub layout (`local-dir:` loads it)."""
    import torch

    out = Path(out)
    with atomic_path(out / CONFIG_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {}}, indent=2))
    source = ClipSource(model_name=f"local-dir:{out.resolve()}", label=str(out))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, _ = create(source, load_weights=False)  # open_clip's own init, seeded
    save_clip_folder(model, TINY_MODEL_CFG, out)


