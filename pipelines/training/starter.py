"""Starter models: small models that studio trains itself, offline, on shapes world (see
shapes.py) or on data that ships inside installed packages, so that a fresh machine without
network gets output that follows the request. `studio train starter NAME` runs a recipe here.

Every recipe is reproducible and resumable:
  - its data is a pure function of the data seed (shapes world) or of an installed package's
    files (music21's Bach chorales, the interpreter's standard library);
  - the batch and the noise of step i come from a generator seeded with (seed, i), so a run
    resumed from a checkpoint takes exactly the steps an uninterrupted run would have taken;
  - each stage is one TrainingRun (pipelines/training/run.py) in WORK/STAGE/: a checkpoint in the
    shared layout (WORK/STAGE/checkpoints/step-NNNNNN/: the modules, EMA copies included, optimiser,
    LR scheduler, step, RNG state) is written every few minutes and at the end of the stage, so a
    killed run loses minutes, never a file; `--resume` continues from it and skips the stages
    that left WORK/STAGE.done. Work folders of the loop before it (WORK/STAGE.pt) resume through
    checkpoint.starter_v0 and are never rewritten;
  - `touch WORK/stop` ends the running stage early with a checkpoint (the next stages then run),
    for when the machine is slower than the recipe assumed;
  - the finished model is saved with save_pretrained as fp16 safetensors into OUT in one rename.

Each recipe also logs one JSON line per log interval to WORK/log.jsonl (stage, step, loss,
lr, steps_per_s, seconds), which is where the wall times in presets/models/starter-*.yaml come
from; each stage's TrainingRun keeps its own WORK/STAGE/metrics.jsonl beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from studio.errors import UsageError

STARTERS = ("image", "control", "caption", "vqa", "clip", "midi", "code")


# ----------------------------------------------------------------------------- shared training machinery
class Run:
    """Bookkeeping shared by the recipes: work folder, log, finished stages, progress, publishing.
    Each stage's steps and checkpoints are a TrainingRun (`train_loop`)."""

    def __init__(self, name: str, out: Path, work: Path | None, *, resume: bool, progress: Any = None,
                 checkpoint_every_s: float = 180.0):
        self.name, self.out = name, Path(out)
        self.work = Path(work) if work else self.out.with_name(self.out.name + ".train")
        self.resume, self.progress = resume, progress
        self.checkpoint_every_s = checkpoint_every_s  # <= 0: after every step
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        if not resume:  # a fresh start: the stages' folders go when each stage starts (train_loop)
            for stale in [*self.work.glob("*.pt"), *self.work.glob("*.done")]:
                stale.unlink()
            (self.work / "log.jsonl").unlink(missing_ok=True)

    def log(self, **fields: Any) -> None:
        from studio.outputs import append_jsonl

        append_jsonl(self.work / "log.jsonl", {"time": round(time.time() - self.t0, 1), **fields})

    def task(self, desc: str, total: int) -> Any:
        if self.progress is None:
            class _Null:
                def advance(self, n=1): pass
                def update(self, *a, **k): pass
            return _Null()
        return self.progress.task(desc, total=total)

    def done(self, stage: str) -> bool:
        """A finished stage leaves WORK/STAGE.done; resume skips it."""
        return self.resume and (self.work / f"{stage}.done").exists()

    def mark_done(self, stage: str) -> None:
        (self.work / f"{stage}.done").write_text(str(time.time() - self.t0))

    def publish(self, save: Callable[[Path], None]) -> Path:
        """save(tmp_folder) writes the finished model; it then replaces OUT in one rename."""
        from studio.outputs import atomic_path

        staged = self.out.with_name(self.out.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        with atomic_path(staged, is_dir=True) as tmp:
            save(Path(tmp))
            for path in [Path(tmp), *Path(tmp).rglob("*")]:  # mkdtemp makes 0700; shipped files are read by all
                path.chmod(0o755 if path.is_dir() else 0o644)
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.out, old)
            os.rename(staged, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, self.out)
        return self.out


def step_generator(seed: int, stage: str, step: int) -> Any:
    """The CPU generator of one training step: a pure function of (seed, stage, step)."""
    import zlib

    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + step) % (2**63))


