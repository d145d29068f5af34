"""Tiny random image adapters of the real classes and file layouts, for tests and
`studio models make-tiny`: an IP-Adapter (the `image_proj.` + `ip_adapter.` safetensors layout of
h94/IP-Adapter, beside a CLIPVisionModelWithProjection image encoder), a T2I-Adapter
(diffusers' T2IAdapter) and an SDXL refiner (StableDiffusionXLImg2ImgPipeline with only the
second text encoder and the aesthetic-score conditioning, as stable-diffusion-xl-refiner-1.0).

Each fits the tiny base of the same family (`make-tiny sd`, `make-tiny sdxl`): the shapes that
must agree are taken from the same UNet builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.pipelines.tiny.image import _tiny_scheduler, _tiny_sd_unet, _tiny_vae, tiny_text_encoder, tiny_tokenizer


def _ip_adapter_state(unet_config: dict[str, Any], image_embed_dim: int) -> dict[str, Any]:
    """The IP-Adapter state dict as h94/IP-Adapter's files hold it: `image_proj.proj/norm` (the
    CLIP image embedding -> 4 extra context tokens) and `ip_adapter.N.to_k_ip/to_v_ip` for every
    cross-attention layer, numbered as the original code numbers attention processors (self- and
    cross-attention alternate, cross-attention takes the odd numbers: 1, 3, 5, ...). diffusers'
    own tests build their dummy IP-Adapters the same way (create_ip_adapter_state_dict)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    unet = UNet2DConditionModel(**unet_config)
    cross = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    state: dict[str, Any] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        proc = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0).state_dict()
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc["to_k_ip.0.weight"]
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc["to_v_ip.0.weight"]
        key_id += 2
    proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=image_embed_dim, num_image_text_embeds=4).state_dict()
    state.update({"image_proj.proj.weight": proj["image_embeds.weight"], "image_proj.proj.bias": proj["image_embeds.bias"],
                  "image_proj.norm.weight": proj["norm.weight"], "image_proj.norm.bias": proj["norm.bias"]})
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _tiny_image_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32, num_channels=3)
    return CLIPVisionModelWithProjection(config)


def _save_ip_adapter(out: Path, unet_config: dict[str, Any], seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed + 3)
    encoder = _tiny_image_encoder()
    encoder.save_pretrained(Path(out) / "image_encoder", safe_serialization=True)
    save_file(_ip_adapter_state(unet_config, encoder.config.projection_dim), str(Path(out) / "ip-adapter.safetensors"))


def make_tiny_ip_adapter(out: Path, seed: int = 0) -> None:
    """An IP-Adapter for the tiny SD: `ip-adapter.safetensors` and `image_encoder/` side by side,
    as h94/IP-Adapter's `models/` folder holds `ip-adapter_sd15.safetensors` and `image_encoder/`."""
    _save_ip_adapter(out, dict(_tiny_sd_unet().config), seed)


def make_tiny_ip_adapter_sdxl(out: Path, seed: int = 0) -> None:
    """The same for the tiny SDXL (its UNet's 64-wide cross-attention)."""
    from studio.pipelines.tiny.image import _tiny_sdxl_unet

    _save_ip_adapter(out, dict(_tiny_sdxl_unet().config), seed)


def make_tiny_t2i_adapter(out: Path, seed: int = 0) -> None:
    """A T2IAdapter for the tiny SD. The UNet adds adapter features where its down blocks end
    (after a DownBlock2D, inside a CrossAttnDownBlock2D); the tiny SD's first block is a
    DownBlock2D whose output is at half the latent size, so one 16-channel feature at 1/16 of the
    image (downscale_factor 16) is what fits it. Real adapters have one feature per UNet level
    (TencentARC's: 320, 640, 1280, 1280 at 1/8 .. 1/64)."""
    import torch
    from diffusers import T2IAdapter

    torch.manual_seed(seed + 4)
    adapter = T2IAdapter(in_channels=3, channels=[16], num_res_blocks=1, downscale_factor=16, adapter_type="full_adapter")
    with torch.no_grad():  # larger than the default init, so the map visibly steers the tiny model
        for p in adapter.parameters():
            p.mul_(3.0)
    adapter.save_pretrained(out, safe_serialization=True)


def make_tiny_sdxl_refiner(out: Path, seed: int = 0) -> None:
    """An SDXL refiner for the tiny SDXL: StableDiffusionXLImg2ImgPipeline with no first text
    encoder, a UNet conditioned on text_encoder_2 only (32 wide) and on 5 time ids (original
    size, crop, aesthetic score: requires_aesthetics_score=True, as the real refiner's config)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 5)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=5 * 8 + 32,  # 5 time ids * 8 + pooled 32
                                cross_attention_dim=32, norm_num_groups=8)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=_tiny_vae(), text_encoder=None,
                                            text_encoder_2=tiny_text_encoder(projection=True), tokenizer=None,
                                            tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_tiny_scheduler(),
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out, safe_serialization=True)
