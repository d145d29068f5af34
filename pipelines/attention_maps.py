"""Cross-attention maps: which prompt words landed where (DAAM, Tang et al. 2022, "What the DAAM").

While the UNet denoises, every cross-attention layer computes softmax(Q K^T / sqrt(d)): for each
latent pixel, how much it attends to each prompt token. DAAM sums those maps over heads, layers
and steps, upsampled to one resolution, and reads one heatmap per word. No maintained library
does this for current diffusers (the `daam` package pins old diffusers/transformers), so it is
written here, small: a wrapper around each cross-attention processor that records the
probabilities and then calls the original processor unchanged, so an image made with maps on is
pixel-identical to one made with maps off.

Works for UNet models (SD 1.x/2.x, SDXL); transformer models (SD3, Flux) use joint attention
with no separate cross-attention to read.
"""

from __future__ import annotations

import math
from typing import Any

from studio.errors import UsageError


class _Recorder:
    """Wraps one attention processor; records cross-attention probabilities into the store."""

    def __init__(self, inner: Any, store: "CrossAttentionMaps"):
        self.inner = inner
        self.store = store

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            self.store.record(attn, hidden_states, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class CrossAttentionMaps:
    """Context manager: install recorders on a UNet's cross-attention layers, restore on exit.

    latent_hw: the latent (height, width) of the run; cfg: whether the batch holds an
    unconditional half first (classifier-free guidance), whose maps are skipped.
    """

    def __init__(self, unet: Any, latent_hw: tuple[int, int], cfg: bool):
        if unet is None or not hasattr(unet, "attn_processors"):
            raise UsageError("--attention-maps needs a UNet model (SD 1.x/2.x or SDXL)",
                             "drop --attention-maps for transformer models such as SD3 and Flux")
        self.unet = unet
        self.latent_hw = latent_hw
        self.cfg = cfg
        self.total = None  # (T, h, w) float32 sum over heads, layers and steps
        self.calls = 0
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> "CrossAttentionMaps":
        self._saved = dict(self.unet.attn_processors)
        wrapped = {name: (_Recorder(proc, self) if name.endswith("attn2.processor") else proc)
                   for name, proc in self._saved.items()}
        self.unet.set_attn_processor(wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None

    def record(self, attn: Any, hidden_states: Any, context: Any) -> None:
        import torch
        import torch.nn.functional as F

        batch = hidden_states.shape[0]
        keep = batch // 2 if self.cfg and batch % 2 == 0 else 0  # skip the unconditional half
        hs = hidden_states[keep:]
        ctx = context[keep:]
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q = attn.to_q(hs)  # (B, N, heads*d)
        k = attn.to_k(ctx)  # (B, T, heads*d)
        b, n, inner = q.shape
        d = inner // attn.heads
        q = q.view(b, n, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)
        k = k.view(b, -1, attn.heads, d).transpose(1, 2)  # (B, heads, T, d)
        probs = (q.float() @ k.float().transpose(-1, -2) * (d ** -0.5)).softmax(dim=-1)  # (B, heads, N, T)
        probs = probs.mean(dim=(0, 1))  # (N, T)
        h, w = self._layer_hw(n)
        maps = probs.T.reshape(1, -1, h, w)  # (1, T, h, w)
        maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)[0]  # (T, H, W)
        with torch.no_grad():
            self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def _layer_hw(self, n: int) -> tuple[int, int]:
        """The (h, w) of a layer with n latent pixels: the latent size divided by 2**k (rounded up)."""
        H, W = self.latent_hw
        for k in range(8):
            h, w = math.ceil(H / 2**k), math.ceil(W / 2**k)
            if h * w == n:
                return h, w
        side = int(math.sqrt(n))
        return side, n // side

    def token_maps(self) -> Any:
        """(T, H, W) maps summed over heads, layers and steps, or None when nothing was recorded."""
        return self.total


def word_maps(tokenizer: Any, text: str, maps: Any) -> list[tuple[str, Any]]:
    """[(word, (H, W) map)] for the words of `text`: BPE pieces of one word are summed (DAAM does
    the same), the start/end/padding tokens are left out."""
    ids = tokenizer(text, truncation=True, max_length=getattr(tokenizer, "model_max_length", 77)).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    words: list[tuple[str, Any]] = []
    current, acc = "", None
    for position, piece in enumerate(pieces):
        if piece in special or position >= maps.shape[0]:
            continue
        end = piece.endswith("</w>")
        current += piece.removesuffix("</w>")
        acc = maps[position] if acc is None else acc + maps[position]
        if end:
            words.append((current, acc))
            current, acc = "", None
    if acc is not None:
        words.append((current, acc))
    return words


def render(image: Any, words: list[tuple[str, Any]]) -> tuple[dict[str, Any], Any]:
    """({name: heatmap overlay PIL}, contact sheet PIL): a jet-coloured map per word blended over
    the image, and one sheet with the image and every word's overlay, labelled."""
    import cv2
    import numpy as np
    from PIL import Image, ImageDraw

    from studio.outputs import slugify

    W, H = image.size
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    overlays: dict[str, Any] = {}
    tiles = [("image", image.convert("RGB"))]
    for i, (word, amap) in enumerate(words):
        m = amap.float().cpu().numpy()  # (h, w)
        m = cv2.resize(m, (W, H), interpolation=cv2.INTER_CUBIC)
        m = np.clip((m - m.min()) / (m.max() - m.min() + 1e-8), 0.0, 1.0)
        heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
        blend = (0.5 * base + 0.5 * heat.astype(np.float32)).clip(0, 255).astype(np.uint8)
        pil = Image.fromarray(blend)
        overlays[f"attn-{i:02d}-{slugify(word, 24)}"] = pil
        tiles.append((word, pil))

    # contact sheet: tiles at least 128 px so labels stay readable for small images
    tile = max(128, min(256, max(W, H)))
    scale = tile / max(W, H)
    tw, th = max(1, round(W * scale)), max(1, round(H * scale))
    cols = min(6, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    label_h = 16
    sheet = Image.new("RGB", (cols * tw, rows * (th + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, pil) in enumerate(tiles):
        x, y = (i % cols) * tw, (i // cols) * (th + label_h)
        sheet.paste(pil.resize((tw, th), Image.Resampling.LANCZOS), (x, y))
        draw.text((x + 3, y + th + 2), label[:24], fill="black")
    return overlays, sheet
