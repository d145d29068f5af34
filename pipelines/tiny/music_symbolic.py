"""A tiny random GPT-2 over studio's default REMI tokenizer (the MIDI language model)."""

from __future__ import annotations

from pathlib import Path

from studio.pipelines.music_symbolic import default_tokenizer
from studio.progress import quiet_transformers


def make_tiny_midi_lm(out: Path, seed: int = 0) -> None:
    """A seeded random GPT-2 (about 170K parameters) over studio's default REMI tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = default_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2, n_inner=128,
                        bos_token_id=tokenizer["BOS_None"], eos_token_id=tokenizer["EOS_None"],
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save(Path(out) / "tokenizer.json")
