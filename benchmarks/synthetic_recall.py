"""Synthetic recall: can a memory carry K key→value facts to a question in a later segment?

A fixed random tiny Llama (frozen; ``memllm.core.tiny``) reads three 8-token segments of random
filler. K facts — a key token followed by its value token (8 keys, 8 values) — sit in the first
two segments; the last segment ends with a question mark, one of the K keys and its value, the
only label. The backbone sees only the last segment, so every point above chance (1/8) is
carried by the memory. Each memory variant (one memory after the last layer) is trained for
``--steps`` steps (AdamW, batch 32) and scored on 512 held-out inputs, with the facts and with
them removed (the no-fact control: the same questions, filler instead of facts).

Variants: the latent memory's write rules (``gmemllm`` = G-MemLLM, ``slot_competition``,
``delta``, each ``+recency``), the neural memory (``gate`` arch) at its earlier and current
defaults, and the episodic memory (stores every token; the reference). A few CPU minutes.
Ends with one JSON line: accuracy per variant and K.

    python benchmarks/synthetic_recall.py [--steps 300] [--facts 1,4] [--variants a,b]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import memllm
from memllm.core.backbone import freeze
from memllm.core.segments import forward_segments
from memllm.core.tiny import build_tiny_model
from memllm.memory.neural import PREVIOUS_DEFAULTS

SEG = 8
KEYS, VALUES, MARK = torch.arange(10, 18), torch.arange(20, 28), 5
LATENT = {"type": "latent", "num_slots": 8, "memory_dim": 64, "num_heads": 2}
NEURAL = {"type": "neural", "arch": "gate", "memory_dim": 32, "chunk_size": 8}
VARIANTS = {
    "latent gmemllm": LATENT,
    "latent gmemllm+recency": {**LATENT, "write_recency": True},
    "latent slot_competition": {**LATENT, "write": "slot_competition"},
    "latent slot_competition+recency": {
        **LATENT,
        "write": "slot_competition",
        "write_recency": True,
    },
    "latent delta": {**LATENT, "write": "delta"},
    "latent delta+recency": {**LATENT, "write": "delta", "write_recency": True},
    "neural previous defaults": {**NEURAL, **PREVIOUS_DEFAULTS},
    "neural new defaults": NEURAL,
    "episodic (reference)": {"type": "episodic", "num_heads": 2, "key_dim": 64, "max_tokens": 64},
}


def recall_batch(n: int, facts: int, gen: torch.Generator):
    """``(ids, labels, ids_without_facts, answers)`` of ``n`` inputs with ``facts`` facts."""
    rows = torch.arange(n)
    ids = torch.randint(100, 250, (n, 3 * SEG), generator=gen)
    keys = torch.stack([KEYS[torch.randperm(len(KEYS), generator=gen)[:facts]] for _ in rows])
    values = VALUES[torch.randint(0, len(VALUES), (n, facts), generator=gen)]
    # fact places: token pairs at offsets 0, 2, 4, 6 of segments 1 and 2, in order
    places = torch.stack([torch.randperm(8, generator=gen)[:facts].sort().values for _ in rows])
    starts = (places // 4) * SEG + (places % 4) * 2
    ask = torch.randint(0, facts, (n,), generator=gen)
    without = ids.clone()
    ids[rows[:, None], starts], ids[rows[:, None], starts + 1] = keys, values
    answer = values[rows, ask]
    for x in (ids, without):
        x[:, -3], x[:, -2], x[:, -1] = MARK, keys[rows, ask], answer
    labels = torch.full_like(ids, -100)
    labels[:, -1] = answer
    return ids, labels, without, answer


def run_variant(memory: dict, facts: int, steps: int, seed: int = 0) -> dict:
    """Train ``memory`` on the tiny backbone; accuracy with and without the facts."""
    model, _ = build_tiny_model("llama", seed=0)  # the same fixed backbone for every variant
    freeze(model)
    torch.manual_seed(seed)
    memllm.inject_memory(model, memory)
    opt = torch.optim.AdamW(memllm.memory_parameters(model), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        ids, labels, _, _ = recall_batch(32, facts, gen)
        out = forward_segments(model, ids, labels=labels, segment_length=SEG, keep_logits=False)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    ids, _, without, answer = recall_batch(512, facts, torch.Generator().manual_seed(99))
    accuracy = []
    with torch.no_grad():
        for x in (ids, without):
            logits = forward_segments(model, x, segment_length=SEG).logits
            accuracy.append((logits[:, -2].argmax(-1) == answer).float().mean().item())
    return {
        "accuracy": accuracy[0],
        "no_facts": accuracy[1],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--facts", default="1,4", help="comma-separated K values")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.variants is None else args.variants.split(",")
    ks = [int(k) for k in args.facts.split(",")]
    print(f"{args.steps} steps, batch 32; chance 1/8 = 0.125; accuracy (no-fact control)")
    print("| variant | " + " | ".join(f"K={k}" for k in ks) + " | seconds |")
    print("|---|" + "---|" * (len(ks) + 1))
    results: dict[str, dict] = {}
    for name in names:
        row = {k: run_variant(VARIANTS[name], k, args.steps) for k in ks}
        results[name] = {f"K{k}": round(r["accuracy"], 3) for k, r in row.items()}
        results[name].update({f"K{k}_no_facts": round(r["no_facts"], 3) for k, r in row.items()})
        cells = [f"{r['accuracy']:.3f} ({r['no_facts']:.3f})" for r in row.values()]
        seconds = sum(r["seconds"] for r in row.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)
    print(json.dumps({"steps": args.steps, "chance": 0.125, "accuracy": results}))


if __name__ == "__main__":
    main()
