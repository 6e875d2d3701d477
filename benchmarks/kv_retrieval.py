"""Scaling of ``type: kv_retrieval``: seconds per 1k tokens and peak memory, 4k ... 128k tokens.

Reads one input of each length (random token ids, batch 1) segment by segment with
:func:`memllm.forward_segments`, the memory storing every layer's keys/values and each segment
retrieving ``--top-k`` blocks per query chunk. Each length runs in its own process, so that its
peak resident set is its own. With a bounded cost per segment (top-k blocks, not the whole past)
the seconds per 1k tokens should stay flat as the input grows; the store grows linearly
(``memllm info --memory`` prints its bytes per token).

By default a tiny random Llama (seconds, offline); ``--model smollm2-135m`` for the real one,
with ``--lengths`` up to what fits your time (each length is read once, after a short warm-up).
Ends with one JSON line ``{"kv_retrieval_time_128k_over_8k": ..., "kv_retrieval_peak_gb_128k":
...}`` (null where that length was not run).

    python benchmarks/kv_retrieval.py [--model smollm2-135m] [--lengths 4k,8k,16k] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(length: int, args) -> dict:
    """Read one ``length``-token input in this process; seconds and peak memory."""
    import torch

    import memllm

    torch.set_num_threads(args.threads)
    model, _ = memllm.load_backbone(args.model)
    memllm.inject_memory(
        model,
        {
            "type": "kv_retrieval",
            "block_size": args.block_size,
            "top_k": args.top_k,
            "init_tokens": args.init_tokens,
            "query_chunk": args.query_chunk,
            "store_dtype": args.store_dtype,
        },
    )
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        warm = ids[:, : 2 * args.segment_length]
        memllm.forward_segments(model, warm, segment_length=args.segment_length, keep_logits=False)
        start = time.perf_counter()
        memllm.forward_segments(model, ids, segment_length=args.segment_length, keep_logits=False)
        seconds = time.perf_counter() - start
    return {
        "tokens": length,
        "seconds": round(seconds, 2),
        "seconds_per_1k": round(1024 * seconds / length, 4),
        "peak_gb": round(_peak_gb(), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m ...")
    parser.add_argument("--lengths", default="4k,8k,16k", help="up to 128k")
    parser.add_argument(
        "--segment-length", type=int, default=None, help="default: 512, or 64 for a tiny model"
    )
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--init-tokens", type=int, default=64)
    parser.add_argument("--query-chunk", type=int, default=64)
    parser.add_argument("--store-dtype", default="float16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.segment_length is None:
        args.segment_length = 64 if args.model.startswith("tiny-") else 512
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = {}
    print(
        f"{args.model}: segments of {args.segment_length}, top_k {args.top_k} x "
        f"{args.block_size}-token blocks, store {args.store_dtype}",
        flush=True,
    )
    print(f"{'tokens':>8} {'seconds':>9} {'s / 1k tok':>11} {'peak GB':>8}", flush=True)
    for length in (_tokens(t) for t in args.lengths.split(",")):
        argv = [sys.executable, __file__, *sys.argv[1:], "--worker", str(length)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
            break
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows[length] = row
        print(
            f"{length:>8} {row['seconds']:>9.1f} {row['seconds_per_1k']:>11.3f} "
            f"{row['peak_gb']:>8.2f}",
            flush=True,
        )
    k8, k128 = rows.get(8192), rows.get(131072)
    ratio = k128["seconds_per_1k"] / k8["seconds_per_1k"] if k8 and k128 else None
    print(
        json.dumps(
            {
                "kv_retrieval_time_128k_over_8k": round(ratio, 3) if ratio else None,
                "kv_retrieval_peak_gb_128k": k128["peak_gb"] if k128 else None,
            }
        )
    )


if __name__ == "__main__":
    main()