def train_loop(run: Run, stage: str, *, steps: int, params: list, lr: float, modules: dict[str, Any],
               loss_fn: Callable[[int, Any], Any], log_every: int = 25, warmup: int = 50,
               weight_decay: float = 0.0, after_step: Callable[[int], None] | None = None) -> None:
    """AdamW with linear warmup and cosine decay, as one TrainingRun in WORK/STAGE/ that
    checkpoints `modules` (all the stage changes: an EMA copy is one more module), optimiser,
    scheduler, step and RNG. A stage finished before a --resume loads its last checkpoint and
    sets the generators as the uninterrupted run left them, so the stages after it draw alike."""
    import torch

    from studio.device import DeviceSettings, get_device_manager
    from studio.pipelines.training.checkpoint import (find_checkpoints, load_modules, restore_rng, save_modules,
                                                      starter_v0)
    from studio.pipelines.training.run import TrainingRun

    folder = run.work / stage
    if not run.resume:
        shutil.rmtree(folder, ignore_errors=True)
    older = starter_v0(folder)  # WORK/STAGE.pt of the loop before TrainingRun (Run removed it unless resuming)
    resume = run.resume and bool(older or find_checkpoints(folder))
    config = {"starter": run.name, "stage": stage, "steps": steps, "lr": lr, "warmup": warmup,
              "weight_decay": weight_decay, "log_every": log_every}
    # TrainingRun refuses to resume from a pickle unless allowed: WORK/STAGE.pt is one, which
    # studio wrote into its own work folder and reads with weights_only=True (tensors, no code),
    # as the loop that wrote it did. The starters train in fp32 on the CPU, as their cards assume.
    trun = TrainingRun(folder, config, device=get_device_manager(DeviceSettings(device="cpu", precision="fp32")),
                       progress=run.progress, resume=resume, older=older, allow_pickle=bool(older))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    every_step = run.checkpoint_every_s <= 0
    running: float | None = None  # the smoothed loss log.jsonl reports, carried across a resume

    def load(path: Path) -> None:
        if trun.checkpoint.layout == "starter-v0":  # its reader returns the weights as "module.key" tensors
            torch.nn.ModuleDict(modules).load_state_dict(trun.state().tensors)
        else:
            load_modules(modules)(path)

    trun.track(optimizer=opt, scheduler=sched, save_model=save_modules(modules), load_model=load,
               state=lambda: ({"running": running}, {}))
    state = trun.restore()
    if state is not None:
        running = state.extra.get("running")
    if run.done(stage) and state is not None:
        if state.rng:
            restore_rng(state.rng)
        for m in modules.values():
            m.eval()
        return

    def step_fn(step: int) -> dict[str, Any]:
        nonlocal running
        loss = loss_fn(step, step_generator(0, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        return {"loss": value, "lr": sched.get_last_lr()[0], "smoothed": running}

    def on_step(step: int, row: dict[str, Any]) -> None:
        if step % log_every == 0 or step == steps:
            run.log(stage=stage, step=step, loss=round(row["smoothed"], 5), lr=row["lr"],
                    steps_per_s=round(row["samples_per_s"], 3))

    for m in modules.values():
        m.train()
    trun.fit(step_fn, total=steps, log_every=log_every, on_step=on_step, description=f"{run.name}: {stage}",
             show={"smoothed": "avg"}, save_every=1 if every_step else 0,
             save_every_s=None if every_step else run.checkpoint_every_s,
             stop_file=run.work / "stop")  # `touch WORK/stop`: end this stage here, keep what it learned
    if trun.step < steps:
        run.log(stage=stage, stopped_at=trun.step)
    for m in modules.values():
        m.eval()
    run.mark_done(stage)


# ----------------------------------------------------------------------------- tokenizer for shapes-world text
def shapes_vocabulary_corpus() -> list[str]:
    """Every word shapes-world captions, questions and answers use (the tokenizer is trained on
    these, so each word is one token)."""
    from studio.pipelines.training import shapes as S

    words = set()
    for s in S.samples(12345, 3000, two_shapes=0.5):
        words.update(s.caption.replace(",", " ,").split())
        for q, a in s.vqa:
            words.update(q.replace("?", " ?").split())
            words.add(a)
    return sorted(words)


def clip_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE (vocab + merges, '</w>' word ends, byte-to-unicode alphabet) in which
    each of `words` is one token, while any other text still tokenizes (character by character)
    instead of failing. This is the textbook BPE training loop (merge the most frequent adjacent
    pair until every word is one symbol) with ties broken alphabetically; the `tokenizers`
    trainer breaks ties differently from run to run (two runs gave different merges), and a
    starter must retrain to the same bytes."""
    from collections import Counter

    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # CLIP's byte-to-unicode characters
    split = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for syms in split.values() for p in zip(syms, syms[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in split.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            split[w] = out
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = set(alphabet) | {ch + "</w>" for ch in alphabet} | {a + b for a, b in merges}
    vocab = {t: i for i, t in enumerate(specials + sorted(tokens, key=lambda t: (len(t), t)))}
    return vocab, merges


def clip_tokenizer(max_length: int = 32) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe(shapes_vocabulary_corpus())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def diffusion_loss(noise_sched: Any, pred_fn: Callable[[Any, Any], Any], z0: Any, t: Any, noise: Any,
                   weight_floor: float = 0.0) -> Any:
    """The starters' denoising loss: v-prediction or epsilon (as the scheduler's config says) with
    min-SNR-5 weighting (Hang et al. 2023), which converges several times faster than plain MSE.
    pred_fn(noisy latents, t) -> the model's prediction.

    weight_floor: min-SNR weighs a timestep's x0 error by min(SNR, 5), so the noisiest timesteps
    (SNR 0.01-0.3), where the layout is decided, count 0.01-0.3 as much. The first 32 px image starter
    learnt colour and shape but put its shape where it liked (5 of 24 held-out prompts in the named
    place, chance 1 in 5); a floor of 1 weighs them as plain v-prediction MSE does."""
    import torch

    alphas = noise_sched.alphas_cumprod
    pred = pred_fn(noise_sched.add_noise(z0, noise, t), t)
    snr = alphas[t] / (1 - alphas[t])
    x0_weight = torch.clamp(torch.clamp(snr, max=5.0), min=weight_floor)
    if noise_sched.config.prediction_type == "v_prediction":
        target, weight = noise_sched.get_velocity(z0, noise, t), x0_weight / (snr + 1)
    else:
        target, weight = noise, x0_weight / snr
    return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


# ----------------------------------------------------------------------------- starter-image
@dataclass(frozen=True)
class ImageRecipe:
    seed: int = 0  # data seed of the training split (evaluation uses seed 1)
    size: int = 64  # image side in pixels of what the model draws
    latent_size: int = 16  # the UNet's latent side; its autoencoder sees the image at 2x this (32 px)
    # training examples, each one prompt as people type it (shapes.training_prompt) and its image
    n_train: int = 20000
    # fine-tune from this image model (alias or folder) instead of training text encoder, UNet and
    # the 32 px autoencoder from scratch: its UNet must have latent_size latents
    init: str | None = None
    vae_steps: int = 1200  # 32 px autoencoder steps (from scratch only; batch vae_batch)
    vae_batch: int = 32
    vae_channels: tuple[int, ...] = (32, 32)  # 2 levels: 32 px -> 16x16x4 latents; TAESD needs one width
    unet_steps: int = 5000  # denoiser steps (batch unet_batch)
    unet_batch: int = 32
    unet_channels: tuple[int, ...] = (32, 64, 96)  # attention only below the full latent resolution
    # with --init: keep its autoencoder and text encoder, train a new UNet of unet_channels. Measured:
    # the 64 px starter's UNet, fine-tuned 700 more steps on prompts 85% of which name a place, still
    # put the shape in the named place 0.12 of the time (chance 0.2): a UNet that learnt to ignore
    # places does not unlearn it
    fresh_unet: bool = False
    # share of the prompts that name no place kept in the training data (1.0: training_prompt's mix, 58%
    # naming a place; 0.5: 73%). Places are what the model learns last
    unplaced_keep: float = 1.0
    text_width: int = 64  # CLIP text encoder width (2 layers)
    # std of the text encoder's token embeddings (CLIP initialises them at 0.02). Measured: at 0.02
    # the encoder's states for "...on the left..." and "...on the right..." differed by 10% of their
    # size (the shared words and positions dominate), and a UNet fed them had not learnt to place a
    # shape after 500 steps on position-only data (the 32 px starter never did in 4000); at 1.0 each
    # word stays itself through the two layers and it placed shapes by step 400. A fine-tuned
    # encoder's embeddings are rescaled to this std.
    token_embedding_std: float = 1.0
    upscale_steps: int = 1500  # the 64 px autoencoder: decoder from the 16x16 latents, encoder distilled
    upscale_channels: tuple[int, ...] = (32, 32, 32)  # 3 levels: 64 px <-> 16x16 latents
    lr_vae: float = 2e-3
    lr_unet: float = 2e-3
    lr_finetune: float = 2e-3  # the UNet's learning rate when it starts from --init
    prediction_type: str = "v_prediction"  # well posed at every noise level, unlike epsilon (see train_image)
    # loss weight floor at high noise (see diffusion_loss): where the shape goes is decided there
    weight_floor: float = 1.0
    ema_decay: float = 0.999  # the shipped UNet and text encoder are the EMA of the trained ones
    drop_caption: float = 0.1  # share of empty captions, so classifier-free guidance works

    def __post_init__(self) -> None:
        # settings that cannot work, refused before a work folder exists or any stage runs
        depth = len(self.unet_channels)
        if self.latent_size % 2 ** (depth - 1):
            raise UsageError(f"{depth} UNet levels do not divide {self.latent_size}x{self.latent_size} latents",
                             f"give unet_channels at most {int(math.log2(self.latent_size)) + 1} entries")
        if not 0 < self.unplaced_keep <= 1:
            raise UsageError(f"--set unplaced_keep={self.unplaced_keep}: a share of prompts, above 0 and at most 1",
                             "e.g. --set unplaced_keep=0.5")


def _render_split(seed: int, n: int, size: int, two_shapes: float = 0.0) -> tuple[Any, list]:
    import numpy as np

    from studio.pipelines.training import shapes as S

    items = list(S.samples(seed, n, two_shapes=two_shapes))
    images = np.stack([np.asarray(S.render(s, size)[0]) for s in items])  # (N, H, W, 3) uint8
    return images, items


def cached_prompts(work: Path, seed: int, n: int, sizes: tuple[int, ...],
                   unplaced_keep: float = 1.0) -> tuple[list, dict[int, Any], Any]:
    """The first n training prompts of split `seed` (shapes.training_prompts), their images at each
    of `sizes` (uint8 N,H,W,3) and masks at the largest; the pixels are cached in WORK so a resumed
    run does not draw them again."""
    import numpy as np

    from studio.pipelines.training import shapes as S
    from studio.outputs import atomic_path

    import zlib

    prompts = S.training_prompts(seed, n, unplaced_keep=unplaced_keep)
    key = zlib.crc32("\n".join(p.text for p in prompts).encode())  # changed phrasing: other pixels, other file
    images = {}
    for size in sizes:
        path = Path(work) / f"prompts-{seed}-{n}-{size}-{key:08x}.npy"
        if not path.exists():
            arr = np.stack([np.asarray(S.render(p.target, size)[0]) for p in prompts])
            with atomic_path(path, overwrite=True) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        images[size] = np.load(path)
    masks = np.stack([np.asarray(S.render(p.target, max(sizes))[1]) for p in prompts])  # (N, H, W) 0/255
    return prompts, images, masks


def _to_unit(images_u8: Any) -> Any:
    import torch

    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (N, 3, H, W) in [-1, 1]


def decode_ceiling(encode: Callable[[Any], Any], decode: Callable[[Any], Any], *, enc_size: int, dec_size: int,
                   n: int = 20) -> dict[str, Any]:
    """The pixel checker on the autoencoder's reconstructions of held-out prompts' images (n per
    family): what a perfect denoiser could score at best through it."""
    import numpy as np
    import torch

    from studio.pipelines.training import shapes as S

    prompts = S.eval_prompts(1, n)
    x = _to_unit(np.stack([np.asarray(S.render(p.target, enc_size)[0]) for p in prompts]))
    with torch.no_grad():
        rec = decode(encode(x))
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert rec_u8.shape[1] == dec_size
    report = S.follow_report([np.ascontiguousarray(r) for r in rec_u8], prompts)
    return {k: report[k] for k in ("min_prompt_following", "prompt_following", "position_accuracy", "size_accuracy")}


def image_tokenizer(work: Path) -> Any:
    """The BPE in which every word of the training prompts is one token (shapes.prompt_words),
    kept in WORK: a resumed run must reuse the ids the text encoder learned."""
    from transformers import CLIPTokenizer

    from studio.pipelines.training import shapes as S

    if not (work / "tokenizer").is_dir():
        vocab, merges = clip_bpe(S.prompt_words())
        CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32).save_pretrained(work / "tokenizer")
    return CLIPTokenizer.from_pretrained(work / "tokenizer")  # loaded either way: same saved bytes


def _text_encoder(recipe: ImageRecipe, tokenizer: Any, init: Any = None) -> Any:
    """A 2-layer CLIP text encoder for `tokenizer`; with `init` (a CLIPTextModel with another
    vocabulary), its weights, and the embedding of each token both vocabularies share."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    base = dict(hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, projection_dim=recipe.text_width)
    if init is not None:
        base = {k: getattr(init[0].config, k) for k in base}
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **base))
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=recipe.token_embedding_std)
    if init is not None:
        old_model, old_tokenizer = init
        state = {k: v for k, v in old_model.state_dict().items() if "token_embedding" not in k}
        model.load_state_dict(state, strict=False)
        old_vocab, old_emb = old_tokenizer.get_vocab(), old_model.get_input_embeddings().weight
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            shared = [(i, old_vocab[token]) for token, i in vocab.items() if token in old_vocab]
            rows = old_emb[[j for _, j in shared]]
            emb[[i for i, _ in shared]] = rows * (recipe.token_embedding_std / float(rows.std()))
    return model


