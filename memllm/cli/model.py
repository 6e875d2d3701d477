"""Core commands: ``memllm info`` and ``memllm generate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memllm.cli.args import DTYPES, check_new_tokens, device, positive_int
from memllm.core.backbone import DEFAULT_MODEL
from memllm.errors import ConfigError, MemllmError


def memory_config_from_file(path: str | Path):
    """A memory config from YAML: a bare memory mapping, or a run config's ``memory:`` section."""
    from memllm.core.config import load_yaml
    from memllm.memory import memory_config_from_dict

    data = load_yaml(path)
    section = data.get("memory", data) if isinstance(data.get("memory"), dict) else data
    prefix = "memory." if section is not data else ""
    try:
        return memory_config_from_dict(section, prefix=prefix)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="alias, local folder, .gguf file or hub id (default: the backbone --checkpoint was "
        f"trained on, else {DEFAULT_MODEL}, bundled)",
    )
    parser.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)"
    )
    parser.add_argument(
        "--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)"
    )


def load_model_with_memory(args):
    """The backbone named by ``args``, with what --checkpoint holds (memory, memory + LoRA, or
    LoRA only) or an untrained --memory attached."""
    import memllm
    from memllm.core.checkpoint import verify_checkpoint

    if getattr(args, "checkpoint", None):
        # the checkpoint's files and backbone facts first: a bad or mismatched checkpoint is
        # refused before a backbone is loaded (converting the bundled one takes a minute)
        info = verify_checkpoint(args.checkpoint)
        if args.model is None:
            args.model = (info.backbone or {}).get("name") or DEFAULT_MODEL
    args.model = args.model or DEFAULT_MODEL
    model, tokenizer = memllm.load_backbone(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device
    )
    if getattr(args, "checkpoint", None):
        memllm.load_checkpoint(model, args.checkpoint)
    elif getattr(args, "memory", None):
        memllm.inject_memory(model, memory_config_from_file(args.memory))
    return model, tokenizer


def cmd_info(args) -> int:
    import memllm
    from memllm.core.backbone import context_length, decoder_stack, hidden_size, text_config
    from memllm.core.inject import memory_layers
    from memllm.core.lora import has_lora, lora_parameters, lora_settings

    model, _ = load_model_with_memory(args)
    _, layers = decoder_stack(model)
    cfg = text_config(model)
    added = sum(p.numel() for p in memllm.memory_parameters(model))  # 0 without memory
    adapter = sum(p.numel() for p in lora_parameters(model)) if has_lora(model) else 0
    backbone_params = sum(p.numel() for p in model.parameters()) - added - adapter
    rows = [
        ("model", args.model),
        ("architecture", f"{type(model).__name__} (model_type={cfg.model_type})"),
        ("decoder layers", str(len(layers))),
        ("hidden size", str(hidden_size(model))),
        ("context length", str(context_length(model))),
        ("backbone parameters", f"{backbone_params:,}"),
    ]
    placed = memory_layers(model)
    if placed:
        config = memllm.memory_config(model)
        rows += [
            ("memory", f"{config.type} at decoder layers {sorted(placed)}"),
            ("memory parameters", f"{added:,} ({100 * added / backbone_params:.2f}% of backbone)"),
        ]
        first = next(iter(placed.values())).memory
        if hasattr(first, "bytes_per_token"):  # a memory that stores tokens (episodic, kv)
            dtype = next(model.parameters()).dtype
            per = sum(layer.memory.bytes_per_token(dtype) for layer in placed.values())
            cap = getattr(config, "max_tokens", None)  # kv_retrieval: unbounded by default
            bound = (
                f"{cap:,} tokens per example = {per * cap / 2**20:.1f} MiB"
                if cap
                else f"{2**20 / max(per, 1):,.0f} tokens per MiB"
            )
            rows.append(
                (
                    "memory per stored token",
                    f"{per:,} bytes over {len(placed)} layer(s), stored in "
                    f"{str(first.store_dtype(dtype)).removeprefix('torch.')}; {bound}",
                )
            )
    if has_lora(model):
        settings = lora_settings(model)
        targets = ", ".join(settings.target_modules)
        rows.append(("LoRA adapter", f"rank {settings.rank} on {targets}: {adapter:,} parameters"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_generate(args) -> int:
    import memllm

    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise MemllmError(f"{path}: prompt file not found")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise MemllmError(f"{path}: not UTF-8 text (offset {err.start})") from None
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MemllmError("the prompt is empty: give --prompt, --prompt-file or standard input")
    model, tokenizer = load_model_with_memory(args)
    from memllm.core.backbone import context_length

    window = context_length(model)
    check_new_tokens(args.max_new_tokens, window, args.model)
    segment_length = args.segment_length or min(512, window or 512)
    if window is not None and segment_length > window:
        raise ConfigError(
            f"--segment-length {segment_length} exceeds {args.model}'s context of {window} tokens"
        )
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MemllmError(f"--chat: {args.model} has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    text = memllm.generate(
        model,
        tokenizer,
        prompt,
        segment_length=segment_length,
        max_new_tokens=args.max_new_tokens,
    )
    print(text)
    return 0


def register(sub) -> None:
    info = sub.add_parser("info", help="describe a model and, optionally, where memory would go")
    add_model_args(info)
    info.add_argument("--memory", help="memory config YAML (a memory mapping or a run config)")
    info.add_argument(
        "--checkpoint", help="a checkpoint folder (memory, memory + LoRA, or a LoRA adapter)"
    )
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser(
        "generate",
        help="generate with memory; prompts longer than a segment are read through the memory",
    )
    add_model_args(gen)
    gen.add_argument("--memory", help="memory config YAML (an untrained memory is the identity)")
    gen.add_argument(
        "--checkpoint", help="a checkpoint folder (memory, memory + LoRA, or a LoRA adapter)"
    )
    gen.add_argument("--prompt", help="the prompt text (default: read standard input)")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument(
        "--segment-length",
        type=positive_int,
        default=None,
        help="tokens per segment (default 512, or the model's context when shorter)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=64,
        help="tokens to generate (default 64); refused unless below the model's context",
    )
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)
