"""Tiny random Stable Diffusion family models (SD 1.x, SDXL, ControlNet, LoRA) of the real
diffusers classes, for tests and `studio models make-tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.pipelines.tiny.single_file import save_single_file


_TINY_WORDS = ("a an the of on in at with and by to cat dog fox bird horse red blue green yellow black white "
               "photo painting portrait drawing lighthouse dusk sea sky tree forest house car man woman girl boy "
               "mountain river city street night day sun moon hat garden flower castle robot astronaut cup").split()


def tiny_tokenizer() -> Any:
    """A real CLIPTokenizer with a tiny byte-level BPE (every byte, plus merges for common prompt
    words so attention maps and weighting tests have whole-word tokens); about 700 tokens."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP's byte -> printable unicode table (the BPE works on these characters)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_text_encoder(projection: bool = False, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    # four levels, so the VAE downscales by 8 like the real ones (sizes must be multiples of 8)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64)


def _tiny_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _tiny_sd_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), norm_num_groups=8)


def tiny_sd_pipeline(seed: int = 0) -> Any:
    """The tiny SD 1.x pipeline, in memory (64x64 by default, sizes in steps of 8)."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = _tiny_sd_unet()
    vae = _tiny_vae()
    text_encoder = tiny_text_encoder()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_tiny_sd(out: Path, seed: int = 0) -> None:
    """A tiny random Stable Diffusion 1.x (real UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
    CLIPTokenizer), saved with save_pretrained; plus the same weights as one A1111-layout
    `tiny-sd.safetensors` checkpoint for the from_single_file path."""
    pipe = tiny_sd_pipeline(seed)
    pipe.save_pretrained(out, safe_serialization=True)
    save_single_file(pipe, Path(out) / "tiny-sd.safetensors")


def _tiny_sdxl_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids * 8 + pooled 32
                                cross_attention_dim=64, norm_num_groups=8)  # 32 + 32 from the two encoders


def make_tiny_sdxl(out: Path, seed: int = 0) -> None:
    """A tiny random SDXL (two CLIP text encoders, text_time conditioning), 64x64 by default."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _tiny_sdxl_unet()
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=tiny_text_encoder(),
                                     text_encoder_2=tiny_text_encoder(projection=True), tokenizer=tiny_tokenizer(),
                                     tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_tiny_scheduler(),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)


def make_tiny_controlnet(out: Path, seed: int = 0) -> None:
    """A tiny random ControlNetModel that fits the tiny SD (`make-tiny sd`). Its zero convolutions
    get small random weights so the control map visibly steers the tiny model."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                                 attention_head_dim=(2, 4), norm_num_groups=8,
                                 conditioning_embedding_out_channels=(8, 8, 16, 16))  # 3 stride-2 convs: /8 like the VAE
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.normal_(module.bias, std=0.5)
    controlnet.save_pretrained(out, safe_serialization=True)


def make_tiny_lora(out: Path, seed: int = 0) -> None:
    """A tiny random LoRA for the tiny SD, on the UNet's attention and the text encoder's
    attention (as kohya/A1111 LoRAs are), saved with save_lora_weights as
    pytorch_lora_weights.safetensors. The text encoder's adapter is injected with peft directly:
    transformers 5's `add_adapter` insists on peft >= 0.22."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed + 2)
    unet, text_encoder = _tiny_sd_unet(), tiny_text_encoder()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text_encoder = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                           text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
        safe_serialization=True)
