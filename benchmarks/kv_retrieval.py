"""Scaling of ``type: kv_retrieval``: seconds per 1k tokens and peak memory, 4k ... 128k tokens.

Reads one input of each length (random token ids, batch 1) segment by segment with
:func:`memllm.forward_segments`, the memory storing every layer's keys/values and each segment
retrieving ``--top-k`` blocks per query chunk. Each length runs in its own process, so that its
peak resident set is its own. With a bounded cost per segment (top-k blocks, not the whole past)
the seconds per 1k tokens should stay flat as the input grows (total time linear: 128k / 8k =
16); the store grows linearly (``memllm info --memory`` prints its bytes per token).

``--offload none,disk`` measures both placements of the store: in RAM, or in memory-mapped files
(``offload: disk``) whose pages a layer unmaps after each call, so that the resident set holds
one layer's working set while the store itself sits in the page cache (reclaimable, written back
to disk under memory pressure). ``peak GB`` is the process's peak resident set (``ru_maxrss``:
anonymous memory plus mapped file pages, as the kernel counts them); ``file GB`` is the
file-backed part of the resident set at the end of the run (``RssFile``). ``--base`` also times
the bare model's plain forward of the whole input (no memory, one call) at the lengths it can
run (up to ``--base-max``, 8k by default: its attention is quadratic in the input).

By default a tiny random Llama (seconds, offline); ``--model smollm2-135m`` for the real one,
with ``--lengths`` up to what fits your time (each length is read once, after a short warm-up).
Ends with one JSON line ``{"episodic_facts_earlier_gain": ..., "kv_retrieval_time_128k_over_8k":
..., "kv_retrieval_peak_gb_128k": ...}`` (null where not measured): the time ratio is of total
seconds (of the first ``--offload`` placement), the peak of the lowest placement measured at
128k, and the episodic gain is read from an experiment's ``results.json``
(``--episodic-results``): its carry table's row for arm ``episodic`` (or ``--episodic-arm``),
the difference to its control in points.

    python benchmarks/kv_retrieval.py [--model smollm2-135m] [--lengths 4k,8k,32k,128k]
        [--offload none,disk] [--base] [--threads 2] [--episodic-results runs/x/results.json]
        [--episodic-arm episodic_curriculum]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _status_gb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``RssFile``, ``RssAnon``) in GB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def worker(length: int, offload: str, args) -> dict:
    """Read one ``length``-token input in this process; seconds and peak memory."""
    import torch

    import memllm
    from memllm.core.inject import memory_layers

    torch.set_num_threads(args.threads)
    model, _ = memllm.load_backbone(args.model)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    if offload == "base":  # the bare model, the whole input in one plain forward
        with torch.no_grad():
            model(input_ids=ids[:, : 2 * args.segment_length])
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            seconds = time.perf_counter() - start
        store_gb = 0.0
    else:
        memllm.inject_memory(
            model,
            {
                "type": "kv_retrieval",
                "block_size": args.block_size,
                "top_k": args.top_k,
                "init_tokens": args.init_tokens,
                "query_chunk": args.query_chunk,
                "store_dtype": args.store_dtype,
                "offload": offload,
            },
        )
        segment = args.segment_length
        with torch.no_grad():
            warm = ids[:, : 2 * segment]
            memllm.forward_segments(model, warm, segment_length=segment, keep_logits=False)
            start = time.perf_counter()
            memllm.forward_segments(model, ids, segment_length=segment, keep_logits=False)
            seconds = time.perf_counter() - start
        per_token = sum(
            layer.memory.bytes_per_token(model.dtype) for layer in memory_layers(model).values()
        )
        store_gb = per_token * length / 2**30
    return {
        "offload": offload,
        "tokens": length,
        "seconds": round(seconds, 2),
        "seconds_per_1k": round(1024 * seconds / length, 4),
        "peak_gb": round(_peak_gb(), 3),
        "file_gb": round(_status_gb("RssFile") or 0.0, 3),
        "store_gb": round(store_gb, 3),
        "load": round(os.getloadavg()[0], 1),  # the machine's 1-minute load when it ended
    }


def episodic_gain(
    path: str | None, parser: argparse.ArgumentParser, arm: str = "episodic"
) -> float | None:
    """The carry table's gain of ``arm`` over its control, in points (null: no file)."""
    if path is None:
        return None
    from memllm.evaluation.results import percent_metrics, primary_metric

    try:
        results = json.loads(Path(path).read_text())
        rows = [r for r in results["carry"]["rows"] if r["arm"] == arm]
        # beside the closed-set score, the task's own metric
        (row,) = [r for r in rows if r["metric"] == primary_metric(results)] or rows
        diff = row["test"]["diff"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(
            f"--episodic-results {path}: no carry row for arm {arm!r} "
            f"({type(error).__name__}: {error})"
        )
    if diff is None:
        return None
    scale = 100 if row["metric"] in percent_metrics(results) else 1
    return round(scale * diff, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m ...")
    parser.add_argument("--lengths", default="4k,8k,16k", help="up to 128k")
    parser.add_argument(
        "--offload", default="none", help="store placements to measure: none, cpu, disk (a list)"
    )
    parser.add_argument("--base", action="store_true", help="also time the bare model")
    parser.add_argument("--base-max", default="8k", help="longest input the bare model reads")
    parser.add_argument(
        "--segment-length", type=int, default=None, help="default: 512, or 64 for a tiny model"
    )
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--init-tokens", type=int, default=64)
    parser.add_argument("--query-chunk", type=int, default=64)
    parser.add_argument("--store-dtype", default="float16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--episodic-results", default=None, help="an experiment's results.json (carry table)"
    )
    parser.add_argument(
        "--episodic-arm", default="episodic", help="the arm of --episodic-results to read"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.segment_length is None:
        args.segment_length = 64 if args.model.startswith("tiny-") else 512
    if args.worker is not None:
        offload, length = args.worker.split(":")
        print(json.dumps(worker(int(length), offload, args)))
        return
    gain = episodic_gain(args.episodic_results, parser, args.episodic_arm)
    placements = [p.strip() for p in args.offload.split(",")]
    lengths = [_tokens(t) for t in args.lengths.split(",")]
    runs = [(p, n) for p in placements for n in lengths]
    if args.base:
        runs = [("base", n) for n in lengths if n <= _tokens(args.base_max)] + runs
    print(
        f"{args.model}: segments of {args.segment_length}, top_k {args.top_k} x "
        f"{args.block_size}-token blocks, store {args.store_dtype}, {args.threads} thread(s)",
        flush=True,
    )
    print(
        f"{'offload':>8} {'tokens':>8} {'seconds':>9} {'s / 1k tok':>11} {'peak GB':>8} "
        f"{'file GB':>8} {'store GB':>9} {'load':>5}",
        flush=True,
    )
    rows: dict[tuple[str, int], dict] = {}
    for offload, length in runs:
        argv = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{offload}:{length}"]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            print(f"{offload:>8} {length:>8} failed: {lines[-1] if lines else done.returncode}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows[offload, length] = row
        print(
            f"{offload:>8} {length:>8} {row['seconds']:>9.1f} {row['seconds_per_1k']:>11.3f} "
            f"{row['peak_gb']:>8.2f} {row['file_gb']:>8.2f} {row['store_gb']:>9.2f} "
            f"{row['load']:>5.1f}",
            flush=True,
        )
    k8, k128 = rows.get((placements[0], 8192)), rows.get((placements[0], 131072))
    ratio = k128["seconds"] / k8["seconds"] if k8 and k128 else None
    peaks = [rows[p, 131072]["peak_gb"] for p in placements if (p, 131072) in rows]
    print(
        json.dumps(
            {
                "episodic_facts_earlier_gain": gain,
                "kv_retrieval_time_128k_over_8k": round(ratio, 3) if ratio else None,
                "kv_retrieval_peak_gb_128k": min(peaks) if peaks else None,
            }
        )
    )


if __name__ == "__main__":
    main()