def _new_unet(recipe: ImageRecipe, text_width: int) -> Any:
    """A fresh UNet2DConditionModel with recipe.unet_channels levels. Self/cross attention at the
    full 16x16 latent resolution cost 2x the step time and the prompt's attributes are global
    (colour, shape, place): attention only on the coarser levels."""
    from diffusers import UNet2DConditionModel

    depth = len(recipe.unet_channels)
    return UNet2DConditionModel(
        sample_size=recipe.latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=recipe.unet_channels, norm_num_groups=16,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        cross_attention_dim=text_width, attention_head_dim=8)


def train_image(run: Run, recipe: ImageRecipe) -> dict[str, Any]:
    import copy

    import torch
    from diffusers import AutoencoderTiny, DDPMScheduler

    torch.manual_seed(recipe.seed)
    # the side the latent autoencoder sees: 32 px from scratch; an init model's own (32 px for the
    # first starter, 64 px for one made by this recipe, whose autoencoder is then kept)
    init = _base_pipeline(recipe.init) if recipe.init else None
    base_size = recipe.latent_size * (init.vae_scale_factor if init is not None else 2)
    # 1. data: prompts as people type them, one shape each; unnamed attributes drawn at random and
    # the background white unless named (shapes.prompt)
    prompts, pixels, _ = cached_prompts(run.work, recipe.seed, recipe.n_train, (base_size, recipe.size),
                                       recipe.unplaced_keep)
    captions = [p.text for p in prompts]
    run.log(stage="data", n=len(prompts), families={f: sum(p.family == f for p in prompts) for f in dict.fromkeys(p.family for p in prompts)})

    tokenizer = image_tokenizer(run.work)
    if recipe.init:
        # 2a. fine-tune: the init model's 32 px autoencoder (its latents are what its UNet draws),
        # UNet, and text encoder moved onto the new vocabulary
        if init.unet.config.sample_size != recipe.latent_size or init.unet.config.in_channels != 4:
            raise UsageError(f"--init {recipe.init}: its UNet draws {init.unet.config.sample_size}x"
                             f"{init.unet.config.sample_size} latents, this recipe {recipe.latent_size}x{recipe.latent_size}",
                             "start from a starter-image model, or leave out --init")
        if base_size not in (2 * recipe.latent_size, recipe.size):
            raise UsageError(f"--init {recipe.init}: its autoencoder maps {base_size} px to latents, this recipe "
                             f"{2 * recipe.latent_size} or {recipe.size} px", "start from a starter-image model")
        vae = init.vae
        scaling = float(vae.config.scaling_factor)
        text_encoder = _text_encoder(recipe, tokenizer, (init.text_encoder, init.tokenizer))
        unet = _new_unet(recipe, text_encoder.config.hidden_size) if recipe.fresh_unet else init.unet
        run.log(stage="init", init=str(recipe.init), scaling_factor=scaling)
    else:
        # 2b. the autoencoder: diffusers' AutoencoderTiny (the TAESD architecture; StableDiffusionPipeline
        # takes it as its vae). Measured here: a GroupNorm AutoencoderKL of this size still returned
        # washed-out mean colours after 190 and 380 steps (MSE 0.20), because per-image normalisation makes it
        # learn absolute colours slowly; TAESD's plain conv+ReLU blocks have no such normalisation. Two
        # levels (16x16x4 latents for 32 px): with three (8x8x4) the checker scored only 0.50 on the
        # VAE's own reconstructions (blurred squares read as circles), a ceiling no denoiser can pass.
        levels = len(recipe.vae_channels)
        vae = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=recipe.vae_channels,
                              decoder_block_out_channels=recipe.vae_channels,
                              num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels, latent_channels=4)
        images = _to_unit(pixels[base_size])

        def vae_loss(step: int, g: Any) -> Any:
            x = images[torch.randint(0, len(images), (recipe.vae_batch,), generator=g)]
            return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latents).sample, x)

        train_loop(run, "vae", steps=recipe.vae_steps, params=list(vae.parameters()), lr=recipe.lr_vae,
                   modules={"vae": vae}, loss_fn=vae_loss)
        scaling = None
        text_encoder = _text_encoder(recipe, tokenizer)
        unet = _new_unet(recipe, recipe.text_width)
    vae.requires_grad_(False).eval()

    # 3. encode the training set once (posterior means); latents scaled to unit variance as SD does
    # (a fine-tuned UNet keeps its model's scale)
    with torch.no_grad():
        raw = torch.cat([vae.encode(_to_unit(pixels[base_size][i:i + 256])).latents
                         for i in range(0, recipe.n_train, 256)])  # (N, 4, h, w)
    scaling = scaling or float(1.0 / raw.std())
    latents = raw * scaling
    run.log(stage="latents", shape=list(latents.shape), scaling_factor=scaling)

    # 4. text encoder + UNet, trained together
    # v-prediction: with the cosine schedule alpha reaches ~0 at the last timesteps, where an epsilon
    # model cannot say anything about the image (the first session's epsilon UNet sampled latents
    # at 4-5x the data's std); v = alpha*eps - sigma*x0 is well posed at every noise level
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                prediction_type=recipe.prediction_type, clip_sample=False)
    # tokenize every caption once, exactly as StableDiffusionPipeline will at inference
    ids = tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=32, return_tensors="pt").input_ids
    # exponential moving average of the weights, the standard for diffusion models: it samples far
    # cleaner than the last iterate of a short, high learning rate run
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    live = list(unet.parameters()) + list(text_encoder.parameters())
    shadow = list(ema_unet.parameters()) + list(ema_text.parameters())

    def ema_update(step: int) -> None:
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))  # warm-up: early steps average less
        with torch.no_grad():
            torch._foreach_lerp_(shadow, live, 1 - decay)

    def unet_loss(step: int, g: Any) -> Any:
        idx = torch.randint(0, len(latents), (recipe.unet_batch,), generator=g)
        z0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(recipe.unet_batch, generator=g) < recipe.drop_caption
        tok[drop] = empty[0]
        t = torch.randint(0, 1000, (recipe.unet_batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        text = text_encoder(tok).last_hidden_state
        return diffusion_loss(noise_sched, lambda zt, t: unet(zt, t, text).sample, z0, t, noise,
                              weight_floor=recipe.weight_floor)

    train_loop(run, "unet", steps=recipe.unet_steps, params=live,
               lr=recipe.lr_finetune if recipe.init else recipe.lr_unet,
               modules={"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text},
               loss_fn=unet_loss, after_step=ema_update if recipe.ema_decay else None)
    if recipe.ema_decay:
        unet, text_encoder = ema_unet, ema_text

    # 5. the 64 px autoencoder (a 3-level AutoencoderTiny, so the pipeline's vae_scale_factor is 4 and
    # `height=64` means 16x16 latents): its decoder learns to draw the 64 px image from the 16x16
    # latents the UNet makes (shapes world renders exactly at any size), its encoder to give the
    # latents the 32 px encoder gives (img2img and the ControlNet's training go through it). Cheaper
    # than a UNet on 32x32 latents (4x the step time) and the UNet stays as it is.
    if base_size == recipe.size:  # the init model's autoencoder already draws `size` px
        vae64 = vae
        return _save_image(run, vae64, text_encoder, tokenizer, unet, noise_sched)
    levels = len(recipe.upscale_channels)
    vae64 = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=recipe.upscale_channels,
                            decoder_block_out_channels=recipe.upscale_channels, num_encoder_blocks=(1,) * levels,
                            num_decoder_blocks=(1,) * levels, latent_channels=4, scaling_factor=scaling)
    if 2 ** (levels - 1) * recipe.latent_size != recipe.size:
        raise UsageError(f"{levels} autoencoder levels do not map {recipe.latent_size}x{recipe.latent_size} latents "
                         f"to {recipe.size} px", "pick upscale_channels with log2(size / latent_size) + 1 entries")
    big = pixels[recipe.size]

    def upscale_loss(step: int, g: Any) -> Any:
        idx = torch.randint(0, len(big), (recipe.vae_batch,), generator=g)
        x = _to_unit(big[idx.numpy()])
        z = raw[idx]
        # L1: sharper edges than MSE; the encoder matches the 32 px encoder's latents
        return (torch.nn.functional.l1_loss(vae64.decode(z).sample, x)
                + torch.nn.functional.mse_loss(vae64.encode(x).latents, z))

    train_loop(run, "upscale", steps=recipe.upscale_steps, params=list(vae64.parameters()), lr=recipe.lr_vae,
               modules={"vae": vae64}, loss_fn=upscale_loss)
    vae64.eval()
    run.log(stage="upscale", ceiling_from_32px_latents=decode_ceiling(
        lambda x: vae.encode(x).latents, lambda z: vae64.decode(z).sample, enc_size=base_size, dec_size=recipe.size),
        ceiling_own=decode_ceiling(lambda x: vae64.encode(x).latents, lambda z: vae64.decode(z).sample,
                                   enc_size=recipe.size, dec_size=recipe.size))

    return _save_image(run, vae64, text_encoder, tokenizer, unet, noise_sched)


def _save_image(run: Run, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, noise_sched: Any) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # 6. one standard diffusers folder, fp16 safetensors
    # lambda_min_clipped: diffusers' DPM-Solver needs it with the cosine schedule, whose last
    # timestep has alpha ~ 0 (without it the first step blows the latents up: pure colour noise)
    scheduler = DPMSolverMultistepScheduler.from_config(noise_sched.config, lambda_min_clipped=-5.1)

    def save(folder: Path) -> None:
        # the text encoder stays float32 (0.4 MB): transformers loads a model in its saved dtype while
        # diffusers loads float32, so a plain StableDiffusionPipeline.from_pretrained(folder) on a CPU
        # would otherwise feed fp16 text features into a float32 UNet and fail
        pipe = StableDiffusionPipeline(vae=vae.half(), text_encoder=text_encoder.float(), tokenizer=tokenizer,
                                       unet=unet.half(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="4MB")  # every file < 5 MB

    run.publish(save)
    return {"params": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters())}}


# ----------------------------------------------------------------------------- entry point
SMOKE: dict[str, dict[str, Any]] = {
    "image": dict(n_train=64, vae_steps=2, unet_steps=2, upscale_steps=2, vae_batch=4, unet_batch=4),
}
RECIPES: dict[str, tuple[type, Callable]] = {
    "image": (ImageRecipe, train_image),
}


# per-starter recipe defaults beyond the dataclass's (caption and vqa share BlipRecipe)
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {"vqa": {"init": "starter-caption", "steps": 6000, "phrasings": True,
                                                      "two_shapes": 0.5, "hard_families": ("exists", "binding")}}


def train_starter(name: str, out: Path, *, steps: int | None = None, resume: bool = False, smoke: bool = False,
                  work: Path | None = None, seed: int = 0, progress: Any = None,
                  checkpoint_every_s: float = 180.0, init: str | None = None,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train starter NAME into OUT. steps overrides the main stage's steps; smoke: a few steps
    on a tiny data set (what CI runs); settings: other recipe fields (`--set KEY=VALUE`), so a
    model card's command names every value its run differed in."""
    if name not in RECIPES:
        raise UsageError(f"unknown starter {name!r}", f"pick one of: {', '.join(RECIPES)}")
    recipe_cls, fn = RECIPES[name]
    recipe = recipe_cls(seed=seed, **RECIPE_DEFAULTS.get(name, {}))
    if smoke:
        recipe = replace(recipe, **SMOKE[name])
    main = {"image": "unet_steps"}.get(name, "steps")
    if steps is not None:
        recipe = replace(recipe, **{main: steps})
    if init is not None:
        if not hasattr(recipe, "init"):
            raise UsageError(f"starter {name} cannot start from another model's weights", "leave out --init")
        recipe = replace(recipe, init=init)
    if settings:
        fields = {f.name: f for f in dataclasses.fields(recipe)}
        unknown = [k for k in settings if k not in fields or k in ("seed", "init")]
        if unknown:
            raise UsageError(f"starter {name} has no recipe setting {unknown[0]!r}",
                             f"settings: {', '.join(k for k in fields if k not in ('seed', 'init'))} (--seed and --init are options)")
        typed = {}
        for key, value in settings.items():
            default = getattr(recipe, key)
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if default is not None and value is not None and not isinstance(value, type(default)):
                raise UsageError(f"--set {key}={value!r}: {key} must be of type {type(default).__name__}",
                                 f"e.g. --set {key}={json.dumps(list(default) if isinstance(default, tuple) else default)}")
            typed[key] = value
        recipe = replace(recipe, **typed)
    run = Run(name, out, work, resume=resume, progress=progress, checkpoint_every_s=checkpoint_every_s)
    run.log(stage="start", recipe=asdict(recipe), resume=resume)
    t0 = time.time()
    info = fn(run, recipe)
    report = {"starter": name, "out": str(run.out), "seed": seed, "recipe": asdict(recipe),
              "wall_s": round(time.time() - t0, 1), **(info or {})}
    run.log(stage="finished", **report)
    return report


# ----------------------------------------------------------------------------- starter-caption / starter-vqa (BLIP)
@dataclass(frozen=True)
class BlipRecipe:
    seed: int = 0  # data seed of the training split (evaluation uses seed 1)
    # training images (a quarter with two shapes, as `studio data shapes` makes). Data is free in
    # shapes world: with 6000 the first session's caption model plateaued at 0.91 held-out exact match
    n_train: int = 20000
    render_size: int = 64  # images are drawn at this size and resized by the BLIP processor, as a user's are
    image_size: int = 32  # what the vision tower sees
    patch: int = 4
    width: int = 96  # vision and text hidden size (96 trains as fast as 64 on one CPU thread: overheads dominate)
    layers: int = 2
    steps: int = 8000
    batch: int = 32
    lr: float = 2e-3
    n_eval: int = 200
    # start from another starter's weights (a model alias or folder), as BLIP's VQA model starts from
    # its pretrained captioner: the vision tower already knows shapes and places, the decoder the words
    init: str | None = None
    # VQA: also train on questions phrased the ways people ask (phrasing.py's training families,
    # `draws` phrasings per image and family, beside shapes.py's own template questions); the
    # held-out phrasings are the eval. Without it the first starter-vqa scored 0.27 on them.
    phrasings: bool = False
    draws: int = 2
    # share of training questions with an [UNK] inserted: words outside the closed vocabulary
    # become [UNK], and a model that has seen some learns to read past them
    unk_noise: float = 0.15
    question_tokens: int = 24  # question length in tokens (fillers make them longer than the templates)
    two_shapes: float = 0.25  # share of two-shape training images (as `studio data shapes` makes them)
    # VQA: families that get `draws` more phrasings per image: yes/no questions and naming the
    # colour of one of two shapes were the first phrasing run's weakest (0.57 and 0.78 held out),
    # below 0.70 even on their training phrasings
    hard_families: tuple[str, ...] = ()
    hard_draws: int = 2  # the extra phrasings per image of each hard family


def _bert_tokenizer(extra_words: tuple[str, ...] = ()) -> Any:
    """A WordPiece vocabulary of exactly the shapes-world words (+ `extra_words`), with BLIP's
    [DEC]/[ENC] specials (BLIP's decoder starts from [DEC]); anything else becomes [UNK] instead
    of failing."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(shapes_vocabulary_corpus()) | set(extra_words))
    vocab = {tok: i for i, tok in enumerate(specials + words + ["[DEC]", "[ENC]"])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _blip(recipe: BlipRecipe, vqa: bool) -> tuple[Any, Any]:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    extra: tuple[str, ...] = ()
    if vqa and recipe.phrasings:
        from studio.pipelines.training.phrasing import vqa_training_words

        extra = tuple(vqa_training_words())
    tokenizer = _bert_tokenizer(extra)
    vocab = tokenizer.get_vocab()
    w = recipe.width
    text = dict(vocab_size=len(tokenizer), hidden_size=w, encoder_hidden_size=w, intermediate_size=2 * w,
                num_hidden_layers=recipe.layers, num_attention_heads=4, max_position_embeddings=32,
                bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
                eos_token_id=vocab["[SEP]"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=recipe.layers, num_attention_heads=4,
                  image_size=recipe.image_size, patch_size=recipe.patch, projection_dim=w, initializer_range=0.02)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=w, image_text_hidden_size=w)
    model = (BlipForQuestionAnswering if vqa else BlipForConditionalGeneration)(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size}),
                              tokenizer=tokenizer)
    return model, processor


def _init_blip(model: Any, source: str, tokenizer: Any = None) -> dict[str, Any]:
    """Copy the matching weights of a BLIP captioner or VQA model (alias or folder) into `model`:
    vision tower and answer/caption decoder by name; a VQA question encoder takes the captioner's
    decoder layers (BLIP initialises its encoder and decoder from the same text model). When
    `tokenizer`'s vocabulary differs from the source's, the per-token rows (word embeddings,
    output layer) move to their words' new ids; words the source lacks keep their fresh init."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, BlipForConditionalGeneration, BlipForQuestionAnswering

    from studio.models import resolve

    from studio.safety import check_pickle

    folder = Path(source) if Path(source).is_dir() else Path(resolve(source).source)
    check_pickle(folder, allow_pickle=False, what="--init model")
    arch = (AutoConfig.from_pretrained(folder, trust_remote_code=False).architectures or [""])[0]
    src = (BlipForQuestionAnswering if "Question" in arch else BlipForConditionalGeneration).from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True)
    state = src.state_dict()
    if hasattr(model, "text_encoder") and not hasattr(src, "text_encoder"):
        state.update({"text_encoder." + k[len("text_decoder.bert."):]: v for k, v in state.items()
                      if k.startswith("text_decoder.bert.")})
    own = model.state_dict()
    remapped = 0
    if tokenizer is not None:
        old_vocab, new_vocab = AutoTokenizer.from_pretrained(folder, trust_remote_code=False).get_vocab(), tokenizer.get_vocab()
        if old_vocab != new_vocab:
            pairs = [(new_vocab[t], i) for t, i in old_vocab.items() if t in new_vocab]
            new_ids, old_ids = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
            for k, v in list(state.items()):
                if k in own and v.shape[:1] == (len(old_vocab),) and own[k].shape[:1] == (len(new_vocab),) \
                        and own[k].shape[1:] == v.shape[1:]:
                    rows = own[k].clone()
                    rows[new_ids] = v[old_ids]
                    state[k] = rows
                    remapped += 1
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fit) < len(own) // 2:
        raise UsageError(f"init {source}: only {len(fit)} of {len(own)} weights fit this model",
                         "train the source with the same width, layers and patch size")
    model.load_state_dict(fit, strict=False)
    return {"init": str(source), "copied": len(fit), "of": len(own), "vocabulary_remapped": remapped}


