"""Cost of the gated latent memory on a real backbone (default: the bundled SmolLM2-135M).

Prints three measurements and ends with one JSON line:

- forward time of a (batch × tokens) input with the memory after the last layer vs without
  (target ≤ 1.10×);
- greedy generation tokens/s with memory (``memllm.generate``) vs plain ``model.generate`` on the
  same prompt (target ≥ 0.85×);
- time to read 1k/2k/4k/8k-token inputs in 512-token segments (target: linear, 8k/1k ≤ 9×).

Each number is the median of ``--repeats`` runs after one warm-up run.

    python benchmarks/latent_memory.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import memllm
from memllm.core.segments import forward_segments


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = memllm.load_backbone(args.model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 1, (args.batch, args.tokens), generator=gen)
    prompt = torch.randint(100, vocab - 1, (1, 256), generator=gen)
    mask = torch.ones_like(prompt)
    pad = tokenizer.pad_token_id

    def plain_forward():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    def plain_generate():
        with torch.inference_mode():
            model.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    t_plain = median_time(plain_forward, args.repeats)
    t_plain_gen = median_time(plain_generate, args.repeats)

    memllm.inject_memory(model, memllm.LatentMemoryConfig())
    t_mem = median_time(plain_forward, args.repeats)

    def memory_generate():
        with torch.inference_mode():
            memllm.generate_ids(
                model,
                prompt,
                mask,
                segment_length=512,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=pad,
            )

    t_mem_gen = median_time(memory_generate, args.repeats)

    seg_times = {}
    for k in (1, 2, 4, 8):
        long_ids = torch.randint(100, vocab - 1, (1, 1024 * k), generator=gen)

        def read(long_ids=long_ids):
            with torch.inference_mode():
                forward_segments(model, long_ids, segment_length=512, keep_logits=False)

        seg_times[f"{k}k"] = median_time(read, max(1, args.repeats // 2))

    overhead = t_mem / t_plain
    speed_ratio = t_plain_gen / t_mem_gen
    scaling = seg_times["8k"] / seg_times["1k"]
    threads = torch.get_num_threads()
    print(f"model {args.model}, {threads} threads, median of {args.repeats} runs")
    print(
        f"forward {args.batch}x{args.tokens}: plain {t_plain:.3f}s, latent memory {t_mem:.3f}s "
        f"-> overhead {overhead:.3f}x (target <= 1.10)"
    )
    print(
        f"generate {args.new_tokens} tokens after a 256-token prompt: "
        f"plain {args.new_tokens / t_plain_gen:.1f} tok/s, "
        f"memory {args.new_tokens / t_mem_gen:.1f} tok/s "
        f"-> ratio {speed_ratio:.3f} (target >= 0.85)"
    )
    print(
        "segments of 512: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in seg_times.items())
        + f" -> 8k/1k {scaling:.2f} (target <= 9)"
    )
    print(
        json.dumps(
            {
                "latent_forward_overhead": round(overhead, 4),
                "generate_speed_ratio": round(speed_ratio, 4),
                "segments_8k_over_1k": round(scaling, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
