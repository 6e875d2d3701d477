"""Tiny random causal LMs built from config classes, with a byte-level tokenizer built in memory.

For tests, debug configs and benchmarks: nothing is downloaded. ``load_backbone("tiny-llama")``
(also ``tiny-qwen2``, ``tiny-gemma3``, ``tiny-gpt2``) returns one of these, frozen.
"""

from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "qwen2", "gemma3", "gpt2")
SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer(model_max_length: int = 256):
    """A byte-level tokenizer (256 byte tokens + <pad>, <s>, </s>) that encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
        padding_side="left",
    )
    return tokenizer


def tiny_config(arch: str, vocab_size: int, *, layers: int = 2, hidden: int = 32, context=256):
    """A tiny config of ``arch`` with sizes suitable for millisecond forward passes."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch in ("llama", "qwen2"):
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        return config_cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            **common,
        )
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=context,
            sliding_window=16,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **common)
    raise ValueError(f"unknown tiny architecture {arch!r} (choose from {', '.join(TINY_ARCHS)})")


def build_tiny_model(arch: str = "llama", *, seed: int = 0, **sizes):
    """A randomly initialised tiny model of ``arch`` and its byte tokenizer (not frozen)."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer(sizes.get("context", 256))
    config = tiny_config(arch, len(tokenizer), **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.name_or_path = f"tiny-{arch}"
    model.config.memllm_backbone = f"tiny-{arch}"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
