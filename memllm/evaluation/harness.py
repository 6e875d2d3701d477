"""A memllm model for EleutherAI's lm-evaluation-harness: ``--model memllm``.

Every request's input is read the way memllm reads long inputs: split into segments aligned to
its end (:func:`memllm.segment_bounds`), the earlier segments written into the memory, the last
one (with the scored or generated tokens) read by the backbone. An input no longer than a
segment is one plain forward call, so with an untrained memory (the identity) the scores equal
the bare model's. A model without memory sees only the last segment (the same-window baseline).

Importing this module registers the class with the harness (it needs ``pip install
'memllm[harness]'``)::

    import memllm.evaluation.harness  # noqa: F401 (registers "memllm")
    import lm_eval
    lm_eval.simple_evaluate(
        model="memllm",
        model_args="pretrained=smollm2-135m,memory=runs/mem/final,segment_length=512",
        tasks=["hellaswag"],
    )

or from a shell, through the harness's own command line with the registration imported first:
``python -m memllm.evaluation.harness --model memllm --model_args ... --tasks ...`` (the same
arguments as ``lm_eval``), or ``memllm eval-harness`` (:mod:`memllm.cli.harness`).

Model arguments: ``pretrained`` (a backbone name, folder or ``.gguf`` for
:func:`memllm.load_backbone`, or a loaded model), ``memory`` (a checkpoint folder, or a memory
config YAML for an untrained memory; none: the bare backbone), ``segment_length`` (default: the
backbone's context), ``batch_size``, ``device``, ``dtype``, ``max_gen_toks`` (default 256),
``add_bos_token``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 (the harness's own models stay registered beside ours)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from memllm.core.backbone import context_length
from memllm.core.generation import generate_ids
from memllm.core.inject import has_memory, memory_session
from memllm.core.model import MemoryModel
from memllm.core.segments import left_pad, model_logits, segment_bounds
from memllm.errors import ConfigError

log = logging.getLogger(__name__)


def _flag(value: Any, name: str) -> bool | None:
    """A model argument that is a boolean; the harness's argument strings may say "True"."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {name}: expected true/false, got {value!r}")


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool):
        raise ConfigError(f"model_args {name}: expected an integer >= 1, got {value!r}")
    return number


def load_memory_model(
    pretrained: Any, memory: str | None = None, *, dtype: str = "float32", device=None
) -> MemoryModel:
    """The backbone with the memory that ``memory`` names: a checkpoint folder (loaded by the
    one strict loader), a memory config YAML (an untrained memory), or None (no memory)."""
    load_kwargs = {} if isinstance(pretrained, nn.Module) else {"dtype": dtype, "device": device}
    if memory is None or memory == "":
        if isinstance(pretrained, MemoryModel):
            return pretrained
        if isinstance(pretrained, nn.Module):
            return MemoryModel(pretrained, getattr(pretrained, "tokenizer", None))
        from memllm.core.backbone import load_backbone

        return MemoryModel(*load_backbone(str(pretrained), **load_kwargs))
    path = Path(memory).expanduser()
    if path.is_dir():
        return MemoryModel.from_pretrained(pretrained, path, **load_kwargs)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from memllm.core.config import load_yaml
        from memllm.memory import memory_config_from_dict

        data = load_yaml(path)
        section = data["memory"] if isinstance(data.get("memory"), dict) else data
        prefix = "memory." if section is not data else ""
        try:
            config = memory_config_from_dict(section, prefix=prefix)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return MemoryModel.from_config(pretrained, config, **load_kwargs)
    raise ConfigError(
        f"model_args memory: {memory!r} is neither a checkpoint folder nor a memory config YAML"
    )


