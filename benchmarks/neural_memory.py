"""Speed of the neural memory's update: chunked form vs per-token reference vs titans-pytorch.

Measures tokens/s of one memory (write every token, read every token) at the SmolLM2-135M shape —
width 576, memory MLP depth 2, expansion 2 — for batch 1 and 4, sequences of 256/1024/4096
tokens, forward only and forward + backward, and the peak memory of each run:

- ``chunked``: :class:`memllm.memory.neural.NeuralMemory` (projections + chunked update + reads);
- ``reference``: the same projections and :func:`~memllm.memory.neural_update.reference_update`,
  the per-token loop, timed once (run only up to ``--reference-max-tokens`` /
  ``--reference-max-backward`` tokens per batch: it is slow, and its backward graph holds the
  weights of every token — 11.8 GB for 256 tokens);
- ``titans``: ``titans_pytorch.NeuralMemory`` with the same width, MLP and ``chunk_size``, and
  ``batch_size = chunk_size`` so that its gradients are taken at the weights of each chunk's start,
  the rule the chunked form implements (skipped if ``titans-pytorch`` is not installed:
  ``pip install 'memllm[bench]'``; its backward is skipped above ``--titans-max-backward`` tokens
  per batch, where its memory outgrows a 23 GB machine).

Each cell runs in its own process (so that its peak memory is its own): one warm-up call on at
most 256 tokens, then ``--repeats`` timed calls (half as many above 4096 tokens per batch); the
median is reported. Peak memory is the
process's peak resident set growth on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Ends with
one JSON line: the speed-ups at batch 1, 1024 tokens, forward, equal chunk size.

    python benchmarks/neural_memory.py [--threads 2] [--chunk-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

WIDTH, DEPTH, EXPANSION = 576, 2, 2.0
IMPLS = ("chunked", "reference", "titans")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(impl: str, batch: int, tokens: int, backward: bool, args) -> dict:
    """Time one cell in this process; returns tokens/s and peak memory (MB)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x_full = torch.randn(batch, tokens, WIDTH, device=device)
    if impl == "titans":
        from titans_pytorch import NeuralMemory as TitansMemory

        module = TitansMemory(
            dim=WIDTH,
            chunk_size=args.chunk_size,
            batch_size=args.chunk_size,
            heads=1,
            default_model_kwargs={"depth": DEPTH, "expansion_factor": EXPANSION},
        ).to(device)

        def call(x):
            return module(x)[0]

    else:
        from memllm.memory.neural import NeuralMemory, NeuralMemoryConfig
        from memllm.memory.neural_update import reference_update

        config = NeuralMemoryConfig(
            mlp_depth=DEPTH, mlp_expansion_factor=EXPANSION, chunk_size=args.chunk_size
        )
        module = NeuralMemory(config, WIDTH).to(device)

        def call(x):
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=device)
            state = module.init_state(x.shape[0], device, x.dtype)
            h = module.norm(x)
            if impl == "chunked":
                return module.memorise(h, state, mask)[0]
            p = module.project(h)
            order = ("keys", "values", "queries", "lr", "forget_logit", "momentum_logit")
            return reference_update(state, *(p[k] for k in order), mask, chunk_size=1)[0]

    def run(x):
        if backward:
            module.zero_grad(set_to_none=True)
            call(x).square().mean().backward()
        else:
            with torch.no_grad():
                call(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    # warm-up, never larger than the timed calls (the per-token loop needs only a few tokens)
    run(x_full[:, : min(tokens, 16 if impl == "reference" else 256)])
    times = []
    for _ in range(1 if impl == "reference" else args.repeats):
        start = time.perf_counter()
        run(x_full)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _peak_rss_mb() - base
    seconds = statistics.median(times)
    return {"tokens_per_s": batch * tokens / seconds, "seconds": seconds, "peak_mb": peak}


def skip_reason(impl: str, batch: int, tokens: int, backward: bool, args) -> str | None:
    if impl == "titans" and importlib.util.find_spec("titans_pytorch") is None:
        return "not installed"
    if impl == "reference":
        limit = args.reference_max_backward if backward else args.reference_max_tokens
        if batch * tokens > limit:  # slow; its backward holds every token's weights
            return "skipped"
    if impl == "titans" and backward and batch * tokens > args.titans_max_backward:
        return "skipped (memory)"  # 7.4 GB for 1 × 4096 tokens; 4 × 4096 was killed (23 GB)
    return None


def run_cell(impl: str, batch: int, tokens: int, backward: bool, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"{impl},{batch},{tokens},{int(backward)}",
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats if tokens * batch <= 4096 else max(1, args.repeats // 2)),
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        if done.returncode < 0:  # killed, e.g. by the out-of-memory killer
            return {"error": f"killed (signal {-done.returncode})"}
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:120]}
    return json.loads(lines[-1])


def fmt(cell: dict | None, key: str, spec: str) -> str:
    if cell is None:
        return "—"
    if "skip" in cell:
        return cell["skip"]
    if "error" in cell:
        return f"error: {cell['error']}"
    return format(cell[key], spec)


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "tokens_per_s" not in a or "tokens_per_s" not in b:
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--reference-max-tokens", type=int, default=1024)
    parser.add_argument("--reference-max-backward", type=int, default=64)
    parser.add_argument("--titans-max-backward", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, batch, tokens, backward = args.worker.split(",")
        print(json.dumps(worker(impl, int(batch), int(tokens), backward == "1", args)))
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"device={args.device} threads={threads} width={WIDTH} depth={DEPTH} "
        f"expansion={EXPANSION} chunk_size={args.chunk_size} torch={torch.__version__}"
    )
    results: dict[tuple, dict] = {}
    for backward in (False, True):
        for batch in args.batches:
            for tokens in args.lengths:
                for impl in IMPLS:
                    reason = skip_reason(impl, batch, tokens, backward, args)
                    cell = (
                        {"skip": reason}
                        if reason
                        else run_cell(impl, batch, tokens, backward, args)
                    )
                    results[(impl, batch, tokens, backward)] = cell
                    shown = fmt(cell, "tokens_per_s", ".0f")
                    mode = "fwd+bwd" if backward else "fwd"
                    print(
                        f"  {impl:9s} B={batch} T={tokens:5d} {mode:7s} {shown} tok/s", flush=True
                    )

    header = (
        "| pass | batch | tokens | chunked tok/s | reference tok/s | titans-pytorch tok/s "
        "| chunked / reference | chunked / titans | peak MB chunked / reference / titans |"
    )
    print()
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for backward in (False, True):
        for batch in args.batches:
            for tokens in args.lengths:
                cells = [results[(impl, batch, tokens, backward)] for impl in IMPLS]
                speed = [fmt(c, "tokens_per_s", ".0f") for c in cells]
                peaks = " / ".join(fmt(c, "peak_mb", ".0f") for c in cells)
                over = [ratio(cells[0], cells[1]), ratio(cells[0], cells[2])]
                over_s = [f"{r:.1f}×" if r is not None else "—" for r in over]
                mode = "fwd+bwd" if backward else "fwd"
                print(
                    f"| {mode} | {batch} | {tokens} | {speed[0]} | {speed[1]} | {speed[2]} "
                    f"| {over_s[0]} | {over_s[1]} | {peaks} |"
                )
    key = (1, 1024, False)
    summary = {
        "chunked_over_reference_1024": _round(
            ratio(results.get(("chunked", *key)), results.get(("reference", *key)))
        ),
        "chunked_over_titans_1024": _round(
            ratio(results.get(("chunked", *key)), results.get(("titans", *key)))
        ),
    }
    print(json.dumps(summary))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    main()
