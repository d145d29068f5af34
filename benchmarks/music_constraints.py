"""What studio's constrained REMI decoding costs, measured side by side in one run.

    python benchmarks/music_constraints.py                  # random GPT-2 of --size small (3.4M)
    python benchmarks/music_constraints.py --size tiny --tokens 200 --repeats 3

For one random GPT-2 over studio's REMI tokenizer it times `model.generate` sampling the same
number of tokens
  A. with RemiConstraint (grammar + --key + --chords + --tempo + --program), and
  B. without any logits processor,
and prints milliseconds per token of each and the ratio A / B: the per-step price of enforcing
the controls. Nothing here is a test: numbers move with the machine and its load, which is why
A and B alternate in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--tokens", type=int, default=300, help="new tokens per generate call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList

    from studio.pipelines.music_symbolic import (Controls, RemiConstraint, RemiVocab, default_tokenizer, parse_chords,
                                          parse_key)
    from studio.pipelines.training.midi_train import SIZES

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer["BOS_None"],
                                       eos_token_id=tokenizer["EOS_None"], pad_token_id=tokenizer.pad_token_id,
                                       **SIZES[args.size])).eval()
    vocab = RemiVocab(tokenizer, model.config.vocab_size)
    bos = tokenizer["BOS_None"]
    controls = Controls(target_bars=10_000, first_new_bar=0, time_signature=(4, 4), tempo_token=vocab.nearest_tempo(120),
                        program=0, scale=parse_key("C:major")[2],
                        chords=tuple(pcs for _, pcs in parse_chords("C G Am F")))

    def run(constrained: bool) -> float:
        processors = LogitsProcessorList()
        if constrained:
            constraint = RemiConstraint(vocab, controls)
            constraint.ingest(bos)
            constraint.begin(1)
            processors.append(constraint)
        ids = torch.tensor([[bos]])
        torch.manual_seed(1)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens, logits_processor=processors,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer["EOS_None"])
        return (time.perf_counter() - start) / (out.shape[1] - 1) * 1000

    run(True), run(False)  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(run(True))
        b.append(run(False))
    ma, mb = statistics.median(a), statistics.median(b)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 {args.size} ({params / 1e6:.2f}M params), {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"A constrained   {ma:7.2f} ms/token")
    print(f"B unconstrained {mb:7.2f} ms/token")
    print(f"A / B = {ma / mb:.2f}")


if __name__ == "__main__":
    main()
