"""Tiny random video models: AnimateDiff (base + motion adapter + ControlNet), ModelScope
text-to-video, Stable Video Diffusion, Wan 2.1 and LTX-Video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.pipelines.video import ANIMATEDIFF_SCHEDULER


def _tiny_tokenizer() -> Any:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every byte is a token, so it
    needs no downloaded vocab and still tokenises any prompt the real way."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def _tiny_text_encoder(tokenizer: Any, hidden: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                                        intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=len(tokenizer), max_position_embeddings=32))


def make_tiny_animatediff(out: Path, seed: int = 0) -> None:
    """A tiny SD 1.5-architecture base (out/), a tiny MotionAdapter (out/motion_adapter/) and a
    matching tiny ControlNet (out/controlnet/). `--model out` finds the adapter beside the base;
    `--model out --motion-adapter out/motion_adapter` is the explicit base + adapter path."""
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, MotionAdapter, StableDiffusionPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    channels = (16, 32)
    unet = UNet2DConditionModel(block_out_channels=channels, layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=channels, in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=32)
    tokenizer = _tiny_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer, 32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, **ANIMATEDIFF_SCHEDULER)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    MotionAdapter(block_out_channels=channels, motion_layers_per_block=1, motion_norm_num_groups=8,
                  motion_num_attention_heads=2, motion_max_seq_length=8).save_pretrained(out / "motion_adapter")
    # the VAE downsamples 2x, so the ControlNet's image embedding must too (one stride-2 step)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(out / "controlnet")


def make_tiny_t2v(out: Path, seed: int = 0) -> None:
    """A tiny TextToVideoSDPipeline (ModelScope/zeroscope architecture: UNet3DConditionModel)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=32)
    tokenizer = _tiny_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    TextToVideoSDPipeline(vae=vae, text_encoder=_tiny_text_encoder(tokenizer, 32), tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler).save_pretrained(out)


def make_tiny_svd(out: Path, seed: int = 0) -> None:
    """A tiny StableVideoDiffusionPipeline (image-to-video; CLIP vision encoder, spatio-temporal UNet,
    temporal-decoder VAE), for tests of the --init path."""
    import torch
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    # its blocks hard-code 32 norm groups, hence 32/64 channels
    unet = UNetSpatioTemporalConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                            in_channels=8, out_channels=4, cross_attention_dim=16, num_attention_heads=2,
                                            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                                            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                                            projection_class_embeddings_input_dim=48, addition_time_embed_dim=16)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                       down_block_types=["DownEncoderBlock2D"] * 2)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, projection_dim=16, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=224, intermediate_size=32,
                                                             patch_size=32))  # SVD resizes to 224
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       interpolation_type="linear", num_train_timesteps=1000, prediction_type="v_prediction",
                                       sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
                                       timestep_type="continuous", use_karras_sigmas=True)
    StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                 feature_extractor=CLIPImageProcessor(crop_size=32, size=32)).save_pretrained(out)


def _tiny_t5(d_model: int, umt5: bool = False) -> tuple[Any, Any]:
    """(tokenizer, encoder) of the T5 family with a letters-only Unigram vocabulary built here,
    so no sentencepiece file is downloaded."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=64)
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    encoder = model_cls(config_cls(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return tokenizer, encoder


def make_tiny_wan(out: Path, seed: int = 0) -> None:
    """A tiny WanPipeline (Wan 2.1 text-to-video: UMT5 encoder, WanTransformer3DModel, Wan VAE)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer, encoder = _tiny_t5(32, umt5=True)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)).save_pretrained(out)


def make_tiny_ltx(out: Path, seed: int = 0) -> None:
    """A tiny LTXPipeline (T5 encoder, LTXVideoTransformer3DModel, LTX video VAE); the same
    weights run LTXImageToVideoPipeline for --init."""
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    tokenizer, encoder = _tiny_t5(32)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=1, caption_channels=32)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                decoder_causal=False)
    LTXPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(out)
