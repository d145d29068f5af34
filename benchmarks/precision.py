"""Should `--precision auto` pick bf16 on the CPU? Speed and output agreement, side by side.

Runs the same seeded UNet (SD-1.x block layout at reduced width) and GPT-2-style LM forward in
fp32 and in bf16 on this CPU, and prints the bf16/fp32 time ratio and the relative error of bf16
outputs. auto stays fp32 on CPU unless bf16 is both clearly faster and close (DeviceManager).
"""

import statistics
import time

import studio  # noqa: F401  (quiets library import noise)
import torch


def timed(fn, runs=3):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, avx512_bf16: {'avx512_bf16' in flags}, "
          f"amx_bf16: {'amx_bf16' in flags}")
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=128, attention_head_dim=8).eval()
    lm = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=8, n_embd=256, vocab_size=8000, n_positions=256, bos_token_id=0, eos_token_id=0)).eval()
    x, e = torch.randn(2, 4, 32, 32), torch.randn(2, 16, 128)
    ids = torch.randint(0, 8000, (4, 128))
    rows = []
    for name, model, call in [("unet 32x32 latents", unet, lambda m, dt: m(x.to(dt), 10, e.to(dt)).sample),
                              ("gpt2 4x128 tokens", lm, lambda m, dt: m(ids).logits)]:
        with torch.inference_mode():
            ref = call(model, torch.float32).float()
            t32 = timed(lambda: call(model, torch.float32))
            m16 = model.to(torch.bfloat16)
            out = call(m16, torch.bfloat16).float()
            t16 = timed(lambda: call(m16, torch.bfloat16))
            model.to(torch.float32)
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append((name, t32 * 1000, t16 * 1000, t16 / t32, rel))
    print(f"{'model':22s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'bf16/fp32':>10s} {'rel. error':>11s}")
    for name, a, b, r, rel in rows:
        print(f"{name:22s} {a:9.1f} {b:9.1f} {r:10.2f} {rel:11.4f}")


if __name__ == "__main__":
    main()
