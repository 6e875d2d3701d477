"""The HotpotQA supporting-fact head inside training runs and experiments.

:mod:`memllm.data.supporting_facts` has the head itself (span pooling + MLP), the labels and the
selection of predicted facts. This module connects it to models:

* :func:`capture_final_hidden` — the final hidden state of every position, per forward call
  (a hook on the backbone's final norm, so it works for one plain forward, for the segments of
  :func:`memllm.core.segments.forward_segments` and for the feature cache alike; concatenated over
  the segments it covers the whole input);
* :func:`visible_sentences` / :func:`attach_sentence_spans` — token spans of the sentences a
  model sees *whole* in the kept tail of a prompt (a sentence cut by the window gets no score);
* :func:`save_sp_head` / :func:`load_sp_head` — ``sp_head.safetensors`` next to the memory
  weights, loaded strictly;
* :class:`SupportingFactPlugin` — the head as a trainer plug-in
  (:class:`memllm.training.plugins.TrainerPlugin`): ``train.supporting_facts_weight`` > 0 trains
  it jointly with the memory, on the final hidden states of every segment;
* :func:`sentence_features`, :func:`fit_probe`, :func:`predict_supporting_facts` — what an
  experiment does for each arm: pooled sentence features of a (trained or frozen) model, a head
  trained on frozen features for arms that have none (a probe), and the predicted facts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memllm.core.backbone import final_norm
from memllm.data.supporting_facts import (
    Span,
    SupportingFactHead,
    select_supporting_facts,
    sentence_labels,
    sentence_token_spans,
    shift_spans,
)
from memllm.errors import CheckpointError, DataError

SP_HEAD_FILE = "sp_head.safetensors"
POOLING = "mean"

# Every HotpotQA question has supporting facts in two paragraphs, so at least two sentences are
# predicted; beyond those, every sentence the head gives a probability of at least one half.
SELECT_THRESHOLD = 0.5
SELECT_MIN_K = 2

# The probe of arms without a jointly trained head: same head, trained on cached frozen features
# (cheap, so a few full passes; sentences shuffled in mini-batches).
PROBE_EPOCHS = 5
PROBE_LR = 1e-3
PROBE_WEIGHT_DECAY = 0.01
PROBE_BATCH = 64


# -- hidden states ---------------------------------------------------------------------------


@contextlib.contextmanager
def capture_final_hidden(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the final hidden states ``(batch, tokens, hidden)`` of each forward call.

    The norm runs on every position even when the LM head is asked for the last logits only
    (``logits_to_keep``), so the concatenation over a segment-by-segment pass is the whole
    input. Outputs keep their autograd graph (the SP loss trains the memory through them).
    """
    seen: list[Tensor] = []

    def hook(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = final_norm(model).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


# -- sentence spans --------------------------------------------------------------------------


def _prompt_text(tokenizer, example, chat: bool) -> tuple[str, int]:
    """The text the model reads for ``example`` and where the task's prompt starts in it."""
    from memllm.data.prompting import format_example

    text = format_example(tokenizer, example.prompt, example.target, chat)[0]
    offset = text.find(example.prompt) if chat else 0
    if offset < 0:  # a chat template that rewrites the user turn: the markers cannot be found
        raise DataError(
            f"{example.id}: the chat template changes the prompt text, so its sentences cannot "
            "be located (model.chat_template)"
        )
    return text, offset


def visible_sentences(
    tokenizer, example, *, chat: bool = False, kept_tokens: int | None = None
) -> tuple[list[int], list[Span]]:
    """Sentences of ``example`` that lie whole in the last ``kept_tokens`` prompt tokens.

    Returns their indices in ``example.meta["sentences"]`` and their token spans counted from
    the first kept token (all tokens when ``kept_tokens`` is None). Tokenisation is the one of
    training and generation (``add_special_tokens=False``).
    """
    sentences = example.meta.get("sentences")
    if sentences is None:
        raise DataError(f"{example.id}: no sentence markers (supporting facts are HotpotQA's)")
    text, offset = _prompt_text(tokenizer, example, chat)
    total = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    chars = [(s[2] + offset, s[3] + offset) for s in sentences]
    spans = sentence_token_spans(tokenizer, text, chars, add_special_tokens=False)
    cut = 0 if kept_tokens is None else max(0, total - kept_tokens)
    kept = [(i, (s - cut, e - cut)) for i, (s, e) in enumerate(spans) if s >= cut]
    return [i for i, _ in kept], [span for _, span in kept]


def attach_sentence_spans(items, examples, tokenizer, *, chat: bool = False) -> None:
    """Give each training item the spans and 0/1 labels of the sentences its prompt keeps."""
    for item, example in zip(items, examples, strict=True):
        indices, spans = visible_sentences(
            tokenizer, example, chat=chat, kept_tokens=item.prompt_len
        )
        labels = sentence_labels(example.meta)
        item.extras["sp_spans"] = spans
        item.extras["sp_labels"] = [labels[i] for i in indices]


# -- the head and its file -------------------------------------------------------------------


def build_head(hidden_size: int, seed: int = 0) -> SupportingFactHead:
    """A fresh head; its initial weights depend on ``seed`` only (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SupportingFactHead(hidden_size, pooling=POOLING)


def _head_meta(head: SupportingFactHead) -> dict[str, str]:
    first, last = head.mlp[0], head.mlp[-1]
    return {
        "hidden_size": str(first.in_features // (2 if head.pooling == "mean_last" else 1)),
        "pooling": head.pooling,
        "inner": str(first.out_features),
        "outputs": str(last.out_features),
    }


def save_sp_head(head: SupportingFactHead, directory: str | Path) -> Path:
    """Write ``sp_head.safetensors`` (weights, and the sizes that rebuild the head)."""
    from safetensors.torch import save_file

    path = Path(directory) / SP_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, path, metadata=_head_meta(head))
    return path


def load_sp_head(
    directory: str | Path, hidden_size: int | None = None, into: SupportingFactHead | None = None
) -> SupportingFactHead:
    """Load the head saved in ``directory`` strictly (into ``into`` when given).

    Raises:
        CheckpointError: no file, another hidden size, or tensors that do not match the head.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(directory) / SP_HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: {SP_HEAD_FILE} is missing (no supporting-fact head)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        size, inner = int(meta["hidden_size"]), int(meta["inner"])
        pooling = meta["pooling"]
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: metadata lacks the head's sizes") from None
    if hidden_size is not None and size != hidden_size:
        raise CheckpointError(
            f"{path}: head built for hidden size {size}, this model has {hidden_size}"
        )
    head = into if into is not None else SupportingFactHead(size, pooling=pooling, inner=inner)
    weights = load_file(path)
    expected = head.state_dict()
    if set(weights) != set(expected):
        what = sorted(set(weights) ^ set(expected))[0]
        raise CheckpointError(f"{path}: does not match the supporting-fact head ({what})")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, "
                f"the head expects {tuple(expected[key].shape)}"
            )
    head.load_state_dict(weights, strict=True)
    return head


