"""Captioning throughput: images per second one by one (--batch-size 1) vs batched, side by side.

    python benchmarks/caption_throughput.py                 # tiny BLIP, a small random BLIP, tiny LLaVA
    python benchmarks/caption_throughput.py --model blip-base --images 32   # a real model, if cached

Each model captions the same N images through the studio pipeline (the path `studio caption`
takes) with batch size 1 and with batch size B, alternating the two for several rounds and taking
the median, so a busy machine skews both alike. It prints images/s, the ratio, and whether the
batched captions equal the one-by-one ones (they should: padding must not change a caption).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def small_blip(out: Path) -> None:
    """A random BLIP of realistic shape but small (224 px, 16 px patches, width 256, 4+4 layers)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from studio.pipelines.tiny.caption import tiny_bert_tokenizer

    tok = tiny_bert_tokenizer()
    v = tok.get_vocab()
    text = dict(vocab_size=len(tok), hidden_size=256, encoder_hidden_size=256, intermediate_size=1024,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64, bos_token_id=v["[DEC]"],
                pad_token_id=0, sep_token_id=v["[SEP]"], eos_token_id=v["[SEP]"], initializer_range=0.2)
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                  patch_size=16, initializer_range=0.02)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, initializer_range=0.2))
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer=tok).save_pretrained(out)


def measure(model: str, images: list[str], batch: int, rounds: int, max_tokens: int) -> dict:
    from studio import Studio

    st = Studio(device="cpu")
    st.run("caption", images=images[:2], model=model, max_tokens=max_tokens, write=False)  # load + warm up
    rates: dict[int, list[float]] = {1: [], batch: []}
    captions: dict[int, list[str]] = {}
    for _ in range(rounds):
        for size in (1, batch):
            t0 = time.perf_counter()
            results = st.run("caption", images=images, model=model, max_tokens=max_tokens, batch_size=size, write=False)
            rates[size].append(len(images) / (time.perf_counter() - t0))
            captions[size] = [r.value for r in results]
    one, many = statistics.median(rates[1]), statistics.median(rates[batch])
    return {"one": one, "batched": many, "ratio": many / one, "agree": captions[1] == captions[batch]}


def main() -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="benchmark this model instead (alias, hub id or folder)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from studio.pipelines.tiny import make_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    rng = np.random.default_rng(0)
    images = []
    for i in range(args.images):  # photos of varied sizes: the processor resizes each
        h, w = int(rng.integers(200, 480)), int(rng.integers(200, 640))
        path = tmp / f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        images.append(str(path))

    if args.model:
        models = {args.model: args.model}
    else:
        models = {"tiny blip (make-tiny blip-caption)": str(make_tiny("blip-caption", tmp / "tiny-blip")),
                  "small blip (224px, w256, 4+4 layers)": str(tmp / "small-blip"),
                  "tiny llava (make-tiny vlm)": str(make_tiny("vlm", tmp / "tiny-vlm"))}
        (tmp / "small-blip").mkdir()
        small_blip(tmp / "small-blip")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, "
          f"batch {args.batch_size}, {args.max_tokens} new tokens, median of {args.rounds} rounds", flush=True)
    print(f"{'model':40s} {'one by one img/s':>17s} {'batched img/s':>14s} {'ratio':>6s}  same captions")
    for label, model in models.items():
        r = measure(model, images, args.batch_size, args.rounds, args.max_tokens)
        print(f"{label:40s} {r['one']:17.1f} {r['batched']:14.1f} {r['ratio']:6.2f}  {'yes' if r['agree'] else 'NO'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