def _pixels(processor: Any, items: list, size: int) -> Any:
    from studio.pipelines.training import shapes as S

    images = [S.render(s, size)[0] for s in items]
    return processor.image_processor(images, return_tensors="pt").pixel_values  # (N, 3, h, w)


def train_blip(run: Run, recipe: BlipRecipe, vqa: bool) -> dict[str, Any]:
    import torch

    from studio.pipelines.training import shapes as S

    torch.manual_seed(recipe.seed)
    # 1. data: images through the BLIP processor, captions or (question, answer) pairs
    model, processor = _blip(recipe, vqa)
    if recipe.init:
        run.log(stage="init", **_init_blip(model, recipe.init, processor.tokenizer))
    tok = processor.tokenizer
    items = list(S.samples(recipe.seed, recipe.n_train, two_shapes=recipe.two_shapes))
    pixels = _pixels(processor, items, recipe.render_size)
    if vqa:
        pairs = vqa_training_pairs(items, recipe) if recipe.phrasings else \
            [(i, q, a) for i, s in enumerate(items) for q, a in s.vqa]
        image_of = torch.tensor([i for i, _, _ in pairs])
        questions = tok([q for _, q, _ in pairs], padding="max_length", max_length=recipe.question_tokens if recipe.phrasings else 16,
                        truncation=True, return_tensors="pt")
        answers = tok([a for _, _, a in pairs], padding="max_length", max_length=4, truncation=True, return_tensors="pt")
        answer_ids = answers.input_ids.clone()
        answer_ids[:, 0] = tok.bos_token_id  # the decoder starts from [DEC], as generate() does
    else:
        image_of = torch.arange(len(items))
        texts = tok([s.caption for s in items], padding="max_length", max_length=20, truncation=True, return_tensors="pt")
        caption_ids = texts.input_ids.clone()
        caption_ids[:, 0] = tok.bos_token_id
    run.log(stage="data", images=len(items), examples=len(image_of))

    # 2. train (labels: the same ids with padding ignored; BLIP's decoder shifts them itself)
    def loss_fn(step: int, g: Any) -> Any:
        idx = torch.randint(0, len(image_of), (recipe.batch,), generator=g)
        px = pixels[image_of[idx]]
        if vqa:
            dec = answer_ids[idx]
            labels = dec.masked_fill(answers.attention_mask[idx] == 0, -100)
            # decoder_input_ids passed explicitly: given labels only, BLIP would embed the -100s
            return model(pixel_values=px, input_ids=questions.input_ids[idx], attention_mask=questions.attention_mask[idx],
                         decoder_input_ids=dec, decoder_attention_mask=answers.attention_mask[idx], labels=labels).loss
        ids = caption_ids[idx]
        mask = texts.attention_mask[idx]
        return model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    train_loop(run, "blip", steps=recipe.steps, params=list(model.parameters()), lr=recipe.lr, modules={"model": model},
               loss_fn=loss_fn, weight_decay=0.01)

    # 3. held-out check (seed 1) with greedy decoding, scored as `studio eval caption` does
    from studio.pipelines.caption import normalise_caption

    model.eval()
    held = list(S.samples(1, recipe.n_eval))
    hp = _pixels(processor, held, recipe.render_size)
    right = total = 0
    with torch.no_grad():
        if vqa:
            metrics = vqa_heldout_eval(model, processor, held, hp)
        else:
            for b in range(0, len(held), 64):
                out = model.generate(pixel_values=hp[b:b + 64], max_new_tokens=20)
                for s, pred in zip(held[b:b + 64], tok.batch_decode(out, skip_special_tokens=True)):
                    right += normalise_caption(pred) == normalise_caption(s.caption)
                    total += 1
            metrics = {"exact_match": right / total, "images": total}
    run.log(stage="eval", **metrics)

    def save(folder: Path) -> None:
        model.half().save_pretrained(folder)
        processor.save_pretrained(folder)

    run.publish(save)
    return {"params": sum(p.numel() for p in model.parameters()), "eval": {"data_seed": 1, **metrics}}


