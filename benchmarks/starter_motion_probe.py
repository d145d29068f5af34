"""Probe for the starter-motion stretch goal: can an AnimateDiff motion adapter on top of the
shipped starter-image learn moving shapes on this CPU in a few minutes?

    python benchmarks/starter_motion_probe.py THREADS MINUTES N_EVAL
    python benchmarks/starter_motion_probe.py 2 0 40     # the untrained adapter: the baseline
    python benchmarks/starter_motion_probe.py 2 16 40    # 16 minutes of training, then the same eval

Not a product feature (there is no `studio train starter motion`): an experiment whose numbers are in
the issue note. Data: 3000 clips of 8 frames at 32 px, one shape of shapes world moving right, left,
up or down ("a small red circle moving right, blue background"). Model: diffusers'
UNetMotionModel.from_unet2d(starter UNet, MotionAdapter) with the image weights frozen, the same
v-prediction loss as the image starter. Eval on 40 held-out clips (seed 1): the direction is right
(centroid moves > 4 px along it, more than across), the motion is steady (at most one frame-to-frame
step against it), and every frame keeps the prompt's colour and shape (the pixel checker).
"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1])); MINUTES = float(sys.argv[2])
from diffusers import MotionAdapter, UNetMotionModel, DDPMScheduler, AnimateDiffPipeline, StableDiffusionPipeline
from studio.pipelines.training import shapes as S
F, SIZE, DIRS = 8, 32, {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}

def clip(seed, i):
    rng = np.random.default_rng([seed, i, 7])
    s = S.sample(seed, i, two_shapes=0.0); sh = s.shapes[0]
    d = list(DIRS)[int(rng.integers(4))]; dx, dy = DIRS[d]
    r = sh.r; span = 0.4
    cx0 = 0.5 - dx * span / 2 + rng.uniform(-0.05, 0.05); cy0 = 0.5 - dy * span / 2 + rng.uniform(-0.05, 0.05)
    frames = []
    for f in range(F):
        t = f / (F - 1)
        cx = float(np.clip(cx0 + dx * span * t, r + 0.02, 1 - r - 0.02)); cy = float(np.clip(cy0 + dy * span * t, r + 0.02, 1 - r - 0.02))
        one = S.Sample(seed, i, s.background, (S.Shape(sh.shape, sh.colour, sh.size, sh.position, cx, cy, r),), s.caption)
        frames.append(np.asarray(S.render(one, SIZE)[0]))
    cap = f"a {sh.size} {sh.colour} {sh.shape} moving {d}, {s.background} background"
    return np.stack(frames), cap, d

pipe = StableDiffusionPipeline.from_pretrained("presets/starter/image", torch_dtype=torch.float32)
unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
N = 3000
t0 = time.time()
data = [clip(0, i) for i in range(N)]
frames = torch.from_numpy(np.stack([c[0] for c in data])).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1)  # N F 3 H W
with torch.no_grad():
    lat = torch.cat([vae.encode(frames[i:i+64].flatten(0, 1)).latents for i in range(0, N, 64)]) * vae.config.scaling_factor
    lat = lat.view(N, F, 4, 16, 16).permute(0, 2, 1, 3, 4).contiguous()  # N C F H W
    ids = tok([c[1] for c in data], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    feats = torch.cat([te(ids[i:i+512]).last_hidden_state for i in range(0, N, 512)])
print("data", round(time.time() - t0, 1), lat.shape, flush=True)
adapter = MotionAdapter(block_out_channels=unet.config.block_out_channels, motion_layers_per_block=1,
                        motion_num_attention_heads=4, motion_norm_num_groups=16, motion_max_seq_length=F, use_motion_mid_block=False)
munet = UNetMotionModel.from_unet2d(unet, adapter)
munet.freeze_unet2d_params()
params = [p for p in munet.parameters() if p.requires_grad]
print("trainable", sum(p.numel() for p in params), flush=True)
ns = DDPMScheduler.from_config(pipe.scheduler.config); al = ns.alphas_cumprod
opt = torch.optim.AdamW(params, lr=1e-3)
g = torch.Generator().manual_seed(0); B = 4; step = 0; t1 = time.time(); run = None
munet.train()
while time.time() - t1 < MINUTES * 60:
    idx = torch.randint(0, N, (B,), generator=g); z0 = lat[idx]
    t = torch.randint(0, 1000, (B,), generator=g); noise = torch.randn(z0.shape, generator=g)
    zt = ns.add_noise(z0.transpose(1, 2), noise.transpose(1, 2), t).transpose(1, 2)  # add_noise broadcasts over dim 0
    target = ns.get_velocity(z0.transpose(1, 2), noise.transpose(1, 2), t).transpose(1, 2)
    pred = munet(zt, t, feats[idx].repeat_interleave(F, dim=0)).sample
    snr = al[t] / (1 - al[t]); w = torch.clamp(snr, max=5.0) / (snr + 1)
    loss = (w * ((pred - target) ** 2).mean(dim=(1, 2, 3, 4))).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); step += 1
    run = float(loss.detach()) if run is None else 0.95 * run + 0.05 * float(loss.detach())
    if step % 25 == 0: print("step", step, round(run, 5), round(step / (time.time() - t1), 2), flush=True)
munet.eval()
ap = AnimateDiffPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=munet, motion_adapter=adapter, scheduler=pipe.scheduler, feature_extractor=None)
ap.set_progress_bar_config(disable=True)

def centroid(img):
    arr = np.asarray(img.convert("RGB")).astype(np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    fg = np.sqrt(((arr - np.median(border, axis=0)) ** 2).sum(-1)) > 60
    if fg.sum() < 4: return None
    ys, xs = np.nonzero(fg); return xs.mean(), ys.mean()

ok = same = full = 0; rows = []
n_eval = int(sys.argv[3])
for i in range(n_eval):
    _, cap, d = clip(1, i)
    want = S.sample(1, i, two_shapes=0.0).shapes[0]
    out = ap(cap, num_frames=F, num_inference_steps=20, guidance_scale=4.0, height=32, width=32, generator=torch.Generator().manual_seed(i)).frames[0]
    cs = [centroid(f) for f in out]
    js = [S.judge(f) for f in out]
    consistent = all(j.colour == want.colour and j.shape == want.shape for j in js)
    good = steady = False
    ex, ey = DIRS[d]
    if all(c is not None for c in cs):
        dx, dy = cs[-1][0] - cs[0][0], cs[-1][1] - cs[0][1]
        along = dx * ex + dy * ey; across = abs(dx * ey) + abs(dy * ex)
        good = bool(along > 4 and along > across)
        steps_along = [(b[0] - a[0]) * ex + (b[1] - a[1]) * ey for a, b in zip(cs, cs[1:])]
        steady = sum(v >= 0 for v in steps_along) >= F - 2
    ok += good; same += consistent; full += good and steady and consistent
    rows.append((d, good, bool(steady), consistent))
    if i < 4:  # the first clips' frames, to look at
        from pathlib import Path
        Path("outputs/motion_probe").mkdir(parents=True, exist_ok=True)
        for k, f in enumerate(out):
            f.save(f"outputs/motion_probe/clip{i}-frame{k}.png")
print(json.dumps({"steps": step, "minutes": MINUTES, "n": n_eval, "direction_ok": ok / n_eval,
                  "same_colour_and_shape_all_frames": same / n_eval, "recognisable_motion": full / n_eval, "rows": rows}), flush=True)
