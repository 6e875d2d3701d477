"""Why does (or doesn't) the quickstart's latent memory learn to retrieve? Cached-feature study.

The backbone is frozen and the memory sits *above* a decoder layer L, so the output of layer L
for every segment never depends on the memory: the library's feature cache
(:mod:`memllm.training.feature_cache`) records it once per input (the expensive part, ~200-800
tokens/s on a 2-core CPU) and every memory variant then trains on it in seconds. Only the layers
above L run per step, and only on the last segment (the one with the answer): earlier segments
just write, and a write reads layer L's output, so nothing above L matters there. The cache runs
the layers above L through the backbone's own decoder stack, so any supported architecture works.

Variants differ in placement (L), slots, width, learning rate, steps, data size and loss; two
controls tell retrieval from format learning:

* ``window`` — the untrained memory (the identity): the bare backbone on the last segment;
* ``no_carry`` — the same memory trained and evaluated on the last segment only (a fresh memory
  there), so it can learn the answer format and the answers' prior but nothing from earlier
  segments.

A memory that retrieves must beat ``no_carry``. The metric is teacher-forced answer accuracy on
the validation split (every answer token is the argmax; EOS excluded): BabiLong qa1/qa2 answers
are one location word, so it is the official "label in the output" score of a greedy answer
whose first tokens are the label. Test data is never touched.

    python benchmarks/latent_study.py --layers 29 --variants window,no_carry,base
    # smoke run on the tiny test model (seconds):
    python benchmarks/latent_study.py --model tiny-llama --train-length 0k --val-length 0k \
        --num-train 4 --num-val 2 --segment-length 64 --layers 0,-1 --epochs 1 \
        --variants window,no_carry,base --cache /tmp/latent_study_smoke

The last line printed is one JSON object: the settings and each variant's validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from memllm.core.backbone import decoder_stack, load_backbone
from memllm.core.inject import (
    has_memory,
    inject_memory,
    memory_modules,
    memory_session,
    remove_memory,
)
from memllm.core.segments import shifted_targets
from memllm.data import build_task
from memllm.data.babilong import supporting_facts_in_window
from memllm.data.prompting import format_example
from memllm.evaluation.stats import paired_test, wilson_interval
from memllm.memory import LatentMemoryConfig
from memllm.training.data import Item, collate, encode_split
from memllm.training.feature_cache import FeatureCache
from memllm.training.schedule import lr_factor

# name -> overrides of DEFAULTS ("memory" merges into DEFAULTS["memory"])
VARIANTS: dict[str, dict] = {
    "window": {"steps": 0},
    "no_carry": {"carry": False},
    "base": {},
    "lr5e-3": {"lr": 5e-3},
    "lr1e-2": {"lr": 1e-2},
    "steps4x": {"epochs": 24},
    "steps4x_lr5e-3": {"epochs": 24, "lr": 5e-3},
    "slots64": {"memory": {"num_slots": 64}},
    "dim512": {"memory": {"memory_dim": 512}},
    "no_reg": {"memory": {"sparsity_weight": 0.0, "entropy_weight": 0.0}},
    "no_gate": {"memory": {"update_gate": False}},
}
DEFAULTS = {
    "memory": {"num_slots": 16, "memory_dim": 256, "num_heads": 8},
    "lr": 2e-3,
    "epochs": 6,
    "batch": 8,
    "carry": True,
    "steps": None,
}
WARMUP_STEPS = 10
EVAL_BATCH = 16


def build_items(args, tokenizer, split: str, length: str):
    """Items and examples of one split. Both splits are built with the same sizes: validation
    takes the first ``num_val`` stories of the shuffled bAbI train file and training the next
    ``num_train``, so the two never share a story."""
    task = build_task(
        "babilong",
        {
            "tasks": ["qa1", "qa2"],
            "lengths": [length],
            "prompt": "plain",
            "num_train": args.num_train,
            "num_validation": args.num_val,
            "num_test": 1,
        },
    )
    return encode_split(task, tokenizer, split, None, chat=args.chat)


def facts_in_window(examples, items, tokenizer, segment_length: int, chat: bool) -> list[bool]:
    """Per input: whether every supporting fact starts inside the last segment (the window).

    Those questions can be answered without a memory; the others need what earlier segments
    held. The last segment of a teacher-forced item ends with the answer and EOS, so the window
    over the prompt alone is shorter by their tokens.
    """
    flags = []
    for ex, it in zip(examples, items, strict=True):
        text = format_example(tokenizer, ex.prompt, ex.target, chat)[0]
        answer = len(it.ids) - len(tokenizer(text, add_special_tokens=False)["input_ids"])
        inside = supporting_facts_in_window(text, ex, tokenizer, segment_length - answer)
        assert inside is not None, f"{ex.id}: no fact positions"
        flags.append(inside)
    return flags


def split_accuracy(correct: list[bool], in_window: list[bool]) -> str:
    """'k/n (x%)' for the questions answerable from the window and for those that are not."""
    parts = []
    for want in (True, False):
        hits = [c for c, w in zip(correct, in_window, strict=True) if w == want]
        k, n = sum(hits), len(hits)
        parts.append(f"{k}/{n} ({100 * k / max(1, n):.0f} %)")
    return " | ".join(parts)


def with_memory(model, layer: int, memory: dict, seed: int = 0) -> FeatureCache:
    """``model`` with a fresh latent memory after ``layer`` (seeded) and its feature cache."""
    if has_memory(model):
        remove_memory(model)
    torch.manual_seed(seed)
    inject_memory(model, LatentMemoryConfig(layer_ids=[layer], **memory))
    return FeatureCache(model)


@torch.no_grad()  # not inference_mode: the recorded features feed the memory's autograd graph
def record(model, cache: FeatureCache, items: list[Item], keys: list[str], segment_length: int):
    """Record the memory layer's input features of every item (real tokens, CPU) under ``keys``."""
    start, done = time.time(), 0
    for b in range(0, len(items), 4):
        chunk = collate(items[b : b + 4], 0, "cpu")
        with memory_session(model) as session:  # records each segment not seen before
            cache.forward(
                chunk.input_ids,
                chunk.attention_mask,
                None,
                segment_length=segment_length,
                session=session,
            )
        done += len(chunk.ids)
        rate = sum(len(it.ids) for it in items[:done]) / (time.time() - start)
        print(f"  recorded {done}/{len(items)} ({rate:.0f} tokens/s)", flush=True)


