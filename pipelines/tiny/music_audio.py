"""Tiny random MusicGen and MusicGen-melody models with their processors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from studio.progress import quiet_transformers


TINY_WORDS = ("a the and with of in piano guitar drums bass synth strings jazz rock pop lofi ambient calm upbeat "
              "warm bright slow fast beat melody song music").split()


def _tiny_t5_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer built offline: letters plus a few music words."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in string.ascii_lowercase + string.digits + "-,.'"]
    vocab += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_configs(tokenizer: Any, *, melody: bool) -> dict[str, Any]:
    from transformers import EncodecConfig, T5Config

    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    # 2 kHz audio, hop 40 -> 50 frames/s like the real 32 kHz EnCodec; 4 codebooks of 64 codes
    audio = EncodecConfig(sampling_rate=2000, upsampling_ratios=[8, 5], target_bandwidths=[1.2], codebook_size=64,
                          hidden_size=16, num_filters=4, num_lstm_layers=1, codebook_dim=16, num_residual_layers=1)
    decoder = dict(vocab_size=64, max_position_embeddings=160 if melody else 128, num_hidden_layers=2, ffn_dim=64,
                   num_attention_heads=2, hidden_size=32, num_codebooks=4, pad_token_id=64, bos_token_id=64)
    return {"text": text, "audio": audio, "decoder": decoder}


def _widen_init(model: Any, std: float = 0.2) -> None:
    """Re-draw the decoder's and projections' weight matrices wider than MusicGen's 0.02 init: at
    that init a tiny random decoder's logits barely move with its conditioning (0.03 logits), so
    the text and the melody would not change a single sampled code; at 0.2 they do (about 2)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and (name.startswith("decoder.") or "proj" in name):
                torch.nn.init.normal_(param, std=std)
        # EnCodec's codebooks start as zeros (a trained codec fills them): every code would decode
        # to the same sound. Random codebooks make the codes audible.
        for module in model.audio_encoder.modules():
            if hasattr(module, "embed") and hasattr(module, "embed_avg"):
                module.embed.normal_()
                module.embed_avg.copy_(module.embed)
                module.cluster_size.fill_(1.0)


def make_tiny_musicgen(out: Path, seed: int = 0) -> None:
    """A seeded random MusicGen (T5 + EnCodec + decoder, about 60K parameters) with its processor
    (T5 tokenizer + EncodecFeatureExtractor), saved like facebook/musicgen-small."""
    import torch
    from transformers import (EncodecFeatureExtractor, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, MusicgenProcessor)

    tokenizer = _tiny_t5_tokenizer()
    cfg = _tiny_configs(tokenizer, melody=False)
    torch.manual_seed(seed)
    with quiet_transformers():  # MusicGen's pad id (= codebook size) is outside the code vocabulary by design
        config = MusicgenConfig(text_encoder=cfg["text"], audio_encoder=cfg["audio"],
                                decoder=MusicgenDecoderConfig(**cfg["decoder"]))
        model = MusicgenForConditionalGeneration(config)
    _widen_init(model)
    model.generation_config.decoder_start_token_id = 64
    model.generation_config.pad_token_id = 64
    model.generation_config.do_sample = True
    model.generation_config.guidance_scale = 3.0
    with quiet_transformers():
        model.save_pretrained(out)
    processor = MusicgenProcessor(feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=2000),
                                  tokenizer=tokenizer)
    processor.save_pretrained(out)


def make_tiny_musicgen_melody(out: Path, seed: int = 0) -> None:
    """A seeded random MusicGen-melody. Its preprocessor_config.json is written as data:
    MusicgenMelodyFeatureExtractor cannot be built without torchaudio (see ChromaExtractor)."""
    import torch
    from transformers import (MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration)

    tokenizer = _tiny_t5_tokenizer()
    cfg = _tiny_configs(tokenizer, melody=True)
    torch.manual_seed(seed)
    with quiet_transformers():
        config = MusicgenMelodyConfig(text_encoder=cfg["text"], audio_encoder=cfg["audio"],
                                      decoder=MusicgenMelodyDecoderConfig(**cfg["decoder"]), num_chroma=12, chroma_length=16)
        model = MusicgenMelodyForConditionalGeneration(config)
    _widen_init(model)
    model.generation_config.decoder_start_token_id = 64
    model.generation_config.pad_token_id = 64
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    features = {"feature_extractor_type": "MusicgenMelodyFeatureExtractor", "processor_class": "MusicgenMelodyProcessor",
                "feature_size": 12, "sampling_rate": 2000, "hop_length": 256, "n_fft": 512, "chunk_length": 2,
                "num_chroma": 12, "padding_value": 0.0, "return_attention_mask": False, "stem_indices": [3, 2]}
    (Path(out) / "preprocessor_config.json").write_text(json.dumps(features, indent=2))
