"""Tiny random upscalers of the real diffusers classes, for tests and `studio models make-tiny`:
the SD x4 upscaler (StableDiffusionUpscalePipeline) and the SD x2 latent upscaler
(StableDiffusionLatentUpscalePipeline), each saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

from studio.pipelines.tiny.image import tiny_text_encoder, tiny_tokenizer


def make_tiny_sd_upscale(out: Path, seed: int = 0) -> None:
    """x4: a UNet that takes the noisy latents and the low-resolution image side by side (4 + 3
    channels) with the noise level as its class label, and a VAE that downscales by 4 (three
    levels), as stabilityai/stable-diffusion-x4-upscaler is built (diffusers' own test components)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=7,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8, num_class_embeds=100)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(), unet=unet,
                                          low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
                                          max_noise_level=99)
    pipe.save_pretrained(out, safe_serialization=True)


def make_tiny_sd_latent_upscale(out: Path, seed: int = 0) -> None:
    """x2 latent: a UNet on the noisy latents beside the (nearest-doubled) image latents (4 + 4
    channels), conditioned on the pooled text vector through time_cond_proj_dim (a 128-wide noise
    level embedding + the pooled 32), predicting one more channel than it keeps, as
    stabilityai/sd-x2-latent-upscaler is built."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=8,
                                out_channels=5, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8, time_cond_proj_dim=128 + 32)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    scheduler = EulerDiscreteScheduler(prediction_type="sample")
    pipe = StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
                                                unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)


def make_tiny_esrgan(out: Path, seed: int = 0) -> None:
    """A tiny random ESRGAN (RRDBNet, 4x) as the one `.safetensors` file people download
    (`tiny-esrgan-4x.safetensors`), built with spandrel's own architecture class so spandrel
    recognises it from its weights as it does a real one."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / "tiny-esrgan-4x.safetensors"))