# -- the trainer plug-in ---------------------------------------------------------------------


class SupportingFactPlugin:
    """The supporting-fact head trained with the memory (``train.supporting_facts_weight``).

    The head reads the final hidden states of every segment (sentences sit in early ones),
    concatenated back into the whole left-padded input, and scores the sentences each item's
    kept prompt holds whole.
    """

    name = "sp"
    reads_all_positions = True

    def __init__(
        self, model: nn.Module, tokenizer, *, weight: float, seed: int, chat: bool, device
    ) -> None:
        from memllm.core.backbone import hidden_size

        final_norm(model)  # fail before training if the hidden states cannot be read
        self.head = build_head(hidden_size(model), seed).to(device)
        self.weight, self.tokenizer, self.chat = weight, tokenizer, chat

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def prepare(self, items, examples) -> None:
        attach_sentence_spans(items, examples, self.tokenizer, chat=self.chat)

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[list[Tensor]]:
        return capture_final_hidden(model)

    def loss(self, batch, observed: list[Tensor]) -> Tensor:
        from memllm.data.supporting_facts import pad_labels

        hidden = torch.cat(observed, dim=1)
        width = batch.input_ids.shape[1]
        spans = [
            shift_spans(it.extras.get("sp_spans", []), width - len(it.ids)) for it in batch.items
        ]
        labels = pad_labels(
            [it.extras.get("sp_labels", []) for it in batch.items], device=hidden.device
        )
        return self.head.loss(self.head(hidden, spans).float(), labels)

    def save(self, directory: Path) -> None:
        save_sp_head(self.head, directory)

    def load(self, directory: Path) -> None:
        load_sp_head(directory, into=self.head)  # strict: this run trains the head


