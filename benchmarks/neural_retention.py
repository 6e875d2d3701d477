"""Retention of the Titans neural memory: how much of one written key is left after N tokens.

Writes one key→value pair, then N random distractor tokens, into a neural memory with its gates
at their initial values, and prints the key's trace (``memllm.memory.diagnostics``): imprint
‖M(k) − M'(k)‖/‖v‖ (M' = the same stream without the write) and its cosine with the direction
from M_0(k) to v, for the earlier defaults and the current ones (``NeuralMemoryConfig``), at the
SmolLM2-135M width (576) by default. A key counts as recoverable while imprint ≥ 0.1 and cosine
≥ 0.5. Seconds on a CPU. Ends with one JSON line: the imprint and cosine after 512 tokens at both.

    python benchmarks/neural_retention.py [--width 576] [--trials 8] [--sweep]
"""

from __future__ import annotations

import argparse
import json

import torch

from memllm.memory.diagnostics import retention_curve
from memllm.memory.neural import PREVIOUS_DEFAULTS, NeuralMemoryConfig

DISTANCES = [0, 1, 8, 64, 128, 256, 512]
# A few settings around the chosen defaults (--sweep): how the step bound, the momentum and
# the forgetting trade the size of a trace against the interference of later writes.
SWEEP = {
    "lr 0.1, clip 10, eta 0.5": {
        "max_adaptive_lr": 0.1,
        "max_grad_norm": 10.0,
        "momentum_bias": 0.0,
    },
    "lr 0.3, clip 10, eta 0.5": {
        "max_adaptive_lr": 0.3,
        "max_grad_norm": 10.0,
        "momentum_bias": 0.0,
    },
    "lr 1.0, clip 10, eta 0.5": {
        "max_adaptive_lr": 1.0,
        "max_grad_norm": 10.0,
        "momentum_bias": 0.0,
    },
    "lr 0.4, clip 10, eta 0.88": {"max_adaptive_lr": 0.4, "momentum_bias": 2.0},
    "lr 0.4, clip 1, eta 0.12": {"max_adaptive_lr": 0.4, "max_grad_norm": 1.0},
    "forget -7 (alpha 9e-4)": {"forget_bias": -7.0},
    "forget -4 (alpha 0.018)": {"forget_bias": -4.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=576, help="memory width (SmolLM2: 576)")
    parser.add_argument("--trials", type=int, default=8, help="streams averaged per point")
    parser.add_argument("--sweep", action="store_true", help="also print settings nearby")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"previous defaults": dict(PREVIOUS_DEFAULTS), "new defaults": {}}
    if args.sweep:
        settings.update(SWEEP)
    print(f"width {args.width}, {args.trials} trials; imprint / cosine after N tokens")
    print("| setting | " + " | ".join(f"N={n}" for n in DISTANCES) + " |")
    print("|---|" + "---|" * len(DISTANCES))
    curves = {}
    for name, overrides in settings.items():
        config = NeuralMemoryConfig(**overrides)
        curve = retention_curve(config, DISTANCES, width=args.width, trials=args.trials)
        curves[name] = curve
        cells = [
            f"{p.imprint:.2g} / {p.alignment:.2f}" + ("" if p.recoverable else " ✗") for p in curve
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("✗: not recoverable (imprint < 0.1 or cosine < 0.5)")
    last = {name: curves[name][-1] for name in ("previous defaults", "new defaults")}
    print(
        json.dumps(
            {
                "width": args.width,
                "imprint_512_previous": round(last["previous defaults"].imprint, 8),
                "cosine_512_previous": round(last["previous defaults"].alignment, 3),
                "imprint_512_new": round(last["new defaults"].imprint, 4),
                "cosine_512_new": round(last["new defaults"].alignment, 3),
                "recoverable_512_new": last["new defaults"].recoverable,
            }
        )
    )


if __name__ == "__main__":
    main()
