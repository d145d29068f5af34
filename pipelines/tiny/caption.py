"""Tiny random captioning / VQA / vision-language models (BLIP, LLaVA, GIT) with their processors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.pipelines.caption import CHAT_CAPTION_PROMPT


# A small English vocabulary so that the random tiny captioners print words, not [unused] ids.
_TINY_WORDS = (
    "a an the of on in with and at by near under over is are two three small large old young "
    "photo photograph picture painting drawing illustration portrait landscape close up view "
    "cat dog bird horse man woman child people group boy girl car bus bike boat train plane "
    "tree trees flower flowers grass field forest mountain mountains river lake sea beach sky "
    "cloud clouds sun sunset night city street road house building room table chair bed window "
    "red blue green yellow black white brown orange pink purple grey gold silver bright dark "
    "sitting standing walking running lying playing holding looking eating flying riding "
    "food plate cup glass book phone computer sign light lights water snow rain wall door floor "
    "what where who how many colour color is it this there yes no one four five"
).split()


def tiny_bert_tokenizer() -> Any:
    """A WordPiece tokenizer like BLIP's: BERT specials + [DEC] (the decoder's BOS) + [ENC]."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(_TINY_WORDS)) + ["[DEC]", "[ENC]"])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _tiny_blip(out: Path, seed: int, vqa: bool) -> None:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer = tiny_bert_tokenizer()
    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                eos_token_id=vocab["[SEP]"], initializer_range=0.2)
    # BLIP's init (vision ~1e-10, text 0.02) assumes pretrained weights follow; with these wider
    # random weights different images give different captions, which the tests rely on
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=32, initializer_range=0.02)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32,
                        initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (BlipForQuestionAnswering if vqa else BlipForConditionalGeneration)(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def make_tiny_blip_caption(out: Path, seed: int = 0) -> None:
    """A tiny random BlipForConditionalGeneration (~60K params) with its processor."""
    _tiny_blip(Path(out), seed, vqa=False)


def make_tiny_blip_vqa(out: Path, seed: int = 0) -> None:
    """A tiny random BlipForQuestionAnswering with its processor."""
    _tiny_blip(Path(out), seed, vqa=True)


# LLaVA-1.5's chat template (llava-hf), so the tiny VLM is prompted the way the real ones are
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def make_tiny_vlm(out: Path, seed: int = 0) -> None:
    """A tiny random LLaVA (CLIP vision tower + Llama decoder, ~70K params): an image-text-to-text
    chat model with a byte-level BPE tokenizer trained here, offline, and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)

    # 1. tokenizer: byte-level BPE trained on a few caption-like lines. Its alphabet is printable
    #    ASCII (the corpus' characters), so even a random model prints readable text.
    corpus = [" ".join(_TINY_WORDS[i:i + 8]) for i in range(0, len(_TINY_WORDS), 8)]
    corpus += ["USER: ASSISTANT:", CHAT_CAPTION_PROMPT, "What colour is the sky? How many people are there?",
               "".join(chr(c) for c in range(32, 127)) + "\n"]
    core = Tokenizer(BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", core.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"}, model_max_length=256,
                                        padding_side="left")
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    # 2. model: 32x32 images, 8x8 patches -> 16 image tokens (CLS dropped: strategy "default")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=16,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    # 3. processor: CLIP preprocessing at 32 px, LLaVA's <image> expansion, the chat template
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=_LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def make_tiny_git(out: Path, seed: int = 0) -> None:
    """A tiny random GIT (GitForCausalLM: CLIP vision encoder + BERT-style causal decoder) with a
    GitProcessor; GIT prompts differ from BLIP's ([CLS] + text, no [SEP]), so it gets its own test."""
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = tiny_bert_tokenizer()
    vocab = tokenizer.get_vocab()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=32)
    config = GitConfig(vision_config=vision, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                       bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"],
                       initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GitForCausalLM(config).eval()
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                             tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
