"""An SD 1.x diffusers pipeline written as one original-layout (A1111/LDM) .safetensors file.

Only the tiny SD uses it (`make-tiny sd` writes tiny-sd.safetensors beside its folder), so the
`from_single_file` path that users take with A1111 checkpoints is tested end to end offline.
diffusers converts LDM -> diffusers but ships no reverse converter as library code, hence this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ldm_unet_names(config: Any) -> dict[str, str]:
    """diffusers UNet key prefix -> original (LDM) prefix, for any number of levels and layers.
    The inverse of diffusers' convert_ldm_unet_checkpoint; the layout follows diffusers'
    scripts/convert_diffusers_to_original_stable_diffusion.py (Apache-2.0), generalised from
    SD's fixed 4 levels x 2 layers to the config's."""
    names = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    levels, layers = len(config.block_out_channels), config.layers_per_block
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    for i in range(levels):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            names[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            if down_attn[i]:
                names[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            names[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            if up_attn[i]:
                names[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
        if i < levels - 1:
            names[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attn[i] else 1}."
    names["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        names[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return names


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _to_ldm(sd: dict[str, Any], names: dict[str, str], prefix: str, renames: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in sd.items():
        new = key
        for hf, ldm in sorted(names.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(hf):
                rest = key[len(hf):]
                for a, b in renames.items():
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                new = ldm + rest
                break
        out[prefix + new] = value
    return out


def save_single_file(pipe: Any, path: Path) -> None:
    """Write an SD 1.x diffusers pipeline as one original-layout (A1111/LDM) .safetensors file, the
    format `from_single_file` reads. Used for the tiny model, so that path is tested end to end."""
    from safetensors.torch import save_file

    from studio.outputs import atomic_path

    unet = pipe.unet.state_dict()
    unet_names = _ldm_unet_names(pipe.unet.config)
    resnet_keys = {k for k in unet_names if ".resnets." in k}
    ckpt: dict[str, Any] = {}
    for key, value in unet.items():
        prefix = next((p for p in sorted(unet_names, key=len, reverse=True) if key.startswith(p)), None)
        renames = _RESNET if prefix in resnet_keys else {}
        ckpt.update(_to_ldm({key: value}, unet_names, "model.diffusion_model.", renames))

    vae_cfg = pipe.vae.config
    levels = len(vae_cfg.block_out_channels)
    vae_names = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                 "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    for part in ("encoder", "decoder"):
        for j in range(2):
            vae_names[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(levels):
        for j in range(vae_cfg.layers_per_block):
            vae_names[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < levels - 1:
            vae_names[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(vae_cfg.layers_per_block + 1):
            vae_names[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            vae_names[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for key, value in pipe.vae.state_dict().items():
        renames = _VAE_ATTN if ".attentions." in key else _VAE_RESNET
        if ".attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        ckpt.update(_to_ldm({key: value}, vae_names, "first_stage_model.", renames))

    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        ckpt["cond_stage_model.transformer." + key] = value
    ckpt = {k: v.contiguous() for k, v in ckpt.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(ckpt, str(tmp))