class _StopStrings(StoppingCriteria):
    """Stops each row once its generated text (after ``prompt_length`` tokens) holds a stop
    string. Decoding the text rather than matching token ids finds a stop string however the
    tokenizer splits it."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        new = input_ids[:, self.prompt_length :].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        done = [any(s in text for s in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at >= 0:
                cut = min(cut, at)
    return text[:cut]


@register_model("memllm")
class MemllmLM(TemplateLM):
    """lm-evaluation-harness model: a backbone with a memllm memory, read segment by segment.

    Args:
        pretrained: a backbone name, folder or ``.gguf`` (:func:`memllm.load_backbone`), or a
            loaded model / :class:`memllm.MemoryModel`.
        memory: a checkpoint folder, a memory config YAML (untrained memory), or None.
        segment_length: tokens per segment (default: the backbone's context window).
        batch_size: requests per forward call.
        device, dtype: where and how to load the backbone (ignored for a loaded model).
        max_gen_toks: tokens to generate when a task does not say (the harness's default 256).
        add_bos_token: passed as ``add_special_tokens`` when encoding (None: the tokenizer's
            default, as the harness's ``hf`` model does).
        tokenizer: the tokenizer of a loaded model.
    """

    def __init__(
        self,
        pretrained: Any = "smollm2-135m",
        memory: str | None = None,
        segment_length: int | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str = "float32",
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        tokenizer=None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            # the harness passes its own settings (e.g. max_batch_size) to every model class
            log.info("memllm harness model ignores %s", ", ".join(sorted(unused)))
        self.lm = load_memory_model(pretrained, memory, dtype=dtype, device=device)
        if tokenizer is not None:
            self.lm.tokenizer = tokenizer
        if self.lm.tokenizer is None:
            raise ConfigError("model_args: a loaded model needs its tokenizer (tokenizer=...)")
        self.tokenizer = self.lm.tokenizer
        self.model = self.lm.model.eval()
        self.window = context_length(self.model)
        self.segment_length = _positive(segment_length, "segment_length") or self.window or 2048
        if self.window is not None and self.segment_length > self.window:
            raise ConfigError(
                f"model_args segment_length: {self.segment_length} exceeds the backbone's "
                f"context of {self.window} tokens"
            )
        # "auto" (the harness's batch-size search) has no meaning here: a fixed default
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_gen_toks = _positive(max_gen_toks, "max_gen_toks")
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self._device = next(self.model.parameters()).device
        self.memory_path = memory

    # -- what the harness asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context is replaced by (as the harness's hf model: BOS, else EOS)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Inputs of any length are read through the memory; this is one segment."""
        return self.segment_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "memllm")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        extra = {} if flag is None else {"add_special_tokens": flag}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            extra = {"add_special_tokens": False}  # the prompt brings its own BOS
        return self.tokenizer.encode(string, **extra)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    def get_model_info(self) -> dict[str, Any]:
        config = self.lm.memory_config
        return {
            "backbone": getattr(self.model, "name_or_path", ""),
            "memory": str(self.memory_path) if self.memory_path else None,
            "memory_type": config.type if config is not None else None,
            "segment_length": self.segment_length,
        }

    # -- scoring ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = [list(ctx) + list(cont) for _, ctx, cont in requests]
        scored = [len(cont) for _, _, cont in requests]
        results = self.score_tokens(rows, scored, disable_tqdm=disable_tqdm)
        for (pair, _, _), answer in zip(requests, results, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text scored, every token once, conditioned on the prefix token and on
        everything before it (earlier segments through the memory)."""
        rows, scored = [], []
        for (text,) in [req.args for req in requests]:
            tokens = self.tok_encode(text)
            rows.append([self.prefix_token_id, *tokens])
            scored.append(len(tokens))
        results = [lp for lp, _ in self.score_tokens(rows, scored, disable_tqdm=disable_tqdm)]
        for req, total in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return results

    @torch.no_grad()
    def score_tokens(
        self, rows: list[list[int]], scored: list[int], *, disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """For each token row, the summed log-probability of its last ``scored`` tokens given
        all before them, and whether greedy decoding would produce exactly those tokens.

        Rows are batched longest first (less padding) and left-padded, so that their segments
        are those each would get alone.
        """
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="memllm loglikelihood")
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            for i, answer in zip(batch, self._score_batch(rows, scored, batch), strict=True):
                results[i] = answer
            bar.update(len(batch))
        bar.close()
        return results

    def _score_batch(
        self, rows: list[list[int]], scored: list[int], batch: list[int]
    ) -> list[tuple[float, bool]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i in batch:
            if not 0 < scored[i] < len(rows[i]):
                raise ValueError(f"request {i}: nothing to score or no context to score it after")
        ids, mask = left_pad([rows[i][:-1] for i in batch], pad)
        width = ids.shape[1]
        targets = torch.full_like(ids, -100)  # targets[t]: the token predicted at position t
        for r, i in enumerate(batch):
            targets[r, width - scored[i] :] = torch.tensor(rows[i][-scored[i] :])
        ids, mask, targets = (t.to(self._device) for t in (ids, mask, targets))
        first_scored = width - max(scored[i] for i in batch)
        total = torch.zeros(len(batch), dtype=torch.float64, device=self._device)
        greedy = torch.ones(len(batch), dtype=torch.bool, device=self._device)
        bounds = segment_bounds(width, self.segment_length)
        with memory_session(self.model) if has_memory(self.model) else contextlib.nullcontext():
            for start, end in bounds:
                begin = max(start, first_scored)
                if begin >= end and not has_memory(self.model):
                    continue  # a bare model forgets this segment anyway
                keep = end - begin if begin < end else None
                logits = model_logits(self.model, ids[:, start:end], mask[:, start:end], keep)
                if keep is None:
                    continue  # the segment only writes the memory
                logprobs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
                tgt = targets[:, begin:end]
                valid = tgt != -100
                picked = logprobs.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                total += (picked * valid).sum(-1).double()
                greedy &= ((logprobs.argmax(-1) == tgt) | ~valid).all(-1)
        return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist(), strict=True)]

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless a task asks to sample) continuations, cut at the task's ``until``
        strings; the prompt's earlier segments go through the memory."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="memllm generate_until")
        for indices in groups.values():
            settings = dict(args[indices[0]][1] or {})
            encoded = {i: self.tok_encode(args[i][0]) for i in indices}
            indices = sorted(indices, key=lambda i: -len(encoded[i]))
            for b in range(0, len(indices), self.batch_size):
                batch = indices[b : b + self.batch_size]
                texts = self._generate_batch([encoded[i] for i in batch], settings)
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate_batch(self, rows: list[list[int]], settings: dict[str, Any]) -> list[str]:
        settings = dict(settings)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        stops = [*until, eos] if eos and eos not in until else until
        new_tokens = settings.pop("max_gen_toks", None) or settings.pop("max_new_tokens", None)
        new_tokens = int(new_tokens or self.max_gen_toks)
        settings.pop("max_length", None)  # the harness's own budget: max_gen_toks governs
        if not settings.get("do_sample"):
            settings["do_sample"] = False
            settings.pop("temperature", None)
            settings.pop("top_p", None)
            settings.pop("top_k", None)
        segment = self.segment_length
        if self.window is not None:
            if new_tokens >= self.window:
                raise ConfigError(
                    f"max_gen_toks {new_tokens} is not below the backbone's context of "
                    f"{self.window} tokens"
                )
            # the last segment and the new tokens share the backbone's window
            segment = min(segment, self.window - new_tokens)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eot_token_id
        ids, mask = left_pad(rows, pad)
        prompt_length = min(ids.shape[1], segment)  # the last segment, what generate sees
        stopping = StoppingCriteriaList([_StopStrings(self.tokenizer, stops, prompt_length)])
        new = generate_ids(
            self.model,
            ids.to(self._device),
            mask.to(self._device),
            segment_length=segment,
            max_new_tokens=new_tokens,
            stopping_criteria=stopping,
            pad_token_id=pad,
            **settings,
        )
        texts = self.tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
        return [cut_at_stops(text, stops) for text in texts]


def main() -> None:
    """``python -m memllm.evaluation.harness ...``: lm-eval's own command line with the
    ``memllm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
