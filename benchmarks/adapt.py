"""LoRA vs full fine-tuning on the same small Llama causal LM: trainable parameters, peak memory
and steps/s, measured side by side in one run and printed as ratios.

    .venv/bin/python benchmarks/adapt.py [--hidden 384 --layers 6 --steps 8 --rank 8]

"peak memory" is measured; "weights+grads+AdamW" is counted from the tensors (the part LoRA
removes; activations, which LoRA does not shrink, make up the rest of the peak).

Each variant runs in a forked child (the parent has imported torch/transformers/peft once, so
the children pay no import time): on the CPU the child resets its peak-RSS counter
(/proc/self/clear_refs) and reports VmHWM - VmRSS-at-start, i.e. what building the model and
training it added (weights, grads, AdamW state, activations); on CUDA it reports
torch.cuda.max_memory_allocated. Both variants train through the same code: the LoRA one wraps
the model with peft's get_peft_model, exactly what `studio adapt train` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_variant(kind: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        start = _rss_kib("VmRSS") * 1024
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(device)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        from studio.adapters.peft_adapters import default_targets

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=default_targets(model),
                                                 task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    times = []
    for step in range(args.steps + 1):  # the first step warms up (allocations, kernels)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - start
    # what training must hold besides activations: weights, a grad per trainable weight, AdamW's two moments
    state = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(3 * p.numel() * p.element_size() for p in params)
    queue.put({"kind": kind, "trainable": sum(p.numel() for p in params), "total": total, "state_bytes": state,
               "peak_bytes": peak, "steps_per_s": len(times) / sum(times), "device": device})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    import peft  # noqa: F401  imported once here: the forked children inherit it
    import torch
    import transformers  # noqa: F401

    ctx = mp.get_context("fork")
    rows = {}
    for kind in ("full", "lora"):
        queue = ctx.Queue()
        child = ctx.Process(target=run_variant, args=(kind, args, queue))
        child.start()
        rows[kind] = queue.get()
        child.join()
    full, lora = rows["full"], rows["lora"]
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"model: Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} ({full['total'] / 1e6:.1f}M params), "
          f"batch {args.batch}x{args.seq} tokens, LoRA r={args.rank} on all linear layers, {full['device']}, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'':24}{'full FT':>14}{'LoRA':>14}{'LoRA / full':>14}")
    print(f"{'trainable params':24}{full['trainable']:>14,}{lora['trainable']:>14,}{lora['trainable'] / full['trainable']:>14.4f}")
    print(f"{'peak memory MiB':24}{mib(full['peak_bytes']):>14.1f}{mib(lora['peak_bytes']):>14.1f}"
          f"{lora['peak_bytes'] / max(full['peak_bytes'], 1):>14.3f}")
    print(f"{'weights+grads+AdamW MiB':24}{mib(full['state_bytes']):>14.1f}{mib(lora['state_bytes']):>14.1f}"
          f"{lora['state_bytes'] / full['state_bytes']:>14.3f}")
    print(f"{'steps/s':24}{full['steps_per_s']:>14.2f}{lora['steps_per_s']:>14.2f}{lora['steps_per_s'] / full['steps_per_s']:>14.3f}")
    print(json.dumps({"full": full, "lora": lora}))


if __name__ == "__main__":
    main()
