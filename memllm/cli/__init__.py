"""The ``memllm`` command line: ``memllm <command> ...``.

Each command lives in a module that exposes ``register(subparsers)``; this file only wires them
together and turns memllm's one-line errors into one-line messages (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that add subcommands; each has register(subparsers).
COMMAND_MODULES = [
    "memllm.cli.model",
    "memllm.cli.data",
    "memllm.cli.train",
    "memllm.cli.experiment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memllm",
        description="Trainable long-term memory for Hugging Face causal LMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from memllm.errors import USER_ERRORS

    try:
        result = args.func(args)
    except USER_ERRORS as err:
        print(f"memllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