def vqa_training_pairs(items: list, recipe: BlipRecipe) -> list[tuple[int, str, str]]:
    """(image index, question, answer): shapes.py's template questions and `recipe.draws`
    training phrasings per family (phrasing.py), a share with an [UNK] word inserted."""
    import numpy as np

    from studio.pipelines.training.phrasing import VQA_FAMILIES, vqa_questions

    pairs = []
    for i, s in enumerate(items):
        pairs += [(i, q, a) for q, a in s.vqa]
        rng = np.random.default_rng([s.seed, s.index, 99])
        draws = [(d, VQA_FAMILIES) for d in range(recipe.draws)]
        draws += [(recipe.draws + d, recipe.hard_families) for d in range(recipe.hard_draws if recipe.hard_families else 0)]
        for d, families in draws:
            for q in vqa_questions(s, heldout=False, draw=d, families=families):
                text = q.question
                if rng.random() < recipe.unk_noise:
                    words = text.split(" ")
                    words.insert(int(rng.integers(0, len(words) + 1)), "[UNK]")
                    text = " ".join(words)
                pairs.append((i, text, q.answer))
    return pairs


def vqa_answers(model: Any, processor: Any, pixels: Any, questions: list[tuple[int, str]], batch: int = 64) -> list[str]:
    """Greedy answers of a BLIP VQA model to (image row of `pixels`, question) pairs."""
    import torch

    tok, answers = processor.tokenizer, []
    with torch.no_grad():
        for b in range(0, len(questions), batch):
            chunk = questions[b:b + batch]
            enc = tok([q for _, q in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
            out = model.generate(pixel_values=pixels[[i for i, _ in chunk]], input_ids=enc.input_ids,
                                 attention_mask=enc.attention_mask, max_new_tokens=4)
            answers += tok.batch_decode(out, skip_special_tokens=True)
    return answers


def vqa_heldout_eval(model: Any, processor: Any, held: list, pixels: Any) -> dict[str, Any]:
    """Accuracy per held-out phrasing family (phrasing.py) and on shapes.py's template questions,
    the same numbers `studio eval vqa` reports through the pipeline."""
    from studio.pipelines.training.phrasing import canonical_questions, vqa_questions, vqa_report

    asked = [(i, q) for i, s in enumerate(held) for q in vqa_questions(s, heldout=True) + canonical_questions(s)]
    predicted = vqa_answers(model, processor, pixels, [(i, q.question) for i, q in asked])
    report = vqa_report([{"family": q.family, "answer": q.answer, "predicted": p} for (_, q), p in zip(asked, predicted)])
    return {"vqa_accuracy": report["families"]["template"]["accuracy"], **report}


# ----------------------------------------------------------------------------- starter-clip (open_clip)
@dataclass(frozen=True)
class ClipRecipe:
    seed: int = 0
    n_train: int = 20000  # 6000 (43 epochs in 4000 steps) reached 0.93 zero-shot; data is free here
    render_size: int = 64
    steps: int = 6000
    batch: int = 64
    lr: float = 2e-3
    n_eval: int = 300
    short_captions: bool = True  # also train on "a red circle"-style captions (see train_clip)
    # each caption also appears with its (first) shape's name swapped, as a negative for its own
    # image: shape is what the first session's model confused (colour 1.00, shape 0.84 zero-shot),
    # because few pairs in a random batch differ only in shape
    hard_negatives: bool = True
    # + this many captions per image written the ways people prompt (phrasing.CLIP_TRAIN: attributes
    # left out or reordered, "a picture of", filler words, capitals); the first starter-clip, trained
    # on shapes-world captions only, scored 0.30 zero-shot with "a photo of a {}."
    phrasings: int = 4
    init: str | None = None  # start from a CLIP's weights (alias or folder) with this same model_cfg
    model_cfg: dict = field(default_factory=lambda: {
        "embed_dim": 64,
        # the 64 px image itself in 8 px patches: as many tokens as 32 px in 4 px patches, but
        # the patch embedding sees the shapes' edges unblurred
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        # open_clip's own BPE (49408 tokens, shipped in its wheel); width 32 keeps the token table at 3 MB in fp16
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    })


def clip_zero_shot(model: Any, preprocess: Any, tokenizer: Any, items: list, size: int,
                   templates: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Zero-shot top-1 over the 18 colour+shape classes, single-shape images: with the shapes-world
    caption ensemble (each class's text embedding the mean over every size, position and background,
    the CLIP paper's prompt ensembling with this world's own templates), and with each held-out
    template alone ("a photo of a {}." filled with "red circle"; phrasing.CLIP_HELDOUT), their
    minimum beside them."""
    import torch

    from studio.pipelines.training import shapes as S
    from studio.pipelines.training.phrasing import CLIP_HELDOUT, clip_class_prompts, template_name

    classes = [(c, s) for c in S.COLOURS for s in S.SHAPES]
    truth = torch.tensor([classes.index((s.shapes[0].colour, s.shapes[0].shape)) for s in items])
    param = next(model.parameters())

    def encode_text(texts: list[str]) -> Any:  # (T, D) float32 on the CPU, whatever device the model is on
        return model.encode_text(tokenizer(texts).to(param.device), normalize=True).float().cpu()

    with torch.no_grad():
        rows = []
        for colour, shape in classes:
            prompts = [S.caption_for((S.Shape(shape, colour, size, where, 0.5, 0.5, 0.2),), bg)
                       for size in S.SIZES for where in S.POSITIONS for bg in S.BACKGROUNDS if bg != colour]
            prompts.append(f"a {colour} {shape}")
            emb = encode_text(prompts).mean(0)
            rows.append(emb / emb.norm())
        text = torch.stack(rows)
        images = torch.stack([preprocess(S.render(s, size)[0]) for s in items])
        feats = model.encode_image(images.to(param.device, param.dtype), normalize=True).float().cpu()
        per_template = {}
        for template in CLIP_HELDOUT if templates is None else templates:
            t = encode_text(clip_class_prompts(template, classes))
            per_template[template_name(template)] = round(float(((feats @ t.T).argmax(1) == truth).float().mean()), 4)
    pred = (feats @ text.T).argmax(1)
    return {"zero_shot_top1": float((pred == truth).float().mean()), "templates": per_template,
            "heldout_min": min(per_template.values()) if per_template else None,
            "heldout_min_template": min(per_template, key=per_template.get) if per_template else None,
            "classes": len(classes), "images": len(items)}


def train_clip(run: Run, recipe: ClipRecipe) -> dict[str, Any]:
    import re

    import open_clip
    import torch

    from studio.pipelines.clip import CONFIG_NAME, WEIGHTS_NAME, save_clip_folder
    from studio.pipelines.training import shapes as S

    torch.manual_seed(recipe.seed)
    # 1. model from the config (open_clip registers a config dict under a name), data through its transforms
    open_clip.factory._MODEL_CONFIGS["studio-starter-clip"] = recipe.model_cfg
    model, _, preprocess = open_clip.create_model_and_transforms("studio-starter-clip", load_weights=False)
    tokenizer = open_clip.get_tokenizer("studio-starter-clip")
    items = list(S.samples(recipe.seed, recipe.n_train))
    images = torch.stack([preprocess(S.render(s, recipe.render_size)[0]) for s in items])  # (N, 3, 32, 32)
    # three captions per image: the full one, and two shorter ones naming only the first shape
    # (+ background), so the text tower also learns what "a red circle" alone means
    variants = [[s.caption, f"a {s.shapes[0].colour} {s.shapes[0].shape}",
                 f"a {s.shapes[0].colour} {s.shapes[0].shape}, {s.background} background"] for s in items]
    if recipe.phrasings:
        import numpy as np

        from studio.pipelines.training.phrasing import clip_caption

        for s, v in zip(items, variants):
            draw = np.random.default_rng([s.seed, s.index, 31])
            v += [clip_caption(s, draw) for _ in range(recipe.phrasings)]
    if recipe.init:
        from studio.pipelines.clip import load_clip

        source = load_clip(recipe.init)[0].float().state_dict()
        if {k: v.shape for k, v in source.items()} != {k: v.shape for k, v in model.state_dict().items()}:
            raise UsageError(f"init {recipe.init}: its weights do not fit this recipe's model_cfg",
                             "start from a CLIP trained by `studio train starter clip`, or leave out --init")
        model.load_state_dict(source)
        run.log(stage="init", init=recipe.init)
    texts = torch.stack([tokenizer(v) for v in variants])  # (N, V, context)
    rng = torch.Generator().manual_seed(recipe.seed)
    swapped = []
    for s, v in zip(items, variants):
        shape = s.shapes[0].shape
        others = [o for o in S.SHAPES if o != shape]
        other = others[int(torch.randint(0, len(others), (1,), generator=rng))]
        swapped.append([re.sub(rf"\b{shape}\b", other, c, count=1, flags=re.IGNORECASE) for c in v])
    negatives = torch.stack([tokenizer(v) for v in swapped])  # (N, 3, context): the wrong shape
    run.log(stage="data", n=len(items))

    # 2. the symmetric InfoNCE loss of CLIP (open_clip's ClipLoss), with the shape-swapped captions
    # as extra negatives on the image-to-text side (open_clip's loss has no slot for them)
    loss_mod = open_clip.ClipLoss()

    def loss_fn(step: int, g: Any) -> Any:
        idx = torch.randperm(len(items), generator=g)[: recipe.batch]
        which = torch.randint(0, texts.shape[1], (recipe.batch,), generator=g) if recipe.short_captions else torch.zeros(recipe.batch, dtype=torch.long)
        if not recipe.hard_negatives:
            image_features, text_features, logit_scale = model(images[idx], texts[idx, which])
            return loss_mod(image_features, text_features, logit_scale)
        n = len(idx)
        image_features, text_all, logit_scale = model(images[idx], torch.cat([texts[idx, which], negatives[idx, which]]))
        text_features = text_all[:n]
        labels = torch.arange(n)
        i2t = logit_scale * image_features @ text_all.T  # (n, 2n): the batch's captions + the swapped ones
        t2i = logit_scale * text_features @ image_features.T
        ce = torch.nn.functional.cross_entropy
        return (ce(i2t, labels) + ce(t2i, labels)) / 2

    train_loop(run, "clip", steps=recipe.steps, params=list(model.parameters()), lr=recipe.lr, modules={"model": model},
               loss_fn=loss_fn, weight_decay=0.1)
    model.eval()
    metrics = clip_zero_shot(model, preprocess, tokenizer, list(S.samples(1, recipe.n_eval, two_shapes=0.0)),
                             recipe.render_size)
    run.log(stage="eval", **metrics)

    def save(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_clip_folder(model, recipe.model_cfg, folder, extra={"studio_starter": "clip"})
        # fp16 on disk (open_clip's load_state_dict casts back to the model's float32)
        weights = folder / WEIGHTS_NAME
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
        save_file(half, str(weights), metadata={"format": "pt"})
        assert (folder / CONFIG_NAME).exists()

    run.publish(save)
    return {"params": sum(p.numel() for p in model.parameters()), "eval": {"data_seed": 1, **metrics}}


SMOKE.update({
    "caption": dict(n_train=16, steps=2, batch=4, n_eval=4),
    "vqa": dict(n_train=16, steps=2, batch=4, n_eval=2),
    "clip": dict(n_train=16, steps=2, batch=8, n_eval=8),
})
RECIPES.update({
    "caption": (BlipRecipe, lambda run, r: train_blip(run, r, vqa=False)),
    "vqa": (BlipRecipe, lambda run, r: train_blip(run, r, vqa=True)),
    "clip": (ClipRecipe, train_clip),
})


# ----------------------------------------------------------------------------- starter-midi (Bach chorales)
@dataclass(frozen=True)
class MidiRecipe:
    seed: int = 0
    limit: int | None = 45  # chorales used (music21's corpus order; None: all 371); 45 fit this CPU's time
    size: str = "tiny"  # midi_train's GPT-2 size
    steps: int = 400
    batch: int = 8
    seq_len: int = 256
    lr: float = 1e-3


def train_midi(run: Run, recipe: MidiRecipe) -> dict[str, Any]:
    """The symbolic-music trainer itself (pipelines/training/midi_train.py, `studio music train`)
    on the Bach chorales that ship in music21; the starter is its final/ folder in fp16."""
    from studio.pipelines.training.midi_train import MidiTrainConfig, checkpoints, train
    from studio.device import DeviceSettings, get_device_manager

    inner = run.work / "midi-run"
    resume = run.resume and bool(checkpoints(inner)) if inner.exists() else False
    if inner.exists() and not resume:
        shutil.rmtree(inner)
    config = MidiTrainConfig(data="bach", out=str(inner), size=recipe.size, steps=recipe.steps,
                             batch_size=recipe.batch, seq_len=recipe.seq_len, lr=recipe.lr, limit=recipe.limit,
                             seed=recipe.seed, resume=resume, save_every=50, val_every=100)
    device = get_device_manager(DeviceSettings.from_sources(flags={"device": "cpu", "precision": "fp32"}))

    class _Quiet:  # midi_train wants a Progress; keep ours (or none)
        def task(self, *a, **k):
            return run.task(*a[:1], total=k.get("total") or 0)

        def note(self, text):
            run.log(stage="note", text=text)

    summary = train(config, device, run.progress or _Quiet(), on_log=lambda row: run.log(stage="midi", **row))

    def save(folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        final = Path(summary["final"])
        model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True, trust_remote_code=False)
        model.half().save_pretrained(folder)
        shutil.copy2(final / "tokenizer.json", folder / "tokenizer.json")

    run.publish(save)
    return {"val_loss": summary.get("val_loss"), "train_loss": summary.get("train_loss"), "steps": summary.get("steps")}


# ----------------------------------------------------------------------------- starter-code (the standard library)
@dataclass(frozen=True)
class CodeRecipe:
    seed: int = 0
    # stdlib modules used (sorted paths; tests and site-packages left out); the first starter used
    # 150; code_completion_validity's held-out prompts come from files past this count
    max_files: int = 450
    vocab: int = 2048  # byte-level BPE size
    width: int = 128
    layers: int = 3
    context: int = 128
    steps: int = 500
    batch: int = 8
    lr: float = 2e-3
    # continue from a code starter's weights and tokenizer (alias or folder) instead of a new BPE and
    # random weights: the BPE trainer of `tokenizers` breaks ties differently from run to run, so
    # more training of the shipped model has to keep its tokenizer
    init: str | None = None


def stdlib_sources(max_files: int) -> list[Path]:
    """The interpreter's own standard library sources, in a fixed order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}
                              for part in p.relative_to(root).parts))
    return files[:max_files]


def train_code(run: Run, recipe: CodeRecipe) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(recipe.seed)
    # 1. data: stdlib source text, a byte-level BPE trained on it (GPT-2's scheme, no download)
    texts = []
    for path in stdlib_sources(recipe.max_files):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    init_folder = None
    if recipe.init:
        from studio.models import resolve

        init_folder = Path(recipe.init) if Path(recipe.init).is_dir() else Path(resolve(recipe.init, task="code").source)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(init_folder)
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=recipe.vocab, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                            pad_token="<|endoftext|>", model_max_length=recipe.context)
    eos = tokenizer.eos_token_id
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [eos]
    data = torch.tensor(stream, dtype=torch.long)
    n_val = len(data) // 20
    train_data, val_data = data[:-n_val], data[-n_val:]  # the last files are held out
    run.log(stage="data", files=len(texts), tokens=len(stream))

    # 2. a GPT-2
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.context, n_embd=recipe.width,
                                       n_layer=recipe.layers, n_head=4, bos_token_id=eos, eos_token_id=eos,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.config.loss_type = "ForCausalLM"
    if init_folder is not None:
        source = GPT2LMHeadModel.from_pretrained(init_folder, dtype=torch.float32).state_dict()
        if {k: v.shape for k, v in source.items()} != {k: v.shape for k, v in model.state_dict().items()}:
            raise UsageError(f"init {recipe.init}: its weights do not fit this recipe's width, layers and context",
                             "start from a code starter trained with the same recipe, or leave out --init")
        model.load_state_dict(source)
        run.log(stage="init", init=str(recipe.init))

    def loss_fn(step: int, g: Any) -> Any:
        starts = torch.randint(0, len(train_data) - recipe.context - 1, (recipe.batch,), generator=g)
        x = torch.stack([train_data[s:s + recipe.context] for s in starts.tolist()])
        return model(input_ids=x, labels=x).loss

    train_loop(run, "code", steps=recipe.steps, params=list(model.parameters()), lr=recipe.lr, modules={"model": model},
               loss_fn=loss_fn, weight_decay=0.1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        starts = torch.randint(0, len(val_data) - recipe.context - 1, (16,), generator=g)
        x = torch.stack([val_data[s:s + recipe.context] for s in starts.tolist()])
        val_loss = float(model(input_ids=x, labels=x).loss)
    run.log(stage="eval", val_loss=val_loss)

    def save(folder: Path) -> None:
        model.half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    run.publish(save)
    return {"params": sum(p.numel() for p in model.parameters()), "val_loss": val_loss, "tokens": len(stream)}


SMOKE.update({
    "midi": dict(limit=4, steps=2, batch=2, seq_len=64),
    "code": dict(max_files=3, vocab=300, width=32, layers=1, context=64, steps=2, batch=2),
})
RECIPES.update({"midi": (MidiRecipe, train_midi), "code": (CodeRecipe, train_code)})


# ----------------------------------------------------------------------------- starter-control (ControlNet on masks)
@dataclass(frozen=True)
class ControlRecipe:
    seed: int = 0
    # the text-to-image model it steers (alias or folder): frozen, and the ControlNet starts as a
    # copy of its UNet's encoder
    init: str = "starter-image"
    n_train: int = 8000
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    # conditioning stem: one stride-2 conv per extra width, so one width per autoencoder level
    # (None: 16, 32, 64, ... as many as the base's VAE has levels)
    cond_channels: tuple[int, ...] | None = None
    drop_caption: float = 0.1
    n_eval: int = 50
    guidance: float = 4.0
    eval_steps: int = 20


def _base_pipeline(base: str) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    from studio.models import resolve

    from studio.safety import check_pickle

    folder = Path(base) if Path(base).is_dir() else Path(resolve(base, task="image").source)
    check_pickle(folder, allow_pickle=False, what="--init model")
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True,
                                                   trust_remote_code=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_iou(image: Any, mask: Any) -> float:
    """IoU of a generated image's foreground (pixels far from its median border colour, as the
    pixel checker finds shapes) with the control mask (PIL 'L' or RGB, white = shape)."""
    import numpy as np

    from studio.pipelines.training.shapes import foreground

    fg = foreground(image)[2]
    want = np.asarray(mask.convert("L").resize(image.size)) > 127
    return float((fg & want).sum() / max(1, (fg | want).sum()))


def control_eval(pipe: Any, controlnet: Any, *, n: int, size: int, steps: int, guidance: float,
                 seed: int = 1) -> dict[str, Any]:
    """Held-out masks (split `seed`) through StableDiffusionControlNetPipeline: mean mask IoU, and
    the pixel checker's colour + shape verdict on the same images."""
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    from studio.pipelines.training import shapes as S

    cpipe = StableDiffusionControlNetPipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"},
                                              controlnet=controlnet)
    cpipe.set_progress_bar_config(disable=True)
    items = list(S.samples(seed, n, two_shapes=0.0))
    ious, images = [], []
    for i, s in enumerate(items):
        mask = S.render(s, size)[1].convert("RGB")
        image = cpipe(s.caption, image=mask, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                      generator=torch.Generator().manual_seed(i)).images[0]
        ious.append(mask_iou(image, mask))
        images.append(image)
    following = S.prompt_following(images, items)
    return {"mask_iou": sum(ious) / len(ious), "iou_at_least_0.8": sum(v >= 0.8 for v in ious) / len(ious),
            "prompt_following": following["prompt_following"], "images": len(items)}


