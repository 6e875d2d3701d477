"""Why does (or doesn't) the quickstart's latent memory learn to retrieve? Cached-feature study.

The backbone is frozen and the memory sits *above* a decoder layer L, so the output of layer L
for every segment never depends on the memory: it is recorded once per input (the expensive
part, ~200-800 tokens/s on a 2-core CPU) and every memory variant then trains on it in seconds.
Only the layers above L run per step, and only on the last segment (the one with the answer):
earlier segments just write, and a write reads layer L's output, so nothing above L matters there.

Variants differ in placement (L), slots, width, learning rate, steps, data size and loss; two
controls tell retrieval from format learning:

* ``window`` — the untrained memory (the identity): the bare backbone on the last segment;
* ``no_carry`` — the same memory trained with its state reset before the last segment, so it can
  learn the answer format and the answers' prior but nothing from earlier segments.

A memory that retrieves must beat ``no_carry``. The metric is teacher-forced answer accuracy on
the validation split (every answer token is the argmax; EOS excluded): BabiLong qa1/qa2 answers
are one location word, so it is the official "label in the output" score of a greedy answer
whose first tokens are the label. Test data is never touched.

    python benchmarks/latent_study.py --layers 29 --variants window,no_carry,base
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from memllm.core.backbone import decoder_stack, load_backbone
from memllm.core.segments import left_pad, positions_from_mask, segment_bounds
from memllm.data import build_task
from memllm.data.babilong import supporting_facts_in_window
from memllm.evaluation.stats import paired_test, wilson_interval
from memllm.memory import LatentMemoryConfig, build_memory_module
from memllm.training.trainer import encode_split

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
    return encode_split(task, tokenizer, split, None, chat=True)


def facts_in_window(examples, items, tokenizer, segment_length: int) -> list[bool]:
    """Per input: whether every supporting fact starts inside the last segment (the window).

    Those questions can be answered without a memory; the others need what earlier segments
    held. The last segment of a teacher-forced item ends with the answer and EOS, so the window
    over the prompt alone is shorter by their tokens.
    """
    from memllm.data.prompting import chat_wrap

    flags = []
    for ex, it in zip(examples, items, strict=True):
        text = chat_wrap(tokenizer, ex.prompt)
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


@torch.inference_mode()
def record(model, items, layers: list[int], segment_length: int, batch: int = 4):
    """Per item, per layer: the layer's output for the item's real tokens (float32, CPU)."""
    _, stack = decoder_stack(model)
    seen: dict[int, list[Tensor]] = {i: [] for i in layers}
    hooks = [
        stack[i].register_forward_hook(
            lambda _m, _a, out, i=i: seen[i].append(out[0] if isinstance(out, tuple) else out)
        )
        for i in layers
    ]
    out: list[dict[int, Tensor]] = []
    start = time.time()
    try:
        for b in range(0, len(items), batch):
            chunk = items[b : b + batch]
            ids, mask = left_pad([it.ids for it in chunk], 0)
            for v in seen.values():
                v.clear()
            for s, e in segment_bounds(ids.shape[1], segment_length):
                m = mask[:, s:e]
                model.model(
                    input_ids=ids[:, s:e], attention_mask=m, position_ids=positions_from_mask(m)
                )
            for row in range(len(chunk)):
                keep = mask[row].bool()
                out.append({i: torch.cat(seen[i], dim=1)[row, keep].clone() for i in layers})
            done = b + len(chunk)
            rate = sum(len(it.ids) for it in items[:done]) / (time.time() - start)
            print(f"  recorded {done}/{len(items)} ({rate:.0f} tokens/s)", flush=True)
    finally:
        for h in hooks:
            h.remove()
    return out


class Upper(nn.Module):
    """Layers L+1.. of the backbone, the final norm and the LM head, for the last segment."""

    def __init__(self, model, layer: int):
        super().__init__()
        owner, stack = decoder_stack(model)
        self.layers = list(stack)[layer + 1 :]
        self.rotary = owner.rotary_emb
        self.norm = owner.norm
        self.head = model.get_output_embeddings()

    def forward(self, hidden: Tensor, keep: int) -> Tensor:
        # the last segment is full (inputs are longer than a segment, segments end-aligned): no
        # padding, so the layers' own causal attention (mask None) is the right mask
        if self.layers:
            pos = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
            emb = self.rotary(hidden, pos)
            for layer in self.layers:
                out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
                hidden = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(hidden[:, -keep:]))


def run_batch(memory, upper, feats, items, layer, segment_length, carry):
    """Task loss, aux loss and per-item answer correctness for one batch of cached items."""
    width = max(len(it.ids) for it in items)
    hidden = torch.zeros(len(items), width, feats[0][layer].shape[-1])
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    labels = torch.full((len(items), width), -100)
    for row, (f, it) in enumerate(zip(feats, items, strict=True)):
        hidden[row, width - len(it.ids) :] = f[layer]
        mask[row, width - len(it.ids) :] = True
        labels[row, width - len(it.ids) :] = torch.tensor(it.labels)
    bounds = segment_bounds(width, segment_length)
    state = memory.init_state(len(items), hidden.device, hidden.dtype)
    aux_losses = []
    for k, (s, e) in enumerate(bounds):
        last = k == len(bounds) - 1
        if last and not carry:
            state = memory.init_state(len(items), hidden.device, hidden.dtype)
        h = hidden[:, s:e]
        out, state, aux = memory(lambda x: x, h, state, mask=mask[:, s:e], write=not last)
        aux_losses.append(aux["loss"])
    targets = labels[:, s + 1 : e]  # position t predicts t+1 (answers sit inside the last segment)
    keep = int(e - s - 1 - (targets != -100).any(0).nonzero()[0]) if (targets != -100).any() else 1
    logits = upper(out[:, :-1], keep)
    targets = targets[:, -keep:]
    loss = nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    pred = logits.argmax(-1)
    answer = (targets != -100) & (targets != items[0].ids[-1])  # EOS excluded
    correct = ((pred == targets) | ~answer).all(-1)
    return loss, sum(aux_losses) / len(aux_losses), correct


def train_variant(name, spec, model, data, in_window, layer, segment_length, defaults, seed=0):
    """Train one variant (``spec`` over ``defaults``) and print its row; per-question correct."""
    cfg = {**defaults, **spec, "memory": {**defaults["memory"], **spec.get("memory", {})}}
    torch.manual_seed(seed)
    mconf = LatentMemoryConfig(layer_ids=[layer], **cfg["memory"])
    memory = build_memory_module(mconf, model.config.hidden_size)
    upper = Upper(model, layer)
    train_items, train_feats, val_items, val_feats = data
    n = len(train_items)
    steps = (
        cfg["steps"] if cfg["steps"] is not None else cfg["epochs"] * math.ceil(n / cfg["batch"])
    )
    opt = torch.optim.AdamW(memory.parameters(), lr=cfg["lr"], weight_decay=0.01)
    warm = 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
        ),
    )
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    start = time.time()
    losses = []
    for _ in range(steps):
        if len(order) < cfg["batch"]:
            order += torch.randperm(n, generator=g).tolist()
        idx, order = order[: cfg["batch"]], order[cfg["batch"] :]
        loss, aux, _ = run_batch(
            memory,
            upper,
            [train_feats[i] for i in idx],
            [train_items[i] for i in idx],
            layer,
            segment_length,
            cfg["carry"],
        )
        (loss + aux).backward()
        nn.utils.clip_grad_norm_(memory.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    train_time = time.time() - start
    with torch.no_grad():
        correct, vloss = [], []
        for b in range(0, len(val_items), 16):
            loss, _, c = run_batch(
                memory,
                upper,
                val_feats[b : b + 16],
                val_items[b : b + 16],
                layer,
                segment_length,
                cfg["carry"],
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    args = p.parse_args()
    defaults = {**DEFAULTS, "epochs": args.epochs or DEFAULTS["epochs"]}
    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = load_backbone("smollm2-135m")
    layers = [int(x) % model.config.num_hidden_layers for x in args.layers.split(",")]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
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
    data = []
    for split, length in lengths.items():
        items = built[split][0]
        # the key names both sizes: they decide which stories each split holds
        path = cache / f"{split}_{length}_{args.num_train}_{args.num_val}_{args.segment_length}.pt"
        stored = torch.load(path) if path.exists() else None
        if stored is None or not all(i in stored[0] for i in layers):
            print(
                f"recording {split} {length}: {len(items)} inputs, "
                f"{sum(len(i.ids) for i in items)} tokens, layers {layers}"
            )
            stored = record(model, items, layers, args.segment_length)
            torch.save(stored, path)
        data += [items, stored]
    print(
        f"train {len(data[0])} inputs ({args.train_length}), "
        f"validation {len(data[2])} ({args.val_length})"
    )
    in_window = facts_in_window(examples["validation"], data[2], tokenizer, args.segment_length)
    print(
        f"validation: {sum(in_window)} of {len(in_window)} questions have every supporting fact "
        f"in the last {args.segment_length}-token segment"
    )
    print(
        "| variant | layer | steps | train loss (first → last 10) | val loss "
        "| val acc % [95% CI] | gate | time | right, facts in window | right, facts earlier |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    names = args.variants.split(",")
    for layer in layers:
        correct = {
            name: train_variant(
                name, VARIANTS[name], model, data, in_window, layer, args.segment_length, defaults
            )
            for name in names
        }
        if "no_carry" in correct:  # paired: the same questions, with and without carrying
            for name in names:
                if name != "no_carry":
                    t = paired_test(correct[name], correct["no_carry"], kind="binary")
                    print(
                        f"L{layer} {name} vs no_carry: {t['a_only']} right only with {name}, "
                        f"{t['b_only']} only without carrying; exact McNemar p = "
                        f"{t['p_value']:.3g}"
                    )


if __name__ == "__main__":
    main()