# -- experiments: features, probes, predictions ----------------------------------------------


@torch.no_grad()
def sentence_features(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Any],
    *,
    segment_length: int,
    head: SupportingFactHead,
    chat: bool = False,
    batch_size: int = 8,
) -> list[tuple[list[int], Tensor]]:
    """Pooled final hidden states of each sentence a model sees whole, per example (on CPU).

    A model with memory reads the whole prompt segment by segment (as it answers); a model
    without sees only the last ``segment_length`` tokens (as it answers), so sentences before
    them get no feature at all.
    """
    from memllm.core.inject import has_memory
    from memllm.core.segments import (
        forward_segments,
        left_pad,
        logits_to_keep_kwargs,
        positions_from_mask,
    )
    from memllm.data.prompting import format_example

    has_memory = has_memory(model)
    kept = None if has_memory else segment_length
    device = next(model.parameters()).device
    rows = []
    for ex in examples:
        text = format_example(tokenizer, ex.prompt, ex.target, chat)[0]
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids if kept is None else ids[-kept:]
        indices, spans = visible_sentences(tokenizer, ex, chat=chat, kept_tokens=kept)
        rows.append((ids, indices, spans))
    result: list[tuple[list[int], Tensor] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([rows[i][0] for i in chunk], pad)
        width = ids.shape[1]
        spans = [shift_spans(rows[i][2], width - len(rows[i][0])) for i in chunk]
        ids, mask = ids.to(device), mask.to(device)
        with capture_final_hidden(model) as seen:
            if has_memory:
                forward_segments(model, ids, mask, segment_length=segment_length, keep_logits=False)
            else:
                extra = logits_to_keep_kwargs(model, 1)
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions_from_mask(mask),
                    use_cache=False,
                    **extra,
                )
        hidden = torch.cat(seen, dim=1)
        pooled = head.pool(hidden, spans).float().cpu()
        for r, i in enumerate(chunk):
            result[i] = (rows[i][1], pooled[r, : len(rows[i][1])])
    return result  # type: ignore[return-value]


def fit_probe(
    features: Sequence[tuple[list[int], Tensor]],
    examples: Sequence[Any],
    hidden_size: int,
    *,
    seed: int = 0,
    epochs: int = PROBE_EPOCHS,
    lr: float = PROBE_LR,
) -> SupportingFactHead:
    """A head trained on fixed pooled sentence features (the frozen model's) of ``examples``."""
    head = build_head(hidden_size, seed)
    xs, ys = [], []
    for (indices, feats), ex in zip(features, examples, strict=True):
        labels = sentence_labels(ex.meta)
        xs.append(feats)
        ys += [float(labels[i]) for i in indices]
    if not ys:
        return head.eval()
    x, y = torch.cat(xs).float(), torch.tensor(ys)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=PROBE_WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(PROBE_BATCH):
            loss = head.loss(head.score_features(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def predict_supporting_facts(
    head: SupportingFactHead,
    features: Sequence[tuple[list[int], Tensor]],
    examples: Sequence[Any],
) -> list[list[list[Any]]]:
    """``[[title, sent_id], ...]`` per example; sentences without a feature are never chosen."""
    head = head.eval()
    device = next(head.parameters()).device
    out = []
    for (indices, feats), ex in zip(features, examples, strict=True):
        sentences = ex.meta["sentences"]
        scores = torch.full((len(sentences),), float("-inf"))
        if indices:
            scores[indices] = head.score_features(feats.to(device)).float().cpu()
        out.append(
            select_supporting_facts(
                scores, sentences, threshold=SELECT_THRESHOLD, min_k=SELECT_MIN_K
            )
        )
    return out