def train_control(run: Run, recipe: ControlRecipe) -> dict[str, Any]:
    import torch
    from diffusers import ControlNetModel, DDPMScheduler

    torch.manual_seed(recipe.seed)
    # 1. the frozen base: its VAE latents, its text features, its UNet
    pipe = _base_pipeline(recipe.init)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    size = unet.config.sample_size * pipe.vae_scale_factor
    # prompts as people type them (shapes.training_prompt), each drawn inside its image's mask
    items, pixels, masks_u8 = cached_prompts(run.work, recipe.seed, recipe.n_train, (size,))
    masks = torch.from_numpy(masks_u8)  # (N, H, W) 0/255
    cond = (masks.float() / 255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W) in [0, 1], as the pipeline feeds it
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_unit(pixels[size][i:i + 256])).latents for i in range(0, len(items), 256)])
        latents = latents * vae.config.scaling_factor
        ids = tokenizer([p.text for p in items], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        feats = torch.cat([text_encoder(ids[i:i + 512]).last_hidden_state for i in range(0, len(ids), 512)])
        empty = text_encoder(tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                       return_tensors="pt").input_ids).last_hidden_state
    run.log(stage="data", n=len(items), size=size)

    # 2. the ControlNet: the base UNet's encoder copied (diffusers' from_unet), zero-initialised outputs
    levels = len(pipe.vae.config.block_out_channels)
    cond_channels = recipe.cond_channels or tuple(16 * 2**i for i in range(levels))
    if len(cond_channels) != levels:
        raise UsageError(f"cond_channels {cond_channels} need {levels} entries for {recipe.init}'s {size} px images",
                         "leave cond_channels to the recipe")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_fn(step: int, g: Any) -> Any:
        idx = torch.randint(0, len(latents), (recipe.batch,), generator=g)
        z0, text = latents[idx], feats[idx].clone()
        drop = torch.rand(recipe.batch, generator=g) < recipe.drop_caption
        text[drop] = empty[0]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (recipe.batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)

        def predict(zt: Any, t: Any) -> Any:
            down, mid = controlnet(zt, t, encoder_hidden_states=text, controlnet_cond=cond[idx], return_dict=False)
            return unet(zt, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        return diffusion_loss(noise_sched, predict, z0, t, noise)

    train_loop(run, "controlnet", steps=recipe.steps, params=list(controlnet.parameters()), lr=recipe.lr,
               modules={"controlnet": controlnet}, loss_fn=loss_fn)

    # 3. held-out masks (seed 1): IoU of what it draws with the mask it was given
    metrics = control_eval(pipe, controlnet, n=recipe.n_eval, size=size, steps=recipe.eval_steps,
                           guidance=recipe.guidance)
    run.log(stage="eval", **metrics)

    def save(folder: Path) -> None:
        controlnet.half().save_pretrained(folder, safe_serialization=True)

    run.publish(save)
    return {"params": sum(p.numel() for p in controlnet.parameters()), "eval": {"data_seed": 1, **metrics}}


SMOKE["control"] = dict(n_train=16, steps=2, batch=4, n_eval=2, eval_steps=2)
RECIPES["control"] = (ControlRecipe, train_control)


def valid_prefix(text: str) -> bool:
    """True when `text` is Python source or the beginning of some (codeop: complete -> a code
    object, incomplete -> None, wrong -> SyntaxError). The last, maybe cut-off line is dropped."""
    from studio.pipelines.code import python_prefix_ok

    return python_prefix_ok(text)


def code_completion_validity(model: str | Path, *, n: int = 20, lines: int = 10, seed: int = 1,
                             syntax_check: bool = False, syntax_tries: int = 8,
                             max_tokens: int = 100) -> dict[str, Any]:
    """Share of sampled `lines`-line completions of held-out stdlib prompts that are valid code:
    a valid Python prefix (codeop) in which the completion holds at least one line of code, not
    only comments, blank lines or docstring text, which parse but are not code (code_eval.code_lines).
    The bar for starter-code; `real_text` scores the files' own next lines by the same rule.
    Sampled through studio's own code pipeline, with or without syntax-guided decoding."""
    from studio import models, registry
    from studio.device import DeviceManager, DeviceSettings
    from studio.pipelines.code import code_lines, code_rows

    spec = models.resolve(str(model), task="code")
    generator = registry.load_pipeline("code", spec, DeviceManager(DeviceSettings()), None)
    # held-out prompts: from the end of the sorted file list (never in the training slice), up to 3
    # lines from each file's first line of code (after its licence comments and module docstring,
    # whose continuation is prose), fewer where they pass 28 tokens (+ the new ones must fit the
    # 128-token window); files whose own next lines hold no code (a package's bare __init__, the
    # end of a file) are passed over, so the bar asks only for what the real file shows is possible
    prompts: list[str] = []
    for path in reversed(stdlib_sources(100000)[CodeRecipe.max_files:]):
        if len(prompts) == n:
            break
        source = path.read_text(encoding="utf-8", errors="replace")
        first = min(code_rows(source), default=1) - 1
        all_lines = source.split("\n")
        head = all_lines[first:first + 3]
        while len(head) > 1 and generator._count_tokens("\n".join(head) + "\n") > 28:
            head.pop()
        prompt = "\n".join(head) + "\n"
        real = "\n".join(all_lines[first + len(head):first + len(head) + lines - 1]) + "\n"
        if valid_prefix(prompt + real) and code_lines(prompt + real, len(prompt)) > 0:
            prompts.append(prompt)
    prompts.reverse()
    ok = parses = full = resampled = gave_up = 0
    judged_lines = judged_code = 0
    for i, prompt in enumerate(prompts):
        room = (generator._window() or 10**9) - generator._count_tokens(prompt)
        _, (g,) = generator.sample(prompt, max_tokens=min(max_tokens, room), temperature=0.8, top_p=0.95, seed=seed + i,
                                   raw=True, syntax_check=syntax_check, syntax_tries=syntax_tries)
        completion = "\n".join(g.text.split("\n")[:lines])
        text = prompt + completion
        judged = text[: text.rfind("\n")] if "\n" in completion else prompt  # the last, maybe cut-off line is not judged
        n_code = code_lines(judged, len(prompt))
        parses += valid_prefix(text)
        ok += valid_prefix(text) and n_code > 0
        judged_lines += max(0, judged.count("\n") - prompt.count("\n") + 1) if len(judged) > len(prompt) else 0
        judged_code += n_code
        full += completion.count("\n") >= lines - 1  # reached the 10 lines (did not end early)
        resampled += g.rejected
        gave_up += g.finish == "syntax"
    files = prompts
    return {"valid_code_rate": ok / len(files), "valid_prefix_rate": parses / len(files),
            "code_line_share": round(judged_code / max(1, judged_lines), 4),
            "ended_early_no_line_parsed": gave_up, "completions": len(files), "lines": lines,
            "reached_all_lines": full / len(files), "syntax_check": syntax_check,
            "syntax_tries": syntax_tries if syntax_check else None, "resampled_lines": resampled,
            "max_tokens": max_tokens, "temperature": 0.8}
