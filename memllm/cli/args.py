"""Checks of command-line arguments, in one place: argparse types and the one-line parser.

Every command's numeric, device and dtype arguments go through these types, so a bad value is
refused by argparse before anything is loaded, as one line::

    memllm generate: error: argument --max-new-tokens: must be an integer >= 1, got '0'
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

DTYPES = ("float32", "bfloat16", "float16")
"""Backbone weight dtypes the CLI accepts (quantised dtypes such as int8 are not supported)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: error: <message>``, exit 2.

    argparse prints the usage first; the hint to ``--help`` replaces it so that every bad input
    of memllm reads the same way. Subparsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, batch sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "off", as documented by the option)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def device(text: str) -> str:
    """A torch device string that exists on this machine: cpu, cuda, cuda:1, mps."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (expected cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r} (expected cpu, cuda, cuda:N or mps)"
        )
    return text


def check_new_tokens(max_new_tokens: int, window: int | None, model_name: str) -> None:
    """Refuse (rather than cap) a generation longer than the model's context window.

    Refusing keeps what runs equal to what was asked; a silent cap would shorten answers.
    """
    from memllm.errors import ConfigError

    if window is not None and max_new_tokens >= window:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} is not below {model_name}'s context of "
            f"{window} tokens; ask for fewer"
        )