def last_segment(items: list[Item], keys: list[str], cache: FeatureCache, segment_length: int):
    """The items cut to their last segment (and their cached features under new keys): the
    no-carry control reads that segment with a fresh memory. Segments are end-aligned and the
    layers up to L see one segment at a time, so the features are the full input's last ones."""
    cut, cut_keys = [], []
    for it, key in zip(items, keys, strict=True):
        n = min(segment_length, len(it.ids))
        mask = it.mask[-n:] if it.mask is not None else None
        cut.append(
            replace(it, id=f"{it.id}/last", ids=it.ids[-n:], labels=it.labels[-n:], mask=mask)
        )
        cut_keys.append(f"{key}/last")  # the cache is keyed by segment: already recorded
    return cut, cut_keys


def run_batch(model, cache, items, keys, segment_length, *, keep_logits=False):
    """Loss, aux loss and (with ``keep_logits``) per-item answer correctness of cached items."""
    batch = collate(items, 0, "cpu")
    with memory_session(model) as session:
        out = cache.forward(
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            segment_length=segment_length,
            session=session,
            keep_logits=keep_logits,
        )
    correct = None
    if keep_logits:  # teacher-forced: every answer token (EOS excluded) is the argmax
        targets = shifted_targets(batch.labels)[:, -out.logits.shape[1] :]
        pred = out.logits.argmax(-1)
        eos = items[0].ids[-1]
        answer = (targets != -100) & (targets != eos)
        correct = ((pred == targets) | ~answer).all(-1)
    return out.loss, out.aux_loss, correct


def train_variant(name, spec, model, data, in_window, layer, segment_length, defaults, seed=0):
    """Train one variant (``spec`` over ``defaults``) and print its row; per-question correct."""
    cfg = {**defaults, **spec, "memory": {**defaults["memory"], **spec.get("memory", {})}}
    features = data["features"]
    cache = with_memory(model, layer, cfg["memory"], seed)
    cache.features = features
    train_items, train_keys = data["train"]
    val_items, val_keys = data["validation"]
    if not cfg["carry"]:
        train_items, train_keys = last_segment(train_items, train_keys, cache, segment_length)
        val_items, val_keys = last_segment(val_items, val_keys, cache, segment_length)
    memory = next(iter(memory_modules(model).values()))
    n = len(train_items)
    steps = (
        cfg["steps"] if cfg["steps"] is not None else cfg["epochs"] * math.ceil(n / cfg["batch"])
    )
    opt = torch.optim.AdamW(memory.parameters(), lr=cfg["lr"], weight_decay=0.01)
    warmup = min(WARMUP_STEPS, max(1, steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, "cosine", warmup, steps))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    start = time.time()
    losses = []
    memory.train()
    for _ in range(steps):
        if len(order) < cfg["batch"]:
            order += torch.randperm(n, generator=g).tolist()
        idx, order = order[: cfg["batch"]], order[cfg["batch"] :]
        loss, aux, _ = run_batch(
            model,
            cache,
            [train_items[i] for i in idx],
            [train_keys[i] for i in idx],
            segment_length,
        )
        (loss + aux).backward()
        nn.utils.clip_grad_norm_(memory.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    train_time = time.time() - start
    memory.eval()
    with torch.no_grad():
        correct, vloss = [], []
        for b in range(0, len(val_items), EVAL_BATCH):
            loss, _, c = run_batch(
                model,
                cache,
                val_items[b : b + EVAL_BATCH],
                val_keys[b : b + EVAL_BATCH],
                segment_length,
                keep_logits=True,
            )
            correct += c.tolist()
            vloss.append(float(loss) * len(c))
    k, total = sum(correct), len(correct)
    lo, hi = wilson_interval(k, total)
    first = sum(losses[:10]) / max(1, len(losses[:10]))
    last = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(
        f"| {name} | L{layer} | {steps} | {first:.2f} → {last:.2f} | {sum(vloss) / total:.3f} | "
        f"{100 * k / total:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
        f"{float(memory.out_gate.detach().abs().mean()):.3f} | "
        f"{train_time:.0f} s | {split_accuracy(correct, in_window)} |",
        flush=True,
    )
    return correct


def recorded_features(args, model, layer: int, built, cache_dir: Path) -> dict[str, Tensor]:
    """Layer ``layer``'s output for every train and validation item, keyed ``split/id``
    (recorded once, then read from ``cache_dir``)."""
    model_tag = args.model.replace("/", "_")
    features: dict[str, Tensor] = {}
    for split, length in (("train", args.train_length), ("validation", args.val_length)):
        items = built[split][0]
        # the key names both sizes: they decide which stories each split holds
        name = f"{model_tag}_{split}_{length}_{args.num_train}_{args.num_val}"
        path = cache_dir / f"{name}_{args.segment_length}_L{layer}.pt"
        keys = [f"{split}/{it.id}" for it in items]
        if path.exists():
            features.update(torch.load(path))
            continue
        print(
            f"recording {split} {length}: {len(items)} inputs, "
            f"{sum(len(i.ids) for i in items)} tokens, layer {layer}"
        )
        cache = with_memory(model, layer, DEFAULTS["memory"])
        record(model, cache, items, keys, args.segment_length)
        torch.save(cache.features, path)
        features.update(cache.features)
    return features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="backbone (name, folder or .gguf)")
    p.add_argument("--train-length", default="1k")
    p.add_argument("--num-train", type=int, default=100, help="per task")
    p.add_argument("--val-length", default="1k")
    p.add_argument("--num-val", type=int, default=30, help="per task")
    p.add_argument("--segment-length", type=int, default=256)
    p.add_argument("--layers", default="29", help="layers to place the memory after (comma list)")
    p.add_argument("--variants", default="window,no_carry,base")
    p.add_argument("--cache", default="runs/latent_study", help="folder for recorded features")
    p.add_argument(
        "--epochs", type=int, help=f"epochs of every variant (default {DEFAULTS['epochs']})"
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompts in the chat template (default: when the tokenizer has one)",
    )
    args = p.parse_args()
    defaults = {**DEFAULTS, "epochs": args.epochs or DEFAULTS["epochs"]}
    model, tokenizer = load_backbone(args.model)
    if args.chat is None:
        args.chat = getattr(tokenizer, "chat_template", None) is not None
    depth = len(decoder_stack(model)[1])
    layers = [int(x) % depth for x in args.layers.split(",")]
    cache_dir = Path(args.cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    lengths = {"train": args.train_length, "validation": args.val_length}
    built = {
        split: build_items(args, tokenizer, split, length) for split, length in lengths.items()
    }
    examples = {split: ex for split, (_, ex) in built.items()}
    shared = {e.meta["babi_source"] for e in examples["train"]} & {
        e.meta["babi_source"] for e in examples["validation"]
    }
    if shared:  # an earlier version of this script trained on most validation stories
        raise SystemExit(f"train and validation share bAbI stories: {sorted(shared)[:3]}")
    splits = {
        split: (built[split][0], [f"{split}/{it.id}" for it in built[split][0]])
        for split in lengths
    }
    print(
        f"train {len(splits['train'][0])} inputs ({args.train_length}), "
        f"validation {len(splits['validation'][0])} ({args.val_length})"
    )
    in_window = facts_in_window(
        examples["validation"], built["validation"][0], tokenizer, args.segment_length, args.chat
    )
    print(
        f"validation: {sum(in_window)} of {len(in_window)} questions have every supporting fact "
        f"in the last {args.segment_length}-token segment"
    )
    features = {layer: recorded_features(args, model, layer, built, cache_dir) for layer in layers}
    print(
        "| variant | layer | steps | train loss (first → last 10) | val loss "
        "| val acc % [95% CI] | gate | time | right, facts in window | right, facts earlier |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    names = args.variants.split(",")
    summary: dict[str, float] = {}
    for layer in layers:
        data = {**splits, "features": features[layer]}
        correct = {
            name: train_variant(
                name, VARIANTS[name], model, data, in_window, layer, args.segment_length, defaults
            )
            for name in names
        }
        summary |= {f"L{layer}/{name}": sum(c) / len(c) for name, c in correct.items()}
        if "no_carry" in correct:  # paired: the same questions, with and without carrying
            for name in names:
                if name != "no_carry":
                    t = paired_test(correct[name], correct["no_carry"], kind="binary")
                    print(
                        f"L{layer} {name} vs no_carry: {t['a_only']} right only with {name}, "
                        f"{t['b_only']} only without carrying; exact McNemar p = "
                        f"{t['p_value']:.3g}"
                    )
    settings = {k: getattr(args, k) for k in ("model", "train_length", "val_length", "num_train")}
    settings |= {"num_val": args.num_val, "segment_length": args.segment_length, "layers": layers}
    print(json.dumps({"benchmark": "latent_study", **settings, "val_accuracy": summary}))


if __name__ == "__main__":
    main()
